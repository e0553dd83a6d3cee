"""The model's architecture settings: the `model` node of the config tree (conf/model/*.yaml).

A plain dataclass, so the model package builds without Hydra; hybridchat.infra.config puts it in the
typed schema as Config.model, and checkpoints store it field by field (meta.json's config.model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    name: str = "hybrid_tiny"
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int = 4
    # Letters (A = attention, M = Mamba-2) tiled to n_layer or given in full, or a preset name
    # (all_attention, all_mamba, alternating, early_attention_late_mamba, jamba, nemotron).
    block_pattern: str = "alternating"
    mlp_ratio: int = 4            # MLP hidden = mlp_ratio * n_embd; 0: no MLP at all
    mlp_hidden: Optional[int] = None   # hidden size given directly (Llama's intermediate_size); None: the ratio
    mlp: str = "relu2"            # relu2: c_proj(relu(c_fc x)^2) (nanochat) | swiglu: c_proj(silu(c_gate x) * c_fc x)
    mamba_mlp: bool = True        # MLP after Mamba mixers too (Nemotron-H drops it)
    qk_norm: bool = True          # RMSNorm queries and keys per head after RoPE (nanochat); Llama has none
    qkv_bias: bool = False        # biases on the query, key and value projections (Qwen2); none on the output
    norm_weights: bool = False    # learned gains on the block and final RMSNorms (Llama); False: parameter-free
    norm_eps: Optional[float] = None   # eps of every RMSNorm outside Mamba; None: torch's default (dtype's eps)
    embed_norm: bool = True       # RMSNorm the token embeddings before the first block (nanochat; Llama: false)
    tie_embeddings: bool = False  # the LM head is the embedding matrix (SmolLM2); no lm_head.weight then
    attn_rope: bool = True        # hybrid papers often use no positional encoding at all
    rope_base: float = 10000.0
    # Copy from context (hybridchat/model/pointer.py): the output mixes the vocabulary softmax with one
    # attention head's weights over the tokens so far, gated per position. What makes a small model
    # answer from a document it has never seen; the model then returns log-probabilities, not logits.
    pointer: bool = False
    # Tokens after a user message or follow-up query carry whether that request contains them
    # (model/request_match.py): how a small model tells the asked person's document from a namesake's.
    request_match: bool = False
    sequence_len: int = 512
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 64
    vocab_size: Optional[int] = None   # None: take the tokenizer's size
    # Pretrained weights (a GGUF file, or "package:file" inside an installed package), imported
    # into <run>/pretrained/ for stages with stage.source=pretrained. None: trained here.
    pretrained: Optional[str] = None
