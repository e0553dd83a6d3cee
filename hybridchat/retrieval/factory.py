"""build_retriever: what training stages, chat and evaluation call to get a retriever."""

from __future__ import annotations

from pathlib import Path

from hybridchat.retrieval.base import RankedRetriever
from hybridchat.retrieval.config import RetrieverConfig
from hybridchat.retrieval.documents import Document
from hybridchat.retrieval.knowledge_base import KnowledgeBase, needed_indexes


def world_documents(seed: int) -> list[Document]:
    from hybridchat.data.world import World, WorldConfig

    return World.generate(WorldConfig(seed=seed)).documents()


def world_kb_dir(cache_dir: str | Path, seed: int) -> Path:
    return Path(cache_dir) / "kb" / f"world-seed{seed}"


def open_knowledge_base(cfg: RetrieverConfig, cache_dir: str | Path, progress: bool = True) -> KnowledgeBase:
    """cfg.kb_dir if given (adding only indexes it lacks), else the synthetic world's knowledge
    base under cache_dir, built on first use and rebuilt when the world or cfg's index settings change."""
    if cfg.kb_dir is not None:
        return KnowledgeBase.ensure(cfg.kb_dir, cfg, progress=progress)
    return KnowledgeBase.ensure(world_kb_dir(cache_dir, cfg.world_seed), cfg,
                                documents=world_documents(cfg.world_seed), progress=progress)


def build_retriever(cfg: RetrieverConfig, cache_dir: str | Path, progress: bool = True) -> RankedRetriever | None:
    """The retriever cfg.kind over its knowledge base; None for kind "none"."""
    needed_indexes(cfg)  # validates kind and backend before any work
    if cfg.kind == "none":
        return None
    return open_knowledge_base(cfg, cache_dir, progress).retriever(cfg)
