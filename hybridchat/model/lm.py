"""HybridLM: token embedding (-> RMSNorm) -> blocks from the block pattern -> RMSNorm -> LM head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hybridchat.core.errors import UserError
from hybridchat.model.attention import rotary_at, rotary_cos_sin
from hybridchat.model.blocks import MLP_KINDS, Block, expand_pattern, rms_norm
from hybridchat.model.cache import InferenceCache, Ragged
from hybridchat.model.config import ModelConfig
from hybridchat.model.pointer import Pointer
from hybridchat.model.request_match import RequestMarkers, RequestMatch


def check_sizes(cfg: ModelConfig) -> None:
    """Sizes that do not divide fail here, naming the keys, before any tensor is allocated."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    need(cfg.n_layer > 0 and cfg.n_embd > 0, f"model.n_layer and model.n_embd must be > 0 (got {cfg.n_layer}, {cfg.n_embd})")
    need(cfg.n_head > 0 and cfg.n_embd % cfg.n_head == 0,
         f"model.n_embd={cfg.n_embd} must be divisible by model.n_head={cfg.n_head}")
    need(cfg.n_kv_head > 0 and cfg.n_head % cfg.n_kv_head == 0,
         f"model.n_head={cfg.n_head} must be divisible by model.n_kv_head={cfg.n_kv_head} (grouped-query attention)")
    need((cfg.n_embd // cfg.n_head) % 2 == 0, f"model.n_embd / model.n_head = {cfg.n_embd // cfg.n_head} must be even (RoPE)")
    if "M" in expand_pattern(cfg.block_pattern, cfg.n_layer):  # Mamba's sizes bind only Mamba layers
        d_inner = cfg.expand * cfg.n_embd
        need(cfg.headdim > 0 and d_inner % cfg.headdim == 0,
             f"model.expand * model.n_embd = {d_inner} must be divisible by model.headdim={cfg.headdim}")
        need(cfg.ngroups > 0 and (d_inner // cfg.headdim) % cfg.ngroups == 0,
             f"Mamba heads ({d_inner // cfg.headdim}) must be divisible by model.ngroups={cfg.ngroups}")
    need(cfg.mlp in MLP_KINDS, f"model.mlp={cfg.mlp!r} is not one of {list(MLP_KINDS)}")
    need(cfg.mlp_hidden is None or cfg.mlp_hidden > 0, f"model.mlp_hidden must be > 0 or null (got {cfg.mlp_hidden})")
    need(cfg.sequence_len > 0 and cfg.chunk_size > 0,
         f"model.sequence_len and model.chunk_size must be > 0 (got {cfg.sequence_len}, {cfg.chunk_size})")


def architecture(c: ModelConfig, vocab_size: int) -> dict[str, Any]:
    """What must match for weights to load: the expanded block pattern, sizes, positions, vocabulary,
    and the layer recipe (MLP kind, norms, tying). rope, eps and norms matter even where the shapes
    agree: a model trained without rotary positions or QK-norm computes garbage with them. A function
    of the config, so a run can compare a checkpoint's with its own before building anything."""
    pattern = expand_pattern(c.block_pattern, c.n_layer)
    keys = ["n_layer", "n_embd", "mlp_ratio", "mlp", "mlp_hidden", "norm_weights", "norm_eps", "embed_norm",
            "tie_embeddings", "pointer", "request_match"]
    # A mixer's settings matter only where the pattern has that mixer (a transformer has no d_state).
    if "A" in pattern:
        keys += ["n_head", "n_kv_head", "attn_rope", "rope_base", "qk_norm", "qkv_bias"]
    elif c.pointer:  # the pointer's head width is n_embd / n_head
        keys += ["n_head"]
    if "M" in pattern:
        keys += ["mamba_mlp", "d_state", "d_conv", "expand", "headdim", "ngroups"]
    return {"block_pattern": pattern, "vocab_size": vocab_size, **{k: getattr(c, k) for k in keys}}


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, ssm_backend: str = "torch",
                 request_markers: RequestMarkers | None = None):
        """request_markers: the tokenizer's ids that open and close a request, which model.request_match
        reads (model/request_match.py); without them such a model can be sized and loaded, not run."""
        super().__init__()
        check_sizes(cfg)
        self.config = cfg
        self.vocab_size = vocab_size
        self.request_markers = request_markers
        self.pattern = expand_pattern(cfg.block_pattern, cfg.n_layer)
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.norm_embed = rms_norm(cfg, weights=False) if cfg.embed_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(kind, cfg, i, ssm_backend) for i, kind in enumerate(self.pattern))
        self.norm_f = rms_norm(cfg, cfg.norm_weights)
        # Tied, there is no head module at all: the state dict holds the shared matrix once, as
        # wte.weight (safetensors refuses two names for one tensor), and loads without a missing key.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.pointer = Pointer(cfg.n_embd, cfg.n_embd // cfg.n_head) if cfg.pointer else None
        self.request_match = RequestMatch(cfg.n_embd, request_markers) if cfg.request_match else None
        self.use_rope = cfg.attn_rope and "A" in self.pattern
        # Recompute each block's activations in backward instead of storing them (less memory, about
        # one more forward of compute). A training choice (gpu.activation_checkpointing), set by
        # hybridchat.infra.parallel.prepare, not part of the architecture.
        self.activation_checkpointing = False

    def architecture(self) -> dict[str, Any]:
        return architecture(self.config, self.vocab_size)

    def init_weights(self) -> None:
        if self.lm_head is None:
            # One matrix for lookup and head: GPT-2 / Llama's 0.02 keeps the initial logits tame and
            # un-normalised embeddings (embed_norm false) far above norm_eps.
            nn.init.normal_(self.wte.weight, std=0.02)
        else:
            nn.init.normal_(self.wte.weight, std=1.0)
            nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            block.init_weights()
        if self.pointer is not None:
            self.pointer.init_weights()
        if self.request_match is not None:  # a token embedding's scale (see request_match.py)
            self.request_match.init_weights(0.02 if self.lm_head is None else 1.0)
        self.norm_f.reset_parameters()  # gains (if any) to 1

    def _rope(self, where: int | Ragged, length: int, device):
        if not self.use_rope:
            return None
        head_dim = self.config.n_embd // self.config.n_head
        if isinstance(where, Ragged):
            return rotary_at(where.at, head_dim, self.config.rope_base)
        return rotary_cos_sin(length, head_dim, self.config.rope_base, offset=where, device=device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: InferenceCache | None = None,
                reduction: str = "mean", last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) when targets is None, else the cross-entropy loss; targets == -1 are
        ignored (that is how stages mask prompt and document tokens out of the loss). last_only:
        logits (B, 1, vocab) of the last position only, all generation needs from a prefill. With
        model.pointer the "logits" are the copy mixture's log-probabilities: softmax, log_softmax,
        argmax and temperature sampling treat them alike."""
        T = idx.size(1)
        pos = cache.where(T) if cache is not None else 0  # a ragged cache's rows each have their own
        rope = self._rope(pos, T, idx.device)
        x = self.wte(idx)
        if self.request_match is not None:
            x = self.request_match(x, idx, None if cache is None else cache.layers[self._match_slot], pos)
        x = self.norm_embed(x)
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            # Non-reentrant: composes with FSDP2's hooks, torch.compile and inputs that need no grad.
            x = checkpoint(block, x, rope, None, use_reentrant=False) if recompute else block(x, rope, cache)
        if self.pointer is None:  # the head reads only the positions asked for
            x = self.norm_f(x[:, -1:] if last_only else x)
            hidden = x
        else:  # the pointer's keys need every new position
            hidden = self.norm_f(x)
            x = hidden[:, -1:] if last_only else hidden
        logits = F.linear(x, self.wte.weight) if self.lm_head is None else self.lm_head(x)
        if self.pointer is not None and targets is None:
            logits = self.pointer.log_probs(hidden, logits, idx, None if cache is None else cache.layers[len(self.blocks)], pos)
        if cache is not None:
            cache.advance(T)
        if targets is None:
            return logits
        if self.pointer is not None:
            nll = self.pointer.nll(hidden, logits, idx, targets)
            if reduction == "none":
                return nll.reshape(-1)
            return nll.sum() / (targets >= 0).sum().clamp(min=1)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction)

    @property
    def _match_slot(self) -> int:
        return len(self.blocks) + (self.pointer is not None)

    def allocate_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> InferenceCache:
        device = self.wte.weight.device
        # After every layer's state: the pointer's (keys and token ids), then the request match's (ids).
        stateful = [b.mixer for b in self.blocks] + [m for m in (self.pointer, self.request_match) if m is not None]
        return InferenceCache.allocate(stateful, batch_size, max_len, device, dtype or self.wte.weight.dtype)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Muon takes the 2-D weight matrices inside blocks; everything else (embeddings, head, and
        every non-matrix such as Mamba's A_log, D, dt_bias, conv weights, norms) goes to AdamW.
        Sending Mamba's 1-D/3-D parameters to Muon is what broke the earlier attempt."""
        block_params = list(self.blocks.parameters())
        pointer = [] if self.pointer is None else [self.pointer.c_q.weight, self.pointer.c_k.weight]
        gate = [] if self.pointer is None else list(self.pointer.c_gate.parameters())  # a (1, d) row: AdamW
        return {
            "matrix": [p for p in block_params if p.ndim == 2] + pointer,
            "scalar": [p for p in block_params if p.ndim != 2] + list(self.norm_f.parameters()) + gate,
            # tied, also the head: trained once, at the embedding LR; the request match is an embedding too
            "embedding": [self.wte.weight] + ([] if self.request_match is None else [self.request_match.weight]),
            "unembedding": [] if self.lm_head is None else [self.lm_head.weight],
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 x non-embedding params + the attention score/value matmuls
        (nanochat's estimate). Mamba's scan is a few % of its projections and is left out."""
        # The lookup costs nothing; the head's matmul counts, also when it reuses the lookup's matrix.
        n = self.num_params() - (0 if self.lm_head is None else self.wte.weight.numel())
        n_attn = self.pattern.count("A")
        # The pointer: one head's scores, no value matmul (its weights are summed per token id).
        pointer = 0 if self.pointer is None else 6 * self.pointer.c_q.out_features * self.config.sequence_len
        return 6 * n + 12 * n_attn * self.config.n_embd * self.config.sequence_len + pointer
