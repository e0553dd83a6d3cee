"""Tests for mutants that once survived the suite: each compares against an independent reference
(a hand computation, a plain loop, brute force), never our code against itself.

Killed mutants (each planted by hand and seen to fail here; see docs/testing.md):
- HybridLM.forward ignore_index=-1 -> -100: test_loss_ignores_minus_one_targets_like_a_hand_computation
- Mamba2 D skip term removed (full and step path): test_mamba_mixer_equals_a_per_token_float64_recurrence
- fusion.depth ignored, fusion.weights on the wrong retriever: test_fusion_depth_*, test_fusion_weights_*,
  test_hybrid_config_weights_and_depth_reach_the_fusion
- Tracker(None) writing into the working directory: test_inactive_tracker_writes_nothing_anywhere
- IVF nprobe forced to 1: test_ivf_nprobe_from_config_reaches_faiss
- tokenizer cache never read: test_tokenizer_cache_is_read_not_retrained
- fusion survivors found by mutmut: the tests at the end of this file
"""

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from hybridchat.model.config import ModelConfig
from hybridchat.core.errors import UserError
from hybridchat.model.cache import InferenceCache
from hybridchat.model.lm import HybridLM
from hybridchat.model.mamba import Mamba2
from hybridchat.retrieval.base import MISSING, RankedRetriever
from hybridchat.retrieval.config import DenseConfig, FusionConfig, RetrieverConfig
from hybridchat.retrieval.fusion import HybridRetriever

try:  # Document moved from hybridchat.retrieval.documents to hybridchat.core.documents
    from hybridchat.core.documents import Document
except ImportError:  # pragma: no cover
    from hybridchat.retrieval.documents import Document


# ---- loss masking --------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_ignores_minus_one_targets_like_a_hand_computation(reduction):
    torch.manual_seed(0)
    vocab = 23
    model = HybridLM(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_pattern="AM", d_state=8,
                                 headdim=16, mlp_ratio=1, chunk_size=4), vocab_size=vocab)
    model.init_weights()
    idx = torch.randint(0, vocab, (3, 9))
    targets = torch.randint(0, vocab, (3, 9))
    targets[0, :4] = -1  # a masked prompt
    targets[2, 5:] = -1  # masked documents at the end
    targets[1, 3] = -1
    with torch.no_grad():
        logits = model(idx).double()
        loss = model(idx, targets=targets, reduction=reduction).item()
    # Hand computation: -log softmax at the target of every position whose target is not -1.
    terms = []
    for b in range(3):
        for t in range(9):
            if targets[b, t] != -1:
                row = logits[b, t]
                terms.append(-(row[targets[b, t]] - math.log(sum(math.exp(v) for v in row.tolist()))).item())
    assert len(terms) == 27 - 4 - 4 - 1
    expected = sum(terms) / len(terms) if reduction == "mean" else sum(terms)
    assert loss == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # and the masked positions really carry no loss: changing them changes nothing
        other = targets.clone()
        other[0, :4] = -1
        assert model(idx, targets=other, reduction=reduction).item() == pytest.approx(loss, rel=1e-6)


# ---- Mamba-2 mixer against a plain per-token recurrence -------------------------------------------

def silu(v):
    return v / (1 + torch.exp(-v))


