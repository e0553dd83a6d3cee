"""Knowledge base command line: python -m hybridchat.kb COMMAND [key=value ...], COMMAND one of
build, add, delete, search, stats, eval, then Hydra overrides of conf/kb.yaml (the retriever and
paths groups are training's, evaluate's and chat's):

    python -m hybridchat.kb build inputs=[docs.jsonl,notes/] retriever.kb_dir=kb/ indexes=[bm25,dense]
    python -m hybridchat.kb add inputs=[more.jsonl] retriever.kb_dir=kb/ [replace=true]
    python -m hybridchat.kb delete ids=[doc-17,doc-18] retriever.kb_dir=kb/
    python -m hybridchat.kb search "query=who founded Acme?" retriever.kb_dir=kb/ retriever.top_k=5 \
        [retriever=bm25] [filter={lang:en}]
    python -m hybridchat.kb stats retriever.kb_dir=kb/
    python -m hybridchat.kb eval questions=q.jsonl retriever.kb_dir=kb/

Without retriever.kb_dir, search/stats/eval use the synthetic world's knowledge base (built on first
use under paths.cache).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any, List, Optional

from hybridchat.core.errors import UserError
from hybridchat.infra import commands
from hybridchat.infra.config import PathsConfig
from hybridchat.retrieval.config import RetrieverConfig

COMMANDS = ("build", "add", "delete", "search", "stats", "eval")


@dataclass
class KbConfig:
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    inputs: List[str] = field(default_factory=list)   # build, add: .jsonl files, .txt/.md files or folders of them
    skip_bad: bool = False             # build, add: skip (and report) bad records instead of failing
    indexes: List[str] = field(default_factory=lambda: ["bm25", "dense"])   # build: any of simple, bm25, dense
    replace: bool = False              # add: update documents whose id exists
    ids: List[str] = field(default_factory=list)      # delete: document ids
    query: Optional[str] = None        # search
    # search: only documents whose metadata matches, e.g. filter={lang:en}. Any: a typed dict node would
    # take no new keys without a +
    filter: Any = None
    questions: Optional[str] = None    # eval: JSONL with question, answers, gold_doc_ids
    json: Optional[str] = None         # eval: also write the report to this file


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="kb_schema", node=KbConfig)


def compose(overrides: list[str]) -> KbConfig:
    """conf/kb.yaml with the command line's overrides, checked against KbConfig."""
    return commands.compose("kb", "kb_schema", KbConfig, overrides)


def _filters(cfg: KbConfig) -> dict[str, str]:
    if cfg.filter is None:
        return {}
    if not isinstance(cfg.filter, dict):
        raise UserError(f"filter={cfg.filter!r}: expected {{key:value,...}}, e.g. filter={{lang:en}}")
    return {str(k): str(v) for k, v in cfg.filter.items()}


def _required(cfg: KbConfig, command: str, key: str) -> None:
    value = cfg.retriever.kb_dir if key == "retriever.kb_dir" else getattr(cfg, key)
    if value is None or value == []:
        raise UserError(f"{command} needs {key}=... (see python -m hybridchat.kb --help)")


def _read_inputs(cfg: KbConfig):
    from hybridchat.retrieval.ingest import read_documents

    docs, report = read_documents(cfg.inputs, skip_bad=cfg.skip_bad)
    print(report.summary(), file=sys.stderr)
    for line in report.skipped[:20]:
        print(f"  skipped {line}", file=sys.stderr)
    if len(report.skipped) > 20:
        print(f"  ... and {len(report.skipped) - 20} more", file=sys.stderr)
    return docs


def _query_settings(cfg: KbConfig, indexes) -> RetrieverConfig:
    """cfg.retriever, its kind chosen from the knowledge base's indexes when none is given."""
    from hybridchat.retrieval.knowledge_base import kind_for

    return replace(cfg.retriever, kind=kind_for(indexes) if cfg.retriever.kind == "none" else cfg.retriever.kind)


