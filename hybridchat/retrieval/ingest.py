"""Reading user documents (JSONL, folders of .txt/.md), chunking them, dropping exact duplicates.

Every problem names the file and line it came from. With skip_bad, a bad record is counted and
reported instead of failing the whole command.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.retrieval.config import ChunkingConfig

TEXT_SUFFIXES = (".txt", ".md")


@dataclass
class IngestReport:
    read: int = 0  # documents accepted
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" for each bad record
    duplicates: int = 0  # exact duplicates (same title and text) dropped

    def summary(self) -> str:
        return (f"{self.read} documents read, {len(self.skipped)} bad records skipped, "
                f"{self.duplicates} exact duplicates dropped")


def _record_to_document(obj: object, source: str) -> Document:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    doc_id = obj.get("id")
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise ValueError("missing 'id' (a non-empty string or integer)")
    text = obj.get("text", obj.get("content"))
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"document {doc_id!r} has no text: needs a non-empty 'text' or 'content' string")
    title = obj.get("title") or ""
    if not isinstance(title, str):
        raise ValueError(f"document {doc_id!r}: 'title' must be a string")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"document {doc_id!r}: 'metadata' must be a JSON object")
    doc = Document(id=doc_id, title=title, text=text, metadata=metadata, source=str(obj.get("source") or source))
    try:  # JSON can escape lone UTF-16 surrogates ("\ud800"): not text, and documents.jsonl is UTF-8
        json.dumps(doc.to_json(), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"document {doc_id!r} contains a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
                         f"which is not valid Unicode text") from None
    return doc


def _read_jsonl(path: Path) -> Iterator[tuple[str, Document | ValueError]]:
    with open(path, "rb") as f:  # decoded line by line: a bad byte is one bad record, named by its line
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, ValueError(f"not UTF-8 text ({e.reason} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, ValueError(f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            except (ValueError, RecursionError) as e:  # integers too long to convert, nesting too deep
                yield where, ValueError(f"invalid JSON ({type(e).__name__}: {' '.join(str(e).split())})")
                continue
            try:
                yield where, _record_to_document(obj, source=str(path))
            except ValueError as e:
                yield where, e


def _read_text_file(path: Path, root: Path) -> tuple[str, Document | ValueError]:
    rel = path.relative_to(root) if path != root else Path(path.name)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return str(path), ValueError("not UTF-8 text")
    if not text.strip():
        return str(path), ValueError("empty file: a document needs text")
    title = rel.stem
    heading = re.match(r"\s*#\s+(.+)", text) if path.suffix == ".md" else None
    if heading:
        title = heading.group(1).strip()
    return str(path), Document(id=rel.with_suffix("").as_posix(), title=title, text=text,
                               source=str(path))


def _read_path(path: Path) -> Iterator[tuple[str, Document | ValueError]]:
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"{path}: folder has no .txt or .md files")
        for p in files:
            yield _read_text_file(p, path)
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix in TEXT_SUFFIXES:
        yield _read_text_file(path, path)
    else:
        raise UserError(f"{path}: unsupported input; expected a .jsonl file, a .txt/.md file or a folder")


def read_documents(paths: Iterable[str | Path], skip_bad: bool = False) -> tuple[list[Document], IngestReport]:
    """Read every source; ids must be unique across all of them; exact duplicates are dropped."""
    report = IngestReport()
    docs: list[Document] = []
    first_seen: dict[str, str] = {}
    hashes: set[str] = set()
    for path in paths:
        for where, item in _read_path(Path(path)):
            if isinstance(item, Document) and item.id in first_seen:
                item = ValueError(f"duplicate id {item.id!r} (first seen at {first_seen[item.id]})")
            if isinstance(item, ValueError):
                if not skip_bad:
                    raise UserError(f"{where}: {item} (skip_bad=true skips bad records)")
                report.skipped.append(f"{where}: {item}")
                continue
            first_seen[item.id] = where
            h = item.content_hash()
            if h in hashes:
                report.duplicates += 1
                continue
            hashes.add(h)
            docs.append(item)
    report.read = len(docs)
    return docs, report


def validate_chunking(cfg: ChunkingConfig) -> None:
    if cfg.unit not in ("words", "tokens"):
        raise UserError(f"retriever.chunking.unit={cfg.unit!r}: allowed values are words, tokens")
    if cfg.size < 0:
        raise UserError(f"retriever.chunking.size={cfg.size}: must be >= 0 (0 keeps documents whole)")
    if cfg.size > 0 and not 0 <= cfg.overlap < cfg.size:
        raise UserError(f"retriever.chunking.overlap={cfg.overlap}: must be >= 0 and < size ({cfg.size})")


# A splitter returns (start, end) character spans of the units (words or tokens) of each text.
Splitter = Callable[[list[str]], list[list[tuple[int, int]]]]


def word_spans(texts: list[str]) -> list[list[tuple[int, int]]]:
    return [[m.span() for m in re.finditer(r"\S+", t)] for t in texts]


def token_spans(model_path: str) -> Splitter:
    """Spans of the dense model's word pieces, so a chunk of n tokens fits the encoder's window."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)

    def split(texts: list[str]) -> list[list[tuple[int, int]]]:
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [[tuple(span) for span in offsets] for offsets in enc["offset_mapping"]]

    return split


def chunk_documents(docs: list[Document], cfg: ChunkingConfig, splitter: Splitter = word_spans) -> list[Document]:
    """Cut documents longer than cfg.size units into overlapping chunks with ids "<parent>#<i>".

    Chunk text is a slice of the original text (formatting kept); the title is repeated so each
    chunk stands alone; metadata gains parent_id and chunk. Short documents are kept as they are.
    """
    validate_chunking(cfg)
    if cfg.size == 0:
        return list(docs)
    step = cfg.size - cfg.overlap
    out: list[Document] = []
    for doc, spans in zip(docs, splitter([d.text for d in docs])):
        if len(spans) <= cfg.size:
            out.append(doc)
            continue
        starts = range(0, max(len(spans) - cfg.overlap, 1), step)
        for i, s in enumerate(starts):
            window = spans[s:s + cfg.size]
            out.append(Document(
                id=f"{doc.id}#{i}", title=doc.title, text=doc.text[window[0][0]:window[-1][1]],
                metadata={**doc.metadata, "parent_id": doc.id, "chunk": i}, source=doc.source))
    return out
