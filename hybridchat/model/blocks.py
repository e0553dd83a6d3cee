"""Blocks and block patterns.

A block is `x + mixer(norm(x))` followed by an optional `x + mlp(norm(x))`. The mixer comes from a
registry keyed by one letter (A = attention, M = Mamba-2), so a pattern string like "MMAM" is the
whole layer layout and an all-attention pattern is simply the plain transformer.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridchat.core.errors import UserError
from hybridchat.model.attention import CausalSelfAttention
from hybridchat.model.config import ModelConfig
from hybridchat.model.mamba import Mamba2


# Factories share one signature so the Block never special-cases a kind.
def _attention(cfg: ModelConfig, layer_idx: int, ssm_backend: str) -> nn.Module:
    return CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.n_kv_head, layer_idx=layer_idx, qk_norm=cfg.qk_norm,
                               norm_eps=cfg.norm_eps, qkv_bias=cfg.qkv_bias)


def _mamba(cfg: ModelConfig, layer_idx: int, ssm_backend: str) -> nn.Module:
    return Mamba2(cfg.n_embd, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, headdim=cfg.headdim,
                  ngroups=cfg.ngroups, chunk_size=cfg.chunk_size, backend=ssm_backend, layer_idx=layer_idx)


MIXERS: dict[str, Callable[..., nn.Module]] = {"A": _attention, "M": _mamba}


def _spread(n_layer: int, n_attn: int) -> str:
    """n_attn attention layers evenly spaced through the middle; index 0 is never attention."""
    where = {round((k + 1) * n_layer / (n_attn + 1)) for k in range(n_attn)}
    return "".join("A" if i in where else "M" for i in range(n_layer))


def _jamba(n_layer: int) -> str:
    # One attention per 8 layers at offset 4 (Jamba); shallow models still get one, in the middle.
    letters = "".join("A" if i % 8 == 4 else "M" for i in range(n_layer))
    return letters if "A" in letters else _spread(n_layer, 1)


PATTERN_PRESETS: dict[str, Callable[[int], str]] = {
    "all_attention": lambda n: "A" * n,
    "all_mamba": lambda n: "M" * n,
    "alternating": lambda n: ("MA" * n)[:n],
    "early_attention_late_mamba": lambda n: "A" * max(1, n // 4) + "M" * (n - max(1, n // 4)),
    "jamba": _jamba,
    "nemotron": lambda n: _spread(n, max(1, round(0.08 * n))),  # ~8% attention (Nemotron-H)
}


def expand_pattern(pattern: str, n_layer: int) -> str:
    """Turn `model.block_pattern` into exactly n_layer letters, or raise a UserError saying why."""
    if pattern in PATTERN_PRESETS:
        return PATTERN_PRESETS[pattern](n_layer)
    allowed = f"letters {sorted(MIXERS)} (tiled when their count divides n_layer) or a preset {sorted(PATTERN_PRESETS)}"
    letters = pattern.strip().upper()
    if not letters:
        raise UserError(f"model.block_pattern is empty; give {allowed}")
    bad = sorted(set(letters) - set(MIXERS))
    if bad:
        raise UserError(f"model.block_pattern={pattern!r} has unknown letter(s) {bad}; allowed: {allowed}")
    if n_layer % len(letters):
        raise UserError(f"model.block_pattern={pattern!r} has {len(letters)} letters, which neither equals "
                        f"nor divides model.n_layer={n_layer}; allowed: {allowed}")
    return letters * (n_layer // len(letters))


MLP_KINDS = ("relu2", "swiglu")


def rms_norm(cfg: ModelConfig, weights: bool) -> nn.RMSNorm:
    """RMSNorm over n_embd; without weights it has no parameters and adds no state-dict keys."""
    return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps, elementwise_affine=weights)


class MLP(nn.Module):
    """relu^2 (nanochat / Primer): c_proj(relu(c_fc(x))^2), or SwiGLU (Llama's gate/up/down):
    c_proj(silu(c_gate(x)) * c_fc(x))."""

    def __init__(self, d_model: int, hidden: int, kind: str = "relu2"):
        super().__init__()
        self.c_gate = nn.Linear(d_model, hidden, bias=False) if kind == "swiglu" else None
        self.c_fc = nn.Linear(d_model, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, d_model, bias=False)

    def init_weights(self) -> None:
        bound = math.sqrt(3.0) / math.sqrt(self.c_fc.in_features)
        nn.init.uniform_(self.c_fc.weight, -bound, bound)
        if self.c_gate is not None:
            nn.init.uniform_(self.c_gate.weight, -bound, bound)
        nn.init.zeros_(self.c_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.c_gate is None:
            return self.c_proj(F.relu(self.c_fc(x)).square())
        return self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))


class Block(nn.Module):
    def __init__(self, kind: str, cfg: ModelConfig, layer_idx: int, ssm_backend: str = "torch"):
        super().__init__()
        self.kind = kind
        self.norm_mixer = rms_norm(cfg, cfg.norm_weights)
        self.mixer = MIXERS[kind](cfg, layer_idx, ssm_backend)
        has_mlp = cfg.mlp_ratio > 0 and (kind != "M" or cfg.mamba_mlp)
        hidden = cfg.mlp_ratio * cfg.n_embd if cfg.mlp_hidden is None else cfg.mlp_hidden
        self.norm_mlp = rms_norm(cfg, cfg.norm_weights) if has_mlp else None
        self.mlp = MLP(cfg.n_embd, hidden, cfg.mlp) if has_mlp else None

    def init_weights(self) -> None:
        # Each module owns its init: Mamba's dt_bias / A_log / D are never touched by a generic pass.
        self.mixer.init_weights()
        self.norm_mixer.reset_parameters()  # gains (if any) to 1
        if self.mlp is not None:
            self.mlp.init_weights()
            self.norm_mlp.reset_parameters()

    def forward(self, x: torch.Tensor, rope=None, cache=None) -> torch.Tensor:
        x = x + self.mixer(self.norm_mixer(x), rope, cache)
        if self.mlp is not None:
            x = x + self.mlp(self.norm_mlp(x))
        return x