def mamba_reference(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """The Mamba-2 mixer written out token by token in float64 from the module's own parameters:
    in_proj -> [z, x, B, C, dt]; causal depthwise conv1d + SiLU over [x, B, C]; dt = softplus(dt + dt_bias);
    A = -exp(A_log); h = exp(dt A) h + dt x B^T; y = h C + D x; rmsnorm(y * silu(z)) per group * weight;
    out_proj. Nothing from hybridchat.model.mamba but the parameters is used."""
    W_in = m.in_proj.weight.detach().double()
    conv_w, conv_b = m.conv1d.weight.detach().double()[:, 0], m.conv1d.bias.detach().double()
    dt_bias, A_log, D = (p.detach().double() for p in (m.dt_bias, m.A_log, m.D))
    norm_w, W_out = m.norm.weight.detach().double(), m.out_proj.weight.detach().double()
    d_inner, n, g, H, P, K = m.d_inner, m.d_state, m.ngroups, m.nheads, m.headdim, m.d_conv
    conv_dim = d_inner + 2 * g * n
    batch, T, _ = u.shape
    out = torch.zeros(batch, T, W_out.shape[0], dtype=torch.float64)
    for b in range(batch):
        proj = [W_in @ u[b, t].double() for t in range(T)]
        h = torch.zeros(H, P, n, dtype=torch.float64)
        for t in range(T):
            z = proj[t][:d_inner]
            conv_out = conv_b.clone()
            for k in range(K):  # weight k multiplies the input K-1-k steps back; zeros before the start
                s = t - (K - 1) + k
                if s >= 0:
                    conv_out += conv_w[:, k] * proj[s][d_inner:d_inner + conv_dim]
            xBC = silu(conv_out)
            x = xBC[:d_inner].reshape(H, P)
            B = xBC[d_inner:d_inner + g * n].reshape(g, n)
            C = xBC[d_inner + g * n:].reshape(g, n)
            dt_raw = proj[t][d_inner + conv_dim:]
            y = torch.zeros(H, P, dtype=torch.float64)
            for head in range(H):
                grp = head // (H // g)
                dt = math.log1p(math.exp(dt_raw[head].item() + dt_bias[head].item()))
                A = -math.exp(A_log[head].item())
                h[head] = math.exp(dt * A) * h[head] + dt * torch.outer(x[head], B[grp])
                y[head] = h[head] @ C[grp] + D[head] * x[head]
            gated = (y.reshape(d_inner) * silu(z)).reshape(g, d_inner // g)
            normed = gated / torch.sqrt((gated ** 2).mean(-1, keepdim=True) + m.norm.eps)
            out[b, t] = W_out @ (normed.reshape(d_inner) * norm_w)
    return out


@pytest.fixture
def mixer():
    torch.manual_seed(0)
    m = Mamba2(d_model=12, d_state=5, d_conv=4, expand=2, headdim=6, ngroups=2, chunk_size=4,
               backend="torch").double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # no zero projection, unit D or unit norm weight may hide a missing term
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
        m.D.copy_(torch.randn(m.nheads, generator=gen, dtype=torch.float64) * 2)
    return m


def test_mamba_mixer_equals_a_per_token_float64_recurrence(mixer):
    assert mixer.nheads == 4 and mixer.ngroups == 2
    u = torch.randn(2, 11, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = mamba_reference(mixer, u)
    with torch.no_grad():
        full = mixer(u)
        # Decode: prefill 5 tokens with a cache, then one token at a time (the step path).
        cache = InferenceCache.allocate([mixer], 2, 11, dtype=torch.float64)
        parts = [mixer(u[:, :5], cache=cache)]
        for t in range(5, 11):
            parts.append(mixer(u[:, t:t + 1], cache=cache))
        stepped = torch.cat(parts, dim=1)
        # Only single steps from the start (step path for every token).
        cache = InferenceCache.allocate([mixer], 2, 11, dtype=torch.float64)
        only_steps = torch.cat([mixer(u[:, t:t + 1], cache=cache) for t in range(11)], dim=1)
    torch.testing.assert_close(full, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(stepped, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(only_steps, ref, rtol=1e-9, atol=1e-10)


def test_mamba_skip_term_d_changes_the_output(mixer):
    u = torch.randn(1, 6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = mixer(u)
        mixer.D.zero_()
        after = mixer(u)
    assert (before - after).abs().max() > 1e-3  # D is not a no-op ...
    torch.testing.assert_close(after, mamba_reference(mixer, u), rtol=1e-9, atol=1e-10)  # ... and D = 0 is exact


# ---- hybrid fusion: depth and weights ---------------------------------------------------------------

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


# ---- a dense knowledge base from synthetic vectors (fake encoder: no model download, no network) --

class VectorEncoder:
    """Stands in for the sentence-transformers encoder: each text maps to a fixed unit vector."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors
        self.dim = len(next(iter(vectors.values())))
        self.weights_sha256 = "f" * 64
        self.name = "synthetic"

    def encode(self, texts, batch_size=64, progress=False, precision="float32"):
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


def synthetic_kb(tmp_path, monkeypatch, n=1600, dim=16, index="ivf", extra_indexes=()):
    """A knowledge base whose dense index holds clustered random unit vectors; returns (kb, doc vectors, encoder)."""
    from hybridchat.retrieval import knowledge_base as kbm
    from hybridchat.retrieval.text import document_text

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, dim))
    vecs = centers[rng.integers(0, 40, n)] + 0.35 * rng.normal(size=(n, dim))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    docs = [Document(f"d{i}", "", f"document number {i} word{i % 7}") for i in range(n)]
    table = {document_text(d.title, d.text): v for d, v in zip(docs, vecs)}
    queries = rng.normal(size=(30, dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    table.update({f"query {i}": q for i, q in enumerate(queries)})
    encoder = VectorEncoder(table)
    monkeypatch.setattr(kbm, "load_encoder", lambda *a, **k: encoder)
    kb = kbm.KnowledgeBase.build(tmp_path / "kb", docs, ["dense", *extra_indexes],
                                 RetrieverConfig(dense=DenseConfig(model="synthetic", index=index)), progress=False)
    return kb, vecs.astype(np.float32), queries.astype(np.float32)


def test_ivf_nprobe_from_config_reaches_faiss(tmp_path, monkeypatch):
    import faiss

    kb, vecs, queries = synthetic_kb(tmp_path, monkeypatch)
    index = faiss.read_index(str(kb.path / "dense" / "index.faiss"))
    nlist = faiss.extract_index_ivf(index).nlist
    assert nlist == 1600 // 39  # capped so every list has >= 39 training points
    exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]  # brute force, by hand

    def recall(nprobe):
        retriever = kb.retriever(RetrieverConfig(kind="dense", dense=DenseConfig(model="synthetic", nprobe=nprobe)))
        hits = retriever.search([f"query {i}" for i in range(len(queries))], 10)
        found = [[int(h.document.id[1:]) for h in row] for row in hits]
        return np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])

    r1, r4, rall = recall(1), recall(4), recall(nlist)
    assert rall == 1.0  # visiting every list is exhaustive
    assert r1 < r4 < rall, (r1, r4, rall)  # and fewer lists find fewer true neighbours
    assert r1 < 0.8


def test_hybrid_config_weights_and_depth_reach_the_fusion(tmp_path, monkeypatch):
    from hybridchat.retrieval import knowledge_base as kbm

    kb, _, _ = synthetic_kb(tmp_path, monkeypatch, n=200, index="flat", extra_indexes=("bm25",))
    bm25_cfg = RetrieverConfig(kind="bm25")
    dense_cfg = RetrieverConfig(kind="dense", dense=DenseConfig(model="synthetic"))
    # A query the encoder knows and bm25 can match: reuse a document's text.
    text = "document number 17 word3"
    bm25_ids = [h.document.id for h in kb.retriever(bm25_cfg).search([text], 10)[0]]
    dense_ids = [h.document.id for h in kb.retriever(dense_cfg).search([text], 10)[0]]
    assert bm25_ids[0] == dense_ids[0] == "d17" and bm25_ids[1:4] != dense_ids[1:4]
    for weights, winner in (([1.0, 0.0], bm25_ids), ([0.0, 1.0], dense_ids)):
        cfg = RetrieverConfig(kind="hybrid", dense=DenseConfig(model="synthetic"),
                              fusion=FusionConfig(weights=weights, depth=10))
        hybrid_ids = [h.document.id for h in kb.retriever(cfg).search([text], 10)[0]]
        assert hybrid_ids == winner, weights
    asked = []
    original = kbm.Bm25sRetriever.rank
    monkeypatch.setattr(kbm.Bm25sRetriever, "rank", lambda self, q, k, m: asked.append(k) or original(self, q, k, m))
    cfg = RetrieverConfig(kind="hybrid", dense=DenseConfig(model="synthetic"), fusion=FusionConfig(depth=37))
    kb.retriever(cfg).search([text], 3)
    assert asked == [37]


# ---- Tracker(None): an inactive tracker writes nothing, anywhere --------------------------------

def test_inactive_tracker_writes_nothing_anywhere(tmp_path, monkeypatch):
    from hybridchat.infra.config import LoggerConfig
    from hybridchat.infra.tracking import Tracker

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    for logger in (None, LoggerConfig(name="none"), LoggerConfig(name="wandb", mode="offline")):
        tracker = Tracker(None, logger)
        tracker.log(1, **{"train/loss": 1.0})
        assert tracker.plot() is None
        tracker.finish()
        assert tracker.wandb_run is None
    assert list(tmp_path.rglob("*")) == [cwd]


# ---- the tokenizer cache is read, not retrained ------------------------------------------------

def test_tokenizer_cache_is_read_not_retrained(tmp_path, monkeypatch):
    from hybridchat.data import tokenizer as tok_module

    texts = [f"The river {i} flows past the old mill and the bridge number {i * 7}." for i in range(200)]
    first = tok_module.load_or_train(iter(texts), 400, 10_000, tmp_path)
    cached = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(cached) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cached tokenizer fits")

    monkeypatch.setattr(tok_module.Tokenizer, "train", classmethod(no_training))
    second = tok_module.load_or_train(iter(texts), 400, 10_000, tmp_path)
    assert second.fingerprint == first.fingerprint
    assert second.encode("the old mill") == first.encode("the old mill")
    # ... and it is that file which is read: a damaged cache file is reported, not silently retrained
    cached[0].write_text("{ damaged")
    with pytest.raises(UserError, match=str(cached[0])):
        tok_module.load_or_train(iter(texts), 400, 10_000, tmp_path)
    with pytest.raises(AssertionError, match="retrained"):  # other settings are not cached: they would train
        tok_module.load_or_train(iter(texts), 420, 10_000, tmp_path)


# ---- fusion mutants found by mutmut (docs/testing.md) -------------------------------------------

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


# ---- data loader: packing against a plain reference ---------------------------------------------

class CharTokenizer:
    """Each character is its code point; <|bos|> is 0. Enough to check packing by hand."""

    bos_id = 0

    def encode_batch(self, texts):
        return [[ord(c) for c in t] for t in texts]


def reference_batches(docs_per_epoch, batch_size, seq_len, epochs):
    stream = [tok for epoch in range(epochs) for doc in docs_per_epoch(epoch) for tok in [0] + [ord(c) for c in doc]]
    rows = [stream[i:i + seq_len + 1] for i in range(0, len(stream) - seq_len, seq_len + 1)]
    return [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


def test_loader_packs_bos_prefixed_documents_into_rows_like_a_plain_loop():
    from hybridchat.data.loader import token_batches

    def source(split, epoch):  # a different order every epoch, as the world source does
        docs = [f"{split}{epoch}-doc{i}:" + "xyz"[: i % 3 + 1] * (i + 1) for i in range(7)]
        return iter(docs if epoch % 2 == 0 else docs[::-1])

    batch_size, seq_len = 5, 5  # 144 tokens per epoch: 24 rows, 4 whole batches and a partial one
    expected = reference_batches(lambda e: source("train", e), batch_size, seq_len, epochs=3)
    got = token_batches(source, "train", CharTokenizer(), batch_size, seq_len, loop=True)
    for index, rows in enumerate(expected[:12]):
        batch = next(got)
        assert batch["inputs"].shape == batch["targets"].shape == (batch_size, seq_len)
        assert batch["inputs"].tolist() == [r[:-1] for r in rows], index
        assert batch["targets"].tolist() == [r[1:] for r in rows], index
    # one pass (loop=False) stops after the last whole batch of epoch 0, dropping a partial one
    one_pass = reference_batches(lambda e: source("train", e), batch_size, seq_len, 1)
    assert len(one_pass) == 4
    stream = [t for doc in source("train", 0) for t in [0] + [ord(c) for c in doc]]
    assert (len(stream) // (seq_len + 1)) % batch_size != 0  # there is a partial batch to drop
    once = list(token_batches(source, "train", CharTokenizer(), batch_size, seq_len, loop=False))
    assert [b["inputs"].tolist() for b in once] == [[r[:-1] for r in rows] for rows in one_pass]
    # ranks take every world_size-th batch from `start` on
    ranked = token_batches(source, "train", CharTokenizer(), batch_size, seq_len, rank=1, world_size=3, start=2)
    for index in (4, 7, 10):
        assert next(ranked)["inputs"].tolist() == [r[:-1] for r in expected[index]]


def test_loader_with_an_empty_split_names_it():
    from hybridchat.data.loader import token_batches

    with pytest.raises(UserError, match="the 'val' split of the data source yielded no documents"):
        next(token_batches(lambda split, epoch: iter([]), "val", CharTokenizer(), 2, 4, loop=False))


# ---- checkpoint.py mutants found by mutmut (docs/testing.md) ------------------------------------

CKPT_MODEL = ModelConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_pattern="AM", d_state=8, headdim=16,
                         mlp_ratio=1, chunk_size=4, sequence_len=16)


@pytest.fixture(scope="module")
def step_folder(tmp_path_factory):
    """One saved step folder of a tiny AM model (with its config and tokenizer) and an AdamW state."""
    from hybridchat.infra import checkpoint
    from hybridchat.data.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = HybridLM(CKPT_MODEL, vocab_size=300)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 300, (1, 8)), torch.randint(0, 300, (1, 8))).backward()
    opt.step()
    tokenizer = Tokenizer.train(["some text for a tokenizer"], 300)
    meta = {"config": {"model": dataclasses.asdict(CKPT_MODEL)}, "tokenizer": tokenizer.fingerprint}
    path = checkpoint.save(tmp_path_factory.mktemp("ckpt"), 7, model, [opt], meta, keep=1, tokenizer=tokenizer)
    return path


def edited_copy(src, dst, edit=None, drop=None):
    """A copy of step folder `src` at `dst` with meta.json changed by edit(meta) and file `drop` removed."""
    import json
    import shutil

    shutil.copytree(src, dst)
    if edit is not None:
        meta = json.loads((dst / "meta.json").read_text())
        edit(meta)
        (dst / "meta.json").write_text(json.dumps(meta))
    if drop is not None:
        (dst / drop).unlink()
    return dst


def test_load_model_refuses_an_incomplete_or_foreign_step_folder_in_one_line(step_folder, tmp_path):
    """load_model needs the model config and tokenizer.json beside the weights, a config of known
    keys, and the weights of the tokenizer saved with them; each lack is one UserError saying which
    (mutants: `meta.get("config", None)`, `or` -> `and`, messages dropped, fingerprint not checked)."""
    from hybridchat.infra import checkpoint

    def no_config(meta):
        del meta["config"]

    def unknown_key(meta):
        meta["config"]["model"]["n_wings"] = 2

    def other_tokenizer(meta):
        meta["tokenizer"] = "0123456789abcdef"

    cases = [(edited_copy(step_folder, tmp_path / "a", no_config), "lacks its model config or tokenizer.json"),
             (edited_copy(step_folder, tmp_path / "b", drop="tokenizer.json"), "lacks its model config or tokenizer"),
             (edited_copy(step_folder, tmp_path / "c", unknown_key), "does not fit this hybridchat .*n_wings"),
             (edited_copy(step_folder, tmp_path / "d", other_tokenizer), "trained with tokenizer 0123456789abcdef")]
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            checkpoint.load_model(path)
    model, tokenizer, meta = checkpoint.load_model(step_folder)  # the untouched folder loads
    assert meta["step"] == 7 and meta["format_version"] == 1 and not model.training


def test_load_model_puts_the_model_on_the_asked_device_and_ssm_backend(step_folder):
    """device and ssm_backend reach the model (mutants: model.to(None), the backend argument dropped)."""
    from hybridchat.infra import checkpoint

    model, _, _ = checkpoint.load_model(step_folder, device="meta", ssm_backend="auto")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert [b.mixer.backend for b in model.blocks if b.kind == "M"] == ["auto"]


def test_optimizer_state_for_another_list_of_optimizers_is_refused(step_folder):
    """The step folder holds one AdamW: loading it into two AdamWs (same types where they pair up) or
    into an SGD is one UserError naming both lists (mutants: `or` -> `and`, the message dropped)."""
    from hybridchat.infra import checkpoint

    model = HybridLM(CKPT_MODEL, vocab_size=300)
    params = list(model.parameters())
    two = [torch.optim.AdamW(params[:3]), torch.optim.AdamW(params[3:])]
    with pytest.raises(UserError, match=r"checkpoint optimizers \['AdamW'\] do not match this run's "
                                        r"\['AdamW', 'AdamW'\]"):
        checkpoint.load(step_folder, model, two)
    with pytest.raises(UserError, match=r"\['AdamW'\] do not match this run's \['SGD'\]"):
        checkpoint.load(step_folder, model, [torch.optim.SGD(params, lr=0.1)])


def test_find_gives_the_latest_or_the_asked_step_or_says_what_to_run(tmp_path):
    """find() against folders made by hand: only step folders with meta.json count."""
    from hybridchat.infra import checkpoint

    stage = tmp_path / "run1" / "pretrain"
    for name in ("step_000002", "step_000010"):
        (stage / name).mkdir(parents=True)
        (stage / name / "meta.json").write_text("{}")
    (stage / "step_000011").mkdir()  # an interrupted save: no meta.json
    assert checkpoint.find(tmp_path, "run1", "pretrain") == stage / "step_000010"
    assert checkpoint.find(str(tmp_path), "run1", "pretrain", step=2) == stage / "step_000002"
    with pytest.raises(UserError) as e:
        checkpoint.find(tmp_path, "run1", "pretrain", step=11)
    assert str(e.value) == f"no checkpoint {stage / 'step_000011'}; {stage} holds ['step_000002', 'step_000010']"
    with pytest.raises(UserError) as e:
        checkpoint.find(tmp_path, "run2", "mid", step=3)
    assert str(e.value) == f"no checkpoint {tmp_path / 'run2' / 'mid' / 'step_000003'}; " \
                           f"{tmp_path / 'run2' / 'mid'} holds none"
    with pytest.raises(UserError) as e:
        checkpoint.find(tmp_path, "run2", "mid")
    assert str(e.value) == (f"{tmp_path / 'run2' / 'mid'} holds no checkpoint: train it first with python -m "
                            f"hybridchat.train stage=mid run_name=run2 (and the same model=...)")


# ---- loop.py mutants found by mutmut (docs/testing.md) ------------------------------------------

def test_grad_accum_steps_is_batch_tokens_over_rows_times_length_times_ranks():
    """Hand values: 4 rows x 256 tokens x 3 ranks = 3072 tokens per pass; zero, negative or ragged
    totals are one UserError naming the keys and the product."""
    from hybridchat.infra.runtime import grad_accum_steps

    assert grad_accum_steps(5 * 3072, 4, 256, 3) == 5
    assert grad_accum_steps(3072, 4, 256, 3) == 1
    assert grad_accum_steps(None, 4, 256, 3) == 1
    assert grad_accum_steps(1, 1, 1, 1) == 1  # one token per pass: a total of 1 is one pass
    for bad in (0, -3072, 3072 + 256, 1000):
        with pytest.raises(UserError) as e:
            grad_accum_steps(bad, 4, 256, 3)
        assert str(e.value) == (f"stage.total_batch_tokens={bad} must be a positive multiple of gpu.micro_batch x "
                                f"model.sequence_len x world_size = 4 x 256 x 3 = 3072")


def test_optimizers_follow_the_recipe_muon_for_block_matrices_adamw_for_the_rest():
    """Muon (momentum 0.95, lr scaled the "original" way, stage weight decay) takes the 2-D matrices
    inside blocks; AdamW (betas 0.8/0.95, eps 1e-10, no decay) takes embedding, head and the rest, each
    group at its stage lr, in that order; initial_lr is the lr the schedule multiplies."""
    from hybridchat.infra.config import StageConfig
    from hybridchat.training.loop import build_optimizers

    model = HybridLM(dataclasses.replace(CKPT_MODEL, norm_weights=True), vocab_size=50)
    s = StageConfig(matrix_lr=0.03, embedding_lr=0.2, unembedding_lr=0.007, scalar_lr=0.5, weight_decay=0.05)
    muon, adamw = build_optimizers(model, s)
    named = dict(model.named_parameters())
    matrices = [n for n, p in named.items() if n.startswith("blocks.") and p.ndim == 2]
    rest = [n for n in named if n not in matrices and n not in ("wte.weight", "lm_head.weight")]
    names = {id(p): n for n, p in named.items()}
    assert type(muon) is torch.optim.Muon and len(muon.param_groups) == 1
    group = muon.param_groups[0]
    assert sorted(names[id(p)] for p in group["params"]) == sorted(matrices)
    assert (group["lr"], group["initial_lr"], group["momentum"], group["weight_decay"], group["adjust_lr_fn"]) == \
        (0.03, 0.03, 0.95, 0.05, "original")
    assert type(adamw) is torch.optim.AdamW
    assert [[names[id(p)] for p in g["params"]] for g in adamw.param_groups] == \
        [["wte.weight"], ["lm_head.weight"], rest]
    assert [(g["lr"], g["initial_lr"]) for g in adamw.param_groups] == [(0.2, 0.2), (0.007, 0.007), (0.5, 0.5)]
    assert all((g["betas"], g["eps"], g["weight_decay"]) == ((0.8, 0.95), 1e-10, 0.0) for g in adamw.param_groups)


def test_lr_schedule_edges_no_warmup_and_a_warmdown_of_under_one_step():
    """Hand values: without warmup the first step runs at the full lr; a warmdown_ratio that rounds
    to zero steps still ends at final_lr_frac only through max(1, ...): one step of warmdown, which
    is the step past the last (the schedule is 1.0 on every step that runs)."""
    from hybridchat.infra.config import StageConfig
    from hybridchat.training.stages import lr_multiplier

    s = StageConfig(num_steps=10, warmup_steps=0, warmdown_ratio=0.04, final_lr_frac=0.1)
    assert [lr_multiplier(i, s) for i in range(10)] == [1.0] * 10
    assert lr_multiplier(10, s) == pytest.approx(0.1)
    s = StageConfig(num_steps=8, warmup_steps=4, warmdown_ratio=0.5, final_lr_frac=0.0)
    assert [lr_multiplier(i, s) for i in range(8)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25])


class CountingSGD(torch.optim.SGD):
    """SGD that also keeps a plain Python number per parameter: state that is not a tensor."""

    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["count"] = self.state[p].get("count", 0) + 1


def test_optimizer_state_round_trip_keeps_groups_as_saved_and_number_state(step_folder, tmp_path):
    """What torch.optim's own state_dict holds comes back from the folder as it was: AdamW's groups
    with betas a tuple again (JSON made it a list), and per-parameter state that is a Python number
    (mutants: lists never turned back into tuples, `params` turned instead, the number state dropped
    or filed under another parameter, or lost where a parameter has no tensor state)."""
    from hybridchat.infra import checkpoint
    from hybridchat.data.tokenizer import Tokenizer

    def groups(opt):
        return [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]

    model, _, _ = checkpoint.load_model(step_folder)
    params = list(model.parameters())
    as_saved = groups(torch.optim.AdamW(params, lr=1e-3))  # the fixture's optimizer, built alike
    assert type(as_saved[0]["betas"]) is tuple
    fresh = torch.optim.AdamW(params, lr=0.5, betas=(0.1, 0.2))
    checkpoint.load(step_folder, model, [fresh])
    assert groups(fresh) == as_saved

    def counting_sgd():  # momentum only in the first group: the second's state is the number alone
        return CountingSGD([{"params": params[:2], "momentum": 0.9}, {"params": params[2:]}], lr=0.1)

    sgd = counting_sgd()
    for _ in range(3):
        model(torch.randint(0, 300, (1, 6)), torch.randint(0, 300, (1, 6))).backward()
        sgd.step()
        model.zero_grad()
    sgd.state[params[1]]["count"] = 7  # one parameter's number differs from the others'
    expected = {pid: s["count"] for pid, s in sgd.state_dict()["state"].items()}
    path = checkpoint.save(tmp_path, 3, model, [sgd], {}, keep=1, tokenizer=Tokenizer.load(step_folder / "tokenizer.json"))
    again = counting_sgd()
    checkpoint.load(path, model, [again])
    assert {pid: s["count"] for pid, s in again.state_dict()["state"].items()} == expected
    assert expected[1] == 7 and len(expected) == len(params)
    assert set(again.state_dict()["state"][5]) == {"count"} and "momentum_buffer" in again.state_dict()["state"][0]


def test_checkpoint_loads_into_a_one_rank_fsdp_model_with_sharded_optimizer_state(step_folder):
    """Under FSDP the parameters are DTensors: the full tensors of the folder are cut like them, the
    weights and AdamW's moments alike (a step count is not), so training goes on. A one-rank gloo group
    in this process; the values against the safetensors files read directly (mutants: the moments
    left whole, or every state entry cut, or cut like nothing)."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from hybridchat.infra import checkpoint

    weights = load_file(str(step_folder / "model.safetensors"))
    moments = load_file(str(step_folder / "optimizer.safetensors"))
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = HybridLM(CKPT_MODEL, vocab_size=300)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        checkpoint.load(step_folder, model, [opt])
        names = [n for n, _ in model.named_parameters()]
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and torch.equal(p.full_tensor(), weights[name]), name
        for pid, state in opt.state_dict()["state"].items():
            assert isinstance(state["exp_avg"], DTensor) and not isinstance(state["step"], DTensor), names[pid]
            assert torch.equal(state["exp_avg"].full_tensor(), moments[f"0.{pid}.exp_avg"]), names[pid]
            assert torch.equal(state["step"], moments[f"0.{pid}.step"])
        model(torch.randint(0, 300, (1, 6)), torch.randint(0, 300, (1, 6))).backward()
        opt.step()  # moments and parameters laid out alike: the step runs
    finally:
        dist.destroy_process_group()


# ---- the training loop driven directly: a toy stage on a tiny model, no data pipeline ------------

TOY_MODEL = ModelConfig(n_layer=2, n_embd=16, n_head=2, n_kv_head=1, block_pattern="AM", d_state=4, headdim=8,
                        mlp_ratio=1, chunk_size=4, sequence_len=8)
TOY_VOCAB = 40


class ListTracker:
    def __init__(self):
        self.records = []

    def log(self, step, **metrics):
        self.records.append((step, metrics))

    def values(self, key):
        return [(step, m[key]) for step, m in self.records if key in m]


class StubTokenizer:
    fingerprint = "stub"

    def save(self, path):
        path.write_text("{}")


def toy_stage_class():
    from hybridchat.training.stages import Stage

    class ToyStage(Stage):
        """Fixed random batches; records what the loop asks of it."""

        name = "toy"
        monitor = "val/loss"

        def __init__(self, ctx, on_step=None):
            super().__init__(ctx)
            g = torch.Generator().manual_seed(0)
            rows, length = ctx.config.gpu.micro_batch, ctx.config.model.sequence_len
            self.batches = [{"inputs": torch.randint(0, TOY_VOCAB, (rows, length), generator=g),
                             "targets": torch.randint(0, TOY_VOCAB, (rows, length), generator=g)} for _ in range(64)]
            self.val = self.batches[-1:]
            self.starts, self.steps, self.evaluated, self.initialised = [], 0, 0, []
            self.on_step = on_step

        def initialise(self, model, source):
            self.initialised.append((model, source))

        def train_batches(self, start, rank, world_size):
            self.starts.append((start, rank, world_size))
            return iter(self.batches[start:])

        def val_batches(self):
            return self.val

        def training_step(self, model, batch):
            self.steps += 1
            loss = self.on_step(self, model) if self.on_step is not None else None  # a loss of its own, or None
            return model(batch["inputs"], batch["targets"]) if loss is None else loss

        def evaluate(self, model):
            self.evaluated += 1
            with torch.no_grad():
                return {"val/loss": model(self.val[0]["inputs"], self.val[0]["targets"]).item()}

        def step_metrics(self):
            return {"toy/micro_steps": self.steps}

    return ToyStage


def toy_run(tmp_path, *, on_step=None, resume=False, micro_batch=2, gpu=None, seed=0, source=None, setup=None,
            progress=False, **stage):
    """(stage, ctx, tracker, summary or the exception) of loop.train on the toy stage."""
    from hybridchat.training import loop
    from hybridchat.infra.config import Config, GPUConfig, PathsConfig, StageConfig
    from hybridchat.infra.context import RunContext
    from hybridchat.infra.runtime import Runtime

    stage_cfg = StageConfig(**{"num_steps": 4, "warmup_steps": 0, "eval_every": 2, "checkpoint_every": 2,
                               "keep_checkpoints": 10, **stage})
    config = Config(model=TOY_MODEL, gpu=GPUConfig(micro_batch=micro_batch, **(gpu or {})), stage=stage_cfg,
                    paths=PathsConfig(checkpoints=str(tmp_path)), run_name="toy", resume=resume, progress=progress)
    torch.manual_seed(seed)
    model = HybridLM(TOY_MODEL, vocab_size=TOY_VOCAB)
    model.init_weights()
    ctx = RunContext(config, Runtime(torch.device("cpu"), None), model)
    ctx.tokenizer = StubTokenizer()
    ctx.source_checkpoint = source
    toy, tracker = toy_stage_class()(ctx, on_step), ListTracker()
    if setup is not None:
        setup(toy)
    try:
        return toy, ctx, tracker, loop.train(toy, ctx, tracker, {"toy": True})
    except Exception as e:  # noqa: BLE001 - the tests look at it
        return toy, ctx, tracker, e


def test_at_path_takes_a_step_folder_or_the_latest_step_of_a_stage_folder(tmp_path):
    """checkpoint.at_path against folders made by hand: only step folders with meta.json count."""
    from hybridchat.infra import checkpoint

    stage = tmp_path / "pretrain"
    for name in ("step_000003", "step_000012"):
        (stage / name).mkdir(parents=True)
        (stage / name / "meta.json").write_text("{}")
    (stage / "step_000013").mkdir()  # no meta.json: not a checkpoint
    assert checkpoint.at_path(str(stage / "step_000003")) == stage / "step_000003"
    assert checkpoint.at_path(stage) == stage / "step_000012"
    for path in (stage / "step_000013", tmp_path / "nowhere"):
        with pytest.raises(UserError) as e:
            checkpoint.at_path(path)
        assert str(e.value) == f"{path} is neither a checkpoint step folder (with meta.json) nor a folder of them"


def test_unreadable_checkpoint_metadata_is_one_line_naming_the_error(tmp_path):
    """read_meta's UserError carries the error's type and its text on one line, cut at 200 characters;
    JSON that is not an object is refused as not a checkpoint's (mutants: the type of None named, the
    words joined by something else, the text of None, 201 characters, the dict check skipped)."""
    from hybridchat.infra.checkpoint import read_meta

    bad_json = tmp_path / "bad"
    bad_json.mkdir()
    (bad_json / "meta.json").write_text("{\n  \"step\":   }")
    with pytest.raises(UserError) as e:
        read_meta(bad_json)
    assert str(e.value) == (f"checkpoint metadata {bad_json / 'meta.json'} is unreadable or corrupted "
                            f"(JSONDecodeError: Expecting value: line 2 column 13 (char 14))")
    deep = tmp_path / ("long-folder-name-" * 12)
    (deep / "meta.json").mkdir(parents=True)  # a folder where the file should be: IsADirectoryError
    with pytest.raises(UserError) as e:
        read_meta(deep)
    text = f"[Errno 21] Is a directory: '{deep / 'meta.json'}'"
    assert len(text) > 200
    assert str(e.value) == (f"checkpoint metadata {deep / 'meta.json'} is unreadable or corrupted "
                            f"(IsADirectoryError: {text[:200]})")
    listed = tmp_path / "list"
    listed.mkdir()
    (listed / "meta.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="is not a hybridchat checkpoint's"):
        read_meta(listed)


def test_metadata_format_version_absent_means_0_and_newer_is_refused(tmp_path):
    """meta.json without format_version is a version-0 checkpoint and loads; a version that is not an
    integer (a string, a boolean) is not a checkpoint's; a newer version than this hybridchat reads is
    one UserError asking for an upgrade (mutants: another key or default read, `or` -> `and`)."""
    from hybridchat.infra.checkpoint import FORMAT_VERSION, read_meta

    (tmp_path / "meta.json").write_text('{"step": 3}')
    assert read_meta(tmp_path) == {"step": 3}
    for version in ('"2"', "true", "1.0"):
        (tmp_path / "meta.json").write_text(f'{{"format_version": {version}}}')
        with pytest.raises(UserError, match="expected a JSON object with an integer format_version"):
            read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(f'{{"format_version": {FORMAT_VERSION + 1}, "step": 3}}')
    with pytest.raises(UserError) as e:
        read_meta(tmp_path)
    assert str(e.value) == (f"checkpoint {tmp_path} has format_version {FORMAT_VERSION + 1}; this hybridchat reads "
                            f"up to {FORMAT_VERSION}: upgrade hybridchat")


def loop_messages(caplog, summary):
    """The loop's log lines before its last, which must be rank 0's checksum of the final weights."""
    *before, last = caplog.messages
    assert last == f"rank 0 final parameter checksum {summary['param_checksum']:.10e}"
    return before


def test_loop_logs_loss_gradient_norm_and_throughput_of_the_whole_accumulated_step(tmp_path, monkeypatch):
    """One step of 2 micro-batches of 2 rows: the logged loss and gradient norm are those of the 4 rows'
    mean loss on the initial weights (a plain forward and backward on a copy built alike), tokens per
    second counts both micro-batches (a fake clock at 100 s: 0.25 s per step), and MFU = flops per token x
    tokens / seconds / peak."""
    import types

    from hybridchat.training import loop

    clock = iter(100 + i * 0.25 for i in range(1000))
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    torch.manual_seed(0)
    ref = HybridLM(TOY_MODEL, vocab_size=TOY_VOCAB)
    ref.init_weights()
    toy, _, tracker, summary = toy_run(tmp_path, num_steps=1, total_batch_tokens=32, gpu={"peak_tflops_bf16": 2.0})
    assert isinstance(summary, dict), summary
    inputs = torch.cat([toy.batches[0]["inputs"], toy.batches[1]["inputs"]])
    targets = torch.cat([toy.batches[0]["targets"], toy.batches[1]["targets"]])
    loss = ref(inputs, targets)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]))
    [(step, metrics)] = [(s, m) for s, m in tracker.records if "train/loss" in m]
    assert step == 1 and toy.steps == 2
    assert metrics["train/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["train/grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    assert metrics["train/tok_per_s"] == 32 / 0.25
    assert metrics["train/mfu"] == ref.flops_per_token() * 32 / 0.25 / 2e12  # the same float operations
    assert metrics["train/lr_mult"] == 1.0 and metrics["toy/micro_steps"] == 2


def test_loop_evaluates_and_saves_on_schedule_and_sums_up_the_run(tmp_path):
    """5 steps, eval_every=2, checkpoint_every=2, 2 micro-batches a step: evaluations at steps 0, 2, 4
    and the end; checkpoints at 2 and 4 and the end, each meta.json holding the stage, run, tokenizer,
    data position (steps x micro-batches) and the resolved config; the summary's first/final metric and
    a checksum that is the plain sum of the final weights."""
    import json

    toy, ctx, tracker, summary = toy_run(tmp_path, num_steps=5, eval_every=2, checkpoint_every=2,
                                         total_batch_tokens=32)
    assert isinstance(summary, dict), summary
    vals = dict(tracker.values("val/loss"))
    assert list(vals) == [0, 2, 4, 5] and toy.evaluated == 4
    assert [s for s, _ in tracker.values("train/loss")] == [1, 2, 3, 4, 5]
    stage_dir = tmp_path / "toy" / "toy"
    assert sorted(p.name for p in stage_dir.iterdir()) == ["step_000002", "step_000004", "step_000005"]
    meta = json.loads((stage_dir / "step_000004" / "meta.json").read_text())
    assert (meta["step"], meta["stage"], meta["run_name"], meta["tokenizer"], meta["data_position"], meta["config"]) \
        == (4, "toy", "toy", "stub", 8, {"toy": True})
    assert type(meta["data_position"]) is int  # a batch index: 8, not 8.0
    assert summary["first"] == vals[0] and summary["final"] == vals[5] and summary["metrics"] == {"val/loss": vals[5]}
    assert summary["checkpoint"] == str(stage_dir / "step_000005") and summary["checkpoint_dir"] == str(stage_dir)
    assert summary["start_step"] == 0 and summary["monitor"] == "val/loss"
    checksum = sum(float(p.detach().double().sum()) for p in ctx.model.parameters())
    assert summary["param_checksum"] == pytest.approx(checksum, rel=1e-12, abs=1e-12)
    assert toy.starts == [(0, 0, 1)] and toy.initialised == []


def test_loop_resumes_at_the_latest_checkpoint_its_step_weights_and_data_position(tmp_path, caplog):
    """A run stopped after its step-2 checkpoint, resumed (from another initialisation): it starts at step 2
    at data position 2 steps x 2 micro-batches, with step 2's weights (its first evaluation equals the
    straight run's at step 2); the source checkpoint is not loaded then. resume=true with nothing saved
    starts from scratch and says so."""
    import logging
    import shutil

    _, _, straight, _ = toy_run(tmp_path / "a", num_steps=4, checkpoint_every=2, total_batch_tokens=32)
    shutil.rmtree(tmp_path / "a" / "toy" / "toy" / "step_000004")
    with caplog.at_level(logging.INFO, logger="hybridchat.training.loop"):
        toy, _, tracker, summary = toy_run(tmp_path / "a", resume=True, seed=1, source=tmp_path / "src",
                                           num_steps=4, checkpoint_every=2, total_batch_tokens=32)
    assert isinstance(summary, dict), summary
    assert toy.starts == [(4, 0, 1)] and summary["start_step"] == 2 and toy.initialised == []
    assert [s for s, _ in tracker.values("train/loss")] == [3, 4]
    assert tracker.values("val/loss")[0] == (2, dict(straight.values("val/loss"))[2])
    assert loop_messages(caplog, summary) == [f"resumed from {tmp_path / 'a' / 'toy' / 'toy' / 'step_000002'} at step 2"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hybridchat.training.loop"):  # resume=false: the checkpoints are ignored
        toy, _, _, summary = toy_run(tmp_path / "a", num_steps=1)
    assert toy.starts == [(0, 0, 1)] and summary["start_step"] == 0 and loop_messages(caplog, summary) == []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hybridchat.training.loop"):
        toy, _, _, summary = toy_run(tmp_path / "b", resume=True, num_steps=1)
    assert toy.starts == [(0, 0, 1)] and summary["start_step"] == 0
    assert loop_messages(caplog, summary) == [f"resume=true but {tmp_path / 'b' / 'toy' / 'toy'} holds no "
                                              f"checkpoint: starting from scratch"]


def test_loop_initialises_from_the_source_checkpoint_when_not_resuming(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="hybridchat.training.loop"):
        toy, ctx, _, summary = toy_run(tmp_path, source=tmp_path / "src" / "step_000009", num_steps=1)
    assert isinstance(summary, dict), summary
    assert toy.initialised == [(ctx.model, tmp_path / "src" / "step_000009")]
    assert loop_messages(caplog, summary) == [f"initialised from {tmp_path / 'src' / 'step_000009'}"]


def test_loop_applies_the_schedule_to_every_optimizer_group(tmp_path, monkeypatch):
    """Hand values: 4 steps, 2 of warmup, round(0.5 x 4) = 2 of warmdown to 0.2: each group's lr is
    its initial lr times 0.5, 1, 1, 0.6 during the steps."""
    from hybridchat.training import loop

    built, seen = [], []
    build = loop.build_optimizers
    monkeypatch.setattr(loop, "build_optimizers", lambda model, s: built.append(build(model, s)) or built[-1])

    def record(toy, model):
        seen.append({round(g["lr"] / g["initial_lr"], 9) for opt in built[0] for g in opt.param_groups})

    _, _, tracker, summary = toy_run(tmp_path, on_step=record, num_steps=4, warmup_steps=2, warmdown_ratio=0.5,
                                     final_lr_frac=0.2)
    assert isinstance(summary, dict), summary
    assert seen == [{0.5}, {1.0}, {1.0}, {0.6}]
    assert [v for _, v in tracker.values("train/lr_mult")] == pytest.approx([0.5, 1.0, 1.0, 0.6])


def test_loop_stops_on_a_non_finite_loss_naming_the_step(tmp_path):
    def poison(toy, model):
        if toy.steps == 2:
            with torch.no_grad():
                model.wte.weight.fill_(float("nan"))

    _, _, _, error = toy_run(tmp_path, on_step=poison, num_steps=4)
    assert isinstance(error, RuntimeError)
    assert str(error) == "training loss became nan at step 2; lower the learning rates"


def test_loop_refuses_a_validation_set_without_one_batch(tmp_path):
    def no_val(toy):
        toy.val = []

    _, _, _, error = toy_run(tmp_path, setup=no_val, num_steps=2)
    assert isinstance(error, UserError)
    assert str(error) == ("stage=toy: the validation split gives no batches (of text: less than one sequence of "
                          "model.sequence_len=8 tokens)")


def test_loop_saves_once_and_stops_at_the_step_a_stop_signal_arrives(tmp_path, caplog):
    """SIGUSR1 during step 2 (a real signal to this process): step 2 ends, its checkpoint is written once,
    Preempted names the signal and the step, a warning says where it saved and how to continue; no
    further step runs."""
    import logging
    import os
    import signal

    from hybridchat.infra.preemption import Preempted

    def signal_at_step_2(toy, model):
        if toy.steps == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    with caplog.at_level(logging.WARNING, logger="hybridchat.training.loop"):
        toy, _, tracker, error = toy_run(tmp_path, on_step=signal_at_step_2, num_steps=6, checkpoint_every=2)
    assert isinstance(error, Preempted) and (error.signum, error.step) == (signal.SIGUSR1, 2)
    assert caplog.messages == [f"stopped by SIGUSR1 after step 2: saved {tmp_path / 'toy' / 'toy' / 'step_000002'}; "
                               f"run the same command with resume=true to continue (launchers/slurm.sh passes it)"]
    assert toy.steps == 2 and [s for s, _ in tracker.values("train/loss")] == [1, 2]
    assert [p.name for p in (tmp_path / "toy" / "toy").iterdir()] == ["step_000002"]


def test_loop_runs_under_the_chosen_attention_backend(tmp_path, monkeypatch):
    """gpu.attention_backend=math enters SDPA's math-only context around training; auto enters none."""
    from contextlib import contextmanager

    from torch.nn.attention import SDPBackend

    from hybridchat.training import loop
    from hybridchat.infra.config import AttentionBackend

    entered = []

    @contextmanager
    def recording_kernel(backend):
        entered.append(backend)
        yield

    monkeypatch.setattr(loop, "sdpa_kernel", recording_kernel)
    _, _, _, summary = toy_run(tmp_path / "m", num_steps=1, gpu={"attention_backend": AttentionBackend.math})
    assert isinstance(summary, dict) and entered == [SDPBackend.MATH]
    _, _, _, summary = toy_run(tmp_path / "a", num_steps=1)
    assert isinstance(summary, dict) and entered == [SDPBackend.MATH]


# ---- engine.py ----------------------------------------------------------------------------------

def small_lm(pattern="AM", seed=0):
    """2 layers, float64, every weight perturbed (zero-initialised projections would make blocks identities)."""
    torch.manual_seed(seed)
    model = HybridLM(dataclasses.replace(TOY_MODEL, block_pattern=pattern, sequence_len=64), vocab_size=TOY_VOCAB)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.double().eval()


def test_sampling_follows_softmax_of_logits_over_temperature():
    """Frequencies of 20000 draws (one row each) against softmax(logits / T) computed by hand:
    T = 0.5 squares the probabilities, T = 2 takes their square root (mutant: logits * T)."""
    from hybridchat.model.engine import sample

    p = [0.5, 0.3, 0.15, 0.05]
    logits = torch.log(torch.tensor([p])).expand(20000, -1)
    gen = torch.Generator().manual_seed(0)
    for temperature, power in ((0.5, 2.0), (2.0, 0.5)):
        draws = sample(logits, temperature=temperature, generator=gen)
        expected = [q ** power / sum(r ** power for r in p) for q in p]
        freq = torch.bincount(draws, minlength=4).double() / len(draws)
        assert freq.tolist() == pytest.approx(expected, abs=0.015), temperature


def test_top_p_keeps_the_tokens_before_the_mass_is_reached():
    """Probabilities 1/2, 1/4, 1/8, 1/8 (exact in binary): top_p = 0.75 keeps the first two (the
    first two already reach 0.75, so the third is dropped: >=, not >); top_p = 1 keeps all four."""
    from hybridchat.model.engine import sample

    logits = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]])).expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, top_p=0.75, generator=gen).tolist()) == {1, 3}
    assert set(sample(logits, top_p=1.0, generator=gen).tolist()) == {0, 1, 2, 3}
    assert set(sample(logits, top_k=4, generator=gen).tolist()) == {0, 1, 2, 3}


