"""Evaluation: does the model answer from documents, cite them, and abstain when it should?

    python -m hybridchat.evaluate                          # the run's rag checkpoint, world questions
    python -m hybridchat.evaluate -m retriever=bm25,dense,hybrid
    python -m hybridchat.evaluate retriever.kb_dir=kb/ questions=q.jsonl   # your documents and questions
    python -m hybridchat.evaluate hops=2                   # 2-hop questions, the run's refrag checkpoint
    python -m hybridchat.evaluate hops=3                   # 3-hop questions, which no stage trains on
    python -m hybridchat.evaluate calibrate=true questions=val.jsonl   # store an abstention threshold instead

A Hydra app sharing the training config groups (conf/eval.yaml). Conditions, each on the same
questions: closed-book (the run's chat model before RAG training: what you have without retrieval),
RAG with the configured retriever, and the gold documents in context (an upper bound); unanswerable
questions (about entities that exist nowhere) run closed-book and with RAG. Every rate comes with a
95% bootstrap interval. The context budget section measures exact match and time to first token
against the number of documents in context, for this model and any others named in `compare`.
Writes eval.md, eval.json and eval.png to the run dir (hybridchat/rag/report.py renders them; metrics go to
wandb when logger=wandb). Each model answers with its checkpoint's abstention threshold, or
abstain_threshold= (docs/answers.md); calibrate=true chooses one on questions=FILE and stores it.
reading=rank_order reads each retrieved (or gold) document alone, in rank order, and answers from the
first one the model does not abstain on (single-hop questions; the context budget reads together).

With hops=2 (or a questions file whose every answerable question has two gold_doc_ids, in hop
order) the questions are 2-hop and the conditions are: closed-book; single-shot RAG (one retrieval,
a query the model writes is refused); rule-based bridge queries (hybridchat/rag/multihop.py
BridgeQueries, written for the model); REFRAG (the model writes its own queries); both gold
documents in context, one shot, and again with the model's queries followed (what a chat user meets
where retrieval shows both at once). Each reports EM, F1, hallucination, both gold documents shown, retrievals per
question and seconds per answer, with bootstrap intervals, and example traces. hops=3 asks 3-hop
questions (a person's link, then a 2-hop path; no stage trains on them: does a model taught one
follow-up query chain two?) under the same conditions, with max_hops raised to 3 where the checkpoint
was trained with fewer: its follow-up hops then share the context one follow-up had in training.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError, run_hydra_app, run_or_exit
from hybridchat.core.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from hybridchat.core.metrics import bootstrap_ci
from hybridchat.core.questions import Question, read_questions
from hybridchat.core.seeds import EVALUATION, python_rng
from hybridchat.data.world import World
from hybridchat.infra import checkpoint
from hybridchat.infra import config as config_schema
from hybridchat.infra.config import LoggerConfig
from hybridchat.infra.runtime import setup, teardown
from hybridchat.infra.tracking import Tracker
from hybridchat.model.engine import time_to_first_token
from hybridchat.rag.abstention import Calibration, calibrate, gold_missing_copies
from hybridchat.rag.answer import RANK_ORDER, Answerer, RankOrderReader, score
from hybridchat.rag.coverage import Coverage
from hybridchat.rag.multihop import BridgeQueries, ModelQueries, MultiHop, NoQueries, QueryGenerator, Search
from hybridchat.rag.report import ANSWERABLE_RATES, HOP_RATES, columns_for, markdown, plot, summarize
from hybridchat.retrieval.knowledge_base import KnowledgeBase
from hybridchat.training.runs import CHECKPOINT, Run, RunReaderConfig, load_run, reading_setting, threshold_setting
from hybridchat.training.stages import answering_stage, stage_schemas
from hybridchat.training.stages.rag import split_validation

log = logging.getLogger("hybridchat")

ANSWERS = "answers"  # a condition's every reply, written to answers.jsonl rather than eval.json
HOP_SETTINGS = ("max_hops", "hop_documents", "max_query_tokens", "hop_tokens")
SINGLE_HOP = "single-hop questions (model-written queries)"  # hops=2 on the world: the checkpoint's other questions
GOLD = "gold documents"
GOLD_OWN_QUERIES = "gold documents, own queries followed"
MAX_HOPS = 3  # the world's longest questions (hops=3: the evaluator's alone)


@dataclass
class EvalConfig(RunReaderConfig):
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # The stage whose checkpoint is evaluated; None: the one that answers the questions' hops (refrag
    # for 2-hop questions, else rag). (Not `stage`: on the command line that names the training config
    # group conf/stage/.)
    checkpoint_stage: Optional[str] = None
    step: Optional[int] = None                 # None: the stage's latest checkpoint
    closed_book_stage: Optional[str] = "mid"   # closed-book baseline; None: the evaluated model itself
    questions: Optional[str] = None            # your JSONL (question, answers, gold_doc_ids); None: the world's
    # questions=FILE: evaluate this many of them, a seeded sample keeping the file's share of unanswerable
    # ones (None: all of them)
    sample: Optional[int] = None
    n_questions: int = 300                     # answerable held-out questions (world)
    n_unanswerable: int = 300                  # questions about entities that exist nowhere (world)
    max_answer_tokens: int = 24
    batch_size: int = 32
    bootstrap: int = 1000
    seed: int = 0
    context_budget: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    context_questions: int = 100               # questions per point of the context budget
    # Other run names, e.g. [transformer_tiny, mamba_tiny]: their checkpoints of the same stage join the
    # context budget.
    compare: list[str] = field(default_factory=list)
    hops: int = 1                              # 2 or 3: multi-hop questions and conditions (3: never trained on)
    # Multi-hop settings; None: the evaluated checkpoint's stage values (refrag), else the multi-hop stage's defaults.
    max_hops: Optional[int] = None             # retrievals per question, the question's own included
    hop_documents: Optional[int] = None        # documents retrieved per follow-up query
    max_query_tokens: Optional[int] = None
    hop_tokens: Optional[int] = None           # context kept free per follow-up hop
    # Instead of evaluating: choose the checkpoint's abstention threshold on questions=FILE (validation
    # questions, never the ones you evaluate on; none: the validation share its rag stage held out of
    # stage.questions) for this false-abstention rate, and store it in its meta.json.
    calibrate: bool = False
    target_false_abstention: float = 0.1


def register() -> None:
    config_schema.register(stage_schemas())
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


def load(cfg: EvalConfig, run_name: str, stage: str, step: int | None = None) -> Run:
    return load_run(checkpoint.find(cfg.paths.checkpoints, run_name, stage, step), device=cfg.gpu.device.value)


def world_questions(world: World, n_questions: int, n_unanswerable: int, seed: int) -> list[Question]:
    if not world.questions("heldout", 1):
        raise UserError("the checkpoint's world has no held-out people (world.heldout_fraction=0): nothing to evaluate")
    return world.evaluation_questions(n_questions, n_unanswerable, seed)


def sample_questions(items: list[Question], n: int, seed: int) -> list[Question]:
    """n of the questions, drawn with the seed, answerable and unanswerable ones in the file's
    proportion (the unanswerable count rounded), in the file's order; all of them when n >= their number."""
    if n >= len(items):
        return items
    unanswerable = [i for i, q in enumerate(items) if not q.answers]
    answerable = [i for i, q in enumerate(items) if q.answers]
    k = round(n * len(unanswerable) / len(items))
    rng = python_rng(seed, EVALUATION, "questions-file")
    chosen = set(rng.sample(unanswerable, k)) | set(rng.sample(answerable, n - k))
    return [q for i, q in enumerate(items) if i in chosen]


