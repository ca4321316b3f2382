"""SFT: the step's math (accumulation = one big batch), the loss falls when overfitting, LoRA
trains adapters only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from grouprank_jax.config import model_preset
from grouprank_jax.models import create_model
from grouprank_jax.sft.step import make_sft_step, sft_loss_sums
from grouprank_jax.training.state import init_train_state, make_optimizer
from grouprank_jax.weights.loading import rebuild_with_config


def _batch(rng, b, t, vocab=512):
    ids = rng.integers(3, vocab, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.int32)
    mask[:, t // 2 :] = 1  # loss on the "completion" half only
    seg = np.ones((b, t), np.int32)
    seg[0, -3:] = 0  # a padded tail
    return {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=1),
        "loss_mask": mask * seg,
        "segment_ids": seg,
        "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
    }


def test_grad_accumulation_equals_one_big_batch():
    """Two accumulated micro-batches make the same update as one batch of both: with SGD the
    parameter change is ``-lr * grad`` (a direct gradient comparison), with AdamW the moments
    are linear / quadratic in the gradient (Adam's update itself would magnify float noise in
    near-zero gradient entries up to lr)."""
    model = create_model(model_preset("tiny-smallvocab"), seed=1)
    batch = _batch(np.random.default_rng(0), 4, 24)
    big = {k: v[None] for k, v in batch.items()}  # [1, 4, T]
    split = {k: v.reshape(2, 2, *v.shape[1:]) for k, v in batch.items()}  # [2, 2, T]
    results = {}
    for name, tx in (("sgd", optax.sgd(1.0)), ("adamw", make_optimizer(1e-3, 10, max_grad_norm=None))):
        for label, b in (("big", big), ("split", split)):
            state = init_train_state(model, tx, lora=False)
            step = make_sft_step(state.graphdef, tx, chunk_size=16, donate=False)
            results[name, label] = jax.device_get(step(state.trainable, state.frozen, state.opt_state, b))
    (t1, _, m1), (t2, _, m2) = results["sgd", "big"], results["sgd", "split"]
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t2)):
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5)
    (_, o1, _), (_, o2, _) = results["adamw", "big"], results["adamw", "split"]
    for a, b in zip(jax.tree.leaves(o1), jax.tree.leaves(o2)):
        # float summation order: errors relative to the largest entry, not to each entry
        np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()) + 1e-30, rtol=1e-4)


def test_loss_is_token_mean_of_masked_positions():
    model = create_model(model_preset("tiny-smallvocab"), seed=2)
    batch = _batch(np.random.default_rng(1), 2, 16)
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    loss_sum, tokens = sft_loss_sums(trainable, frozen, graphdef, batch, chunk_size=7)
    compact_sum, compact_tokens = sft_loss_sums(trainable, frozen, graphdef, batch, chunk_size=7, loss_tokens_per_row=8)
    np.testing.assert_allclose(compact_sum, loss_sum, rtol=1e-6)
    assert int(compact_tokens) == int(tokens)
    logits = model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(loss_sum, jnp.sum(nll * batch["loss_mask"]), rtol=1e-5)
    assert int(tokens) == int(batch["loss_mask"].sum())


@pytest.mark.parametrize("lora", [False, True])
def test_loss_falls_on_tiny_overfit_set(lora):
    model = create_model(model_preset("tiny-smallvocab"), seed=3)
    if lora:
        model = rebuild_with_config(model, model.cfg.replace(lora_rank=8, lora_alpha=16.0), None, 0)
    tx = make_optimizer(3e-3 if not lora else 1e-2, 40, max_grad_norm=1.0)
    state = init_train_state(model, tx, lora=lora)
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    step = make_sft_step(state.graphdef, tx, chunk_size=32)
    batch = {k: v[None] for k, v in _batch(np.random.default_rng(4), 4, 20).items()}
    losses = []
    trainable, opt_state = state.trainable, state.opt_state
    for _ in range(40):
        trainable, opt_state, metrics = step(trainable, state.frozen, opt_state, batch)
        losses.append(float(metrics["loss"]))
    # Rank-8 adapters on a 64-wide model learn slower than full weights; both must clearly learn.
    assert losses[-1] < (0.85 if lora else 0.5) * losses[0], losses
    assert all(b < a for a, b in zip(losses[:10], losses[1:11])), losses[:11]
    if lora:
        names = {tuple(map(str, p[-2:])) for p, _ in nnx.to_flat_state(trainable)}
        assert names == {("lora", "a"), ("lora", "b")}
        for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state.frozen)):
            np.testing.assert_array_equal(a, b)


def test_sft_lora_adapters_go_on_the_configured_targets(tmp_path):
    """``sft.lora_targets`` decides where the SFT stage's adapters go (``model.lora_*`` is
    rejected in a run config: see tests/config)."""
    from grouprank_jax.config.run import run_config_from_dict
    from grouprank_jax.data.records import records_from_rows
    from grouprank_jax.sft.trainer import train_sft

    rows = [
        {"query": f"q{i}", "documents": ["alpha beta", "gamma delta", "epsilon"], "scores": [i, 3, 0]} for i in range(2)
    ]
    cfg = run_config_from_dict(
        {
            "model": {"preset": "tiny"},
            "prompt": {"preset": "compact"},
            "sft": {
                "per_device_batch": 1,
                "grad_accum_steps": 1,
                "max_seq_len": 256,
                "length_buckets": [256],
                "packing": False,
                "total_steps": 1,
                "lora_rank": 4,
                "lora_targets": ["q_proj", "v_proj"],
            },
            "checkpoint": {"async_save": False},
            "run_dir": str(tmp_path / "run"),
        }
    )
    result = train_sft(cfg, records=records_from_rows(rows, purpose="sft"), progress=False)
    adapted = {str(path[-3]) for path, _ in nnx.to_flat_state(nnx.state(result.model, nnx.LoRAParam))}
    assert adapted == {"q_proj", "v_proj"} and result.model.cfg.lora_targets == ("q_proj", "v_proj")


def test_input_mistakes_fail_before_the_model_is_built(tmp_path):
    """An empty data file or an unknown prompt preset: one error, nothing written to run_dir."""
    from grouprank_jax.config.run import run_config_from_dict
    from grouprank_jax.sft.trainer import train_sft

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    base = {"model": {"preset": "tiny"}, "run_dir": str(tmp_path / "run")}
    with pytest.raises(ValueError, match=r"data.sft_train: .*empty.jsonl holds no records"):
        train_sft(run_config_from_dict({**base, "data": {"sft_train": [str(empty)]}}), progress=False)
    rows = [{"query": "q", "documents": ["a", "b"], "scores": [3, 0]}]
    with pytest.raises(ValueError, match="nope"):
        train_sft(run_config_from_dict({**base, "prompt": {"preset": "nope"}}), records=rows, progress=False)
    assert not (tmp_path / "run").exists()


def _grouprank_rows(n, docs=3):
    return [
        {"query": f"query {i}", "documents": [f"passage {j} about {i}" for j in range(docs)], "scores": [i % 11, 3, 0]}
        for i in range(n)
    ]


def test_an_over_long_record_is_named_before_the_model_is_built(tmp_path, caplog):
    """sft.truncation "error" (the default): every record is measured first, and one over
    sft.max_seq_len is named by file:line before anything is built (it used to be cut from the
    left silently, losing its system prompt and query); "left" cuts it with a warning."""
    import json

    from grouprank_jax.config.run import run_config_from_dict
    from grouprank_jax.data.records import DataError
    from grouprank_jax.sft.trainer import train_sft

    data = tmp_path / "sft.jsonl"
    rows = _grouprank_rows(2)
    rows[1]["documents"][0] = "long " * 400
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {
        "model": {"preset": "tiny"},
        "prompt": {"preset": "compact"},
        "data": {"sft_train": [str(data)]},
        "sft": {"per_device_batch": 1, "grad_accum_steps": 1, "max_seq_len": 256, "packing": False, "total_steps": 1},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "checkpoint": {"async_save": False},
        "run_dir": str(tmp_path / "run"),
    }
    with pytest.raises(DataError, match=rf"{data}:2: \d+ prompt \+ \d+ target tokens = \d+ > seq_len=256"):
        train_sft(run_config_from_dict(base), progress=False)
    assert not (tmp_path / "run").exists()
    base["sft"]["truncation"] = "left"
    with caplog.at_level("WARNING"):
        train_sft(run_config_from_dict(base), progress=False)
    assert "1 of 2 records exceed sft.max_seq_len=256 and are cut (sft.truncation=left)" in caplog.text


def test_packed_epochs_count_rows_not_records(tmp_path):
    """With packing several records share a row: sft.epochs = 1 trains about one epoch of target
    tokens (it trained ~records-per-row epochs, with the LR schedule stretched as much)."""
    from grouprank_jax.config.run import run_config_from_dict
    from grouprank_jax.data.pipeline import chat_tokenize_fn, sft_token_lengths
    from grouprank_jax.data.records import records_from_rows
    from grouprank_jax.sft.render import GroupRankRender
    from grouprank_jax.sft.trainer import train_sft
    from grouprank_jax.tokenizer import load_tokenizer

    records = records_from_rows(_grouprank_rows(24), purpose="sft")
    cfg = run_config_from_dict(
        {
            "model": {"preset": "tiny"},
            "prompt": {"preset": "compact"},
            "sft": {"per_device_batch": 1, "grad_accum_steps": 1, "max_seq_len": 512, "packing": True, "epochs": 1},
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
            "checkpoint": {"async_save": False},
            "run_dir": str(tmp_path / "run"),
        }
    )
    tokenize = chat_tokenize_fn(load_tokenizer(), GroupRankRender("compact", cfg.prompt.max_doc_chars))
    lengths, _ = sft_token_lengths(records, tokenize, 512)
    assert lengths.sum() > 3 * 512  # several records per row, several rows
    epoch_targets = sum(len(tokenize(r)[1]) for r in records)
    result = train_sft(cfg, records=records, progress=False)
    trained = sum(m["sft/loss_tokens"] for m in result.metrics)
    assert 0.7 * epoch_targets <= trained <= 1.3 * epoch_targets, (trained, epoch_targets, len(result.metrics))


def test_a_resumed_lora_run_adapts_the_base_it_started_from(tmp_path):
    """A LoRA run's frozen base is written to ``base/params`` at its first start, and export
    merges the adapters into it. A resume used to rebuild the base from ``init_from`` again, so
    if that had changed (a run dir that trained on), training went on over another base than the
    one export uses; now it resumes over ``base/params``."""
    import jax
    import numpy as np

    from grouprank_jax.config import model_preset
    from grouprank_jax.config.run import run_config_from_dict
    from grouprank_jax.data.records import records_from_rows
    from grouprank_jax.models import create_model
    from grouprank_jax.models.lora import base_filter
    from grouprank_jax.sft.trainer import train_sft
    from grouprank_jax.weights.orbax_io import save_params

    start = tmp_path / "start"
    save_params(create_model(model_preset("tiny"), seed=1), start)
    rows = [{"query": f"q{i}", "documents": ["alpha beta", "gamma", "delta"], "scores": [i, 3, 0]} for i in range(4)]
    cfg = run_config_from_dict(
        {
            "model": {"preset": "tiny"},
            "prompt": {"preset": "compact"},
            "init_from": str(start),
            "sft": {"per_device_batch": 1, "max_seq_len": 256, "length_buckets": [256], "packing": False},
            "checkpoint": {"async_save": False, "save_every": 1},
            "run_dir": str(tmp_path / "run"),
        }
    )
    cfg = cfg.replace(sft=cfg.sft.replace(total_steps=2, lora_rank=4))
    records = records_from_rows(rows, purpose="sft")
    first = train_sft(cfg, records=records, stop_after=1, progress=False)
    base = [np.asarray(x) for x in jax.tree.leaves(nnx.state(first.model, base_filter()))]
    save_params(create_model(model_preset("tiny"), seed=2), start)  # init_from moved on
    second = train_sft(cfg, records=records, progress=False)
    assert second.step == 2
    resumed = [np.asarray(x) for x in jax.tree.leaves(nnx.state(second.model, base_filter()))]
    assert len(resumed) == len(base) and all(np.array_equal(a, b) for a, b in zip(resumed, base))


def test_a_lora_trained_model_passed_in_starts_from_its_merged_weights(tmp_path):
    """``train_sft(model=...)`` with a model that already carries trained adapters: its frozen
    base is the merged weights (what ``init_from`` of that model would give). Before, the old
    adapters were carried over as the new ones and the base was the pre-LoRA one."""
    import jax
    import numpy as np

    from grouprank_jax.config import model_preset
    from grouprank_jax.config.run import run_config_from_dict
    from grouprank_jax.data.records import records_from_rows
    from grouprank_jax.models import create_model
    from grouprank_jax.models.lora import base_filter
    from grouprank_jax.sft.trainer import train_sft
    from grouprank_jax.weights.loading import merge_lora, with_lora

    adapted = with_lora(create_model(model_preset("tiny"), seed=1), 4, 8.0, ("q_proj", "v_proj"), None, 0)
    state = nnx.state(adapted, nnx.LoRAParam)
    rng = np.random.default_rng(0)
    nnx.update(adapted, jax.tree.map(lambda x: jax.numpy.asarray(rng.normal(0, 0.1, x.shape), x.dtype), state))
    merged = [np.asarray(x) for x in jax.tree.leaves(nnx.state(merge_lora(adapted, None), nnx.Param))]
    rows = [{"query": f"q{i}", "documents": ["alpha beta", "gamma", "delta"], "scores": [i, 3, 0]} for i in range(2)]
    cfg = run_config_from_dict(
        {
            "model": {"preset": "tiny"},
            "prompt": {"preset": "compact"},
            "sft": {"per_device_batch": 1, "max_seq_len": 256, "length_buckets": [256], "packing": False},
            "checkpoint": {"async_save": False},
            "run_dir": str(tmp_path / "run"),
        }
    )
    cfg = cfg.replace(sft=cfg.sft.replace(total_steps=1, lora_rank=4))
    result = train_sft(cfg, records=records_from_rows(rows, purpose="sft"), model=adapted, progress=False)
    base = [np.asarray(x) for x in jax.tree.leaves(nnx.state(result.model, base_filter()))]
    assert len(base) == len(merged)
    for a, b in zip(base, merged):
        np.testing.assert_allclose(a, b, rtol=0, atol=0)
