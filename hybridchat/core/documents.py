"""The document record shared by data sources (the synthetic world), knowledge bases and retrievers.

A neutral module: `data/` and `retrieval/` both use it without importing each other."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Document:
    """One retrievable unit. Frozen: a retriever never writes scores into shared documents."""

    id: str
    title: str
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def parent_id(self) -> str:
        """The id of the document a chunk was cut from (its own id when it was not chunked)."""
        return self.metadata.get("parent_id", self.id)

    def content_hash(self) -> str:
        """sha256 of title and text: equal for exact duplicates, whatever their ids."""
        return hashlib.sha256(f"{self.title}\x00{self.text}".encode("utf-8")).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "text": self.text,
                "metadata": dict(self.metadata), "source": self.source}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Document":
        return cls(id=obj["id"], title=obj["title"], text=obj["text"],
                   metadata=obj.get("metadata") or {}, source=obj.get("source") or "")
