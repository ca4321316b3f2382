"""Stage 5: multi-scale groups cut from the fused list (paper Alg. 1) and the training records.

Per query, from the fused list restricted to documents with a pointwise score (a document the
pointwise teacher failed on has no target; INFERRED), ``groups_per_query`` groups are drawn. Each
draws its size G from the size mix (sizes larger than the list are left out of the draw), then
**interval sampling**: with N documents and stride N / G, positions
``floor(offset + i * N / G)`` for i = 0..G-1 (the released example's group is every 5th of 50).
The offset is uniform in [0, N / G) (``offset="random"``, default, INFERRED: a new sub-list per
group) or 0 (``offset="zero"``, the example's first group starts at the top document). The
group's documents are then shuffled for the prompt (the example puts doc1 at [3]).

Each group is seeded by ``random.Random("{seed}:{purpose}:{qid}:{j}")``: reproducible, and
independent of the other queries, of the order of work and of a restart.

Records (the formats ``data.records`` validates for ``grouprank sft`` / ``grouprank grpo``):

- SFT: ``{"qid", "query", "documents": [{"docid", "text"}], "scores": [0-10 pointwise teacher
  scores], "reasoning", "fused_rank": [...]}`` (``qid``/``fused_rank`` are extra fields the
  readers ignore, kept for auditing);
- RL: ``{"qid", "query", "documents", "scores", "gold", "fused_rank"}``. ``gold`` carries the
  fused ranking on the reward's 0-10 scale (INFERRED, ``rl_gold="fused"``): the group's pointwise
  scores sorted descending and handed out in fused order, so NDCG's ideal order is the fused one
  and the score distribution JS compares against is the teacher's. ``rl_gold="pointwise"`` uses
  the pointwise scores as they are.

Group size mix ``paper`` (INFERRED from the reported counts, paper-notes §5 "Data sizes"): size 10
weighs 9,321, size 20 weighs 8,711, every other size 87 (the 72-102 reported); ``uniform``: equal
weights; or an explicit ``"10:0.5,20:0.5"``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence

PAPER_MIX = {10: 9321.0, 20: 8711.0}
PAPER_OTHER_WEIGHT = 87.0
RL_GOLD = ("fused", "pointwise")
OFFSETS = ("random", "zero")


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"5-20"``, ``"5,10,20"`` or a mix of both -> sorted distinct sizes."""
    sizes: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                sizes.update(range(low, high + 1))
            elif part:
                sizes.add(int(part))
        except ValueError:
            raise ValueError(f"--group-sizes {text!r}: expected sizes like '5-20' or '5,10,20'") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--group-sizes {text!r}: give at least one size >= 1")
    return tuple(sorted(sizes))


def mix_weights(mix: str, sizes: Sequence[int]) -> dict[int, float]:
    """Weights per size for ``paper``, ``uniform`` or ``"10:0.5,20:0.5"``."""
    if mix == "paper":
        return {s: PAPER_MIX.get(s, PAPER_OTHER_WEIGHT) for s in sizes}
    if mix == "uniform":
        return dict.fromkeys(sizes, 1.0)
    weights = {}
    for part in mix.split(","):
        size, sep, weight = part.partition(":")
        try:
            weights[int(size)] = float(weight)
        except ValueError:
            raise ValueError(f"--group-mix {mix!r}: expected 'paper', 'uniform' or 'SIZE:WEIGHT,...'") from None
        if not sep or not math.isfinite(float(weight)) or float(weight) < 0:
            raise ValueError(f"--group-mix {mix!r}: expected 'SIZE:WEIGHT' pairs with finite weights >= 0")
    unknown = sorted(set(weights) - set(sizes))
    if unknown:
        raise ValueError(f"--group-mix names sizes {unknown} that --group-sizes does not allow")
    if not sum(weights.values()) > 0:
        raise ValueError(f"--group-mix {mix!r}: every weight is 0, so no group could be drawn")
    return {s: weights.get(s, 0.0) for s in sizes}


