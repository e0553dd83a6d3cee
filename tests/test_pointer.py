"""Copy from context (model.pointer): the mixture equals a plain per-position loop over the formula;
cached decoding and the engine equal a full forward; with the gate shut it is the plain model; a
pointer model learns to copy tokens it has never seen where the same model without it cannot;
checkpoints record the option."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import naive_greedy, random_model

from hybridchat.core.errors import UserError
from hybridchat.infra import checkpoint
from hybridchat.infra.config import StageConfig
from hybridchat.model.engine import DecodeBatch, Engine
from hybridchat.model.lm import HybridLM
from hybridchat.training.loop import build_optimizers
from hybridchat.training.runs import load_run

VOCAB = 61


def pointer_model(pattern: str = "alternating", pointer: bool = True, seed: int = 0, perturb: float = 0.3,
                  dtype=torch.float64) -> HybridLM:
    return random_model(pattern, 4, VOCAB, dtype, seed, perturb, pointer=pointer)


def reference_log_probs(model: HybridLM, idx: torch.Tensor) -> torch.Tensor:
    """The mixture written out position by position from the final hidden states."""
    hidden = {}
    handle = model.norm_f.register_forward_hook(lambda m, a, out: hidden.update(h=out))
    with torch.no_grad():
        model(idx)
    handle.remove()
    h = hidden["h"]
    p = model.pointer
    B, T = idx.shape
    out = torch.empty(B, T, VOCAB, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            vocab = torch.softmax(model.lm_head(h[b, t]), -1)
            q = p.c_q(h[b, t])
            scores = torch.stack([q @ p.c_k(h[b, j]) / math.sqrt(q.numel()) for j in range(t + 1)])
            weights = torch.softmax(scores, 0)
            copy = torch.zeros(VOCAB, dtype=torch.float64)
            for j in range(t + 1):
                copy[idx[b, j]] += weights[j]
            g = torch.sigmoid(p.c_gate(h[b, t]))[0]
            out[b, t] = ((1 - g) * vocab + g * copy).log()
    return out


def test_mixture_equals_the_formula_position_by_position():
    model = pointer_model()
    # Repeats, so copying has several occurrences of a token to sum over.
    idx = torch.tensor([[3, 7, 3, 9, 7, 7, 1, 3, 5, 2], [4, 4, 8, 1, 8, 2, 4, 6, 6, 0]])
    ref = reference_log_probs(model, idx)
    with torch.no_grad():
        got = model(idx)
        targets = torch.tensor([[7, 3, 9, 7, 7, 1, 3, 5, 2, 11], [4, 8, 1, -1, 2, 4, 6, 6, 0, 4]])
        nll = model(idx, targets, reduction="none").view(2, -1)
        mean = model(idx, targets)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    want = -ref.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets >= 0)
    torch.testing.assert_close(nll, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mean, want.sum() / (targets >= 0).sum(), rtol=1e-9, atol=1e-9)


def test_shut_gate_is_the_plain_model():
    with_pointer, plain = pointer_model(), pointer_model(pointer=False)
    plain.load_state_dict({k: v for k, v in with_pointer.state_dict().items() if not k.startswith("pointer.")})
    with torch.no_grad():
        with_pointer.pointer.c_gate.weight.zero_()
        with_pointer.pointer.c_gate.bias.fill_(-80.0)
    idx = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(with_pointer(idx), plain(idx).log_softmax(-1), rtol=1e-9, atol=1e-9)
        # The plain path takes its cross-entropy in float32.
        torch.testing.assert_close(with_pointer(idx, targets), plain(idx, targets).double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pattern", ["all_attention", "all_mamba", "alternating"])
def test_cached_decoding_equals_full_forward(pattern):
    model = pointer_model(pattern)
    idx = torch.randint(0, 12, (2, 40), generator=torch.Generator().manual_seed(1))  # 12 ids: many repeats
    with torch.no_grad():
        full = model(idx)
        cache = model.allocate_cache(2, 40)
        parts = [model(idx[:, :13], cache=cache), model(idx[:, 13:29], cache=cache)]  # chunked prefill
        parts += [model(idx[:, t:t + 1], cache=cache) for t in range(29, 40)]  # decode
        last = model.allocate_cache(2, 40)
        only_last = model(idx, cache=last, last_only=True)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(only_last, full[:, -1:], rtol=1e-9, atol=1e-9)


def test_engine_greedy_and_samples_equal_naive_generation():
    model = pointer_model("jamba")
    prompts = [[1, 5, 9, 3, 7, 2, 8, 4, 6, 10, 11], [4, 2], [7, 7, 7, 1, 2, 3]]
    res = Engine(model, prefill_chunk=4).generate(prompts, 9, temperature=0)
    for p, toks in zip(prompts, res.tokens):
        assert toks == naive_greedy(model, p, 9)
    # Several samples per prompt expand the pointer's cache with the layers' (rows stay apart).
    sampled = Engine(model).generate(prompts[:1], 5, temperature=0, num_samples=3)
    assert sampled.tokens == [naive_greedy(model, prompts[0], 5)] * 3


def _copy_batch(gen: torch.Generator, rows: int = 16, half: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens, a separator (0), the same tokens again; loss on the repeat only."""
    first = torch.randint(1, VOCAB, (rows, half), generator=gen)
    seq = torch.cat([first, torch.zeros(rows, 1, dtype=torch.long), first], 1)
    targets = seq[:, 1:].clone()
    targets[:, :half] = -1
    return seq[:, :-1], targets


