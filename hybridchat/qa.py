"""Question sets for RAG training and evaluation: python -m hybridchat.qa COMMAND [key=value ...],
then Hydra overrides of conf/qa.yaml:

    python -m hybridchat.qa build sources=[foldoc,jargon,elements,python_docs] out=data/realtext
    python -m hybridchat.qa build sources=[my_docs.jsonl] out=data/mine max_documents=500
    python -m hybridchat.qa convert input=hotpot_dev_distractor_v1.json out=data/hotpot [format=auto]

build: documents split by document (train / test / missing), questions whose answers are spans of
their gold document, unanswerable ones about made-up names and gold-missing ones (see
hybridchat/data/qa_builder.py). Sources are the names below (real text installed on the machine,
never downloaded) or your own documents (.jsonl, .txt/.md files or folders, as `kb build` reads):
    foldoc           FOLDOC, the computing dictionary (Debian package dict-foldoc)
    jargon           the Jargon File (dict-jargon)
    elements         the chemical elements (dict-elements)
    debian_packages  every package apt knows about (apt-cache dumpavail)
    python_docs      the Python language reference (pydoc_data, in every Python)

It writes, in `out`:
    train_documents.jsonl   the training knowledge base (train documents only)
    documents.jsonl         the evaluation knowledge base (train + test documents)
    train.jsonl, test.jsonl questions (question, answers, gold_doc_ids, hops, split, kind): single-hop,
                            unanswerable and (test) gold-missing ones
    train_2hop.jsonl, test_2hop.jsonl   2-hop questions along cross-references (evaluate hops=2)
    manifest.json           sources (package, version, license, sha256 of what was read), settings, counts

convert: a standard QA dataset file (format auto, squad, hotpotqa, 2wiki, flashrag or nq; see
docs/qa.md and hybridchat/data/qa_formats.py) as out/documents.jsonl (for kb build; left out when the
format has no contexts) and out/questions.jsonl (for evaluate, kb eval, stage.questions).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

from hybridchat.core.errors import UserError
from hybridchat.infra import commands

COMMANDS = ("build", "convert")
OUTPUTS = ("train_documents.jsonl", "documents.jsonl", "train.jsonl", "test.jsonl", "train_2hop.jsonl",
           "test_2hop.jsonl", "manifest.json")


@dataclass
class QaConfig:
    sources: List[str] = field(default_factory=list)  # build: source names or paths of your documents
    out: Optional[str] = None            # build, convert: the folder written
    overwrite: bool = False              # build, convert: replace a question set already in `out`
    input: Optional[str] = None          # convert: the dataset file
    format: str = "auto"                 # convert: auto, squad, hotpotqa, 2wiki, flashrag, nq
    max_documents: int = 2000            # build: documents asked about, per source (a hash of the id picks them)
    max_words: int = 120                 # build: documents are cut to their leading sentences, this many words
    per_document: int = 3                # build: single-hop questions per document at most
    # build: the single-hop kinds asked, in order of preference: a document's questions take one of
    # each in turn (definition: what an entry is; field: a "Key: value" line; cloze: a sentence's span)
    kinds: List[str] = field(default_factory=lambda: ["definition", "field", "cloze"])
    unanswerable: float = 0.3            # build: made-up-name questions per answerable question
    test: float = 0.1                    # build: share of documents held out for evaluation
    missing: float = 0.05                # build: share kept out of every knowledge base (gold-missing questions)
    seed: int = 0


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="qa_schema", node=QaConfig)


def compose(overrides: list[str]) -> QaConfig:
    """conf/qa.yaml with the command line's overrides, checked against QaConfig."""
    return commands.compose("qa", "qa_schema", QaConfig, overrides)


def _corpus(source: str):
    from hybridchat.core.fsutil import sha256_file
    from hybridchat.data.corpora import SOURCES, Corpus

    if source in SOURCES:
        return SOURCES[source]()
    path = Path(source)
    if not path.exists():
        raise UserError(f"sources: {source!r} is neither a source ({', '.join(SOURCES)}) nor an existing "
                        f"file or folder of documents")
    from hybridchat.retrieval.ingest import read_documents

    documents, _ = read_documents([path])
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return Corpus(path.name, documents, {"path": str(path.resolve()), "files": {str(p): sha256_file(p) for p in files}})


