"""Request match: each token after a request knows whether the request contains it.

DrQA's exact-match feature (Chen et al. 2017), for a decoder reading a chat: a request is the
latest user message or follow-up query (the tokens between <|user_start|> and <|user_end|>, or
<|query_start|> and <|query_end|>); every later token whose id occurs in that request gets one learned
vector added to its embedding. In a retrieved document about the person asked for, the person's own
first name is marked, and in a namesake's it is not: which document answers becomes a feature the
model reads off each token instead of a comparison it must first learn to make.

Why it is needed: a 5.5M model given three namesakes' documents (bm25's top 3 for a full name share
the surname) read the asked-for one at chance, whatever the training (docs/results.md). Telling the asked
name from a namesake's means matching tokens across hundreds of positions, a circuit whose two halves
(a query holding the asked name, keys holding each document's) only pay off together; in a few
hundred steps neither forms. With the match given, citing and abstaining are learned in 100 rag steps.

The vector starts at the scale of a token embedding (a zero start let the rag stage leave it unused),
and is trained at the embedding learning rate. Pretraining text has no requests, so the feature is
off there; it turns on in the chat stages. Inference keeps every token id of the sequence so far
(a (B, max_len) cache row of ids, like the pointer's) and recomputes the mask for new positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from hybridchat.model.cache import SEQ_DIM, Ragged, end_of, write


@dataclass(frozen=True)
class RequestMarkers:
    """The token ids around a request, from the tokenizer's chat format (data/chat.py): given by whoever
    pairs the model with its tokenizer, since the model knows no token by name."""
    starts: tuple[int, ...]  # open a request: a user message, a follow-up query
    ends: tuple[int, ...]    # close one


def request_match(ids: torch.Tensor, markers: RequestMarkers, new: int | None = None,
                  at: torch.Tensor | None = None) -> torch.Tensor:
    """(B, new) bool for the last `new` positions of ids (B, L) (None: all), or for the positions
    `at` (B, new) of each row: token t occurs in the latest request that started before it, and t is
    not inside that request. Each of those positions is compared with every position: (B, new, L),
    like the pointer's equality mask in training, one row per generated token in decoding.

    Positions after t never change its answer (the cumulative markers below read only earlier
    positions, and a later token inside the same request would need a start after t), so a ragged
    cache's rows need no mask for what lies past their length: `at` just picks each row's own."""
    starts = torch.isin(ids, torch.tensor(markers.starts, device=ids.device))
    ends = torch.isin(ids, torch.tensor(markers.ends, device=ids.device))
    positions = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
    last_start = torch.where(starts, positions, -1).cummax(1).values
    last_end = torch.where(ends, positions, -1).cummax(1).values
    inside = last_start > last_end                       # a request's tokens (from its start marker on)
    request = starts.cumsum(1)                           # which request a position follows (0: none yet)
    n = ids.size(1) if new is None else new

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t[:, -n:] if at is None else t.gather(1, at)

    # Only tokens outside a request are marked, so every token they are compared with came before them.
    in_latest = inside[:, None, :] & (pick(request)[:, :, None] == request[:, None, :])
    return ((pick(ids)[:, :, None] == ids[:, None, :]) & in_latest).any(-1) & ~pick(inside)


@dataclass
class RequestMatchCache:
    ids: torch.Tensor = field(metadata={SEQ_DIM: 1})  # (B, max_len) long: every token so far


class RequestMatch(nn.Module):
    def __init__(self, n_embd: int, markers: RequestMarkers | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_embd))
        self.markers = markers  # None: built to be sized or to load weights into (HybridLM)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)

    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> RequestMatchCache:
        return RequestMatchCache(torch.zeros(batch_size, max_len, dtype=torch.long, device=device))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, cache: RequestMatchCache | None = None,
                pos: int | Ragged = 0) -> torch.Tensor:
        """x (B, T, C) embeddings of idx (B, T), the new tokens at positions [pos, pos + T) (per row
        in a ragged cache, model/cache.py)."""
        if self.markers is None:
            raise ValueError("model.request_match needs the tokenizer's request markers: build the model with "
                             "HybridLM(..., request_markers=...)")
        at = pos.at if isinstance(pos, Ragged) else None
        if cache is not None:
            T = idx.size(1)
            if end_of(pos, T) > cache.ids.size(1):
                raise ValueError(f"request-match cache is full: {end_of(pos, T) - T} cached + {T} new tokens > "
                                 f"max_len={cache.ids.size(1)}")
            idx = write(cache.ids, idx, 1, pos)
        marked = request_match(idx, self.markers, x.size(1), at)
        return x + marked.unsqueeze(-1).to(x.dtype) * self.weight.to(x.dtype)
