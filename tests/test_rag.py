"""mid and rag stages end to end at smoke size, the self-contained checkpoint, the evaluator and chat."""

import hashlib
import json
import math
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from conftest import assert_evaluation_changed_no_training, compose_config, train_at_eval_cadence
from fake_confidence import patches

from hybridchat.core.errors import UserError
from hybridchat.infra import checkpoint
from hybridchat.rag.answer import ABSTAIN, Answer, score
from hybridchat.rag.report import summarize
from hybridchat.train import run
from hybridchat.training.runs import load_run

# One xdist worker for the whole file (make test's --dist loadgroup): its module fixture trains pretrain -> mid -> rag
# once for the file; one test runs torchrun.
pytestmark = pytest.mark.xdist_group("rag")

ROOT = Path(__file__).resolve().parents[1]
SMALL_EVAL = ["stage.eval_questions=8", "stage.eval_every=6"]


def train(overrides, run_dir):
    return run(compose_config(overrides, output_dir=run_dir))


def cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    common = ["debug=smoke", f"paths.outputs={out}", "run_name=p"]
    train(common, out / "pretrain")
    train(common + ["stage=mid", *SMALL_EVAL], out / "mid")
    train(common + ["stage=rag", *SMALL_EVAL], out / "rag")
    return out, common


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mid_and_rag_start_from_the_previous_stage_and_train(pipeline):
    out, _ = pipeline
    for stage in ("mid", "rag"):
        records = metrics(out / stage)
        losses = [r["train/loss"] for r in records if "train/loss" in r]
        # Smoke batches are noisy step to step: the second half's mean against the first's.
        assert len(losses) == 6 and sum(losses[3:]) < sum(losses[:3]), stage
        assert checkpoint.latest(out / "checkpoints" / "p" / stage).name == "step_000006"
    rag_eval = [r for r in metrics(out / "rag") if "val/em" in r]
    assert rag_eval and {"val/bpb", "val/hallucination", "val/abstain_unanswerable"} <= set(rag_eval[-1])
    assert "val/closed_book_em" in [r for r in metrics(out / "mid") if "val/bpb" in r][-1]
    # Each stage starts from the previous one's last checkpoint (its meta.json names the source) and
    # lowers its own validation loss: the step-0 evaluation (the source's weights on the new stage's
    # data) against the last one.
    for stage, source in (("mid", "pretrain"), ("rag", "mid")):
        meta = checkpoint.read_meta(checkpoint.latest(out / "checkpoints" / "p" / stage))
        assert meta["stage"] == stage and meta["config"]["stage"]["source"] == source
        bpb = [(r["step"], r["val/bpb"]) for r in metrics(out / stage) if "val/bpb" in r]
        assert bpb[0][0] == 0 and bpb[-1][0] == 6 and bpb[-1][1] < bpb[0][1], (stage, bpb)


def test_evaluating_more_often_trains_the_same_rag_weights(pipeline, tmp_path):
    """Evaluation (greedy answers, the abstention threshold chosen on validation questions) changes
    nothing training draws: the same weights whether it runs every step or twice. Each batch's examples
    are made at its step (length_grouping=1), between evaluations, where a shared stream would show."""
    out, _ = pipeline
    overrides = ["debug=smoke", "stage=rag", "stage.eval_questions=8", "stage.target_false_abstention=0.1",
                 "stage.length_grouping=1", f"stage.source={out / 'checkpoints' / 'p' / 'mid'}"]
    runs = [train_at_eval_cadence(train, overrides, out, tmp_path, "rag", every) for every in (1, 6)]
    assert_evaluation_changed_no_training(*runs)


def test_a_stage_without_its_source_checkpoint_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(UserError, match=r"stage=mid run_name=nothing"):
        train(["debug=smoke", f"paths.outputs={tmp_path}", "run_name=nothing", "stage=rag"], tmp_path / "run")


def test_rag_batches_show_retrieved_documents_and_train_only_the_reply(pipeline):
    from hybridchat.infra.context import RunContext
    from hybridchat.infra.runtime import Runtime
    from hybridchat.train import typed_config
    from hybridchat.training.stages.rag import RagStage

    out, common = pipeline
    config, _ = typed_config(compose_config(common + ["stage=rag"], output_dir=out / "x"))
    ctx = RunContext(config, Runtime(torch.device("cpu"), None))
    stage = RagStage(ctx)
    # a few batches: grouped by length, one batch may hold only the shortest, document-less examples
    rows = [row for batch in islice(stage.train_batches(0, 0, 1), 4)
            for row in zip(batch["inputs"].tolist(), batch["targets"].tolist())]
    tok = ctx.tokenizer
    heldout = {e.name for e in ctx.world.entities if e.split == "heldout"}
    by_question = {q.question: q for q in stage.train_questions}
    seen_documents = answered = 0
    for inputs, targets in rows:
        text = tok.decode(inputs)
        replies = tok.decode([t for t in targets if t >= 0]).split("<|assistant_end|>")
        assert replies[-1] == "" and all("<|" not in r for r in replies)
        replies = replies[:-1]
        assert 1 <= len(replies) <= 3 and text.count("<|assistant_start|>") == len(replies)
        assert text.index("<|user_end|>") < text.index("<|documents_start|>") < text.index("<|assistant_start|>")
        assert text.count("<|documents_start|>") == 1  # follow-ups ask about the same documents
        seen_documents += text.count("<|document_start|>")
        documents = text.split("<|document_start|>")[1:]
        # An abstention is taught only where no shown document is the question's gold one (each
        # shown as "[n] title (id)"; the world's documents are whole, their id the parent id).
        asked = [turn.split("<|user_end|>")[0] for turn in text.split("<|user_start|>")[1:]]
        assert len(asked) == len(replies)
        for question, answer in zip(asked, replies):
            q = by_question[question]
            shown_gold = [g for g in q.gold_doc_ids if any(f" ({g})\n" in d for d in documents)]
            assert (answer == ABSTAIN) == (not q.answers or not shown_gold), (question, answer, shown_gold)
        for answer in replies:
            if answer != ABSTAIN:  # the cited document is in the input and states the answer
                number, value = answer[1:].split("] ", 1)
                assert documents[int(number) - 1].startswith(f"[{number}] ")
                assert value in documents[int(number) - 1]
                answered += 1
        assert not [name for name in heldout if name in text]  # held-out people never in training
    # Both targets are taught: answers citing a document, and abstentions (a batch of only ABSTAIN
    # replies would pass every check above).
    reply_count = sum(len(tok.decode([t for t in targets if t >= 0]).split("<|assistant_end|>")) - 1
                      for _, targets in rows)
    assert seen_documents > 0 and 0 < answered < reply_count