def test_generation_result_counts_and_rate():
    from hybridchat.model.engine import GenerationResult

    assert GenerationResult([[1]], ["stop"], generated_tokens=12, decode_seconds=4.0).tokens_per_second == 3.0
    assert GenerationResult([[1]], ["stop"], generated_tokens=12).tokens_per_second == 0.0


def test_prompts_are_grouped_by_length_spread_and_batch_size():
    """Hand grouping of lengths [5, 1, 2, 9, 3, 4] with spread 2 and at most 2 per batch: in length
    order, a prompt opens a new group when it is more than 2 longer than the group's first or the
    group is full."""
    from hybridchat.model.engine import Engine

    engine = Engine(None, max_length_spread=2, max_batch_size=2)
    assert engine._groups([5, 1, 2, 9, 3, 4]) == [[1, 2], [4, 5], [0], [3]]
    assert Engine(None, max_length_spread=2)._groups([5, 1, 2, 9, 3, 4]) == [[1, 2, 4], [5, 0], [3]]
    assert Engine(None, max_length_spread=0)._groups([3, 3, 4]) == [[0, 1], [2]]


def test_engine_reports_prompt_tokens_cache_size_and_times_and_restores_training_mode(monkeypatch):
    """Counts by hand: prompt tokens, the largest cache (a group's rows x samples, room for the longest
    prompt + new tokens + extra_len), seconds from a fake clock that ticks 1 per reading (prefill and
    decode once per group); the model's training flag is put back."""
    import types

    from hybridchat.model import engine as engine_module
    from hybridchat.model.engine import Engine

    ticks = iter(range(1000))
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    model = small_lm()
    model.train()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
    res = Engine(model, max_length_spread=0).generate(prompts, 4, temperature=0, num_samples=2, extra_len=3)
    assert model.training
    assert res.prompt_tokens == 12 and res.generated_tokens == 3 * 2 * 4
    assert res.prefill_seconds == 3.0 and res.decode_seconds == 3.0  # three groups
    biggest = model.allocate_cache(1, 8 + 4 + 3).nbytes() * 2
    assert res.cache_bytes == biggest


