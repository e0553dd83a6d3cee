"""Fast tests for hybridchat/model/engine.py and hybridchat/model/*, written for mutation testing (mutmut):
each compares against an independent reference (a plain full-forward greedy loop, hand values, a
per-token recurrence, transformers' peer implementation), never our code against itself.

Every model here is tiny (1-2 layers, d_model 16-32, a few tokens), so that mutmut's runs of
engine.py and model/* take seconds per mutant; see docs/testing.md ("Mutation testing").
"""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch
from conftest import naive_greedy

from hybridchat.model.config import ModelConfig
from hybridchat.model.engine import Engine
from hybridchat.core.errors import UserError
from hybridchat.model.blocks import expand_pattern
from hybridchat.model.cache import InferenceCache
from hybridchat.model.convert import convert
from hybridchat.model.lm import HybridLM

VOCAB = 37


def lm(pattern: str = "MA", seed: int = 0, **overrides) -> HybridLM:
    """2 layers, float64, every weight perturbed (zero-initialised output projections would make each
    block the identity and hide a missing term)."""
    cfg = dict(n_layer=len(pattern), n_embd=32, n_head=4, n_kv_head=2, block_pattern=pattern, mlp_ratio=2,
               d_state=8, headdim=16, chunk_size=4, sequence_len=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = HybridLM(ModelConfig(**cfg), vocab_size=VOCAB)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.double().eval()


# ---- engine.py: the fast counterparts of tests/test_engine.py's 8-layer generation tests ----------

@pytest.mark.parametrize("pattern", ["MA", "MM"])
def test_staggered_prompts_greedy_equal_a_full_forward_loop(pattern):
    """Prompts of lengths 11, 2, 6 in one group (shared prefill of 1 token, then each row feeds its own
    prompt while the shorter ones sample) and one group per prompt, chunks of 4: the tokens of a plain
    full-forward greedy loop."""
    model = lm(pattern)
    prompts = [[1, 5, 9, 3, 7, 2, 8, 4, 6, 10, 11], [4, 2], [7, 7, 7, 1, 2, 3]]
    expected = [naive_greedy(model, p, 7) for p in prompts]
    for spread in (100, 0):
        res = Engine(model, prefill_chunk=4, max_length_spread=spread).generate(prompts, 7, temperature=0)
        assert res.tokens == expected, spread
        assert res.finish_reasons == ["length"] * 3 and res.generated_tokens == 21


def test_stop_token_ends_its_row_only_and_streams_every_sampled_token():
    """Three rows; the stop token is one the first row's greedy continuation reaches and the others'
    do not: that row ends "stop" before it (the stop token is neither returned nor streamed) and the
    rows after it in the batch go on to max_new_tokens."""
    model = lm()
    prompts = [[3, 1, 4], [2, 7, 1, 8], [6, 6, 2, 9, 5]]  # shortest first: row 0 of the batch
    refs = [naive_greedy(model, p, 8) for p in prompts]
    stop = next(t for t in refs[0][2:] if t not in refs[1] + refs[2])
    first = refs[0].index(stop)
    streamed = []
    res = Engine(model).generate(prompts, 8, temperature=0, stop_tokens=[stop],
                                 on_token=lambda seq, tok: streamed.append((seq, tok)))
    assert res.tokens == [refs[0][:first], refs[1], refs[2]]
    assert res.finish_reasons == ["stop", "length", "length"]
    assert res.generated_tokens == first + 16
    for seq in range(3):
        assert [t for s, t in streamed if s == seq] == res.tokens[seq]


def test_several_greedy_samples_per_prompt_are_ordered_by_prompt_then_sample():
    model = lm()
    prompts = [[1, 2, 3, 4, 5, 6], [9, 8, 7]]
    res = Engine(model).generate(prompts, 5, temperature=0, num_samples=3)
    assert res.tokens == [naive_greedy(model, prompts[0], 5)] * 3 + [naive_greedy(model, prompts[1], 5)] * 3
    assert res.generated_tokens == 30 and res.finish_reasons == ["length"] * 6


def record_forwards(model):
    """Hooks that record, per forward of the model, how many tokens it was fed and how many positions
    reached the LM head (norm_f's input)."""
    fed, head = [], []
    model.register_forward_pre_hook(lambda mod, args: fed.append(args[0].shape[1]))
    model.norm_f.register_forward_pre_hook(lambda mod, args: head.append(args[0].shape[1]))
    return fed, head


def test_forwards_follow_the_prefill_chunk_and_only_the_last_position_reaches_the_head():
    """The tokens fed per forward, by hand: a prompt of 6 with prefill_chunk 4 is a shared prefill of
    5 (4 + 1; one token stays pending), then its last token; after the first sample a hook injects 10
    tokens, fed with the sampled one in chunks of 4 (4 + 4 + 3), then one token per sample. Every
    forward sends only its last position through the head."""
    model = lm()
    fed, head = record_forwards(model)
    injection = list(range(20, 30))
    res = Engine(model, prefill_chunk=4).generate(
        [[1, 2, 3, 4, 5, 6]], 3, temperature=0, extra_len=10,
        query_hook=lambda seq, out: injection if len(out) == 1 else None)
    assert fed == [4, 1, 1, 4, 4, 3, 1]
    assert head == [1] * len(fed)
    assert res.tokens == [naive_greedy(model, [1, 2, 3, 4, 5, 6], 3,
                                       inject=lambda out: injection if len(out) == 1 else None)]


def test_default_prefill_chunk_is_512_tokens_and_default_length_spread_64():
    model = lm("A")
    fed, head = record_forwards(model)
    prompt = [(7 * i) % VOCAB for i in range(600)]
    Engine(model).generate([prompt], 1, temperature=0)
    assert fed == [512, 87, 1]  # 599 prefilled in chunks of 512, then the last prompt token
    assert Engine(None)._groups([1, 65, 66]) == [[0, 1], [2]]  # 65 - 1 <= 64 < 66 - 1


def test_query_hook_gets_the_sequence_index_of_the_row():
    """The hook injects only into sequence 1: that row equals a greedy loop with the injection, the
    other one a loop without."""
    model = lm()
    prompts = [[1, 2, 3], [4, 5, 6]]
    calls = []

    def hook(seq, out):
        calls.append(seq)
        return [30, 31] if seq == 1 and len(out) == 2 else None

    res = Engine(model).generate(prompts, 4, temperature=0, query_hook=hook, extra_len=2)
    assert res.tokens == [naive_greedy(model, prompts[0], 4),
                          naive_greedy(model, prompts[1], 4, inject=lambda out: [30, 31] if len(out) == 2 else None)]
    assert sorted(set(calls)) == [0, 1]


def test_generation_does_not_depend_on_torchs_default_device():
    """Under `with torch.device("meta")` every tensor made without an explicit device is a meta
    tensor; the engine and the model must put theirs on the model's device (CPU here) and give the
    plain greedy loop's tokens, staggered prompts, chunked prefill, several samples and all."""
    model = lm()
    prompts = [[1, 5, 9, 3, 7, 2, 8, 4, 6], [4, 2, 9, 1, 1, 3, 5]]  # a shared prefill of 4 + 2 tokens
    expected = [naive_greedy(model, p, 5) for p in prompts]
    with torch.device("meta"):
        res = Engine(model, prefill_chunk=4).generate(prompts, 5, temperature=0, num_samples=2)
    assert res.tokens == [expected[0]] * 2 + [expected[1]] * 2


# ---- model/lm.py ----------------------------------------------------------------------------------

def size_error(**overrides) -> str:
    base = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_pattern="MA", d_state=8, headdim=16)
    base.update(overrides)
    with pytest.raises(UserError) as e:
        HybridLM(ModelConfig(**base), vocab_size=VOCAB)
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
             vocab_size=VOCAB)
    # The smallest sizes that fit: one layer, one head of 2 channels, a Mamba head of 1 channel, one
    # hidden MLP unit, sequences and scan chunks of one token.
    HybridLM(ModelConfig(n_layer=1, n_embd=2, n_head=1, n_kv_head=1, block_pattern="A"), vocab_size=VOCAB)
    HybridLM(ModelConfig(n_layer=1, n_embd=2, n_head=1, n_kv_head=1, block_pattern="M", headdim=1, d_state=2,
                         mlp_hidden=1, sequence_len=1, chunk_size=1), vocab_size=VOCAB)


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


