"""Sampler throughput: prefill and decode tokens/s for a model shape with random weights.

    grouprank bench sampling --preset tiny --batch 1,8,32 --compare hf --out bench.json

Greedy by default (``--temperature 0``), or sampled at ``--temperature`` (GRPO's rollouts use
1.0); stops disabled (``ignore_eos``) so every row decodes exactly ``--new-tokens``.
``--compare hf`` exports the same weights with ``save_hf``, loads them into transformers'
``Qwen2ForCausalLM`` and times ``generate(min_new_tokens=max_new_tokens)`` on the same prompts
(``do_sample=True, temperature, top_k=0, top_p`` when sampling: the same distribution;
``--top-p 0.8`` is the paper's inference setting, where HF sorts the vocabulary every step).
The bandwidth column is the bytes a decode step must read (``decode_bytes_per_step``) / step time /
the measured device read bandwidth (``read_bandwidth``): how close decode is to the memory roofline.
Multi-process (``launch/local_multiprocess.sh``, a pod): ``--batch`` counts global prompts, each
process generates its share on a mesh over all devices (``--mesh``, default data-parallel over
every chip); process 0 prints global tokens/s and tokens/s per chip (no HF comparison, and no
bandwidth column, whose roofline is per device).
``run_bench(args)`` is the entry point for ``grouprank bench sampling``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grouprank_jax.config import MeshConfig, model_preset
from grouprank_jax.models import create_model
from grouprank_jax.parallel import make_mesh
from grouprank_jax.parallel.distributed import gather_rows
from grouprank_jax.preflight.memory import kv_cache_bytes
from grouprank_jax.preflight.shapes import ModelShape
from grouprank_jax.sampling import Sampler, SamplingParams
from grouprank_jax.weights import save_hf


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (grouprank_jax.config.MODEL_PRESETS)")
    p.add_argument("--batch", default="1,8,32", help="comma-separated prompt batch sizes")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--hidden", type=int, help="override the preset's width (heads of 64, MLP 4x the width)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--n", type=int, default=1, help="rollouts per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; GRPO samples at 1.0")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling (1.0 = off)")
    p.add_argument("--dtype", default="float32", help="param and compute dtype (float32 | bfloat16)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up (best is kept)")
    p.add_argument("--compare", choices=["hf"], help="also time transformers' generate on the same weights")
    p.add_argument(
        "--mesh",
        default=None,
        help="data,fsdp,tensor over all devices (default: one device, or "
        "data-parallel over every device when several processes run)",
    )
    p.add_argument("--out", help="write the results as JSON here")
    return p


def read_bandwidth(megabytes: int = 512) -> float:
    """Device bytes/s of reading a large array once (a column sum: what decode does to its
    weights and KV), the decode roofline's denominator. A copy underestimates it on XLA:CPU
    (2.6 GB/s there, while decode's LM-head matvec read 4.5 GB/s, giving fractions above 1)."""
    x = jnp.ones((megabytes * 2**20 // 4 // 1024, 1024), jnp.float32)
    read = jax.jit(lambda a: jnp.sum(a, axis=0))
    read(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        read(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def decode_bytes_per_step(
    cfg, weight_bytes: float, prompts: int, n: int, prompt_len: int, new_tokens: int, shared: bool
):
    """Bytes one decode step must read: every weight once, except an untied input-embedding
    table (decode gathers rows of it), plus every K and V slot the attention reads. The shared
    layout (``Sampler(shared_prefix=True)``) reads each prompt's KV once for its n rollouts and
    each row's whole suffix buffer; the per-row layout reads each row's whole prompt + suffix
    cache. ``prompts``: the padded batch bucket."""
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * jnp.dtype(cfg.param_dtype).itemsize
    one_device = ModelShape(cfg, {"data": 1, "fsdp": 1, "tensor": 1}, lora=False)
    if shared:
        kv = kv_cache_bytes(one_device, prompts, prompt_len) + kv_cache_bytes(one_device, prompts * n, new_tokens)
    else:
        kv = kv_cache_bytes(one_device, prompts * n, prompt_len + new_tokens)
    return weight_bytes - embed + kv


def _hf_generate(
    model_dir: Path,
    prompts: np.ndarray,
    new_tokens: int,
    n: int,
    repeats: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> float:
    """Best wall seconds of HF generate (greedy, or sampled at ``temperature`` and ``top_p``)
    over [B, T] unpadded prompts (n copies each)."""
    import torch
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = torch.as_tensor(np.repeat(prompts, n, axis=0), dtype=torch.long)
    sampling = (
        dict(do_sample=True, temperature=temperature, top_k=0, top_p=top_p)
        if temperature > 0
        else dict(do_sample=False)
    )
    kwargs = dict(
        **sampling,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        attention_mask=torch.ones_like(ids),
        pad_token_id=0,
    )
    best = float("inf")
    with torch.no_grad():
        hf.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            out = hf.generate(ids, **kwargs)
            best = min(best, time.perf_counter() - t)
    assert out.shape[1] == ids.shape[1] + new_tokens, "HF stopped early"
    return best


def run_bench(args: argparse.Namespace) -> list[dict]:
    processes, pid = jax.process_count(), jax.process_index()
    mesh_arg = args.mesh or ("-1,1,1" if processes > 1 else None)
    mesh = None if mesh_arg is None else make_mesh(MeshConfig(*(int(x) for x in mesh_arg.split(","))))
    if processes > 1 and args.compare:
        raise ValueError("--compare hf runs in a single process only")
    shape = {}
    if args.layers:
        shape["num_layers"] = args.layers
    if args.hidden:
        heads = max(1, args.hidden // 64)
        shape.update(hidden_size=args.hidden, num_heads=heads, num_kv_heads=heads, head_dim=args.hidden // heads)
        shape["intermediate_size"] = 4 * args.hidden
    cfg = model_preset(args.preset, param_dtype=args.dtype, dtype=args.dtype, **shape)
    model = create_model(cfg, seed=0, mesh=mesh)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    bandwidth = read_bandwidth()
    sampler = Sampler(model, mesh=mesh, max_prompt_len=args.prompt_len, max_new_tokens=args.new_tokens)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, n=args.n, ignore_eos=True)
    hf_dir = None
    if args.compare == "hf":
        hf_dir = Path(tempfile.mkdtemp(prefix="bench_hf_"))
        save_hf(model, hf_dir)

    rng = np.random.default_rng(0)
    rows = []
    for batch in [int(b) for b in str(args.batch).split(",")]:
        if batch % processes:
            raise ValueError(f"--batch {batch} does not split over {processes} processes")
        prompts = rng.integers(3, min(cfg.vocab_size, 151643), size=(batch, args.prompt_len))
        prompts = prompts[pid * batch // processes : (pid + 1) * batch // processes]  # this process's share
        sampler.generate(prompts.tolist(), params)  # compile
        best = None
        for _ in range(args.repeats):
            out = sampler.generate(prompts.tolist(), params)
            if best is None or out.stats.decode_seconds < best.decode_seconds:
                best = out.stats
        rows_decoded = batch * args.n
        # Global figures: tokens summed over processes, the slowest process's time.
        generated = int(gather_rows(np.asarray([best.generated_tokens], np.int32)).sum())
        per_process = gather_rows(np.asarray([[best.prefill_seconds, best.decode_seconds]], np.float32))
        prefill_s, decode_s = (float(x) for x in per_process.max(axis=0))
        step_s = decode_s / max(best.decode_steps - 1, 1)  # step 0 samples from the prefill
        step_bytes = decode_bytes_per_step(
            cfg, weight_bytes, best.batch_bucket, args.n, best.prompt_bucket, args.new_tokens, sampler.shared_prefix
        )
        row = {
            "preset": args.preset,
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "dtype": args.dtype,
            "batch": batch,
            "n": args.n,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "backend": jax.default_backend(),
            "processes": processes,
            "devices": 1 if mesh is None else mesh.size,
            "prefill_tok_s": batch * args.prompt_len / prefill_s,
            "decode_tok_s": generated / decode_s,
            "e2e_tok_s": generated / (prefill_s + decode_s),
            "decode_step_ms": 1e3 * step_s,
        }
        row["e2e_tok_s_per_device"] = row["e2e_tok_s"] / row["devices"]
        if mesh is None:
            row["bandwidth_fraction"] = step_bytes / step_s / bandwidth
        assert generated == rows_decoded * args.new_tokens, (generated, rows_decoded * args.new_tokens)
        if hf_dir is not None:
            hf_s = _hf_generate(hf_dir, prompts, args.new_tokens, args.n, args.repeats, args.temperature, args.top_p)
            row["hf_e2e_tok_s"] = rows_decoded * args.new_tokens / hf_s
            row["ratio_vs_hf"] = row["e2e_tok_s"] / row["hf_e2e_tok_s"]
        rows.append(row)
    if pid == 0:
        _print_table(rows, bandwidth)
    if args.out and pid == 0:
        Path(args.out).write_text(json.dumps({"read_bandwidth_gb_s": bandwidth / 1e9, "results": rows}, indent=2))
    return rows


def _print_table(rows: list[dict], bandwidth: float) -> None:
    cols = [
        "batch",
        "n",
        "processes",
        "devices",
        "prefill_tok_s",
        "decode_tok_s",
        "e2e_tok_s",
        "e2e_tok_s_per_device",
        "decode_step_ms",
        "bandwidth_fraction",
        "hf_e2e_tok_s",
        "ratio_vs_hf",
    ]
    cols = [c for c in cols if any(c in r for r in rows)]
    print(
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s ({rows[0]['backend']}, {rows[0]['preset']}, {rows[0]['dtype']}, "
        f"prompt {rows[0]['prompt_len']}, new {rows[0]['new_tokens']}, "
        f"temperature {rows[0]['temperature']}, top_p {rows[0]['top_p']})"
    )
    print(" | ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>18.3f}" if isinstance(r.get(c), float) else f"{r.get(c, ''):>18}" for c in cols))


def main(argv: list[str] | None = None) -> int:
    run_bench(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
