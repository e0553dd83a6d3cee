"""RAG: answer from retrieved documents and cite the one used, or abstain when none holds the answer.

Every training question is searched once with the configured retriever (stage.candidates hits).
Each epoch, each question becomes one example drawn afresh from (seed, epoch, question): a number of
documents in [min_documents, max_documents]; the gold document among retrieved distractors and the
reply "[n] answer", the gold at a random place (stage.gold_position=uniform) or where the retriever
ranked it (retrieved: the documents a reader gets at inference); or (stage.gold_missing of them, and
whenever retrieval missed it) only distractors and the reply ABSTAIN. stage.unanswerable of the examples ask about
entities that exist nowhere, with what retrieval finds for them, and the reply ABSTAIN. Up to
stage.questions_per_example - 1 follow-up questions about the same entity then ask about the same
documents. Loss only on the replies. Held-out entities (the world's held-out people, the held-out made-up names) never
appear in a training example; evaluation asks about them.

With stage.target_false_abstention (e.g. 0.1) each evaluation also chooses the abstention threshold
(hybridchat/rag/abstention.py) on up to stage.eval_questions validation questions, never the held-out
ones: the largest confidence threshold at which at most that share of the answerable ones abstain.
The loop stores it in the meta.json of the checkpoint of the same step (those saved at an evaluation
step: every eval_every steps and the last); chat and the evaluator apply it. For a user's questions the
validation questions are the ones the stage evaluates on anyway: no extra generation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch.distributed as dist

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.core.questions import Question, read_questions
from hybridchat.core.seeds import EVALUATION, EXAMPLES, SPLIT, python_rng
from hybridchat.data.chat import ChatRenderer, collate, example_batches
from hybridchat.infra.config import StageConfig
from hybridchat.rag.abstention import Calibration, calibrate, gold_missing_copies
from hybridchat.rag.answer import Answer, Answerer, fit_prompt, format_reply, parse_reply, score
from hybridchat.rag.coverage import Coverage
from hybridchat.training.stages import Stage, registered

UNIFORM, RETRIEVED = "uniform", "retrieved"  # stage.gold_position
GOLD_POSITIONS = (UNIFORM, RETRIEVED)


@dataclass
class RagConfig(StageConfig):
    """Answer from retrieved documents with a citation, or abstain when they do not hold the answer."""
    name: str = "rag"
    source: Optional[str] = "mid"
    min_documents: int = 1             # documents per training example: uniform in [min, max]
    max_documents: int = 4
    candidates: int = 10               # retrieved per question; distractors come from these
    gold_missing: float = 0.2          # share of answerable examples whose gold document is removed
    unanswerable: float = 0.15         # share of examples about entities that exist nowhere
    # the retrieved question + follow-ups about the same documents: more to learn per document read
    questions_per_example: int = 3
    questions: Optional[str] = None    # your JSONL (question, answers, gold_doc_ids); None: the world's
    val_fraction: float = 0.05         # share of training questions held out for validation loss
    eval_questions: int = 100          # held-out questions answered at each evaluation
    max_answer_tokens: int = 24
    cite_first: bool = True            # "[2] Vellport"; False: "Vellport [2]" (answer, then its source)
    # Where an answerable example shows its gold document: "uniform", at a random place among the
    # distractors; "retrieved", at the rank the retriever gave it among the documents shown (the
    # order a reader gets at inference), the last shown where it ranked below them all.
    gold_position: str = UNIFORM
    # The abstention threshold stored with each evaluated checkpoint is chosen for this false-abstention
    # rate on validation questions (e.g. 0.1); None: none is chosen, the model abstains only by writing ABSTAIN.
    target_false_abstention: Optional[float] = None

    def check(self) -> None:
        super().check()
        t = self.target_false_abstention
        if t is not None and not 0 <= t < 1:
            raise UserError(f"stage.target_false_abstention={t} must be in [0, 1) or null (no threshold)")
        if self.gold_position not in GOLD_POSITIONS:
            raise UserError(f"stage.gold_position={self.gold_position!r} must be {UNIFORM} (the gold document at a "
                            f"random place among the distractors) or {RETRIEVED} (at the rank the retriever gave it)")


@registered
class RagStage(Stage):
    name = "rag"
    config_class = RagConfig
    reads_documents = True
    monitor = "val/em"
    answers_hops = 1

    def __init__(self, ctx):
        super().__init__(ctx)
        c = self.config
        if c.questions_per_example < 1:
            raise UserError(f"stage.questions_per_example={c.questions_per_example} must be >= 1")
        if not 1 <= c.min_documents <= c.max_documents <= c.candidates:
            raise UserError(f"stage.min_documents={c.min_documents}, max_documents={c.max_documents} and "
                            f"candidates={c.candidates} must satisfy 1 <= min <= max <= candidates")
        for key in ("gold_missing", "unanswerable", "val_fraction"):
            if not 0 <= getattr(c, key) < 1:
                raise UserError(f"stage.{key}={getattr(c, key)} must be in [0, 1)")
        if ctx.retriever is None:
            raise UserError("stage=rag reads documents: choose a retriever (retriever=bm25|dense|hybrid|simple)")
        self.renderer = ChatRenderer(ctx.tokenizer)
        self.calibration: Calibration | None = None  # chosen by the last evaluate()
        train, self.heldout = self._questions()
        val, train = split_validation(train, c.val_fraction, ctx.config.seed)
        self.val_questions, self.train_questions = self._retrieve(val), self._retrieve(train)
        if len(self.train_questions) < ctx.config.gpu.micro_batch:
            raise UserError(f"stage=rag: {len(self.train_questions)} training questions do not fill one batch of "
                            f"gpu.micro_batch={ctx.config.gpu.micro_batch}")

    def _questions(self) -> tuple[list[Question], list[Question]]:
        """(training questions incl. unanswerable ones, held-out evaluation questions)."""
        c = self.config
        if c.questions:  # the user's: no held-out entities to speak of; evaluation uses the validation share
            return read_questions(c.questions), []
        world = self.ctx.world
        answerable = world.questions("train", 1)
        # A small world has few free names to make people up from: the held-out fifth comes first.
        n_unanswerable = min(round(len(answerable) * c.unanswerable / (1 - c.unanswerable)),
                             world.unanswerable_capacity() * 3 // 5)
        unanswerable = world.unanswerable_split("train", n_unanswerable)
        heldout = world.evaluation_questions(c.eval_questions, max(1, c.eval_questions // 4), self.ctx.config.seed)
        return answerable + unanswerable, heldout

    @property
    def train_filters(self) -> dict | None:
        """The world's held-out documents stay out of training contexts, even as distractors (a
        user's knowledge base has no split)."""
        return None if self.config.questions else {"split": "train"}

    def _retrieve(self, questions: list[Question]) -> list[Question]:
        hits = self.ctx.retriever.search([q.question for q in questions], top_k=self.config.candidates,
                                         filters=self.train_filters)
        return [q.with_candidates(h.document for h in row) for q, row in zip(questions, hits)]

    def documents_and_reply(self, q: Question, rng: random.Random) -> tuple[list[Document], str]:
        """The documents one example shows, best first, and the reply it teaches: the best-ranked
        distractors and the gold document's best-ranked chunk, placed as stage.gold_position says
        (retrieved: behind the distractors the retriever ranked above it; the last place where they
        fill every other one, so the example still teaches the answer and stage.gold_missing alone
        sets how often it is the abstention)."""
        c = self.config
        k = rng.randint(c.min_documents, c.max_documents)
        gold = [d for d in q.candidates if d.parent_id in q.gold_doc_ids]
        others = [d for d in q.candidates if d.parent_id not in q.gold_doc_ids]
        if not q.answers or not gold or rng.random() < c.gold_missing:
            return others[:k], format_reply(None)
        docs = others[:k - 1]
        if c.gold_position == RETRIEVED:
            # gold[0] is the best-ranked gold chunk: every candidate above it is a distractor
            position = min(q.candidates.index(gold[0]), len(docs))
        else:
            position = rng.randint(0, len(docs))
        docs.insert(position, gold[0])
        return docs, format_reply(q.answers[0], position + 1, c.cite_first)

    def example(self, q: Question, rng: random.Random, follow_ups: list[Question] = ()):
        """One training conversation: q with its documents and reply, then follow-up questions about
        the same documents (each reply cites where the document holding its answer is shown, or
        abstains). Follow-ups multiply what one set of documents teaches at a few tokens each."""
        docs, reply = self.documents_and_reply(q, rng)
        turns = [(f.question, f) for f in follow_ups]
        # The prompt must fit as at inference: the lowest-ranked (last) documents are dropped; when
        # that drops the one with the answer, the right reply becomes the abstention.
        later = sum(len(self.ctx.tokenizer.encode(question)) + self.config.max_answer_tokens + 4 for question, _ in turns)
        budget = self.ctx.config.model.sequence_len - self.config.max_answer_tokens - 1 - later
        _, shown = fit_prompt(self.renderer, q.question, docs, budget)
        cited = parse_reply(reply)[1]
        if cited and cited[0] > len(shown):
            reply = format_reply(None)
        messages = [{"role": "user", "content": q.question, "documents": shown}, {"role": "assistant", "content": reply}]
        for question, f in turns:
            where = [n for n, d in enumerate(shown, 1) if d.parent_id in f.gold_doc_ids]
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": format_reply(f.answers[0], where[0], self.config.cite_first) if where
                          else format_reply(None)}]
        return self.renderer.render(messages)

    @cached_property
    def _same_gold(self) -> dict[tuple[str, ...], list[int]]:
        """Answerable training questions grouped by their gold documents: follow-up candidates."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, q in enumerate(self.train_questions):
            if q.answers and q.gold_doc_ids:
                groups.setdefault(q.gold_doc_ids, []).append(i)
        return groups

    def _follow_ups(self, q: Question, rng: random.Random) -> list[Question]:
        if not q.answers or self.config.questions_per_example <= 1:
            return []
        others = [self.train_questions[i] for i in self._same_gold.get(q.gold_doc_ids, [])
                  if self.train_questions[i].question != q.question]
        return rng.sample(others, min(len(others), self.config.questions_per_example - 1))

    def epoch_example(self, questions: list[Question], i: int, epoch: int):
        """questions[i]'s training example in epoch `epoch`: its draws from the examples stream at (epoch, i)."""
        rng = python_rng(self.ctx.config.seed, EXAMPLES, "single-hop", epoch, i)
        return self.example(questions[i], rng, self._follow_ups(questions[i], rng))

    def train_batches(self, start, rank, world_size):
        return example_batches(len(self.train_questions),
                               lambda i, epoch: self.epoch_example(self.train_questions, i, epoch),
                               self.ctx.config.gpu.micro_batch, self.ctx.config.seed, self.renderer.pad_id,
                               start, rank, world_size, self.width_limit, self.config.length_grouping)

    @cached_property
    def _val(self):
        size = self.ctx.config.gpu.micro_batch
        n = min(len(self.val_questions), size * self.config.eval_batches)
        examples = [self.example(q, python_rng(self.ctx.config.seed, EVALUATION, "single-hop-validation", i))
                    for i, q in enumerate(self.val_questions[:n])]
        return [collate(examples[i:i + size], self.renderer.pad_id) for i in range(0, n, size)]

    def val_batches(self):
        return self._val

    @cached_property
    def _calibration_set(self) -> list[Question]:
        """Validation questions the abstention threshold is chosen on, with top_k retrieved."""
        return self.with_top_k(self.val_questions[:self.config.eval_questions])

    @cached_property
    def _eval_set(self) -> list[Question]:
        """Held-out questions (the validation share for a user's questions), with top_k retrieved."""
        return self.with_top_k(self.heldout) if self.heldout else self._calibration_set

    def with_top_k(self, questions: list[Question]) -> list[Question]:
        """The questions with what the configured retriever finds for them (top_k, unfiltered: as a
        user asking would get)."""
        hits = self.ctx.retriever.search([q.question for q in questions], top_k=self.ctx.config.retriever.top_k)
        return [q.with_candidates(h.document for h in row) for q, row in zip(questions, hits)]

    def sharded_scores(self, questions: list[Question], answer) -> list[tuple[Question, dict]]:
        """Each rank answers its share (answer(questions) -> Answers); every rank gets all
        (question, score) pairs, in the same order."""
        rt = self.ctx.runtime
        mine = questions[rt.rank::rt.world_size]
        scores = [self.scored(a, q) for a, q in zip(answer(mine), mine)]
        if rt.distributed:
            gathered = [None] * rt.world_size
            dist.all_gather_object(gathered, scores)
            scores = [s for part in gathered for s in part]
        return list(zip([q for r in range(rt.world_size) for q in questions[r::rt.world_size]], scores))

    def scored(self, answer: Answer, question: Question) -> dict:
        """The answer's scores and, where a threshold is to be chosen, its documents' coverage of the
        question (rag/coverage.py), which the choice may weigh."""
        found = score(answer, question.answers, question.gold_doc_ids)
        if self.config.target_false_abstention is not None:
            found["coverage"] = self._coverage(answer.question, answer.documents)
        return found

    @cached_property
    def _gold_missing_set(self) -> list[Question]:
        """Gold-missing copies of the validation questions the threshold is chosen on (rag/abstention.py)."""
        def search(queries: list[str], depth: int) -> list[list[Document]]:
            return [[h.document for h in row] for row in self.ctx.retriever.search(queries, top_k=depth)]

        return gold_missing_copies(self._calibration_set, search, self.ctx.config.retriever.top_k)

    @cached_property
    def _coverage(self) -> Coverage:
        return Coverage.of(self.ctx.retriever.documents)

    def _answerer(self, model):
        return Answerer(model, self.ctx.tokenizer, self.ctx.config.model.sequence_len, self.config.max_answer_tokens)

    def evaluate(self, model):
        """Answer-token bpb, and what generation gets right on held-out questions: exact match,
        hallucination and false abstention on answerable ones, abstention on unanswerable ones."""
        metrics = super().evaluate(model)

        def answer(qs):
            return self._answerer(model).answer([q.question for q in qs], [list(q.candidates) for q in qs])

        scored = self.sharded_scores(self._eval_set, answer)
        answerable = [s for q, s in scored if q.answers]
        unanswerable = [s for q, s in scored if not q.answers]
        metrics.update(means("val", answerable, ("em", "f1", "hallucination", "false_abstention", "citation")))
        if unanswerable:
            metrics["val/abstain_unanswerable"] = sum(s["abstain"] for s in unanswerable) / len(unanswerable)
        reused = scored if self._calibration_set is self._eval_set else None  # a user's questions: the same set
        metrics.update(self.choose_abstention_threshold(self._calibration_set, answer, reused))
        return metrics

    def choose_abstention_threshold(self, questions: list[Question], answer, scored=None) -> dict[str, float]:
        """Choose the abstention threshold on validation `questions` (answer(questions) -> the model's
        own Answers; `scored`: their (question, score) pairs where evaluation already made them), and
        on gold-missing copies of them (rag/abstention.py)."""
        target = self.config.target_false_abstention
        self.calibration = None
        if target is None:
            return {}
        scored = self.sharded_scores(questions, answer) if scored is None else scored
        scored = scored + self.sharded_scores(self._gold_missing_set, answer)
        self.calibration = calibrate([s for _, s in scored], target, f"the {self.name} stage's validation questions",
                                     coverages=[s["coverage"] for _, s in scored])
        c = self.calibration
        found = {"abstain_threshold": c.threshold, "threshold_false_abstention": c.false_abstention,
                 "threshold_abstain_unanswerable": c.abstain_unanswerable}
        return {f"val/{k}": v for k, v in found.items() if v is not None}

    def checkpoint_meta(self) -> dict:
        return {"abstention": self.calibration.to_meta()} if self.calibration is not None else {}

    def samples(self, model):
        questions = self._eval_set[:2] + [q for q in self._eval_set if not q.answers][:1]
        answers = self._answerer(model).answer([q.question for q in questions], [list(q.candidates) for q in questions])
        return [(q.question, f"{a.reply}" + (f"  (cites {a.cited[0].id})" if a.cited else "")) for q, a in
                zip(questions, answers)]