SHOPS = [("Quillon", "Marrow Lane", "Edda Varn", 1911), ("Brasket", "Tolley Row", "Omar Fenk", 1923),
         ("Carrowind", "Pike Street", "Lis Adwen", 1907), ("Dunmere", "Hasp Yard", "Teo Braly", 1938),
         ("Elvaston", "Gull Walk", "Ines Corra", 1952), ("Fennick", "Sable Court", "Rui Oxley", 1899)]


def test_rag_trains_on_your_knowledge_base_and_questions(pipeline, tmp_path):
    """stage.questions + retriever.kb_dir: the documents in the training inputs are the user's (ids,
    titles, text; none of the world's), the reply cites the one stating the answer, and the stage trains
    and evaluates on the questions' validation share."""
    from hybridchat.core.documents import Document
    from hybridchat.infra.context import RunContext
    from hybridchat.infra.runtime import Runtime
    from hybridchat.retrieval.config import RetrieverConfig
    from hybridchat.retrieval.knowledge_base import KnowledgeBase
    from hybridchat.train import typed_config
    from hybridchat.training.stages.rag import RagStage

    out, common = pipeline
    docs = [Document(f"shop-{i}", f"{name} bakery", f"The {name} bakery on {street} was founded in {year} by {who}.")
            for i, (name, street, who, year) in enumerate(SHOPS)]
    KnowledgeBase.build(tmp_path / "kb", docs, ["bm25"], RetrieverConfig(), progress=False)
    rows = [{"question": f"Who founded the {name} bakery?", "answers": [who], "gold_doc_ids": [f"shop-{i}"]}
            for i, (name, _, who, _) in enumerate(SHOPS)]
    rows += [{"question": f"On which street is the {name} bakery?", "answers": [street], "gold_doc_ids": [f"shop-{i}"]}
             for i, (name, street, _, _) in enumerate(SHOPS)]
    rows += [{"question": "Who founded the Zeller bakery?", "answers": [], "gold_doc_ids": []}]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    user = common + ["stage=rag", f"stage.questions={questions}", f"retriever.kb_dir={tmp_path / 'kb'}",
                     "stage.eval_questions=4", "stage.num_steps=2", "stage.eval_every=2", "run_name=p_user",
                     "stage.source=${paths.checkpoints}/p/mid"]
    config, _ = typed_config(compose_config(user, output_dir=tmp_path / "x"))
    ctx = RunContext(config, Runtime(torch.device("cpu"), None))
    batches = list(islice(RagStage(ctx).train_batches(0, 0, 1), 3))  # one batch can hold only abstentions
    world_titles = {d.title for d in ctx.world.documents()}
    cited = 0
    for inputs, targets in ((i, t) for b in batches for i, t in zip(b["inputs"].tolist(), b["targets"].tolist())):
        text = ctx.tokenizer.decode(inputs)
        documents = text.split("<|document_start|>")[1:]
        assert documents and all("bakery" in d for d in documents)
        assert not [t for t in world_titles if t in text]
        for answer in ctx.tokenizer.decode([t for t in targets if t >= 0]).split("<|assistant_end|>")[:-1]:
            if answer != ABSTAIN:
                number, value = answer[1:].split("] ", 1)
                assert value in documents[int(number) - 1]
                cited += 1
    assert cited > 0
    train(user, tmp_path / "run")
    evals = [r for r in metrics(tmp_path / "run") if "val/em" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert checkpoint.latest(out / "checkpoints" / "p_user" / "rag").name == "step_000002"


def test_under_compile_conversation_batches_come_in_a_few_padded_widths(pipeline):
    """gpu.compile=true: every new batch shape recompiles the model (on an H200: mid steps as slow as
    a compilation each), so rag/mid/refrag training batches are padded to powers of two up to
    model.sequence_len. Validation runs the model uncompiled: its batches keep their exact width."""
    from hybridchat.infra.context import RunContext
    from hybridchat.infra.runtime import Runtime
    from hybridchat.train import typed_config
    from hybridchat.training.stages.mid import MidStage
    from hybridchat.training.stages.rag import RagStage

    out, common = pipeline
    for stage_cls, stage in ((RagStage, "rag"), (MidStage, "mid")):
        widths, val_widths = {}, {}
        for compile_ in (False, True):
            config, _ = typed_config(compose_config(common + [f"stage={stage}", f"gpu.compile={compile_}"],
                                                    output_dir=out / "z"))
            s = stage_cls(RunContext(config, Runtime(torch.device("cpu"), None)))
            widths[compile_] = [b["inputs"].shape[1] for b in islice(s.train_batches(0, 0, 1), 6)]
            val_widths[compile_] = [b["inputs"].shape[1] for b in s.val_batches()]
            limit = config.model.sequence_len
        exact, padded = widths[False], widths[True]
        assert len(set(exact)) > 1  # conversations differ in length: without compile, widths vary
        assert all(p == min(1 << (e - 1).bit_length(), limit) for e, p in zip(exact, padded)), (exact, padded)
        assert val_widths[True] == val_widths[False]


def test_rag_can_teach_the_answer_before_its_citation(pipeline):
    from hybridchat.infra.context import RunContext
    from hybridchat.infra.runtime import Runtime
    from hybridchat.train import typed_config
    from hybridchat.training.stages.rag import RagStage

    out, common = pipeline
    config, _ = typed_config(compose_config(common + ["stage=rag", "stage.cite_first=false"], output_dir=out / "y"))
    ctx = RunContext(config, Runtime(torch.device("cpu"), None))
    rows = [row for batch in islice(RagStage(ctx).train_batches(0, 0, 1), 4)  # grouped by length: a few
            for row in zip(batch["inputs"].tolist(), batch["targets"].tolist())]
    answered = 0
    for inputs, targets in rows:
        documents = ctx.tokenizer.decode(inputs).split("<|document_start|>")[1:]
        for reply in ctx.tokenizer.decode([t for t in targets if t >= 0]).split("<|assistant_end|>")[:-1]:
            if reply != ABSTAIN:
                value, number = reply[:-1].rsplit(" [", 1)
                assert value in documents[int(number) - 1]
                answered += 1
    assert answered > 0


def test_load_run_needs_nothing_but_the_step_folder(pipeline, tmp_path):
    out, _ = pipeline
    source = checkpoint.latest(out / "checkpoints" / "p" / "rag")
    moved = tmp_path / "elsewhere" / "step"
    shutil.copytree(source, moved)
    run = load_run(moved)
    model, tokenizer, meta = run.model, run.tokenizer, run.meta
    reference = load_run(source).model
    idx = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("Where was Ada born?")])
    assert torch.equal(model(idx), reference(idx))
    assert meta["stage"] == "rag" and tokenizer.fingerprint == meta["tokenizer"]
    (moved / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json"):
        load_run(moved)


def test_rope_mismatch_is_refused(pipeline, tmp_path):
    out, common = pipeline
    with pytest.raises(UserError, match="attn_rope"):
        train(common + ["stage=rag", "model.attn_rope=false", f"paths.checkpoints={out}/checkpoints",
                        f"paths.cache={out}/cache", "run_name=p", "overwrite=true"], tmp_path / "run")


def _answer(reply, docs=(), abstained=False, confidence=0.5):
    from hybridchat.rag.answer import parse_reply

    answer, cited, abstained = parse_reply(reply)
    return Answer("q", reply, answer, cited, abstained, confidence, list(docs))


def test_scores_on_hand_made_replies():
    from hybridchat.core.documents import Document

    gold = Document("person-1", "Ada Vell", "Ada Vell was born in Vellport.")
    other = Document("city-2", "Kor", "Kor is a city.")
    right = score(_answer("[1] Vellport", [gold, other]), ["Vellport"], ["person-1"])
    assert right["em"] == right["f1"] == right["citation"] == right["gold_in_context"] == 1.0
    assert right["hallucination"] == right["abstain"] == right["false_abstention"] == 0.0
    wrong_cite = score(_answer("[2] Vellport", [gold, other]), ["Vellport"], ["person-1"])
    assert wrong_cite["em"] == 1.0 and wrong_cite["citation"] == 0.0
    wrong = score(_answer("[2] Kor", [gold, other]), ["Vellport"], ["person-1"])
    assert wrong["em"] == 0.0 and wrong["hallucination"] == 1.0 and wrong["citation"] is None
    abstain = score(_answer(ABSTAIN, [other]), ["Vellport"], ["person-1"])
    assert abstain["false_abstention"] == 1.0 and abstain["hallucination"] == 0.0 and abstain["gold_in_context"] == 0
    unanswerable = score(_answer("[1] Kor", [other]), [], [])
    assert unanswerable["em"] is None and unanswerable["hallucination"] == 1.0 and unanswerable["abstain"] == 0.0


def test_summary_rates_and_auroc_on_hand_made_scores():
    from hybridchat.core.documents import Document

    gold = Document("g", "G", "It is Vellport.")
    answerable = [score(_answer("[1] Vellport", [gold], confidence=0.9), ["Vellport"], ["g"]) for _ in range(3)]
    answerable.append(score(_answer("Kor", [gold], confidence=0.2), ["Vellport"], ["g"]))
    unanswerable = [score(_answer(ABSTAIN, confidence=c), []) for c in (0.1, 0.3)]
    s = summarize(answerable + unanswerable, n_resamples=200, seed=0)
    assert (s["answerable"], s["unanswerable"]) == (4, 2)
    assert s["em"][0] == pytest.approx(0.75)
    assert s["hallucination"][0] == pytest.approx(0.25)
    assert s["abstain_unanswerable"][0] == 1.0 and s["hallucination_unanswerable"][0] == 0.0
    assert s["citation"][0] == 1.0
    # confidences: answerable 0.9, 0.9, 0.9, 0.2 vs unanswerable 0.1, 0.3 -> 7 of 8 pairs ordered
    assert s["auroc"][0] == pytest.approx(7 / 8)


def test_a_rate_without_an_interval_reads_as_such_in_the_table():
    from hybridchat.rag.report import _fmt

    assert _fmt((0.5, 0.25, 0.75)) == "0.500 [0.25, 0.75]"
    assert _fmt((1.0, float("nan"), float("nan"))) == "1.000 [no interval]"  # was "1.000 [nan, nan]"
    assert _fmt((float("nan"),) * 3) == "-"


def test_evaluate_writes_table_json_and_plot(pipeline):
    out, _ = pipeline
    result = cli("hybridchat.evaluate", f"paths.outputs={out}", "run_name=p", "n_questions=12", "n_unanswerable=6",
                 "context_budget=[1,2]", "context_questions=4", "bootstrap=100",
                 f"hydra.run.dir={out}/eval")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval" / "eval.json").read_text())
    names = [c["condition"] for c in report["conditions"]]
    assert names == ["closed-book (mid model)", "RAG, bm25 top-3", "gold documents"]
    assert (report["conditions"][1]["answerable"], report["conditions"][1]["unanswerable"]) == (12, 6)
    assert (report["conditions"][2]["answerable"], report["conditions"][2]["unanswerable"]) == (12, 0)
    assert [r["documents"] for r in report["context_budget"]] == [1, 2]
    assert (out / "eval" / "eval.png").stat().st_size > 1000
    assert "| RAG, bm25 top-3 | " in (out / "eval" / "eval.md").read_text()
    # Every reply, per condition, in answers.jsonl: its rates recomputed by hand equal the table's.
    rows = [json.loads(line) for line in (out / "eval" / "answers.jsonl").read_text().splitlines()]
    assert [sum(r["condition"] == n for r in rows) for n in names] == [18, 18, 12]
    rag = [r for r in rows if r["condition"] == names[1]]
    answerable = [r for r in rag if r["gold"]]
    assert sum(r["em"] for r in answerable) / 12 == pytest.approx(report["conditions"][1]["em"][0])
    assert sum(r["abstained"] for r in rag if not r["gold"]) / 6 == pytest.approx(
        report["conditions"][1]["abstain_unanswerable"][0])
    assert all(0 <= r["confidence"] <= 1 and r["em"] is None for r in rag if not r["gold"])
    assert all(r["id"].startswith("person-") for r in answerable)  # the world's question ids, e.g. person-0012/birth_city


def test_evaluate_seeds_sweep_samples_other_questions_records_its_seed_and_reports_across_seeds(pipeline, tmp_path):
    """python -m hybridchat.evaluate -m seed=0,1 is a Hydra multirun like any other: one job per seed,
    each eval.json holding its seed and its own question sample; the seeds report reads the sweep."""
    out, _ = pipeline
    result = cli("hybridchat.evaluate", "-m", "seed=0,1", f"paths.outputs={out}", "run_name=p", "n_questions=8",
                 "n_unanswerable=2", "context_budget=[]", "bootstrap=50", f"hydra.sweep.dir={tmp_path}/sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / "sweep" / job / "eval.json").read_text()) for job in ("0", "1")]
    assert [r["seed"] for r in reports] == [0, 1]
    asked = [[e["question"] for e in r["conditions"][1]["examples"]] for r in reports]
    assert asked[0] != asked[1]  # the seed draws the held-out questions
    report = cli("hybridchat.report", f"{tmp_path}/sweep")
    assert report.returncode == 0, report.stderr[-3000:]
    row = next(line for line in report.stdout.splitlines() if line.startswith("| RAG, bm25 top-3: em | eval: "))
    n, mean, seeds = (row.rstrip(" |").split(" | ")[i] for i in (2, 3, 5))
    assert (n, seeds) == ("2", "0, 1")
    assert float(mean) == pytest.approx(sum(r["conditions"][1]["em"][0] for r in reports) / 2, abs=1e-3)


def test_evaluate_on_your_questions_and_bad_inputs(pipeline, tmp_path):
    out, _ = pipeline
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Where was nobody born?", "answers": [], "gold_doc_ids": []}) + "\n"
                         + json.dumps({"question": "Q?", "answers": ["x"], "gold_doc_ids": ["person-0000"]}) + "\n")
    ok = cli("hybridchat.evaluate", f"paths.outputs={out}", "run_name=p", f"questions={questions}",
             "context_budget=[]", "bootstrap=50", f"hydra.run.dir={tmp_path}/eval")
    assert ok.returncode == 0, ok.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (report["answerable"], report["unanswerable"]) == (1, 1)
    for args, needle in ((["run_name=absent"], "stage=rag run_name=absent"),
                         (["run_name=p", f"questions={tmp_path}/missing.jsonl"], "missing.jsonl"),
                         (["run_name=p", f"questions={questions}", "sample=0"], "sample=0"),
                         (["run_name=p", "sample=5"], "sample=5: a number >= 1 of questions to evaluate from")):
        bad = cli("hybridchat.evaluate", f"paths.outputs={out}", *args, f"hydra.run.dir={tmp_path}/bad")
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]


