"""One inference cache for the whole model.

Every layer keeps its own state in `layers[layer_idx]`: a KVCache (keys and values of every past
token, preallocated to max_len) for attention, an SSMState (last d_conv conv inputs and the
(headdim x d_state) state per head, constant size) for Mamba-2. All layers have seen the same
tokens, so one counter `pos` says how many; the model advances it once per forward, after every
layer has read it.

Rows that joined a running batch at different times hold different numbers of tokens: such a
cache ("ragged": a `head` view of rows filled by `put`) keeps each row's count in `lengths`, and
`pos` is the largest.
A forward then writes each row's new tokens right after its own, and a layer that reads positions
(attention, the pointer, rotary embeddings) takes them from `where()`; Mamba's state has no
positions. Rows never share a position they both hold real tokens at, and nothing is padded
through Mamba: each row's state was computed from its own tokens alone. A lockstep cache (the
common case, `lengths` None) keeps the simpler and bit-for-bit unchanged scalar-position paths.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

# A state field with this metadata holds one entry per token along that dimension (the rest are
# constant-size, like Mamba's): `put` copies only a row's tokens so far along it.
SEQ_DIM = "seq_dim"


@dataclass
class KVCache:
    k: torch.Tensor = field(metadata={SEQ_DIM: 2})  # (B, n_kv_head, max_len, head_dim)
    v: torch.Tensor = field(metadata={SEQ_DIM: 2})


@dataclass
class SSMState:
    conv_state: torch.Tensor  # (B, conv_dim, d_conv): the last d_conv conv inputs, oldest first
    ssm_state: torch.Tensor  # (B, nheads, headdim, d_state)


class Ragged:
    """Where a forward's T new tokens go in a ragged cache: `at` (B, T) their positions, row by row;
    `end` the positions [0, end) any row holds after the write; `visible` (B, T, end) whether new
    token t of row b may read position j (its own row's tokens up to itself, never another row's
    leftovers past its length)."""

    def __init__(self, lengths: Sequence[int], T: int, device):
        self.at = torch.tensor(lengths, dtype=torch.long, device=device)[:, None] + torch.arange(T, device=device)
        self.end = max(lengths) + T
        self.visible = torch.arange(self.end, device=device) <= self.at[..., None]


def end_of(where: int | Ragged, T: int) -> int:
    return where.end if isinstance(where, Ragged) else where + T


def write(buffer: torch.Tensor, new: torch.Tensor, dim: int, where: int | Ragged) -> torch.Tensor:
    """Write new's T positions (along dim; batch first) after each row's tokens, and return the
    buffer's positions [0, end) along dim: every token so far."""
    T = new.shape[dim]
    if isinstance(where, Ragged):
        rows = torch.arange(buffer.shape[0], device=buffer.device)[:, None]
        buffer.movedim(dim, 1)[rows, where.at] = new.movedim(dim, 1).to(buffer.dtype)
    else:
        buffer.narrow(dim, where, T).copy_(new)
    return buffer.narrow(dim, 0, end_of(where, T))


def _map(state: Any, fn: Callable[[dataclasses.Field, torch.Tensor], torch.Tensor]) -> Any:
    """Apply fn(field, tensor) to every tensor of a per-layer state (None for layers without state)."""
    if state is None:
        return None
    return dataclasses.replace(state, **{f.name: fn(f, getattr(state, f.name)) for f in dataclasses.fields(state)})


def _tensors(state: Any) -> list[torch.Tensor]:
    return [] if state is None else [getattr(state, f.name) for f in dataclasses.fields(state)]


