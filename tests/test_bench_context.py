"""python -m hybridchat.bench context: documents placed where asked, EM per gold position, the
inference cache split by kind, and the hybrid-over-transformer crossover, against hand values."""

import json
import random

import pytest
from serve_checkpoint import MODEL, save_cited_checkpoint

from hybridchat.bench import context
from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.rag.answer import Answer, Answerer
from hybridchat.training.runs import load_run


def doc(i: int) -> Document:
    return Document(id=f"d{i}", title=f"T{i}", text=f"text {i}")


def test_the_gold_document_is_placed_first_in_the_middle_or_last_among_the_first_distractors():
    gold, others = doc(0), [doc(i) for i in range(1, 10)]
    ids = lambda docs: [d.id for d in docs]  # noqa: E731
    assert ids(context.place(gold, others, 1, "last")) == ["d0"]
    assert ids(context.place(gold, others, 4, "first")) == ["d0", "d1", "d2", "d3"]
    assert ids(context.place(gold, others, 4, "middle")) == ["d1", "d0", "d2", "d3"]
    assert ids(context.place(gold, others, 5, "middle")) == ["d1", "d2", "d0", "d3", "d4"]
    assert ids(context.place(gold, others, 4, "last")) == ["d1", "d2", "d3", "d0"]
    with pytest.raises(UserError, match="only 10 people"):
        context.place(gold, others, 11, "first")
    ranks = {context.place(gold, others, 4, context.RANDOM, random.Random(s)).index(gold) for s in range(30)}
    assert ranks == {0, 1, 2, 3}


def test_bodies_are_named_by_their_layers():
    assert [context.body(p) for p in ("AAAA", "MMMM", "MAMA", "MMMMAMMM")] == ["transformer", "mamba", "hybrid", "hybrid"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return load_run(save_cited_checkpoint(tmp_path_factory.mktemp("context")))


def test_the_cache_split_is_attention_kv_growing_with_length_and_a_fixed_ssm_state(tiny_run):
    model = tiny_run.model  # MODEL: "AM", 1 KV head of 16 dims, float32
    head_dim = MODEL.n_embd // MODEL.n_head
    for length in (100, 400):
        split = context.cache_split(model, length)
        assert split["kv_MB"] * 2**20 == 2 * MODEL.n_kv_head * head_dim * length * 4  # keys and values
        assert split["cache_MB"] == pytest.approx(split["kv_MB"] + split["ssm_MB"] + split["pointer_MB"])
    short, long = context.cache_split(model, 100), context.cache_split(model, 400)
    assert short["ssm_MB"] == long["ssm_MB"] > 0
    assert long["cache_MB"] * 2**20 == model.allocate_cache(1, 400).nbytes()


def test_em_is_measured_at_each_gold_position(tiny_run, monkeypatch):
    """A reader that only sees the first two documents: right where the gold document is first or
    (of 4) in the middle, wrong where it is last; with one document always right; with 8, the gold
    document at a random rank, right about a quarter of the time."""
    def first_two(self, questions, documents, on_token=None):
        out = []
        for question, shown in zip(questions, documents):
            item = asked[question]
            sees = item.gold_doc_ids[0] in [d.id for d in shown[:2]]
            reply = item.answers[0] if sees else "nobody"
            out.append(Answer(question, reply, reply, [], False, 1.0, list(shown)))
        return out

    cases = context.heldout_cases(tiny_run, 12, seed=0)
    asked = {q.question: q for q, _, _ in cases}
    monkeypatch.setattr(Answerer, "answer", first_two)
    rows = context.measure(tiny_run, "tiny", [1, 4, 8], list(context.POSITIONS), sweep_at=4, n=12, steps=2,
                           batch_tokens=4096, max_answer_tokens=8, seed=0)
    one, four, eight = rows
    assert (one["documents"], one["em"], "em_first" in one, "position_spread" in one) == (1, 1.0, False, False)
    assert (four["em_first"], four["em_middle"], four["em_last"]) == (1.0, 1.0, 0.0)
    assert four["em"] == pytest.approx(2 / 3, abs=1e-3) and four["position_spread"] == 1.0
    rng = random.Random(0 * 1000 + 8)  # the seed's draw for 8 documents, as measure makes it
    seen = [context.place(gold, others, 8, context.RANDOM, rng)[:2] for _, gold, others in cases]
    assert eight["em"] == pytest.approx(sum(gold in s for s, (_, gold, _) in zip(seen, cases)) / 12)
    assert 0 < eight["em"] < 1 and "em_first" not in eight
    assert four["context_tokens"] > one["context_tokens"]
    assert four["cache_MB"] * 2**20 == tiny_run.model.allocate_cache(1, four["context_tokens"] + 8).nbytes()


def test_heldout_cases_never_show_the_gold_person_among_the_distractors(tiny_run):
    for question, gold, others in context.heldout_cases(tiny_run, 5, seed=1):
        assert gold.id == question.gold_doc_ids[0] and gold.id not in {d.id for d in others}
        surname = gold.title.split()[-1]
        sharing = [d.title.split()[-1] == surname for d in others]
        assert sharing == sorted(sharing, reverse=True)  # namesakes first


def row(body, k, ttft, decode, cache, em):
    return {"body": body, "documents": k, "context_tokens": 80 * k, "ttft_ms": ttft, "decode_ms": decode,
            "cache_MB": cache, "em": em}


def test_crossover_ratios_and_where_the_hybrid_first_meets_each_target():
    rows = [row("transformer", 8, 10, 2, 10, 0.9), row("hybrid", 8, 9, 2, 4, 0.8),
            row("transformer", 32, 40, 4, 40, 0.8), row("hybrid", 32, 20, 2, 10, 0.78),
            row("mamba", 32, 1, 1, 1, 0.1)]
    ratios = context.crossover(rows)
    assert [(r["documents"], r["ttft_ratio"], r["cache_ratio"], r["em_difference"]) for r in ratios] == \
        [(8, 0.9, 0.4, -0.1), (32, 0.5, 0.25, -0.02)]
    assert [(c["measured"], c["status"], c["first_met_at_documents"]) for c in context.targets(ratios)] == \
        [(0.5, "met", 32), (0.25, "met", 32), (-0.02, "met", 32)]
    assert [(c["measured"], c["status"], c["first_met_at_documents"]) for c in context.targets(ratios, at=8)] == \
        [(0.9, "MISSED", 32), (0.4, "MISSED", 32), (-0.1, "MISSED", 32)]
    assert [c["status"] for c in context.targets(ratios[:1])] == ["not measured"] * 3
    assert [c["first_met_at_documents"] for c in context.targets(ratios[:1], at=8)] == [None] * 3


def test_the_command_writes_its_table_figure_and_json(tmp_path, capsys):
    step = save_cited_checkpoint(tmp_path / "run")
    out = tmp_path / "bench"
    context.main(["--checkpoints", str(step.parent), "--documents", "1", "2", "-n", "3", "--steps", "2",
                  "--sweep-at", "2", "--positions", "first", "last", "--out", str(out)])
    written = json.loads((out / "context.json").read_text())
    assert [(r["model"], r["documents"], r["body"]) for r in written["rows"]] == [("tiny/rag", 1, "hybrid"),
                                                                                   ("tiny/rag", 2, "hybrid")]
    assert (out / "context.png").stat().st_size > 0
    assert "em_last" in capsys.readouterr().out
    with pytest.raises(UserError, match="no checkpoint there"):
        context.main(["--checkpoints", str(tmp_path / "nothing"), "--out", str(out)])