def test_pointer_learns_to_copy_what_the_plain_model_cannot_in_the_same_steps():
    losses = {}
    for pointer in (True, False):
        model = pointer_model("alternating", pointer=pointer, perturb=0.0, dtype=torch.float32).train()
        optimizers = build_optimizers(model, StageConfig(matrix_lr=0.02, embedding_lr=0.01, unembedding_lr=0.004,
                                                         scalar_lr=0.01))
        gen = torch.Generator().manual_seed(0)
        for _ in range(60):
            loss = model(*_copy_batch(gen))
            loss.backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        with torch.no_grad():
            losses[pointer] = model(*_copy_batch(torch.Generator().manual_seed(99), rows=64)).item()
    assert losses[True] < 0.5 < math.log(VOCAB) - 0.5 < losses[False], losses


def test_checkpoint_records_the_pointer(tmp_path):
    from hybridchat.data.tokenizer import Tokenizer

    model = pointer_model(dtype=torch.float32)
    tok = Tokenizer.train(["hello world"] * 20, vocab_size=300)
    checkpoint.save(tmp_path, 1, model, [], {"config": {"model": {**vars(model.config)}}}, keep=1, tokenizer=tok)
    saved = checkpoint.latest(tmp_path)
    assert checkpoint.read_meta(saved)["architecture"]["pointer"] is True
    plain = pointer_model(pointer=False, dtype=torch.float32)
    with pytest.raises(UserError, match="pointer: checkpoint True vs config False"):
        checkpoint.load(saved, plain)
    loaded = load_run(saved).model
    assert loaded.pointer is not None
    idx = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))
    assert F.softmax(loaded(idx), -1).sum(-1).sub(1).abs().max() < 1e-4  # log-probabilities: rows sum to 1


# ---------------------------------------------------------------------------------------------
# The Pointer module alone (mutation testing): its start, its cache, its dtypes.


