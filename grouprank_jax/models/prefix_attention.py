"""Attention of G rollouts' responses over their prompt's shared KV plus their own causal suffix,
for a full response at once (the shared-prefix policy update, ``rl/step.py``).

The decode-step counterpart is ``attention.shared_prefix_decode_attention``; both are softmax
attention over each row's ``[prompt, own response]`` keys, computed as two partial attentions
merged by their log-sum-exps, so the prompt's KV exists once per prompt, not once per rollout.
"""

from __future__ import annotations

import jax.numpy as jnp

from grouprank_jax.models.flash import attention_with_lse, merge_attention_parts


def shared_prefix_attention(
    q, k, v, prefix_k, prefix_v, prefix_valid, suffix_valid, q_block: int = 512, kv_block: int = 512
):
    """q [R, C, N, H], k/v [R, C, K, H]: the responses (R = B * G rows, prompt-major: row
    b*G + j is rollout j of prompt b); prefix_k/v [B, P, K, H] with prefix_valid [B, P]
    (left padding False); suffix_valid [R, C] (the response mask). Returns [R, C, N, H].

    Every response token sees all of its prompt's valid keys and its own valid keys up to
    itself. The prompt part folds the G rollouts into the query axis (``[B, G*C]`` queries
    against ``[B, P]`` keys), so each prompt's KV is read, and receives its gradient, once per
    prompt; autodiff sums the G rollouts' gradients into it.
    """
    r, c, n, h = q.shape
    b, p = prefix_k.shape[:2]
    if r % b:
        raise ValueError(f"{r} response rows are not a multiple of {b} prompts")
    g = r // b
    q_prompt = q.reshape(b, g * c, n, h)  # rows are prompt-major, so this is a free reshape
    all_prompt = jnp.full((b, g * c), p, jnp.int32)  # query slot past every prompt slot: no causal cut
    out_p, lse_p = attention_with_lse(
        q_prompt, prefix_k, prefix_v, all_prompt, jnp.arange(p, dtype=jnp.int32), prefix_valid, q_block, kv_block
    )
    slots = jnp.arange(c, dtype=jnp.int32)
    out_s, lse_s = attention_with_lse(q, k, v, jnp.broadcast_to(slots, (r, c)), slots, suffix_valid, q_block, kv_block)
    out = merge_attention_parts(out_p.reshape(r, c, n, h), lse_p.reshape(r, c, n), out_s, lse_s)
    return out.astype(q.dtype)
