"""Every ``grouprank`` command uses JAX's persistent compilation cache: by default under
``~/.cache/grouprank-jax/xla``; a second start loads the executables the first one wrote;
``GROUPRANK_COMPILE_CACHE=0`` turns it off."""

import json
import os
import subprocess
import sys

from grouprank_jax.config import model_preset


def _generate(tmp_path, home, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # conftest sets one
    # The tiny model compiles in under JAX's 1 s threshold for writing an entry: write them all.
    env.update(HOME=str(home), JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update(env_overrides)
    cmd = [sys.executable, "-m", "grouprank_jax.cli", "-v", "generate", "--model", str(tmp_path / "hf")]
    cmd += ["--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "out.jsonl")]
    cmd += ["--temperature", "0", "--max-new-tokens", "4", "--max-prompt-len", "32"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_a_second_start_loads_what_the_first_compiled(tmp_path):
    from grouprank_jax.models import create_model
    from grouprank_jax.tokenizer import load_tokenizer
    from grouprank_jax.weights import save_hf

    save_hf(create_model(model_preset("tiny"), seed=0), tmp_path / "hf", tokenizer=load_tokenizer())
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Rank these documents"}) + "\n")
    cache = tmp_path / "home" / ".cache" / "grouprank-jax" / "xla"

    first = _generate(tmp_path, tmp_path / "home")
    written = sorted(p.name for p in cache.iterdir())
    assert written, "the first run wrote nothing to the default cache directory"
    assert "PERSISTENT COMPILATION CACHE MISS" in first and "Persistent compilation cache hit" not in first
    second = _generate(tmp_path, tmp_path / "home")
    # Every program of the second start is loaded; none is compiled (JAX logs each miss).
    assert "Persistent compilation cache hit" in second
    assert "PERSISTENT COMPILATION CACHE MISS" not in second, second[-3000:]

    _generate(tmp_path, tmp_path / "off", GROUPRANK_COMPILE_CACHE="0")
    assert not (tmp_path / "off" / ".cache").exists()
