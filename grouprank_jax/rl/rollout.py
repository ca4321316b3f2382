"""From GroupRank records to scored rollouts and update rows: multi-scale groups, prompts,
parsing, the jitted reward, and the ``[rollouts, prompt + completion]`` rows the update reads."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from grouprank_jax.parallel.distributed import agree_max
from grouprank_jax.task.parsing import parse_batch
from grouprank_jax.task.prompts import build_messages, count_tokens, load_template, render_chat, render_prompt
from grouprank_jax.task.reward import RewardConfig, compute_rewards

STOP_STRING = "</answer>"  # the output format's last tag: nothing useful follows it


@dataclasses.dataclass(frozen=True)
class Group:
    query: str
    docs: tuple[str, ...]
    gold: tuple[float, ...]  # teacher scores (0..10) of ``docs``, in prompt order


def _docs_and_gold(record: Mapping[str, Any]) -> tuple[list[str], Sequence[float]]:
    docs = [d["text"] if isinstance(d, Mapping) else str(d) for d in record["documents"]]
    gold = record.get("gold") or record.get("scores")
    if gold is None:
        raise ValueError(f"{record.get('source', '<record>')}: an RL record needs gold labels (gold or scores)")
    return docs, gold


def record_group(record: Mapping[str, Any]) -> Group:
    """The record's own group, documents in its order (``group_sampling: as_written``): ``grouprank
    synth`` already drew its size from Alg. 1's mix and shuffled it."""
    docs, gold = _docs_and_gold(record)
    return Group(record["query"], tuple(docs), tuple(float(g) for g in gold))


def check_group_sizes(records: Sequence[Mapping[str, Any]], max_size: int) -> None:
    """``as_written`` prompts hold whole records: refuse one over ``max_size`` documents before
    any compile, instead of rendering (and truncating) a prompt of its whole candidate pool."""
    for record in records:
        if len(record["documents"]) > max_size:
            raise ValueError(
                f"{record.get('source') or '<record>'}: an RL record of {len(record['documents'])} documents, "
                f"over grpo.group_size_max={max_size}. With group_sampling: as_written each record is one "
                "prompt's group; write groups with `grouprank synth`, raise group_size_max, or set "
                "grpo.group_sampling: redraw to draw sub-groups per step"
            )


def check_prompt_budget(
    records: Sequence[Mapping[str, Any]], tokenizer, preset: str, max_prompt_len: int, max_size: int
) -> None:
    """Refuse, before any compile, a record whose prompt cannot fit ``max_prompt_len`` even with
    its documents cut to nothing (query + template + ids, at the largest group it can be drawn
    with). ``render_prompt`` would raise the same mid-run, stopping a long run at the step that
    first draws the record."""
    template = load_template(preset)
    seen: set[tuple[str, int]] = set()
    for record in records:
        size = min(len(record["documents"]), max_size)
        if (record["query"], size) in seen:
            continue
        seen.add((record["query"], size))
        docs, _ = _docs_and_gold(record)
        empty = render_chat(tokenizer, build_messages(record["query"], docs[:size], template, 0))
        need = count_tokens(tokenizer, empty)
        if need > max_prompt_len:
            raise ValueError(
                f"{record.get('source') or '<record>'}: its prompt needs {need} tokens with empty documents "
                f"(query + template + {size} ids) but grpo.max_prompt_len is {max_prompt_len}; raise "
                "max_prompt_len, shorten the query, lower grpo.group_size_max or use the 'compact' template"
            )


def sample_group(record: Mapping[str, Any], size_range: tuple[int, int], rng: random.Random) -> Group:
    """A multi-scale training group (``group_sampling: redraw``): a size drawn from ``size_range``
    (capped by the record's documents), a random subset of that size, in shuffled prompt order."""
    docs, gold = _docs_and_gold(record)
    low, high = size_range
    size = min(len(docs), rng.randint(low, high))
    picked = rng.sample(range(len(docs)), size)  # a random subset, already in shuffled order
    return Group(record["query"], tuple(docs[i] for i in picked), tuple(float(gold[i]) for i in picked))


def build_prompts(
    tokenizer, groups: Sequence[Group], preset: str, max_doc_chars: int, max_prompt_len: int
) -> list[str]:
    template = load_template(preset)
    return [render_prompt(tokenizer, g.query, list(g.docs), template, max_doc_chars, max_prompt_len) for g in groups]


def score_rollouts(
    texts: Sequence[str],
    groups: Sequence[Group],
    rollouts_per_prompt: int,
    reward_cfg: RewardConfig,
    pad_to: int | None = None,
) -> dict[str, np.ndarray]:
    """Parse every rollout (never raises) and compute the reward and its components, each [R]."""
    sizes = [len(g.docs) for g in groups for _ in range(rollouts_per_prompt)]
    pad_to = pad_to or max(sizes)
    scores, valid, status = parse_batch(list(texts), sizes, pad_to)  # [R, c], [R, c], [R]
    gold = np.zeros((len(sizes), pad_to), np.float32)
    mask = np.zeros((len(sizes), pad_to), bool)
    for row, size in enumerate(sizes):
        group = groups[row // rollouts_per_prompt]
        gold[row, :size] = group.gold
        mask[row, :size] = True
    out = compute_rewards(
        jnp.asarray(scores),
        jnp.asarray(valid),
        jnp.asarray(status),
        jnp.asarray(gold),
        jnp.asarray(mask),
        cfg=reward_cfg,
    )
    result = {k: np.asarray(v) for k, v in out.items()}
    result["format_status"] = status
    return result


def _bucket(n: int, smallest: int, largest: int) -> int:
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest) if largest >= n else n


def assemble_rows(
    tokenizer, prompts: Sequence[str], out, G: int, pad_id: int, prompt_buckets: Sequence[int], max_new: int
):
    """Left-padded prompts + right-padded completions as one [R, P + C] row per rollout
    (P and C agreed across processes: the update is one computation over all of them)."""
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    longest = agree_max(max(len(e) for e in encoded))
    P = next((b for b in sorted(prompt_buckets) if b >= longest), longest)
    C = _bucket(agree_max(int(out.lengths.max())), 16, max_new)
    R = len(prompts) * G
    seq_ids = np.full((R, P + C), pad_id, np.int32)
    seq_mask = np.zeros((R, P + C), np.int32)
    for i, ids in enumerate(encoded):
        rows = slice(i * G, (i + 1) * G)
        seq_ids[rows, P - len(ids) : P] = ids
        seq_mask[rows, P - len(ids) : P] = 1
    completion_mask = out.mask[:, :C].astype(np.int32)
    seq_ids[:, P:] = np.where(completion_mask, out.tokens[:, :C], pad_id)
    seq_mask[:, P:] = completion_mask
    old_logp = np.where(completion_mask, out.logprobs[:, :C], 0.0).astype(np.float32)
    return P, {"seq_ids": seq_ids, "seq_mask": seq_mask, "completion_mask": completion_mask, "old_logp": old_logp}