def test_flops_per_token_by_hand():
    """6 x (parameters but the embedding lookup) + 12 x attention layers x n_embd x sequence_len; a
    tied head is the lookup's matrix and counts once."""
    for tied in (False, True):
        cfg = ModelConfig(n_layer=3, n_embd=32, n_head=4, n_kv_head=2, block_pattern="AMA", d_state=8, headdim=16,
                          sequence_len=48, tie_embeddings=tied)
        model = HybridLM(cfg, vocab_size=VOCAB)
        params = sum(p.numel() for p in model.parameters())
        lookup = 0 if tied else VOCAB * 32
        assert model.flops_per_token() == 6 * (params - lookup) + 12 * 2 * 32 * 48, tied


def count_block_forwards(model):
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i))
    return calls


def test_activation_checkpointing_recomputes_each_block_once_in_backward_and_only_when_training():
    """Each block runs once per forward and, with activation checkpointing in a training step, once
    more in backward; the loss and every gradient equal the plain step's (float64). No recompute in
    eval mode, under no_grad, with a cache, or with the option off."""
    model = lm("AM")
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))

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
    model = lm("AM").train()
    model.wte.weight.requires_grad_(False)
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    grads = []
    for ac in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ac
        model(idx, targets=idx).backward()
        grads.append({n: p.grad for n, p in model.blocks.named_parameters()})
    for name, g in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-12, atol=1e-12, msg=name)


