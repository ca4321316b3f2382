"""The shared-prefix GRPO update (each prompt's forward once, its G responses over that KV)
equals the per-rollout update, the oracle that runs every row's whole sequence: log-probs,
loss, gradients, KL and every logged metric, within 1e-5 in fp32, for full fine-tuning and LoRA,
prompts of different lengths in one batch, micro-batches of whole prompts, on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from grad_checks import assert_gradients_close, gradient_recorder

from grouprank_jax.config import MeshConfig, model_preset
from grouprank_jax.models import create_model, shard_model
from grouprank_jax.parallel import make_mesh
from grouprank_jax.rl.config import GRPOConfig
from grouprank_jax.rl.losses import loss_kwargs
from grouprank_jax.rl.step import completion_logprobs, make_grpo_update, make_logprob_fn
from grouprank_jax.training.state import init_train_state, shard_batch
from grouprank_jax.weights.loading import rebuild_with_config

G = 4  # rollouts per prompt


def shared_prompt_batch(rng, prompts=4, prompt_len=14, completion=9, vocab=512):
    """Prompt-major rows: rollout j of prompt b is row b*G + j; prompts of different lengths
    (left padding), responses of different lengths (right padding), one empty response."""
    rows = prompts * G
    seq = np.zeros((rows, prompt_len + completion), np.int32)
    mask = np.zeros_like(seq)
    for b in range(prompts):
        length = prompt_len - 3 * b  # 14, 11, 8, 5 real prompt tokens
        tokens = rng.integers(3, vocab, length)
        seq[b * G : (b + 1) * G, prompt_len - length : prompt_len] = tokens
        mask[b * G : (b + 1) * G, prompt_len - length : prompt_len] = 1
    comp = np.zeros((rows, completion), np.int32)
    for r in range(rows):
        comp[r, : rng.integers(1, completion + 1)] = 1
    comp[rows - 1] = 0  # a response with no tokens at all
    seq[:, prompt_len:] = np.where(comp, rng.integers(3, vocab, (rows, completion)), 0)
    mask[:, prompt_len:] = comp
    return prompt_len, {
        "seq_ids": seq,
        "seq_mask": mask,
        "completion_mask": comp,
        "advantages": rng.standard_normal(rows).astype(np.float32),
    }


def _model(lora: bool):
    cfg = model_preset("tiny-smallvocab", num_heads=4, num_kv_heads=2, attention_block_size=4)
    model = create_model(cfg, seed=3)
    if lora:
        model = rebuild_with_config(model, cfg.replace(lora_rank=4, lora_alpha=8.0), None, 0)
    # move every weight (the adapters too), so LoRA's B is non-zero and the LoRA path is exercised
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x + 0.02 if x.ndim >= 2 else x, state)
    return nnx.merge(graphdef, state)


def test_logprobs_and_entropy_equal_per_rollout():
    model = _model(lora=False)
    P, rows = shared_prompt_batch(np.random.default_rng(0))
    state = init_train_state(model, optax.sgd(1.0), lora=False)
    args = (state.trainable, state.frozen, state.graphdef, rows["seq_ids"], rows["seq_mask"], P, 4)
    logp_row, ent_row = completion_logprobs(*args)
    logp_shared, ent_shared = completion_logprobs(*args, rollouts=G)
    m = rows["completion_mask"] > 0
    assert m.sum() > 10
    np.testing.assert_allclose(np.asarray(logp_shared)[m], np.asarray(logp_row)[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent_shared)[m], np.asarray(ent_row)[m], atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_update_equals_per_rollout_on_1_and_8_devices(lora):
    base = _model(lora)
    grpo = GRPOConfig(kl_coef=0.05, entropy_coef=0.01)
    P, rows = shared_prompt_batch(np.random.default_rng(1))
    tx = gradient_recorder()
    layouts = {
        1: {"per_rollout": (None, None), "shared": (G, None), "shared_micro": (G, 2 * G)},
        8: {"shared_micro": (G, 2 * G)},
    }
    results = {}
    for devices, mesh in ((1, None), (8, make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))):
        model = base if mesh is None else shard_model(base, mesh)
        state = init_train_state(model, tx, lora=lora)
        batch = shard_batch(rows, mesh)
        old, _ = completion_logprobs(
            state.trainable, state.frozen, state.graphdef, batch["seq_ids"], batch["seq_mask"], P, 4
        )
        batch["old_logp"] = old - 0.3 * jnp.asarray(rows["advantages"])[:, None]  # off-policy: clips fire
        ref = make_logprob_fn(state.graphdef, P, 4, use_lora=False, rollouts=G if lora else None)
        batch["ref_logp"] = ref(state.trainable, state.frozen, batch["seq_ids"], batch["seq_mask"]) + 0.1
        for name, (rollouts, micro) in layouts[devices].items():
            update = make_grpo_update(
                state.graphdef, tx, loss_kwargs(grpo), P, 4, donate=False, micro_rows=micro, rollouts=rollouts
            )
            _, grads, metrics = update(state.trainable, state.frozen, state.opt_state, batch)
            results[devices, name] = (jax.tree.map(np.asarray, grads), jax.device_get(metrics))
    oracle_grads, oracle = results[1, "per_rollout"]
    assert oracle["clip_frac"] > 0 and oracle["kl"] > 0 and oracle["entropy"] > 0 and oracle["grad_norm"] > 1e-3
    for key, (grads, metrics) in results.items():
        assert metrics.keys() == oracle.keys(), key
        for name in oracle:
            np.testing.assert_allclose(metrics[name], oracle[name], atol=1e-5, rtol=1e-5, err_msg=f"{key} {name}")
        assert_gradients_close(grads, oracle_grads, key)


def test_micro_batches_must_hold_whole_prompts():
    model = _model(lora=False)
    P, rows = shared_prompt_batch(np.random.default_rng(2))
    state = init_train_state(model, optax.sgd(1.0), lora=False)
    fn = make_logprob_fn(state.graphdef, P, 4, use_lora=True, micro_rows=G + 2, rollouts=G)
    with pytest.raises(ValueError, match="whole prompts"):
        fn(state.trainable, state.frozen, rows["seq_ids"][: 2 * (G + 2)], rows["seq_mask"][: 2 * (G + 2)])