def test_generation_without_a_seed_differs_between_calls_and_with_one_repeats():
    from hybridchat.model.engine import Engine

    model = small_lm()
    engine = Engine(model)
    runs = [engine.generate([[1, 2]], 24, temperature=1.0).tokens for _ in range(2)]
    assert runs[0] != runs[1]
    assert engine.generate([[1, 2]], 24, seed=5).tokens == engine.generate([[1, 2]], 24, seed=5).tokens


def test_no_prompts_is_an_error_and_a_full_cache_ends_a_row_with_length():
    """A hook that injects more tokens than extra_len left room for: the row stops when the attention
    cache is full, finish reason "length", having sampled fewer than max_new_tokens."""
    from hybridchat.model.engine import Engine

    with pytest.raises(ValueError, match="at least one token"):
        Engine(small_lm()).generate([], 3)
    model = small_lm("AA")
    res = Engine(model).generate([[1, 2, 3]], 6, temperature=0, extra_len=2,
                                 query_hook=lambda seq, out: [7, 7, 7, 7] if len(out) == 1 else None)
    assert res.finish_reasons == ["length"]
    assert res.tokens[0][1:5] == [7, 7, 7, 7] and res.generated_tokens < 6


def test_generation_under_autocast_keeps_the_cache_in_the_autocast_dtype():
    from hybridchat.model.engine import Engine

    model = small_lm().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = Engine(model).generate([[1, 2, 3]], 2, temperature=0)
    assert res.cache_bytes == model.allocate_cache(1, 5, dtype=torch.bfloat16).nbytes()