def test_embedding_norm_makes_the_logits_independent_of_the_embeddings_scale():
    """embed_norm: the blocks see RMSNorm(embedding), so scaling the embedding matrix (untied head)
    changes nothing; without it, it does."""
    for embed_norm in (True, False):
        model = lm("MA", embed_norm=embed_norm)
        idx = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(8))
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
        model = lm("A", attn_rope=rope)
        seq = [3, 9, 14, 1, 22, 5]
        shuffled = [22, 1, 3, 14, 9, 5]
        with torch.no_grad():
            a, b = model(torch.tensor([seq]))[0, -1], model(torch.tensor([shuffled]))[0, -1]
        if rope:
            assert (a - b).abs().max() > 1e-3
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_untied_head_logits_equal_transformers_llama():
    """Llama with its own lm_head (tie_word_embeddings=False): our lm_head, not the embedding,
    makes the logits."""
    transformers = pytest.importorskip("transformers")
    from test_model_options import LAYER_NAMES, LLAMA

    cfg = dataclasses.replace(LLAMA, n_layer=1, tie_embeddings=False)
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=1,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, rope_theta=cfg.rope_base,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, max_position_embeddings=cfg.sequence_len,
        attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.5 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) * p.shape[1] ** -0.5)
    assert hf.lm_head.weight is not hf.model.embed_tokens.weight
    names = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    names.update({f"blocks.0.{ours}.weight": f"model.layers.0.{theirs}.weight" for ours, theirs in LAYER_NAMES.items()})
    ours = HybridLM(cfg, vocab_size=VOCAB).eval()
    weights = hf.state_dict()
    ours.load_state_dict({k: weights[v] for k, v in names.items()})
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)


# ---- model/cache.py -------------------------------------------------------------------------------

