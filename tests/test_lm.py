"""HybridLM (model/lm.py) on 1-2 layer models, each against an independent reference: the loss
against a hand computation, every size check's message, initialisation by hand, FLOPs by hand,
activation checkpointing against the plain step, the embedding norm, attention without RoPE, bfloat16."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_VOCAB, tiny_lm

from hybridchat.core.errors import UserError
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM

# ---- loss masking --------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_ignores_minus_one_targets_like_a_hand_computation(reduction):
    torch.manual_seed(0)
    vocab = 23
    model = HybridLM(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_pattern="AM", d_state=8,
                                 headdim=16, mlp_ratio=1, chunk_size=4), vocab_size=vocab)
    model.init_weights()
    idx = torch.randint(0, vocab, (3, 9))
    targets = torch.randint(0, vocab, (3, 9))
    targets[0, :4] = -1  # a masked prompt
    targets[2, 5:] = -1  # masked documents at the end
    targets[1, 3] = -1
    with torch.no_grad():
        logits = model(idx).double()
        loss = model(idx, targets=targets, reduction=reduction).item()
    # Hand computation: -log softmax at the target of every position whose target is not -1.
    terms = []
    for b in range(3):
        for t in range(9):
            if targets[b, t] != -1:
                row = logits[b, t]
                terms.append(-(row[targets[b, t]] - math.log(sum(math.exp(v) for v in row.tolist()))).item())
    assert len(terms) == 27 - 4 - 4 - 1
    expected = sum(terms) / len(terms) if reduction == "mean" else sum(terms)
    assert loss == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # and the masked positions really carry no loss: changing them changes nothing
        other = targets.clone()
        other[0, :4] = -1
        assert model(idx, targets=other, reduction=reduction).item() == pytest.approx(loss, rel=1e-6)


# ---- sizes, initialisation, FLOPs ----------------------------------------------------------------

def size_error(**overrides) -> str:
    base = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_pattern="MA", d_state=8, headdim=16)
    base.update(overrides)
    with pytest.raises(UserError) as e:
        HybridLM(ModelConfig(**base), vocab_size=TINY_VOCAB)
    return str(e.value)


def test_sizes_that_do_not_fit_are_refused_naming_the_keys():
    assert size_error(n_layer=0) == "model.n_layer and model.n_embd must be > 0 (got 0, 32)"
    assert size_error(n_embd=0) == "model.n_layer and model.n_embd must be > 0 (got 2, 0)"
    assert size_error(n_head=0) == "model.n_embd=32 must be divisible by model.n_head=0"
    assert size_error(n_head=3) == "model.n_embd=32 must be divisible by model.n_head=3"
    assert size_error(n_kv_head=3) == ("model.n_head=4 must be divisible by model.n_kv_head=3 "
                                       "(grouped-query attention)")
    assert size_error(n_kv_head=0).startswith("model.n_head=4 must be divisible by model.n_kv_head=0")
    # One embedding channel, one head: it passes "> 0" and fails on RoPE's even head size.
    assert size_error(n_embd=1, n_head=1, n_kv_head=1) == "model.n_embd / model.n_head = 1 must be even (RoPE)"
    assert size_error(sequence_len=0) == "model.sequence_len and model.chunk_size must be > 0 (got 0, 64)"
    assert size_error(chunk_size=0) == "model.sequence_len and model.chunk_size must be > 0 (got 512, 0)"
    # Mamba's sizes, checked only where the pattern has Mamba layers (d_inner = 2 x 32 = 64).
    assert size_error(headdim=0) == "model.expand * model.n_embd = 64 must be divisible by model.headdim=0"
    assert size_error(headdim=24) == "model.expand * model.n_embd = 64 must be divisible by model.headdim=24"
    assert size_error(ngroups=0) == "Mamba heads (4) must be divisible by model.ngroups=0"
    assert size_error(ngroups=3) == "Mamba heads (4) must be divisible by model.ngroups=3"
    assert size_error(block_pattern="MM", headdim=24) == size_error(headdim=24)
    HybridLM(ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_pattern="AA", headdim=24, ngroups=3),
             vocab_size=TINY_VOCAB)
    # The smallest sizes that fit: one layer, one head of 2 channels, a Mamba head of 1 channel, one
    # hidden MLP unit, sequences and scan chunks of one token.
    HybridLM(ModelConfig(n_layer=1, n_embd=2, n_head=1, n_kv_head=1, block_pattern="A"), vocab_size=TINY_VOCAB)
    HybridLM(ModelConfig(n_layer=1, n_embd=2, n_head=1, n_kv_head=1, block_pattern="M", headdim=1, d_state=2,
                         mlp_hidden=1, sequence_len=1, chunk_size=1), vocab_size=TINY_VOCAB)


@pytest.mark.parametrize("tied", [True, False])
def test_init_weights_draws_embedding_and_head_at_their_stds(tied):
    """Tied: one matrix at std 0.02; untied: the embedding at std 1, the head at std 0.001 (sample
    stds of 40,000 draws, within 3%)."""
    model = HybridLM(ModelConfig(n_layer=1, n_embd=40, n_head=2, n_kv_head=2, block_pattern="A",
                                 tie_embeddings=tied), vocab_size=1000)
    torch.manual_seed(0)
    model.init_weights()
    if tied:
        assert model.lm_head is None
        assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)
    else:
        assert model.wte.weight.std().item() == pytest.approx(1.0, rel=0.03)
        assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.03)
    assert abs(model.wte.weight.mean().item()) < 0.03 * model.wte.weight.std().item()


def test_init_weights_of_attention_mlp_and_norms_by_hand():
    """Input projections uniform in +-sqrt(3 / fan_in) (std 1/sqrt(fan_in)), output projections zero,
    every norm gain 1, whatever the weights held before (swiglu: the gate like the up projection)."""
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_pattern="AM", d_state=8, headdim=16,
                      mlp="swiglu", mlp_ratio=4, norm_weights=True)
    model = HybridLM(cfg, vocab_size=TINY_VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(2.0, 3.0)
    torch.manual_seed(0)
    model.init_weights()
    bound = (3.0 / 64) ** 0.5
    attn = model.blocks[0].mixer
    matrices = [attn.c_q.weight, attn.c_k.weight, attn.c_v.weight]
    for block in model.blocks:
        matrices += [block.mlp.c_fc.weight, block.mlp.c_gate.weight]
        assert torch.all(block.mlp.c_proj.weight == 0)
        assert torch.all(block.norm_mixer.weight == 1) and torch.all(block.norm_mlp.weight == 1)
    for w in matrices:
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert w.std().item() == pytest.approx(64 ** -0.5, rel=0.1)
    assert torch.all(attn.c_proj.weight == 0)
    assert torch.all(model.norm_f.weight == 1)
    assert torch.all(model.blocks[1].mixer.D == 1)  # the Mamba layer's own init ran too


def test_flops_per_token_by_hand():
    """6 x (parameters but the embedding lookup) + 12 x attention layers x n_embd x sequence_len; a
    tied head is the lookup's matrix and counts once."""
    for tied in (False, True):
        cfg = ModelConfig(n_layer=3, n_embd=32, n_head=4, n_kv_head=2, block_pattern="AMA", d_state=8, headdim=16,
                          sequence_len=48, tie_embeddings=tied)
        model = HybridLM(cfg, vocab_size=TINY_VOCAB)
        params = sum(p.numel() for p in model.parameters())
        lookup = 0 if tied else TINY_VOCAB * 32
        assert model.flops_per_token() == 6 * (params - lookup) + 12 * 2 * 32 * 48, tied


