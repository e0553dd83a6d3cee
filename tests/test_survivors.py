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

import math

import numpy as np
import pytest
import torch

from hybridchat.config import ModelConfig
from hybridchat.errors import UserError
from hybridchat.model.cache import InferenceCache
from hybridchat.model.lm import HybridLM
from hybridchat.model.mamba import Mamba2
from hybridchat.retrieval.base import MISSING, RankedRetriever
from hybridchat.retrieval.config import DenseConfig, FusionConfig, RetrieverConfig
from hybridchat.retrieval.fusion import HybridRetriever

try:  # Document moved from hybridchat.retrieval.documents to hybridchat.documents
    from hybridchat.documents import Document
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
    from hybridchat.config import LoggerConfig
    from hybridchat.tracking import Tracker

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
    from hybridchat.errors import UserError as Error

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
