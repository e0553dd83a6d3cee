"""Attention -> Mamba-2 conversion ("The Mamba in the Llama", Wang et al. 2024).

Causal attention without its softmax is a linear RNN: state_t = state_{t-1} + v_t k_t^T and
y_t = state_t q_t. Mamba-2's recurrence has the same shape, state_t = exp(dt A) state_{t-1} +
dt x_t B_t^T and y_t = state_t C_t, with x, B, C in the roles of v, k, q. So an attention layer's
projections initialise a Mamba layer directly: Q -> C, K -> B, V -> x, O -> out_proj, one Mamba head
per attention head with headdim = d_state = head size. What attention has and the Mamba layer lacks
(softmax and its 1/sqrt(d) scale, RoPE, QK-norm) is left to distillation to make up for; what the
Mamba layer adds (the gate z, dt, A, D, the conv) starts as described in attention_to_mamba.
"""

from __future__ import annotations

import torch

from hybridchat.core.errors import UserError
from hybridchat.model.attention import CausalSelfAttention
from hybridchat.model.lm import HybridLM
from hybridchat.model.mamba import Mamba2


def _check_fits(attn: CausalSelfAttention, mamba: Mamba2) -> None:
    """One Mamba head per attention head, the head's size as both headdim and d_state. ngroups must
    be n_head, not n_kv_head: Mamba's B and C share their groups and C (= Q) differs per query head."""
    if attn.c_q.bias is not None:
        # in_proj has no bias to take them, and dropping them would start the layer off its teacher.
        raise UserError(f"layer {mamba.layer_idx}: attention with q/k/v biases (model.qkv_bias=true, as Qwen2 has) "
                        f"cannot be converted to Mamba-2, whose in_proj has no bias; convert a model without them")
    width = attn.n_head * attn.head_dim
    need = {"expand": width / mamba.d_model, "headdim": attn.head_dim, "d_state": attn.head_dim,
            "ngroups": attn.n_head}
    have = {"expand": mamba.d_inner / mamba.d_model, "headdim": mamba.headdim, "d_state": mamba.d_state,
            "ngroups": mamba.ngroups}
    if need != have:
        wrong = " ".join(f"{k}={v:g}" for k, v in have.items() if need[k] != v)
        raise UserError(f"layer {mamba.layer_idx}: a Mamba layer holds attention with {attn.n_head} heads of "
                        f"{attn.head_dim} only with " + " ".join(f"model.{k}={v:g}" for k, v in need.items())
                        + f" (the student has {wrong})")


@torch.no_grad()
def attention_to_mamba(attn: CausalSelfAttention, mamba: Mamba2, copy_output: bool = True) -> None:
    """Initialise `mamba` from `attn`: in_proj's x/B/C rows from V/K/Q, out_proj from O (or zero
    without copy_output: the layer then adds nothing until training grows its output)."""
    _check_fits(attn, mamba)
    # What attention has no counterpart for starts as a fresh Mamba layer, as in the paper's code:
    # the gate's rows of in_proj random (silu(z) cannot be a constant 1 without a bias; the gated
    # RMSNorm after it normalises each head on its own, which stands in for softmax's normalisation),
    # dt log-uniform in [0.001, 0.1] and A in [1, 16] (learned decays, the part of Mamba beyond
    # linear attention), D = 1 (the skip Mamba is trained with), norm weight 1.
    mamba.init_weights()
    n_rep, d_inner, gn = attn.n_head // attn.n_kv_head, mamba.d_inner, mamba.ngroups * mamba.d_state

    def per_query_head(linear):
        # GQA: query head h reads KV head h // n_rep (SDPA's enable_gqa). Each Mamba head gets its
        # own copy of its KV head's rows, free to drift apart in training.
        return linear.weight.unflatten(0, (attn.n_kv_head, attn.head_dim)).repeat_interleave(n_rep, 0).flatten(0, 1)

    rows = mamba.in_proj.weight  # [z | x | B | C | dt]
    rows[d_inner:2 * d_inner].copy_(per_query_head(attn.c_v))
    rows[2 * d_inner:2 * d_inner + gn].copy_(per_query_head(attn.c_k))
    rows[2 * d_inner + gn:2 * d_inner + 2 * gn].copy_(attn.c_q.weight)
    if copy_output:
        mamba.out_proj.weight.copy_(attn.c_proj.weight)
    else:
        mamba.out_proj.weight.zero_()
    # The causal conv over [x, B, C] starts as the identity (only the current token's tap, no bias)
    # instead of the paper's random init, so the copied projections reach the scan unmixed (through
    # the SiLU that follows): the layer starts as a linear attention over the teacher's q, k, v.
    mamba.conv1d.weight.zero_()
    mamba.conv1d.weight[:, 0, -1] = 1.0
    mamba.conv1d.bias.zero_()


def _check_compatible(teacher: HybridLM, student: HybridLM) -> None:
    t_arch, s_arch = teacher.architecture(), student.architecture()
    # A mixer's settings are compared only where both have that mixer (architecture() lists them only
    # then): Mamba settings where the teacher has Mamba layers to copy; a converted layer's own fit is
    # checked by attention_to_mamba.
    diffs = [f"model.{k}={v!r} (teacher: {t_arch[k]!r})" for k, v in s_arch.items()
             if k != "block_pattern" and k in t_arch and t_arch[k] != v]
    if diffs:
        raise UserError(f"the student must have the teacher's sizes except its block pattern: {'; '.join(diffs)}")
    back = [i for i, (t, s) in enumerate(zip(teacher.pattern, student.pattern)) if (t, s) == ("M", "A")]
    if back:
        raise UserError(f"model.block_pattern gives {student.pattern} but the teacher is {teacher.pattern}: layer(s) "
                        f"{back} are Mamba in the teacher and attention in the student; distillation turns A into "
                        f"M only")


@torch.no_grad()
def convert(teacher: HybridLM, student: HybridLM, copy_output: bool = True) -> None:
    """Initialise `student` from `teacher`: everything but the A -> M layers' mixers is copied as is
    (embeddings, head, norms, MLPs, unchanged layers, whatever they hold); those mixers are converted
    (attention_to_mamba)."""
    _check_compatible(teacher, student)
    converted = [i for i, (t, s) in enumerate(zip(teacher.pattern, student.pattern)) if t != s]
    mixers = tuple(f"blocks.{i}.mixer." for i in converted)
    missing, unexpected = student.load_state_dict(
        {k: v for k, v in teacher.state_dict().items() if not k.startswith(mixers)}, strict=False)
    if unexpected or not all(k.startswith(mixers) for k in missing):
        raise UserError(f"the student's blocks differ from the teacher's beyond the converted mixers: missing "
                        f"{[k for k in missing if not k.startswith(mixers)][:5]}, unexpected {unexpected[:5]}")
    for i in converted:
        attention_to_mamba(teacher.blocks[i].mixer, student.blocks[i].mixer, copy_output)
