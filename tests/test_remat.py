"""Rematerialisation changes memory, never values: gradients with and without remat agree
(full weights and LoRA adapters)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grouprank_jax.config import model_preset
from grouprank_jax.models import create_model
from grouprank_jax.training import rebuild_with_config


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_gradients_match(policy, lora):
    cfg = model_preset("tiny-smallvocab")
    base = create_model(cfg, seed=0)
    if lora:
        base = rebuild_with_config(base, cfg.replace(lora_rank=4), None, 0)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 512, (2, 12)))
    grads = []
    for remat in ("none", policy):
        model = rebuild_with_config(base, base.cfg.replace(remat=remat), None, 0)
        graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam if lora else nnx.Param, ...)

        def loss(t, f):
            return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, t, f)(ids))[..., 5])

        grads.append(jax.jit(jax.grad(loss))(trainable, frozen))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, atol=1e-6)
