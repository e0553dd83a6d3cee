"""A knowledge base and its retriever from a RetrieverConfig: what the training stages (through the
run context, hybridchat.infra.context), chat and evaluation (through the run loader,
hybridchat.training.runs) and the retrieval benchmark call to get one."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from hybridchat.core.documents import Document
from hybridchat.retrieval.base import RankedRetriever
from hybridchat.retrieval.config import RetrieverConfig
from hybridchat.retrieval.knowledge_base import KnowledgeBase, needed_indexes

# (name, documents): the collection a run searches when retriever.kb_dir is not set. The caller
# (hybridchat.infra.context) supplies the synthetic world's; retrieval never imports the data package.
DefaultCollection = tuple[str, Callable[[], Sequence[Document]]]


def open_knowledge_base(cfg: RetrieverConfig, cache_dir: str | Path, default: DefaultCollection | None = None,
                        progress: bool = True) -> KnowledgeBase:
    """cfg.kb_dir if given (adding only indexes it lacks), else the default collection's knowledge
    base under cache_dir/kb/<name>, built on first use and rebuilt when its documents or cfg's
    index settings change."""
    if cfg.kb_dir is not None:
        return KnowledgeBase.ensure(cfg.kb_dir, cfg, progress=progress)
    if default is None:
        raise ValueError("retriever.kb_dir is not set and there is no default collection")
    name, documents = default
    return KnowledgeBase.ensure(Path(cache_dir) / "kb" / name, cfg, documents=documents(), progress=progress)


def build_retriever(cfg: RetrieverConfig, cache_dir: str | Path, default: DefaultCollection | None = None,
                    progress: bool = True) -> RankedRetriever | None:
    """The retriever cfg.kind over its knowledge base; None for kind "none"."""
    needed_indexes(cfg)  # validates kind and backend before any work
    if cfg.kind == "none":
        return None
    return open_knowledge_base(cfg, cache_dir, default, progress).retriever(cfg)