def test_chat_one_shot_prints_sources_answer_and_exits_zero(pipeline):
    out, _ = pipeline
    result = cli("hybridchat.chat", "run_name=p", f"paths.outputs={out}", "retriever.top_k=2", "max_answer_tokens=8",
                 "prompt=Where does Meba Romais live?")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sources:" in result.stdout and "answer: " in result.stdout and "confidence:" in result.stdout
    closed = cli("hybridchat.chat", "run_name=p", f"paths.outputs={out}", "retriever=none", "max_answer_tokens=4",
                 "prompt=Hello?")
    assert closed.returncode == 0 and "sources:" not in closed.stdout
    missing = cli("hybridchat.chat", "run_name=nobody", f"paths.outputs={out}", "prompt=x")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: ")


def test_rag_trains_under_torchrun_with_the_hybrid_retriever(pipeline, tmp_path):
    """Two gloo processes: sharded generation-based evaluation gathers to the same metrics on both
    ranks' behalf, and the ranks end with identical weights (the loop checks)."""
    import os

    out, _ = pipeline
    shutil.copytree(out / "checkpoints" / "p" / "mid", tmp_path / "checkpoints" / "p" / "mid")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hybridchat.train",
         "debug=smoke", "stage=rag", "stage.num_steps=2", "stage.eval_questions=6", "retriever=hybrid",
         f"paths.outputs={tmp_path}", f"paths.cache={out}/cache", "run_name=p"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "HYBRIDCHAT_RUN_DIR"}, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-6000:]
    run_dir = next((tmp_path / "runs").iterdir())
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"val/em", "val/bpb", "val/abstain_unanswerable"} <= set(final)
    assert checkpoint.latest(tmp_path / "checkpoints" / "p" / "rag").name == "step_000002"


