"""Hybrid retriever: fuse the rankings of several retrievers (by default bm25 and dense).

rrf (default): score = sum_i w_i / (rrf_k + rank_i), rank 1-based; a retriever that did not
  return the document contributes 0. Needs no score calibration (Cormack et al. 2009, k = 60).
weighted: score = sum_i w_i * s_i, with s_i each retriever's score min-max normalised to [0, 1]
  within its own candidate list for that query (the best candidate 1, the worst 0; 0 if absent).
  Raw BM25 and cosine scores live on different scales, so they are never added directly.
Each retriever contributes its top `depth` candidates.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hybridchat.core.errors import UserError
from hybridchat.retrieval.base import MISSING, RankedRetriever

METHODS = ("rrf", "weighted")


def fuse(rankings: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float], method: str,
         rrf_k: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """rankings: one (ids, scores) pair per retriever, each (queries x depth), best first."""
    n_queries = rankings[0][0].shape[0]
    out_ids = np.full((n_queries, k), MISSING, np.int64)
    out_scores = np.zeros((n_queries, k), np.float32)
    for q in range(n_queries):
        fused: dict[int, float] = {}
        for (ids, scores), w in zip(rankings, weights):
            keep = ids[q] != MISSING
            row_ids, row_scores = ids[q][keep], scores[q][keep]
            if method == "rrf":
                contrib = w / (rrf_k + np.arange(1, len(row_ids) + 1))
            else:
                lo, hi = (row_scores.min(), row_scores.max()) if len(row_scores) else (0.0, 0.0)
                contrib = w * ((row_scores - lo) / (hi - lo) if hi > lo else np.ones_like(row_scores))
            for i, c in zip(row_ids.tolist(), contrib.tolist()):
                fused[i] = fused.get(i, 0.0) + c
        # ties broken by document position so results are deterministic
        best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        for j, (i, s) in enumerate(best):
            out_ids[q, j], out_scores[q, j] = i, s
    return out_ids, out_scores


class HybridRetriever(RankedRetriever):
    def __init__(self, retrievers: Sequence[RankedRetriever], weights: Sequence[float],
                 method: str = "rrf", rrf_k: int = 60, depth: int = 50):
        if method not in METHODS:
            raise UserError(f"retriever.fusion.method={method!r}: allowed values are {', '.join(METHODS)}")
        if len(weights) != len(retrievers):
            raise UserError(f"retriever.fusion.weights={list(weights)}: needs {len(retrievers)} numbers "
                            f"(one per fused retriever: bm25, dense)")
        super().__init__(retrievers[0].documents)
        self.retrievers, self.weights = list(retrievers), list(weights)
        self.method, self.rrf_k, self.depth = method, rrf_k, depth

    def rank(self, queries, k, mask):
        depth = min(max(k, self.depth), len(self.documents))
        rankings = [r.rank(queries, depth, mask) for r in self.retrievers]
        return fuse(rankings, self.weights, self.method, self.rrf_k, k)
