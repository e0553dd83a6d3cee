"""BM25 retrievers over the shared analyzer (stopwords + Snowball stems).

bm25s (default) precomputes every term's BM25 contribution into a sparse matrix, saved as .npy
files and memory-mapped on load. We score with that matrix directly: a batch of queries is one
scipy product (query term counts x term-document scores), which gives bm25s's scores exactly and
is several times faster per query than bm25s.retrieve's per-query numpy loop. rank_bm25 is kept for comparison with the original feature: it
cannot be saved without pickle, so it is rebuilt in memory from the documents on open.
Score: BM25 (Lucene variant for bm25s, Okapi for rank_bm25), >= 0 and unbounded; only documents
sharing at least one term with the query are returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import bm25s
import numpy as np
import scipy.sparse as sp

from hybridchat.core.documents import Document
from hybridchat.retrieval.base import RankedRetriever, top_k_positive, top_k_sparse
from hybridchat.retrieval.text import analyze, document_text


def build_bm25(texts: list[str], out_dir: Path, k1: float, b: float) -> None:
    # Our own vocabulary, in sorted order: bm25s numbers the terms of token lists in set order, which
    # Python's per-process string hashing changes from run to run; the term order is the order a query's
    # scores are summed in, so near-ties ranked differently and "the same" run retrieved other documents.
    tokens = analyze(texts)
    vocab = {term: i for i, term in enumerate(sorted({t for doc in tokens for t in doc}))}
    model = bm25s.BM25(k1=k1, b=b, method="lucene")
    model.index(bm25s.tokenization.Tokenized(ids=[[vocab[t] for t in doc] for doc in tokens], vocab=vocab),
                show_progress=False)
    model.save(str(out_dir), show_progress=False)


class Bm25sRetriever(RankedRetriever):
    def __init__(self, documents: Sequence[Document], index_dir: Path):
        super().__init__(documents)
        model = bm25s.BM25.load(str(index_dir), mmap=True, show_progress=False)
        self.vocab = model.vocab_dict
        s = model.scores  # column-compressed (documents x terms) == row-compressed (terms x documents)
        self.postings = sp.csr_matrix((s["data"], s["indices"], s["indptr"]),
                                      shape=(len(s["indptr"]) - 1, s["num_docs"]))

    def rank(self, queries, k, mask):
        rows, cols = [], []
        for r, tokens in enumerate(analyze(queries)):
            ids = [self.vocab[t] for t in tokens if t in self.vocab]
            rows.extend([r] * len(ids))
            cols.extend(ids)
        counts = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                               shape=(len(queries), self.postings.shape[0]))
        return top_k_sparse((counts @ self.postings).tocsr(), k, mask)


class RankBm25Retriever(RankedRetriever):
    def __init__(self, documents: Sequence[Document], k1: float, b: float):
        from rank_bm25 import BM25Okapi

        super().__init__(documents)
        self.model = BM25Okapi(analyze([document_text(d.title, d.text) for d in documents]), k1=k1, b=b)

    def rank(self, queries, k, mask):
        scores = np.stack([self.model.get_scores(q) for q in analyze(queries)])
        if mask is not None:
            scores *= mask
        return top_k_positive(scores, k)