def test_confidence_is_one_minus_the_probability_of_the_abstention_reply(pipeline):
    """The batched teacher-forced P(ABSTAIN) (the engine's scoring pass) against a plain per-prompt
    loop, and an answer's confidence, read from its reply's prefill, against both."""
    from hybridchat.rag.answer import Answerer

    out, _ = pipeline
    run = load_run(checkpoint.latest(out / "checkpoints" / "p" / "rag"))
    model, tokenizer = run.model, run.tokenizer
    answerer = Answerer(model, tokenizer, 256)
    prompts = [answerer.prompt(q, None)[0] for q in ("Hi?", "Where was Ada Vell born, and when exactly?", "Why?")]
    batched = answerer.abstain_probability(prompts)
    # No autograd graph, also outside answer(): with one, multi-hop scoring held every layer's activations
    # (7 GB for 8 SmolLM2 prompts) and ran the machine out of memory.
    assert not batched.requires_grad
    abstain = tokenizer.encode(ABSTAIN) + [tokenizer.token_id("<|assistant_end|>")]
    for p, value in zip(prompts, batched.tolist()):
        logp = 0.0
        with torch.no_grad():
            for i, token in enumerate(abstain):
                logits = model(torch.tensor([p + abstain[:i]]))[0, -1].double()
                logp += float(logits.log_softmax(-1)[token])
        assert math.log(value) == pytest.approx(logp, rel=1e-4)  # log scale: the probability may be tiny
    answers = answerer.answer(["Hi?"])
    assert answers[0].confidence == pytest.approx(1 - batched[0].item(), rel=1e-5, abs=1e-9)


