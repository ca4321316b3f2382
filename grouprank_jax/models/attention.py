"""Grouped-query attention kernels, selected by ``ModelConfig.attention_impl``.

All implementations take the same arguments and never repeat KV heads in memory: queries
are viewed as ``[B, T, K, G, H]`` (K kv heads, G query heads per kv head).

Masking is expressed with slot indices rather than a materialised ``[T, S]`` mask so the
chunked kernel can build each block's mask on the fly:
  key j is visible to query i  iff  kv_slot[j] <= q_slot[i]  (causal)
                               and  kv_valid[b, j]          (padding / unwritten cache)
                               and  q_seg[b, i] == kv_seg[b, j]  (packing)
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from grouprank_jax.parallel.mesh import current_mesh, logical_to_spec

log = logging.getLogger(__name__)

# A large finite negative: fully-masked rows (left padding) stay finite instead of NaN,
# and an online softmax that first sees only masked keys recovers once a real key arrives.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _visible(q_slot, kv_slot, kv_valid, q_seg, kv_seg):
    """Boolean mask ``[B, 1, 1, T, S]`` (broadcast over kv heads and group)."""
    # q_slot [B, T], kv_slot [S], kv_valid [B, S], q_seg [B, T] | None, kv_seg [B, S] | None
    mask = kv_slot[None, None, :] <= q_slot[:, :, None]
    mask = mask & kv_valid[:, None, :]
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
    return mask[:, None, None, :, :]


def reference_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg=None, kv_seg=None):
    """Plain einsum attention with an fp32 softmax: the parity oracle.

    q [B, T, N, H]; k, v [B, S, K, H]; returns [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5)
    mask = _visible(q_slot, kv_slot, kv_valid, q_seg, kv_seg)
    scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def chunked_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg=None, kv_seg=None, block_size=512):
    """Blockwise attention over key/value blocks with an online softmax (pure JAX).

    Peak memory grows with ``T * block_size`` instead of ``T * S``; works on every backend.
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    block = min(block_size, s)
    num_blocks = -(-s // block)
    pad = num_blocks * block - s
    if pad:
        # Padded keys are invalid, so they never receive weight.
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        kv_valid = jnp.pad(kv_valid, ((0, 0), (0, pad)))
        kv_slot = jnp.pad(kv_slot, (0, pad), constant_values=jnp.iinfo(jnp.int32).max)
        if kv_seg is not None:
            kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad)))
    qg = (q.reshape(b, t, kv_heads, g, h).astype(jnp.float32) * (h**-0.5)).astype(q.dtype)

    # Blocks become the leading (scanned) axis.
    k_blocks = k.reshape(b, num_blocks, block, kv_heads, h).swapaxes(0, 1)
    v_blocks = v.reshape(b, num_blocks, block, kv_heads, h).swapaxes(0, 1)
    valid_blocks = kv_valid.reshape(b, num_blocks, block).swapaxes(0, 1)
    slot_blocks = kv_slot.reshape(num_blocks, block)
    seg_blocks = None if kv_seg is None else kv_seg.reshape(b, num_blocks, block).swapaxes(0, 1)

    def step(carry, xs):
        acc, row_max, row_sum = carry  # [B,K,G,T,H], [B,K,G,T], [B,K,G,T]
        kb, vb, valid_b, slot_b, seg_b = xs
        scores = jnp.einsum("btkgh,bskh->bkgts", qg, kb, preferred_element_type=jnp.float32)
        mask = _visible(q_slot, slot_b, valid_b, q_seg, seg_b)
        scores = jnp.where(mask, scores, MASK_VALUE)
        new_max = jnp.maximum(row_max, scores.max(axis=-1))
        correction = jnp.exp(row_max - new_max)
        probs = jnp.exp(scores - new_max[..., None])
        row_sum = row_sum * correction + probs.sum(axis=-1)
        pv = jnp.einsum("bkgts,bskh->bkgth", probs.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        acc = acc * correction[..., None] + pv
        return (acc, new_max, row_sum), None

    init = (
        jnp.zeros((b, kv_heads, g, t, h), jnp.float32),
        jnp.full((b, kv_heads, g, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, kv_heads, g, t), jnp.float32),
    )
    xs = (k_blocks, v_blocks, valid_blocks, slot_blocks, seg_blocks)
    if seg_blocks is None:
        xs = (k_blocks, v_blocks, valid_blocks, slot_blocks, jnp.zeros((num_blocks,), jnp.int32))

        def step_noseg(carry, x):
            kb, vb, valid_b, slot_b, _ = x
            return step(carry, (kb, vb, valid_b, slot_b, None))

        (acc, _, row_sum), _ = jax.lax.scan(step_noseg, init, xs)
    else:
        (acc, _, row_sum), _ = jax.lax.scan(step, init, xs)
    out = acc / row_sum[..., None]  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def _partial_softmax(scores, mask):
    """Softmax over one part of the keys, with that part's log-sum-exp for merging.

    scores [..., S] fp32 (already scaled), mask [..., S] (broadcastable). Returns (probs
    [..., S] normalised within the part, lse [...]).
    Masked keys carry ``MASK_VALUE`` (finite), so a part with no visible key gets an lse near
    ``MASK_VALUE`` and weight exp(lse - m) = 0 in the merge (the empty-part guard).
    """
    scores = jnp.where(mask, scores, MASK_VALUE)
    part_max = scores.max(axis=-1, keepdims=True)
    probs = jnp.exp(scores - part_max)
    total = probs.sum(axis=-1, keepdims=True)
    return probs / total, (part_max + jnp.log(total))[..., 0]


def shared_prefix_decode_attention(
    q, prefix_k, prefix_v, prefix_valid, suffix_k, suffix_v, suffix_valid, keys_left: bool | None = None
):
    """One decode step of G rollouts per prompt over a shared prompt KV plus their own suffixes.

    q [R, 1, N, H] with R = B * G rows, prompt-major (row b*G + j is rollout j of prompt b);
    prefix_k/v [B, K, P, H], prefix_valid [B, P]; suffix_k/v [R, K, S, H], suffix_valid [R, S]
    (a suffix slot is valid once written, so it carries causality too): the caches' heads-first
    layout, which each einsum reads in place. Returns [R, 1, N, H].

    The prefix part folds the G rollouts into the query-group axis (as GQA folds query heads),
    so each prompt's KV is read once per step for all of its rollouts instead of once per row;
    the two parts are merged by their log-sum-exp: out = (a*o1 + b*o2) / (a + b) with
    a = exp(lse1 - m), b = exp(lse2 - m), m = max(lse1, lse2). Equal to softmax attention over
    the concatenation [prefix, suffix] of each row (tested against ``reference_attention``).

    ``keys_left``: compute the prefix scores as ``keys @ queries`` (the default on CPU, see
    below) rather than ``queries @ keys``; the same scores either way.
    """
    r, t, n, h = q.shape
    b, kv_heads = prefix_k.shape[0], prefix_k.shape[1]
    g, gq = r // b, n // kv_heads
    if r != b * g or t != 1:
        raise ValueError(f"shared-prefix decode needs [B*G, 1, N, H] queries for {b} prompts; got {q.shape}")
    scale = h**-0.5
    # Prefix part: [B, K, G, Gq, P] scores, one read of the prompt's KV for all G rollouts.
    q_prefix = q.reshape(b, g, kv_heads, gq, h)
    if keys_left is None:
        keys_left = mesh_platform(current_mesh()[0]) == "cpu"
    if keys_left:
        # XLA:CPU packs a dot's right operand before multiplying: with the prompt's keys on the
        # right (G * Gq query rows on the left) every step re-packs [P, H] per head, so the keys
        # go on the left and the small [B, K, P, G, Gq] result is transposed (16 rows, 8 layers,
        # profiled in the decode loop: the step's QK dots 4.2-5.2 -> 2.1-2.3 ms, + 0.3 ms transpose).
        scores = jnp.einsum("bkph,bgkqh->bkpgq", prefix_k, q_prefix, preferred_element_type=jnp.float32)
        scores = scores.transpose(0, 1, 3, 4, 2) * scale
    else:
        scores = jnp.einsum("bgkqh,bkph->bkgqp", q_prefix, prefix_k, preferred_element_type=jnp.float32) * scale
    probs, lse_prefix = _partial_softmax(scores, prefix_valid[:, None, None, None, :])
    probs = probs.astype(prefix_v.dtype)
    out_prefix = jnp.einsum("bkgqp,bkph->bgkqh", probs, prefix_v, preferred_element_type=jnp.float32)
    out_prefix = out_prefix.reshape(r, kv_heads, gq, h)
    lse_prefix = lse_prefix.transpose(0, 2, 1, 3).reshape(r, kv_heads, gq)  # [B,K,G,Gq] -> [R,K,Gq]
    # Suffix part: each row over its own generated tokens.
    q_suffix = q.reshape(r, kv_heads, gq, h)
    scores = jnp.einsum("rkqh,rksh->rkqs", q_suffix, suffix_k, preferred_element_type=jnp.float32) * scale
    probs, lse_suffix = _partial_softmax(scores, suffix_valid[:, None, None, :])
    probs = probs.astype(suffix_v.dtype)
    out_suffix = jnp.einsum("rkqs,rksh->rkqh", probs, suffix_v, preferred_element_type=jnp.float32)
    # Merge by log-sum-exp.
    m = jnp.maximum(lse_prefix, lse_suffix)
    a, c = jnp.exp(lse_prefix - m)[..., None], jnp.exp(lse_suffix - m)[..., None]
    out = (a * out_prefix + c * out_suffix) / (a + c)  # [R, K, Gq, H]
    return out.reshape(r, 1, n, h).astype(q.dtype)


def cudnn_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg=None, kv_seg=None):
    """NVIDIA cuDNN fused attention via ``jax.nn.dot_product_attention``.

    Used for causal self-attention over a full sequence (training, prefill) where query slot
    i sits at key slot i; padding and packing are folded into a boolean mask.
    """
    t, s = q.shape[1], k.shape[1]
    if t != s:
        raise ValueError("cudnn attention serves full-sequence (prefill/training) calls; decode uses chunked")
    # Left padding cannot be expressed by sequence lengths alone, so padding (and packing)
    # travel as a boolean mask next to the causal flag; with neither, no mask is built at all
    # (a [T, S] mask at 24k tokens would cost more memory than the kernel saves).
    mask = None
    if kv_valid is not None or q_seg is not None:
        b = q.shape[0]
        valid = jnp.ones((b, s), bool) if kv_valid is None else kv_valid
        mask = jnp.broadcast_to(valid[:, None, None, :], (b, 1, t, s))
        if q_seg is not None:
            mask = mask & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# Splash tile (block_q = block_kv) per TPU generation, by ``device_kind``. Measured by compiling
# the forward + backward kernels (bf16, head_dim 128, T 8192) for each chip from a CPU host: the
# largest tile that fits VMEM is 1024 on v4 (16 MiB VMEM), v5e and v5p, and 2048 on v6e; 2048 /
# 4096 fail with "Ran out of memory in memory space vmem". The default is half of that, leaving
# VMEM headroom for larger head dims. No TPU was available to time them, so these are
# compile-tested defaults, not tuned optima; ``ModelConfig.splash_block_size`` overrides them.
SPLASH_BLOCK_BY_KIND = {"TPU v4": 512, "TPU v5 lite": 512, "TPU v5": 512, "TPU v6 lite": 1024}
DEFAULT_SPLASH_BLOCK = 512


def splash_block_for(mesh: Mesh | None, override: int | None = None) -> int:
    """The splash tile for the chips of ``mesh`` (``override`` wins; a multiple of 128)."""
    if override:
        if override % 128:
            raise ValueError(f"splash_block_size={override} must be a multiple of 128 (TPU lane width)")
        return override
    kind = mesh.devices.flat[0].device_kind if mesh is not None else ""
    return SPLASH_BLOCK_BY_KIND.get(kind, DEFAULT_SPLASH_BLOCK)


def _splash_local(q, k, v, q_seg, kv_seg, *, block: int, interpret: bool):
    """Splash on one device's shard: q [b, T, n, H], k/v [b, T, k, H], segment ids [b, T].

    GQA without repeating KV: the MQA kernel runs once per kv head over that head's G query
    heads (vmapped over batch and kv heads). T is padded up to a multiple of the tile with
    segment id 0, which real tokens (segment >= 1) never attend to.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    block = min(block, _round_up(t, 128))
    padded = _round_up(t, block)
    if padded != t:
        widths = ((0, 0), (0, padded - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
        q_seg = jnp.pad(q_seg, ((0, 0), (0, padded - t)))
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, padded - t)))
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((padded, padded)) for _ in range(g)])
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    scale = jnp.asarray(h**-0.5, q.dtype)
    qt = (q * scale).reshape(b, padded, kv_heads, g, h).transpose(0, 2, 3, 1, 4)  # [b, K, G, T, H]
    kt = k.transpose(0, 2, 1, 3)  # [b, K, T, H]
    vt = v.transpose(0, 2, 1, 3)

    def one_row(qb, kb, vb, qs, ks):
        seg = sk.SegmentIds(q=qs, kv=ks)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=seg))(qb, kb, vb)

    out = jax.vmap(one_row)(qt, kt, vt, q_seg, kv_seg)  # [b, K, G, T, H]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, padded, n, h)
    return out[:, :t].astype(q.dtype)


