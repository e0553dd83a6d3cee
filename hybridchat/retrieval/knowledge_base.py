"""A knowledge base: documents plus the indexes built over them, persisted in one directory.

    <kb>/manifest.json      format version, chunking, each index's build settings, counts
    <kb>/documents.jsonl    the (chunked) documents, one JSON object per line
    <kb>/simple/            TF-IDF: vocab.json, idf.npy, postings.npz (scipy, no pickle)
    <kb>/bm25/              bm25s save(): .npy arrays (memory-mapped on open) + JSON vocab/params
    <kb>/dense/             embeddings.npy (the encoder cache) + index.faiss (faiss.write_index)

Every change (build, add, delete, adding an index) writes a complete new directory next to the
old one and swaps it in whole (fsutil.atomic_directory), under an exclusive lock file, so a
crash or Ctrl-C leaves the previous knowledge base intact and two writers never interleave.
Embeddings are reused by content hash whenever the encoder's weights are unchanged, so adding
documents encodes only the new ones and opening a knowledge base never encodes anything.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.core.fsutil import atomic_directory
from hybridchat.retrieval.base import RankedRetriever
from hybridchat.retrieval.bm25 import Bm25sRetriever, RankBm25Retriever, build_bm25
from hybridchat.retrieval.config import KINDS, ChunkingConfig, RetrieverConfig
from hybridchat.retrieval.dense import (
    DenseRetriever,
    Encoder,
    build_faiss,
    check_precision,
    load_encoder,
    resolve_model,
)
from hybridchat.retrieval.fusion import HybridRetriever
from hybridchat.retrieval.ingest import chunk_documents, token_spans, validate_chunking, word_spans
from hybridchat.retrieval.simple import TfidfRetriever, build_tfidf
from hybridchat.retrieval.text import analyze, document_text

FORMAT_VERSION = 1
INDEXES = ("simple", "bm25", "dense")
BUILT_KEYS = ("dim", "weights_sha256", "encoded")  # recorded by a build, not asked for by a config


def _names(f, file: Path) -> bool:
    """Whether `file` is still the name of the open file f (a holder removes its lock file)."""
    try:
        here, there = os.fstat(f.fileno()), os.stat(file)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextmanager
def kb_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on a sibling lock file (the directory itself is replaced, so it can't be locked),
    removed on release so none is left beside the knowledge base. The holder removes it while still
    holding it; a process that was waiting on that file finds, once it has the lock, that the name
    no longer leads to it and locks the file now at that name instead. So two processes never hold
    locks on two files of one name, and no lock a live process holds is ever removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file, said = path.parent / f".{path.name}.lock", False
    while True:
        f = open(file, "a+")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    print(f"waiting for another command writing {path} ...", file=sys.stderr)
                    said = True
                fcntl.flock(f, fcntl.LOCK_EX)
            if _names(f, file):
                break
        except BaseException:
            f.close()
            raise
        f.close()
    try:
        yield
    finally:
        file.unlink(missing_ok=True)
        f.close()  # releases the lock


def needed_indexes(cfg: RetrieverConfig) -> list[str]:
    """On-disk indexes a retriever kind reads (rank_bm25 is rebuilt in memory, it needs none)."""
    if cfg.kind not in KINDS:
        raise UserError(f"retriever.kind={cfg.kind!r}: allowed values are {', '.join(KINDS)}")
    bm25 = ["bm25"] if cfg.bm25.backend == "bm25s" else []
    if cfg.bm25.backend not in ("bm25s", "rank_bm25"):
        raise UserError(f"retriever.bm25.backend={cfg.bm25.backend!r}: allowed values are bm25s, rank_bm25")
    return {"none": [], "simple": ["simple"], "bm25": bm25, "dense": ["dense"],
            "hybrid": bm25 + ["dense"]}[cfg.kind]


def kind_for(indexes) -> str:
    """The retriever a knowledge base with these indexes serves best: hybrid if it has bm25 and dense,
    else the one it has."""
    have = set(indexes)
    if not have & set(INDEXES):
        raise UserError(f"this knowledge base has no index to search (it has: {', '.join(have) or 'none'}); "
                        f"build it with indexes=[...], any of {', '.join(INDEXES)}")
    return "hybrid" if {"bm25", "dense"} <= have else next(k for k in ("dense", "bm25", "simple") if k in have)


def index_settings(name: str, cfg: RetrieverConfig) -> dict:
    """The build settings of one index, as recorded in the manifest."""
    if name == "simple":
        return {"weighting": "sublinear tf, smoothed idf, l2"}
    if name == "bm25":
        return {"k1": cfg.bm25.k1, "b": cfg.bm25.b, "method": "lucene"}
    if name == "dense":
        d = cfg.dense
        return {"model": d.model, "index": d.index, "ivf_nlist": d.ivf_nlist, "hnsw_m": d.hnsw_m,
                "precision": check_precision(d.precision)}
    raise UserError(f"unknown index {name!r}: allowed values are {', '.join(INDEXES)}")


def documents_sha256(chunks: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(f"{c.id}\t{c.content_hash()}\n".encode())
    return h.hexdigest()


def prepare_documents(docs: Sequence[Document], chunking: ChunkingConfig, model: str) -> list[Document]:
    """Chunk (words, or the dense model's tokens) and fail on what cannot be indexed."""
    validate_chunking(chunking)
    splitter = token_spans(resolve_model(model)) if chunking.unit == "tokens" and chunking.size else word_spans
    return chunk_documents(list(docs), chunking, splitter)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _read_documents(file: Path) -> list[Document]:
    """documents.jsonl as written by _write; damage is a UserError naming the file and line."""
    documents = []
    try:
        with open(file, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    obj = json.loads(raw.decode("utf-8"))
                    if not isinstance(obj, dict):
                        raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
                    doc = Document.from_json(obj)
                    for name in ("id", "title", "text", "source"):
                        if not isinstance(getattr(doc, name), str):
                            raise TypeError(f"{name!r} must be a string")
                    if not isinstance(doc.metadata, dict):
                        raise TypeError("'metadata' must be a JSON object")
                except (ValueError, KeyError, TypeError, RecursionError) as e:
                    raise UserError(f"{file}:{lineno}: damaged document record ({type(e).__name__}: "
                                    f"{_one_line(e)}); rebuild the knowledge base "
                                    f"(python -m hybridchat.kb build FILES --kb {file.parent})") from None
                documents.append(doc)
    except OSError as e:
        raise UserError(f"{file}: cannot be read ({e.strerror or e}); rebuild the knowledge base") from None
    return documents


class KnowledgeBase:
    def __init__(self, path: Path, manifest: dict, documents: list[Document]):
        self.path, self.manifest, self.documents = path, manifest, documents

    # ---- reading -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike) -> "KnowledgeBase":
        path = Path(path)
        manifest = cls.read_manifest(path)
        documents = _read_documents(path / "documents.jsonl")
        if len(documents) != manifest["num_chunks"]:
            raise UserError(f"{path}/documents.jsonl: holds {len(documents)} documents but manifest.json says "
                            f"{manifest['num_chunks']}: the knowledge base is damaged; rebuild it "
                            f"(python -m hybridchat.kb build FILES --kb {path})")
        return cls(path, manifest, documents)

    @staticmethod
    def read_manifest(path: str | os.PathLike) -> dict:
        """manifest.json, checked (what indexes a knowledge base has, without reading its documents)."""
        path = Path(path)
        if not (path / "manifest.json").exists():
            raise UserError(f"{path}: not a knowledge base (no manifest.json); create one with "
                            f"`python -m hybridchat.kb build FILES --kb {path}`")
        try:
            manifest = json.loads((path / "manifest.json").read_text("utf-8"))
            version = int(manifest["format_version"])
            for key, kind in (("indexes", dict), ("chunking", dict), ("num_chunks", int),
                              ("num_documents", int), ("documents_sha256", str)):
                if not isinstance(manifest[key], kind):
                    raise TypeError(f"{key!r} must be a {kind.__name__}")
            if not all(isinstance(v, dict) for v in manifest["indexes"].values()):
                raise TypeError("'indexes' must map index names to settings")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise UserError(f"{path}/manifest.json: unreadable ({_one_line(e)}); rebuild the knowledge base "
                            f"(python -m hybridchat.kb build FILES --kb {path})") from None
        if version > FORMAT_VERSION:
            raise UserError(f"{path}: knowledge base format version {version} is newer than this "
                            f"hybridchat reads (<= {FORMAT_VERSION}); upgrade hybridchat or rebuild it")
        return manifest

    @property
    def indexes(self) -> dict[str, dict]:
        return self.manifest["indexes"]

    def stats(self) -> dict:
        m = self.manifest
        return {"path": str(self.path), "format_version": m["format_version"],
                "documents": m["num_documents"], "chunks": m["num_chunks"],
                "chunking": m["chunking"], "indexes": m["indexes"],
                "size_mb": round(sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file()) / 2**20, 2)}

    def encoder(self, device: str = "auto") -> Encoder:
        """The dense index's encoder, checked against the one the index was built with."""
        built = self.indexes["dense"]
        enc = load_encoder(built["model"], device)
        if enc.dim != built["dim"] or enc.weights_sha256 != built["weights_sha256"]:
            raise UserError(
                f"{self.path}: the dense index was built with {built['model']!r} (dim {built['dim']}, "
                f"weights sha256 {built['weights_sha256'][:12]}) but that model now loads with dim "
                f"{enc.dim}, sha256 {enc.weights_sha256[:12]}; rebuild the knowledge base "
                f"(python -m hybridchat.kb build ...) or restore the original model")
        return enc

    def retriever(self, cfg: RetrieverConfig) -> RankedRetriever | None:
        """Open the retriever cfg.kind over this knowledge base's indexes (query-time settings from cfg)."""
        missing = [n for n in needed_indexes(cfg) if n not in self.indexes]
        if missing:
            raise UserError(f"{self.path}: retriever.kind={cfg.kind} needs the {', '.join(missing)} index, "
                            f"which this knowledge base lacks (it has: {', '.join(self.indexes) or 'none'}); "
                            f"rebuild with --retrievers including {', '.join(missing)}")
        if cfg.kind == "none":
            return None
        if cfg.kind == "simple":
            return self._load_index("simple", lambda: TfidfRetriever(self.documents, self.path / "simple"))
        if cfg.kind in ("bm25", "hybrid"):
            bm25 = (self._load_index("bm25", lambda: Bm25sRetriever(self.documents, self.path / "bm25"))
                    if cfg.bm25.backend == "bm25s" else RankBm25Retriever(self.documents, cfg.bm25.k1, cfg.bm25.b))
            if cfg.kind == "bm25":
                return bm25
        d = cfg.dense
        index = self._load_index("dense", lambda: faiss.read_index(str(self.path / "dense" / "index.faiss")))
        dense = DenseRetriever(self.documents, index, self.encoder(d.device), d.batch_size, d.nprobe,
                               d.hnsw_ef_search, self.indexes["dense"].get("precision", "float32"))
        if cfg.kind == "dense":
            return dense
        f = cfg.fusion
        return HybridRetriever([bm25, dense], f.weights, f.method, f.rrf_k, f.depth)

    def _load_index(self, name: str, load):
        """Open one index's files; damage (truncated, foreign, missing files) is one clear error."""
        try:
            return load()
        except (OSError, ValueError, KeyError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"{self.path}/{name}: the {name} index is damaged ({type(e).__name__}: "
                            f"{_one_line(e)}); rebuild the knowledge base "
                            f"(python -m hybridchat.kb build FILES --kb {self.path})") from None

    # ---- writing (each returns the newly opened knowledge base) ------------------------------

    @classmethod
    def build(cls, path: str | os.PathLike, documents: Sequence[Document], indexes: Sequence[str],
              cfg: RetrieverConfig, progress: bool = True) -> "KnowledgeBase":
        """Create or replace the knowledge base at path (embeddings of unchanged text are reused)."""
        path = Path(path)
        if not indexes:  # nothing could search it: refused before anything is written
            raise UserError(f"indexes=[] builds nothing to search {path} with; give one or more of {', '.join(INDEXES)}")
        settings = {n: index_settings(n, cfg) for n in indexes}  # an unknown name is refused before chunking
        chunks = prepare_documents(documents, cfg.chunking, cfg.dense.model)
        with kb_lock(path):
            previous = cls._open_if_valid(path)
            return cls._write(path, chunks, asdict(cfg.chunking), settings, previous, progress, cfg.dense.batch_size)

    def add(self, documents: Sequence[Document], replace: bool = False, progress: bool = True) -> "KnowledgeBase":
        """Add documents; an id already present is an error unless replace (then it is updated)."""
        with kb_lock(self.path):
            current = KnowledgeBase.open(self.path)  # the latest state, not the one we opened earlier
            chunking = ChunkingConfig(**current.manifest["chunking"])
            model = current.indexes.get("dense", {}).get("model", "all-MiniLM-L6-v2")
            new_ids = {d.id for d in documents}
            present = new_ids & {c.parent_id for c in current.documents}
            if present and not replace:
                raise UserError(f"{self.path}: document id {sorted(present)[0]!r} is already in the knowledge "
                                f"base ({len(present)} such ids); use --replace to update them")
            kept = [c for c in current.documents if c.parent_id not in new_ids]
            chunks = kept + prepare_documents(documents, chunking, model)
            return self._write(self.path, chunks, current.manifest["chunking"], current.indexes, current, progress)

    def delete(self, ids: Sequence[str], progress: bool = True) -> "KnowledgeBase":
        with kb_lock(self.path):
            current = KnowledgeBase.open(self.path)
            unknown = set(ids) - {c.parent_id for c in current.documents}
            if unknown:
                raise UserError(f"{self.path}: no document with id {sorted(unknown)[0]!r} "
                                f"({len(unknown)} unknown ids); nothing was deleted")
            chunks = [c for c in current.documents if c.parent_id not in set(ids)]
            return self._write(self.path, chunks, current.manifest["chunking"], current.indexes, current, progress)

    @classmethod
    def ensure(cls, path: str | os.PathLike, cfg: RetrieverConfig, documents: Sequence[Document] | None = None,
               progress: bool = True) -> "KnowledgeBase":
        """Open the knowledge base, first (re)building what cfg.kind needs and it lacks.

        documents=None (a user's knowledge base): only missing indexes are added, existing ones
        keep their recorded settings. With documents (a managed one, e.g. the synthetic world):
        also rebuilt when the documents, chunking or a needed index's settings differ from cfg.
        """
        path = Path(path)
        kb = cls._open_if_valid(path) if documents is not None else cls.open(path)
        if not cls._stale(kb, cfg, documents):
            return kb
        with kb_lock(path):
            kb = cls._open_if_valid(path) if documents is not None else cls.open(path)
            if not cls._stale(kb, cfg, documents):  # another process built it while we waited
                return kb
            if documents is None:  # the user's own knowledge base changes: say so (chat added bm25 silently)
                added = [n for n in needed_indexes(cfg) if n not in kb.indexes]
                print(f"{path}: adding the {', '.join(added)} index that retriever.kind={cfg.kind} needs (it has "
                      f"{', '.join(kb.indexes) or 'none'})", file=sys.stderr)
            chunks = (prepare_documents(documents, cfg.chunking, cfg.dense.model) if documents is not None
                      else kb.documents)
            chunking = asdict(cfg.chunking) if documents is not None else kb.manifest["chunking"]
            indexes = dict(kb.indexes) if kb is not None else {}
            indexes.update({n: index_settings(n, cfg) for n in needed_indexes(cfg)
                            if documents is not None or n not in indexes})
            return cls._write(path, chunks, chunking, indexes, kb, progress, cfg.dense.batch_size)

    @staticmethod
    def _stale(kb: "KnowledgeBase | None", cfg: RetrieverConfig, documents: Sequence[Document] | None) -> bool:
        if kb is None:
            return True
        needed = needed_indexes(cfg)
        if documents is None:
            return any(n not in kb.indexes for n in needed)
        if kb.manifest["chunking"] != asdict(cfg.chunking):
            return True
        if kb.manifest["documents_sha256"] != documents_sha256(
                prepare_documents(documents, cfg.chunking, cfg.dense.model)):
            return True
        return any(n not in kb.indexes or {k: kb.indexes[n].get(k) for k in index_settings(n, cfg)}
                   != index_settings(n, cfg) for n in needed)

    @classmethod
    def _open_if_valid(cls, path: Path) -> "KnowledgeBase | None":
        """The knowledge base at path if there is a readable one (only used to reuse its work)."""
        try:
            return cls.open(path)
        except (UserError, OSError, ValueError, KeyError):
            return None

    @classmethod
    def _write(cls, path: Path, chunks: list[Document], chunking: dict, indexes: dict[str, dict],
               previous: "KnowledgeBase | None", progress: bool, batch_size: int = 64) -> "KnowledgeBase":
        if not chunks:
            raise UserError(f"{path}: the knowledge base would be empty (no documents); "
                            f"give at least one document with text")
        ids = [c.id for c in chunks]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise UserError(f"{path}: duplicate document id {dup!r}; ids must be unique")
        for name in indexes:
            if name not in INDEXES:
                raise UserError(f"unknown retriever index {name!r}: allowed values are {', '.join(INDEXES)}")
        texts = [document_text(c.title, c.text) for c in chunks]
        digest = documents_sha256(chunks)
        same_docs = previous is not None and previous.manifest["documents_sha256"] == digest
        built: dict[str, dict] = {}
        with atomic_directory(path) as tmp:
            with open(tmp / "documents.jsonl", "w", encoding="utf-8") as f:
                for c in chunks:
                    f.write(json.dumps(c.to_json(), ensure_ascii=False) + "\n")
            for name, settings in indexes.items():
                settings = {k: v for k, v in settings.items() if k not in BUILT_KEYS}
                old = previous.indexes.get(name) if previous is not None else None
                if same_docs and old is not None and {k: old.get(k) for k in settings} == settings:
                    _link_tree(previous.path / name, tmp / name)  # unchanged: reuse, never rebuild
                    built[name] = old
                elif name == "simple":
                    build_tfidf(texts, tmp / name)
                    built[name] = settings
                elif name == "bm25":
                    if not any(analyze(texts)):  # bm25s cannot index an empty vocabulary
                        raise UserError(f"{path}: no document has a word the bm25 index can use (only stop "
                                        f"words, one-letter words or punctuation); add documents with text "
                                        f"or build with --retrievers simple,dense")
                    build_bm25(texts, tmp / name, settings["k1"], settings["b"])
                    built[name] = settings
                else:
                    built[name] = _build_dense(tmp / name, chunks, texts, settings, previous, progress, batch_size)
            manifest = {"format_version": FORMAT_VERSION, "num_chunks": len(chunks),
                        "num_documents": len({c.parent_id for c in chunks}), "documents_sha256": digest,
                        "chunking": chunking, "retrievers": sorted(built), "indexes": built}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", "utf-8")
        return cls.open(path)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link an index directory (files are never modified in place, so sharing is safe)."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def _build_dense(out: Path, chunks: list[Document], texts: list[str], settings: dict,
                 previous: KnowledgeBase | None, progress: bool, batch_size: int) -> dict:
    enc = load_encoder(settings["model"])
    old = previous.indexes.get("dense") if previous is not None else None
    if previous is not None and old is not None and old["model"] == settings["model"] and (
            old["dim"] != enc.dim or old["weights_sha256"] != enc.weights_sha256):
        raise UserError(f"{previous.path}: the dense index was built with {old['model']!r} (dim {old['dim']}, "
                        f"weights sha256 {old['weights_sha256'][:12]}) but that model now loads with dim "
                        f"{enc.dim}, sha256 {enc.weights_sha256[:12]}; use `kb build` to rebuild from your files")
    emb = np.zeros((len(chunks), enc.dim), np.float32)
    todo = list(range(len(chunks)))
    # Cached embeddings are reused only when they came from the same weights at the same precision.
    if (old is not None and old["weights_sha256"] == enc.weights_sha256
            and old.get("precision", "float32") == settings.get("precision", "float32")):
        cached = np.load(previous.path / "dense" / "embeddings.npy", mmap_mode="r")
        row = {c.content_hash(): i for i, c in enumerate(previous.documents)}
        hits = [(i, row.get(c.content_hash())) for i, c in enumerate(chunks)]
        found = [(i, r) for i, r in hits if r is not None]
        if found:
            emb[[i for i, _ in found]] = cached[[r for _, r in found]]
        todo = [i for i, r in hits if r is None]
    if todo:
        emb[todo] = enc.encode([texts[i] for i in todo], batch_size=batch_size, progress=progress,
                               precision=settings.get("precision", "float32"))
    out.mkdir(parents=True)
    np.save(out / "embeddings.npy", emb)
    faiss.write_index(build_faiss(emb, settings["index"], settings["ivf_nlist"], settings["hnsw_m"]),
                      str(out / "index.faiss"))
    return {**settings, "dim": enc.dim, "weights_sha256": enc.weights_sha256, "encoded": len(todo)}
