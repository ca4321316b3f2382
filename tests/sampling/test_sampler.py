"""The sampler against HF transformers' generate, a teacher-forced forward, a mesh, and stops."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from grouprank_jax.sampling import Sampler, SamplingParams
from grouprank_jax.weights import load_hf

from hf_utils import left_padded_batch, make_hf_model

MAX_NEW = 36
LENGTHS = [5, 17, 11]


def _prompts(seed=1):
    ids, mask = left_padded_batch(np.random.default_rng(seed), LENGTHS, 512)
    return ids, mask, [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]


def _pair(tmp_path_factory, tied):
    """(HF model, our model loaded from its checkpoint, a Sampler on it)."""
    d = tmp_path_factory.mktemp("tied" if tied else "untied")
    hf = make_hf_model(d, tied=tied, seed=7)
    model = load_hf(d)
    return hf, model, Sampler(model, max_prompt_len=64, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The untied model: the remaining tests exercise the engine, not the LM head variant."""
    return _pair(tmp_path_factory, tied=False)


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory):
    return _pair(tmp_path_factory, tied=True)


@pytest.mark.parametrize("which", ["pair", "tied_pair"])
def test_greedy_matches_transformers_generate(request, which):
    import torch

    hf, _, sampler = request.getfixturevalue(which)
    ids, mask, prompts = _prompts()
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            do_sample=False,
            max_new_tokens=MAX_NEW,
            min_new_tokens=MAX_NEW,
            pad_token_id=0,
            eos_token_id=2,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ref_tokens = ref.sequences[:, ids.shape[1] :].numpy()  # [B, MAX_NEW]
    ref_logp = torch.log_softmax(torch.stack(ref.logits, 1).float(), -1)  # [B, MAX_NEW, V]
    ref_lp = torch.gather(ref_logp, 2, ref.sequences[:, ids.shape[1] :, None])[..., 0].numpy()

    out = sampler.generate(prompts, SamplingParams(temperature=0.0, ignore_eos=True))
    assert out.tokens.shape == (3, MAX_NEW) and out.tokens.dtype == np.int32
    np.testing.assert_array_equal(out.tokens, ref_tokens)
    np.testing.assert_allclose(out.logprobs, ref_lp, atol=1e-4)
    np.testing.assert_array_equal(out.lengths, [MAX_NEW] * 3)
    np.testing.assert_array_equal(out.prompt_lengths, LENGTHS)
    assert out.texts is None and out.finish_reasons == ("length",) * 3
    # 3 prompts pad to a batch bucket of 4 and length bucket 64; the dummy row is dropped.
    assert (out.stats.batch_bucket, out.stats.prompt_bucket) == (4, 64)


def test_sampled_logprobs_match_teacher_forcing_and_one_prefill_serves_n(pair):
    _, model, sampler = pair
    ids, mask, prompts = _prompts(2)
    n, new = 3, 12
    out = sampler.generate(
        prompts, SamplingParams(temperature=1.0, top_k=40, n=n, seed=5, max_new_tokens=new, ignore_eos=True)
    )
    assert out.tokens.shape == (len(prompts) * n, new)
    # Teacher forcing: one left-padded forward of every prompt + its sampled completion.
    seqs = np.concatenate([np.repeat(ids, n, axis=0), out.tokens], axis=1)  # [P*n, T+new]
    full_mask = np.concatenate([np.repeat(mask, n, axis=0), np.ones_like(out.tokens)], axis=1)
    forward = nnx.jit(lambda m, x, am: m(x, attention_mask=am))  # eager op-by-op dispatch is far slower
    logits = np.asarray(forward(model, seqs, full_mask), np.float64)[:, ids.shape[1] - 1 : -1]  # [P*n, new, V]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, want, atol=1e-4)
    # The n rows of a prompt share one prefill; their first-step distribution equals a separate
    # (un-repeated) forward of the prompts: each row's first-token log-prob under it.
    first = np.asarray(forward(model, ids, mask), np.float64)[:, -1]  # [P, V]
    first = (
        first
        - first.max(-1, keepdims=True)
        - np.log(np.exp(first - first.max(-1, keepdims=True)).sum(-1, keepdims=True))
    )
    for i in range(len(prompts)):
        np.testing.assert_allclose(
            out.logprobs[i * n : (i + 1) * n, 0], first[i, out.tokens[i * n : (i + 1) * n, 0]], atol=1e-5
        )
    # The n rollouts of a prompt differ (the row index is folded into the key).
    assert len({tuple(out.tokens[j]) for j in range(n)}) > 1
    # At temperature T, ``tempered_logprobs`` gives log softmax(logits / T) (GRPO's old_logp, as
    # TRL / verl compute it); without it the plain softmax's. Same program (T is traced).
    for tempered in (True, False):
        params = SamplingParams(
            temperature=0.6, top_k=40, n=n, seed=5, max_new_tokens=new, ignore_eos=True, tempered_logprobs=tempered
        )
        hot = sampler.generate(prompts, params)
        seqs = np.concatenate([np.repeat(ids, n, axis=0), hot.tokens], axis=1)
        scaled = np.asarray(forward(model, seqs, full_mask), np.float64)[:, ids.shape[1] - 1 : -1]
        scaled = scaled / (0.6 if tempered else 1.0)
        scaled = scaled - scaled.max(-1, keepdims=True)
        scaled = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
        want = np.take_along_axis(scaled, hot.tokens[..., None], -1)[..., 0]
        np.testing.assert_allclose(hot.logprobs, want, atol=1e-4)