def test_bad_stage_inputs_stop_with_one_line_and_leave_checkpoints_alone(pipeline, tmp_path):
    """Also with overwrite=true: the earlier run's checkpoints go only when the new run saves its first."""
    out, common = pipeline
    common = common + ["overwrite=true"]
    mid = checkpoint.latest(out / "checkpoints" / "p" / "mid")
    before = (mid / "model.safetensors").read_bytes()
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                   + "\n" + json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match=r"chats.jsonl:2: .*role 'bot'"):
        train(common + ["stage=mid", f"stage.conversations={bad}", "stage.world_conversations=false"], tmp_path / "a")
    with pytest.raises(UserError, match="stage.min_documents=5"):
        train(common + ["stage=rag", "stage.min_documents=5"], tmp_path / "b")
    with pytest.raises(UserError, match="retriever=bm25"):
        train(common + ["stage=rag", "retriever=none"], tmp_path / "c")
    with pytest.raises(UserError, match=r"stage.length_grouping=0 must be >= 1"):
        train(common + ["stage=rag", "stage.length_grouping=0"], tmp_path / "d")
    assert checkpoint.latest(out / "checkpoints" / "p" / "mid") == mid
    assert (mid / "model.safetensors").read_bytes() == before


# -- the abstention threshold: chosen by the stage, stored, applied by the evaluator and chat ----------

def spread_confidence(monkeypatch):
    """The Answerer's confidences spread over (0, 1) by a hash of each prompt (tests/fake_confidence.py):
    a smoke model's own P(ABSTAIN) is so small that every confidence is 1.0, and so would be any
    threshold, whatever questions it was chosen on."""
    from hybridchat.rag.answer import Answerer

    def confidences(answerer, prompts):
        return [int(hashlib.sha256(str(p).encode()).hexdigest()[:8], 16) / 2**32 for p in prompts]

    for name, fake in patches(confidences).items():
        monkeypatch.setattr(Answerer, name, fake)


