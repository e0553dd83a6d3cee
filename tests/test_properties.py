"""Property-based tests (hypothesis) for every reader of user input: whatever the bytes, a reader
either loads them or raises UserError with a one-line message, never another exception.

Inputs: arbitrary bytes (non-UTF-8 included), JSON of every type in the wrong places, nulls, huge
and non-finite numbers, lone UTF-16 surrogate escapes, deep nesting, empty files, truncated files.
"""

import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hybridchat.core.errors import UserError
from hybridchat.core.questions import read_questions
from hybridchat.data.sources import DataConfig, files_source
from hybridchat.model.blocks import MIXERS, PATTERN_PRESETS, expand_pattern
from hybridchat.retrieval.ingest import read_documents

# HYPOTHESIS_EXAMPLES=2000 for a deeper search than the suite's few seconds.
EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "60"))
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- strategies ------------------------------------------------------------------------------------

NASTY_LINES = [
    b"", b"   ", b"\xff\xfe\x00", b"\xef\xbb\xbf{\"text\": \"bom\"}", b"{", b"[" * 5000 + b"]" * 5000,
    b"1" * 5000, b"NaN", b"-Infinity", b"1e999", b"null", b"true", b'"\\ud800"', b'{"text": "\\udfff x"}',
    b'{"text": "a\\u0000b"}', b'{"id": "\\ud83d", "text": "lone high surrogate in the id"}',
    b'{"id": 1e400, "text": "x"}', b'{"id": true, "text": "x"}', b'{"id": 12345678901234567890123, "text": "x"}',
    b'{"text": {"nested": [1, 2]}}', b'{"text": ""}', b'{"metadata": [1], "id": "m", "text": "t"}',
    b'{"id": "q", "text": "t", "metadata": {"k": "\\ud800"}}', b'{"id": "a", "text": "t", "title": 5}',
    b'{"question": "q?", "gold_doc_ids": ["d"], "answers": [' + b"9" * 4500 + b"]}",
]
KEYS = st.sampled_from(["text", "id", "title", "content", "metadata", "source", "question", "answers",
                        "gold_doc_ids", "format_version", "architecture"]) | st.text(max_size=4)
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**30) | st.floats()
           | st.text(max_size=12) | st.sampled_from(["", " ", "\ud800", "\x00", "<|bos|>", "A" * 200]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(KEYS, inner, max_size=4), max_leaves=10)
RECORDS = st.dictionaries(KEYS, JSON_VALUES, max_size=5)


def _dump(value) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")  # keeps "\ud800" as an escape


LINES = st.one_of(RECORDS.map(_dump), JSON_VALUES.map(_dump), st.sampled_from(NASTY_LINES), st.binary(max_size=40),
                  st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")))
FILES = st.lists(LINES, max_size=6).flatmap(
    lambda lines: st.sampled_from([b"\n", b"\r\n"]).map(lambda nl: nl.join(lines)))


def one_line_error(e: UserError) -> None:
    assert "\n" not in str(e) and str(e).strip(), repr(str(e))


def in_tmp(fn):
    """Run fn(tmp_dir) in a fresh temporary directory (hypothesis reruns tests many times per fixture)."""
    with tempfile.TemporaryDirectory() as d:
        return fn(Path(d))


# ---- data=text sources ------------------------------------------------------------------------------

@FAST
@given(content=FILES | st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".txt", ".md"]),
       text_key=st.sampled_from(["text", "content"]))
@example(content=b'{"text": 5}', suffix=".jsonl", text_key="text")
@example(content=b'{"text": "\\ud800"}', suffix=".jsonl", text_key="text")
def test_text_sources_read_or_raise_user_error(content, suffix, text_key):
    def check(tmp):
        file = tmp / f"corpus{suffix}"
        file.write_bytes(content)
        source = files_source(file, DataConfig(name="text", path=str(file), val_fraction=0.5, text_key=text_key))
        try:
            docs = list(source("train", 0)) + list(source("val", 0))
        except UserError as e:
            one_line_error(e)
            assert str(file) in str(e)
            return
        for doc in docs:
            assert isinstance(doc, str)
            doc.encode("utf-8")  # the tokenizer hashes and encodes every document as UTF-8

    in_tmp(check)