def splash_attention(
    q,
    k,
    v,
    q_slot,
    kv_slot,
    kv_valid,
    q_seg=None,
    kv_seg=None,
    *,
    mesh: Mesh | None = None,
    rules=None,
    block_size: int | None = None,
    interpret: bool = False,
):
    """TPU Pallas splash attention for full-sequence causal self-attention (training, prefill).

    Mosaic kernels cannot be partitioned by XLA, so on a mesh the kernel runs inside
    ``jax.shard_map``: rows over the batch axes and query / kv heads over ``tensor``, with the
    same logical-axis rules as the rest of the model (an axis that does not divide a dimension
    is dropped, as everywhere). When the kv heads cannot follow the query heads onto ``tensor``
    (e.g. 12 heads, 2 kv heads, tensor 4) heads stay whole on every device. Padding and packing
    travel as segment ids (padding = 0). ``interpret=True`` runs the kernel in Pallas' interpret
    mode on any backend (how CPU tests check its numerics).
    """
    rules = current_mesh()[1] if rules is None else rules
    b, t = q.shape[:2]
    if k.shape[1] != t:
        raise ValueError("splash attention serves full-sequence calls (training, prefill); decode uses chunked")
    if q_seg is None:
        q_seg = kv_seg = jnp.ones((b, t), jnp.int32)
    if kv_valid is not None:
        kv_seg = jnp.where(kv_valid, kv_seg, 0)
        q_seg = jnp.where(kv_valid, q_seg, 0)
    local = functools.partial(_splash_local, block=splash_block_for(mesh, block_size), interpret=interpret)
    if mesh is None or mesh.size == 1:
        return local(q, k, v, q_seg, kv_seg)
    q_spec = logical_to_spec(("batch", "length", "act_heads", "head_dim"), q.shape, mesh, rules)
    kv_spec = logical_to_spec(("batch", "length", "act_kv_heads", "head_dim"), k.shape, mesh, rules)
    if q_spec[2] != kv_spec[2]:
        q_spec = P(q_spec[0], None, None, None)
        kv_spec = P(kv_spec[0], None, None, None)
    seg_spec = P(q_spec[0], None)
    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec), out_specs=q_spec, check_vma=False
    )
    return fn(q, k, v, q_seg, kv_seg)