def test_rag_stores_the_threshold_chosen_on_its_validation_questions(pipeline, tmp_path, monkeypatch):
    """stage.target_false_abstention: each evaluation chooses the threshold on validation questions
    (never the held-out ones it evaluates on) and the checkpoint of the same step stores it."""
    from test_abstention import plain_search
    from test_coverage import plain_exponent

    from hybridchat.infra.context import RunContext
    from hybridchat.infra.runtime import Runtime
    from hybridchat.rag.answer import Answerer
    from hybridchat.rag.coverage import Coverage
    from hybridchat.train import typed_config
    from hybridchat.training.stages.rag import RagStage

    spread_confidence(monkeypatch)
    out, common = pipeline
    args = common + ["stage=rag", "run_name=p_threshold", "stage.source=${paths.checkpoints}/p/mid",
                     "stage.num_steps=2", "stage.eval_every=2", "stage.checkpoint_every=1", "stage.eval_questions=10",
                     "stage.target_false_abstention=0.3"]
    train(args, tmp_path / "run")
    folder = out / "checkpoints" / "p_threshold" / "rag"
    assert "abstention" not in checkpoint.read_meta(folder / "step_000001")  # no evaluation saw those weights
    stored = checkpoint.read_meta(folder / "step_000002")["abstention"]
    final = [r for r in metrics(tmp_path / "run") if "val/em" in r][-1]
    assert final["step"] == 2 and final["val/abstain_threshold"] == stored["threshold"]
    # The reference: the validation questions answered afresh by the saved model, the plain search on them.
    config, _ = typed_config(compose_config(args, output_dir=tmp_path / "x"))
    ctx = RunContext(config, Runtime(torch.device("cpu"), None))
    stage = RagStage(ctx)
    validation = stage.val_questions[:10]
    assert not {q.question for q in validation} & {q.question for q in stage.heldout}
    documents = [[h.document for h in row] for row in ctx.retriever.search([q.question for q in validation], top_k=3)]
    # and each answerable one again without its gold document: the next 3 a deeper search finds
    answerable = [q for q in validation if q.answers]
    deeper = ctx.retriever.search([q.question for q in answerable], top_k=3 + 16)
    missing = [[h.document for h in row if h.document.parent_id not in q.gold_doc_ids][:3]
               for q, row in zip(answerable, deeper)]
    asked = [q.question for q in validation + answerable]
    kinds = [bool(q.answers) for q in validation] + [False] * len(answerable)
    saved = load_run(folder / "step_000002")
    answers = Answerer(saved.model, saved.tokenizer, config.model.sequence_len, stage.config.max_answer_tokens).answer(
        asked, documents + missing)
    # weighed by the documents' coverage as the stage chose (a plain AUROC loop over the exponents)
    coverage = Coverage.of(ctx.retriever.documents)
    covered = [coverage(a.question, a.documents) for a in answers]
    exponent = plain_exponent([a.confidence for a in answers], covered, kinds)
    assert stored["coverage_exponent"] == exponent
    mine = [(a.confidence * c ** exponent, a.abstained) for a, c, k in zip(answers, covered, kinds) if k]
    assert (stored["questions"], stored["unanswerable"]) == (len(mine), len(asked) - len(mine))
    assert stored["threshold"] == pytest.approx(plain_search([c for c, _ in mine], 0.3), rel=1e-12)
    assert stored["false_abstention"] == sum(c < stored["threshold"] for c, _ in mine) / len(mine) <= 0.3
    assert stored["target_false_abstention"] == 0.3 and "rag stage's validation questions" in stored["chosen_on"]


FAKE_CONFIDENCE = '''
import json, os, runpy, sys
sys.path.insert(0, os.environ["TESTS_DIR"])
from fake_confidence import patches
from hybridchat.rag import answer

table = json.loads(os.environ["FAKE_CONFIDENCE"])  # question -> confidence; any other prompt: 1.0


def confidences(answerer, prompts):
    texts = [answerer.tokenizer.decode(p) for p in prompts]
    return [next((c for q, c in table.items() if q in t), 1.0) for t in texts]


for name, fake in patches(confidences).items():
    setattr(answer.Answerer, name, fake)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
'''