def test_cache_sizes_batch_size_and_kv_overflow_message_by_hand():
    """Per layer: attention holds K and V of (batch, n_kv_head, max_len, head_dim); Mamba its conv
    inputs (batch, conv_dim, d_conv) in the activation dtype and its state (batch, nheads, headdim,
    d_state) in float32 at least. Sizes by hand for float64 and bfloat16 caches."""
    model = lm("MA")  # n_embd 32, 4 heads of 8, 2 KV heads; Mamba: d_inner 64, 4 heads of 16, d_state 8
    conv_dim = 64 + 2 * 8
    for dtype, size in ((torch.float64, 8), (torch.bfloat16, 2)):
        cache = model.allocate_cache(3, 10, dtype=dtype)
        assert cache.batch_size == 3 and cache.max_len == 10 and cache.pos == 0
        kv = 2 * 3 * 2 * 10 * 8 * size
        conv = 3 * conv_dim * 4 * size
        state = 3 * 4 * 16 * 8 * max(size, 4)
        assert cache.nbytes() == kv + conv + state, dtype
    with pytest.raises(ValueError, match="^cache has no per-layer state, so no batch size$"):
        InferenceCache.allocate([torch.nn.Identity()], 2, 4).batch_size
    assert InferenceCache.allocate([torch.nn.Identity()], 2, 4).nbytes() == 0
    cache = lm("A").allocate_cache(1, 8)
    with torch.no_grad():
        lm("A")(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError) as e:
            lm("A")(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert str(e.value) == ("KV cache is full: 6 cached + 3 new tokens > max_len=8; allocate the cache with a "
                            "larger max_len")


def test_kv_cache_holds_every_key_and_value_at_its_position():
    """update_kv writes the new keys and values at [pos, pos + T) and returns [0, pos + T)."""
    cache = InferenceCache.allocate([lm("A").blocks[0].mixer], 2, 6, dtype=torch.float64)
    k1, v1 = torch.randn(2, 2, 4, 8, dtype=torch.float64), torch.randn(2, 2, 4, 8, dtype=torch.float64)
    k, v = cache.update_kv(0, k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    cache.advance(4)
    assert cache.pos == 4
    k2, v2 = torch.randn(2, 2, 2, 8, dtype=torch.float64), torch.randn(2, 2, 2, 8, dtype=torch.float64)
    k, v = cache.update_kv(0, k2, v2)
    assert torch.equal(k, torch.cat([k1, k2], 2)) and torch.equal(v, torch.cat([v1, v2], 2))
    cache.advance(2)
    assert cache.pos == 6


def test_cache_reset_copy_select_and_expand_against_full_forwards():
    """After a prefill of rows [a, b, c]: select([2, 0]) continues rows c, a; expand(2) rows a, a, b, b,
    c, c; a copy continues like the original without touching it; reset() starts from nothing. Each
    next-token logit equals a full forward over that row's whole sequence."""
    model = lm("MA")
    seqs = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(5))
    nxt = torch.randint(0, VOCAB, (6, 1), generator=torch.Generator().manual_seed(6))

    def full(rows, tokens):
        return model(torch.cat([seqs[rows], tokens], 1))[:, -1:]

    with torch.no_grad():
        cache = model.allocate_cache(3, 8)
        model(seqs, cache=cache)
        snapshot = [t.clone() for state in cache.layers for t in vars(state).values()]
        picked = cache.select([2, 0])
        assert picked.pos == 6 and picked.max_len == 8 and picked.batch_size == 2
        torch.testing.assert_close(model(nxt[:2], cache=picked), full([2, 0], nxt[:2]), rtol=1e-10, atol=1e-10)
        doubled = cache.expand(2)
        assert doubled.batch_size == 6 and doubled.pos == 6
        torch.testing.assert_close(model(nxt, cache=doubled), full([0, 0, 1, 1, 2, 2], nxt), rtol=1e-10, atol=1e-10)
        copied = cache.copy()
        torch.testing.assert_close(model(nxt[:3], cache=copied), full([0, 1, 2], nxt[:3]), rtol=1e-10, atol=1e-10)
        assert cache.pos == 6
        after = [t for state in cache.layers for t in vars(state).values()]
        assert all(torch.equal(a, b) for a, b in zip(after, snapshot))  # the copy wrote its own tensors
        torch.testing.assert_close(model(nxt[:3], cache=cache), full([0, 1, 2], nxt[:3]), rtol=1e-10, atol=1e-10)
        cache.reset()
        assert cache.pos == 0
        assert all(not t.any() for state in cache.layers for t in vars(state).values())
        torch.testing.assert_close(model(seqs[:, :4], cache=cache), model(seqs[:, :4]), rtol=1e-10, atol=1e-10)


# ---- model/blocks.py ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,n_layer,letters", [
    ("all_attention", 3, "AAA"),
    ("all_mamba", 3, "MMM"),
    ("alternating", 5, "MAMAM"),
    ("early_attention_late_mamba", 8, "AAMMMMMM"),  # a quarter attention, first
    ("early_attention_late_mamba", 3, "AMM"),  # at least one
    ("jamba", 16, "MMMMAMMMMMMMAMMM"),  # layer 4 of every 8
    ("jamba", 5, "MMMMA"),
    ("jamba", 4, "MMAM"),  # no layer 4: one attention in the middle, round(4 / 2) = 2
    ("jamba", 3, "MMA"),  # round(1.5) = 2
    ("nemotron", 25, "MMMMMMMMAMMMMMMMMAMMMMMMM"),  # round(0.08 * 25) = 2 at round(25/3) = 8, round(50/3) = 17
    ("nemotron", 12, "MMMMMMAMMMMM"),  # round(0.96) = 1 at 6
    ("nemotron", 4, "MMAM"),  # round(0.32) = 0 -> at least 1
])
def test_pattern_presets_by_hand(preset, n_layer, letters):
    assert expand_pattern(preset, n_layer) == letters


def test_pattern_letters_are_tiled_or_refused_with_the_reason():
    assert expand_pattern(" am ", 4) == "AMAM"
    allowed = ("letters ['A', 'M'] (tiled when their count divides n_layer) or a preset ['all_attention', "
               "'all_mamba', 'alternating', 'early_attention_late_mamba', 'jamba', 'nemotron']")
    with pytest.raises(UserError) as e:
        expand_pattern("  ", 4)
    assert str(e.value) == f"model.block_pattern is empty; give {allowed}"
    with pytest.raises(UserError) as e:
        expand_pattern("MAXq", 4)
    assert str(e.value) == f"model.block_pattern='MAXq' has unknown letter(s) ['Q', 'X']; allowed: {allowed}"
    with pytest.raises(UserError) as e:
        expand_pattern("MAM", 4)
    assert str(e.value) == (f"model.block_pattern='MAM' has 3 letters, which neither equals nor divides "
                            f"model.n_layer=4; allowed: {allowed}")


# ---- model/convert.py -----------------------------------------------------------------------------

def conv_lm(pattern: str, **overrides) -> HybridLM:
    """32 channels in 2 attention heads of 16; Mamba sized to hold them (expand 1, heads of 16, d_state 16,
    one group per head)."""
    cfg = dict(n_layer=len(pattern), n_embd=32, n_head=2, n_kv_head=1, block_pattern=pattern, mlp_ratio=2,
               expand=1, headdim=16, d_state=16, ngroups=2, chunk_size=4)
    cfg.update(overrides)
    return HybridLM(ModelConfig(**cfg), vocab_size=VOCAB)