def test_weights_file_with_missing_or_extra_tensors_is_refused_naming_them(step_folder, tmp_path):
    """A model.safetensors that lacks tensors, or holds ones the model has not, is one UserError naming
    the first five keys (mutants: `or` -> `and`, which lets either through alone; strict loading; six
    named)."""
    from safetensors.torch import load_file, save_file

    from hybridchat.infra import checkpoint

    weights = load_file(str(step_folder / "model.safetensors"))
    lacking = edited_copy(step_folder, tmp_path / "lacking")
    save_file({k: v for k, v in weights.items() if not k.startswith("blocks.1.")}, str(lacking / "model.safetensors"))
    with pytest.raises(UserError) as e:
        checkpoint.load(lacking, HybridLM(CKPT_MODEL, vocab_size=300))
    first_five = ["dt_bias", "A_log", "D", "in_proj.weight", "conv1d.weight"]  # of 10, in registration order
    assert str(e.value) == (f"checkpoint {lacking}/model.safetensors does not match the model: missing "
                            f"{['blocks.1.mixer.' + name for name in first_five]}, unexpected []")
    extra = edited_copy(step_folder, tmp_path / "extra")
    save_file({**weights, **{f"extra{i}": torch.zeros(2) for i in range(7)}}, str(extra / "model.safetensors"))
    with pytest.raises(UserError) as e:
        checkpoint.load(extra, HybridLM(CKPT_MODEL, vocab_size=300))
    assert str(e.value) == (f"checkpoint {extra}/model.safetensors does not match the model: missing [], "
                            f"unexpected {[f'extra{i}' for i in range(5)]}")


