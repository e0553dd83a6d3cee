"""Inference cache and generation engine: cached decoding equals a full forward for every block
pattern, batching of prompts of different lengths, sampling options, stop tokens, streaming,
several samples per prompt, query hook."""

import dataclasses
import math

import pytest
import torch
from conftest import TINY_VOCAB, TOY_MODEL, TOY_VOCAB, naive_greedy, random_model, tiny_lm

from hybridchat.model.cache import InferenceCache
from hybridchat.model.engine import Engine, close_only_opened, opened, sample, score_continuation
from hybridchat.model.lm import HybridLM

PATTERNS = ["all_attention", "all_mamba", "alternating", "early_attention_late_mamba", "jamba", "nemotron"]
VOCAB = 61


def tiny_model(pattern: str = "jamba", n_layer: int = 8, dtype=torch.float64, seed: int = 0) -> HybridLM:
    return random_model(pattern, n_layer, VOCAB, dtype, seed)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_cached_logits_equal_full_forward(pattern):
    model = tiny_model(pattern)
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = model.allocate_cache(2, 40)
        parts = [model(idx[:, :13], cache=cache), model(idx[:, 13:29], cache=cache)]  # chunked prefill
        parts += [model(idx[:, t:t + 1], cache=cache) for t in range(29, 40)]  # decode
    assert cache.pos == 40
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pattern", ["all_attention", "all_mamba", "jamba"])
def test_engine_greedy_equals_naive_generation(pattern):
    model = tiny_model(pattern)
    prompts = [[1, 5, 9, 3, 7, 2, 8, 4, 6, 10, 11], [4, 2], [7, 7, 7, 1, 2, 3]]  # lengths 11, 2, 6
    # One group (rows fed staggered) and one group per prompt give the same tokens.
    for spread in (100, 0):
        res = Engine(model, prefill_chunk=4, max_length_spread=spread).generate(prompts, 9, temperature=0)
        for p, toks in zip(prompts, res.tokens):
            assert toks == naive_greedy(model, p, 9)
        assert res.finish_reasons == ["length"] * 3 and res.generated_tokens == 27


def test_stop_tokens_and_streaming():
    model = tiny_model()
    prompt = [3, 1, 4, 1, 5]
    ref = naive_greedy(model, prompt, 8)
    stop = ref[4]
    first = ref.index(stop)
    streamed = []
    res = Engine(model).generate([prompt], 8, temperature=0, stop_tokens=[stop],
                                 on_token=lambda seq, tok: streamed.append((seq, tok)))
    assert res.tokens == [ref[:first]]  # the stop token itself is not returned
    assert res.finish_reasons == ["stop"]
    assert streamed == [(0, t) for t in ref[:first]]


def test_several_samples_per_prompt():
    model = tiny_model()
    prompts = [[1, 2, 3, 4, 5, 6], [9, 8, 7]]
    engine = Engine(model)
    greedy = engine.generate(prompts, 6, temperature=0, num_samples=3)
    # Sequence i * num_samples + s is sample s of prompt i; greedy samples are identical.
    assert greedy.tokens == [naive_greedy(model, prompts[0], 6)] * 3 + [naive_greedy(model, prompts[1], 6)] * 3
    a = engine.generate(prompts, 6, temperature=1.0, num_samples=4, seed=123)
    b = engine.generate(prompts, 6, temperature=1.0, num_samples=4, seed=123)
    assert a.tokens == b.tokens  # seeded
    assert len({tuple(t) for t in a.tokens[:4]}) > 1  # samples of one prompt differ


def test_sampling_stays_in_one_row_of_the_batch():
    # Sampling several rows at once must match each row's own forward (no cross-row leakage).
    model = tiny_model("alternating")
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    res = Engine(model).generate(prompts, 5, temperature=0.8, top_k=5, seed=0)
    with torch.no_grad():
        for p, toks in zip(prompts, res.tokens):
            seq = torch.tensor([p + toks])
            top5 = model(seq)[0, len(p) - 1:-1].topk(5, dim=-1).indices
            assert all(t in row.tolist() for t, row in zip(toks, top5))