def test_conversion_refuses_other_sizes_listing_each_difference():
    with pytest.raises(UserError) as e:
        convert(conv_lm("AA"), conv_lm("AM", mlp_ratio=3, qk_norm=False))
    assert str(e.value) == ("the student must have the teacher's sizes except its block pattern: "
                            "model.mlp_ratio=3 (teacher: 2); model.qk_norm=False (teacher: True)")
    # Mamba settings are compared only when the teacher has Mamba layers (here it has: layer 1).
    with pytest.raises(UserError) as e:
        convert(conv_lm("AM"), conv_lm("MM", d_conv=3))
    assert str(e.value) == ("the student must have the teacher's sizes except its block pattern: "
                            "model.d_conv=3 (teacher: 4)")
    convert(conv_lm("AA", d_conv=3), conv_lm("AM"))  # an all-attention teacher has no d_conv to compare


def test_conversion_refuses_mamba_back_to_attention_naming_the_layers():
    with pytest.raises(UserError) as e:
        convert(conv_lm("AMAM"), conv_lm("MAAM"))
    assert str(e.value) == ("model.block_pattern gives MAAM but the teacher is AMAM: layer(s) [1] are Mamba in "
                            "the teacher and attention in the student; distillation turns A into M only")


def test_attention_fits_a_mamba_layer_only_with_one_head_per_head_of_its_size():
    from hybridchat.model.attention import CausalSelfAttention
    from hybridchat.model.convert import attention_to_mamba
    from hybridchat.model.mamba import Mamba2

    attn = CausalSelfAttention(32, 2, 1)
    with pytest.raises(UserError) as e:
        attention_to_mamba(attn, Mamba2(32, d_state=8, expand=2, headdim=16, ngroups=1, layer_idx=3, backend="torch"))
    assert str(e.value) == ("layer 3: a Mamba layer holds attention with 2 heads of 16 only with model.expand=1 "
                            "model.headdim=16 model.d_state=16 model.ngroups=2 (the student has expand=2 d_state=8 "
                            "ngroups=1)")
    attention_to_mamba(attn, Mamba2(32, d_state=16, expand=1, headdim=16, ngroups=2, backend="torch"))


def test_init_weights_of_attention_mlp_and_norms_by_hand():
    """Input projections uniform in +-sqrt(3 / fan_in) (std 1/sqrt(fan_in)), output projections zero,
    every norm gain 1, whatever the weights held before (swiglu: the gate like the up projection)."""
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_pattern="AM", d_state=8, headdim=16,
                      mlp="swiglu", mlp_ratio=4, norm_weights=True)
    model = HybridLM(cfg, vocab_size=VOCAB)
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


# ---- model/attention.py ---------------------------------------------------------------------------

def test_rotary_tables_by_hand():
    """Angle of position t, pair i: t / base^(2i / head_dim), positions from `offset` (0 by default)."""
    from hybridchat.model.attention import rotary_cos_sin

    for offset, kwargs in ((0, {}), (5, {"offset": 5})):
        cos, sin = rotary_cos_sin(3, 8, 100.0, **kwargs)
        assert cos.shape == sin.shape == (1, 1, 3, 4) and cos.dtype == torch.float32
        for t in range(3):
            for i in range(4):
                angle = (offset + t) / 100.0 ** (2 * i / 8)
                assert cos[0, 0, t, i].item() == pytest.approx(math.cos(angle), abs=1e-6)
                assert sin[0, 0, t, i].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_block_recipe_reaches_every_layer():
    """The config's recipe, layer by layer: norm eps everywhere (qk-norm included), Mamba sizes and layer
    indices, MLP hidden size from mlp_ratio, no MLP after Mamba with mamba_mlp false."""
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_pattern="AM", d_state=8, d_conv=3, expand=3,
                      headdim=12, ngroups=2, chunk_size=5, mlp_ratio=3, mamba_mlp=False, norm_eps=0.25)
    model = HybridLM(cfg, vocab_size=VOCAB)
    attn, mamba = model.blocks[0].mixer, model.blocks[1].mixer
    norms = [model.norm_embed, model.norm_f, attn.qk_norm, model.blocks[0].norm_mixer, model.blocks[0].norm_mlp,
             model.blocks[1].norm_mixer]
    assert [n.eps for n in norms] == [0.25] * 6
    assert (attn.layer_idx, attn.n_head, attn.n_kv_head, attn.head_dim) == (0, 4, 2, 8)
    assert (mamba.layer_idx, mamba.d_state, mamba.d_conv, mamba.d_inner, mamba.headdim, mamba.ngroups,
            mamba.chunk_size, mamba.backend) == (1, 8, 3, 96, 12, 2, 5, "torch")
    assert model.blocks[0].mlp.c_fc.weight.shape == (96, 32) and model.blocks[0].mlp.c_gate is None
    assert model.blocks[1].mlp is None and model.blocks[1].norm_mlp is None
    assert HybridLM(dataclasses.replace(cfg, mamba_mlp=True), vocab_size=VOCAB).blocks[1].mlp is not None
    no_qk = HybridLM(dataclasses.replace(cfg, qk_norm=False), vocab_size=VOCAB)
    assert no_qk.blocks[0].mixer.qk_norm is None
    # mlp_ratio 1: an MLP of n_embd hidden units; 0: none.
    assert HybridLM(dataclasses.replace(cfg, mlp_ratio=1), vocab_size=VOCAB).blocks[0].mlp.c_fc.weight.shape == (32, 32)
    assert HybridLM(dataclasses.replace(cfg, mlp_ratio=0), vocab_size=VOCAB).blocks[0].mlp is None


