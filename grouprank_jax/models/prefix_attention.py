"""Attention of G rollouts' responses over their prompt's shared KV plus their own causal suffix,
for a full response at once (the shared-prefix policy update, ``rl/step.py``).

The decode-step counterpart is ``attention.shared_prefix_decode_attention``; both are softmax
attention over each row's ``[prompt, own response]`` keys, computed as two partial attentions
merged by their log-sum-exps, so the prompt's KV exists once per prompt, not once per rollout.

On a GPU (``attention_impl`` resolving to ``cudnn``) the blockwise pure-JAX kernel is the slow
part of the update: measured on the H200 (Qwen2.5-1.5B LoRA, 1 prompt of 8,192 x 8 responses of
1,024), the shared update took 2.07 s against 2.23 s per rollout, at 0.09 MFU. There the
responses instead attend through the fused cuDNN kernel over ``[prompt copy, own response]``
keys (``fused=``): the prompt's K/V are repeated G times inside the layer (a few hundred MB at
the paper's lengths, transient under remat) and visibility travels as a dense ``[R, 1, C, P+C]``
mask (cuDNN takes left padding only as a mask, as in the full-sequence path, whose per-rollout
mask is ``[R, 1, P+C, P+C]``); the prompt's forward and backward still run once per prompt, and
the repeat's backward sums the G rollouts' gradients into it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grouprank_jax.models.attention import mesh_platform, resolve_impl
from grouprank_jax.models.flash import attention_with_lse, merge_attention_parts
from grouprank_jax.parallel.mesh import current_mesh


def shared_prefix_attention(
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    prefix_valid,
    suffix_valid,
    q_block: int = 512,
    kv_block: int = 512,
    fused: str | None = None,
):
    """q [R, C, N, H], k/v [R, C, K, H]: the responses (R = B * G rows, prompt-major: row
    b*G + j is rollout j of prompt b); prefix_k/v [B, P, K, H] with prefix_valid [B, P]
    (left padding False); suffix_valid [R, C] (the response mask). Returns [R, C, N, H].

    Every response token sees all of its prompt's valid keys and its own valid keys up to
    itself. The prompt part folds the G rollouts into the query axis (``[B, G*C]`` queries
    against ``[B, P]`` keys), so each prompt's KV is read, and receives its gradient, once per
    prompt; autodiff sums the G rollouts' gradients into it.

    ``fused``: a ``jax.nn.dot_product_attention`` implementation (``"cudnn"`` on a GPU; ``"xla"``
    runs the same construction anywhere, for tests) over each row's ``[prompt copy, response]``.
    """
    r, c, n, h = q.shape
    b, p = prefix_k.shape[:2]
    if r % b:
        raise ValueError(f"{r} response rows are not a multiple of {b} prompts")
    g = r // b
    if fused:
        return _over_prompt_copies(q, k, v, prefix_k, prefix_v, prefix_valid, suffix_valid, g, fused)
    q_prompt = q.reshape(b, g * c, n, h)  # rows are prompt-major, so this is a free reshape
    all_prompt = jnp.full((b, g * c), p, jnp.int32)  # query slot past every prompt slot: no causal cut
    out_p, lse_p = attention_with_lse(
        q_prompt, prefix_k, prefix_v, all_prompt, jnp.arange(p, dtype=jnp.int32), prefix_valid, q_block, kv_block
    )
    slots = jnp.arange(c, dtype=jnp.int32)
    out_s, lse_s = attention_with_lse(q, k, v, jnp.broadcast_to(slots, (r, c)), slots, suffix_valid, q_block, kv_block)
    out = merge_attention_parts(out_p.reshape(r, c, n, h), lse_p.reshape(r, c, n), out_s, lse_s)
    return out.astype(q.dtype)


def prefix_attention_fused(attention_impl: str) -> str | None:
    """The fused kernel for ``ModelConfig.attention_impl`` on the current mesh's platform:
    ``"cudnn"`` where full-sequence attention resolves to cuDNN, else None (blockwise)."""
    mesh, _ = current_mesh()
    return "cudnn" if resolve_impl(attention_impl, False, mesh_platform(mesh)) == "cudnn" else None


def _over_prompt_copies(q, k, v, prefix_k, prefix_v, prefix_valid, suffix_valid, g: int, implementation: str):
    """One fused attention per row over ``[its prompt's keys, its own keys]``: [R, C, N, H]."""
    r, c = q.shape[:2]
    keys = jnp.concatenate([jnp.repeat(prefix_k, g, axis=0), k], axis=1)  # [R, P+C, K, H]
    values = jnp.concatenate([jnp.repeat(prefix_v, g, axis=0), v], axis=1)
    prompt_visible = jnp.broadcast_to(jnp.repeat(prefix_valid, g, axis=0)[:, None, :], (r, c, prefix_k.shape[1]))
    causal = jnp.arange(c)[None, :] <= jnp.arange(c)[:, None]  # [C, C]: a response token sees itself and before
    own_visible = causal[None] & suffix_valid[:, None, :]  # [R, C, C]
    mask = jnp.concatenate([prompt_visible, own_visible], axis=-1)[:, None]  # [R, 1, C, P+C]
    return jax.nn.dot_product_attention(q, keys, values, mask=mask, implementation=implementation)
