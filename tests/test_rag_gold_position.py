"""stage.gold_position: where a rag training example shows its gold document. `retrieved` keeps the
retriever's order (the gold at its rank among the documents shown, the last of them where it ranked
below them all); `uniform`, the default, is today's random place, checked against a copy of the
logic it had before the option existed, written as a plain loop."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.core.questions import Question
from hybridchat.rag.answer import ABSTAIN, parse_reply
from hybridchat.training.stages.rag import RagConfig, RagStage

ROOT = Path(__file__).resolve().parents[1]
OTHERS = [Document(f"o{i}", f"Other {i}", f"text {i}") for i in range(10)]
GOLD = Document("g", "Gold", "Ada Vell was born in Vellport.")


def stage(**settings) -> RagStage:
    """A rag stage with only what documents_and_reply reads: its config."""
    s = RagStage.__new__(RagStage)
    s.config = RagConfig(**{"min_documents": 1, "max_documents": 4, "candidates": 10, "gold_missing": 0.0, **settings})
    return s


def question(candidates, answers=("Vellport",), gold=("g",)) -> Question:
    return Question("Where was Ada Vell born?", tuple(answers), tuple(gold), tuple(candidates))


def ids(docs) -> list[str]:
    return [d.id for d in docs]


@pytest.mark.parametrize("rank, k, shown, cited", [
    (3, 4, ["o0", "o1", "g", "o2"], 3),    # the gold at its rank, the others in the retriever's order
    (3, 3, ["o0", "o1", "g"], 3),
    (1, 4, ["g", "o0", "o1", "o2"], 1),
    (4, 4, ["o0", "o1", "o2", "g"], 4),
    (3, 2, ["o0", "g"], 2),                # ranked below every shown place: it takes the last one
    (9, 1, ["g"], 1),
    (6, 3, ["o0", "o1", "g"], 3),
])
def test_retrieved_shows_the_retrievers_order_and_cites_the_golds_rank(rank, k, shown, cited):
    candidates = OTHERS[:rank - 1] + [GOLD] + OTHERS[rank - 1:9]
    s = stage(gold_position="retrieved", min_documents=k, max_documents=k)
    docs, reply = s.documents_and_reply(question(candidates), random.Random(0))
    assert ids(docs) == shown
    assert reply == f"[{cited}] Vellport"
    assert docs[parse_reply(reply)[1][0] - 1] is GOLD
    s.config.cite_first = False
    assert s.documents_and_reply(question(candidates), random.Random(0))[1] == f"Vellport [{cited}]"


def test_retrieved_shows_one_gold_chunk_the_best_ranked_at_its_place_among_the_others():
    first = Document("g#2", "Gold", "She moved to Kor.", metadata={"parent_id": "g"})
    second = Document("g#1", "Gold", GOLD.text, metadata={"parent_id": "g"})
    candidates = [OTHERS[0], first, OTHERS[1], second, OTHERS[2]]
    docs, reply = stage(gold_position="retrieved", min_documents=3, max_documents=3).documents_and_reply(
        question(candidates), random.Random(0))
    assert ids(docs) == ["o0", "g#2", "o1"] and reply == "[2] Vellport"


def test_retrieved_over_many_draws_keeps_the_order_and_abstains_only_where_the_gold_is_missing():
    candidates = [OTHERS[0], OTHERS[1], GOLD] + OTHERS[2:9]
    s, rng = stage(gold_position="retrieved", gold_missing=0.3), random.Random(7)
    kinds = {"answer": 0, "abstain": 0}
    for _ in range(500):
        docs, reply = s.documents_and_reply(question(candidates), rng)
        assert 1 <= len(docs) <= 4
        answer, cited, abstained = parse_reply(reply)
        if abstained:  # the gold removed: the best-ranked others, as before
            assert ids(docs) == ids(OTHERS[:len(docs)])
            kinds["abstain"] += 1
        else:
            want = {1: ["g"], 2: ["o0", "g"], 3: ["o0", "o1", "g"], 4: ["o0", "o1", "g", "o2"]}[len(docs)]
            assert ids(docs) == want and cited == [want.index("g") + 1] and answer == "Vellport"
            kinds["answer"] += 1
    assert 0.2 < kinds["abstain"] / 500 < 0.4  # stage.gold_missing alone sets it
    missed = question(OTHERS, gold=("elsewhere",))  # retrieval missed the gold: the abstention, either way
    assert all(parse_reply(s.documents_and_reply(missed, rng)[1])[2] for _ in range(20))
    unanswerable = question(candidates, answers=(), gold=())
    assert all(s.documents_and_reply(unanswerable, rng)[1] == ABSTAIN for _ in range(20))


def before_the_option(q: Question, rng: random.Random, c: RagConfig) -> tuple[list[Document], str]:
    """RagStage.documents_and_reply as it was before stage.gold_position, as a plain loop."""
    k = rng.randint(c.min_documents, c.max_documents)
    gold, others = [], []
    for d in q.candidates:
        if d.parent_id in q.gold_doc_ids:
            gold.append(d)
        else:
            others.append(d)
    if not q.answers or not gold or rng.random() < c.gold_missing:
        return others[:k], ABSTAIN
    shown = others[:k - 1]
    position = rng.randint(0, len(shown))
    shown.insert(position, gold[0])
    n = position + 1
    return shown, (f"[{n}] {q.answers[0]}" if c.cite_first else f"{q.answers[0]} [{n}]")


@pytest.mark.parametrize("cite_first", [True, False])
def test_the_default_is_uniform_and_draws_exactly_what_it_drew_before(cite_first):
    assert RagConfig().gold_position == "uniform"
    s = stage(gold_missing=0.2, cite_first=cite_first)
    pool = OTHERS + [GOLD, Document("g#3", "Gold", "x", metadata={"parent_id": "g"})]
    questions = []
    shuffler = random.Random(3)
    for i in range(60):
        candidates = list(pool)
        shuffler.shuffle(candidates)
        questions.append(question(candidates[:10], answers=() if i % 7 == 0 else ("Vellport",)))
    ours, theirs = random.Random(11), random.Random(11)
    for q in questions * 5:
        assert s.documents_and_reply(q, ours) == before_the_option(q, theirs, s.config)
        assert ours.getstate() == theirs.getstate()  # the same draws: later examples stay the same too
    # retrieved draws one number fewer per answerable example: not the same stream
    placed = stage(gold_missing=0.2, cite_first=cite_first, gold_position="retrieved")
    ours, theirs = random.Random(11), random.Random(11)
    assert [placed.documents_and_reply(q, ours) for q in questions] != \
        [before_the_option(q, theirs, s.config) for q in questions]


@pytest.mark.parametrize("value", ["random", "first", "Retrieved", ""])
def test_a_bad_gold_position_is_one_error_naming_the_key_and_the_choices(value):
    with pytest.raises(UserError, match=rf"^stage.gold_position='{value}' must be uniform .* or retrieved "):
        RagConfig(gold_position=value).check()
    RagConfig(gold_position="retrieved").check()


def test_on_the_command_line_a_bad_gold_position_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hybridchat.train", "stage=rag", "stage.gold_position=first",
                             f"paths.outputs={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stage.gold_position='first' must be uniform")


def test_the_option_at_its_default_leaves_recorded_config_hashes_alone():
    """Added after the records: at uniform, training computes what it did before the key existed."""
    from hybridchat.results import config_hash as hashing
    from hybridchat.results.records import AppConfig

    hashing.register_schemas()
    assert "gold_position" not in hashing.composed("config", ["stage=rag"])["stage"]  # as before the key existed
    assert hashing.composed("config", ["stage=rag", "stage.gold_position=retrieved"])["stage"]["gold_position"] == \
        "retrieved"
    today = hashing.config_hash([AppConfig("train", ("stage=rag",))])
    assert hashing.config_hash([AppConfig("train", ("stage=rag", "stage.gold_position=uniform"))]) == today
    assert hashing.config_hash([AppConfig("train", ("stage=rag", "stage.gold_position=retrieved"))]) != today
    refrag = hashing.config_hash([AppConfig("train", ("stage=refrag",))])  # refrag's single-hop examples too
    assert hashing.config_hash([AppConfig("train", ("stage=refrag", "stage.gold_position=retrieved"))]) != refrag
