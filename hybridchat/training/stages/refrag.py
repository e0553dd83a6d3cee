"""REFRAG (recursive RAG): the model writes follow-up queries, the engine retrieves for them, the
model answers citing across every document shown, or abstains (hybridchat/rag/multihop.py). From `rag`.

Warm start (the first num_steps - rl_steps steps): 2-hop traces from the training split,

    question -> hop-1 documents (the gold first-hop document among retrieved distractors)
      -> the query: "[n] name", the hop-1 document naming the bridge entity, then its name (the
         title of gold_doc_ids[1]): the reading an answer does ("[n] answer"), so rag's skill carries over
      -> what retrieval finds for it, exactly as the engine's hook would (same fitting, same search)
      -> "[n] answer" citing the document that states it (ABSTAIN when it was not found)

mixed with rag's single-hop examples (stage.single_hop of them), so the model keeps answering at
once when the first documents suffice. stage.needless_query of those query anyway, for the answer
they already hold, and answer from the first documents: how to go on after a query that was not
needed, without teaching to open one (its opening marker is given, not learned). Loss on what the
model writes only: the queries and the reply, never the retrieved documents.

RL (the last rl_steps steps): GRPO. Each batch is a few training questions (2-hop and, at the warm
start's share, single-hop and unanswerable ones); every question gets a
group of stage.group_size trajectories sampled with the engine and the query hook, each is scored
(reward_terms), advantages are the rewards normalised within their group, and the loss is the
policy gradient on the tokens the model wrote (retrieved tokens masked out), plus an optional KL
to the policy at the start of RL. One loop runs both phases: a batch says which phase it is.
"""

from __future__ import annotations

import random
from functools import cached_property
from itertools import count, islice
from typing import Sequence

import torch

from hybridchat.infra import parallel
from hybridchat.rag.answer import Answer, format_reply, parse_reply, score
from hybridchat.data.chat import collate, example_batches
from hybridchat.core.errors import UserError
from hybridchat.core.questions import Question, read_questions
from hybridchat.model.lm import HybridLM
from hybridchat.rag.multihop import Hop, ModelQueries, MultiHop, QueryGenerator, Search, Trajectory
from hybridchat.training.stages import evaluate_bpb, lr_multiplier
from hybridchat.training.stages.rag import RagStage, means

REWARD_TERMS = ("em", "f1", "gold", "format", "hops")


class _CitingQuery(QueryGenerator):
    """A warm-start query written for the model: a name (the bridge entity's; for a needless query,
    the answer's), citing the hop-1 document it is read in (as an answer cites its source), once
    hop 1 shows that document."""

    def __init__(self, name: str, first_gold: str, cite_first: bool):
        self.name, self.first_gold, self.cite_first = name, first_gold, cite_first

    def query(self, question: str, hops: Sequence[Hop]) -> str | None:
        where = [n for n, d in enumerate(hops[0].documents, 1) if d.parent_id == self.first_gold]
        return format_reply(self.name, where[0], self.cite_first) if len(hops) == 1 and where else None


def _conversation(question: str, hops: Sequence[Hop], reply: str, learn_opening: bool = True) -> list[dict]:
    """The question with hop 1's documents, then a reply holding the later hops' queries and
    documents before its text (the renderer's messages)."""
    return [{"role": "user", "content": question, "documents": hops[0].documents},
            {"role": "assistant", "content": reply,
             "hops": [{"query": h.query, "documents": h.documents, "learn_opening": learn_opening} for h in hops[1:]]}]


def reward_terms(answer: Answer, answers: Sequence[str], gold_doc_ids: Sequence[str]) -> dict[str, float]:
    """What a trajectory earned: exact match and F1 of its answer (on a question no document
    answers, both are 1 for abstaining), the share of gold documents it was shown, whether it is
    well-formed, and its follow-up retrievals (charged by hop_cost)."""
    s = score(answer, answers, gold_doc_ids)
    shown = {d.parent_id for d in answer.documents}
    if not answers:
        s["em"] = s["f1"] = s["abstain"]
    return {"em": s["em"] or 0.0, "f1": s["f1"] or 0.0,
            "gold": sum(g in shown for g in gold_doc_ids) / len(gold_doc_ids) if gold_doc_ids else 0.0,
            "format": float(answer.format_ok), "hops": float(max(0, answer.n_hops - 1))}


def reward_weights(c) -> dict[str, float]:
    """stage.reward_* and hop_cost as weights of the reward terms (a hop costs: negative weight)."""
    return {"em": c.reward_em, "f1": c.reward_f1, "gold": c.reward_gold, "format": c.reward_format,
            "hops": -c.hop_cost}