def test_init_draws_uniform_query_and_key_weights_and_starts_mostly_generating():
    from hybridchat.model.pointer import Pointer

    torch.manual_seed(0)
    pointer = Pointer(d_model=48, head_dim=16)
    pointer.init_weights()
    bound = math.sqrt(3.0 / 48)  # the variance of a unit-variance input's dot product: 1 / d_model
    for weight in (pointer.c_q.weight, pointer.c_k.weight):
        assert weight.shape == (16, 48)
        assert weight.abs().max() <= bound and weight.abs().max() > 0.97 * bound  # 768 draws reach the edge
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.08)
    assert not torch.equal(pointer.c_q.weight, pointer.c_k.weight)
    assert torch.equal(pointer.c_gate.weight, torch.zeros(1, 48))
    assert pointer.c_gate.bias.tolist() == [-2.0]  # g = sigmoid(-2) = 0.12 for every input


def _pointer(d_model: int = 12, head_dim: int = 4, dtype=torch.float64):
    from hybridchat.model.pointer import Pointer

    torch.manual_seed(1)
    pointer = Pointer(d_model, head_dim)
    pointer.init_weights()
    with torch.no_grad():
        pointer.c_gate.weight.normal_()  # a gate that depends on the position
    return pointer.to(dtype)


def test_the_cache_holds_exactly_max_len_tokens_and_refuses_one_more():
    pointer = _pointer()
    cache = pointer.allocate_cache(2, 5, torch.device("cpu"), torch.float64)
    assert cache.keys.shape == (2, 5, 4) and cache.keys.dtype == torch.float64
    assert cache.ids.shape == (2, 5) and cache.ids.dtype == torch.long
    assert not cache.keys.any() and not cache.ids.any()
    h = torch.randn(2, 5, 12, dtype=torch.float64)
    idx = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    logits = torch.randn(2, 5, 10, dtype=torch.float64)
    pointer.log_probs(h[:, :3], logits[:, :3], idx[:, :3], cache, 0)
    pointer.log_probs(h[:, 3:], logits[:, 3:], idx[:, 3:], cache, 3)  # 3 + 2 = 5: full, not over
    assert torch.equal(cache.ids, idx)
    torch.testing.assert_close(cache.keys, pointer.c_k(h))
    with pytest.raises(ValueError, match=r"^pointer cache is full: 4 cached \+ 2 new tokens > max_len=5$"):
        pointer.log_probs(h[:, :2], logits[:, :2], idx[:, :2], cache, 4)
    bf16 = pointer.allocate_cache(1, 3, torch.device("cpu"), torch.bfloat16)
    assert bf16.keys.dtype == torch.bfloat16 and bf16.ids.dtype == torch.long  # ids stay exact
    with torch.device("meta"):  # on the device asked for, whatever the default
        elsewhere = pointer.allocate_cache(1, 3, torch.device("cpu"), torch.float32)
    assert elsewhere.keys.device == elsewhere.ids.device == torch.device("cpu")


@pytest.mark.parametrize("dtype, wide", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                         (torch.float64, torch.float64)])
def test_probabilities_are_at_least_float32_and_float64_is_kept(dtype, wide):
    pointer = _pointer(dtype=dtype)
    h = torch.randn(1, 6, 12).to(dtype)
    idx = torch.tensor([[1, 2, 1, 3, 2, 1]])
    logits = torch.randn(1, 6, 5).to(dtype)
    with torch.no_grad():
        log_p = pointer.log_probs(h, logits, idx)
        nll = pointer.nll(h, logits, idx, torch.tensor([[2, 1, 3, 2, 1, -1]]))
    assert log_p.dtype == wide and nll.dtype == wide
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(1, 6, dtype=wide), rtol=0, atol=1e-2)


