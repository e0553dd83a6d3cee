"""Standard QA datasets as the project's records: SQuAD v1.1/v2.0, HotpotQA and 2WikiMultihopQA (JSON),
FlashRAG and Natural-Questions-open (JSONL).

    detect_format(path) -> "squad" | "hotpotqa" | "2wiki" | "flashrag" | "nq"
    read_dataset(path, format="auto") -> (documents, questions)

Documents are the datasets' contexts (a SQuAD paragraph, a HotpotQA/2Wiki context paragraph), one per
distinct title and text however many examples repeat it, with the id "<title>/<12 hex digits of its
content hash>": the same paragraph has the same id in every file it appears in. Questions carry the
dataset's id, its answers (deduplicated, the first canonical; none for an unanswerable SQuAD v2
question), the gold documents (SQuAD: its paragraph; HotpotQA/2Wiki: the paragraphs the supporting facts
name, in the order first named, which is hop order) and hops (the number of distinct supporting
paragraphs; 1 for SQuAD). FlashRAG and NQ files hold questions alone.

JSON files are read one value at a time (an article, an example), so a dataset of hundreds of
megabytes is never held as text besides its records. Every bad record is one UserError naming the
file and where the record is: `file:line` in JSONL, the JSON path in JSON
(`train.json: data[3].paragraphs[1].qas[0]: 'question' must be a non-empty string`).
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, NoReturn

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.core.fsutil import atomic_writer
from hybridchat.core.jsonl import json_lines
from hybridchat.core.questions import Question

FORMATS = ("squad", "hotpotqa", "2wiki", "flashrag", "nq")
OUTPUTS = ("documents.jsonl", "questions.jsonl")  # what convert writes into its out folder
ALLOWED = ("squad (SQuAD v1.1/v2.0 JSON: {data: [{title, paragraphs: [{context, qas}]}]}), "
           "hotpotqa and 2wiki (a JSON list of {_id, question, answer, context, supporting_facts}), "
           "flashrag (JSONL: id, question, golden_answers), nq (JSONL: question, answer)")
# Question types only 2WikiMultihopQA has (both datasets have "comparison"; HotpotQA also "bridge").
_TWO_WIKI_TYPES = {"compositional", "inference", "bridge_comparison"}


def detect_format(path: str | Path) -> str:
    """The format of a dataset file, from its first record."""
    with _open(path) as f:
        stream = _JsonStream(f, path)
        first = stream.peek()
        if first == "[":
            for _ in stream.elements():
                return _multihop_kind(stream.value()) or _unknown(path, "a JSON list of objects without "
                                                                       "'context' and 'supporting_facts'")
            _unknown(path, "an empty JSON list")
        if first == "{":
            keys = []
            for key in stream.members():
                if key == "data" and stream.peek() == "[":
                    return "squad"
                keys.append(key)
                stream.value()
            if "golden_answers" in keys:
                return "flashrag"
            if "question" in keys and "answer" in keys:
                return "nq"
            _unknown(path, f"a JSON object with keys {', '.join(map(repr, keys)) or 'none'}")
        _unknown(path, "an empty file" if first is None else f"text starting with {first!r}")


def read_dataset(path: str | Path, format: str = "auto") -> tuple[list[Document], list[Question]]:
    """The documents and questions of a dataset file in one of FORMATS (auto: detect_format)."""
    kind = _kind(path, format)
    out = _Collected(str(path))
    with _open(path) as f:
        if kind == "squad":
            _read_squad(_JsonStream(f, path), out)
        elif kind in ("hotpotqa", "2wiki"):
            _read_multihop(_JsonStream(f, path), out, kind)
        else:
            _read_jsonl(f, path, out, kind)
    if not out.questions:
        raise UserError(f"{path}: no questions")
    return list(out.documents.values()), out.questions


def convert(path: str | Path, out: str | Path, format: str = "auto", overwrite: bool = False) -> str:
    """Write a dataset file as out/documents.jsonl (left out for a format without contexts) and
    out/questions.jsonl, the files `kb build` and the evaluator read; returns a one-line summary.
    Files of an earlier conversion are replaced only with overwrite; both appear together, each whole."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out}: is a file, not a folder")
    held = [name for name in OUTPUTS if (out / name).exists()]
    if held and not overwrite:
        raise UserError(f"out={out}: already holds {', '.join(held)}; overwrite=true replaces them, or give another out")
    kind = _kind(path, format)
    documents, questions = read_dataset(path, kind)
    with ExitStack() as stack:  # every file written before any is renamed into place
        for name, records in zip(OUTPUTS, (documents, questions)):
            if records:
                f = stack.enter_context(atomic_writer(out / name))
                for record in records:
                    f.write(json.dumps(record.to_json(), ensure_ascii=False).encode("utf-8") + b"\n")
    if not documents:  # an earlier conversion's documents would pass for this one's
        (out / OUTPUTS[0]).unlink(missing_ok=True)
    answerable = sum(bool(q.answers) for q in questions)
    hops = Counter(q.hops for q in questions)
    return (f"{path} ({kind}) -> {out}: {len(documents)} documents"
            f"{'' if documents else f' ({kind} has no contexts)'}, {len(questions)} questions "
            f"({answerable} answerable, {len(questions) - answerable} unanswerable), hops "
            + (", ".join(f"{h}: {n}" for h, n in sorted(hops.items())) if None not in hops else "unknown"))