def total_reward(terms: dict[str, float], weights: dict[str, float]) -> float:
    return sum(weights[k] * terms[k] for k in REWARD_TERMS)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each reward minus its group's mean, over the group's standard deviation (population);
    rewards (questions, group_size). A group whose rewards are all equal teaches nothing: 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def policy_batch(trajectories: Sequence[Trajectory], pad_id: int, width_limit: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """Trajectories as right-padded rows: inputs, and targets on the tokens the model wrote (-1 on
    the prompt, on injected documents and on padding)."""
    return collate([(t.prompt + t.tokens, [0] * len(t.prompt) + t.written) for t in trajectories], pad_id,
                   width_limit)


def token_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(target) per position (B, T); 0 where there is no target."""
    losses = model(batch["inputs"], batch["targets"], reduction="none")
    return -losses.view(batch["targets"].shape)


def grpo_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              reference: torch.Tensor | None = None, kl_coef: float = 0.0) -> tuple[torch.Tensor, float]:
    """Policy gradient on written tokens (one on-policy update, so the clipped ratio is 1):
    -advantage x log p, averaged over all written tokens of the batch; plus kl_coef x the k3
    estimate of KL(policy || reference). Returns (loss, mean KL)."""
    n = mask.sum().clamp(min=1)
    loss = -(advantages[:, None] * logprobs * mask).sum() / n
    kl = torch.zeros(())
    if reference is not None:
        delta = (reference - logprobs) * mask
        kl = ((delta.exp() - delta - 1) * mask).sum() / n
        loss = loss + kl_coef * kl
    return loss, float(kl.detach())


class RefragStage(RagStage):
    name = "refrag"

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
        if not 0 <= c.needless_query <= 1:
            raise UserError(f"stage.needless_query={c.needless_query} must be in [0, 1]")
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
        random.Random(cfg.seed).shuffle(train)
        n_val = max(1, round(len(train) * c.val_fraction))
        self.val_hops, self.train_hops = self._retrieve(train[:n_val]), self._retrieve(train[n_val:])
        self.heldout_hops = heldout or self.val_hops[:c.eval_questions]
        self.n_single = min(len(self.train_questions), round(len(self.train_hops) * c.single_hop / (1 - c.single_hop)))
        if len(self.train_hops) < cfg.gpu.micro_batch:
            raise UserError(f"stage=refrag: {len(self.train_hops)} 2-hop training questions do not fill one batch "
                            f"of gpu.micro_batch={cfg.gpu.micro_batch}")
        # RL asks the warm start's mix: 2-hop questions and (single_hop of them) rag's own, answerable
        # or not, so that a follow-up query has to pay for itself where one retrieval suffices.
        self.rl_questions = self.train_hops + self.train_questions[:self.n_single]
        self.planner = self.multihop(None, self.train_filters)  # builds traces: no model needed
        self.reference = None  # the policy at the start of RL, for the KL term
        self._policy_tokens = 0  # the last GRPO step's trajectory tokens
        if 0 < c.rl_steps < c.num_steps:  # the warm start's end, kept for the evaluator's comparison
            self.milestones = frozenset({c.num_steps - c.rl_steps})
        self._metrics: dict[str, float] = {}

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
        heldout = random.Random(f"{self.ctx.config.seed}/refrag-eval").sample(heldout, min(c.eval_questions,
                                                                                            len(heldout)))
        return world.questions("train", 2), heldout

    def multihop(self, model, filters, queries: QueryGenerator | None = None) -> MultiHop:
        c = self.config
        return MultiHop(model, self.ctx.tokenizer, Search(self.ctx.retriever, c.hop_documents, filters),
                        self.ctx.config.model.sequence_len, queries or ModelQueries(), c.max_hops, c.max_query_tokens,
                        c.max_answer_tokens, c.hop_tokens)

    # -- warm start ------------------------------------------------------------------------------

    def trace_messages(self, q: Question, rng: random.Random) -> list[dict]:
        """One 2-hop training conversation: the hop-1 documents with the first gold document at a
        random rank, the bridge query, its documents as the engine retrieves them, the cited answer."""
        c = self.config
        first_gold, answer_doc = q.gold_doc_ids[0], q.gold_doc_ids[-1]
        k = rng.randint(c.min_documents, c.max_documents)
        gold = [d for d in q.candidates if d.parent_id == first_gold][:1] or self._document(first_gold)
        docs = [d for d in q.candidates if d.parent_id not in q.gold_doc_ids][:k - 1]
        docs.insert(rng.randint(0, len(docs)), gold[0])
        bridge = _CitingQuery(self.titles[q.gold_doc_ids[1]], first_gold, c.cite_first)
        hops = self.planner.plan(q.question, docs, bridge)
        shown = [d for h in hops for d in h.documents]
        where = [n for n, d in enumerate(shown, 1) if d.parent_id == answer_doc]
        reply = format_reply(q.answers[0], where[0], c.cite_first) if where and len(hops) > 1 else format_reply(None)
        return _conversation(q.question, hops, reply)

    def needless_query_messages(self, q: Question, rng: random.Random) -> list[dict] | None:
        """A single-hop conversation whose reply first queries the answer it already holds, then
        answers from where it read it: how to go on after a follow-up query that was not needed.
        The query's opening marker is given, not learned: the model is not taught to open one. None
        when rag's example for q would abstain."""
        docs, reply = self.documents_and_reply(q, rng)
        _, cited, abstained = parse_reply(reply)
        if abstained:
            return None
        gold = docs[cited[0] - 1].parent_id
        hops = self.planner.plan(q.question, docs, _CitingQuery(q.answers[0], gold, self.config.cite_first))
        shown = [d for h in hops for d in h.documents]
        where = [n for n, d in enumerate(shown, 1) if d.parent_id in q.gold_doc_ids]
        reply = format_reply(q.answers[0], where[0], self.config.cite_first) if where else format_reply(None)
        return _conversation(q.question, hops, reply, learn_opening=False)

    def _document(self, parent_id: str):
        return [d for d in self.ctx.knowledge_base.documents if d.parent_id == parent_id][:1]

    def _warm_example(self, i: int, epoch: int):
        """Items 0..len(train_hops)-1 are 2-hop traces, the next n_single are rag's single-hop
        examples, a different slice of its questions every epoch."""
        if i < len(self.train_hops):
            rng = random.Random(f"{self.ctx.config.seed}/refrag/{epoch}/{i}")
            return self.renderer.render(self.trace_messages(self.train_hops[i], rng))
        j = (i - len(self.train_hops) + epoch * self.n_single) % len(self.train_questions)
        rng = random.Random(f"{self.ctx.config.seed}/needless/{epoch}/{j}")
        if rng.random() < self.config.needless_query:
            messages = self.needless_query_messages(self.train_questions[j], rng)
            if messages is not None:
                return self.renderer.render(messages)
        return self._example(self.train_questions, j, epoch)

    def train_batches(self, start, rank, world_size):
        """Warm-start batches up to the first RL step's batch index, then RL batches."""
        c, cfg = self.config, self.ctx.config
        warm_end = (c.num_steps - c.rl_steps) * self.ctx.grad_accum * world_size
        if start < warm_end:
            mine = sum(1 for i in range(start, warm_end) if i % world_size == rank)
            yield from islice(example_batches(len(self.train_hops) + self.n_single, self._warm_example,
                                              cfg.gpu.micro_batch, cfg.seed, self.renderer.pad_id, start, rank,
                                              world_size, self.width_limit, c.length_grouping), mine)
        yield from self._rl_batches(max(start, warm_end), rank, world_size)

    def _rl_batches(self, start: int, rank: int, world_size: int):
        """Question indices (inputs) and the batch's global index (its sampling seed); enough
        questions that a group of trajectories each fills about one micro-batch."""
        n = max(1, self.ctx.config.gpu.micro_batch // self.config.group_size)
        for index in count(start):
            if index % world_size == rank:
                picked = random.Random(f"{self.ctx.config.seed}/rl/{index}").sample(range(len(self.rl_questions)), n)
                yield {"inputs": torch.tensor(picked), "index": torch.tensor([index])}

    @cached_property
    def _trace_val(self):
        size = self.ctx.config.gpu.micro_batch
        n = min(len(self.val_hops), size * self.config.eval_batches)
        examples = [self.renderer.render(self.trace_messages(q, random.Random(f"val/{i}")))
                    for i, q in enumerate(self.val_hops[:n])]
        return [collate(examples[i:i + size], self.renderer.pad_id) for i in range(0, n, size)]

    def val_batches(self):
        return self._trace_val

    # -- RL --------------------------------------------------------------------------------------

    def training_step(self, model, batch):
        if "targets" in batch:
            return super().training_step(model, batch)
        return self.grpo_step(model, batch["inputs"].tolist(), int(batch["index"][0]))

    def rollouts(self, questions: list[Question], seed: int) -> list[Trajectory]:
        c, policy = self.config, self.ctx.model
        top_k = self.ctx.config.retriever.top_k
        return self.multihop(policy, self.train_filters).rollouts(
            [q.question for q in questions], [list(q.candidates[:top_k]) for q in questions],
            num_samples=c.group_size, temperature=c.temperature, seed=seed)

    def rewards(self, questions: list[Question], trajectories: list[Trajectory]) -> tuple[torch.Tensor, dict]:
        """(rewards (questions, group_size), mean of every term)."""
        terms = [reward_terms(self.planner.to_answer(questions[t.index].question, t), questions[t.index].answers,
                              questions[t.index].gold_doc_ids) for t in trajectories]
        weights = reward_weights(self.config)
        rewards = torch.tensor([total_reward(t, weights) for t in terms], dtype=torch.float32)
        return rewards.view(len(questions), self.config.group_size), {k: sum(t[k] for t in terms) / len(terms)
                                                                      for k in REWARD_TERMS}

    def grpo_step(self, model, indices: list[int], index: int) -> torch.Tensor:
        c = self.config
        questions = [self.rl_questions[i] for i in indices]
        if c.kl_coef and self.reference is None:
            self.reference = self._frozen_policy()
        # Ranks sample trajectories of different lengths: under FSDP the rollouts run on the whole
        # weights (no all-gathers to keep in step); entering is collective, every rank does.
        with parallel.full_weights(self.ctx.model):
            trajectories = self.rollouts(questions, seed=self.ctx.config.seed * 100_003 + index)
        rewards, terms = self.rewards(questions, trajectories)
        advantages = group_advantages(rewards).view(-1)
        batch = policy_batch(trajectories, self.renderer.pad_id, self.width_limit)
        batch = {k: v.to(self.ctx.runtime.device) for k, v in batch.items()}
        self._policy_tokens = batch["inputs"].numel()
        mask = (batch["targets"] >= 0).float()
        logprobs = token_logprobs(model, batch)
        reference = None
        if self.reference is not None:
            with torch.no_grad():
                reference = token_logprobs(self.reference, batch)
        loss, kl = grpo_loss(logprobs, advantages.to(logprobs.device), mask, reference, c.kl_coef)
        self._metrics = {"rl/reward": float(rewards.mean()), **{f"rl/{k}": v for k, v in terms.items()},
                         "rl/accuracy": terms["em"], "rl/hops": terms["hops"] + 1, "rl/kl": kl}
        return loss

    def batch_tokens(self, batch):
        """An RL batch holds question indices; the policy loss ran over the sampled trajectories."""
        return super().batch_tokens(batch) if "targets" in batch else self._policy_tokens

    def _frozen_policy(self) -> HybridLM:
        """The policy as it is now, whole on every rank (gathered under FSDP), for the KL term."""
        policy, cfg = self.ctx.model, self.ctx.config
        reference = HybridLM(policy.config, policy.vocab_size, ssm_backend=cfg.gpu.ssm_backend.value)
        reference.load_state_dict(parallel.full_tensors(policy.state_dict()))
        return reference.to(self.ctx.runtime.device).eval().requires_grad_(False)

    def step_metrics(self):
        metrics, self._metrics = self._metrics, {}
        return metrics

    def lr_multiplier(self, step: int) -> float:
        """The warm start has its own warmup and warmdown, so it ends settled (that checkpoint is
        the evaluator's "after the warm start"); GRPO then runs at the constant rl_lr_frac: Muon
        takes a step of fixed size whatever the gradient, and a policy gradient from a few sampled
        groups is noisy (at the warm start's rate 15 steps undid most of what it taught: README)."""
        warm = self.config.num_steps - self.config.rl_steps
        return lr_multiplier(step, self.config, warm) if step < warm else self.config.rl_lr_frac

    # -- evaluation ------------------------------------------------------------------------------

    @cached_property
    def _hop_eval_set(self) -> list[Question]:
        return self.with_top_k(self.heldout_hops)

    def evaluate(self, model):
        """Trace bits per byte, then generation with model-written queries: on held-out 2-hop
        questions EM, F1, hallucination, both gold documents shown, hops and well-formed replies;
        on held-out single-hop ones EM and how often the model queried when it need not have."""
        metrics = {"val/bpb": evaluate_bpb(model, self.val_batches(), self.ctx)}
        mh = self.multihop(model, None)

        def answer(qs):
            return mh.answer([q.question for q in qs], [list(q.candidates) for q in qs])

        two_hop = [s for _, s in self.sharded_scores(self._hop_eval_set, answer)]
        metrics.update(means("val", two_hop, ("em", "f1", "hallucination", "hops")))
        metrics.update({k.replace("all_gold_in_context", "both_gold"): v
                        for k, v in means("val", two_hop, ("all_gold_in_context",)).items()})
        one_hop = [s for _, s in self.sharded_scores([q for q in self._eval_set if q.answers], answer)]
        if one_hop:
            metrics["val/em_1hop"] = sum(s["em"] for s in one_hop) / len(one_hop)
            metrics["val/queried_1hop"] = sum(s["hops"] > 1 for s in one_hop) / len(one_hop)
        return metrics

    def samples(self, model):
        questions = self._hop_eval_set[:3]
        answers = self.multihop(model, None).answer([q.question for q in questions],
                                                    [list(q.candidates) for q in questions])
        return [(q.question, f"{a.reply}  (queries: {[h.query for h in a.hops[1:]]}; gold {q.answers[0]})")
                for q, a in zip(questions, answers)]