# ---- activation checkpointing --------------------------------------------------------------------

def count_block_forwards(model):
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i))
    return calls


def test_activation_checkpointing_recomputes_each_block_once_in_backward_and_only_when_training():
    """Each block runs once per forward and, with activation checkpointing in a training step, once
    more in backward; the loss and every gradient equal the plain step's (float64). No recompute in
    eval mode, under no_grad, with a cache, or with the option off."""
    model = tiny_lm("AM")
    idx = torch.randint(0, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))

    def step(ac: bool | None, train: bool = True):
        model.zero_grad()
        if ac is not None:  # None: the model's default (off)
            model.activation_checkpointing = ac
        model.train(train)
        calls = count_block_forwards(model)
        loss = model(idx, targets=targets)
        loss.backward()
        for block in model.blocks:
            block._forward_pre_hooks.clear()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls

    loss, grads, calls = step(ac=None)
    assert calls == [0, 1]
    assert step(ac=False)[2] == [0, 1]
    loss_ac, grads_ac, calls_ac = step(ac=True)
    assert calls_ac == [0, 1, 1, 0]  # forward, then backward recomputes the last block first
    assert loss_ac == loss
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], rtol=1e-12, atol=1e-12, msg=name)
    assert step(ac=True, train=False)[2] == [0, 1]
    model.train()
    calls = count_block_forwards(model)
    with torch.no_grad():
        model(idx)
        model(idx, cache=model.allocate_cache(2, 9))
    with torch.enable_grad():
        model(idx, cache=model.allocate_cache(2, 9))
    assert calls == [0, 1] * 3