def _kind(path: str | Path, format: str) -> str:
    if format not in ("auto", *FORMATS):
        raise UserError(f"format={format!r}: allowed values are auto, {', '.join(FORMATS)}")
    return detect_format(path) if format == "auto" else format


class _Collected:
    """The documents (deduplicated by content, in order of first appearance) and questions read so far."""

    def __init__(self, source: str):
        self.source = source
        self.documents: dict[str, Document] = {}
        self.questions: list[Question] = []

    def document(self, title: str, text: str, where: str) -> str:
        """The id of the document with this title and text, added when new."""
        _unicode(where, title, text)
        doc = Document(id="", title=title, text=text, source=self.source)
        digest = doc.content_hash()
        if digest not in self.documents:
            doc_id = f"{title}/{digest[:12]}" if title else digest[:12]
            self.documents[digest] = Document(id=doc_id, title=title, text=text, source=self.source)
        return self.documents[digest].id

    def question(self, question: Question, where: str) -> None:
        _unicode(where, question.question, question.id, *question.answers)
        self.questions.append(question)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(where: str, *texts: str) -> None:
    """JSON can escape lone UTF-16 surrogates ("\\ud800"): not text, and the files written are UTF-8."""
    if any(_SURROGATE.search(t) for t in texts):
        raise UserError(f"{where}: holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not Unicode text")


# Records --------------------------------------------------------------------------------------------


