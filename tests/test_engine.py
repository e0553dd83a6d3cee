"""Inference cache and generation engine: cached decoding equals a full forward for every block
pattern, batching of prompts of different lengths, sampling options, stop tokens, streaming,
several samples per prompt, query hook."""

import pytest
import torch
from conftest import naive_greedy, random_model

from hybridchat.model.engine import Engine, sample
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