def mesh_platform(mesh: Mesh | None) -> str:
    """The platform the program is compiled for: the mesh's devices (which may be a TPU topology
    described on a CPU host), else the default backend."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def resolve_impl(impl: str, is_decode: bool, platform: str | None = None, splash_interpret: bool = False) -> str:
    """Pick a concrete kernel for ``platform`` (the mesh's devices; default: this host's backend).

    Fused kernels fall back to ``chunked`` where unavailable (wrong platform, decode steps);
    ``splash_interpret`` keeps ``splash`` on any platform, in Pallas interpret mode.
    """
    platform = platform or jax.default_backend()
    if impl == "auto":
        impl = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform, "chunked")
    if impl == "cudnn" and (platform not in ("gpu", "cuda") or is_decode):
        return "chunked"
    if impl == "splash" and (is_decode or (platform != "tpu" and not splash_interpret)):
        return "chunked"
    return impl


@functools.cache
def _log_choice(requested: str, chosen: str):
    if requested not in (chosen, "auto"):
        log.info("attention %s is unavailable here; using %s", requested, chosen)


def attend(
    q,
    k,
    v,
    q_slot,
    kv_slot,
    kv_valid,
    q_seg=None,
    kv_seg=None,
    *,
    impl="auto",
    block_size=512,
    is_decode=False,
    splash_block_size: int | None = None,
    splash_interpret: bool = False,
):
    """Attention with the kernel ``impl`` resolves to for the current mesh's platform."""
    mesh, rules = current_mesh()
    platform = mesh_platform(mesh)
    chosen = resolve_impl(impl, is_decode, platform, splash_interpret)
    _log_choice(impl, chosen)
    if kv_valid is None and chosen not in ("cudnn", "splash"):
        kv_valid = jnp.ones((k.shape[0], k.shape[1]), bool)
    if chosen == "reference":
        return reference_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg, kv_seg)
    if chosen == "chunked":
        return chunked_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg, kv_seg, block_size=block_size)
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, q_slot, kv_slot, kv_valid, q_seg, kv_seg)
    if chosen == "splash":
        return splash_attention(
            q,
            k,
            v,
            q_slot,
            kv_slot,
            kv_valid,
            q_seg,
            kv_seg,
            mesh=mesh,
            rules=rules,
            block_size=splash_block_size,
            interpret=splash_interpret or platform != "tpu",
        )
    raise ValueError(f"unknown attention implementation {chosen!r}")