def _object(value: Any, where: str, what: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected {what}, got {_json_type(value)}")
    return value


def _list(obj: dict, key: str, where: str) -> list:
    value = obj.get(key)
    if not isinstance(value, list):
        raise UserError(f"{where}: {key!r} must be a list, got {_json_type(value)}")
    return value


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {key!r} must be a non-empty string")
    return value


def _identifier(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {key!r} must be a non-empty string or integer")
    return value


def _unique(texts: Iterable[str]) -> tuple[str, ...]:
    """Answer texts stripped and deduplicated, in their order (the first is the canonical one)."""
    return tuple(dict.fromkeys(t.strip() for t in texts))


def _answer_list(obj: dict, key: str, where: str) -> tuple[str, ...]:
    values = _list(obj, key, where)
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
            raise UserError(f"{where}: {key!r}[{i}] must be a non-empty string or a number, got {_json_type(value)}")
    return _unique(str(v) for v in values)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return "an empty string" if value == "" else names.get(type(value), "a number")


def _read_squad(stream: "_JsonStream", out: _Collected) -> None:
    path = stream.path
    stream.top("{", "a JSON object with a 'data' list (squad)")
    seen_data = False
    for key in stream.members():
        if key != "data":
            stream.value()
            continue
        seen_data = True
        if stream.peek() != "[":
            raise UserError(f"{path}: 'data' must be a list of articles (squad)")
        for i in stream.elements():
            where = f"{path}: data[{i}]"
            article = _object(stream.value(), where, "an article {title, paragraphs}")
            title = article.get("title", "")
            if not isinstance(title, str):
                raise UserError(f"{where}: 'title' must be a string")
            for j, paragraph in enumerate(_list(article, "paragraphs", where)):
                _squad_paragraph(_object(paragraph, f"{where}.paragraphs[{j}]", "a paragraph {context, qas}"),
                                 title, f"{where}.paragraphs[{j}]", out)
    stream.end()
    if not seen_data:
        raise UserError(f"{path}: no 'data' list (squad)")


def _squad_paragraph(paragraph: dict, title: str, where: str, out: _Collected) -> None:
    doc_id = out.document(title, _text(paragraph, "context", where), where)
    for k, qa in enumerate(_list(paragraph, "qas", where)):
        at = f"{where}.qas[{k}]"
        qa = _object(qa, at, "a question {id, question, answers}")
        question, qid = _text(qa, "question", at), _identifier(qa, "id", at)
        impossible = qa.get("is_impossible", False)
        if not isinstance(impossible, bool):
            raise UserError(f"{at}: 'is_impossible' must be true or false")
        texts = () if impossible else _unique(
            _text(_object(a, f"{at}.answers[{n}]", "an answer {text, answer_start}"), "text", f"{at}.answers[{n}]")
            for n, a in enumerate(_list(qa, "answers", at)))
        if not impossible and not texts:
            # scored as "should abstain", which is wrong for a question that has an answer nobody wrote down
            raise UserError(f"{at}: 'answers' is empty but 'is_impossible' is not true")
        out.question(Question(question, texts, (doc_id,) if texts else (), id=qid, hops=1), at)


def _multihop_kind(example: Any) -> str | None:
    if not isinstance(example, dict) or "context" not in example or "supporting_facts" not in example:
        return None
    return "2wiki" if "evidences" in example or example.get("type") in _TWO_WIKI_TYPES else "hotpotqa"


def _paragraph_text(sentences: list[str]) -> str:
    """HotpotQA's sentences carry their leading space, 2Wiki's do not: join with one space only where
    neither side has one."""
    text = ""
    for s in sentences:
        text += s if not text or text[-1].isspace() or s[:1].isspace() else " " + s
    return text.strip()


def _read_multihop(stream: "_JsonStream", out: _Collected, kind: str) -> None:
    stream.top("[", f"a JSON list of examples ({kind})")
    for i in stream.elements():
        where = f"{stream.path}: [{i}]"
        example = _object(stream.value(), where, "an example {_id, question, answer, context, supporting_facts}")
        qid, question = _identifier(example, "_id", where), _text(example, "question", where)
        answer = _text(example, "answer", where).strip()
        paragraphs: dict[str, str] = {}  # title -> document id; a title the context repeats: the first
        for j, pair in enumerate(_list(example, "context", where)):
            at = f"{where}.context[{j}]"
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and pair[0].strip()
                    and isinstance(pair[1], list) and all(isinstance(s, str) for s in pair[1])):
                raise UserError(f"{at}: expected [title, [sentences]] with a non-empty title and string sentences")
            text = _paragraph_text(pair[1])
            if text:  # a paragraph without text is nothing to retrieve (naming it as support is an error)
                paragraphs.setdefault(pair[0], out.document(pair[0], text, at))
        gold: dict[str, None] = {}
        for j, fact in enumerate(_list(example, "supporting_facts", where)):
            at = f"{where}.supporting_facts[{j}]"
            if not (isinstance(fact, list) and len(fact) == 2 and isinstance(fact[0], str)
                    and isinstance(fact[1], int) and not isinstance(fact[1], bool) and fact[1] >= 0):
                raise UserError(f"{at}: expected [title, sentence index] with a string title and an index >= 0")
            if fact[0] not in paragraphs:
                raise UserError(f"{at}: {fact[0]!r} names no paragraph of the example's context with text")
            gold.setdefault(paragraphs[fact[0]], None)
        if not gold:
            raise UserError(f"{where}: 'supporting_facts' is empty: the gold paragraphs are unknown")
        out.question(Question(question, (answer,), tuple(gold), id=qid, hops=len(gold)), where)
    stream.end()


def _read_jsonl(f: BinaryIO, path: str | Path, out: _Collected, kind: str) -> None:
    for where, obj in json_lines(f, path):
        obj = _object(obj, where, "a JSON object")
        question = _text(obj, "question", where)
        if kind == "flashrag":
            qid, key = _identifier(obj, "id", where), "golden_answers"
            if not isinstance(obj.get("metadata", {}), dict):
                raise UserError(f"{where}: 'metadata' must be a JSON object (or left out)")
        else:
            qid, key = where, "answer"
        out.question(Question(question, _answer_list(obj, key, where), id=qid), where)


# Streaming JSON -------------------------------------------------------------------------------------


def _open(path: str | Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e}); allowed formats: {ALLOWED}") from None