def test_a_block_built_on_its_own_runs_mamba_on_the_torch_backend():
    from hybridchat.model.blocks import Block

    cfg = ModelConfig(n_layer=1, n_embd=32, n_head=4, n_kv_head=2, block_pattern="M", d_state=8, headdim=16)
    block = Block("M", cfg, 0)
    assert block.mixer.backend == "torch"
    with torch.no_grad():
        assert block(torch.randn(1, 5, 32)).shape == (1, 5, 32)


def test_relu_squared_mlp_by_hand():
    """relu2: c_proj(relu(c_fc x)^2), written out with plain matrix products."""
    from hybridchat.model.blocks import MLP

    torch.manual_seed(0)
    mlp = MLP(6, 10).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    w1, w2 = mlp.c_fc.weight.detach(), mlp.c_proj.weight.detach()
    hidden = (x @ w1.T).clamp(min=0) ** 2
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), hidden @ w2.T, rtol=1e-12, atol=1e-12)


def attention_reference(attn, u, base=10000.0):
    """Causal self-attention written out per position in float64 from the layer's weights: RoPE on
    pairs (i, i + head_dim/2) at angle t / base^(2i / head_dim), RMS-normed q and k per head, scores
    q.k / sqrt(head_dim), query head h reading KV head h // (n_head / n_kv_head), then c_proj."""
    H, KV, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    B, T, _ = u.shape
    q = (u @ attn.c_q.weight.detach().T).view(B, T, H, hd)
    k = (u @ attn.c_k.weight.detach().T).view(B, T, KV, hd)
    v = (u @ attn.c_v.weight.detach().T).view(B, T, KV, hd)

    def rope(x):
        out = x.clone()
        for t in range(T):
            for i in range(hd // 2):
                a, b = x[:, t, :, i], x[:, t, :, i + hd // 2]
                angle = t / base ** (2 * i / hd)
                out[:, t, :, i] = a * math.cos(angle) - b * math.sin(angle)
                out[:, t, :, i + hd // 2] = a * math.sin(angle) + b * math.cos(angle)
        return out

    def rms(x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)

    q, k = rms(rope(q)), rms(rope(k))
    y = torch.zeros(B, T, H, hd, dtype=u.dtype)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                g = h // (H // KV)
                scores = torch.stack([q[b, t, h] @ k[b, s, g] for s in range(t + 1)]) / math.sqrt(hd)
                w = torch.softmax(scores, 0)
                y[b, t, h] = sum(w[s] * v[b, s, g] for s in range(t + 1))
    return y.reshape(B, T, H * hd) @ attn.c_proj.weight.detach().T


def test_attention_layer_equals_a_hand_written_causal_attention_full_and_cached():
    """A layer built with its defaults (layer 0, QK-norm on): a full forward, and one fed through a
    cache as 1 token, a chunk of 4 (past = 1: bottom-right causal mask), a chunk of 3, then single
    tokens, equal the hand-written attention."""
    from hybridchat.model.attention import CausalSelfAttention, rotary_cos_sin

    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, 2).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.4)
    u = torch.randn(2, 11, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = attention_reference(attn, u)
    with torch.no_grad():
        full = attn(u, rotary_cos_sin(11, 8, 10000.0))
        cache = InferenceCache.allocate([attn], 2, 11, dtype=torch.float64)
        parts = []
        for lo, hi in ((0, 1), (1, 5), (5, 8), (8, 9), (9, 10), (10, 11)):
            parts.append(attn(u[:, lo:hi], rotary_cos_sin(hi - lo, 8, 10000.0, offset=lo), cache))
            cache.advance(hi - lo)
    # RoPE's tables are float32 (angles rounded to ~1e-7 relative): hence 1e-5, not float64's 1e-12.
    assert expected.abs().max() > 1
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(parts, 1), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_model_runs_in_bfloat16_close_to_float64():
    """A bfloat16 model (RoPE tables cast to the activations' dtype): logits in bfloat16, within
    bfloat16's rounding of the float64 model's, full and cached."""
    model = lm("AM")
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(9))
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


# ---- model/mamba.py -------------------------------------------------------------------------------

def test_scans_return_the_inputs_dtype_whatever_the_initial_states():
    """bfloat16 inputs continuing a float32 state: both scans answer in bfloat16 and agree with the
    float64 recurrence to bfloat16's precision."""
    from hybridchat.model.mamba import ssd_chunked, ssd_recurrent

    g = torch.Generator().manual_seed(0)
    x, B, C = (torch.randn(1, 6, *s, generator=g) for s in ((2, 4), (1, 3), (1, 3)))
    dt, A = torch.rand(1, 6, 2, generator=g) * 0.5, -torch.rand(2, generator=g)
    state = torch.randn(1, 2, 4, 3, generator=g)
    ref, ref_state = ssd_recurrent(*(t.double() for t in (x, dt, A, B, C)), initial_state=state.double())
    for scan in (ssd_recurrent, ssd_chunked):
        y, final = scan(x.bfloat16(), dt.bfloat16(), A.bfloat16(), B.bfloat16(), C.bfloat16(), 4, initial_state=state)
        assert y.dtype == final.dtype == torch.bfloat16, scan.__name__
        torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.05)
        torch.testing.assert_close(final.double(), ref_state, rtol=0.05, atol=0.05)


