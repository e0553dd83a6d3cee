"""Knowledge bases and retrievers.

    from hybridchat.retrieval import build_retriever, RetrieverConfig
    retriever = build_retriever(RetrieverConfig(kind="hybrid"), cache_dir)
    hits = retriever.search(["Where was Ada Vell born?"], top_k=3)[0]   # list[Hit]

Attributes are imported lazily, so importing the package costs nothing until one is used.
"""

from importlib import import_module

_EXPORTS = {
    "Hit": "base", "Retriever": "base", "RetrieverConfig": "config",
    "KnowledgeBase": "knowledge_base", "build_retriever": "factory", "open_knowledge_base": "factory",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hybridchat.retrieval' has no attribute {name!r}")
    return getattr(import_module(f"hybridchat.retrieval.{_EXPORTS[name]}"), name)


__all__ = sorted(_EXPORTS)