def test_a_target_absent_from_the_context_costs_its_vocabulary_share_and_gives_finite_gradients():
    """Copy probability 0: the mixture is (1 - g) p_vocab + g * 1e-30 (the clamp), by hand, and its
    gradient is finite (log 0 would make it NaN)."""
    pointer = _pointer()
    h = torch.randn(1, 3, 12, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[1, 2, 1]])
    logits = torch.zeros(1, 3, 6, dtype=torch.float64)
    logits[0, :, 5] = -1000.0  # token 5: no vocabulary share either, so only the clamp is left
    targets = torch.tensor([[4, 5, 2]])
    nll = pointer.nll(h, logits, idx, targets)
    g = torch.sigmoid(pointer.c_gate(h)).squeeze(-1)[0].detach()
    assert nll[0, 0].item() == pytest.approx(-math.log((1 - g[0]) / 5 + g[0] * 1e-30), rel=1e-12)
    assert nll[0, 1].item() == pytest.approx(-math.log(g[1] * 1e-30), rel=1e-12)
    nll.sum().backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def _plain_mixture(pointer, h: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log((1 - g) softmax(logits) + g copy) position by position for a bare pointer (one row)."""
    T, V = logits.shape[1:]
    out = torch.empty(T, V, dtype=torch.float64)
    for t in range(T):
        q = pointer.c_q(h[0, t])
        scores = torch.stack([q @ pointer.c_k(h[0, j]) / math.sqrt(q.numel()) for j in range(t + 1)])
        weights = torch.softmax(scores, 0)
        copy = torch.zeros(V, dtype=torch.float64)
        for j in range(t + 1):
            copy[idx[0, j]] += weights[j]
        g = torch.sigmoid(pointer.c_gate(h[0, t]))[0]
        out[t] = ((1 - g) * torch.softmax(logits[0, t], -1) + g * copy).log()
    return out


def test_a_cache_without_a_position_is_filled_from_0_and_torchs_default_device_is_not_used():
    pointer = _pointer()
    torch.manual_seed(2)
    h = torch.randn(1, 4, 12, dtype=torch.float64)
    idx = torch.tensor([[3, 1, 3, 2]])
    logits = torch.randn(1, 4, 7, dtype=torch.float64)
    with torch.no_grad():
        want = _plain_mixture(pointer, h, logits, idx)
        cache = pointer.allocate_cache(1, 6, torch.device("cpu"), torch.float64)
        torch.testing.assert_close(pointer.log_probs(h, logits, idx, cache)[0], want, rtol=1e-9, atol=1e-9)
        assert cache.ids[0].tolist() == [3, 1, 3, 2, 0, 0]
        with torch.device("meta"):  # tensors made without a device would land there
            elsewhere = pointer.log_probs(h, logits, idx)
    assert elsewhere.device == torch.device("cpu")
    torch.testing.assert_close(elsewhere[0], want, rtol=1e-9, atol=1e-9)


def test_a_continuous_batch_of_prompts_of_other_lengths_equals_naive_generation():
    """A DecodeBatch decodes its rows through a ragged cache (each row's own length): the pointer
    attends to each row's own tokens only, as a full forward over that row alone does. Then with
    the gate open and the queries zero (the copy distribution uniform over the tokens attended to),
    attention on the positions past a shorter row's end (id 0) would take over its tokens."""
    model = pointer_model("jamba")
    prompts = [[1, 5, 9, 3, 7, 2, 8, 4, 6], [4, 2], [7, 7, 7, 1]]
    for _ in range(2):
        batch = DecodeBatch(model)
        seqs = [batch.add(p, 7) for p in prompts]
        while len(batch):
            batch.step()
        assert [s.tokens for s in seqs] == [naive_greedy(model, p, 7) for p in prompts]
        with torch.no_grad():
            model.pointer.c_gate.bias.fill_(4.0)
            model.pointer.c_q.weight.zero_()
    assert 0 not in [t for s in seqs for t in s.tokens]


def test_the_pointer_is_the_formulas_parameters_only():
    """q = W_q h and k = W_k h without a bias; the gate w_g . h + b has one."""
    from hybridchat.model.pointer import Pointer

    shapes = {name: tuple(p.shape) for name, p in Pointer(d_model=12, head_dim=4).named_parameters()}
    assert shapes == {"c_q.weight": (4, 12), "c_k.weight": (4, 12), "c_gate.weight": (1, 12), "c_gate.bias": (1,)}
