"""BM25 first stage with bm25s: a corpus and queries in, a run ``{qid: {docid: score}}`` out.

Tokenisation is bm25s's default (lower-case, ``\\w\\w+`` tokens, English stopwords); a Snowball
stemmer is used when PyStemmer is installed (it is optional: results differ slightly without it).
"""

from __future__ import annotations

import logging

from grouprank_jax.data.formats import Run

log = logging.getLogger(__name__)


def _stemmer():
    try:
        import Stemmer
    except ImportError:
        log.info("PyStemmer is not installed: BM25 runs without stemming")
        return None
    return Stemmer.Stemmer("english").stemWords


def bm25_run(corpus: dict[str, str], queries: dict[str, str], top_k: int = 100, k1: float = 0.9, b: float = 0.4) -> Run:
    """Top-``top_k`` BM25 documents per query (k1=0.9, b=0.4: Pyserini's defaults)."""
    import bm25s

    if not corpus:
        raise ValueError("the corpus is empty: nothing to retrieve from")
    docids = list(corpus)
    stem = _stemmer()
    retriever = bm25s.BM25(k1=k1, b=b)
    corpus_tokens = bm25s.tokenize([corpus[d] for d in docids], stemmer=stem, show_progress=False)
    if not corpus_tokens.vocab:  # bm25s would fail inside with "max() arg is an empty sequence"
        raise ValueError(
            f"the corpus ({len(docids)} documents) holds no indexable word: every token is a stopword "
            "or a single character"
        )
    retriever.index(corpus_tokens, show_progress=False)
    qids = list(queries)
    if not qids:
        return {}
    query_tokens = bm25s.tokenize([queries[q] for q in qids], stemmer=stem, show_progress=False)
    k = min(top_k, len(docids))
    indices, scores = retriever.retrieve(query_tokens, k=k, show_progress=False)  # [Q, k] each
    run: Run = {}
    for row, qid in enumerate(qids):
        # Zero-score hits share no term with the query; keep them out, as Pyserini does.
        run[qid] = {docids[int(i)]: float(s) for i, s in zip(indices[row], scores[row]) if s > 0}
    return run
