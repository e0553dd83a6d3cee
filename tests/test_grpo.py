"""training/stages/refrag/grpo.py's GRPO.step as the loop runs it (the pure functions, reward terms,
group_advantages and grpo_loss, against hand values in tests/test_refrag.py): sampled trajectories
scored, advantages normalised within each question's group, the policy gradient on written tokens
only, and the KL term against the policy as it was at the first RL step, checked at a later step
(at the first one the KL is 0 whatever the formula). The reference is a plain loop over the
trajectories with a full forward each, in float64."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_VOCAB, random_model

from hybridchat.rag.multihop import Trajectory
from hybridchat.training.stages.refrag import grpo as grpo_module
from hybridchat.training.stages.refrag.grpo import GRPO

GROUP = 3
# Per question (two in the batch), the rewards of its GROUP samples: normalising over the whole
# batch, or reading the rewards sample-major, gives other advantages.
REWARDS = [[0.0, 1.0, 2.0], [0.0, 0.0, 6.0]]


def _trajectories() -> list[Trajectory]:
    """Question-major, as MultiHop.rollouts returns them: prompts of 3 tokens, replies of 2 to 7
    tokens that mix written (1) and injected (0) tokens, so that rows pad to different widths."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for q in range(2):
        for s in range(GROUP):
            n = 2 + (q * GROUP + s) % 6
            tokens = torch.randint(3, TINY_VOCAB, (n,), generator=gen).tolist()
            written = [1] * n
            if n > 3:
                written[1:3] = [0, 0]  # a retrieved document, given not written
            out.append(Trajectory(index=q, prompt=[1, 4 + q, 5], tokens=tokens, written=written, hops=[],
                                  finish="stop", answer_start=0))
    return out


def _grpo(model, trajectories, kl_coef: float, monkeypatch) -> tuple[GRPO, list]:
    rewards = {id(t): REWARDS[t.index][i % GROUP] for i, t in enumerate(trajectories)}
    # The reward is the exact-match term (the only weight that is not 0) set per trajectory.
    monkeypatch.setattr(grpo_module, "reward_terms", lambda answer, answers, gold: {
        "em": rewards[id(answer)], "f1": 0.0, "gold": 0.0, "format": 1.0, "hops": 0.0})
    calls = []

    class Engine:
        def rollouts(self, questions, candidates, num_samples, temperature, seed):
            calls.append((questions, num_samples, temperature, seed))
            return trajectories

    config = SimpleNamespace(group_size=GROUP, temperature=0.7, kl_coef=kl_coef, reward_em=1.0, reward_f1=0.0,
                             reward_gold=0.0, reward_format=0.0, hop_cost=0.0)
    ctx = SimpleNamespace(model=model, runtime=SimpleNamespace(device=torch.device("cpu")),
                          config=SimpleNamespace(seed=0, retriever=SimpleNamespace(top_k=2),
                                                 gpu=SimpleNamespace(micro_batch=6, ssm_backend=SimpleNamespace(
                                                     value="torch"))))
    questions = [SimpleNamespace(question=f"q{i}", answers=["a"], gold_doc_ids=["d"], candidates=["c1", "c2", "c3"])
                 for i in range(4)]
    planner = SimpleNamespace(to_answer=lambda question, t: t)
    return GRPO(ctx, config, questions, lambda policy: Engine(), planner, pad_id=0, width_limit=None), calls


def _written_logprobs(model, t: Trajectory) -> list[float]:
    """log p of each written token under `model`, from one full forward of prompt + tokens."""
    seq = t.prompt + t.tokens
    with torch.no_grad():
        log_p = model(torch.tensor([seq])).double().log_softmax(-1)[0]
    return [log_p[len(t.prompt) + j - 1, tok].item() for j, (tok, w) in enumerate(zip(t.tokens, t.written)) if w]


def _plain_advantages() -> list[float]:
    out = []
    for group in REWARDS:
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        out += [(r - mean) / (std + 1e-6) for r in group]
    return out


def _plain_loss(policy, reference, trajectories, kl_coef) -> tuple[float, float]:
    """-sum(advantage x log p) over every written token / their count, + kl_coef x the k3 estimate
    of KL(policy || reference) averaged over the same tokens."""
    pg = kl = 0.0
    n = 0
    for advantage, t in zip(_plain_advantages(), trajectories):
        now = _written_logprobs(policy, t)
        then = _written_logprobs(reference, t)
        pg -= advantage * sum(now)
        kl += sum(math.exp(b - a) - (b - a) - 1 for a, b in zip(now, then))
        n += len(now)
    return pg / n + kl_coef * kl / n, kl / n


def test_the_step_normalises_rewards_within_each_question_s_group_and_weighs_only_written_tokens(monkeypatch):
    model = random_model("MA", 2, TINY_VOCAB, dtype=torch.float32, chunk_size=4, sequence_len=64)
    trajectories = _trajectories()
    grpo, calls = _grpo(model, trajectories, 0.0, monkeypatch)
    loss = grpo.step(model, [2, 0], index=5)
    # The engine sampled a group of GROUP at the stage's temperature for the batch's questions.
    assert [(q, n, temp) for q, n, temp, _ in calls] == [(["q2", "q0"], GROUP, 0.7)]
    want, _ = _plain_loss(model, model, trajectories, 0.0)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    loss.backward()  # a policy gradient reaches the weights
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0
    metrics = grpo.step_metrics()
    assert metrics["rl/reward"] == pytest.approx(sum(map(sum, REWARDS)) / 6)
    assert metrics["rl/kl"] == 0.0 and grpo.reference is None  # kl_coef 0: no reference kept
    # Rows padded to the longest trajectory: 6 rows of 3 + 7 - 1 inputs.
    assert grpo.policy_tokens == 6 * 9
    assert grpo.step_metrics() == {}  # read once


def test_the_kl_reference_is_the_policy_at_the_first_rl_step_also_at_later_ones(monkeypatch):
    model = random_model("MA", 2, TINY_VOCAB, dtype=torch.float32, chunk_size=4, sequence_len=64)
    start = random_model("MA", 2, TINY_VOCAB, dtype=torch.float32, chunk_size=4, sequence_len=64)  # a copy
    trajectories = _trajectories()
    grpo, _ = _grpo(model, trajectories, 0.5, monkeypatch)
    first = grpo.step(model, [0, 1], index=0)
    assert grpo.step_metrics()["rl/kl"] == 0.0
    assert first.item() == pytest.approx(_plain_loss(model, start, trajectories, 0.5)[0], rel=1e-5, abs=1e-6)
    # An optimizer step moves the policy; the reference stays where RL started.
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    second = grpo.step(model, [0, 1], index=1)
    want, want_kl = _plain_loss(model, start, trajectories, 0.5)
    assert want_kl > 1e-4  # the policy did move
    assert grpo.step_metrics()["rl/kl"] == pytest.approx(want_kl, rel=1e-4)
    assert second.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert not any(p.requires_grad for p in grpo.reference.parameters())
