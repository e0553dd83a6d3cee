"""TF-IDF retriever: sparse term vectors, cosine similarity, all in scipy.sparse.

Weights: tf = 1 + log(count), idf = log((1 + N) / (1 + df)) + 1 (scikit-learn's smoothed idf),
rows L2-normalised, so a hit's score is the cosine similarity of query and document, in [0, 1].
Only documents sharing at least one term with the query are returned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from hybridchat.core.documents import Document
from hybridchat.retrieval.base import RankedRetriever, top_k_sparse
from hybridchat.retrieval.text import analyze

QUERY_BATCH = 256  # queries scored per sparse product


def _tfidf_rows(token_lists: list[list[str]], vocab: dict[str, int], idf: np.ndarray) -> sp.csr_matrix:
    rows, cols = [], []
    for r, tokens in enumerate(token_lists):
        ids = [vocab[t] for t in tokens if t in vocab]
        rows.extend([r] * len(ids))
        cols.extend(ids)
    counts = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                           shape=(len(token_lists), len(idf)), dtype=np.float32)
    counts.sum_duplicates()
    counts.data = (1.0 + np.log(counts.data)) * idf[counts.indices]
    norms = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.csr_matrix(sp.diags(1.0 / norms) @ counts, dtype=np.float32)


def build_tfidf(texts: list[str], out_dir: Path) -> None:
    token_lists = analyze(texts)
    terms = sorted({t for tokens in token_lists for t in tokens})
    vocab = {t: i for i, t in enumerate(terms)}
    df = np.zeros(len(terms), np.float64)
    for tokens in token_lists:
        df[[vocab[t] for t in set(tokens)]] += 1
    idf = (np.log((1 + len(texts)) / (1 + df)) + 1).astype(np.float32)
    # Stored term-major (terms x documents) so a query batch is one sparse product.
    postings = _tfidf_rows(token_lists, vocab, idf).T.tocsr()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(terms), encoding="utf-8")
    np.save(out_dir / "idf.npy", idf)
    sp.save_npz(out_dir / "postings.npz", postings, compressed=False)


class TfidfRetriever(RankedRetriever):
    def __init__(self, documents: Sequence[Document], index_dir: Path):
        super().__init__(documents)
        self.vocab = {t: i for i, t in enumerate(json.loads((index_dir / "vocab.json").read_text("utf-8")))}
        self.idf = np.load(index_dir / "idf.npy")
        self.postings = sp.load_npz(index_dir / "postings.npz").tocsr()

    def rank(self, queries, k, mask):
        ids, scores = [], []
        for s in range(0, len(queries), QUERY_BATCH):
            q = _tfidf_rows(analyze(queries[s:s + QUERY_BATCH]), self.vocab, self.idf)
            i, sc = top_k_sparse((q @ self.postings).tocsr(), k, mask)
            ids.append(i)
            scores.append(sc)
        return np.concatenate(ids), np.concatenate(scores)