def multi_hop_questions(world: World, hops: int, n: int, n_unanswerable: int, seed: int) -> list[Question]:
    """n held-out questions of `hops` hops, then up to n_unanswerable of as many hops about made-up
    people (the held-out fifth of them): the first hop finds no one, so there is no bridge to follow."""
    heldout = world.questions("heldout", hops)
    if not heldout:
        raise UserError("the checkpoint's world has no held-out people (world.heldout_fraction=0): nothing to evaluate")
    picked = python_rng(seed, EVALUATION, f"{hops}-hop-heldout").sample(heldout, min(n, len(heldout)))
    if hops == 3:
        return picked + world.unanswerable_three_hop(min(n_unanswerable, world.unanswerable_capacity() // 5))
    limit, asked = world.unanswerable_capacity() // 5, 4 * n_unanswerable  # about a third of them are 2-hop
    while True:
        made_up = [q for q in world.unanswerable_split("heldout", min(asked, limit)) if q.hops == 2]
        if len(made_up) >= n_unanswerable or asked >= limit:
            break
        asked *= 2
    return picked + made_up[:n_unanswerable]


def warm_start(cfg: EvalConfig, evaluated: Run) -> Path | None:
    """The checkpoint a refrag run's GRPO started from, to compare with its end: the same run's step
    num_steps - rl_steps (kept by the stage), or, for a run that was all RL, its stage.source when
    that is a refrag checkpoint. None when the checkpoint had no RL or its warm start is gone."""
    trained = evaluated.stage
    rl_steps, num_steps, source = getattr(trained, "rl_steps", 0), trained.num_steps, trained.source
    if not rl_steps or evaluated.meta.get("step") != num_steps:
        return None
    found = None
    if rl_steps < num_steps:
        found = evaluated.path.parent / f"step_{num_steps - rl_steps:06d}"
    elif source:
        try:
            found = checkpoint.source(cfg.paths.checkpoints, cfg.run_name, source)
        except UserError:  # moved or deleted since: no comparison, the rest of the evaluation stands
            pass
    multihop = answering_stage(2).name
    if found is None or not (found / "meta.json").is_file() or checkpoint.read_meta(found).get("stage") != multihop:
        log.warning("no warm-start checkpoint of %s to compare with (looked for %s)", evaluated.path, found)
        return None
    return found


def hop_settings(cfg: EvalConfig, evaluated: Run) -> dict[str, int]:
    """max_hops & co.: as given, else as the checkpoint's stage was trained, else the multi-hop stage's
    defaults; max_hops at least the questions' hops (cfg.hops). Where that raises max_hops past the
    trained value and hop_tokens is not given, the follow-up hops share the room the trained ones had:
    the first hop's documents keep theirs."""
    defaults = answering_stage(2).config_class
    trained = {k: getattr(evaluated.stage, k, getattr(defaults, k)) for k in HOP_SETTINGS}
    given = {k: getattr(cfg, k) for k in HOP_SETTINGS if getattr(cfg, k) is not None}
    settings = {**trained, **given}
    if "max_hops" not in given and cfg.hops > trained["max_hops"]:
        settings["max_hops"] = cfg.hops
        if "hop_tokens" not in given:
            follow_ups = trained["max_hops"] - 1
            settings["hop_tokens"] = (follow_ups * (trained["max_query_tokens"] + 2 + trained["hop_tokens"])
                                      // (cfg.hops - 1) - settings["max_query_tokens"] - 2)
            if settings["hop_tokens"] < 1:
                raise UserError(f"hops={cfg.hops}: the checkpoint's follow-up room ({trained['hop_tokens']} tokens "
                                f"for one hop) leaves no documents for {cfg.hops - 1}; give hop_tokens= (a number "
                                "of tokens per follow-up hop) or max_hops=")
    return settings


def gold_documents(kb_documents: list[Document], items: list[Question]) -> list[list[Document]]:
    by_parent: dict[str, list[Document]] = {}
    for d in kb_documents:
        by_parent.setdefault(d.parent_id, []).append(d)
    return [[d for g in item.gold_doc_ids for d in by_parent.get(g, [])] for item in items]


def context_budget(cfg: EvalConfig, models: dict[str, Run], items: list[Question], retriever,
                   decision: Callable[[Run], dict[str, Any]]) -> list[dict]:
    """EM and time to first token with k retrieved documents in context, k = cfg.context_budget; the
    context is NOT cut to the model's sequence_len here: past it is exactly what this measures."""
    answerable = [i for i in items if i.answers][:cfg.context_questions]
    if not answerable or not cfg.context_budget:
        return []
    hits = retriever.search([i.question for i in answerable], top_k=max(cfg.context_budget))
    rows = []
    for name, run in models.items():
        model = run.model
        answerer = Answerer(model, run.tokenizer, max_context=10**9, max_answer_tokens=cfg.max_answer_tokens,
                            batch_size=cfg.batch_size, **decision(run))
        for k in cfg.context_budget:
            docs = [[h.document for h in row[:k]] for row in hits]
            answers = answerer.answer([i.question for i in answerable], docs)
            em = [score(a, i.answers)["em"] for a, i in zip(answers, answerable)]
            prompts = [answerer.prompt(i.question, d)[0] for i, d in zip(answerable[:5], docs[:5])]
            rows.append({"model": name, "pattern": run.meta["architecture"]["block_pattern"], "documents": k,
                         "context_tokens": round(statistics.mean(len(p) for p in prompts)),
                         "trained_context": run.config.model.sequence_len,
                         "em": bootstrap_ci(em, n_resamples=cfg.bootstrap, seed=cfg.seed),
                         "ttft_ms": 1000 * statistics.median(time_to_first_token(model, p) for p in prompts)})
    return rows


@dataclass
class Prepared:
    """What the conditions of an evaluation (and a calibration) share: the questions, the checkpoint
    evaluated, the retriever and its documents for each question."""
    cfg: EvalConfig
    items: list[Question]
    hops: int                      # the questions' hops: 1, or 2 and more answered multi-hop
    stage: str
    evaluated: Run
    kb: KnowledgeBase
    retriever: Any
    retrieved: list[list[Document]]
    settings: dict[str, int]       # multi-hop settings

    @property
    def multi_hop(self) -> bool:
        return self.hops >= 2

    @property
    def questions(self) -> list[str]:
        return [i.question for i in self.items]

    @cached_property
    def coverage(self) -> Coverage:
        """The knowledge base's coverage weights (rag/coverage.py)."""
        return Coverage.of(self.kb.documents)

    def decision(self, run: Run) -> dict[str, Any]:
        """How `run` decides to answer or abstain under cfg.abstain_threshold (Answerer's keywords): the
        threshold, and the coverage it weighs where its stored calibration chose so."""
        exponent = run.coverage_exponent(self.cfg.abstain_threshold)
        return dict(threshold=run.abstain_threshold(self.cfg.abstain_threshold),
                    coverage=self.coverage if exponent else None, coverage_exponent=exponent)

    def asker(self, model, decided: dict[str, Any], documents: bool = True, queries: QueryGenerator | None = None):
        """answer(questions, documents) for `model` answering as `decided` (decision(run): the threshold
        and the coverage it weighs): multi-hop for 2-hop questions shown documents (queries: who writes
        the follow-ups; None: one shot), else one reply, its documents read as cfg.reading says."""
        cfg, settings = self.cfg, self.settings
        tokenizer, seq_len = self.evaluated.tokenizer, self.evaluated.config.model.sequence_len
        if self.multi_hop and documents:
            return MultiHop(model, tokenizer, Search(self.retriever, settings["hop_documents"]), seq_len,
                            # one shot: the whole context for the first documents, no query followed
                            queries or NoQueries(), settings["max_hops"] if queries else 1,
                            settings["max_query_tokens"], cfg.max_answer_tokens, settings["hop_tokens"],
                            cfg.batch_size, **decided).answer
        answerer = Answerer(model, tokenizer, seq_len, cfg.max_answer_tokens, cfg.batch_size, **decided)
        return RankOrderReader(answerer).answer if documents and cfg.reading == RANK_ORDER else answerer.answer


def is_multi_hop(question: Question) -> bool:
    """A question answered by reading documents in turn: its hops where the file says (qa build and
    the QA converters write them: a 2WikiMultiHopQA comparison of two people's facts reads both, a
    bridge comparison four), else two gold documents."""
    return question.hops >= 2 if question.hops is not None else len(question.gold_doc_ids) == 2


def stage_validation_questions(cfg: EvalConfig) -> tuple[list[Question], str]:
    """calibrate=true without questions=: the validation share the run's rag stage held out of its
    questions file (stage.questions, split for the run's seed as the stage split it: never trained
    on), with a description of them. The world's questions have no such file: there, say which to use."""
    stage = cfg.checkpoint_stage or answering_stage(1).name
    trained = checkpoint.read_meta(checkpoint.find(cfg.paths.checkpoints, cfg.run_name, stage, cfg.step))["config"]
    file, fraction = trained["stage"].get("questions"), trained["stage"].get("val_fraction")
    if not file or fraction is None:
        raise UserError(f"calibrate=true needs questions=FILE (validation questions, never the ones you evaluate on): "
                        f"{cfg.run_name}'s {stage} stage trained on the world's questions, not on a file whose "
                        "validation share could be used")
    if trained["stage"].get("name") != "rag":  # refrag splits its 2-hop file another way
        raise UserError(f"calibrate=true without questions= reads back the validation share a rag stage held out; "
                        f"{cfg.run_name}'s {stage} checkpoint is stage {trained['stage'].get('name')}'s: give "
                        f"questions=FILE (validation questions, never the ones you evaluate on)")
    if not Path(file).is_file():
        raise UserError(f"calibrate=true: {cfg.run_name}'s {stage} stage held its validation questions out of "
                        f"stage.questions={file}, which no longer exists; give questions=FILE")
    validation, _ = split_validation(read_questions(file), fraction, trained["seed"])
    return validation, f"the {stage} stage's validation share of {file} (stage.val_fraction={fraction})"


def retrieve(retriever, items: list[Question], top_k: int) -> list[list[Document]]:
    """Each question's top_k documents."""
    return [[h.document for h in row] for row in retriever.search([i.question for i in items], top_k=top_k)]


def prepare(cfg: EvalConfig, mine: list[Question] | None = None) -> Prepared:
    """mine: the questions to answer (None: questions=FILE's, or the world's)."""
    if cfg.hops not in range(1, MAX_HOPS + 1):
        raise UserError(f"hops={cfg.hops} must be 1, 2 or {MAX_HOPS}")
    if cfg.n_questions < 1 or cfg.n_unanswerable < 0:
        raise UserError(f"n_questions={cfg.n_questions} must be >= 1 and n_unanswerable={cfg.n_unanswerable} >= 0")
    threshold_setting(cfg.abstain_threshold)
    reading_setting(cfg.reading)
    if cfg.sample is not None and (cfg.sample < 1 or mine is None and not cfg.questions):
        raise UserError(f"sample={cfg.sample}: a number >= 1 of questions to evaluate from questions=FILE "
                        "(or null: all of them)")
    if mine is None and cfg.questions:
        mine = read_questions(cfg.questions)
    if mine is not None and cfg.sample is not None:
        mine = sample_questions(mine, cfg.sample, cfg.seed)
    answerable = [i for i in mine or () if i.answers]
    multi_hop = cfg.hops >= 2 or (bool(answerable) and all(is_multi_hop(i) for i in answerable))
    hops = max(cfg.hops, 2) if multi_hop else 1
    if multi_hop and cfg.reading == RANK_ORDER:
        raise UserError(f"reading={RANK_ORDER} answers from one document read alone; 2-hop questions need two "
                        "read together (multi-hop): leave reading at together")
    stage = cfg.checkpoint_stage or answering_stage(2 if multi_hop else 1).name
    evaluated = load(cfg, cfg.run_name, stage, cfg.step)
    if mine is not None:
        items = mine
    elif multi_hop:
        items = multi_hop_questions(evaluated.world, hops, cfg.n_questions, cfg.n_unanswerable, cfg.seed)
    else:
        items = world_questions(evaluated.world, cfg.n_questions, cfg.n_unanswerable, cfg.seed)
    if cfg.retriever.kind == "none":
        raise UserError("evaluate needs a retriever for the RAG condition: retriever=bm25|dense|hybrid|simple")
    kb = evaluated.knowledge_base(cfg.retriever, cfg.paths.cache)
    retriever = kb.retriever(cfg.retriever)
    return Prepared(cfg, items, hops, stage, evaluated, kb, retriever, retrieve(retriever, items, cfg.retriever.top_k),
                    hop_settings(cfg, evaluated))


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    prepared = prepare(cfg)
    items, multi_hop, stage, evaluated = prepared.items, prepared.multi_hop, prepared.stage, prepared.evaluated
    retrieved = prepared.retrieved

    def run(condition: str, answer_run: Run, docs, subset=lambda item: True, queries=None,
            asked: list[Question] | None = None) -> dict[str, Any]:
        """queries: a QueryGenerator for multi-hop answering (2-hop questions), None for one shot.
        asked: other questions than the evaluation's (docs: theirs)."""
        pool = items if asked is None else asked
        chosen = [i for i, item in enumerate(pool) if subset(item)]
        ask = prepared.asker(answer_run.model, prepared.decision(answer_run), docs is not None, queries)
        t0 = time.perf_counter()
        answers = ask([pool[i].question for i in chosen], None if docs is None else [docs[i] for i in chosen])
        seconds = time.perf_counter() - t0
        scores = [score(a, pool[i].answers, pool[i].gold_doc_ids) for a, i in zip(answers, chosen)]
        log.info("%s: %d questions in %.1f s", condition, len(chosen), seconds)
        records = [{"id": pool[i].id, "question": a.question, "reply": a.reply, "gold": list(pool[i].answers),
                    "cited": [d.id for d in a.cited], "dropped": a.dropped,
                    "hops": [{"query": h.query, "documents": [d.id for d in h.documents], "status": h.status}
                             for h in a.hops], **read_record(a)} for a, i in zip(answers, chosen)]
        summary = summarize(scores, cfg.bootstrap, cfg.seed, HOP_RATES if multi_hop else ANSWERABLE_RATES)
        # Every question's reply goes to answers.jsonl (evaluate's run dir), the first five to eval.json.
        answered = [{"condition": condition, **r, "confidence": a.confidence, "abstained": a.abstained,
                     "below_threshold": a.below_threshold, "over_abstention": a.over_abstention, "em": s["em"]}
                    for r, a, s in zip(records, answers, scores)]
        return {"condition": condition, **summary, "total_seconds": seconds, "examples": records[:5],
                ANSWERS: answered}

    conditions = []
    closed_run = evaluated
    closed_name = f"{stage} (no documents)"
    if cfg.closed_book_stage and cfg.closed_book_stage != stage:
        path = checkpoint.stage_dir(cfg.paths.checkpoints, cfg.run_name, cfg.closed_book_stage)
        if checkpoint.latest(path) is not None:
            closed_run = load(cfg, cfg.run_name, cfg.closed_book_stage)
            closed_name = cfg.closed_book_stage
        else:
            log.warning("no %s checkpoint in %s: the closed-book condition uses the %s model without documents",
                        cfg.closed_book_stage, path, stage)
    conditions.append(run(f"closed-book ({closed_name} model)", closed_run, None))
    primary = 1  # the row logged to wandb and returned to a sweep: RAG, or REFRAG for 2-hop questions
    conditions.append(run(f"RAG, {cfg.retriever.kind} top-{cfg.retriever.top_k}", evaluated, retrieved))
    if multi_hop:
        conditions.append(run("rule-based bridge queries", evaluated, retrieved, queries=BridgeQueries()))
        warm = warm_start(cfg, evaluated)
        if warm is not None:
            # Named by its step where it is the run's own, so runs that differ only in name (one per
            # seed) answer the same conditions and their tables line up (python -m hybridchat.results table).
            own = warm.parent == evaluated.path.parent
            label = f"step {int(warm.name.removeprefix('step_'))}" if own else "/".join(warm.parts[-3:])
            conditions.append(run(f"REFRAG after warm start ({label})",
                                  load_run(warm, device=cfg.gpu.device.value), retrieved, queries=ModelQueries()))
        primary = len(conditions)
        conditions.append(run("REFRAG after RL (model-written queries)" if warm is not None else
                              "REFRAG (model-written queries)", evaluated, retrieved, queries=ModelQueries()))
    if any(i.gold_doc_ids for i in items):
        gold = gold_documents(prepared.kb.documents, items)

        def has_gold(item: Question) -> bool:
            return bool(item.gold_doc_ids)

        conditions.append(run(GOLD, evaluated, gold, has_gold))
        if multi_hop:
            # What a chat user meets where retrieval shows every gold document at once: the model may
            # still query, and its queries are followed (above, one shot: a query ends the reply unanswered).
            conditions.append(run(GOLD_OWN_QUERIES, evaluated, gold, has_gold, queries=ModelQueries()))
    if cfg.hops == 2 and cfg.questions is None:
        # The one checkpoint a user talks to also gets single-hop questions: answered at once where
        # the first documents hold the answer (retrievals per question 1).
        single = world_questions(evaluated.world, cfg.n_questions, cfg.n_unanswerable, cfg.seed)
        conditions.append(run(SINGLE_HOP, evaluated, retrieve(prepared.retriever, single, cfg.retriever.top_k),
                              queries=ModelQueries(), asked=single))
    others = {name: load(cfg, name, stage) for name in cfg.compare}
    budget = [] if multi_hop else context_budget(cfg, {cfg.run_name: evaluated, **others}, items, prepared.retriever,
                                               prepared.decision)
    return {"run_name": cfg.run_name, "stage": stage, "checkpoint": evaluated.meta.get("step"), "seed": cfg.seed,
            "retriever": cfg.retriever.kind, "top_k": cfg.retriever.top_k,
            "sequence_len": evaluated.config.model.sequence_len,
            "answerable": sum(bool(i.answers) for i in items), "unanswerable": sum(not i.answers for i in items),
            "hops": prepared.hops, **({"multihop": prepared.settings} if multi_hop else {}),
            "abstain_threshold": threshold_report(cfg, evaluated),
            **({"reading": cfg.reading} if cfg.reading == RANK_ORDER else {}),
            "primary": primary, "conditions": conditions, "context_budget": budget}


def read_record(answer) -> dict[str, Any]:
    """Which document a question's answer was read from, where its documents were read in rank order
    (reading=rank_order): its number (null: none sufficed) and id, each document's id and confidence
    alone. Nothing where they were read together."""
    if answer.read_confidences is None:
        return {}
    return {"read": answer.read, "read_document": answer.documents[answer.read - 1].id if answer.read else None,
            "read_documents": [d.id for d in answer.documents], "read_confidences": answer.read_confidences}


def threshold_report(cfg: EvalConfig, evaluated: Run) -> dict[str, Any]:
    """Which abstention threshold the evaluated checkpoint answered with, and where it came from."""
    stored = evaluated.calibration
    value = evaluated.abstain_threshold(cfg.abstain_threshold)
    if cfg.abstain_threshold != CHECKPOINT:
        source = f"abstain_threshold={cfg.abstain_threshold if value is not None else 'null'}"
    elif stored is not None:
        source = f"stored with the checkpoint, {stored.describe()}"
    else:
        source = "none stored with the checkpoint"
    leak = (stored is not None and stored.questions_sha256 is not None and cfg.questions is not None
            and sha256_file(cfg.questions) == stored.questions_sha256)
    return {"value": value, "coverage_exponent": evaluated.coverage_exponent(cfg.abstain_threshold), "source": source,
            "chosen_on_these_questions": leak}


def calibrate_checkpoint(cfg: EvalConfig) -> tuple[Path, Calibration]:
    """calibrate=true: choose the abstention threshold on questions=FILE (validation questions, never
    the ones evaluated on; without one, the validation share the run's rag stage held out of its own
    questions file) for target_false_abstention, from the model's own replies as the RAG (or, for
    2-hop questions, REFRAG) condition answers them, and store it in the checkpoint's meta.json."""
    if not 0 <= cfg.target_false_abstention < 1:
        raise UserError(f"target_false_abstention={cfg.target_false_abstention} must be in [0, 1)")
    if cfg.questions:
        prepared, chosen_on = prepare(cfg), f"questions={cfg.questions}"
    else:
        validation, chosen_on = stage_validation_questions(cfg)
        prepared = prepare(cfg, validation)
    if not any(i.answers for i in prepared.items):
        raise UserError(f"{chosen_on} holds no answerable question to choose a threshold on")
    items, retrieved = list(prepared.items), list(prepared.retrieved)
    if not prepared.multi_hop:  # multi-hop: a copy's own queries could retrieve the very documents it lacks
        def search(queries: list[str], depth: int) -> list[list[Document]]:
            return [[h.document for h in row] for row in prepared.retriever.search(queries, top_k=depth)]

        copies = gold_missing_copies(items, search, cfg.retriever.top_k)
        items, retrieved = items + copies, retrieved + [list(q.candidates) for q in copies]
        chosen_on += f", with gold-missing copies of its {len(copies)} answerable questions"
    ask = prepared.asker(prepared.evaluated.model, {"threshold": None},
                         queries=ModelQueries() if prepared.multi_hop else None)
    answers = ask([i.question for i in items], retrieved)
    scores = [score(a, i.answers, i.gold_doc_ids) for a, i in zip(answers, items)]
    chosen_on += f", reading={RANK_ORDER}" if cfg.reading == RANK_ORDER else ""
    found = calibrate(scores, cfg.target_false_abstention, chosen_on,
                      sha256_file(cfg.questions) if cfg.questions else None,
                      coverages=[prepared.coverage(a.question, a.documents) for a in answers])
    checkpoint.update_meta(prepared.evaluated.path, {"abstention": found.to_meta()})
    return prepared.evaluated.path, found


def run(cfg: DictConfig) -> float:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"missing required value(s): {', '.join(missing)}")
    config: EvalConfig = OmegaConf.to_object(cfg)
    setup(config.gpu, config.seed)
    try:
        if config.calibrate:
            path, found = calibrate_checkpoint(config)
        else:
            report = evaluate(config)
    finally:
        teardown()
    if config.calibrate:
        print(f"abstain_threshold {found.threshold} stored in {path / 'meta.json'}, {found.describe()}")
        return found.threshold
    out = Path(HydraConfig.get().runtime.output_dir)
    table = markdown(report)
    answered = [a for c in report["conditions"] for a in c.pop(ANSWERS)]
    atomic_write_text(out / "eval.md", table)
    atomic_write_json(out / "eval.json", report)
    atomic_write_text(out / "answers.jsonl", "".join(json.dumps(a) + "\n" for a in answered))
    atomic_write_bytes(out / "eval.png", plot(report))
    tracker = Tracker(out, config.logger, OmegaConf.to_container(cfg, resolve=True), job_type="eval",
                      name=f"{config.run_name}-eval")
    rag = report["conditions"][report["primary"]]
    columns = columns_for(report["hops"])
    tracker.log(0, **{f"eval/{key}": rag[key][0] for key, _ in columns if key in rag})
    tracker.finish()
    print(table + f"\nreport: {out / 'eval.md'}\njson:   {out / 'eval.json'}\nplot:   {out / 'eval.png'}")
    return rag["em"][0] if "em" in rag else 0.0


register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    return run_or_exit(run, cfg)


if __name__ == "__main__":
    run_hydra_app(main)