def test_query_hook_injects_tokens():
    model = tiny_model()
    prompt = [2, 4, 6, 8]
    injection = [50, 51, 52, 53, 54, 55, 56, 57, 58, 59]

    def inject(out):
        return injection if len(out) == 3 else None

    res = Engine(model, prefill_chunk=4).generate(
        [prompt], 6, temperature=0, query_hook=lambda seq, out: inject(out), extra_len=len(injection))
    assert res.tokens == [naive_greedy(model, prompt, 6, inject=inject)]
    assert res.generated_tokens == 6  # injected tokens are not counted as generated


def test_sample_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, temperature=0).item() == 0
    draws = [sample(logits, top_k=2, generator=gen).item() for _ in range(200)]
    assert set(draws) == {0, 1}
    draws = [sample(logits, top_p=0.7, generator=gen).item() for _ in range(200)]
    assert set(draws) == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    draws = [sample(logits, top_p=0.4, generator=gen).item() for _ in range(50)]
    assert set(draws) == {0}


def test_cache_sizes_and_overflow():
    attn, hybrid, mamba = (tiny_model(p, dtype=torch.float32) for p in ("all_attention", "jamba", "all_mamba"))
    sizes = {name: m.allocate_cache(1, 1024).nbytes() for name, m in
             (("attn", attn), ("hybrid", hybrid), ("mamba", mamba))}
    assert sizes["mamba"] < sizes["hybrid"] < sizes["attn"]
    # Mamba state does not grow with the context; a KV cache does.
    assert mamba.allocate_cache(1, 8192).nbytes() == sizes["mamba"]
    cache = attn.allocate_cache(1, 8)
    with torch.no_grad():
        attn(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="max_len=8"):
            attn(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_empty_prompt_rejected():
    with pytest.raises(ValueError, match="at least one token"):
        Engine(tiny_model()).generate([[1, 2], []], 3)


def test_last_only_logits_equal_the_last_position_of_a_full_forward():
    model = tiny_model()
    tokens = torch.randint(0, model.vocab_size, (2, 13))
    full = model(tokens)
    last = model(tokens, last_only=True)
    assert last.shape == (2, 1, model.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-12, atol=1e-12)


# ---- 1-2 layer models against a plain full-forward greedy loop -----------------------------------

@pytest.mark.parametrize("pattern", ["MA", "MM"])
def test_staggered_prompts_greedy_equal_a_full_forward_loop(pattern):
    """Prompts of lengths 11, 2, 6 in one group (shared prefill of 1 token, then each row feeds its own
    prompt while the shorter ones sample) and one group per prompt, chunks of 4: the tokens of a plain
    full-forward greedy loop."""
    model = tiny_lm(pattern)
    prompts = [[1, 5, 9, 3, 7, 2, 8, 4, 6, 10, 11], [4, 2], [7, 7, 7, 1, 2, 3]]
    expected = [naive_greedy(model, p, 7) for p in prompts]
    for spread in (100, 0):
        res = Engine(model, prefill_chunk=4, max_length_spread=spread).generate(prompts, 7, temperature=0)
        assert res.tokens == expected, spread
        assert res.finish_reasons == ["length"] * 3 and res.generated_tokens == 21


def test_suppressed_tokens_are_never_the_first_and_only_the_first_token_sampled():
    """Staggered prompts (each row samples its first token at a different step) with each row's own
    greedy first token and one of its later tokens suppressed: each row starts with the best other
    first token, then continues as a plain full-forward greedy loop from there, the suppressed tokens
    allowed again."""
    model = tiny_lm("MA")
    prompts = [[1, 5, 9, 3, 7, 2, 8, 4, 6, 10, 11], [4, 2], [7, 7, 7, 1, 2, 3]]
    plain = [naive_greedy(model, p, 7) for p in prompts]
    suppressed = sorted({t[0] for t in plain} | {plain[0][3]})
    expected = []
    with torch.no_grad():
        for p in prompts:
            logits = model(torch.tensor([p]))[0, -1].clone()
            logits[suppressed] = -float("inf")
            first = int(logits.argmax())
            expected.append([first] + naive_greedy(model, p + [first], 6))
    assert all(e[0] not in suppressed for e in expected) and expected != plain
    res = Engine(model, prefill_chunk=4).generate(prompts, 7, temperature=0, begin_suppress_tokens=suppressed)
    assert res.tokens == expected


def test_a_closing_token_is_sampled_only_after_its_opening():
    """paired_tokens=(opening, closing): staggered prompts, each row against a plain greedy loop that
    rules the closing token out until the row has sampled an opening one (conftest.naive_greedy)."""
    model = tiny_lm("MA")
    prompts = [[1, 5, 9, 3, 7, 2, 8, 4, 6, 10, 11], [4, 2], [7, 7, 7, 1, 2, 3]]
    plain = [naive_greedy(model, p, 8) for p in prompts]
    unused = next(t for t in range(TINY_VOCAB) if all(t not in row for row in plain))
    # never opened: the closing token (row 0's third) never sampled, and row 0 goes another way
    shut = (unused, plain[0][2])
    expected = [naive_greedy(model, p, 8, pair=shut) for p in prompts]
    assert expected[0] != plain[0] and all(shut[1] not in row for row in expected)
    assert Engine(model, prefill_chunk=4).generate(prompts, 8, temperature=0, paired_tokens=shut).tokens == expected
    # opened by the row's first token: the closing token allowed after it, as plain greedy has it
    opened = (plain[0][0], plain[0][2])
    assert opened[0] != opened[1] and naive_greedy(model, prompts[0], 8, pair=opened) == plain[0]
    expected = [naive_greedy(model, p, 8, pair=opened) for p in prompts]
    assert Engine(model, prefill_chunk=4).generate(prompts, 8, temperature=0, paired_tokens=opened).tokens == expected
    assert Engine(model, prefill_chunk=4).generate(prompts, 8, temperature=0).tokens == plain


def test_opened_is_whether_the_latest_of_the_pair_is_the_opening_token():
    pair = (5, 6)
    assert not opened([], pair) and not opened([1, 2, 3], pair)   # neither sampled yet
    assert opened([5], pair) and opened([6, 1, 5, 2], pair)       # the latest of the two is 5
    assert not opened([5, 1, 6], pair) and not opened([6], pair)  # the latest is 6: closed (or never opened)
    assert opened([5, 6, 5, 6, 5, 1], pair) and not opened([5, 6, 5, 6], pair)


def test_close_only_opened_rules_the_closing_token_out_in_a_copy_of_the_rows_not_opened():
    """Three rows: the first opened, the second closed, the third never opened: the closing token (2)
    is -inf in the last two rows of a copy; every other logit as given; the input untouched. No pair,
    or every row opened: the very logits given, no copy."""
    logits = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    given = logits.clone()
    out = close_only_opened(logits, [[1, 3], [1, 2], []], (1, 2))
    inf = float("inf")
    assert torch.equal(out, torch.tensor([[0.0, 1, 2, 3], [4, 5, -inf, 7], [8, 9, -inf, 11]]))
    assert torch.equal(logits, given) and out is not logits
    assert close_only_opened(logits, [[], [2], [0]], None) is logits
    assert close_only_opened(logits, [[1], [2, 1], [1, 0]], (1, 2)) is logits


def test_stop_token_ends_its_row_only_and_streams_every_sampled_token():
    """Three rows; the stop token is one the first row's greedy continuation reaches and the others'
    do not: that row ends "stop" before it (the stop token is neither returned nor streamed) and the
    rows after it in the batch go on to max_new_tokens."""
    model = tiny_lm()
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
    model = tiny_lm()
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
    model = tiny_lm()
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
    model = tiny_lm("A")
    fed, head = record_forwards(model)
    prompt = [(7 * i) % TINY_VOCAB for i in range(600)]
    Engine(model).generate([prompt], 1, temperature=0)
    assert fed == [512, 87, 1]  # 599 prefilled in chunks of 512, then the last prompt token
    assert Engine(None)._groups([1, 65, 66]) == [[0, 1], [2]]  # 65 - 1 <= 64 < 66 - 1


def test_query_hook_gets_the_sequence_index_of_the_row():
    """The hook injects only into sequence 1: that row equals a greedy loop with the injection, the
    other one a loop without."""
    model = tiny_lm()
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
    model = tiny_lm()
    prompts = [[1, 5, 9, 3, 7, 2, 8, 4, 6], [4, 2, 9, 1, 1, 3, 5]]  # a shared prefill of 4 + 2 tokens
    expected = [naive_greedy(model, p, 5) for p in prompts]
    with torch.device("meta"):
        res = Engine(model, prefill_chunk=4).generate(prompts, 5, temperature=0, num_samples=2)
    assert res.tokens == [expected[0]] * 2 + [expected[1]] * 2


# ---- sampling, grouping, counts and times by hand ------------------------------------------------

def small_lm(pattern="AM", seed=0):
    """2 layers, float64, every weight perturbed (zero-initialised projections would make blocks identities)."""
    torch.manual_seed(seed)
    model = HybridLM(dataclasses.replace(TOY_MODEL, block_pattern=pattern, sequence_len=64), vocab_size=TOY_VOCAB)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.double().eval()


def test_sampling_follows_softmax_of_logits_over_temperature():
    """Frequencies of 20000 draws (one row each) against softmax(logits / T) computed by hand:
    T = 0.5 squares the probabilities, T = 2 takes their square root (mutant: logits * T)."""
    from hybridchat.model.engine import sample

    p = [0.5, 0.3, 0.15, 0.05]
    logits = torch.log(torch.tensor([p])).expand(20000, -1)
    gen = torch.Generator().manual_seed(0)
    for temperature, power in ((0.5, 2.0), (2.0, 0.5)):
        draws = sample(logits, temperature=temperature, generator=gen)
        expected = [q ** power / sum(r ** power for r in p) for q in p]
        freq = torch.bincount(draws, minlength=4).double() / len(draws)
        assert freq.tolist() == pytest.approx(expected, abs=0.015), temperature


def test_top_p_keeps_the_tokens_before_the_mass_is_reached():
    """Probabilities 1/2, 1/4, 1/8, 1/8 (exact in binary): top_p = 0.75 keeps the first two (the
    first two already reach 0.75, so the third is dropped: >=, not >); top_p = 1 keeps all four."""
    from hybridchat.model.engine import sample

    logits = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]])).expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, top_p=0.75, generator=gen).tolist()) == {1, 3}
    assert set(sample(logits, top_p=1.0, generator=gen).tolist()) == {0, 1, 2, 3}
    assert set(sample(logits, top_k=4, generator=gen).tolist()) == {0, 1, 2, 3}


