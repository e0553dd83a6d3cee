"""Knowledge base command line: python -m hybridchat.kb {build,add,delete,search,stats,eval} ...

    python -m hybridchat.kb build docs.jsonl notes/ --kb kb/ --retrievers bm25,dense
    python -m hybridchat.kb add more.jsonl --kb kb/ [--replace]
    python -m hybridchat.kb delete doc-17 doc-18 --kb kb/
    python -m hybridchat.kb search "who founded Acme?" --kb kb/ -k 5 [--retriever bm25] [--filter lang=en]
    python -m hybridchat.kb stats --kb kb/
    python -m hybridchat.kb eval --questions q.jsonl --kb kb/

Without --kb, search/stats/eval use the synthetic world's knowledge base (built on first use
under --cache-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hybridchat.core.errors import UserError, run_or_exit

DEFAULT_CACHE = "outputs/cache"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error:` line (exit 2) like every other mistake."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m hybridchat.kb", description="Build, change, search and "
                                "evaluate knowledge bases.")
    sub = p.add_subparsers(dest="command", required=True)

    def kb_arg(sp, required: bool) -> None:
        sp.add_argument("--kb", required=required, help="knowledge base directory"
                        + ("" if required else " (default: the synthetic world's, under --cache-dir)"))
        if not required:
            sp.add_argument("--cache-dir", default=DEFAULT_CACHE)

    def input_args(sp) -> None:
        sp.add_argument("inputs", nargs="+", help=".jsonl files, .txt/.md files or folders of them")
        sp.add_argument("--skip-bad", action="store_true", help="skip (and report) bad records instead of failing")

    def query_args(sp) -> None:
        sp.add_argument("--retriever", choices=["simple", "bm25", "dense", "hybrid"],
                        help="default: hybrid if the knowledge base has bm25 and dense, else the one it has")
        sp.add_argument("--backend", choices=["bm25s", "rank_bm25"], default="bm25s")
        sp.add_argument("--fusion", choices=["rrf", "weighted"], default="rrf")
        sp.add_argument("--nprobe", type=int, default=16)

    b = sub.add_parser("build", help="create (or replace) a knowledge base from files")
    input_args(b)
    kb_arg(b, required=True)
    b.add_argument("--retrievers", default="bm25,dense", help="indexes to build: any of simple,bm25,dense")
    b.add_argument("--model", default="all-MiniLM-L6-v2", help="sentence-transformers name or local path")
    b.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivf"])
    b.add_argument("--chunk-size", type=int, default=0, help="split documents longer than this (0: never)")
    b.add_argument("--chunk-overlap", type=int, default=0)
    b.add_argument("--chunk-unit", default="words", choices=["words", "tokens"])
    b.add_argument("--batch-size", type=int, default=64, help="texts per encoder batch")
    b.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                   help="encoder precision (bfloat16: ~2.7x faster on CPUs with AVX512-BF16/AMX)")

    a = sub.add_parser("add", help="add documents (or, with --replace, update those whose id exists)")
    input_args(a)
    kb_arg(a, required=True)
    a.add_argument("--replace", action="store_true")

    d = sub.add_parser("delete", help="delete documents (all their chunks) by id")
    d.add_argument("ids", nargs="+")
    kb_arg(d, required=True)

    s = sub.add_parser("search", help="print the top hits for a query")
    s.add_argument("query")
    s.add_argument("-k", "--top-k", type=int, default=5)
    s.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="only documents whose metadata KEY equals VALUE (repeatable)")
    kb_arg(s, required=False)
    query_args(s)

    st = sub.add_parser("stats", help="print the manifest summary")
    kb_arg(st, required=False)

    e = sub.add_parser("eval", help="recall@1/3/10 and MRR against gold document ids")
    e.add_argument("--questions", required=True, help="JSONL with question, answers, gold_doc_ids")
    e.add_argument("--json", help="also write the report to this file")
    kb_arg(e, required=False)
    query_args(e)
    return p


def _read_inputs(args):
    from hybridchat.retrieval.ingest import read_documents

    docs, report = read_documents(args.inputs, skip_bad=args.skip_bad)
    print(report.summary(), file=sys.stderr)
    for line in report.skipped[:20]:
        print(f"  skipped {line}", file=sys.stderr)
    if len(report.skipped) > 20:
        print(f"  ... and {len(report.skipped) - 20} more", file=sys.stderr)
    return docs


def _retriever_config(args, kb):
    from hybridchat.retrieval.config import Bm25Config, DenseConfig, FusionConfig, RetrieverConfig

    kind = args.retriever
    if kind is None:
        have = set(kb.indexes) if kb is not None else {"bm25", "dense"}
        kind = "hybrid" if {"bm25", "dense"} <= have else next(k for k in ("dense", "bm25", "simple") if k in have)
    return RetrieverConfig(kind=kind, kb_dir=args.kb, bm25=Bm25Config(backend=args.backend),
                           dense=DenseConfig(nprobe=args.nprobe), fusion=FusionConfig(method=args.fusion))


def _open(args, for_query: bool = True):
    """(knowledge base, retriever config or None) for search/eval/stats."""
    from hybridchat.retrieval.config import RetrieverConfig
    from hybridchat.retrieval.factory import open_knowledge_base
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

    if args.kb is not None:
        kb = KnowledgeBase.open(args.kb)
    else:  # the (default) world's knowledge base, with the indexes the query needs (bm25 for stats)
        from hybridchat.infra.context import world_collection
        from hybridchat.data.world import WorldConfig

        kb = open_knowledge_base(_retriever_config(args, None) if for_query else RetrieverConfig(kind="bm25"),
                                 args.cache_dir, world_collection(WorldConfig()))
    return kb, (_retriever_config(args, kb) if for_query else None)


def _parse_filters(items: list[str]) -> dict[str, str]:
    filters = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--filter {item!r}: expected KEY=VALUE")
        filters[key] = value
    return filters


def _check_counts(args) -> None:
    """Options that count something must be >= 1 (argparse only checks that they are integers)."""
    for option, attr in (("-k/--top-k", "top_k"), ("--nprobe", "nprobe"), ("--batch-size", "batch_size")):
        value = getattr(args, attr, None)
        if value is not None and value < 1:
            raise UserError(f"{option} {value}: must be >= 1")


def run(args) -> None:
    from hybridchat.retrieval.config import ChunkingConfig, DenseConfig, RetrieverConfig
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

    _check_counts(args)
    if args.command == "build":
        indexes = [r.strip() for r in args.retrievers.split(",") if r.strip()]
        cfg = RetrieverConfig(chunking=ChunkingConfig(args.chunk_unit, args.chunk_size, args.chunk_overlap),
                              dense=DenseConfig(model=args.model, index=args.index, batch_size=args.batch_size,
                                                precision=args.precision))
        kb = KnowledgeBase.build(args.kb, _read_inputs(args), indexes, cfg)
        print(f"built {kb.path}: {kb.manifest['num_documents']} documents, {kb.manifest['num_chunks']} chunks, "
              f"indexes {', '.join(kb.indexes)}")
    elif args.command == "add":
        kb = KnowledgeBase.open(args.kb).add(_read_inputs(args), replace=args.replace)
        print(f"{kb.path}: now {kb.manifest['num_documents']} documents, {kb.manifest['num_chunks']} chunks")
    elif args.command == "delete":
        kb = KnowledgeBase.open(args.kb).delete(args.ids)
        print(f"{kb.path}: deleted {len(args.ids)}; now {kb.manifest['num_documents']} documents")
    elif args.command == "stats":
        kb, _ = _open(args, for_query=False)
        print(json.dumps(kb.stats(), indent=2))
    elif args.command == "search":
        kb, cfg = _open(args)
        hits = kb.retriever(cfg).search([args.query], args.top_k, filters=_parse_filters(args.filter))[0]
        if not hits:
            print("no results")
        for h in hits:
            snippet = " ".join(h.document.text.split())
            print(f"{h.rank:>2}. {h.document.title or '(untitled)'}  [{h.document.id}]  score={h.score:.4f}\n"
                  f"    {snippet[:160]}{'...' if len(snippet) > 160 else ''}")
    elif args.command == "eval":
        from hybridchat.core.questions import read_questions
        from hybridchat.retrieval.evaluate import evaluate

        questions = read_questions(args.questions)
        kb, cfg = _open(args)
        report = {"retriever": cfg.kind, "kb": str(kb.path), **evaluate(kb.retriever(cfg), questions)}
        for key, value in report.items():
            print(f"{key:>20}  {value:.4f}" if isinstance(value, float) else f"{key:>20}  {value}")
        if args.json:
            from hybridchat.core.fsutil import atomic_write_json

            atomic_write_json(args.json, report)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_or_exit(run, args)
    except KeyboardInterrupt:
        print("interrupted; the knowledge base on disk is unchanged", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