def means(prefix: str, scores: list[dict], keys) -> dict[str, float]:
    out = {}
    for key in keys:
        values = [s[key] for s in scores if s[key] is not None]
        if values:
            out[f"{prefix}/{key}"] = sum(values) / len(values)
    return out


def split_validation(questions: list[Question], fraction: float, seed: int) -> tuple[list[Question], list[Question]]:
    """(validation, training) as the stage splits its questions for the run's seed; the evaluator's
    calibrate=true reads a run's validation share back with it."""
    return validation_split(questions, fraction, python_rng(seed, SPLIT, "single-hop"))


def validation_split(questions: list[Question], fraction: float, rng: random.Random) -> tuple[list[Question], list[Question]]:
    """(validation, training): `fraction` of the answerable and of the unanswerable questions held out
    apart, at least one answerable one (the exact match every evaluation reports, and the stage is
    judged by, needs one); each kind in an order shuffled by `rng`."""
    answerable = [q for q in questions if q.answers]
    unanswerable = [q for q in questions if not q.answers]
    if not answerable:
        raise UserError("stage=rag: no training question has an answer (every row's answers is empty); "
                        "it needs answerable questions to learn from and to validate on")
    rng.shuffle(answerable)
    rng.shuffle(unanswerable)
    n_answerable, n_unanswerable = max(1, round(len(answerable) * fraction)), round(len(unanswerable) * fraction)
    validation = answerable[:n_answerable] + unanswerable[:n_unanswerable]
    rng.shuffle(validation)  # mixed: the threshold is chosen on its first stage.eval_questions, both kinds among them
    return validation, answerable[n_answerable:] + unanswerable[n_unanswerable:]
