"""What every retriever returns (Hit) and the one search() shared by all of them.

A retriever ranks positions in its knowledge base's document list; positions become Hits only
here, so no index can hand back a document it did not rank (FAISS's -1 "missing" slot included),
and no retriever writes into the shared, frozen Document objects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from hybridchat.core.documents import Document

MISSING = -1  # an empty result slot, as FAISS reports it


@dataclass(frozen=True)
class Hit:
    document: Document
    score: float  # retriever-specific, higher is better (see each retriever's docstring)
    rank: int  # 1 = best


class Retriever(Protocol):
    def search(self, queries: list[str], top_k: int,
               filters: Mapping[str, Any] | None = None) -> list[list[Hit]]: ...


def filter_mask(documents: Sequence[Document], filters: Mapping[str, Any] | None) -> np.ndarray | None:
    """Documents whose metadata matches every filter: key == value, or key in value for a list (a
    list-valued metadata field matches when any of its elements does)."""
    if not filters:
        return None
    allowed = {k: set(v) if isinstance(v, (list, tuple, set)) else {v} for k, v in filters.items()}
    return np.fromiter((all(_matches(d.metadata.get(k), vs) for k, vs in allowed.items()) for d in documents),
                       dtype=bool, count=len(documents))


def _matches(value: Any, allowed: set) -> bool:
    """A metadata value matches when it is allowed; a list value (tags) when any element is."""
    if isinstance(value, (list, tuple)):
        return any(_matches(v, allowed) for v in value)
    try:
        return value in allowed
    except TypeError:  # unhashable (a dict): equal to no filter value
        return False


def top_k_positive(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k columns of each row of a (queries x documents) score matrix; slots whose score is
    not > 0 (no shared term, or filtered out) are MISSING."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    ids = np.take_along_axis(part, order, axis=1).astype(np.int64)
    top = np.take_along_axis(part_scores, order, axis=1).astype(np.float32)
    ids[top <= 0] = MISSING
    return ids, top


def top_k_sparse(block, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """top_k_positive for a scipy CSR (queries x documents) block, looking only at each row's
    nonzero entries (documents sharing a term with the query) instead of every document."""
    ids = np.full((block.shape[0], k), MISSING, np.int64)
    scores = np.zeros((block.shape[0], k), np.float32)
    for r in range(block.shape[0]):
        lo, hi = block.indptr[r], block.indptr[r + 1]
        cols, vals = block.indices[lo:hi], block.data[lo:hi]
        keep = vals > 0 if mask is None else (vals > 0) & mask[cols]
        cols, vals = cols[keep], vals[keep]
        if len(vals) > k:
            part = np.argpartition(-vals, k - 1)[:k]
            cols, vals = cols[part], vals[part]
        order = np.lexsort((cols, -vals))  # best first; ties by document position
        ids[r, :len(order)], scores[r, :len(order)] = cols[order], vals[order]
    return ids, scores


class RankedRetriever(ABC):
    """Base of all retrievers: subclasses rank document positions, search() builds the hits."""

    def __init__(self, documents: Sequence[Document]):
        self.documents = documents

    @abstractmethod
    def rank(self, queries: list[str], k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (len(queries), <=k), best first; MISSING where there is no result.
        mask: boolean over documents; False documents must not be returned."""

    def search(self, queries: list[str], top_k: int,
               filters: Mapping[str, Any] | None = None) -> list[list[Hit]]:
        if not queries:
            return []
        mask = filter_mask(self.documents, filters)
        if mask is not None and not mask.any():
            return [[] for _ in queries]
        ids, scores = self.rank(list(queries), max(1, min(top_k, len(self.documents))), mask)
        results = []
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
            hits = [(i, s) for i, s in zip(row_ids, row_scores) if i != MISSING]
            results.append([Hit(self.documents[i], float(s), r) for r, (i, s) in enumerate(hits, 1)])
        return results
