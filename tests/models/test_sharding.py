"""The forward on an 8-device CPU mesh equals the 1-device forward, with params really sharded."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from grouprank_jax.config import MeshConfig
from grouprank_jax.parallel import logical_to_spec, make_mesh
from grouprank_jax.weights import load_hf

from hf_utils import left_padded_batch, make_hf_model

MESHES = {
    "fsdp2_tensor4": MeshConfig(data=1, fsdp=2, tensor=4),
    "data2_fsdp2_tensor2": MeshConfig(data=2, fsdp=2, tensor=2),
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    # 8 heads / 4 kv heads / mlp 128 / vocab 512: every tensor-sharded dim divides 4.
    make_hf_model(path, hidden=64, heads=8, kv_heads=4, inter=128, vocab=512, tied=False)
    return path


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_forward_matches_single_device(hf_dir, name):
    mesh = make_mesh(MESHES[name])
    ids, mask = left_padded_batch(np.random.default_rng(0), [5, 9, 12, 3, 7, 12, 1, 10], 512)
    expected = np.asarray(load_hf(hf_dir)(ids, attention_mask=mask))
    model = load_hf(hf_dir, mesh=mesh)

    layer = model.layers[0]
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    q_spec = layer.attn.q_proj.kernel[...].sharding.spec
    assert q_spec == (P("fsdp", "tensor", None) if fsdp > 1 else P(None, "tensor", None))
    assert model.embed[...].sharding.spec == P("tensor", "fsdp" if fsdp > 1 else None)
    assert layer.mlp.down_proj.kernel[...].sharding.spec == P("tensor", "fsdp" if fsdp > 1 else None)
    shard_shape = layer.mlp.gate_proj.kernel[...].addressable_shards[0].data.shape
    assert shard_shape == (64 // fsdp, 128 // tensor)

    from flax import nnx

    got = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, ids, mask)
    assert got.sharding.spec[0] in (("data", "fsdp"), "fsdp", ("fsdp",), "data")  # batch stays sharded
    err = np.abs(np.asarray(got) - expected)[mask.astype(bool)].max()
    assert err <= 1e-5, f"{name}: max |dlogit| = {err}"


def test_rules_drop_non_dividing_axes():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    # 14 heads cannot split over tensor=4: that dim stays replicated (grouprank plan flags it).
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 14, 16), mesh) == P("fsdp", None, None)
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 16, 16), mesh) == P("fsdp", "tensor", None)
    assert logical_to_spec(("batch", "length"), (8, 3), mesh) == P("fsdp", None)
