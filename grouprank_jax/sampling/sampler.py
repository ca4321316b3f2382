"""Batched autoregressive sampling: one jitted prefill, then a jitted ``lax.while_loop`` decode.

Flow of ``Sampler.generate``:
1. prompts are left-padded into a ``[B, T]`` shape bucket (T: a power of two >= 64, capped at
   ``max_prompt_len``; B: a power of two that the mesh's batch axes divide; dummy rows fill it;
   ``batch.py``);
2. prefill (jit): one forward over the prompts writes their KV (per layer ``[B, K, T, H]``) and
   returns only the last position's logits, repeated ``n`` times (one prefill serves all n
   rollouts of a prompt);
3. decode (jit): step 0 samples from the prefill logits, then a ``while_loop`` feeds the last
   token, samples, records token / log-prob (``decode.record_step``), and exits once every row
   is done;
4. on the host: dummy rows are dropped, stop strings are applied by truncation, text is decoded.

Multi-process (one process per host): every process calls ``generate`` with its own prompts
(the same number on each); bucket shapes are agreed across processes, the global batch is the
concatenation of the processes' rows in process order (``make_array_from_process_local_data``),
and each process gets back the rollouts of its own prompts. A rollout's random key depends on
its global row (prompt index over all processes, sample index) and the step, not on the mesh or
the process count, so 2 processes x 4 devices sample what 1 process x 8 devices samples.

Two KV layouts for the n rollouts of a prompt (``shared_prefix``):
- shared (default): the prompt KV is kept once per prompt (``PrefixKV``) and each of the B*n rows
  writes only its own ``[max_new]``-slot suffix cache, built inside the decode program; a decode
  step reads each prompt's KV once for its n rollouts (``attention.shared_prefix_decode_attention``).
  Decode memory: one prompt copy + n suffixes; KV traffic per step: B*T + B*n*step slots.
- per row (``shared_prefix=False``, the oracle): the prefill cache has T + max_new slots and is
  repeated n times, so each row holds and reads its own copy of the prompt (donated to decode).
Both give the same tokens (greedy: identical; sampled: identical streams, log-probs to float
rounding; tested).

Model parameters are passed to the jitted functions as an argument (``nnx.state(model)`` at each
call), never closed over, so an optimizer step on the same model is picked up without recompiling.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from grouprank_jax.models.kv_cache import CACHE_AXES, VALID_AXES, KVCache, PrefixKV
from grouprank_jax.parallel.distributed import agree_max, gather_rows, local_rows
from grouprank_jax.parallel.mesh import named_sharding, shard, use_mesh
from grouprank_jax.sampling.batch import batch_bucket, left_pad, prompt_buckets, row_streams
from grouprank_jax.sampling.decode import RowRecord, record_step, vocab_by_row
from grouprank_jax.sampling.output import SamplerOutput, SamplerStats
from grouprank_jax.sampling.params import SamplingParams
from grouprank_jax.sampling.stops import apply_stop_strings, stop_token_sequences
from grouprank_jax.tokenizer import stop_token_ids

log = logging.getLogger(__name__)

DEFAULT_STOP_IDS = stop_token_ids()  # <|im_end|>, <|endoftext|>


class Sampler:
    def __init__(
        self,
        model,
        tokenizer=None,
        mesh: Mesh | None = None,
        max_prompt_len: int = 2048,
        max_new_tokens: int = 512,
        prompt_length_buckets: Sequence[int] | None = None,
        stop_token_ids: Sequence[int] = DEFAULT_STOP_IDS,
        pad_token_id: int | None = None,
        compiler_options: dict | None = None,
        shared_prefix: bool = True,
    ):
        self.model = model  # shared with the trainer: its parameter arrays are read at each call
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.max_prompt_len = int(max_prompt_len)
        self.max_new_tokens = int(max_new_tokens)
        self.buckets = tuple(sorted(prompt_length_buckets or prompt_buckets(self.max_prompt_len)))
        if self.buckets[-1] < self.max_prompt_len:
            raise ValueError(f"prompt_length_buckets {self.buckets} must reach max_prompt_len={self.max_prompt_len}")
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.shared_prefix = bool(shared_prefix)  # one prompt KV for its n rollouts (module docstring)
        self.pad_id = int(self.cfg.pad_token_id if pad_token_id is None else pad_token_id)
        self.batch_multiple = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if jax.process_count() > 1:
            if self.mesh is None:
                raise ValueError("a multi-process Sampler needs the global mesh (mesh=...)")
            if self.batch_multiple % jax.process_count():
                raise ValueError(
                    f"the mesh's batch axes (data x fsdp = {self.batch_multiple}) must be a multiple of "
                    f"the {jax.process_count()} processes, so that each process holds its own rows"
                )
        self._graphdef = nnx.graphdef(model)
        self._seen_shapes: set[tuple] = set()
        options = dict(compiler_options or {}) or None  # XLA options of the run (RunConfig.xla_options)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("n", "max_new"), compiler_options=options)
        self._decode = jax.jit(
            self._decode_fn,
            static_argnames=("greedy", "top_k", "use_top_p", "max_new"),
            donate_argnames=("cache",),
            compiler_options=options,
        )

    # ---- jitted pure functions of (params, ...) ------------------------------------------
    def _prefill_fn(self, state, ids, mask, *, n: int, max_new: int):
        """ids, mask [B, T] -> (last logits [B*n, V] fp32, the prompts' KV): a ``PrefixKV`` of B
        prompts x T slots (shared layout) or a ``KVCache`` of B*n rows x T + max_new slots (per row)."""
        with use_mesh(self.mesh):
            model = nnx.merge(self._graphdef, state)
            b, t = ids.shape
            slots = t if self.shared_prefix else t + max_new
            cache = self._shard_cache(self._empty_cache(b, slots))
            hidden, cache = model(ids, attention_mask=mask, cache=cache, return_hidden=True)  # [B, T, D]
            # Left padding puts every prompt's last token at T-1; the LM head runs on that slice only.
            logits = model.logits_from_hidden(hidden[:, -1])  # [B, V]
            logits = shard(jnp.repeat(logits, n, axis=0), ("batch", "act_vocab"))  # [B*n, V]
            if self.shared_prefix:
                return logits, PrefixKV.from_cache(self._shard_cache(cache))
            return logits, self._shard_cache(cache.repeat(n))

    def _empty_cache(self, rows: int, slots: int) -> KVCache:
        cfg = self.cfg
        return KVCache.init(cfg.num_layers, rows, slots, cfg.num_kv_heads, cfg.head_dim, dtype=jnp.dtype(cfg.dtype))

    def _shard_cache(self, cache: KVCache) -> KVCache:
        return KVCache(
            k=tuple(shard(x, CACHE_AXES) for x in cache.k),
            v=tuple(shard(x, CACHE_AXES) for x in cache.v),
            valid=shard(cache.valid, VALID_AXES),
            index=cache.index,
        )

    def _decode_fn(
        self,
        state,
        cache,
        prefix,
        logits0,
        prompt_lens,
        live,
        row_ids,
        row_seeds,
        temperature,
        top_p,
        logprob_temperature,
        stop_ids,
        stop_seqs,
        *,
        greedy: bool,
        top_k: int,
        use_top_p: bool,
        max_new: int,
    ):
        """Sample ``max_new`` tokens at most for all rows; rows with ``live`` False start done.
        ``row_ids``, ``row_seeds`` [rows] (``batch.row_streams``) pick each row's random stream. Either ``cache``
        (per-row layout, donated) or ``prefix`` (shared layout; the rows' suffix cache is made
        here) is given."""
        with use_mesh(self.mesh):
            model = nnx.merge(self._graphdef, state)
            rows = logits0.shape[0]
            if prefix is not None:
                cache = self._shard_cache(self._empty_cache(rows, max_new))
            record = functools.partial(
                record_step,
                row_seeds=row_seeds,
                row_ids=row_ids,
                temperature=temperature,
                top_p=top_p,
                logprob_temperature=logprob_temperature,
                stop_ids=stop_ids,
                stop_seqs=stop_seqs,
                pad_id=self.pad_id,
                max_new=max_new,
                greedy=greedy,
                top_k=top_k,
                use_top_p=use_top_p,
                by_row=vocab_by_row(self.mesh, rows),
            )
            last, rec = record(0, logits0, RowRecord.start(live, max_new, stop_seqs.shape[1], self.pad_id))

            def cond(loop):
                step, _, _, rec = loop
                return (step < max_new) & ~jnp.all(rec.done)

            def body(loop):
                step, cache, last, rec = loop
                # The token sampled at step-1 sits at position prompt_len + step - 1 (cache slot
                # T + step - 1 per row, or suffix slot step - 1 beside the shared prefix).
                positions = (prompt_lens + step - 1)[:, None]  # [rows, 1]
                logits, cache = model(last[:, None], positions=positions, cache=cache, prefix=prefix)  # [rows, 1, V]
                last, rec = record(step, logits[:, 0], rec)
                return step + 1, cache, last, rec

            steps, cache, _, rec = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, last, rec))
            tokens, logprobs, lengths, stopped = rec.tokens, rec.logprobs, rec.lengths, rec.stopped
            # Rows stay on the batch axes so each process can read back its own rows.
            tokens, logprobs = shard(tokens, ("batch", None)), shard(logprobs, ("batch", None))
            lengths, stopped = shard(lengths, ("batch",)), shard(stopped, ("batch",))
            # The per-row cache goes back out so its donated buffers alias; a suffix cache is dropped.
            return tokens, logprobs, lengths, stopped, steps, (None if prefix is not None else cache)

    # ---- host side ------------------------------------------------------------------------
    def _encode(self, prompts) -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(
                        f"prompt {i} is a string but the Sampler has no tokenizer; pass token-id lists or tokenizer="
                    )
                p = self.tokenizer.encode(p, add_special_tokens=False)
            ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            if len(ids) > self.max_prompt_len:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens > max_prompt_len={self.max_prompt_len}; "
                    "truncate it or build the Sampler with a larger max_prompt_len"
                )
            if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.cfg.vocab_size})")
            out.append(ids)
        return out

    def _put(self, x: np.ndarray, names):
        """Host rows -> a global array (this process's rows, in process order, when multi-process)."""
        if self.mesh is None:
            return jnp.asarray(x)
        if jax.process_count() > 1:
            global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
            return jax.make_array_from_process_local_data(
                named_sharding(self.mesh, names, global_shape), x, global_shape
            )
        return jax.device_put(x, named_sharding(self.mesh, names, x.shape))

    def bucket_shape(self, num_prompts: int, longest: int) -> tuple[int, int]:
        """(batch B, prompt length T) a call with ``num_prompts`` prompts (per process) of at most
        ``longest`` tokens compiles for: T the smallest bucket that holds them, B the next power
        of two that the mesh's batch axes divide."""
        if longest > self.buckets[-1]:
            raise ValueError(f"a prompt of {longest} tokens exceeds max_prompt_len={self.max_prompt_len}")
        t = next(b for b in self.buckets if b >= longest)
        local_multiple = max(1, self.batch_multiple // jax.process_count())  # rows per batch-shard group here
        return batch_bucket(num_prompts, local_multiple), t

    def _static_settings(self, params: SamplingParams):
        """(stop ids, stop sequences [S, W], top_k, use_top_p) of a call: what its program depends on."""
        stop_ids = (
            ()
            if params.ignore_eos
            else (params.stop_token_ids if params.stop_token_ids is not None else self.stop_token_ids)
        )
        if params.stop and self.tokenizer is None:
            raise ValueError(
                f"stop={params.stop!r} needs a tokenizer; pass Sampler(tokenizer=...) or use stop_token_ids"
            )
        stop_seqs = stop_token_sequences(self.tokenizer, () if params.ignore_eos else params.stop)
        return stop_ids, stop_seqs, (0 if params.greedy else params.top_k), params.top_p < 1.0

    def lower(self, num_prompts: int, prompt_len: int, params: SamplingParams = SamplingParams()):
        """``(prefill, decode)`` as ``jax.stages.Lowered`` for a ``generate`` call with ``num_prompts``
        prompts of ``prompt_len`` tokens: the same jitted functions at the same shapes and
        shardings, with nothing executed. The model may be abstract (``jax.ShapeDtypeStruct``
        leaves), so this is how ``grouprank compile`` targets a TPU slice from any host."""
        n, max_new = params.n, params.max_new_tokens or self.max_new_tokens
        b, t = self.bucket_shape(num_prompts, prompt_len)
        stop_ids, stop_seqs, top_k, use_top_p = self._static_settings(params)

        def spec(shape, dtype, names=None):
            sharding = None if self.mesh is None else named_sharding(self.mesh, names, shape)
            return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)

        state = nnx.state(self.model)
        prefill = self._prefill.lower(
            state,
            spec((b, t), jnp.int32, ("batch", "length")),
            spec((b, t), jnp.int32, ("batch", "length")),
            n=n,
            max_new=max_new,
        )
        logits0, kv = jax.eval_shape(
            functools.partial(self._prefill_fn, n=n, max_new=max_new),
            state,
            spec((b, t), jnp.int32),
            spec((b, t), jnp.int32),
        )
        rows = b * n
        k = tuple(spec(x.shape, x.dtype, CACHE_AXES) for x in kv.k)
        v = tuple(spec(x.shape, x.dtype, CACHE_AXES) for x in kv.v)
        valid = spec(kv.valid.shape, bool, VALID_AXES)
        if self.shared_prefix:
            cache_spec, prefix_spec = None, PrefixKV(k=k, v=v, valid=valid)
        else:
            cache_spec, prefix_spec = KVCache(k=k, v=v, valid=valid, index=spec((), jnp.int32, ())), None
        decode = self._decode.lower(
            state,
            cache_spec,
            prefix_spec,
            spec(logits0.shape, jnp.float32, ("batch", "act_vocab")),
            spec((rows,), jnp.int32, ("batch",)),
            spec((rows,), bool, ("batch",)),
            spec((rows,), jnp.int32, ("batch",)),
            spec((rows,), jnp.uint32, ("batch",)),
            spec((), jnp.float32, ()),
            spec((), jnp.float32, ()),
            spec((), jnp.float32, ()),
            spec((len(stop_ids),), jnp.int32, (None,)),
            spec(stop_seqs.shape, jnp.int32, (None, None)),
            greedy=params.greedy,
            top_k=top_k,
            use_top_p=use_top_p,
            max_new=max_new,
        )
        return prefill, decode

    def generate(
        self, prompts, params: SamplingParams = SamplingParams(), *, streams: Sequence[tuple[int, int]] | None = None
    ) -> SamplerOutput:
        """``streams``: optional ``(seed, index)`` per prompt, its random stream in place of
        (``params.seed``, the prompt's global number); see ``batch.row_streams``."""
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        encoded = self._encode(prompts)
        n, max_new = params.n, params.max_new_tokens or self.max_new_tokens
        num = len(encoded)
        processes, pid = jax.process_count(), jax.process_index()
        if processes > 1:
            counts = gather_rows(np.asarray([num], np.int32))
            if len(set(counts.tolist())) != 1:
                raise ValueError(f"every process must pass the same number of prompts; got {counts.tolist()}")
        longest = agree_max(max(len(p) for p in encoded))  # one prompt bucket on every process
        b, t = self.bucket_shape(num, longest)

        ids, mask, lens = left_pad(encoded, b, t)  # [B, T], [B, T], [B]
        live = np.repeat(np.arange(b) < num, n)  # [B*n]
        row_seeds, row_ids = row_streams(params.seed, num, b, n, pid, processes, streams)  # [B*n] each

        stop_ids, stop_seqs, top_k, use_top_p = self._static_settings(params)
        shape_key = (b, t, n, max_new, params.greedy, top_k, use_top_p, len(stop_ids), stop_seqs.shape)
        compiled = shape_key not in self._seen_shapes
        if compiled:
            self._seen_shapes.add(shape_key)
            log.info(
                "sampler: compiling batch=%d prompt_len=%d n=%d max_new=%d (greedy=%s top_k=%d top_p=%s stops=%s)",
                b,
                t,
                n,
                max_new,
                params.greedy,
                top_k,
                use_top_p,
                stop_seqs.shape,
            )

        state = nnx.state(self.model)
        t0 = time.perf_counter()
        logits0, kv = self._prefill(
            state, self._put(ids, ("batch", "length")), self._put(mask, ("batch", "length")), n=n, max_new=max_new
        )
        jax.block_until_ready(logits0)
        t1 = time.perf_counter()
        cache, prefix = (None, kv) if self.shared_prefix else (kv, None)
        tokens, logprobs, lengths, stopped, steps, _ = self._decode(
            state,
            cache,
            prefix,
            logits0,
            self._put(np.repeat(lens, n), ("batch",)),
            self._put(live, ("batch",)),
            self._put(row_ids, ("batch",)),
            self._put(row_seeds, ("batch",)),
            jnp.float32(max(params.temperature, 1e-6)),
            jnp.float32(params.top_p),
            jnp.float32(params.logprob_temperature),
            jnp.asarray(stop_ids, jnp.int32),
            jnp.asarray(stop_seqs),
            greedy=params.greedy,
            top_k=top_k,
            use_top_p=use_top_p,
            max_new=max_new,
        )
        tokens, logprobs, lengths, stopped = (local_rows(x) for x in (tokens, logprobs, lengths, stopped))
        steps = int(np.asarray(steps.addressable_data(0)))
        t2 = time.perf_counter()

        keep = num * n  # prompt-major rows of the real prompts come first; dummies are dropped
        tokens, logprobs = np.array(tokens[:keep]), np.array(logprobs[:keep])
        lengths, stopped = np.array(lengths[:keep]), np.array(stopped[:keep])
        texts = None
        if self.tokenizer is not None:
            texts = apply_stop_strings(
                self.tokenizer,
                tokens,
                logprobs,
                lengths,
                stopped,
                () if params.ignore_eos else params.stop,
                self.pad_id,
            )
        stats = SamplerStats(
            prefill_seconds=t1 - t0,
            decode_seconds=t2 - t1,
            prompt_tokens=int(sum(len(p) for p in encoded)),
            generated_tokens=int(lengths.sum()),
            decode_steps=int(steps),
            batch_bucket=b,
            prompt_bucket=t,
            compiled=compiled,
        )
        return SamplerOutput(
            tokens=tokens,
            lengths=lengths,
            logprobs=logprobs,
            prompt_lengths=np.repeat(np.asarray([len(p) for p in encoded], np.int32), n),
            finish_reasons=tuple("stop" if s else "length" for s in stopped),
            texts=None if texts is None else tuple(texts),
            stats=stats,
        )