def test_architecture_mismatch_lists_every_difference_and_no_architecture_fits_nothing(step_folder, tmp_path):
    """Each differing setting is named with both values, joined by '; '; a meta.json without any
    architecture matches no model (mutants: the join string, `meta.get("architecture", None)`)."""
    from hybridchat.infra import checkpoint

    other = HybridLM(dataclasses.replace(CKPT_MODEL, mlp_ratio=2, qk_norm=False), vocab_size=300)
    with pytest.raises(UserError) as e:
        checkpoint.load(step_folder, other)
    assert str(e.value) == (f"checkpoint {step_folder} does not fit this model (mlp_ratio: checkpoint 1 vs config 2; "
                            f"qk_norm: checkpoint True vs config False); choose the matching model/block_pattern or "
                            f"another run_name")

    def no_architecture(meta):
        del meta["architecture"]

    bare = edited_copy(step_folder, tmp_path / "bare", no_architecture)
    with pytest.raises(UserError, match=r"does not fit this model \(block_pattern: checkpoint None vs config 'AM'; "
                                        r"vocab_size: checkpoint None vs config 300; n_layer"):
        checkpoint.load(bare, HybridLM(CKPT_MODEL, vocab_size=300))


def tiny_save(directory, step, keep, meta=None):
    from hybridchat.infra import checkpoint

    model = HybridLM(dataclasses.replace(TOY_MODEL, block_pattern="A"), vocab_size=TOY_VOCAB)
    return checkpoint.save(directory, step, model, [], meta or {}, keep=keep, tokenizer=StubTokenizer())