def test_generation_result_counts_and_rate():
    from hybridchat.model.engine import GenerationResult

    assert GenerationResult([[1]], ["stop"], generated_tokens=12, decode_seconds=4.0).tokens_per_second == 3.0
    assert GenerationResult([[1]], ["stop"], generated_tokens=12).tokens_per_second == 0.0


def test_prompts_are_grouped_by_length_spread_and_batch_size():
    """Hand grouping of lengths [5, 1, 2, 9, 3, 4] with spread 2 and at most 2 per batch: in length
    order, a prompt opens a new group when it is more than 2 longer than the group's first or the
    group is full."""
    from hybridchat.model.engine import Engine

    engine = Engine(None, max_length_spread=2, max_batch_size=2)
    assert engine._groups([5, 1, 2, 9, 3, 4]) == [[1, 2], [4, 5], [0], [3]]
    assert Engine(None, max_length_spread=2)._groups([5, 1, 2, 9, 3, 4]) == [[1, 2, 4], [5, 0], [3]]
    assert Engine(None, max_length_spread=0)._groups([3, 3, 4]) == [[0, 1], [2]]


def test_engine_reports_prompt_tokens_cache_size_and_times_and_restores_training_mode(monkeypatch):
    """Counts by hand: prompt tokens, the largest cache (a group's rows x samples, room for the longest
    prompt + new tokens + extra_len), seconds from a fake clock that ticks 1 per reading (prefill and
    decode once per group); the model's training flag is put back."""
    import types

    from hybridchat.model import engine as engine_module
    from hybridchat.model.engine import Engine

    ticks = iter(range(1000))
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    model = small_lm()
    model.train()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
    res = Engine(model, max_length_spread=0).generate(prompts, 4, temperature=0, num_samples=2, extra_len=3)
    assert model.training
    assert res.prompt_tokens == 12 and res.generated_tokens == 3 * 2 * 4
    assert res.prefill_seconds == 3.0 and res.decode_seconds == 3.0  # three groups
    biggest = model.allocate_cache(1, 8 + 4 + 3).nbytes() * 2
    assert res.cache_bytes == biggest