CUDA_MODULES = ["causal_conv1d", "mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton",
                "mamba_ssm.ops.triton.layernorm_gated", "mamba_ssm.ops.triton.selective_state_update",
                "mamba_ssm.ops.triton.ssd_combined"]


def stand_in_kernels():
    """Modules that import like mamba_ssm's and causal_conv1d's kernels (each kernel is its own name)."""
    import types

    fakes = {name: types.ModuleType(name) for name in CUDA_MODULES}
    for module, attrs in (("causal_conv1d", ["causal_conv1d_fn", "causal_conv1d_update"]),
                          ("mamba_ssm.ops.triton.layernorm_gated", ["rmsnorm_fn"]),
                          ("mamba_ssm.ops.triton.selective_state_update", ["selective_state_update"]),
                          ("mamba_ssm.ops.triton.ssd_combined", ["mamba_chunk_scan_combined"])):
        for attr in attrs:
            setattr(fakes[module], attr, attr)
    return fakes


def test_cuda_kernels_are_available_exactly_when_they_import(monkeypatch):
    """With the five kernels importable (stand-in modules) they are available and handed out; with
    mamba_ssm unimportable they are not, and asking for them says how to install them or avoid them."""
    from hybridchat.model import mamba

    mamba._load_cuda_kernels.cache_clear()
    try:
        with monkeypatch.context() as m:
            for name, module in stand_in_kernels().items():
                m.setitem(sys.modules, name, module)
            assert mamba.cuda_kernels_available() is True
            assert mamba._cuda_kernels().mamba_chunk_scan_combined == "mamba_chunk_scan_combined"
        mamba._load_cuda_kernels.cache_clear()
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "causal_conv1d", None)  # None in sys.modules: import raises ImportError
            assert mamba.cuda_kernels_available() is False
            with pytest.raises(UserError) as e:
                mamba._cuda_kernels()
            assert str(e.value) == (
                "gpu.ssm_backend=cuda needs the mamba_ssm and causal_conv1d kernels, which did not import "
                "(ModuleNotFoundError: import of causal_conv1d halted; None in sys.modules). Install them on a CUDA "
                "machine that already has torch: MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE pip install "
                "--no-build-isolation -e '.[gpu]' (see docs/mamba.md), or set gpu.ssm_backend=torch (pure PyTorch, "
                "runs everywhere).")
    finally:
        mamba._load_cuda_kernels.cache_clear()


def test_cuda_backend_refuses_a_cpu_input_naming_the_fix(monkeypatch):
    """backend="cuda" (kernels importable: stand-ins) with a CPU tensor: one UserError before any
    kernel runs, saying which backends would do."""
    from hybridchat.model import mamba

    mamba._load_cuda_kernels.cache_clear()
    try:
        for name, module in stand_in_kernels().items():
            monkeypatch.setitem(sys.modules, name, module)
        m = mamba.Mamba2(32, d_state=8, headdim=16, backend="cuda")
        for u in (torch.randn(1, 4, 32), torch.randn(1, 1, 32)):
            with pytest.raises(UserError) as e:
                m(u)
            assert str(e.value) == ("gpu.ssm_backend=cuda needs CUDA tensors, got a cpu input; set "
                                    "gpu.ssm_backend=torch or auto")
    finally:
        monkeypatch.undo()
        mamba._load_cuda_kernels.cache_clear()