def test_save_prunes_only_with_a_positive_keep_and_skips_what_it_cannot_delete(tmp_path):
    """keep <= 0 keeps every checkpoint; keep = 1 removes the older ones, and one it cannot remove (a
    symlinked step folder: rmtree refuses links) is left without failing the save (mutants: the keep
    test dropped, rmtree errors raised)."""
    from hybridchat.infra import checkpoint

    for step, keep in ((1, 0), (2, -1), (3, 0)):
        tiny_save(tmp_path / "all", step, keep)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "all")] == ["step_000001", "step_000002",
                                                                               "step_000003"]
    elsewhere = tiny_save(tmp_path / "elsewhere", 1, 1)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "step_000001").symlink_to(elsewhere, target_is_directory=True)
    tiny_save(tmp_path / "linked", 2, 1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "linked")] == ["step_000001", "step_000002"]
    assert (tmp_path / "linked" / "step_000001").is_symlink() and (elsewhere / "meta.json").is_file()


def test_meta_json_writes_values_json_cannot_hold_as_strings(tmp_path):
    """meta.json holds str() of what JSON has no type for (a path, a date) instead of failing the save."""
    import datetime
    from pathlib import Path

    from hybridchat.infra import checkpoint

    when = datetime.date(2026, 11, 28)
    path = tiny_save(tmp_path, 1, 1, {"source": Path("/runs/a/step_000003"), "when": when})
    meta = checkpoint.read_meta(path)
    assert (meta["source"], meta["when"], meta["format_version"], meta["step"]) == \
        ("/runs/a/step_000003", "2026-11-28", 1, 1)