def test_generation_without_a_seed_differs_between_calls_and_with_one_repeats():
    from hybridchat.model.engine import Engine

    model = small_lm()
    engine = Engine(model)
    runs = [engine.generate([[1, 2]], 24, temperature=1.0).tokens for _ in range(2)]
    assert runs[0] != runs[1]
    assert engine.generate([[1, 2]], 24, seed=5).tokens == engine.generate([[1, 2]], 24, seed=5).tokens


def test_no_prompts_is_an_error_and_a_full_cache_ends_a_row_with_length():
    """A hook that injects more tokens than extra_len left room for: the row stops when the attention
    cache is full, finish reason "length", having sampled fewer than max_new_tokens."""
    from hybridchat.model.engine import Engine

    with pytest.raises(ValueError, match="at least one token"):
        Engine(small_lm()).generate([], 3)
    model = small_lm("AA")
    res = Engine(model).generate([[1, 2, 3]], 6, temperature=0, extra_len=2,
                                 query_hook=lambda seq, out: [7, 7, 7, 7] if len(out) == 1 else None)
    assert res.finish_reasons == ["length"]
    assert res.tokens[0][1:5] == [7, 7, 7, 7] and res.generated_tokens < 6


def test_generation_under_autocast_keeps_the_cache_in_the_autocast_dtype():
    from hybridchat.model.engine import Engine

    model = small_lm().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = Engine(model).generate([[1, 2, 3]], 2, temperature=0)
    assert res.cache_bytes == model.allocate_cache(1, 5, dtype=torch.bfloat16).nbytes()