class InferenceCache:
    def __init__(self, layers: list[Any], max_len: int, pos: int = 0, lengths: list[int] | None = None):
        self.layers = layers
        self.max_len = max_len
        self.lengths = lengths  # per row, where rows hold different numbers of tokens; None: all hold pos
        self.pos = pos if lengths is None else max(lengths, default=0)
        self._where: tuple[int, int, Ragged] | None = None

    @classmethod
    def allocate(cls, mixers: Sequence[torch.nn.Module], batch_size: int, max_len: int, device=None,
                 dtype: torch.dtype | None = None) -> "InferenceCache":
        """Ask each mixer (in layer order) for its state; mixers without `allocate_cache` get None."""
        layers = [m.allocate_cache(batch_size, max_len, device, dtype) if hasattr(m, "allocate_cache") else None
                  for m in mixers]
        return cls(layers, max_len)

    def head(self, n: int, lengths: list[int]) -> "InferenceCache":
        """A ragged cache of this one's first n rows holding `lengths` tokens each: views, not copies
        (rows are the first dimension, so the first n of them are one contiguous block), so what a
        forward writes through it lands here. How a batch decodes in preallocated rows."""
        return InferenceCache([_map(state, lambda f, t: t.narrow(0, 0, n)) for state in self.layers], self.max_len,
                              lengths=lengths)

    def put(self, row: int, source: "InferenceCache", source_row: int = 0, length: int | None = None) -> None:
        """Copy one row of `source` (its state and its `length` tokens so far, by default its own
        count, not the unused rest of its max_len) into row `row` of this cache, in place: a request
        joining a batch's free row, or the last row moved into the row a finished one left."""
        n = source.row_lengths()[source_row] if length is None else length
        if n > self.max_len:
            raise ValueError(f"a row holds {n} tokens, more than max_len={self.max_len}")
        for mine, theirs in zip(self.layers, source.layers):
            for f in [] if mine is None else dataclasses.fields(mine):
                into, what = getattr(mine, f.name)[row], getattr(theirs, f.name)[source_row]
                dim = f.metadata.get(SEQ_DIM)
                if dim is not None:  # the row's own dimensions: the batch one is gone
                    into, what = into.narrow(dim - 1, 0, n), what.narrow(dim - 1, 0, n)
                into.copy_(what)

    @property
    def batch_size(self) -> int:
        for state in self.layers:
            for t in _tensors(state):
                return t.shape[0]
        raise ValueError("cache has no per-layer state, so no batch size")

    def row_lengths(self) -> list[int]:
        return list(self.lengths) if self.lengths is not None else [self.pos] * self.batch_size

    def where(self, T: int) -> int | Ragged:
        """Where the next forward's T tokens go: the shared position, or per row (ragged)."""
        if self.lengths is None:
            return self.pos
        if self._where is None or self._where[:2] != (self.pos, T):
            device = next(t for state in self.layers for t in _tensors(state)).device
            self._where = (self.pos, T, Ragged(self.lengths, T, device))
        return self._where[2]

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) after each row's tokens of this layer and return views of every
        cached key and value so far, [0, end) (in a ragged cache some rows' tail is not theirs:
        `where(T).visible` masks it)."""
        kv = self.layers[layer_idx]
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache is full: {self.pos} cached + {T} new tokens > max_len={self.max_len}; "
                             "allocate the cache with a larger max_len")
        where = self.where(T)
        return write(kv.k, k, 2, where), write(kv.v, v, 2, where)

    def advance(self, T: int) -> None:
        self.pos += T
        if self.lengths is not None:
            self.lengths = [n + T for n in self.lengths]

    def nbytes(self) -> int:
        """Bytes held by the cache (KV preallocated to max_len, so this is the reserved size)."""
        return sum(self.layer_nbytes())

    def layer_nbytes(self) -> list[int]:
        """Bytes held per stateful module, in allocation order (HybridLM: each block's mixer, then the
        pointer's and the request match's): where an inference cache's memory goes."""
        return [sum(t.numel() * t.element_size() for t in _tensors(state)) for state in self.layers]

    def reset(self) -> None:
        for state in self.layers:
            for t in _tensors(state):
                t.zero_()
        self.pos, self.lengths, self._where = 0, None, None

    def _derive(self, fn: Callable[[torch.Tensor], torch.Tensor], lengths: list[int] | None) -> "InferenceCache":
        return InferenceCache([_map(state, lambda f, t: fn(t)) for state in self.layers], self.max_len, self.pos,
                              lengths)

    def copy(self) -> "InferenceCache":
        return self._derive(torch.clone, self.lengths)

    def expand(self, n: int) -> "InferenceCache":
        """A new cache in which every batch row is repeated n times (rows r*n .. r*n+n-1 copy row r):
        prefill a prompt once, then draw n samples from it."""
        lengths = None if self.lengths is None else [x for x in self.lengths for _ in range(n)]
        return self._derive(lambda t: t.repeat_interleave(n, dim=0), lengths)

    def select(self, indices: torch.Tensor | Sequence[int]) -> "InferenceCache":
        """A new cache made of the given batch rows, in that order (drop finished rows, reorder)."""
        lengths = None
        if self.lengths is not None:
            rows = indices.tolist() if isinstance(indices, torch.Tensor) else indices
            lengths = [self.lengths[i] for i in rows]

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, torch.as_tensor(indices, dtype=torch.long, device=t.device))
        return self._derive(take, lengths)
