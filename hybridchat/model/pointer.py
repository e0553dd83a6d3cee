"""Copy from context: the pointer-sentinel mixture (Merity et al. 2016; See et al.'s pointer-generator).

The next-token distribution is a gated mixture of the vocabulary softmax and a copy distribution:
one attention head over the final hidden states of every token so far, whose weights are summed
per token id:

    p(v | t) = (1 - g_t) softmax(logits_t)[v] + g_t sum_{j <= t, ids_j = v} a_tj
    a_t = softmax_j(q_t . k_j / sqrt(d)),   q = W_q h,  k = W_k h,  g_t = sigmoid(w_g . h_t + b)

Why: a small model learns *where* an answer sits in a document within a few hundred steps (the
pointer's attention), long before its attention layers learn to carry the token found there to the
output. The mixture copies the token itself, so pointing is enough. Position j's key sees token j and
everything before it (causal), so "the city after `born in`, in the document about X" is a key it
can form. No positional encoding: the pointer matches content.

Training needs no alignment: the likelihood of the target sums the attention on every earlier
occurrence of that token, which is the gradient that teaches the head to point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridchat.model.cache import SEQ_DIM, Ragged, end_of, write


@dataclass
class PointerCache:
    keys: torch.Tensor = field(metadata={SEQ_DIM: 1})  # (B, max_len, head_dim): every past token's key
    ids: torch.Tensor = field(metadata={SEQ_DIM: 1})   # (B, max_len) long: every past token, what a copy writes


class Pointer(nn.Module):
    def __init__(self, d_model: int, head_dim: int):
        super().__init__()
        self.c_q = nn.Linear(d_model, head_dim, bias=False)
        self.c_k = nn.Linear(d_model, head_dim, bias=False)
        self.c_gate = nn.Linear(d_model, 1)

    def init_weights(self) -> None:
        bound = math.sqrt(3.0) / math.sqrt(self.c_q.in_features)
        nn.init.uniform_(self.c_q.weight, -bound, bound)
        nn.init.uniform_(self.c_k.weight, -bound, bound)
        # Start mostly generating (g = 0.12): an untrained pointer's guesses stay a small share.
        nn.init.zeros_(self.c_gate.weight)
        nn.init.constant_(self.c_gate.bias, -2.0)

    def allocate_cache(self, batch_size: int, max_len: int, device, dtype) -> PointerCache:
        return PointerCache(torch.zeros(batch_size, max_len, self.c_k.out_features, device=device, dtype=dtype),
                            torch.zeros(batch_size, max_len, dtype=torch.long, device=device))

    def _attention(self, h: torch.Tensor, idx: torch.Tensor, n_queries: int, cache: PointerCache | None,
                   pos: int | Ragged) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention weights (B, n_queries, L) of the last n_queries positions over all L tokens so
        far, those tokens' ids (B, L)). h: (B, T, d) hidden states of the T new tokens idx, which go
        after `pos` cached ones (per row in a ragged cache, model/cache.py)."""
        T = idx.size(1)
        keys = self.c_k(h)
        if cache is not None:
            if end_of(pos, T) > cache.ids.size(1):
                raise ValueError(f"pointer cache is full: {end_of(pos, T) - T} cached + {T} new tokens > "
                                 f"max_len={cache.ids.size(1)}")
            keys, idx = write(cache.keys, keys, 1, pos), write(cache.ids, idx, 1, pos)
        queries = self.c_q(h[:, T - n_queries:])
        scores = _wide(queries @ keys.transpose(1, 2)) / math.sqrt(queries.size(-1))
        if isinstance(pos, Ragged):  # each row's own tokens up to the query; a shorter row's tail is not its
            visible = pos.visible[:, T - n_queries:]
        else:  # query at absolute position p sees keys 0..p (bottom-right aligned: past tokens all visible)
            L = keys.size(1)
            q_pos = torch.arange(L - n_queries, L, device=h.device)[:, None]
            visible = torch.arange(L, device=h.device)[None, :] <= q_pos
        return scores.masked_fill(~visible, float("-inf")).softmax(-1), idx

    def log_probs(self, h: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor, cache: PointerCache | None = None,
                  pos: int | Ragged = 0) -> torch.Tensor:
        """Log-probabilities of the mixture at the positions `logits` covers (the last
        logits.size(1) of the T tokens h and idx hold). With a cache, the T tokens follow `pos`
        cached ones and their keys and ids are written to it."""
        n = logits.size(1)
        weights, ids = self._attention(h, idx, n, cache, pos)
        copy = torch.zeros(logits.shape, dtype=weights.dtype, device=logits.device)
        copy.scatter_add_(2, ids[:, None, :].expand(-1, n, -1), weights)
        gate = _wide(self.c_gate(h[:, h.size(1) - n:]))
        return _mixture(gate, _wide(logits).log_softmax(-1), copy)

    def nll(self, h: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-position negative log-likelihood of targets (B, T) under the mixture, 0 where targets
        == -1. Only the targets' copy probabilities are formed (a (B, T, T) comparison), never the
        (B, T, vocab) copy distribution that log_probs builds."""
        weights, _ = self._attention(h, idx, idx.size(1), None, 0)
        valid = targets >= 0
        target = targets.clamp(min=0)
        copy = (weights * (idx[:, None, :] == target[:, :, None])).sum(-1)
        gate = _wide(self.c_gate(h)).squeeze(-1)
        vocab = _wide(logits).log_softmax(-1).gather(-1, target[..., None]).squeeze(-1)
        log_p = _mixture(gate, vocab, copy)
        return torch.where(valid, -log_p, torch.zeros_like(log_p))


def _mixture(gate: torch.Tensor, vocab_log_p: torch.Tensor, copy_p: torch.Tensor) -> torch.Tensor:
    """log((1 - g) p_vocab + g p_copy) with g = sigmoid(gate), in log space. Tokens absent from the
    context have copy probability 0: log 0 = -inf is right in the forward, but its backward (0 x inf)
    is NaN; clamped, they contribute e^-69 and no gradient."""
    return torch.logaddexp(F.logsigmoid(-gate) + vocab_log_p, F.logsigmoid(gate) + copy_p.clamp_min(1e-30).log())


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (softmax and logs under bf16 autocast), float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