# ---- the inference cache (model/cache.py) by hand and against full forwards ----------------------

def test_cache_sizes_batch_size_and_kv_overflow_message_by_hand():
    """Per layer: attention holds K and V of (batch, n_kv_head, max_len, head_dim); Mamba its conv
    inputs (batch, conv_dim, d_conv) in the activation dtype and its state (batch, nheads, headdim,
    d_state) in float32 at least. Sizes by hand for float64 and bfloat16 caches."""
    model = tiny_lm("MA")  # n_embd 32, 4 heads of 8, 2 KV heads; Mamba: d_inner 64, 4 heads of 16, d_state 8
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
    cache = tiny_lm("A").allocate_cache(1, 8)
    with torch.no_grad():
        tiny_lm("A")(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError) as e:
            tiny_lm("A")(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert str(e.value) == ("KV cache is full: 6 cached + 3 new tokens > max_len=8; allocate the cache with a "
                            "larger max_len")


def test_kv_cache_holds_every_key_and_value_at_its_position():
    """update_kv writes the new keys and values at [pos, pos + T) and returns [0, pos + T)."""
    cache = InferenceCache.allocate([tiny_lm("A").blocks[0].mixer], 2, 6, dtype=torch.float64)
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
    model = tiny_lm("MA")
    seqs = torch.randint(0, TINY_VOCAB, (3, 6), generator=torch.Generator().manual_seed(5))
    nxt = torch.randint(0, TINY_VOCAB, (6, 1), generator=torch.Generator().manual_seed(6))

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


def _plain_logp(model, prompt: list[int], continuation: list[int]) -> float:
    """log P(continuation | prompt) from one full forward over both, log-softmax by hand."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + continuation]))[0, len(prompt) - 1:-1].double()
    logp = logits - logits.logsumexp(-1, keepdim=True)
    return float(logp[torch.arange(len(continuation)), continuation].sum())


@pytest.mark.parametrize("pattern", ["MA", "MM", "AA"])
def test_a_continuation_is_scored_from_each_prompts_own_prefill(pattern):
    """score=: each row's log P(continuation | prompt) is a full forward's over prompt + continuation,
    read when the row's prompt has been fed (staggered prompts: each row at another step, two of one
    length at the same step; one group and one group per prompt), the scoring on a copy, so the greedy replies are those of a plain
    full-forward loop; admit refuses a row there: no token sampled or streamed for it, the others
    unchanged. Every token fed is counted: each prompt once, the continuation but its last token once
    per row, then the tokens sampled and fed back (no second pass over a prompt)."""
    model = tiny_lm(pattern)
    prompts = [[1, 5, 9, 3, 7, 2, 8, 4, 6, 10, 11], [4, 2], [7, 7, 7, 1, 2, 3], [2, 9, 4, 4, 8, 1]]
    continuation = [3, 9, 1, 4]
    want = [_plain_logp(model, p, continuation) for p in prompts]
    expected = [naive_greedy(model, p, 5) for p in prompts]
    fed = []
    model.register_forward_hook(lambda module, args, out: fed.append(args[0].numel()))
    for spread in (100, 0):
        fed.clear()
        res = Engine(model, prefill_chunk=4, max_length_spread=spread).generate(prompts, 5, temperature=0,
                                                                               score=continuation)
        assert res.scores == pytest.approx(want, rel=1e-9) and res.tokens == expected, spread
        # each row feeds back all its 5 tokens but the last
        assert sum(fed) == sum(map(len, prompts)) + 4 * (len(continuation) - 1) + 4 * 4, spread
    low, next_low = sorted(want)[:2]
    streamed = []
    res = Engine(model, prefill_chunk=4).generate(prompts, 5, temperature=0, score=continuation,
                                                  admit=lambda i, logp: logp > (low + next_low) / 2,
                                                  on_token=lambda seq, tok: streamed.append(seq))
    refused = want.index(min(want))
    assert res.finish_reasons == ["refused" if i == refused else "length" for i in range(4)]
    assert res.tokens == [[] if i == refused else e for i, e in enumerate(expected)]
    assert refused not in streamed and res.scores == pytest.approx(want, rel=1e-9)
    scoring = Engine(model).generate(prompts, 1, temperature=0, score=continuation, admit=lambda i, s: False)
    assert scoring.tokens == [[]] * 4 and scoring.scores == pytest.approx(want, rel=1e-9)
    # admit is told which prompt a row is (rows are prefilled grouped by length, not in prompt order),
    # each of its samples apart
    told = []
    by_prompt = Engine(model, prefill_chunk=4).generate(prompts, 2, temperature=0, score=continuation, num_samples=2,
                                                        admit=lambda i, logp: told.append((i, logp)) or i != 2)
    assert by_prompt.finish_reasons == ["refused" if seq // 2 == 2 else "length" for seq in range(8)]
    assert sorted(i for i, _ in told) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(logp == pytest.approx(want[i], rel=1e-9) for i, logp in told)


def test_a_two_token_continuation_and_suppression_under_a_meta_default_device_and_bf16_logits_in_float32():
    """A continuation of 2 tokens (its second read from the one forward on the cache copy) after
    staggered prompts, under `with torch.device("meta")` (every tensor made without a device would land
    there): a full forward's log-probabilities. bf16 logits are scored in float32: log_softmax of
    [0, -12, 3] at -12 is -15 - log(1 + e^-3 + e^-15), not bf16's rounding of it."""
    model = tiny_lm("MA")
    prompts = [[1, 5, 9, 3, 7, 2], [4, 2]]
    continuation = [3, 9]
    want = [_plain_logp(model, p, continuation) for p in prompts]
    expected = [naive_greedy(model, p, 3) for p in prompts]
    unused = next(t for t in range(TINY_VOCAB) if t not in {expected[0][0], expected[1][0]})
    with torch.device("meta"):  # a first token ruled out that greedy would not take anyway
        res = Engine(model, prefill_chunk=4).generate(prompts, 3, temperature=0, score=continuation,
                                                      begin_suppress_tokens=[unused])
    assert res.scores == pytest.approx(want, rel=1e-9)
    assert res.tokens == expected
    logits = torch.tensor([[0.0, -12.0, 3.0]], dtype=torch.bfloat16)
    exact = -15 - math.log(1 + math.exp(-3) + math.exp(-15))
    assert score_continuation(None, logits, None, [1]) == [pytest.approx(exact, abs=1e-6)]