def test_architecture_names_a_mixers_settings_only_where_the_pattern_has_it(step_folder):
    """Hand lists of the keys; and a Mamba setting that differs (d_state) is refused by name before any
    tensor is copied (mutants: the Mamba keys left out, or listed only for models without Mamba)."""
    from hybridchat.infra import checkpoint

    common = ["block_pattern", "vocab_size", "n_layer", "n_embd", "mlp_ratio", "mlp", "mlp_hidden", "norm_weights",
              "norm_eps", "embed_norm", "tie_embeddings", "pointer", "request_match"]
    attention = ["n_head", "n_kv_head", "attn_rope", "rope_base", "qk_norm"]
    mamba = ["mamba_mlp", "d_state", "d_conv", "expand", "headdim", "ngroups"]
    for pattern, keys in (("A", common + attention), ("M", common + mamba), ("AM", common + attention + mamba)):
        model = HybridLM(dataclasses.replace(CKPT_MODEL, block_pattern=pattern), vocab_size=300)
        assert list(model.architecture()) == keys, pattern
    # The pointer's width is n_embd / n_head: a pure Mamba model with a pointer names n_head too.
    pointed = HybridLM(dataclasses.replace(CKPT_MODEL, block_pattern="M", pointer=True), vocab_size=300)
    assert list(pointed.architecture()) == common + ["n_head"] + mamba
    with pytest.raises(UserError, match=r"does not fit this model \(d_state: checkpoint 8 vs config 16\)"):
        checkpoint.load(step_folder, HybridLM(dataclasses.replace(CKPT_MODEL, d_state=16), vocab_size=300))


def test_loop_saves_milestones_off_the_checkpoint_grid_and_never_prunes_them(tmp_path):
    """A stage's milestone steps are saved although checkpoint_every does not fall on them and survive
    keep_checkpoints=1; the final step is saved once."""
    def milestones(toy):
        toy.milestones = frozenset({1, 3})

    _, _, _, summary = toy_run(tmp_path, setup=milestones, num_steps=6, checkpoint_every=4, keep_checkpoints=1)
    assert isinstance(summary, dict), summary
    assert sorted(p.name for p in (tmp_path / "toy" / "toy").iterdir()) == ["step_000001", "step_000003",
                                                                             "step_000006"]


def test_save_never_prunes_protected_steps(tmp_path):
    from hybridchat.infra import checkpoint

    for step in range(1, 6):
        checkpoint_path = tiny_save(tmp_path, step, 2)
        assert checkpoint_path.name == f"step_{step:06d}"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]
    model = HybridLM(dataclasses.replace(TOY_MODEL, block_pattern="A"), vocab_size=TOY_VOCAB)
    for step in range(6, 10):
        checkpoint.save(tmp_path, step, model, [], {}, keep=1, tokenizer=StubTokenizer(), protect={4, 7})
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000004", "step_000007", "step_000009"]


def test_loop_refuses_to_resume_a_checkpoint_of_another_tokenizer(tmp_path):
    """The run's tokenizer differs from the one the checkpoint was trained with: resuming is one UserError
    (mutant: the fingerprint not passed to checkpoint.load)."""
    toy_run(tmp_path, num_steps=2, checkpoint_every=1)

    def other_tokenizer(toy):
        toy.ctx.tokenizer = type("Other", (StubTokenizer,), {"fingerprint": "other"})()

    _, _, _, error = toy_run(tmp_path, setup=other_tokenizer, resume=True, num_steps=4)
    assert isinstance(error, UserError)
    assert "was trained with tokenizer stub, this run built other" in str(error)


def test_loop_progress_bar_counts_the_stages_steps_only_when_asked(tmp_path, capsys, monkeypatch):
    """progress=true: a bar named after the stage on stderr, ending at num_steps of num_steps, showing the
    last loss and tokens/s, also for a resumed run that starts at its checkpoint's step; progress=false:
    no bar (mutants: desc, initial, total or postfix dropped, the disable condition inverted or loosened)."""
    import tqdm

    # No monitor thread: a process that forks afterwards (mutmut's workers) could inherit its lock held.
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)
    _, _, tracker, _ = toy_run(tmp_path, num_steps=4, checkpoint_every=2, progress=True)
    err = capsys.readouterr().err
    assert "toy: 100%" in err and "4/4" in err
    last_loss = tracker.values("train/loss")[-1][1]
    assert re.search(rf"loss={last_loss:.3f}, tok_s=[0-9][0-9,]*\]", err)  # the step's loss and tokens/s
    toy_run(tmp_path / "quiet", num_steps=4, checkpoint_every=2)
    assert "toy" not in capsys.readouterr().err
    (tmp_path / "toy" / "toy" / "step_000004").rename(tmp_path / "moved")
    toy_run(tmp_path, num_steps=4, checkpoint_every=2, resume=True, progress=True)
    err = capsys.readouterr().err
    assert "toy:  50%" in err and "2/4" in err and "4/4" in err and "0/4" not in err


def test_loop_leaves_parameters_outside_a_steps_loss_untouched(tmp_path):
    """Step 2's loss involves the embedding alone: every other parameter keeps step 1's value (their
    gradients are None, so AdamW and Muon skip them; zeroed gradients would still move them with the
    momentum of step 1)."""
    before = {}

    def embedding_only_at_step_2(toy, model):
        if toy.steps == 2:
            before.update({n: p.detach().clone() for n, p in model.named_parameters()})
            return (model.wte.weight ** 2).mean()
        return None

    _, ctx, _, summary = toy_run(tmp_path, on_step=embedding_only_at_step_2, num_steps=2)
    assert isinstance(summary, dict), summary
    after = dict(ctx.model.named_parameters())
    assert not torch.equal(after["wte.weight"], before["wte.weight"])
    assert [n for n in before if n != "wte.weight" and not torch.equal(after[n], before[n])] == []


def test_loop_summary_of_a_resumed_run_without_an_evaluation_before_the_end(tmp_path):
    """Resumed at step 3 of 4 with eval_every=2: no evaluation falls inside the steps run, so the first
    value of the monitored metric is the final one, both that of the final evaluation."""
    import shutil

    toy_run(tmp_path, num_steps=4, checkpoint_every=3)
    shutil.rmtree(tmp_path / "toy" / "toy" / "step_000004")
    toy, _, tracker, summary = toy_run(tmp_path, resume=True, num_steps=4, checkpoint_every=3)
    assert isinstance(summary, dict), summary
    assert summary["start_step"] == 3 and tracker.values("val/loss") == [(4, summary["final"])]
    assert summary["first"] == summary["final"] == summary["metrics"]["val/loss"] and toy.evaluated == 1