def _open(cfg: KbConfig, for_query: bool = True):
    """(knowledge base, retriever settings or None) for search/eval/stats."""
    from hybridchat.retrieval.factory import open_knowledge_base
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

    if cfg.retriever.kb_dir is not None:
        kb = KnowledgeBase.open(cfg.retriever.kb_dir)
    else:  # the (default) world's knowledge base, with the indexes the query needs (bm25 for stats)
        from hybridchat.data.world import WorldConfig
        from hybridchat.infra.context import world_collection

        settings = _query_settings(cfg, {"bm25", "dense"}) if for_query else replace(cfg.retriever, kind="bm25")
        kb = open_knowledge_base(settings, cfg.paths.cache, world_collection(WorldConfig()))
    return kb, (_query_settings(cfg, kb.indexes) if for_query else None)


def _check_counts(cfg: KbConfig) -> None:
    """Settings that count something must be >= 1 (the schema only checks that they are integers)."""
    for key, value in (("retriever.top_k", cfg.retriever.top_k), ("retriever.dense.nprobe", cfg.retriever.dense.nprobe),
                       ("retriever.dense.batch_size", cfg.retriever.dense.batch_size)):
        if value < 1:
            raise UserError(f"{key}={value}: must be >= 1")


def run(command: str, cfg: KbConfig) -> None:
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

    _check_counts(cfg)
    required = {"build": ("inputs", "retriever.kb_dir"), "add": ("inputs", "retriever.kb_dir"),
                "delete": ("ids", "retriever.kb_dir"), "search": ("query",), "eval": ("questions",)}
    for key in required.get(command, ()):
        _required(cfg, command, key)
    if command == "build":
        kb = KnowledgeBase.build(cfg.retriever.kb_dir, _read_inputs(cfg), cfg.indexes, cfg.retriever)
        print(f"built {kb.path}: {kb.manifest['num_documents']} documents, {kb.manifest['num_chunks']} chunks, "
              f"indexes {', '.join(kb.indexes)}")
    elif command == "add":
        kb = KnowledgeBase.open(cfg.retriever.kb_dir).add(_read_inputs(cfg), replace=cfg.replace)
        print(f"{kb.path}: now {kb.manifest['num_documents']} documents, {kb.manifest['num_chunks']} chunks")
    elif command == "delete":
        kb = KnowledgeBase.open(cfg.retriever.kb_dir).delete(cfg.ids)
        print(f"{kb.path}: deleted {len(cfg.ids)}; now {kb.manifest['num_documents']} documents")
    elif command == "stats":
        kb, _ = _open(cfg, for_query=False)
        print(json.dumps(kb.stats(), indent=2))
    elif command == "search":
        kb, settings = _open(cfg)
        hits = kb.retriever(settings).search([cfg.query], settings.top_k, filters=_filters(cfg))[0]
        if not hits:
            print("no results")
        for h in hits:
            snippet = " ".join(h.document.text.split())
            print(f"{h.rank:>2}. {h.document.title or '(untitled)'}  [{h.document.id}]  score={h.score:.4f}\n"
                  f"    {snippet[:160]}{'...' if len(snippet) > 160 else ''}")
    elif command == "eval":
        from hybridchat.core.questions import read_questions
        from hybridchat.retrieval.evaluate import evaluate

        questions = read_questions(cfg.questions)
        kb, settings = _open(cfg)
        report = {"retriever": settings.kind, "kb": str(kb.path), **evaluate(kb.retriever(settings), questions)}
        for key, value in report.items():
            print(f"{key:>20}  {value:.4f}" if isinstance(value, float) else f"{key:>20}  {value}")
        if cfg.json:
            from hybridchat.core.fsutil import atomic_write_json

            atomic_write_json(cfg.json, report)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    commands.main("hybridchat.kb", __doc__, COMMANDS, lambda command, overrides: run(command, compose(overrides)),
                  "the knowledge base on disk is unchanged", argv)


if __name__ == "__main__":
    main()
