"""reading=rank_order: each retrieved document read alone, in rank order; the answer is read from the
first one the model does not abstain on (the abstention threshold deciding as it does for a prompt of
all documents), ABSTAIN where none suffices, and its citation is that document's number.

A fake engine and confidence (Answerer._generate, Answerer.confidence) give every (question,
document) prompt a chosen reply and confidence (the engine's as a score read from the generation's
prefill, as the real one does), so each test knows which document must be read; the Answerer's own
threshold logic runs unchanged. The apps' side (evaluate, chat, serve) runs on the
tiny checkpoint of tests/serve_checkpoint.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from serve_checkpoint import save_cited_checkpoint

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.evaluate import EvalConfig, Prepared, prepare, read_record
from hybridchat.model.engine import GenerationResult
from hybridchat.rag.answer import ABSTAIN, Answerer, RankOrderReader, score
from hybridchat.training.runs import load_run, reading_setting

ROOT = Path(__file__).resolve().parents[1]
DOCS = {name: Document(f"doc-{name}", name.title(), f"The {name} document says {says}.")
        for name, says in (("alpha", "little"), ("beta", "Bee"), ("gamma", "Sea"), ("delta", "Dee"))}
A, B, C, D = DOCS.values()
# (question, document) -> (the reply the model writes reading it alone, its confidence)
SCRIPT = {
    ("Q1?", "alpha"): (ABSTAIN, 0.10), ("Q1?", "beta"): ("[1] Bee", 0.50), ("Q1?", "gamma"): ("[1] Sea", 0.99),
    ("Q2?", "alpha"): (ABSTAIN, 0.30), ("Q2?", "beta"): (ABSTAIN, 0.20), ("Q2?", "gamma"): (ABSTAIN, 0.40),
    ("Q3?", "gamma"): ("Sea [1]", 0.95), ("Q3?", "beta"): ("[1] Bee", 0.97),
    ("Q4?", "alpha"): (ABSTAIN, 0.70), ("Q4?", "delta"): ("[1] Dee", 0.80),
}
INSTEAD = "[1] Otherwise"  # the reply where the abstention's first token is ruled out


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [f"{d.title} {d.id} {d.text}" for d in DOCS.values()] + [ABSTAIN, INSTEAD, "Q1? Q2? Q3? Q4? [1] [2] [3]"]
    return Tokenizer.train(texts * 20, 400)


def _pair(tok, prompt: list[int]) -> tuple[str, str]:
    text = tok.decode(prompt)
    question = next(q for q in ("Q1?", "Q2?", "Q3?", "Q4?") if q in text)
    shown = [name for name, d in DOCS.items() if f"({d.id})" in text]
    assert len(shown) == 1, f"a prompt read in rank order holds one document, this one {shown}"
    return question, shown[0]


@pytest.fixture
def fake(tok, monkeypatch):
    """Answerer._generate and .confidence read each prompt's (question, document) from SCRIPT; every
    call is recorded: [(what, [(question, document), ...])]."""
    calls = []

    def generate(self, prompts, on_token=None, suppress=(), admit=None):
        pairs = [_pair(tok, p) for p in prompts]
        calls.append(("instead" if suppress else "generate", pairs))
        replies = [INSTEAD if suppress else SCRIPT[pair][0] for pair in pairs]
        if admit is None:
            return GenerationResult([tok.encode(r) for r in replies], ["stop"] * len(replies))
        scores = [math.log(1 - SCRIPT[pair][1]) for pair in pairs]  # log P(ABSTAIN)
        refused = [not admit(j, s) for j, s in enumerate(scores)]
        return GenerationResult([[] if r else tok.encode(reply) for r, reply in zip(refused, replies)],
                                ["refused" if r else "stop" for r in refused], scores=scores)

    def confidence(self, prompts):
        pairs = [_pair(tok, p) for p in prompts]
        calls.append(("confidence", pairs))
        return torch.tensor([SCRIPT[pair][1] for pair in pairs], dtype=torch.float64)

    monkeypatch.setattr(Answerer, "_generate", generate)
    monkeypatch.setattr(Answerer, "confidence", confidence)
    return calls


def reader(tok, threshold=None, batch_size=32, max_context=200) -> RankOrderReader:
    return RankOrderReader(Answerer(object(), tok, max_context, max_answer_tokens=8, batch_size=batch_size,
                                    threshold=threshold))


def test_without_a_threshold_the_first_document_the_model_answers_from_is_read(tok, fake):
    answers = reader(tok).answer(["Q1?", "Q2?", "Q3?"], [[A, B, C], [A, B, C], [C, B]])
    q1, q2, q3 = answers
    # Q1: alpha abstains; beta answers, though gamma is more confident: the first that suffices
    assert (q1.reply, q1.answer, q1.citations, q1.cited, q1.read) == ("[2] Bee", "Bee", [2], [B], 2)
    assert not q1.abstained
    assert q1.documents == [A, B, C] and q1.read_confidences == pytest.approx([0.10, 0.50, 0.99])
    assert q1.confidence == pytest.approx(0.99)
    # Q2: every document alone abstains
    assert (q2.reply, q2.answer, q2.citations, q2.read, q2.abstained) == (ABSTAIN, ABSTAIN, [], None, True)
    assert not q2.below_threshold and q2.confidence == pytest.approx(0.40)
    assert q2.read_confidences == pytest.approx([0.30, 0.20, 0.40])
    # Q3: the first document answers; the model's own citation order is kept, its number made the rank
    assert (q3.reply, q3.citations, q3.cited, q3.read) == ("Sea [1]", [1], [C], 1)
    # one batch: every (question, document) prompt through the engine at once, its confidence read there
    assert [what for what, _ in fake] == ["generate"]
    assert fake[0][1] == [("Q1?", "alpha"), ("Q1?", "beta"), ("Q1?", "gamma"), ("Q2?", "alpha"),
                                        ("Q2?", "beta"), ("Q2?", "gamma"), ("Q3?", "gamma"), ("Q3?", "beta")]
    assert score(q1, ["Bee"], ["doc-beta"])["citation"] == 1.0 and score(q2, ["Bee"])["false_abstention"] == 1.0


def test_with_a_threshold_the_first_document_at_or_above_it_is_read_and_only_it_generated(tok, fake):
    answers = reader(tok, threshold=0.6).answer(["Q1?", "Q2?", "Q4?", "Q3?"], [[A, B, C], [A, B, C], [A, D], [C, B]])
    q1, q2, q4, q3 = answers
    assert (q1.reply, q1.citations, q1.read, q1.cited) == ("[3] Sea", [3], 3, [C])  # beta's 0.50 is below 0.6
    assert (q2.reply, q2.abstained, q2.below_threshold, q2.read) == (ABSTAIN, True, True, None)  # none reaches it
    # alpha's 0.70 is at or above it: read, and its abstention overruled, as a prompt of all documents is
    assert (q4.reply, q4.read, q4.citations, q4.over_abstention, q4.abstained) == (INSTEAD, 1, [1], True, False)
    assert (q3.reply, q3.read) == ("Sea [1]", 1)
    assert [what for what, _ in fake] == ["confidence", "generate", "instead"]
    assert len(fake[0][1]) == 10  # every pair's confidence, in one call
    assert fake[1][1] == [("Q1?", "gamma"), ("Q4?", "alpha"), ("Q3?", "gamma")]  # one chosen pair per question
    assert fake[2][1] == [("Q4?", "alpha")]


def test_the_threshold_decides_per_document_exactly_where_the_answerer_would(tok, fake):
    """A threshold of 0 reads the first document; one above every confidence abstains everywhere."""
    first = reader(tok, threshold=0.0).answer(["Q1?", "Q3?"], [[A, B, C], [B, C]])
    assert [a.read for a in first] == [1, 1] and first[0].reply == "[1] Otherwise" and first[0].over_abstention
    none = reader(tok, threshold=0.999).answer(["Q1?", "Q3?"], [[A, B, C], [B, C]])
    assert all(a.abstained and a.below_threshold and a.read is None for a in none)
    assert [what for what, _ in fake][-1] == "confidence"  # nothing generated for questions below it


def test_each_batch_of_questions_goes_through_at_once(tok, fake):
    reader(tok, batch_size=2).answer(["Q1?", "Q2?", "Q3?"], [[A, B, C], [A, B, C], [C, B]])
    generated = [pairs for what, pairs in fake if what == "generate"]
    assert [len(p) for p in generated] == [6, 2]


def test_a_document_too_long_to_read_alone_is_left_out_and_the_numbers_follow_those_read(tok, fake):
    huge = Document("doc-huge", "Huge", "words " * 400)
    r = reader(tok, max_context=120)
    [q1] = r.answer(["Q1?"], [[A, huge, B, C]])
    assert q1.documents == [A, B, C] and q1.dropped == 1
    assert (q1.read, q1.citations, q1.cited, q1.reply) == (2, [2], [B], "[2] Bee")
    [empty] = r.answer(["Q1?"], [[]])  # nothing retrieved: nothing read, the abstention
    assert (empty.reply, empty.read, empty.read_confidences, empty.documents) == (ABSTAIN, None, [], [])


def test_the_evaluator_records_which_document_was_read(tok, fake):
    q1, q2 = reader(tok).answer(["Q1?", "Q2?"], [[A, B, C], [A, B]])
    assert read_record(q1) == {"read": 2, "read_document": "doc-beta", "read_documents": ["doc-alpha", "doc-beta",
                                                                                          "doc-gamma"],
                               "read_confidences": pytest.approx([0.10, 0.50, 0.99])}
    assert read_record(q2)["read"] is None and read_record(q2)["read_document"] is None
    together = Answerer(object(), tok, 200, max_answer_tokens=8).answer(["Q1?"], [[B]])[0]
    assert together.read_confidences is None and read_record(together) == {}


def _prepared(tok, reading: str) -> Prepared:
    evaluated = SimpleNamespace(tokenizer=tok, config=SimpleNamespace(model=SimpleNamespace(sequence_len=200)))
    return Prepared(EvalConfig(reading=reading), [], 1, "rag", evaluated, None, None, [], {})


def test_the_evaluator_reads_documents_as_reading_says_and_closed_book_as_before(tok, fake):
    ask = _prepared(tok, "rank_order").asker(object(), {"threshold": 0.6})
    assert isinstance(ask.__self__, RankOrderReader) and ask.__self__.threshold == 0.6
    assert ask(["Q1?"], [[A, B, C]])[0].read == 3
    closed = _prepared(tok, "rank_order").asker(object(), {"threshold": 0.6}, documents=False)
    assert type(closed.__self__) is Answerer
    assert type(_prepared(tok, "together").asker(object(), {"threshold": 0.6}).__self__) is Answerer


def test_two_hop_questions_are_refused_rank_order_before_anything_loads():
    with pytest.raises(UserError, match=r"^reading=rank_order answers from one document read alone; 2-hop"):
        prepare(EvalConfig(hops=2, reading="rank_order"))


@pytest.mark.parametrize("value", ["rank", "Together", "", "each"])
def test_a_bad_reading_is_one_error_naming_the_key_and_the_choices(value):
    with pytest.raises(UserError, match=rf"^reading='{value}' must be together \(.*\) or rank_order \("):
        reading_setting(value)
    assert reading_setting("together") == "together" and reading_setting("rank_order") == "rank_order"


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})


@pytest.mark.parametrize("app", ["hybridchat.evaluate", "hybridchat.chat"])
def test_on_the_command_line_a_bad_reading_is_one_line_and_exit_2(app, tmp_path):
    result = _cli(app, "reading=each", f"paths.outputs={tmp_path}", "prompt=Who?" if app.endswith("chat") else "seed=0")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: reading='each' must be together"), lines


def test_reading_at_its_default_leaves_recorded_config_hashes_alone():
    from hybridchat.results import config_hash as hashing
    from hybridchat.results.records import AppConfig

    hashing.register_schemas()
    assert "reading" not in hashing.composed("eval", []) and "reading" not in hashing.composed("eval", ["hops=2"])
    assert hashing.composed("eval", ["reading=rank_order"])["reading"] == "rank_order"
    today = hashing.config_hash([AppConfig("evaluate", ())])
    assert hashing.config_hash([AppConfig("evaluate", ("reading=together",))]) == today
    assert hashing.config_hash([AppConfig("evaluate", ("reading=rank_order",))]) != today


# -- the apps on a tiny checkpoint: random weights that always begin a reply "[1]" ---------------------

QUESTION = "Where does Vipiren Reivailo live?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("rank_order")
    return out, save_cited_checkpoint(out)


def _expected(step: Path, out: Path, threshold=None):
    from hybridchat.retrieval.config import RetrieverConfig

    run = load_run(step)
    retriever = run.build_retriever(RetrieverConfig(kind="bm25"), out / "cache", progress=False)
    documents = [h.document for h in retriever.search([QUESTION], top_k=3)[0]]
    answerer = Answerer(run.model, run.tokenizer, run.config.model.sequence_len, max_answer_tokens=6,
                        threshold=threshold)
    return RankOrderReader(answerer).answer([QUESTION], [documents])[0], answerer.answer([QUESTION], [documents])[0]


def test_chat_reads_in_rank_order_and_says_which_document_it_read(tiny):
    out, step = tiny
    result = _cli("hybridchat.chat", f"paths.outputs={out}", "run_name=tiny", "max_answer_tokens=6",
                  "reading=rank_order", f"prompt={QUESTION}")
    assert result.returncode == 0, result.stderr
    want, together = _expected(step, out)
    assert want.read == 1 and want.reply.startswith("[1]") and want.documents == together.documents
    assert "each document read alone in rank order" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "sources:" and [line.split()[0] for line in lines[1:4]] == ["[1]", "[2]", "[3]"]
    assert f"answer: {want.reply}" in lines
    alone = ", ".join(f"[{n}] {c:.2f}" for n, c in enumerate(want.read_confidences, 1))
    assert f"read alone in rank order: answered from [1] (confidence with each: {alone})" in lines
    assert f"cited: [1] {want.documents[0].title} ({want.documents[0].id})" in lines
    refused = _cli("hybridchat.chat", f"paths.outputs={out}", "run_name=tiny", "reading=rank_order", "max_hops=2",
                   f"prompt={QUESTION}")
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert refused.stderr.startswith("error: reading=rank_order answers from one document read alone") and \
        "set max_hops=1, or leave reading at together" in refused.stderr


def test_serve_reads_in_rank_order_and_returns_the_document_read(tiny):
    from hybridchat.bench.serve import start_server

    out, step = tiny
    proc, url, lines = start_server([f"paths.outputs={out}", "run_name=tiny", "max_answer_tokens=6",
                                     "reading=rank_order"], timeout=300)
    try:
        about = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["hybridchat"]
        assert about["reading"] == "rank_order" and about["coverage_exponent"] == 0.0  # no threshold stored
        body = {"model": "tiny/rag", "messages": [{"role": "user", "content": QUESTION}]}
        got = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        streamed = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120).text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    want, _ = _expected(step, out)
    extra = got["hybridchat"]
    assert got["choices"][0]["message"]["content"] == want.reply
    assert (extra["mode"], extra["read"], extra["citations"]) == ("rank-order", want.read, [want.read])
    assert extra["read_confidences"] == pytest.approx(want.read_confidences)
    assert [s["id"] for s in extra["sources"]] == [d.id for d in want.documents]
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")) == want.reply
    assert "Traceback" not in "".join(lines)