def test_mamba_cache_defaults_to_the_layers_device_and_dtype():
    """Without device/dtype the state is on the layer's device in its dtype (the SSM state in at least
    float32), not on torch's default device; given ones are honoured."""
    from hybridchat.model.mamba import Mamba2

    m = Mamba2(32, d_state=8, headdim=16, backend="torch").double()
    with torch.device("meta"):
        state = m.allocate_cache(2, 5)
    assert state.conv_state.device.type == state.ssm_state.device.type == "cpu"
    assert state.conv_state.dtype == state.ssm_state.dtype == torch.float64
    assert state.conv_state.shape == (2, 64 + 2 * 8, 4) and state.ssm_state.shape == (2, 4, 16, 8)
    state = m.allocate_cache(2, 5, device="meta", dtype=torch.bfloat16)
    assert state.conv_state.device.type == "meta" and state.conv_state.dtype == torch.bfloat16
    assert state.ssm_state.dtype == torch.float32


@pytest.mark.parametrize("model_dtype, cache_dtype, prefill, seed", [
    (torch.float32, torch.bfloat16, [4], 11),      # prefill, then single steps
    (torch.bfloat16, torch.float32, [3, 4], 12),   # a second chunk continues the cached conv inputs
])
def test_mamba_model_decodes_with_a_cache_of_another_dtype(model_dtype, cache_dtype, prefill, seed):
    """allocate_cache(dtype=cache_dtype) for a model_dtype Mamba model: prefill chunks, then single
    steps, stay within bfloat16's rounding of the float64 full forward, in the model's dtype."""
    model = lm("MM")
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(idx)
        model.to(model_dtype)
        cache = model.allocate_cache(2, 10, dtype=cache_dtype)
        parts, t = [], 0
        for n in prefill:
            parts.append(model(idx[:, t:t + n], cache=cache))
            t += n
        parts += [model(idx[:, i:i + 1], cache=cache) for i in range(t, 10)]
    got = torch.cat(parts, 1)
    assert got.dtype == model_dtype
    assert (got.double() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_one_token_without_a_cache_equals_the_per_token_recurrence():
    """A single token and no cache is a full forward of length 1, not a decode step."""
    from test_survivors import mamba_reference

    from hybridchat.model.mamba import Mamba2

    torch.manual_seed(0)
    m = Mamba2(12, d_state=5, d_conv=4, expand=2, headdim=6, ngroups=2, chunk_size=4, backend="torch").double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        u = torch.randn(3, 1, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(m(u), mamba_reference(m, u), rtol=1e-9, atol=1e-10)


def test_mamba_layer_defaults_are_mamba_ssms():
    """Mamba2(d_model) with mamba_ssm's defaults: d_state 64, d_conv 4, expand 2, headdim 64, one group,
    chunks of 64, backend auto, dt drawn in [0.001, 0.1], gated-norm eps 1e-5."""
    from hybridchat.model.mamba import Mamba2

    torch.manual_seed(0)
    m = Mamba2(64)
    assert (m.d_state, m.d_conv, m.d_inner, m.headdim, m.nheads, m.ngroups, m.chunk_size, m.backend, m.layer_idx) \
        == (64, 4, 128, 64, 2, 1, 64, "auto", 0)
    assert m.norm.eps == 1e-5
    dts = []
    for _ in range(200):
        m.init_weights()
        dts.append(torch.nn.functional.softplus(m.dt_bias.detach()))
    dt = torch.cat(dts)
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5) and dt.max() > 0.08


def test_auto_backend_runs_cpu_inputs_on_torch_even_with_kernels_installed(monkeypatch):
    from hybridchat.model import mamba

    mamba._load_cuda_kernels.cache_clear()
    try:
        for name, module in stand_in_kernels().items():
            monkeypatch.setitem(sys.modules, name, module)
        assert mamba.cuda_kernels_available()
        torch.manual_seed(0)
        auto = mamba.Mamba2(32, d_state=8, headdim=16, backend="auto")
        plain = mamba.Mamba2(32, d_state=8, headdim=16, backend="torch")
        plain.load_state_dict(auto.state_dict())
        with torch.no_grad():
            u = torch.randn(2, 5, 32)
            torch.nn.init.normal_(auto.out_proj.weight)
            plain.out_proj.weight.copy_(auto.out_proj.weight)
            assert torch.equal(auto(u), plain(u))
    finally:
        monkeypatch.undo()
        mamba._load_cuda_kernels.cache_clear()
