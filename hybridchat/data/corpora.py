"""Real text that is on these machines without a network: documents to build question sets from.

Each source reads what a Debian or Python installation already holds and says where it came from
(package, version, license, the files read and their sha256), so a question set can be traced and
rebuilt. Nothing downloads: a source whose package is absent is one UserError naming the package.

WordNet and anything derived from it are never read: held-out checks use it. (That is why
dict-gcide, whose entries include WordNet glosses, is not a source.)
"""

from __future__ import annotations

import gzip
import hashlib
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.core.fsutil import sha256_file

DICTD = Path("/usr/share/dictd")


@dataclass
class Corpus:
    name: str
    documents: list[Document]   # metadata["links"]: titles of the documents this one refers to
    provenance: dict = field(default_factory=dict)
    # How a question names what a document links to: "the package that X depends on"
    link_noun: str = "entry"
    link_verb: str = "refers to"


def _package_version(package: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    status, _, version = out.stdout.partition("\t")
    return version if out.returncode == 0 and status.endswith(" installed") else None


def _license(package: str) -> str:
    """The License: names of the package's Debian copyright file, in order of first mention."""
    path = Path("/usr/share/doc") / package / "copyright"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"unknown (no {path})"
    names = re.findall(r"^License:\s*(\S.*)$", text, re.M)
    # Older copyright files are prose: the licence's own name, as written there.
    names = names or [" ".join(m.split()) for m in re.findall(r"GNU\s+[A-Z][a-z]+\s+[A-Z][a-z]+\s+License,?\s+Version\s+[\d.]+", text)]
    return ", ".join(dict.fromkeys(n.strip() for n in names)) or f"see {path}"


def _base64_number(text: str) -> int:
    """dictd's index numbers: base 64 digits A-Z a-z 0-9 + /, most significant first."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for ch in text:
        value = value * 64 + alphabet.index(ch)
    return value


_LINK = re.compile(r"\{\s*([^{}]+?)\s*\}")
_TAG = re.compile(r"<[a-z][a-z ,/-]*>\s*")           # FOLDOC's subject tags: "<hardware>"
_DATE = re.compile(r"\(\d{4}-\d\d-\d\d\)\s*$")        # FOLDOC's last-updated date
# The Jargon File's head of an entry: pronunciation, part of speech, origin ("/foo/, n. [MIT] ...")
_HEADNOTE = re.compile(r"^(?:/[^/]{1,80}/,?\s*)*(?:(?:n|v|vt|vi|adj|adv|interj|pl|prep|pron|abbrev)\.,?\s*)*(?:\[[^\]]{1,200}\]\s*)?(?:1\.\s+)?")
_FIELD_LINE = re.compile(r"^[A-Z][A-Za-z ]{1,30}: \S")
_EDITORIAL = re.compile(r"\[[A-Z][a-z]+\?[^\]]*\]")  # FOLDOC's editors' notes: "[Details?]", "[Features?]"


def dict_entry(raw: str) -> tuple[str, str, list[str]] | None:
    """(title, text, linked titles) of one dictd entry: the headword lines, then the body. Links
    ({like this}) become plain text and are kept as cross-references; subject tags, dates and
    editorial notes are dropped."""
    lines = raw.strip("\n").split("\n")
    title = lines[0].strip()
    body_start = next((i for i, line in enumerate(lines) if line.startswith((" ", "\t")) or not line.strip()), 1)
    # "Symbol: Si" lines (dict-elements) stay sentences of their own once the lines are joined.
    body = " ".join(line.strip() + ("." if _FIELD_LINE.match(line.strip()) and line.strip()[-1] not in ".:;" else "")
                    for line in lines[body_start:] if line.strip())
    links = list(dict.fromkeys(" ".join(m.split()) for m in _LINK.findall(body)))
    text = _LINK.sub(lambda m: " ".join(m.group(1).split()), body)
    text = _EDITORIAL.sub("", _TAG.sub("", _DATE.sub("", text)))
    text = _HEADNOTE.sub("", " ".join(text.split()))
    if not title or len(text.split()) < 5 or "wordnet" in text.lower():
        return None
    return title, text, links


def read_dictd(name: str, package: str, directory: Path = DICTD) -> Corpus:
    """One document per entry of an installed dictd dictionary (entries several headwords share are
    read once; the dictionary's own 00-database-* records are skipped)."""
    index, data_path = directory / f"{name}.index", directory / f"{name}.dict.dz"
    if not index.is_file() or not data_path.is_file():
        raise UserError(f"source {name}: {index} not found; install the Debian package {package} "
                        f"(apt-get install {package})")
    with gzip.open(data_path) as f:  # dictzip is gzip with an index of its own
        data = f.read()
    documents, seen = [], set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        offset, length = _base64_number(parts[1]), _base64_number(parts[2])
        if offset in seen:
            continue
        seen.add(offset)
        entry = dict_entry(data[offset:offset + length].decode("utf-8", errors="replace"))
        if entry:
            title, text, links = entry
            documents.append(Document(f"{name}:{title}", title, text, {"links": links}, source=name))
    files = {str(p): sha256_file(p) for p in (index, data_path)}
    return Corpus(name, documents, {"package": package, "version": _package_version(package),
                                    "license": _license(package), "files": files})


def _stanzas(text: str) -> Iterator[dict[str, str]]:
    """The records of a Debian control file (Packages, dumpavail): field -> value, continuation
    lines joined."""
    for block in text.split("\n\n"):
        record, key = {}, None
        for line in block.split("\n"):
            if line.startswith((" ", "\t")) and key:
                record[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                record[key] = value.strip()
        if record.get("Package"):
            yield record


PACKAGE_FIELDS = ("Version", "Maintainer", "Section", "Homepage", "Depends", "Source")


def package_document(record: dict[str, str]) -> Document:
    """A package as Debian describes it: the fields a reader asks about, as the control file writes
    them, then its description."""
    name = record["Package"]
    fields = [f"{key}: {record[key]}" for key in PACKAGE_FIELDS if record.get(key)]
    text = f"Package: {name}. " + ". ".join(fields) + f". Description: {record.get('Description', '')}"
    depends = [re.split(r"[\s(:]", alternative.split("|")[0].strip())[0]
               for alternative in record.get("Depends", "").split(",") if alternative.strip()]
    return Document(f"debian:{name}", name, text, {"links": depends}, source="debian_packages")


def read_debian_packages() -> Corpus:
    """Every package apt knows about (`apt-cache dumpavail`), one document each."""
    try:
        out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"source debian_packages: apt-cache dumpavail failed ({e}); it needs Debian's apt") from None
    if out.returncode != 0 or "Package:" not in out.stdout:
        raise UserError("source debian_packages: apt-cache dumpavail listed no packages; run apt-get update first")
    documents = {}
    for record in _stanzas(out.stdout):
        documents.setdefault(record["Package"], package_document(record))  # the first of several versions
    digest = hashlib.sha256(out.stdout.encode()).hexdigest()
    return Corpus("debian_packages", list(documents.values()),
                  {"package": "apt", "version": _package_version("apt"),
                   "license": "each package's own (descriptions from the Debian archive's Packages files)",
                   "files": {"apt-cache dumpavail": digest}}, link_noun="package", link_verb="depends on")


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a reStructuredText-like page: headings, rules and indented code left out."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").split("\n")
        if not lines[0].strip() or lines[0].startswith((" ", "\t")):
            continue  # code, grammar, indented examples
        if len(lines) > 1 and set(lines[-1].strip()) <= set("*=-~^"):
            continue  # a heading
        paragraph = " ".join(" ".join(lines).split())
        if len(paragraph.split()) >= 12:
            out.append(paragraph)
    return out


def read_python_docs() -> Corpus:
    """The Python language reference every Python installation ships (pydoc_data.topics), one
    document per prose paragraph, titled by its topic."""
    import sys

    try:
        from pydoc_data import topics
    except ImportError:
        raise UserError("source python_docs: pydoc_data is missing from this Python installation") from None
    documents = []
    for key in sorted(topics.topics):
        page = topics.topics[key]
        heading = page.strip().split("\n")[0].strip()
        for i, paragraph in enumerate(_paragraphs(page)):
            documents.append(Document(f"python_docs:{key}:{i}", heading, paragraph, source="python_docs"))
    path = Path(topics.__file__)
    return Corpus("python_docs", documents,
                  {"package": "python", "version": sys.version.split()[0], "license": "PSF-2.0",
                   "files": {str(path): sha256_file(path)}})


SOURCES: dict[str, Callable[[], Corpus]] = {
    "foldoc": lambda: read_dictd("foldoc", "dict-foldoc"),
    "jargon": lambda: read_dictd("jargon", "dict-jargon"),
    "elements": lambda: read_dictd("elements", "dict-elements"),
    "debian_packages": read_debian_packages,
    "python_docs": read_python_docs,
}
