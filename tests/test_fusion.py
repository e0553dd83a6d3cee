"""Hybrid fusion (retrieval/fusion.py) of retrievers with fixed rankings, against reciprocal-rank and
min-max fusion computed by hand: depth, weights, defaults, empty and flat candidate lists, filters,
configuration errors."""

import numpy as np
import pytest

from hybridchat.core.documents import Document
from hybridchat.retrieval.base import MISSING, RankedRetriever
from hybridchat.retrieval.fusion import HybridRetriever


class FixedRanking(RankedRetriever):
    """A retriever with one fixed ranking (document positions, best first) for every query."""

    def __init__(self, documents, ranking, scores=None):
        super().__init__(documents)
        self.ranking = list(ranking)
        self.scores = list(scores) if scores is not None else [float(len(ranking) - i) for i in range(len(ranking))]
        self.asked = []

    def rank(self, queries, k, mask):
        self.asked.append(k)
        ids = np.full((len(queries), k), MISSING, np.int64)
        scores = np.zeros((len(queries), k), np.float32)
        n = min(k, len(self.ranking))
        ids[:, :n] = self.ranking[:n]
        scores[:, :n] = self.scores[:n]
        return ids, scores


DOCS20 = [Document(f"doc{i}", "", f"text {i}") for i in range(20)]


def rrf_by_hand(rankings, weights, depth, rrf_k=60):
    fused = {}
    for ranking, w in zip(rankings, weights):
        for r, doc in enumerate(ranking[:depth], 1):
            fused[doc] = fused.get(doc, 0.0) + w / (rrf_k + r)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


def test_fusion_depth_limits_the_candidates_of_each_retriever():
    # doc 9 is 4th in both rankings: with depth 3 it is invisible; with depth 20 it beats every
    # document that only one retriever found (2/64 > 1/61).
    a = [0, 1, 2, 9, 3, 4]
    b = [5, 6, 7, 9, 8, 10]
    for depth, top in ((3, 0), (20, 9)):
        ra, rb = FixedRanking(DOCS20, a), FixedRanking(DOCS20, b)
        hits = HybridRetriever([ra, rb], [1.0, 1.0], "rrf", 60, depth).search(["q"], 1)[0]
        expected = rrf_by_hand([a, b], [1.0, 1.0], depth)[0]
        assert hits[0].document.id == f"doc{top}" == f"doc{expected[0]}"
        assert hits[0].score == pytest.approx(expected[1], rel=1e-6)
        assert ra.asked == rb.asked == [depth]  # each retriever was asked for `depth` candidates
    # depth is also never below k, and never above the number of documents
    ra, rb = FixedRanking(DOCS20, a), FixedRanking(DOCS20, b)
    HybridRetriever([ra, rb], [1.0, 1.0], "rrf", 60, 2).search(["q"], 5)
    assert ra.asked == [5]
    ra, rb = FixedRanking(DOCS20, a), FixedRanking(DOCS20, b)
    HybridRetriever([ra, rb], [1.0, 1.0], "rrf", 60, 500).search(["q"], 5)
    assert ra.asked == [20]


@pytest.mark.parametrize("method", ["rrf", "weighted"])
def test_fusion_weights_belong_to_their_retriever_in_order(method):
    a, a_scores = [0, 1, 2, 3], [9.0, 6.0, 4.0, 1.0]
    b, b_scores = [3, 2, 1, 0], [0.9, 0.7, 0.3, 0.1]
    for weights in ([3.0, 1.0], [1.0, 3.0], [1.0, 0.0]):
        hybrid = HybridRetriever([FixedRanking(DOCS20, a, a_scores), FixedRanking(DOCS20, b, b_scores)], weights,
                                 method, 60, 4)
        hits = hybrid.search(["q"], 4)[0]
        if method == "rrf":
            expected = rrf_by_hand([a, b], weights, 4)
        else:  # min-max per retriever, then the weighted sum
            fused = {}
            for ranking, scores, w in ((a, a_scores, weights[0]), (b, b_scores, weights[1])):
                lo, hi = min(scores), max(scores)
                for doc, s in zip(ranking, scores):
                    fused[doc] = fused.get(doc, 0.0) + w * (s - lo) / (hi - lo)
            expected = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))
        assert [h.document.id for h in hits] == [f"doc{d}" for d, _ in expected], weights
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], rtol=1e-6)
        # the heavier retriever's favourite wins
        assert hits[0].document.id == ("doc3" if weights[1] > weights[0] else "doc0")


