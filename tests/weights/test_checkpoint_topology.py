"""A training run saved on one device set loads on another: ``grouprank export-hf`` on one host
after a pod run, or a GRPO stage on a smaller slice than its SFT ``init_from``."""

import json
import subprocess
import sys

import jax
import numpy as np
import optax
from flax import nnx

from grouprank_jax.checkpoint import QUARANTINE_DIR, Checkpointer
from grouprank_jax.config import MeshConfig, model_preset
from grouprank_jax.models import create_model
from grouprank_jax.parallel import make_mesh
from grouprank_jax.training.run_dir import RunDir, save_base_weights
from grouprank_jax.training.state import init_train_state
from grouprank_jax.weights.loading import load_model

from conftest import REPO

LOAD_ON_ONE_DEVICE = """
import json, sys
import jax, numpy as np
from flax import nnx
from grouprank_jax.weights.loading import load_model
assert jax.device_count() == 1
params = nnx.state(load_model(sys.argv[1]), nnx.Param).to_pure_dict()
leaves = jax.tree_util.tree_leaves_with_path(params)
flat = {jax.tree_util.keystr(p): float(np.asarray(x, np.float64).sum()) for p, x in leaves}
print("RESULT " + json.dumps(flat))
"""


def _sums(model) -> dict[str, float]:
    params = nnx.state(model, nnx.Param).to_pure_dict()
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {jax.tree_util.keystr(p): float(np.asarray(x, np.float64).sum()) for p, x in leaves}


def test_run_saved_on_8_devices_loads_on_1(tmp_path):
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    run = RunDir(tmp_path / "run")
    run.prepare()
    states = {}
    for step, seed in ((1, 0), (2, 1)):  # two steps: the latest must be read, none moved aside
        model = create_model(model_preset("tiny"), mesh=mesh, seed=seed)
        save_base_weights(model, run)
        state = init_train_state(model, optax.adamw(1e-3), lora=False)
        with Checkpointer(run.checkpoints, async_save=False) as ckpt:
            ckpt.save(step, state.checkpoint_tree(), force=True)
        states[step] = _sums(state.model)

    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_ON_ONE_DEVICE, str(run.root)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    assert json.loads(line[len("RESULT ") :]) == states[2]  # the latest step, bit for bit
    assert not (run.checkpoints / QUARANTINE_DIR).exists()
    assert _sums(load_model(run.root, step=1, mesh=mesh)) == states[1]  # and on the saving mesh
