"""A chosen confidence per prompt in place of a tiny model's own (its P(ABSTAIN) is ~1e-20, so every
confidence would be 1.0), for tests of what a threshold does: `Answerer.confidence` (multi-hop's and
rank order's pass) returns it, and so does the engine's score of a generation's prefill (answer()'s),
whose refusals follow the answerer's `admit` as the real engine's do; what is generated, the real
engine generates. Used by tests/test_abstention.py and by tests/test_rag.py's evaluate subprocess."""

import math

import torch

from hybridchat.model.engine import GenerationResult
from hybridchat.rag.answer import Answerer


def patches(confidences) -> dict:
    """{Answerer attribute: replacement}; confidences(answerer, prompts) -> one float per prompt."""
    real = Answerer._generate

    def generate(self, prompts, on_token=None, suppress=(), admit=None):
        if admit is None:
            return real(self, prompts, on_token, suppress)
        scores = [math.log(1 - c) if c < 1 else -math.inf for c in confidences(self, prompts)]
        admitted = [j for j, logp in enumerate(scores) if admit(j, logp)]
        tokens, finish = [[] for _ in prompts], ["refused"] * len(prompts)
        if admitted:
            result = real(self, [prompts[j] for j in admitted],
                          None if on_token is None else lambda k, token: on_token(admitted[k], token))
            for j, t, f in zip(admitted, result.tokens, result.finish_reasons):
                tokens[j], finish[j] = t, f
        return GenerationResult(tokens, finish, scores=scores)

    def confidence(self, prompts):
        return torch.tensor(confidences(self, prompts), dtype=torch.float64)

    return {"_generate": generate, "confidence": confidence}