def test_greedy_n_rows_equal_single_and_seed_reproducibility(pair):
    _, _, sampler = pair
    _, _, prompts = _prompts()
    single = sampler.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    rep = sampler.generate(prompts, SamplingParams(temperature=0.0, n=2, max_new_tokens=10, ignore_eos=True))
    np.testing.assert_array_equal(rep.tokens, np.repeat(single.tokens, 2, axis=0))
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_new_tokens=10, ignore_eos=True)
    a, b = sampler.generate(prompts, p), sampler.generate(prompts, p)
    c = sampler.generate(
        prompts, SamplingParams(temperature=0.8, top_p=0.9, seed=12, max_new_tokens=10, ignore_eos=True)
    )
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # Seeds are taken modulo 2**32 (the key is 32-bit): derived seeds such as a server's
    # ``seed + chunk`` past 2**32 - 1 draw like their wrapped value instead of overflowing.
    wrapped = sampler.generate(prompts, dataclasses.replace(p, seed=11 + 2**32))
    np.testing.assert_array_equal(wrapped.tokens, a.tokens)
    assert SamplingParams(seed=-1).seed == 2**32 - 1
    with pytest.raises(TypeError, match="must be an integer"):
        SamplingParams(seed=1.5)


def test_streams_make_a_sample_independent_of_its_batch(pair):
    """With ``streams``, prompt k of a call draws from (its seed, its index): the same tokens
    whether it runs alone or batched with other prompts of other seeds, while the default
    streams are (the call's seed, the prompt's position) as before."""
    _, _, sampler = pair
    _, _, prompts = _prompts()
    p = SamplingParams(temperature=1.0, n=2, seed=11, max_new_tokens=10, ignore_eos=True)
    default = sampler.generate(prompts, p)
    explicit = sampler.generate(prompts, dataclasses.replace(p, seed=99), streams=[(11, k) for k in range(3)])
    np.testing.assert_array_equal(explicit.tokens, default.tokens)
    mixed = sampler.generate(prompts, p, streams=[(3, 7), (11, 1), (5, 0)])
    alone = [sampler.generate([prompts[k]], p, streams=[stream]) for k, stream in enumerate([(3, 7), (11, 1), (5, 0)])]
    np.testing.assert_array_equal(mixed.tokens, np.concatenate([a.tokens for a in alone]))
    np.testing.assert_array_equal(mixed.tokens[2:4], default.tokens[2:4])  # (11, 1) is prompt 1's default
    assert not np.array_equal(mixed.tokens[:2], default.tokens[:2])
    with pytest.raises(ValueError, match="streams has 2 entries for 3 prompts"):
        sampler.generate(prompts, p, streams=[(1, 0), (1, 1)])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, n=3, max_new_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, n=3, seed=4, max_new_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9, n=3, seed=5, max_new_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.7, top_p=0.8, n=3, seed=6, max_new_tokens=12, ignore_eos=True),
    ],
    ids=["greedy", "t1", "top_k_top_p", "top_p"],
)
def test_vocab_work_by_row_equals_batched(pair, monkeypatch, params):
    """From CPU_BY_ROW_MIN_ROWS rows on, one CPU device samples each row on its own: the same
    tokens and log-probs as the batched ops (forced here), and a prompt's rows equal its rows
    sampled alone (3 rows, batched)."""
    import grouprank_jax.sampling.sampler as sampler_module
    from grouprank_jax.sampling.decode import CPU_BY_ROW_MIN_ROWS, vocab_by_row

    _, model, _ = pair
    rng = np.random.default_rng(8)
    prompts = [rng.integers(3, 500, size=int(n)).tolist() for n in rng.integers(3, 30, size=12)]
    assert len(prompts) * params.n >= CPU_BY_ROW_MIN_ROWS
    chosen = []

    def spy(mesh, rows):  # the real choice, recorded
        chosen.append(vocab_by_row(mesh, rows))
        return chosen[-1]

    monkeypatch.setattr(sampler_module, "vocab_by_row", spy)
    by_row = Sampler(model, max_prompt_len=64, max_new_tokens=12).generate(prompts, params)
    alone = Sampler(model, max_prompt_len=64, max_new_tokens=12).generate(prompts[:1], params)
    assert chosen == [True, False]  # 16 x 3 rows (12 prompts, bucketed) by row; the 3 alone batched
    monkeypatch.setattr(sampler_module, "vocab_by_row", lambda mesh, rows: False)
    batched = Sampler(model, max_prompt_len=64, max_new_tokens=12).generate(prompts, params)
    np.testing.assert_array_equal(by_row.tokens, batched.tokens)
    np.testing.assert_allclose(by_row.logprobs, batched.logprobs, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(by_row.tokens[: params.n], alone.tokens)
    np.testing.assert_allclose(by_row.logprobs[: params.n], alone.logprobs, rtol=0, atol=1e-6)


def test_vocab_by_row_only_for_many_rows_on_one_cpu_device():
    import jax

    from grouprank_jax.config import MeshConfig
    from grouprank_jax.parallel.mesh import make_mesh
    from grouprank_jax.preflight.topology import parse_topology, topology_devices
    from grouprank_jax.sampling.decode import CPU_BY_ROW_MIN_ROWS, vocab_by_row

    one_cpu = make_mesh(MeshConfig(fsdp=-1), jax.devices()[:1])
    assert vocab_by_row(None, CPU_BY_ROW_MIN_ROWS) and vocab_by_row(one_cpu, 64)
    assert not vocab_by_row(None, CPU_BY_ROW_MIN_ROWS - 1)
    assert not vocab_by_row(make_mesh(MeshConfig(fsdp=-1)), 64)  # 8 CPU devices: rows are sharded
    assert not vocab_by_row(make_mesh(MeshConfig(fsdp=-1), topology_devices(parse_topology("v5p-8"))), 64)


def test_mesh_matches_single_device(pair):
    import jax

    from grouprank_jax.config import MeshConfig
    from grouprank_jax.models import shard_model
    from grouprank_jax.parallel.mesh import make_mesh

    assert jax.device_count() >= 8  # conftest provides 8 fake CPU devices
    _, model, sampler = pair
    _, _, prompts = _prompts()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = Sampler(shard_model(model, mesh), mesh=mesh, max_prompt_len=64, max_new_tokens=MAX_NEW)
    # Greedy, and sampled: every row must draw from its own stream wherever its shard lives.
    for params in (
        SamplingParams(temperature=0.0, n=2, max_new_tokens=10, ignore_eos=True),  # shape of the test above
        SamplingParams(temperature=0.9, top_p=0.9, n=2, seed=5, max_new_tokens=10, ignore_eos=True),
    ):
        want = sampler.generate(prompts, params)
        got = sharded.generate(prompts, params)
        assert got.stats.batch_bucket == 4  # a multiple of data x fsdp
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


@pytest.mark.parametrize("on_mesh", [False, True])
def test_shared_prefix_equals_per_row_cache(pair, on_mesh):
    """The shared-prefix layout (one prompt KV for n rollouts) against the per-row copies: identical
    tokens and lengths, log-probs within 1e-5, greedy and sampled, n = 3 and n = 1, prompts of
    different lengths (left padding), on one device and on a data x fsdp x tensor mesh."""
    from grouprank_jax.config import MeshConfig
    from grouprank_jax.models import shard_model
    from grouprank_jax.parallel.mesh import make_mesh

    _, model, _ = pair
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)) if on_mesh else None
    if mesh is not None:
        model = shard_model(model, mesh)
    shared, per_row = (
        Sampler(model, mesh=mesh, max_prompt_len=64, max_new_tokens=MAX_NEW, shared_prefix=flag)
        for flag in (True, False)
    )
    _, _, prompts = _prompts()
    for params in (
        SamplingParams(temperature=0.0, n=3, max_new_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, n=3, seed=5, max_new_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, n=1, seed=6, max_new_tokens=12),
    ):
        got, want = shared.generate(prompts, params), per_row.generate(prompts, params)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_stop_ids_max_new_tokens_and_finished_rows(pair):
    _, _, sampler = pair
    _, _, prompts = _prompts()
    base = sampler.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    stop_id = int(base.tokens[1, 3])
    first_hits = [int(np.argmax(r == stop_id)) + 1 if (r == stop_id).any() else 10 for r in base.tokens]
    out = sampler.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=[stop_id]))
    np.testing.assert_array_equal(out.lengths, first_hits)
    for row, length in enumerate(out.lengths):
        np.testing.assert_array_equal(out.tokens[row, :length], base.tokens[row, :length])
        assert (out.tokens[row, length:] == sampler.pad_id).all()
        assert (out.logprobs[row, length:] == 0).all() and (out.logprobs[row, :length] < 0).all()
        assert out.finish_reasons[row] == ("stop" if length < 10 or out.tokens[row, 9] == stop_id else "length")
    np.testing.assert_array_equal(out.mask, np.arange(10)[None] < out.lengths[:, None])
    # Every row stops (all rows at max_new_tokens): the loop ran exactly max_new steps, no more.
    assert base.stats.decode_steps == 10 and out.stats.decode_steps == max(first_hits)