def _check(cfg: QaConfig) -> None:
    if not cfg.sources:
        raise UserError("build needs sources=[...] (see python -m hybridchat.qa --help)")
    if not cfg.out:
        raise UserError("build needs out=FOLDER")
    for key in ("max_documents", "max_words", "per_document"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key}={getattr(cfg, key)} must be >= 1")
    from hybridchat.data.qa_builder import KINDS

    if not cfg.kinds or any(k not in KINDS for k in cfg.kinds) or len(set(cfg.kinds)) != len(cfg.kinds):
        raise UserError(f"kinds={list(cfg.kinds)} must name each of {', '.join(KINDS)} at most once, at least one")
    for key in ("unanswerable", "test", "missing"):
        if not 0 <= getattr(cfg, key) < 1:
            raise UserError(f"{key}={getattr(cfg, key)} must be in [0, 1)")
    if cfg.test + cfg.missing >= 1:
        raise UserError(f"test={cfg.test} + missing={cfg.missing} must leave documents to train on (< 1)")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={cfg.out} is a file; give a folder")
    if not cfg.overwrite and any((out / name).exists() for name in OUTPUTS):
        raise UserError(f"out={cfg.out} already holds a question set; overwrite=true replaces it")


def build(cfg: QaConfig) -> dict:
    """Build and write the question set; returns the manifest."""
    from hybridchat.core.fsutil import atomic_directory, sha256_file
    from hybridchat.data import qa_builder

    _check(cfg)
    corpora = [_corpus(s) for s in cfg.sources]
    names = [c.name for c in corpora]
    if len(set(names)) != len(names):
        raise UserError(f"sources: two sources are named alike ({', '.join(names)}); give each once")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("sources", "out", "overwrite", "input", "format")}
    qs = qa_builder.build(corpora, **settings)
    manifest = {"sources": {c.name: {**c.provenance, "documents": len(c.documents)} for c in corpora},
                "settings": settings,
                "documents": {s: len(d) for s, d in qs.documents.items()},
                "questions": {s: dict(Counter(q.kind for q in qs.questions[s])) for s in qs.questions}}
    # Everything or nothing: the folder is written aside and swapped in whole.
    with atomic_directory(cfg.out) as tmp:
        _write_jsonl(tmp / "train_documents.jsonl", (d.to_json() for d in qs.documents["train"]))
        _write_jsonl(tmp / "documents.jsonl", (d.to_json() for s in ("train", "test") for d in qs.documents[s]))
        # 2-hop questions apart: the rag stage and a single-hop evaluation read one document per answer
        for s in ("train", "test"):
            _write_jsonl(tmp / f"{s}.jsonl", (q.to_json(s) for q in qs.questions[s] if q.hops == 1))
            _write_jsonl(tmp / f"{s}_2hop.jsonl", (q.to_json(s) for q in qs.questions[s] if q.hops == 2))
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def run(command: str, cfg: QaConfig) -> None:
    if command == "build":
        m = build(cfg)
        q = {s: sum(c.values()) for s, c in m["questions"].items()}
        print(f"{cfg.out}: {m['documents']['train']} training and {m['documents']['test']} test documents "
              f"({m['documents']['missing']} kept out); {q['train']} training and {q['test']} test questions")
        for s, kinds in m["questions"].items():
            print(f"  {s}: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    elif command == "convert":
        from hybridchat.data.qa_formats import convert

        if not cfg.input or not cfg.out:
            raise UserError("convert needs input=FILE and out=FOLDER (see python -m hybridchat.qa --help)")
        print(convert(cfg.input, cfg.out, cfg.format, cfg.overwrite))


def main(argv: list[str] | None = None) -> None:
    commands.main("hybridchat.qa", __doc__, COMMANDS, lambda command, overrides: run(command, compose(overrides)),
                  "nothing was written", argv)


if __name__ == "__main__":
    main()