def test_activation_checkpointing_trains_the_blocks_under_a_frozen_embedding():
    """With the embedding frozen the blocks' input needs no gradient; the (non-reentrant) recompute
    must still give every block parameter its gradient, equal to the plain step's."""
    model = tiny_lm("AM").train()
    model.wte.weight.requires_grad_(False)
    idx = torch.randint(0, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    grads = []
    for ac in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ac
        model(idx, targets=idx).backward()
        grads.append({n: p.grad for n, p in model.blocks.named_parameters()})
    for name, g in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-12, atol=1e-12, msg=name)


# ---- embedding norm, RoPE, bfloat16 --------------------------------------------------------------

def test_embedding_norm_makes_the_logits_independent_of_the_embeddings_scale():
    """embed_norm: the blocks see RMSNorm(embedding), so scaling the embedding matrix (untied head)
    changes nothing; without it, it does."""
    for embed_norm in (True, False):
        model = tiny_lm("MA", embed_norm=embed_norm)
        idx = torch.randint(0, TINY_VOCAB, (2, 7), generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            before = model(idx)
            model.wte.weight.mul_(5.0)
            after = model(idx)
        if embed_norm:
            torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
        else:
            assert (after - before).abs().max() > 1e-2


def test_without_rope_attention_sees_its_past_as_an_unordered_set():
    """attn_rope false: one attention layer has no positions anywhere, so the last position's logits do
    not change when the tokens before it are permuted (its keys and values are a set); with RoPE they do."""
    for rope in (False, True):
        model = tiny_lm("A", attn_rope=rope)
        seq = [3, 9, 14, 1, 22, 5]
        shuffled = [22, 1, 3, 14, 9, 5]
        with torch.no_grad():
            a, b = model(torch.tensor([seq]))[0, -1], model(torch.tensor([shuffled]))[0, -1]
        if rope:
            assert (a - b).abs().max() > 1e-3
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bfloat16_model_runs_in_bfloat16_close_to_float64():
    """A bfloat16 model (RoPE tables cast to the activations' dtype): logits in bfloat16, within
    bfloat16's rounding of the float64 model's, full and cached."""
    model = tiny_lm("AM")
    idx = torch.randint(0, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model(idx)
        half = model.to(torch.bfloat16)
        got = half(idx)
        cache = half.allocate_cache(2, 9)
        stepped = torch.cat([half(idx[:, :5], cache=cache)] + [half(idx[:, t:t + 1], cache=cache) for t in range(5, 9)], 1)
    assert got.dtype == stepped.dtype == torch.bfloat16
    scale = ref.abs().max().item()
    assert (got.double() - ref).abs().max().item() < 0.05 * scale
    assert (stepped.double() - ref).abs().max().item() < 0.05 * scale
