"""Stage 4: the pointwise and listwise teachers' rankings fused by rank (paper Eq. 2).

    S(d) = -beta * log L_p(d) - (1 - beta) * log L_l(d),   beta = 0.5

with 1-based ranks; the fused list sorts S descending, ties broken by the pointwise score
(higher first), then by the first-stage rank (lower first). At beta = 0.5 the order is the
order of the rank product L_p * L_l (ascending), the form of the released example's
``final_rank_score`` (paper-notes §5.4).

L_p from integer 0-10 scores (documented choice, INFERRED; ``pointwise_ties``):

- ``"min"`` (default): competition ranks, ``L_p(d) = 1 + #{documents scored strictly higher}``,
  so documents the pointwise teacher cannot tell apart share a rank and the listwise teacher
  decides between them;
- ``"position"``: strict positions in the pointwise order (ties broken by first-stage rank).

A document without a pointwise score (the teacher failed on it) ranks below every scored one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

TIE_MODES = ("min", "position")


def pointwise_order(pool: Sequence[str], scores: Mapping[str, int | None], first_rank: Mapping[str, int]) -> list[str]:
    """The pool sorted by pointwise score (missing last), ties by first-stage rank."""
    return sorted(pool, key=lambda d: (-_score(scores.get(d)), first_rank[d]))


def _score(value: int | None) -> float:
    return -1.0 if value is None else float(value)


def pointwise_ranks(
    pool: Sequence[str], scores: Mapping[str, int | None], first_rank: Mapping[str, int], ties: str = "min"
) -> dict[str, int]:
    """``{docid: L_p}``, 1-based (see the module docstring for ``ties``)."""
    if ties not in TIE_MODES:
        raise ValueError(f"pointwise ties {ties!r}; choose one of {TIE_MODES}")
    order = pointwise_order(pool, scores, first_rank)
    if ties == "position":
        return {d: r for r, d in enumerate(order, 1)}
    ranks, previous, rank = {}, None, 0
    for position, d in enumerate(order, 1):
        value = _score(scores.get(d))
        if value != previous:
            rank, previous = position, value
        ranks[d] = rank
    return ranks


def fusion_scores(
    pointwise_rank: Mapping[str, int], listwise_rank: Mapping[str, int], beta: float = 0.5
) -> dict[str, float]:
    """``{docid: S(d)}`` of Eq. 2 for the documents ranked by both."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"--beta must be in [0, 1], got {beta}")
    return {d: -beta * math.log(pointwise_rank[d]) - (1.0 - beta) * math.log(listwise_rank[d]) for d in pointwise_rank}


def fuse(
    pool: Sequence[str],
    scores: Mapping[str, int | None],
    listwise: Sequence[str],
    first_rank: Mapping[str, int],
    beta: float = 0.5,
    ties: str = "min",
) -> tuple[list[str], dict[str, float]]:
    """(fused list best first, S per document). ``listwise`` is the teacher's order of the pool."""
    if sorted(listwise) != sorted(pool):
        raise ValueError("the listwise ranking must be a permutation of the pool")
    lp = pointwise_ranks(pool, scores, first_rank, ties)
    ll = {d: r for r, d in enumerate(listwise, 1)}
    s = fusion_scores(lp, ll, beta)
    # Rounded: log(2) + log(3) and log(1) + log(6) differ in the last bit, and such float noise
    # must not pre-empt the tie-breaks.
    fused = sorted(pool, key=lambda d: (-round(s[d], 9), -_score(scores.get(d)), first_rank[d]))
    return fused, s