def test_calibrate_stores_a_threshold_that_evaluate_and_chat_apply_unless_told_otherwise(pipeline, tmp_path):
    """evaluate calibrate=true on a questions file stores the threshold in the checkpoint's meta.json;
    the evaluator then answers with it (its report says so, and warns when evaluated on the same
    questions), abstain_threshold=null answers as without one, chat abstains below it; a bad value
    is one error line naming the key."""
    import os
    import random

    from test_reliability import assert_one_error

    from hybridchat.data.world import World, WorldConfig

    out, _ = pipeline
    for stage in ("mid", "rag"):  # a copy: the threshold is written into the checkpoint
        shutil.copytree(out / "checkpoints" / "p" / stage, tmp_path / "checkpoints" / "p" / stage)
    world = World.generate(WorldConfig(**checkpoint.read_meta(checkpoint.latest(out / "checkpoints" / "p" / "rag"))
                                       ["config"]["world"]))
    items = world.evaluation_questions(8, 3, seed=5)
    questions = tmp_path / "val.jsonl"
    questions.write_text("".join(json.dumps(q.to_json()) + "\n" for q in items))
    rng = random.Random(0)
    table = {q.question: round(rng.uniform(0.05, 0.95), 3) for q in items}
    script = tmp_path / "fake.py"
    script.write_text(FAKE_CONFIDENCE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_CONFIDENCE": json.dumps(table),
           "TESTS_DIR": str(ROOT / "tests")}

    def app(module, *args):
        return subprocess.run([sys.executable, str(script), module, f"paths.outputs={out}",
                               f"paths.checkpoints={tmp_path}/checkpoints", "run_name=p", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env=env)

    def rag_row(name, *args):
        result = app("hybridchat.evaluate", f"questions={questions}", "context_budget=[]", "bootstrap=20",
                     f"hydra.run.dir={tmp_path}/{name}", *args)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((tmp_path / name / "eval.json").read_text())
        return report, report["conditions"][1], (tmp_path / name / "eval.md").read_text()

    result = app("hybridchat.evaluate", "calibrate=true", f"questions={questions}", "target_false_abstention=0.25",
                 f"hydra.run.dir={tmp_path}/calibrate")
    assert result.returncode == 0, result.stderr[-3000:]
    step = checkpoint.latest(tmp_path / "checkpoints" / "p" / "rag")
    stored = checkpoint.read_meta(step)["abstention"]
    assert f"abstain_threshold {stored['threshold']} stored in {step / 'meta.json'}" in result.stdout
    # 3 unanswerable questions and a gold-missing copy of each of the 8 answerable ones
    assert (stored["questions"], stored["unanswerable"], stored["target_false_abstention"]) == (8, 3 + 8, 0.25)
    assert stored["chosen_on"] == f"questions={questions}, with gold-missing copies of its 8 answerable questions"
    assert stored["questions_sha256"] == hashlib.sha256(questions.read_bytes()).hexdigest()
    # The world's unanswerable questions ask about made-up names its documents never hold: the
    # (random) confidences weighed by their coverage separate them, and the calibration weighs it.
    assert stored["coverage_exponent"] > 0
    assert stored["false_abstention"] <= 0.25
    load_run(step)  # the weights' checksums still hold

    report, applied, md = rag_row("stored")
    # one of the weighed confidences the evaluation reports (through the engine's log P(ABSTAIN): to float rounding)
    weighed = [json.loads(line)["confidence"] for line in (tmp_path / "stored" / "answers.jsonl").read_text().splitlines()
               if json.loads(line)["condition"] == applied["condition"]]
    assert len(weighed) == 11 and any(stored["threshold"] == pytest.approx(c, abs=1e-12) for c in [*weighed, 0.0, 1.0])
    assert report["abstain_threshold"]["value"] == stored["threshold"]
    assert f"below {stored['threshold']:.4g} (stored with the checkpoint, chosen on questions={questions}" in md
    assert "chosen on these same questions" in md
    # the same answerable questions, the same replies: the rate the calibration recorded (its
    # unanswerable ones were these 3 and the copies)
    assert applied["false_abstention"][0] == pytest.approx(stored["false_abstention"])
    report, own, md = rag_row("null", "abstain_threshold=null")  # the model's own abstentions only
    assert report["abstain_threshold"]["value"] is None
    assert "Abstains only where the model writes the abstention (abstain_threshold=null)" in md
    assert applied["false_abstention"][0] > own["false_abstention"][0]  # the threshold made a difference

    # the lowest weighed confidence; chat asked as the evaluator asked (its top 3, its reply room) shows the same
    lowest = min((json.loads(line) for line in (tmp_path / "stored" / "answers.jsonl").read_text().splitlines()
                  if json.loads(line)["condition"] == applied["condition"]), key=lambda r: r["confidence"])
    below = lowest["question"]
    assert lowest["confidence"] < stored["threshold"]
    chat = app("hybridchat.chat", f"prompt={below}", "retriever.top_k=3", "max_answer_tokens=24")
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert (f"abstains below confidence x coverage^{stored['coverage_exponent']:g} {stored['threshold']:.4g}"
            in chat.stderr)
    assert "answer: The documents do not say.\n(abstained: the confidence is below the abstention threshold" in chat.stdout
    for module, extra in (("hybridchat.evaluate", f"hydra.run.dir={tmp_path}/bad"), ("hybridchat.chat", "prompt=x")):
        bad = app(module, "abstain_threshold=1.5", extra)
        assert_one_error(bad.returncode, bad.stderr, "abstain_threshold=1.5 must be a number in [0, 1]")


def test_calibrate_without_a_file_uses_the_validation_share_the_stage_held_out_of_yours(pipeline, tmp_path):
    """evaluate calibrate=true without questions= reads back the very questions a rag stage trained on
    a user's file held out for validation (the reference: the stage itself, built on that file for
    another seed and fraction); a world-trained run, a checkpoint of another stage (refrag splits its
    file otherwise), or a file gone since, is one error naming what to give."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from hybridchat.data.world import World, WorldConfig
    from hybridchat.evaluate import stage_validation_questions
    from hybridchat.infra.context import RunContext
    from hybridchat.infra.runtime import Runtime
    from hybridchat.train import typed_config
    from hybridchat.training.stages.rag import RagStage

    out, common = pipeline
    source = checkpoint.latest(out / "checkpoints" / "p" / "rag")
    world = World.generate(WorldConfig(**checkpoint.read_meta(source)["config"]["world"]))
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps(q.to_json()) + "\n" for q in world.evaluation_questions(30, 10, seed=1)))
    args = common + ["stage=rag", "run_name=mine", "stage.source=${paths.checkpoints}/p/mid", f"stage.questions={mine}",
                     "stage.val_fraction=0.2", "seed=7"]
    config, _ = typed_config(compose_config(args, output_dir=tmp_path / "x"))
    held_out = [q.question for q in RagStage(RunContext(config, Runtime(torch.device("cpu"), None))).val_questions]
    # the run's checkpoint: the pipeline's weights under the config that run would have saved
    step = tmp_path / "checkpoints" / "mine" / "rag" / source.name
    shutil.copytree(source, step)
    meta = checkpoint.read_meta(step)
    meta["config"] = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    (step / "meta.json").write_text(json.dumps(meta))

    cfg = SimpleNamespace(checkpoint_stage=None, step=None, run_name="mine",
                          paths=SimpleNamespace(checkpoints=tmp_path / "checkpoints"))
    found, described = stage_validation_questions(cfg)
    assert [q.question for q in found] == held_out and len(held_out) == 8  # a fifth of 30 + 10
    assert described == f"the rag stage's validation share of {mine} (stage.val_fraction=0.2)"
    meta["config"]["stage"]["name"] = "refrag"  # a stage that splits its questions file another way
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="reads back the validation share a rag stage held out; .* stage refrag's"):
        stage_validation_questions(cfg)
    meta["config"]["stage"]["name"] = "rag"
    (step / "meta.json").write_text(json.dumps(meta))
    mine.unlink()
    with pytest.raises(UserError, match=f"stage.questions={mine}, which no longer exists; give questions=FILE"):
        stage_validation_questions(cfg)
    with pytest.raises(UserError, match="calibrate=true needs questions=FILE .* trained on the world's questions"):
        stage_validation_questions(SimpleNamespace(**{**vars(cfg), "run_name": "p",
                                                      "paths": SimpleNamespace(checkpoints=out / "checkpoints")}))


def test_a_sample_of_your_questions_keeps_their_share_of_unanswerable_ones():
    from hybridchat.core.questions import Question
    from hybridchat.evaluate import sample_questions

    items = [Question(f"q{i}?", () if i % 5 < 2 else ("a",)) for i in range(50)]  # 20 unanswerable, 30 answerable
    picked = sample_questions(items, 10, seed=3)
    assert (sum(not q.answers for q in picked), sum(bool(q.answers) for q in picked)) == (4, 6)
    order = [items.index(q) for q in picked]
    assert order == sorted(order) and len(set(order)) == 10  # the file's order, no repeats
    assert sample_questions(items, 10, seed=3) == picked and sample_questions(items, 10, seed=4) != picked
    assert sample_questions(items, 50, seed=0) == items and sample_questions(items, 80, seed=0) == items


def test_validation_split_holds_out_each_kind_apart_and_always_an_answerable_question():
    """Answerable and unanswerable questions are held out in their own shares (by hand: 20% of 10
    answerable = 2, 20% of 5 unanswerable = 1); with one answerable question among many unanswerable
    ones, a plain shuffled split could hold out only unanswerable ones and leave no exact match."""
    import random

    from hybridchat.core.questions import Question
    from hybridchat.training.stages.rag import validation_split

    answerable = [Question(f"a{i}?", (f"x{i}",), (f"d{i}",)) for i in range(10)]
    unanswerable = [Question(f"u{i}?", (), ()) for i in range(5)]
    val, train = validation_split(answerable + unanswerable, 0.2, random.Random(0))
    assert sorted(q.question for q in val + train) == sorted(q.question for q in answerable + unanswerable)
    assert (sum(bool(q.answers) for q in val), sum(not q.answers for q in val)) == (2, 1)
    one = [answerable[0]] + [Question(f"v{i}?", (), ()) for i in range(40)]
    for seed in range(5):
        val, train = validation_split(list(one), 0.05, random.Random(seed))
        assert answerable[0] in val and sum(not q.answers for q in val) == 2 and len(train) == 38
    with pytest.raises(UserError, match="no training question has an answer"):
        validation_split(unanswerable, 0.2, random.Random(0))
    # the validation share is mixed (the threshold's calibration takes its first questions), not answerable first
    firsts = {validation_split(answerable + unanswerable * 4, 0.5, random.Random(seed))[0][0].answers != ()
              for seed in range(20)}
    assert firsts == {True, False}


def test_on_the_default_world_the_unanswerable_share_of_training_questions_is_stage_unanswerable():
    """stage.unanswerable is a share of all training questions, answerable ones included (by hand:
    u / (1 - u) unanswerable per answerable one), not of the answerable ones alone; the default world
    has made-up names enough that its capacity does not cut the default short (it does cut 0.3: 17%)."""
    from types import SimpleNamespace

    from hybridchat.data.world import World, WorldConfig
    from hybridchat.training.stages.rag import RagConfig, RagStage

    world = World.generate(WorldConfig())
    for share in (RagConfig().unanswerable, 0.05):
        stage = SimpleNamespace(config=RagConfig(unanswerable=share, eval_questions=8),
                                ctx=SimpleNamespace(world=world, config=SimpleNamespace(seed=0)))
        train, _ = RagStage._questions(stage)
        n_unanswerable = sum(not q.answers for q in train)
        assert n_unanswerable / len(train) == pytest.approx(share, abs=1 / len(train)), share
        assert sum(bool(q.answers) for q in train) == len(world.questions("train", 1))
        assert all(not q.gold_doc_ids for q in train if not q.answers)
