"""Refrag's RL (the last rl_steps steps): GRPO. Each batch is a few training questions (2-hop and, at
the warm start's share, single-hop and unanswerable ones); every question gets a group of
stage.group_size trajectories sampled with the engine and the query hook, each is scored
(reward_terms), advantages are the rewards normalised within their group, and the loss is the
policy gradient on the tokens the model wrote (retrieved tokens masked out), plus an optional KL
to the policy at the start of RL.
"""

from __future__ import annotations

from itertools import count
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from hybridchat.core.questions import Question
from hybridchat.core.seeds import DATA_ORDER, ROLLOUTS, python_rng, stream_seed
from hybridchat.data.chat import collate
from hybridchat.data.loader import Batch
from hybridchat.infra import parallel
from hybridchat.infra.context import RunContext
from hybridchat.model.lm import HybridLM
from hybridchat.rag.answer import Answer, score
from hybridchat.rag.multihop import MultiHop, Trajectory

REWARD_TERMS = ("em", "f1", "gold", "format", "hops")


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


class GRPO:
    """GRPO steps on `questions`, a batch of question indices at a time.

    config: the stage's (group_size, temperature, kl_coef, the reward weights); engine(policy): the
    multi-hop engine that samples the policy's trajectories; planner: that engine without a model
    (reads a trajectory as an answer); pad_id and width_limit: how the policy batch is padded."""

    def __init__(self, ctx: RunContext, config, questions: list[Question], engine: Callable[[nn.Module], MultiHop],
                 planner: MultiHop, pad_id: int, width_limit: int | None):
        self.ctx, self.config, self.questions = ctx, config, questions
        self.engine, self.planner, self.pad_id, self.width_limit = engine, planner, pad_id, width_limit
        self.reference = None  # the policy at the start of RL, for the KL term
        self.policy_tokens = 0  # the last step's trajectory tokens
        self._metrics: dict[str, float] = {}

    def batches(self, start: int, rank: int, world_size: int) -> Iterator[Batch]:
        """Question indices (inputs) and the batch's global index (its sampling seed); enough
        questions that a group of trajectories each fills about one micro-batch."""
        n = max(1, self.ctx.config.gpu.micro_batch // self.config.group_size)
        for index in count(start):
            if index % world_size == rank:
                picked = python_rng(self.ctx.config.seed, DATA_ORDER, "rl", index).sample(range(len(self.questions)), n)
                yield {"inputs": torch.tensor(picked), "index": torch.tensor([index])}

    def rollouts(self, questions: list[Question], seed: int) -> list[Trajectory]:
        c = self.config
        top_k = self.ctx.config.retriever.top_k
        return self.engine(self.ctx.model).rollouts(
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

    def step(self, model, indices: list[int], index: int) -> torch.Tensor:
        """The policy loss of batch `index` (questions[i] for i in indices); `model` is the policy as
        the loop runs it (DDP, FSDP, compiled), ctx.model the same weights unwrapped."""
        c = self.config
        questions = [self.questions[i] for i in indices]
        if c.kl_coef and self.reference is None:
            self.reference = self._frozen_policy()
        # Ranks sample trajectories of different lengths: under FSDP the rollouts run on the whole
        # weights (no all-gathers to keep in step); entering is collective, every rank does.
        with parallel.full_weights(self.ctx.model):
            trajectories = self.rollouts(questions, seed=stream_seed(self.ctx.config.seed, ROLLOUTS, index))
        rewards, terms = self.rewards(questions, trajectories)
        advantages = group_advantages(rewards).view(-1)
        batch = policy_batch(trajectories, self.pad_id, self.width_limit)
        batch = {k: v.to(self.ctx.runtime.device) for k, v in batch.items()}
        self.policy_tokens = batch["inputs"].numel()
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

    def _frozen_policy(self) -> HybridLM:
        """The policy as it is now, whole on every rank (gathered under FSDP), for the KL term."""
        policy, cfg = self.ctx.model, self.ctx.config
        reference = HybridLM(policy.config, policy.vocab_size, ssm_backend=cfg.gpu.ssm_backend.value,
                             request_markers=policy.request_markers)
        reference.load_state_dict(parallel.full_tensors(policy.state_dict()))
        return reference.to(self.ctx.runtime.device).eval().requires_grad_(False)

    def step_metrics(self) -> dict[str, float]:
        """What the last step measured (rewards and their terms), once: {} until the next step."""
        metrics, self._metrics = self._metrics, {}
        return metrics