def interval_positions(n: int, size: int, offset: float = 0.0) -> list[int]:
    """Positions ``floor(offset + i * n / size)``, i < size; ``0 <= offset < n / size``."""
    if not 1 <= size <= n:
        raise ValueError(f"group size {size} must be in 1..{n}")
    stride = n / size
    if not 0.0 <= offset < stride:
        raise ValueError(f"offset {offset} must be in [0, {stride})")
    return [math.floor(offset + i * stride) for i in range(size)]


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    sizes: tuple[int, ...] = tuple(range(5, 21))  # [paper-notes §5.5] G in {5..20}
    mix: str = "paper"
    sft_per_query: int = 2  # [INFERRED] paper: 19,262 SFT samples / 13,584 queries ~ 1.4
    rl_per_query: int = 1  # [INFERRED] paper: 5,907 RL samples / 13,584 queries ~ 0.4
    offset: str = "random"
    rl_gold: str = "fused"
    seed: int = 0

    def __post_init__(self):
        if self.offset not in OFFSETS:
            raise ValueError(f"--interval-offset {self.offset!r}; choose one of {OFFSETS}")
        if self.rl_gold not in RL_GOLD:
            raise ValueError(f"--rl-gold {self.rl_gold!r}; choose one of {RL_GOLD}")
        if self.sft_per_query < 0 or self.rl_per_query < 0:
            raise ValueError("groups per query must be >= 0")
        mix_weights(self.mix, self.sizes)  # validates


@dataclasses.dataclass(frozen=True)
class Group:
    qid: str
    purpose: str  # "sft" | "rl"
    index: int  # j-th group of this query and purpose
    docids: tuple[str, ...]  # prompt order (shuffled)


def sample_groups(qid: str, fused: Sequence[str], purpose: str, count: int, cfg: GroupConfig) -> list[Group]:
    """``count`` groups from ``fused`` (best first, scored documents only)."""
    weights = {s: w for s, w in mix_weights(cfg.mix, cfg.sizes).items() if s <= len(fused) and w > 0}
    if not weights:
        return []
    sizes, probs = list(weights), list(weights.values())
    groups = []
    for j in range(count):
        rng = random.Random(f"{cfg.seed}:{purpose}:{qid}:{j}")
        size = rng.choices(sizes, weights=probs)[0]
        stride = len(fused) / size
        offset = rng.random() * stride if cfg.offset == "random" else 0.0
        docs = [fused[i] for i in interval_positions(len(fused), size, offset)]
        rng.shuffle(docs)
        groups.append(Group(qid, purpose, j, tuple(docs)))
    return groups


def template_reasoning(scores: Sequence[int]) -> str:
    """The ``<reason>`` used when no reasoning teacher is configured (stated in README "Make training data")."""
    buckets = (
        ("directly help answer the query", lambda s: s >= 7),
        ("are partly useful", lambda s: 4 <= s <= 6),
        ("do not help answer the query", lambda s: s <= 3),
    )
    parts = []
    for phrase, test in buckets:
        ids = [f"[{i}]" for i, s in enumerate(scores, 1) if test(s)]
        if ids:
            parts.append(f"{', '.join(ids)} {phrase}")
    return "Documents " + "; ".join(parts) + "."


def fused_gold(scores: Sequence[int], fused_rank: Sequence[int]) -> list[float]:
    """The group's scores sorted descending, given out in fused order (best fused rank first)."""
    by_fused = sorted(range(len(scores)), key=lambda i: fused_rank[i])
    gold = [0.0] * len(scores)
    for value, i in zip(sorted(scores, reverse=True), by_fused):
        gold[i] = float(value)
    return gold


def make_record(
    group: Group,
    query: str,
    texts: Mapping[str, str],
    scores: Mapping[str, int],
    fused_rank: Mapping[str, int],
    cfg: GroupConfig,
    reasoning: str | None = None,
) -> dict:
    docs = list(group.docids)
    target = [int(scores[d]) for d in docs]
    ranks = [int(fused_rank[d]) for d in docs]
    record = {
        "qid": group.qid,
        "query": query,
        "documents": [{"docid": d, "text": texts[d]} for d in docs],
        "scores": target,
    }
    if group.purpose == "sft":
        record["reasoning"] = reasoning or template_reasoning(target)
    else:
        record["gold"] = fused_gold(target, ranks) if cfg.rl_gold == "fused" else [float(s) for s in target]
    record["fused_rank"] = ranks
    return record