PARQUET_COLUMNS = st.one_of(
    st.lists(st.none() | st.text(max_size=10), min_size=0, max_size=6).map(lambda v: pa.array(v, pa.string())),
    st.lists(st.none() | st.text(max_size=10), max_size=6).map(lambda v: pa.array(v, pa.large_string())),
    st.lists(st.integers(-10**9, 10**9) | st.none(), max_size=6).map(lambda v: pa.array(v, pa.int64())),
    st.lists(st.floats() | st.none(), max_size=6).map(lambda v: pa.array(v, pa.float64())),
    st.lists(st.binary(max_size=8) | st.none(), max_size=6).map(lambda v: pa.array(v, pa.binary())),
    st.lists(st.lists(st.text(max_size=4), max_size=2) | st.none(), max_size=6).map(
        lambda v: pa.array(v, pa.list_(pa.string()))),
)


@FAST
@given(column=PARQUET_COLUMNS, name=st.sampled_from(["text", "body"]), cut=st.none() | st.integers(0, 400),
       garbage=st.none() | st.binary(max_size=64))
def test_parquet_sources_read_or_raise_user_error(column, name, cut, garbage):
    def check(tmp):
        file = tmp / "corpus.parquet"
        if garbage is not None:
            file.write_bytes(garbage)
        else:
            pq.write_table(pa.table({name: column}), file)
            if cut is not None:  # a truncated download
                file.write_bytes(file.read_bytes()[:cut])
        source = files_source(file, DataConfig(name="text", path=str(file), val_fraction=0.5))
        try:
            docs = list(source("train", 0)) + list(source("val", 0))
        except UserError as e:
            one_line_error(e)
            assert str(file) in str(e)
            return
        assert all(isinstance(d, str) for d in docs)
        assert len(docs) == len(column)

    in_tmp(check)


# ---- knowledge base inputs: kb build / kb add readers, and what build does with what they accept ----

def valid_document(doc) -> None:
    assert isinstance(doc.id, str) and doc.id.strip()
    assert isinstance(doc.text, str) and doc.text.strip() and isinstance(doc.title, str)
    assert isinstance(doc.metadata, dict)
    json.dumps(doc.to_json(), ensure_ascii=False).encode("utf-8")  # how documents.jsonl stores it


@FAST
@given(content=FILES | st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".txt", ".md"]),
       skip_bad=st.booleans())
@example(content=b'{"id": "x", "text": "\\ud800"}', suffix=".jsonl", skip_bad=False)
def test_kb_input_readers_read_or_raise_user_error(content, suffix, skip_bad):
    def check(tmp):
        file = tmp / f"docs{suffix}"
        file.write_bytes(content)
        try:
            docs, report = read_documents([file], skip_bad=skip_bad)
        except UserError as e:
            one_line_error(e)
            assert str(file) in str(e)
            return
        for doc in docs:
            valid_document(doc)
        assert report.read == len(docs)

    in_tmp(check)


