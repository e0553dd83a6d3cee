"""REFRAG (recursive RAG): the model writes follow-up queries, the engine retrieves for them, the
model answers citing across every document shown, or abstains (hybridchat/rag/multihop.py). From `rag`.

Two phases in one stage: a supervised warm start on 2-hop traces (warm_start.py) for the first
num_steps - rl_steps steps, then GRPO with the engine in the loop (grpo.py). The stage holds what both
read (the 2-hop questions, the knowledge base's titles, the engine) and switches between them: one
loop runs both phases, a batch says which phase it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from hybridchat.core.errors import UserError
from hybridchat.core.questions import Question, read_questions
from hybridchat.core.seeds import EVALUATION, SPLIT, python_rng
from hybridchat.rag.multihop import ModelQueries, MultiHop, QueryGenerator, Search
from hybridchat.training.stages import evaluate_bpb, lr_multiplier, registered
from hybridchat.training.stages.rag import RagConfig, RagStage, means
from hybridchat.training.stages.refrag.grpo import GRPO
from hybridchat.training.stages.refrag.warm_start import WarmStart


@dataclass
class RefragConfig(RagConfig):
    """Multi-hop: the model writes follow-up queries between the query tokens, the engine retrieves
    for them, the model answers with citations across all documents shown (or abstains). The first
    num_steps - rl_steps steps are a supervised warm start on 2-hop traces (plus rag's single-hop
    examples), the last rl_steps are GRPO with the engine in the loop. The rag keys it inherits set
    the single-hop examples and the hop-1 documents of a trace. The abstention threshold
    (stage.target_false_abstention) is chosen on 2-hop validation questions, answered multi-hop."""
    name: str = "refrag"
    source: Optional[str] = "rag"
    max_hops: int = 2                  # retrievals per question, the question's own included
    hop_documents: int = 2             # documents retrieved per follow-up query
    max_query_tokens: int = 16
    hop_tokens: int = 256              # context kept free for each follow-up hop's documents
    single_hop: float = 0.5            # share of warm-start examples that are rag's single-hop ones
    # share of those (answerable, their document shown) whose reply opens a follow-up query anyway
    # (the opening marker given, not learned), queries the answer it holds and answers from the first
    # documents still: a needless query costs a retrieval, not the answer (a tiny model's needless
    # query is the answer itself, "[1] Soreiport")
    needless_query: float = 0.5
    # share of the single-hop examples that ask a trace's bridge question (about its hop-1 document, the
    # answer the name the trace queries), answered at once: the question, not the documents, says
    # whether to query (warm_start.py)
    bridge_questions: float = 0.0
    # share of 2-hop traces that show both gold documents among hop 1's and answer at once, citing
    # the document that states the answer (no query: what is needed is already there)
    both_gold: float = 0.0
    hop_questions: Optional[str] = None  # your 2-hop JSONL (gold_doc_ids in hop order); None: the world's
    rl_steps: int = 0                  # the last rl_steps of num_steps are GRPO steps
    # GRPO's learning rate, a constant share of the stage's (small: noisy gradients, Muon's fixed-size steps)
    rl_lr_frac: float = 0.1
    group_size: int = 4                # trajectories sampled per question (GRPO group)
    temperature: float = 1.0           # sampling temperature of the rollouts
    kl_coef: float = 0.0               # KL (k3 estimator) to the policy at the start of RL; 0: none
    reward_em: float = 1.0             # reward terms: exact match of the answer
    reward_f1: float = 0.0             # token F1 of the answer
    reward_gold: float = 0.0           # share of the gold documents among those shown
    reward_format: float = 0.0         # well-formed trajectory (queries closed, valid citation or abstention)
    hop_cost: float = 0.0              # subtracted per follow-up retrieval


@registered
class RefragStage(RagStage):
    name = "refrag"
    config_class = RefragConfig
    answers_hops = 2

    def __init__(self, ctx):
        super().__init__(ctx)
        c = self.config
        if c.max_hops < 2:
            raise UserError(f"stage.max_hops={c.max_hops} must be >= 2 (hop 1 is the question's own retrieval)")
        for key in ("hop_documents", "max_query_tokens", "hop_tokens"):
            if getattr(c, key) < 1:
                raise UserError(f"stage.{key}={getattr(c, key)} must be >= 1")
        if not 0 <= c.single_hop < 1:
            raise UserError(f"stage.single_hop={c.single_hop} must be in [0, 1)")
        for key in ("needless_query", "both_gold", "bridge_questions"):
            if not 0 <= getattr(c, key) <= 1:
                raise UserError(f"stage.{key}={getattr(c, key)} must be in [0, 1]")
        if not 0 <= c.rl_steps <= c.num_steps:
            raise UserError(f"stage.rl_steps={c.rl_steps} must be in [0, stage.num_steps={c.num_steps}]")
        if not 0 < c.rl_lr_frac <= 1:
            raise UserError(f"stage.rl_lr_frac={c.rl_lr_frac} must be in (0, 1]")
        if c.rl_steps and (c.group_size < 2 or c.temperature <= 0):
            raise UserError(f"stage.group_size={c.group_size} must be >= 2 and stage.temperature={c.temperature} "
                            f"> 0 for GRPO (advantages compare samples of one question)")
        cfg = ctx.config
        self.titles = {d.parent_id: d.title for d in ctx.knowledge_base.documents}
        train, heldout = self._hop_questions()
        python_rng(cfg.seed, SPLIT, "2-hop").shuffle(train)
        n_val = max(1, round(len(train) * c.val_fraction))
        self.val_hops, self.train_hops = self._retrieve(train[:n_val]), self._retrieve(train[n_val:])
        self.heldout_hops = heldout
        self.n_single = min(len(self.train_questions), round(len(self.train_hops) * c.single_hop / (1 - c.single_hop)))
        if len(self.train_hops) < cfg.gpu.micro_batch:
            raise UserError(f"stage=refrag: {len(self.train_hops)} 2-hop training questions do not fill one batch "
                            f"of gpu.micro_batch={cfg.gpu.micro_batch}")
        # RL asks the warm start's mix: 2-hop questions and (single_hop of them) rag's own, answerable
        # or not, so that a follow-up query has to pay for itself where one retrieval suffices.
        self.rl_questions = self.train_hops + self.train_questions[:self.n_single]
        self.planner = self.multihop(None, self.train_filters)  # builds traces: no model needed
        self.warm_start = WarmStart(self, self.train_hops, self.val_hops, self.n_single, self.planner, self.titles)
        self.grpo = GRPO(ctx, c, self.rl_questions, lambda policy: self.multihop(policy, self.train_filters),
                         self.planner, self.renderer.pad_id, self.width_limit)
        if 0 < c.rl_steps < c.num_steps:  # the warm start's end, kept for the evaluator's comparison
            self.milestones = frozenset({c.num_steps - c.rl_steps})

    @property
    def train_filters(self):
        return None if self.config.questions or self.config.hop_questions else {"split": "train"}

    def _hop_questions(self) -> tuple[list[Question], list[Question]]:
        """(2-hop training questions, held-out 2-hop evaluation questions)."""
        c = self.config
        if c.hop_questions:
            questions = read_questions(c.hop_questions)
            for q in questions:
                if len(q.gold_doc_ids) != 2 or not q.answers or any(g not in self.titles for g in q.gold_doc_ids):
                    raise UserError(f"stage.hop_questions: {q.id}: needs an answer and two gold_doc_ids (in hop "
                                    f"order) of documents in the knowledge base, got {list(q.gold_doc_ids)}")
            return questions, []
        world = self.ctx.world
        heldout = world.questions("heldout", 2)
        heldout = python_rng(self.ctx.config.seed, EVALUATION, "2-hop-heldout").sample(heldout, min(c.eval_questions,
                                                                                              len(heldout)))
        return world.questions("train", 2), heldout

    def multihop(self, model, filters, queries: QueryGenerator | None = None) -> MultiHop:
        c = self.config
        return MultiHop(model, self.ctx.tokenizer, Search(self.ctx.retriever, c.hop_documents, filters),
                        self.ctx.config.model.sequence_len, queries or ModelQueries(), c.max_hops, c.max_query_tokens,
                        c.max_answer_tokens, c.hop_tokens)

    # -- the phase switch ------------------------------------------------------------------------

    def train_batches(self, start, rank, world_size):
        """Warm-start batches up to the first RL step's batch index, then RL batches."""
        c = self.config
        warm_end = (c.num_steps - c.rl_steps) * self.ctx.grad_accum * world_size
        if start < warm_end:
            yield from self.warm_start.batches(start, warm_end, rank, world_size)
        yield from self.grpo.batches(max(start, warm_end), rank, world_size)

    def val_batches(self):
        return self.warm_start.val_batches

    def training_step(self, model, batch):
        if "targets" in batch:
            return super().training_step(model, batch)
        return self.grpo.step(model, batch["inputs"].tolist(), int(batch["index"][0]))

    def batch_tokens(self, batch):
        """An RL batch holds question indices; the policy loss ran over the sampled trajectories."""
        return super().batch_tokens(batch) if "targets" in batch else self.grpo.policy_tokens

    def step_metrics(self):
        return self.grpo.step_metrics()

    def lr_multiplier(self, step: int) -> float:
        """The warm start has its own warmup and warmdown, so it ends settled (that checkpoint is
        the evaluator's "after the warm start"); GRPO then runs at the constant rl_lr_frac: Muon
        takes a step of fixed size whatever the gradient, and a policy gradient from a few sampled
        groups is noisy (at the warm start's rate 15 steps undid most of what it taught: docs/results.md)."""
        warm = self.config.num_steps - self.config.rl_steps
        return lr_multiplier(step, self.config, warm) if step < warm else self.config.rl_lr_frac

    # -- evaluation ------------------------------------------------------------------------------

    @cached_property
    def _gold_missing_set(self) -> list[Question]:
        """None: answered multi-hop, a copy's own queries could retrieve the very documents it lacks."""
        return []

    @cached_property
    def _hop_calibration_set(self) -> list[Question]:
        return self.with_top_k(self.val_hops[:self.config.eval_questions])

    @cached_property
    def _hop_eval_set(self) -> list[Question]:
        """Held-out 2-hop questions (the validation share for a user's hop_questions)."""
        return self.with_top_k(self.heldout_hops) if self.heldout_hops else self._hop_calibration_set

    def evaluate(self, model):
        """Trace bits per byte, then generation with model-written queries: on held-out 2-hop
        questions EM, F1, hallucination, both gold documents shown, hops and well-formed replies;
        on held-out single-hop ones EM and how often the model queried when it need not have."""
        metrics = {"val/bpb": evaluate_bpb(model, self.val_batches(), self.ctx)}
        mh = self.multihop(model, None)

        def answer(qs):
            return mh.answer([q.question for q in qs], [list(q.candidates) for q in qs])

        scored = self.sharded_scores(self._hop_eval_set, answer)
        two_hop = [s for _, s in scored]
        metrics.update(means("val", two_hop, ("em", "f1", "hallucination", "hops")))
        metrics.update({k.replace("all_gold_in_context", "both_gold"): v
                        for k, v in means("val", two_hop, ("all_gold_in_context",)).items()})
        one_hop = [s for _, s in self.sharded_scores([q for q in self._eval_set if q.answers], answer)]
        if one_hop:
            metrics["val/em_1hop"] = sum(s["em"] for s in one_hop) / len(one_hop)
            metrics["val/queried_1hop"] = sum(s["hops"] > 1 for s in one_hop) / len(one_hop)
        reused = scored if self._hop_calibration_set is self._hop_eval_set else None  # a user's questions: the same set
        metrics.update(self.choose_abstention_threshold(self._hop_calibration_set, answer, reused))
        return metrics

    def samples(self, model):
        questions = self._hop_eval_set[:3]
        answers = self.multihop(model, None).answer([q.question for q in questions],
                                                    [list(q.candidates) for q in questions])
        return [(q.question, f"{a.reply}  (queries: {[h.query for h in a.hops[1:]]}; gold {q.answers[0]})")
                for q, a in zip(questions, answers)]
