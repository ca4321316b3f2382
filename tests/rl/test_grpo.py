"""GRPO: on-policy ratio = 1 on the first update, the trainer hands the update the configured
group advantages, the 8-device update equals the 1-device one,
and LoRA's reference policy is the base model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from grad_checks import assert_gradients_close, gradient_recorder

from grouprank_jax.config import MeshConfig, model_preset
from grouprank_jax.config.run import run_config_from_dict
from grouprank_jax.data.records import records_from_rows
from grouprank_jax.models import create_model, shard_model
from grouprank_jax.parallel import make_mesh
from grouprank_jax.rl.config import GRPOConfig
from grouprank_jax.rl.losses import loss_kwargs
from grouprank_jax.rl.step import completion_logprobs, make_grpo_update
from grouprank_jax.training.state import init_train_state, make_optimizer, shard_batch
from grouprank_jax.weights.loading import rebuild_with_config

ROWS = [
    {
        "query": f"topic{i % 3}",
        "documents": [f"passage {j} on topic{j % 3}" for j in range(5)],
        "gold": [10 if j % 3 == i % 3 else 0 for j in range(5)],
    }
    for i in range(8)
]


def test_first_update_ratio_is_one_and_drift_is_logged(tmp_path, monkeypatch):
    from grouprank_jax.rl import trainer as rl_trainer
    from grouprank_jax.rl.trainer import train_grpo

    cfg = run_config_from_dict(
        {
            "model": {"preset": "tiny"},
            "prompt": {"preset": "compact"},
            "grpo": {
                "rollouts_per_prompt": 2,
                "global_batch_prompts": 2,
                "mini_batch_prompts": 2,
                "max_prompt_len": 256,
                "max_response_len": 16,
                "group_size_max": 5,  # group_sampling: as_written (the default) takes each record whole
                "lora_rank": 4,
                "lora_alpha": 8.0,
                # Not 1: the sampler's old_logp and the update's logp must both be taken at the
                # sampling temperature (TRL, verl), or the first ratio is not 1.
                "temperature": 0.7,
                "adv_eps": 0.5,  # off the default, to see that the trainer uses the configured one
            },
            "run_dir": str(tmp_path / "run"),
        }
    )
    prompted = []  # the groups the trainer renders: the records as written (paper-notes §5)
    real_build_prompts = rl_trainer.build_prompts
    monkeypatch.setattr(
        rl_trainer,
        "build_prompts",
        lambda tok, groups, *a: prompted.extend(groups) or real_build_prompts(tok, groups, *a),
    )
    # A random-init model's rollouts all fail the format (equal rewards, zero advantages), so the
    # rewards are set to known, unequal values here, and the advantages the update receives are
    # checked against GRPO's group normalisation written out (verl: unbiased std, + eps).
    rewards = np.array([1.0, 0.0, -0.5, 0.7], np.float32)  # 2 prompts x G = 2
    real_score = rl_trainer.score_rollouts
    monkeypatch.setattr(rl_trainer, "score_rollouts", lambda *a, **k: {**real_score(*a, **k), "reward": rewards})
    received = []
    real_shard = rl_trainer.shard_batch
    monkeypatch.setattr(rl_trainer, "shard_batch", lambda rows, mesh: received.append(rows) or real_shard(rows, mesh))
    records = records_from_rows(ROWS, purpose="rl")
    result = train_grpo(cfg, records=records, max_steps=1, progress=False)
    groups = rewards.reshape(2, 2)
    want = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 0.5)
    (rows,) = received
    np.testing.assert_allclose(rows["advantages"], want.reshape(-1), atol=1e-6)
    written = {(r["query"], tuple(d["text"] for d in r["documents"]), tuple(r["gold"])) for r in records}
    assert len(prompted) == 2 and all((g.query, g.docs, g.gold) in written for g in prompted)
    metrics = result.metrics[0]
    assert abs(metrics["grpo/first_ratio_mean"] - 1.0) <= 1e-5
    assert 0.0 <= metrics["grpo/logprob_drift"] <= 1e-4
    # LoRA starts at B = 0: policy == reference, so the KL is 0 when both use the same temperature.
    assert abs(metrics["grpo/kl"]) <= 1e-6, metrics["grpo/kl"]
    for key in ("grpo/reward_mean", "grpo/format_valid_rate", "grpo/entropy", "grpo/kl", "grpo/step_time_s"):
        assert key in metrics
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def _rollout_batch(rng, rows=8, prompt=12, completion=10, vocab=512):
    seq = rng.integers(3, vocab, (rows, prompt + completion)).astype(np.int32)
    mask = np.ones_like(seq)
    mask[:, : rng.integers(0, 4)] = 0  # some left padding
    comp = np.ones((rows, completion), np.int32)
    for r in range(rows):
        comp[r, rng.integers(3, completion + 1) :] = 0
    mask[:, prompt:] = comp
    return prompt, {
        "seq_ids": seq,
        "seq_mask": mask,
        "completion_mask": comp,
        "advantages": rng.standard_normal(rows).astype(np.float32),
    }


@pytest.mark.parametrize("lora", [False, True])
def test_update_on_8_device_mesh_equals_single_device(lora):
    cfg = model_preset("tiny-smallvocab", num_heads=4, num_kv_heads=2)
    base = create_model(cfg, seed=5)
    if lora:
        base = rebuild_with_config(base, cfg.replace(lora_rank=4, lora_alpha=8.0), None, 0)
        # non-zero adapters, so the LoRA path is really exercised
        graphdef, state = nnx.split(base)
        state = jax.tree.map(lambda x: x + 0.01 if x.ndim >= 2 else x, state)
        base = nnx.merge(graphdef, state)
    grpo = GRPOConfig(kl_coef=0.001)
    P, rows = _rollout_batch(np.random.default_rng(0))
    # The recorded gradients, leaf by leaf: one AdamW step's weights (~lr * sign(grad)) would
    # hide a wrongly scaled gradient entry.
    tx = gradient_recorder()
    results = []
    for mesh in (None, make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        model = base if mesh is None else shard_model(base, mesh)
        state = init_train_state(model, tx, lora=lora)
        batch = shard_batch(rows, mesh)
        old, _ = completion_logprobs(
            state.trainable, state.frozen, state.graphdef, batch["seq_ids"], batch["seq_mask"], P, 8
        )
        batch["old_logp"] = old - 0.01  # off-policy by a little, so clipping is exercised
        batch["ref_logp"] = old + 0.02
        update = make_grpo_update(state.graphdef, tx, loss_kwargs(grpo), P, 8, donate=False)
        _, grads, metrics = update(state.trainable, state.frozen, state.opt_state, batch)
        results.append((jax.tree.map(np.asarray, grads), jax.device_get(metrics)))
    (g1, m1), (g8, m8) = results
    np.testing.assert_allclose(m1["loss"], m8["loss"], atol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    assert len(jax.tree.leaves(g8)) == len(jax.tree.leaves(g1)) > 2 and float(m1["grad_norm"]) > 0
    assert_gradients_close(g8, g1, "8 devices vs 1")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_equal_one_pass(agg):
    """Micro-batched gradient accumulation (strided micro-batches, a global denominator) is the
    same update as one pass: SGD's new params are ``-lr * grad`` away from the old ones, so they
    compare the gradients directly, and AdamW's first moments (``(1 - b1) * grad``) and second
    moments (``(1 - b2) * grad**2``) compare the optimizer state."""
    model = create_model(model_preset("tiny-smallvocab"), seed=7)
    # max_response_len: the rows complete <= 10 tokens (Dr.GRPO divides by it)
    grpo = GRPOConfig(kl_coef=0.001, loss_agg_mode=agg, max_response_len=16)
    P, rows = _rollout_batch(np.random.default_rng(2))
    outs = {}
    for name, tx in (("sgd", optax.sgd(1.0)), ("adamw", make_optimizer(1e-3, 10, max_grad_norm=None))):
        for micro in (None, 2):
            state = init_train_state(model, tx, lora=False)
            batch = {k: jnp.asarray(v) for k, v in rows.items()}
            old, _ = completion_logprobs(
                state.trainable, state.frozen, state.graphdef, batch["seq_ids"], batch["seq_mask"], P, 8
            )
            batch["old_logp"], batch["ref_logp"] = old - 0.01, old + 0.02
            update = make_grpo_update(state.graphdef, tx, loss_kwargs(grpo), P, 8, donate=False, micro_rows=micro)
            outs[name, micro] = jax.device_get(update(state.trainable, state.frozen, state.opt_state, batch))
    (t1, _, m1), (t2, _, m2) = outs["sgd", None], outs["sgd", 2]
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    moved = max(
        float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(nnx.state(model, nnx.Param)))
    )
    assert moved > 1e-4  # the update did something
    for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t2)):
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5)
    (_, o1, _), (_, o2, _) = outs["adamw", None], outs["adamw", 2]
    assert len(jax.tree.leaves(o1)) > 2
    for a, b in zip(jax.tree.leaves(o1), jax.tree.leaves(o2)):
        # float summation order: errors relative to the largest entry, not to each entry
        np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()) + 1e-30, rtol=1e-4)


def test_lora_reference_is_base_model():
    cfg = model_preset("tiny-smallvocab")
    base = create_model(cfg, seed=6)
    adapted = rebuild_with_config(base, cfg.replace(lora_rank=4), None, 0)
    graphdef, state = nnx.split(adapted)
    state = jax.tree.map(lambda x: x + 0.05 if x.ndim >= 2 else x, state)  # move the adapters (and base)
    adapted = nnx.merge(graphdef, state)
    ids = np.random.default_rng(1).integers(3, 512, (2, 9))
    with_adapters = adapted(ids)
    without = adapted(ids, use_lora=False)
    assert float(jnp.abs(with_adapters - without).max()) > 1e-3
    # adapters off == a plain model holding the same base weights
    plain = rebuild_with_config(adapted, cfg, None, 0)
    np.testing.assert_allclose(without, plain(ids), atol=1e-6)


def test_mini_batches_are_strided_over_prompts():
    from grouprank_jax.rl.trainer import mini_batch_rows

    minis = mini_batch_rows(num_prompts=8, rollouts=2, num_minis=2)
    assert [m.tolist() for m in minis] == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    assert sorted(np.concatenate(minis).tolist()) == list(range(16))  # every rollout once
    # With the prompts held contiguously by 2 (or 4) processes, each mini-batch takes the same
    # number of prompts from every process.
    for processes in (2, 4):
        owner = np.repeat(np.arange(processes), 16 // processes)
        for m in minis:
            assert len(set(np.bincount(owner[m], minlength=processes).tolist())) == 1


def test_as_written_refuses_a_record_over_group_size_max(tmp_path):
    """A whole candidate pool as one RL prompt is refused with its location before any compile."""
    from grouprank_jax.rl.trainer import train_grpo

    cfg = run_config_from_dict(
        {
            "model": {"preset": "tiny"},
            "grpo": {"group_size_min": 4, "group_size_max": 4},
            "run_dir": str(tmp_path / "run"),
        }
    )
    records = records_from_rows(ROWS, purpose="rl")
    with pytest.raises(ValueError, match=r"of 5 documents, over grpo.group_size_max=4.*group_sampling: redraw") as err:
        train_grpo(cfg, records=records, max_steps=1, progress=False)
    assert str(err.value).startswith(records[0]["source"])


def test_a_record_whose_prompt_cannot_fit_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """A query too long for grpo.max_prompt_len even with empty documents is named up front; it
    used to raise mid-run, at the step that first drew it."""
    import grouprank_jax.rl.trainer as trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the records were checked")

    monkeypatch.setattr(trainer, "initial_model", no_model)
    cfg = run_config_from_dict(
        {
            "model": {"preset": "tiny"},
            "prompt": {"preset": "compact"},
            "grpo": {"max_prompt_len": 256},
            "run_dir": str(tmp_path / "run"),
        }
    )
    rows = [dict(r) for r in ROWS]
    rows[1]["query"] = " ".join(f"word{i}" for i in range(300))  # ~600 tokens of query alone
    records = records_from_rows(rows, purpose="rl")
    with pytest.raises(ValueError, match=r"needs \d+ tokens with empty documents .* grpo.max_prompt_len is 256") as err:
        trainer.train_grpo(cfg, records=records, max_steps=1, progress=False)
    assert str(err.value).startswith(records[1]["source"])


def test_step_metrics_average_ranking_over_rewarded_rollouts():
    """``format_valid_rate`` counts rollouts that earned the group reward, and rollout NDCG,
    Recall and alignment average only those: an empty ``{}`` answer (status 0 but -0.1) and
    parsable JSON outside the tags (-0.5) used to count as valid / as NDCG 1."""
    import types

    from grouprank_jax.rl.rollout import Group, score_rollouts
    from grouprank_jax.rl.trainer import _step_metrics
    from grouprank_jax.task.reward import RewardConfig

    group = Group("q", tuple(f"d{i}" for i in range(10)), (10, 8, 0, 0, 0, 0, 0, 0, 0, 0))
    answer = '<reason>x</reason><answer>```json\n{"[1]": 10, "[2]": 8}\n```</answer>'
    texts = [
        "garbage, no tags, no json",
        "<reason>x</reason><answer>```json\n{}\n```</answer>",
        'I think {"[1]": 10, "[2]": 8}',
        answer,
    ]
    scored = score_rollouts(texts, [group], 4, RewardConfig())
    np.testing.assert_allclose(scored["reward"][:3], [-0.5, -0.1, -0.5])
    assert scored["ndcg"][2] == pytest.approx(1.0)  # what the old mean counted in
    out = types.SimpleNamespace(lengths=np.full(4, 5, np.int32))
    metrics = _step_metrics(scored, out, {}, step_time=2.0, sample_time=1.0, train_tokens=10.0, rollouts=4)
    assert metrics["format_valid_rate"] == 0.25
    for key in ("rollout_ndcg@10", "rollout_recall@10", "alignment"):
        assert metrics[key] == pytest.approx(float(scored[key.split("@")[0].replace("rollout_", "")][3])), key
    assert metrics["reward_mean"] == pytest.approx(float(np.mean(scored["reward"])))


def test_frac_reward_zero_std_counts_groups_without_a_learning_signal():
    """TRL's ``frac_reward_zero_std``: the share of prompts whose G rewards are all equal (their
    advantages are 0), over prompt-major rows."""
    import types

    from grouprank_jax.rl.trainer import _step_metrics

    reward = np.array([-0.5, -0.5, -0.5, 0.2, 0.9, 0.2, 0.7, 0.7, 0.7], np.float32)  # 3 prompts x G=3
    zeros = np.zeros_like(reward)
    scored = {"reward": reward, "ndcg": zeros, "recall": zeros, "alignment": zeros, "rewarded": zeros}
    out = types.SimpleNamespace(lengths=np.full(9, 5, np.int32))
    metrics = _step_metrics(scored, out, {}, step_time=2.0, sample_time=1.0, train_tokens=10.0, rollouts=3)
    assert metrics["frac_reward_zero_std"] == pytest.approx(2 / 3)
    metrics = _step_metrics(scored, out, {}, step_time=2.0, sample_time=1.0, train_tokens=10.0, rollouts=9)
    assert metrics["frac_reward_zero_std"] == 0.0


def test_training_tokens_count_a_shared_prompt_once():
    from grouprank_jax.rl.trainer import computed_tokens

    mask = np.zeros((4, 7), np.int32)  # 2 prompts x G=2, prompt 4 (left-padded) + response 3
    mask[:2, 1:4] = 1  # prompt 0: 3 tokens
    mask[2:, 0:4] = 1  # prompt 1: 4 tokens
    mask[:, 4:] = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert computed_tokens(mask, 4, None) == 2 * 3 + 2 * 4 + 9
    assert computed_tokens(mask, 4, 2) == 3 + 4 + 9


def test_max_steps_caps_the_grpo_schedule_as_for_sft():
    """``--max-steps`` said "cap" but set GRPO's step count (and LR schedule) outright."""
    from grouprank_jax.rl.trainer import grpo_total_steps

    grpo = GRPOConfig(global_batch_prompts=4, mini_batch_prompts=4, epochs=2)
    assert grpo_total_steps(grpo, 10) == 4  # 2 epochs x 2 whole batches
    assert grpo_total_steps(grpo, 10, max_steps=3) == 3
    assert grpo_total_steps(grpo, 10, max_steps=50) == 4
    assert grpo_total_steps(grpo.replace(total_steps=16), 10) == 16
    with pytest.raises(ValueError, match="grpo.total_steps must be >= 1"):
        GRPOConfig(total_steps=0)