@settings(max_examples=max(25, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=FILES)
@example(content=b'{"id": "x", "text": "ok \\ud800"}\n{"id": "y", "text": "fine", "metadata": {"k": [1, {"a": null}]}}')
@example(content=b'{"id": "x", "text": "!!! a b"}')
def test_whatever_the_readers_accept_builds_opens_and_searches(content):
    from hybridchat.retrieval.config import RetrieverConfig
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

    def check(tmp):
        file = tmp / "docs.jsonl"
        file.write_bytes(content)
        docs, _ = read_documents([file], skip_bad=True)
        try:
            kb = KnowledgeBase.build(tmp / "kb", docs, ["bm25", "simple"], RetrieverConfig(), progress=False)
        except UserError as e:  # the only refusals of accepted documents: nothing to index
            one_line_error(e)
            assert ("would be empty" in str(e)) == (not docs) and (docs == [] or "no document has a word" in str(e))
            return
        reopened = KnowledgeBase.open(kb.path)
        assert [d.to_json() for d in reopened.documents] == [d.to_json() for d in docs]
        for kind in ("bm25", "simple"):
            reopened.retriever(RetrieverConfig(kind=kind)).search([docs[0].text, "\ud800 x", ""], 3)

    in_tmp(check)


@FAST
@given(line=LINES, where=st.integers(0, 2))
def test_damaged_documents_jsonl_opens_or_raises_user_error(line, where):
    from hybridchat.retrieval.config import RetrieverConfig
    from hybridchat.retrieval.knowledge_base import KnowledgeBase

    def check(tmp):
        src = tmp / "docs.jsonl"
        src.write_text("".join(json.dumps({"id": f"d{i}", "text": f"text {i}"}) + "\n" for i in range(3)))
        kb = KnowledgeBase.build(tmp / "kb", read_documents([src])[0], ["simple"], RetrieverConfig(), progress=False)
        lines = (kb.path / "documents.jsonl").read_bytes().split(b"\n")
        lines[where] = line
        (kb.path / "documents.jsonl").write_bytes(b"\n".join(lines))
        try:
            opened = KnowledgeBase.open(kb.path)
        except UserError as e:
            one_line_error(e)
            return
        opened.retriever(RetrieverConfig(kind="simple")).search(["text"], 3)

    in_tmp(check)


# ---- questions JSONL (kb eval --questions) ---------------------------------------------------------

QUESTION_RECORDS = st.fixed_dictionaries(
    {}, optional={"question": JSON_VALUES, "answers": JSON_VALUES | st.lists(SCALARS, max_size=3),
                  "gold_doc_ids": JSON_VALUES | st.lists(st.text(max_size=5), max_size=3)}).map(_dump)


@FAST
@given(content=st.lists(QUESTION_RECORDS | LINES, max_size=5).map(b"\n".join) | st.binary(max_size=100))
@example(content=b'{"question": "q?", "gold_doc_ids": ["d"], "answers": 5}')
@example(content=b'{"question": "q?", "gold_doc_ids": ["d"], "answers": [null, [1]]}')
def test_questions_read_or_raise_user_error(content):
    def check(tmp):
        file = tmp / "q.jsonl"
        file.write_bytes(content)
        try:
            questions = read_questions(file)
        except UserError as e:
            one_line_error(e)
            assert str(file) in str(e)
            return
        for q in questions:
            assert isinstance(q.question, str) and q.question.strip()
            assert isinstance(q.gold_doc_ids, tuple) and all(isinstance(g, str) for g in q.gold_doc_ids)
            assert all(isinstance(a, str) for a in q.answers)

    in_tmp(check)


def test_missing_questions_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot be read"):
        read_questions(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="cannot be read"):
        read_questions(tmp_path)  # a folder


# ---- checkpoint meta.json ---------------------------------------------------------------------------

def read_meta_or_user_error(tmp: Path, content: bytes) -> None:
    from hybridchat.infra.checkpoint import read_meta

    (tmp / "meta.json").write_bytes(content)
    try:
        meta = read_meta(tmp)
    except UserError as e:
        one_line_error(e)
        return
    assert isinstance(meta, dict)


META_OK = [b'{"format_version": 1, "step": 3}', b"{}", b'{"format_version": 0}']
META_REFUSED = {  # each once made read_meta raise something other than UserError; now each is refused
    "list": b"[1, 2]",
    "format_version string": b'{"format_version": "2"}',
    "format_version null": b'{"format_version": null}',
    "not UTF-8": b'{"format_version": 1, "note": "\xff"}',
    "deep nesting": b"[" * 100000 + b"]" * 100000,
    "huge integer": b'{"step": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("content", META_OK)
def test_checkpoint_meta_that_loads(tmp_path, content):
    read_meta_or_user_error(tmp_path, content)


@pytest.mark.parametrize("content", list(META_REFUSED.values()), ids=list(META_REFUSED))
def test_checkpoint_meta_that_is_refused_in_one_line(tmp_path, content):
    from hybridchat.infra.checkpoint import read_meta

    (tmp_path / "meta.json").write_bytes(content)
    with pytest.raises(UserError) as e:
        read_meta(tmp_path)
    one_line_error(e.value)


@settings(max_examples=EXAMPLES, deadline=None)
@given(content=JSON_VALUES.map(_dump) | RECORDS.map(_dump) | st.binary(max_size=60))
def test_checkpoint_meta_reads_or_raises_user_error(content):
    in_tmp(lambda tmp: read_meta_or_user_error(tmp, content))


# ---- block patterns ------------------------------------------------------------------------------

@settings(max_examples=max(100, EXAMPLES), deadline=None)
@given(pattern=st.text(max_size=12) | st.text(alphabet="AMam \t", max_size=12)
       | st.sampled_from(sorted(PATTERN_PRESETS)),
       n_layer=st.integers(1, 64))
@example(pattern="ß", n_layer=4)
@example(pattern="\u0131", n_layer=4)  # dotless i, upper() -> "I"
def test_block_pattern_expands_or_raises_user_error(pattern, n_layer):
    try:
        letters = expand_pattern(pattern, n_layer)
    except UserError as e:
        one_line_error(e)
        assert "model.block_pattern" in str(e)
        return
    assert len(letters) == n_layer and set(letters) <= set(MIXERS)
    if pattern not in PATTERN_PRESETS:  # letters are tiled, never reordered
        given_letters = pattern.strip().upper()
        assert letters == given_letters * (n_layer // len(given_letters))