def test_stop_strings_with_tokenizer(pair):
    from grouprank_jax.sampling.stops import apply_stop_strings
    from grouprank_jax.tokenizer import load_tokenizer

    _, model, _ = pair
    tok = load_tokenizer()
    sampler = Sampler(model, tokenizer=tok, max_prompt_len=64, max_new_tokens=12)
    prompt = _prompts()[2][:1]
    base = sampler.generate(prompt, SamplingParams(temperature=0.0, ignore_eos=True))
    assert base.texts[0] == tok.decode(base.tokens[0].tolist(), skip_special_tokens=True)
    # A stop string whose canonical tokenization is what the model emitted: device early exit.
    j = next(
        j
        for j in range(1, 10)
        if tok.encode(tok.decode(base.tokens[0, j : j + 2].tolist()), add_special_tokens=False)
        == base.tokens[0, j : j + 2].tolist()
    )
    stop = tok.decode(base.tokens[0, j : j + 2].tolist())
    out = sampler.generate(prompt, SamplingParams(temperature=0.0, stop=[stop]))
    end = base.texts[0].find(stop) + len(stop)
    assert out.texts[0] == base.texts[0][:end] and out.finish_reasons == ("stop",)
    assert out.lengths[0] <= j + 2 and out.stats.decode_steps == out.lengths[0]
    assert (out.tokens[0, out.lengths[0] :] == sampler.pad_id).all() and (out.logprobs[0, out.lengths[0] :] == 0).all()

    # Host path: "</answer>" spelled one character per token (not its canonical tokenization).
    pieces = [tok.encode(ch, add_special_tokens=False)[0] for ch in "ok</answer>tail"]
    tokens = np.asarray([pieces + [0]], np.int32)
    logprobs = -np.ones(tokens.shape, np.float32)
    lengths, stopped = np.asarray([len(pieces)], np.int32), np.zeros(1, bool)
    texts = apply_stop_strings(tok, tokens, logprobs, lengths, stopped, ["</answer>"], pad_id=-7)
    assert texts == ["ok</answer>"] and lengths[0] == len("ok</answer>") and stopped[0]
    assert (tokens[0, lengths[0] :] == -7).all() and (logprobs[0, lengths[0] :] == 0).all()


def test_string_prompts_and_actionable_errors(pair):
    _, model, sampler = pair
    with pytest.raises(ValueError, match="no tokenizer"):
        sampler.generate(["hello"])
    with pytest.raises(ValueError, match="max_prompt_len"):
        sampler.generate([[3] * 65])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        sampler.generate([[3, 4]], SamplingParams(stop=["</answer>"]))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