def _unknown(path: str | Path, found: str) -> NoReturn:
    raise UserError(f"{path}: unknown format ({found}); allowed formats: {ALLOWED}")


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER_CHARS = re.compile(r"[-+.eE0-9]*")
_DECODER = json.JSONDecoder()


class _JsonStream:
    """One JSON document read a value at a time: the caller walks the containers it wants to stream
    (members of an object, elements of a list) and decodes the values inside them whole. Only the
    unread rest of a chunk and the value being decoded are held as text."""

    CHUNK = 1 << 20

    def __init__(self, f: BinaryIO, path: str | Path):
        self.f, self.path = f, path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof = "", 0, False
        self.offset = 0  # bytes read so far
        self.broken = ""  # the error of a byte that is not UTF-8, read but not yet reached
        self.line = 1  # the line of self.buf[0]

    def _more(self) -> bool:
        """Read the next chunk into the buffer (dropping what was consumed); False at the end."""
        if self.broken:
            raise UserError(self.broken)
        if self.eof:
            return False
        data = self.f.read(self.CHUNK)
        pending = self.decoder.getstate()[0]
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            # raised once the text before the bad byte is used up: detecting a JSONL file's format
            # reads its first line only, and a later bad line is reported by its number
            self.broken = (f"{self.path}: not UTF-8 text ({e.reason} at byte {self.offset - len(pending) + e.start}); "
                           f"allowed formats: {ALLOWED}")
            text = (pending + data)[:e.start].decode("utf-8")
        if self.offset == 0:
            text = text.removeprefix("\ufeff")
        self.offset += len(data)
        self.eof = not data and not self.broken
        self.line += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos:] + text, 0
        return True

    def _error(self, what: str, pos: int | None = None) -> NoReturn:
        pos = self.pos if pos is None else pos
        line = self.line + self.buf.count("\n", 0, pos)
        column = pos - self.buf.rfind("\n", 0, pos)
        raise UserError(f"{self.path}: not valid JSON ({what} at line {line} column {column}); "
                        f"allowed formats: {ALLOWED}")

    def peek(self) -> str | None:
        """The next character that is not whitespace, left unread; None at the end of the file."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return None

    def _take(self, allowed: str, what: str) -> str:
        c = self.peek()
        if c is None or c not in allowed:
            self._error(f"expected {what}, found {'the end of the file' if c is None else repr(c)}")
        self.pos += 1
        return c

    def top(self, opening: str, expected: str) -> None:
        """Check that the document is the container `opening` starts (left unread)."""
        c = self.peek()
        if c != opening:
            raise UserError(f"{self.path}: expected {expected}, found "
                            f"{'an empty file' if c is None else repr(c)}; allowed formats: {ALLOWED}")

    def end(self) -> None:
        if self.peek() is not None:
            self._error("more data after the JSON value")

    def value(self) -> Any:
        """The next JSON value, decoded whole."""
        self.peek()
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # Input cut at the chunk's end fails at its end ("tru", "\\u00") or in a string that
                # runs on: read on. An error earlier in the buffer is the file's own.
                cut = e.pos >= len(self.buf) - 8 or e.msg.startswith("Unterminated string")
                if cut and self._more():
                    continue
                self._error(e.msg, e.pos)
            except (ValueError, RecursionError) as e:  # integers too long to convert, nesting too deep
                self._error(" ".join(str(e).split()))
            else:
                # a number the chunk's end cut ("1." of "1.25") decodes as another: read on to its end
                number = isinstance(obj, (int, float)) and not isinstance(obj, bool)
                if number and _NUMBER_CHARS.match(self.buf, end).end() == len(self.buf) and self._more():
                    continue
                self.pos = end
                return obj

    def elements(self) -> Iterator[int]:
        """Enter a list: yields each element's index, and the caller reads the element before the next."""
        self._take("[", "'['")
        if self.peek() == "]":
            self.pos += 1
            return
        for i in itertools.count():
            yield i
            if self._take(",]", "',' or ']'") == "]":
                return

    def members(self) -> Iterator[str]:
        """Enter an object: yields each key, and the caller reads its value before the next."""
        self._take("{", "'{'")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            if self.peek() != '"':
                self._error("expected a key in double quotes")
            key = self.value()
            self._take(":", "':'")
            yield key
            if self._take(",}", "',' or '}'") == "}":
                return
