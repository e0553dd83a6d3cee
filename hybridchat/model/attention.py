"""Causal self-attention: RoPE, grouped-query attention, optional QK-norm, PyTorch SDPA."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridchat.model.cache import KVCache


def _inv_freq(head_dim: int, base: float, device) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, offset: int = 0, device=None):
    """cos/sin tables of shape (1, 1, seq_len, head_dim/2) for positions offset .. offset+seq_len."""
    t = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, _inv_freq(head_dim, base, device))
    return freqs.cos()[None, None], freqs.sin()[None, None]


def rotary_at(positions: torch.Tensor, head_dim: int, base: float):
    """cos/sin tables of shape (B, 1, T, head_dim/2) for each row's own positions (B, T): rows of a
    ragged cache are at different positions. The same products as rotary_cos_sin, so a position
    gets the same table either way, to the bit."""
    freqs = positions.to(torch.float32)[..., None] * _inv_freq(head_dim, base, positions.device)
    return freqs.cos()[:, None], freqs.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, n_kv_head: int, layer_idx: int = 0, qk_norm: bool = True,
                 norm_eps: float | None = None, qkv_bias: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = d_model // n_head
        self.layer_idx = layer_idx
        # Parameter-free, one module for q and k: it adds no state-dict keys.
        self.qk_norm = nn.RMSNorm(self.head_dim, eps=norm_eps, elementwise_affine=False) if qk_norm else None
        # Biases on q, k, v only: Qwen2's layout (its output projection has none).
        self.c_q = nn.Linear(d_model, n_head * self.head_dim, bias=qkv_bias)
        self.c_k = nn.Linear(d_model, n_kv_head * self.head_dim, bias=qkv_bias)
        self.c_v = nn.Linear(d_model, n_kv_head * self.head_dim, bias=qkv_bias)
        self.c_proj = nn.Linear(n_head * self.head_dim, d_model, bias=False)

    def init_weights(self) -> None:
        # Uniform with the std of a unit-variance fan-in init; zero output projection so every block
        # starts as the identity on the residual stream (nanochat's choice).
        bound = math.sqrt(3.0) / math.sqrt(self.c_q.in_features)
        for lin in (self.c_q, self.c_k, self.c_v):
            nn.init.uniform_(lin.weight, -bound, bound)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.c_proj.weight)

    def allocate_cache(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch_size, self.n_kv_head, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, rope=None, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q), self.qk_norm(k)

        gqa = self.n_kv_head != self.n_head
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif cache.lengths is not None:
            # Rows hold different numbers of tokens: each query reads its own row's keys up to itself.
            # The tail past a row's length holds zeros or a departed row's keys: masked, never read.
            visible = cache.where(T).visible[:, None]
            k, v = cache.update_kv(self.layer_idx, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)
        else:
            past = cache.pos
            k, v = cache.update_kv(self.layer_idx, k, v)
            if T == 1:
                # One new query sees every cached key. is_causal=True would be wrong here: SDPA's
                # causal mask is top-left aligned and would let the query see only key 0.
                y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
            elif past == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                # Chunked prefill: bottom-right aligned causal mask over past + new keys.
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))
