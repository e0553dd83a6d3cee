"""One inference cache for the whole model.

Every layer keeps its own state in `layers[layer_idx]`: a KVCache (keys and values of every past
token, preallocated to max_len) for attention, an SSMState (last d_conv conv inputs and the
(headdim x d_state) state per head, constant size) for Mamba-2. All layers have seen the same
tokens, so one counter `pos` says how many; the model advances it once per forward, after every
layer has read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass
class KVCache:
    k: torch.Tensor  # (B, n_kv_head, max_len, head_dim)
    v: torch.Tensor


@dataclass
class SSMState:
    conv_state: torch.Tensor  # (B, conv_dim, d_conv): the last d_conv conv inputs, oldest first
    ssm_state: torch.Tensor  # (B, nheads, headdim, d_state)


def _map(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply fn to every tensor of a per-layer state (None for layers without state)."""
    if state is None:
        return None
    return dataclasses.replace(state, **{f.name: fn(getattr(state, f.name)) for f in dataclasses.fields(state)})


def _tensors(state: Any) -> list[torch.Tensor]:
    return [] if state is None else [getattr(state, f.name) for f in dataclasses.fields(state)]


class InferenceCache:
    def __init__(self, layers: list[Any], max_len: int, pos: int = 0):
        self.layers = layers
        self.max_len = max_len
        self.pos = pos

    @classmethod
    def allocate(cls, mixers: Sequence[torch.nn.Module], batch_size: int, max_len: int, device=None,
                 dtype: torch.dtype | None = None) -> "InferenceCache":
        """Ask each mixer (in layer order) for its state; mixers without `allocate_cache` get None."""
        layers = [m.allocate_cache(batch_size, max_len, device, dtype) if hasattr(m, "allocate_cache") else None
                  for m in mixers]
        return cls(layers, max_len)

    @property
    def batch_size(self) -> int:
        for state in self.layers:
            for t in _tensors(state):
                return t.shape[0]
        raise ValueError("cache has no per-layer state, so no batch size")

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at positions [pos, pos+T) of this layer and return views of
        every cached key and value so far, [0, pos+T)."""
        kv = self.layers[layer_idx]
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {self.pos} cached + {T} new tokens > max_len={self.max_len}; "
                             "allocate the cache with a larger max_len")
        kv.k[:, :, self.pos:end] = k
        kv.v[:, :, self.pos:end] = v
        return kv.k[:, :, :end], kv.v[:, :, :end]

    def advance(self, T: int) -> None:
        self.pos += T

    def nbytes(self) -> int:
        """Bytes held by the cache (KV preallocated to max_len, so this is the reserved size)."""
        return sum(t.numel() * t.element_size() for state in self.layers for t in _tensors(state))

    def reset(self) -> None:
        for state in self.layers:
            for t in _tensors(state):
                t.zero_()
        self.pos = 0

    def _derive(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "InferenceCache":
        return InferenceCache([_map(state, fn) for state in self.layers], self.max_len, self.pos)

    def copy(self) -> "InferenceCache":
        return self._derive(torch.clone)

    def expand(self, n: int) -> "InferenceCache":
        """A new cache in which every batch row is repeated n times (rows r*n .. r*n+n-1 copy row r):
        prefill a prompt once, then draw n samples from it."""
        return self._derive(lambda t: t.repeat_interleave(n, dim=0))

    def select(self, indices: torch.Tensor | Sequence[int]) -> "InferenceCache":
        """A new cache made of the given batch rows, in that order (drop finished rows, reorder)."""
        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, torch.as_tensor(indices, dtype=torch.long, device=t.device))
        return self._derive(take)