def test_weighted_fusion_with_an_empty_or_flat_candidate_list():
    """A retriever with no candidates contributes nothing; one whose candidates all score the same
    (a single hit, ties) gives each of them the full weight instead of dividing by zero."""
    a = FixedRanking(DOCS20, [], [])  # e.g. bm25 when the query shares no term with any document
    b = FixedRanking(DOCS20, [4], [0.3])  # a single candidate: max == min
    hits = HybridRetriever([a, b], [1.0, 2.0], "weighted", 60, 5).search(["q"], 3)[0]
    assert [(h.document.id, h.score) for h in hits] == [("doc4", 2.0)]
    flat = FixedRanking(DOCS20, [7, 2, 9], [0.5, 0.5, 0.5])
    hits = HybridRetriever([flat, a], [1.5, 1.0], "weighted", 60, 5).search(["q"], 3)[0]
    assert [(h.document.id, h.score) for h in hits] == [("doc2", 1.5), ("doc7", 1.5), ("doc9", 1.5)]  # ties by position


def test_hybrid_defaults_are_rrf_k60_depth50():
    a, b = [0, 1, 2, 9, 3, 4], [5, 6, 7, 9, 8, 10]
    ra, rb = FixedRanking(DOCS20, a), FixedRanking(DOCS20, b)
    hits = HybridRetriever([ra, rb], [1.0, 1.0]).search(["q"], 3)[0]
    expected = rrf_by_hand([a, b], [1.0, 1.0], 50)[:3]
    assert [h.document.id for h in hits] == [f"doc{d}" for d, _ in expected]
    assert [h.score for h in hits] == pytest.approx([s for _, s in expected], rel=1e-6)
    assert ra.asked == [20]  # depth 50, capped at the 20 documents
    docs60 = [Document(f"doc{i}", "", f"text {i}") for i in range(60)]
    ra, rb = FixedRanking(docs60, a), FixedRanking(docs60, b)
    HybridRetriever([ra, rb], [1.0, 1.0]).search(["q"], 3)
    assert ra.asked == rb.asked == [50]


def test_hybrid_configuration_errors_name_the_key_and_the_allowed_values():
    from hybridchat.core.errors import UserError as Error

    a = FixedRanking(DOCS20, [0])
    with pytest.raises(Error) as e:
        HybridRetriever([a, a], [1.0, 1.0], "borda")
    assert str(e.value) == "retriever.fusion.method='borda': allowed values are rrf, weighted"
    with pytest.raises(Error) as e:
        HybridRetriever([a, a], [1.0, 1.0, 2.0])
    assert str(e.value).startswith("retriever.fusion.weights=[1.0, 1.0, 2.0]: needs 2 numbers")


class MaskedRanking(FixedRanking):
    def rank(self, queries, k, mask):
        kept = [d for d in self.ranking if mask is None or mask[d]]
        return FixedRanking(self.documents, kept).rank(queries, k, None)


def test_hybrid_search_passes_filters_to_every_retriever():
    docs = [Document(f"doc{i}", "", f"text {i}", {"topic": "even" if i % 2 == 0 else "odd"}) for i in range(10)]
    a, b = MaskedRanking(docs, [1, 2, 3, 4, 5]), MaskedRanking(docs, [9, 8, 7, 6, 5])
    hits = HybridRetriever([a, b], [1.0, 1.0], "rrf", 60, 5).search(["q"], 10, filters={"topic": "even"})[0]
    assert {h.document.id for h in hits} == {"doc2", "doc4", "doc8", "doc6"}
