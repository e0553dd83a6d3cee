"""Mamba-2 mixer: the chunked scan against the token recurrence, gradients, cached decoding,
parameter layout (mamba_ssm compatible), init, backends."""

import math
import sys

import pytest
import torch
from conftest import TINY_VOCAB, tiny_lm

import hybridchat.model.mamba as mamba_mod
from hybridchat.core.errors import UserError
from hybridchat.model.cache import InferenceCache
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM
from hybridchat.model.mamba import Mamba2, cuda_kernels_available, ssd_chunked, ssd_recurrent


def scan_inputs(b=2, l=37, h=4, p=3, g=2, n=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = torch.rand(b, l, h, generator=gen, dtype=dtype) * 0.5 + 0.01
    A = -torch.rand(h, generator=gen, dtype=dtype) * 3 - 0.1
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    state = torch.randn(b, h, p, n, generator=gen, dtype=dtype)
    return x, dt, A, B, C, state


def randomize(module: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> None:
    """Perturb every weight so no zero-initialised projection hides a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrence(chunk_size, with_state):
    x, dt, A, B, C, state = scan_inputs()  # l=37: not a multiple of any chunk size above but 1
    init = state if with_state else None
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, initial_state=init)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size, initial_state=init)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_chunked_over_several_segments(monkeypatch):
    # Force the CPU segmenting to cut the sequence into many pieces (segment = 2 chunks here).
    monkeypatch.setattr(mamba_mod, "CPU_SEGMENT_ELEMENTS", 2 * 4 * 4 * 4 * 2)
    x, dt, A, B, C, state = scan_inputs(l=29)
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, initial_state=state)
    y, s = ssd_chunked(x, dt, A, B, C, 4, initial_state=state)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_chunked_splits_compose():
    # Scanning [0, k) and then [k, l) from the carried state equals one scan: what chunked prefill relies on.
    x, dt, A, B, C, _ = scan_inputs(l=40)
    y_full, s_full = ssd_chunked(x, dt, A, B, C, 8)
    y1, s1 = ssd_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 8)
    y2, s2 = ssd_chunked(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-10)


def test_gradcheck_chunked(monkeypatch):
    monkeypatch.setattr(mamba_mod, "CPU_SEGMENT_ELEMENTS", 1)  # one chunk per segment: the loop path too
    x, dt, A, B, C, state = scan_inputs(b=1, l=7, h=2, p=2, g=1, n=3)
    inputs = tuple(t.requires_grad_() for t in (x, dt, A, B, C, state))

    def fn(x, dt, A, B, C, state):
        return ssd_chunked(x, dt, A, B, C, 3, initial_state=state)

    assert torch.autograd.gradcheck(fn, inputs)


def test_chunked_gradients_equal_recurrence_gradients():
    x, dt, A, B, C, state = scan_inputs(l=21)
    weights = torch.randn(2, 21, 4, 3, dtype=torch.float64)
    grads = []
    for scan in (ssd_recurrent, ssd_chunked):
        inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C, state)]
        y, s = scan(*inputs[:5], 8, initial_state=inputs[5])
        ((y * weights).sum() + s.sum()).backward()
        grads.append([t.grad for t in inputs])
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_chunked_bfloat16_close_to_float32():
    x, dt, A, B, C, state = scan_inputs(dtype=torch.float32, l=64)
    y32, _ = ssd_chunked(x, dt, A, B, C, 16, initial_state=state)
    y16, s16 = ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 16, initial_state=state)
    assert y16.dtype == torch.bfloat16 and s16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() < 0.05 * y32.abs().max()


def make_mixer(dtype=torch.float64, **kw):
    kw = {"d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8, "backend": "torch", **kw}
    torch.manual_seed(0)
    m = Mamba2(32, **kw).to(dtype)
    randomize(m)
    return m


@pytest.mark.parametrize("prefill", [2, 11, 16])  # shorter than d_conv, ragged, a chunk multiple
def test_prefill_then_steps_equal_full_forward(prefill):
    m = make_mixer()
    u = torch.randn(3, 24, 32, dtype=torch.float64)
    with torch.no_grad():
        full = m(u)
        cache = InferenceCache.allocate([m], 3, 24, dtype=torch.float64)
        outs = [m(u[:, :prefill], cache=cache)]
        for t in range(prefill, 20):
            outs.append(m(u[:, t:t + 1], cache=cache))
        outs.append(m(u[:, 20:], cache=cache))  # a second chunked prefill after steps
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_cache_expand_then_decode_each_row():
    m = make_mixer()
    u = torch.randn(2, 10, 32, dtype=torch.float64)
    nxt = torch.randn(4, 1, 32, dtype=torch.float64)
    with torch.no_grad():
        cache = InferenceCache.allocate([m], 2, 16, dtype=torch.float64)
        m(u, cache=cache)
        expanded = cache.expand(2)  # rows: 0, 0, 1, 1
        out = m(nxt, cache=expanded)
        ref = m(torch.cat([u.repeat_interleave(2, 0), nxt], 1))[:, -1:]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_parameter_layout_matches_mamba_ssm():
    m = Mamba2(64, d_state=16, d_conv=4, expand=2, headdim=32, ngroups=2, backend="torch")
    d_inner, nheads, conv_dim = 128, 4, 128 + 2 * 2 * 16
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner + 2 * 2 * 16 + nheads, 64),
        "conv1d.weight": (conv_dim, 1, 4),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (64, d_inner),
    }
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.dt_bias, m.A_log, m.D))


def check_mamba_init(m: Mamba2) -> None:
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert dt.min() >= m.dt_min * 0.999 and dt.max() <= m.dt_max * 1.001
    A = torch.exp(m.A_log)
    assert A.min() >= 1.0 and A.max() <= 16.0
    assert torch.all(m.D == 1) and torch.all(m.norm.weight == 1)
    assert torch.all(m.out_proj.weight == 0)
    assert m.in_proj.weight.std() > 0 and m.conv1d.weight.std() > 0


def test_init_weights_values():
    m = Mamba2(64, headdim=16, backend="torch")  # 8 heads
    randomize(m, scale=5.0)
    m.init_weights()
    check_mamba_init(m)
    assert m.dt_bias.std() > 0 and m.A_log.std() > 0  # sampled, not constant


def test_init_survives_model_init():
    cfg = ModelConfig(n_layer=4, n_embd=64, n_head=4, n_kv_head=4, block_pattern="alternating",
                      d_state=16, headdim=16, chunk_size=16)
    model = HybridLM(cfg, vocab_size=64)
    randomize(model, scale=5.0)
    model.init_weights()
    mixers = [b.mixer for b in model.blocks if isinstance(b.mixer, Mamba2)]
    assert len(mixers) == 2
    for m in mixers:
        check_mamba_init(m)


def test_tiny_model_forward_8192_tokens():
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=2, block_pattern="alternating", d_state=16,
                      headdim=32, chunk_size=64, sequence_len=8192)
    model = HybridLM(cfg, vocab_size=128)
    model.init_weights()
    randomize(model, scale=0.02)
    idx = torch.randint(0, 128, (1, 8192))
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (1, 8192, 128) and torch.isfinite(logits).all()


def test_backend_auto_on_cpu_uses_torch():
    m = make_mixer(dtype=torch.float32, backend="auto")
    ref = make_mixer(dtype=torch.float32, backend="torch")
    u = torch.randn(1, 5, 32)
    torch.testing.assert_close(m(u), ref(u))


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match="gpu.ssm_backend"):
        Mamba2(32, headdim=8, backend="triton")


@pytest.mark.skipif(cuda_kernels_available(), reason="mamba_ssm kernels are installed here")
def test_cuda_backend_without_kernels_says_how_to_fix():
    with pytest.raises(UserError) as err:
        Mamba2(32, headdim=8, backend="cuda")
    msg = str(err.value)
    assert "gpu.ssm_backend=torch" in msg and ".[gpu]" in msg and "MAMBA_FORCE_BUILD" in msg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_torch_scan_on_cuda_matches_eager():
    """torch.compile's Triton code for our scan, forward and backward, at a d12-like shape (on an H200,
    Inductor once failed to generate code for the scan's cumsum): the same values as eager."""
    x, dt, A, B, C, state = (t.float().cuda() for t in scan_inputs(b=2, l=300, h=24, p=16, g=1, n=32))
    leaves = [t.requires_grad_() for t in (x, dt, B, C)]
    results = []
    for fn in (ssd_chunked, torch.compile(ssd_chunked)):
        y, final = fn(x, dt, A, B, C, 64, state)
        grads = torch.autograd.grad((y.square().sum() + final.square().sum()), leaves)
        results.append((y, final, *grads))
    for eager, compiled in zip(*results):
        assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())


needs_kernels = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_kernels_available()),
                                   reason="needs CUDA and the mamba_ssm / causal_conv1d kernels")


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 6e-4, 2e-3), (torch.bfloat16, 3e-2, 5e-2)])
def test_cuda_backend_matches_torch_backend(dtype, rtol, atol):
    torch.manual_seed(0)
    kw = dict(d_state=64, headdim=64, chunk_size=64)
    ref = Mamba2(256, backend="torch", **kw).cuda()
    randomize(ref, scale=0.02)
    fast = Mamba2(256, backend="cuda", **kw).cuda()
    fast.load_state_dict(ref.state_dict())
    u = torch.randn(2, 300, 256, device="cuda")
    grads = []
    outs = []
    for m in (ref, fast):
        m.zero_grad()
        x = u.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = m(x)
        y.float().square().mean().backward()
        outs.append(y.float())
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=rtol, atol=atol)
    for g_ref, g in zip(*grads):
        scale = g_ref.abs().max().clamp_min(1e-6)  # parameters' grads differ in magnitude: compare relative
        torch.testing.assert_close(g / scale, g_ref / scale, rtol=rtol, atol=atol)


@pytest.mark.gpu
@needs_kernels
def test_cuda_backend_cached_decode_equals_full_forward():
    torch.manual_seed(0)
    m = Mamba2(256, d_state=64, headdim=64, chunk_size=64, backend="cuda").cuda()
    randomize(m, scale=0.02)
    u = torch.randn(2, 80, 256, device="cuda")
    with torch.no_grad():
        full = m(u)
        cache = InferenceCache.allocate([m], 2, 80, device="cuda", dtype=torch.float32)
        outs = [m(u[:, :50], cache=cache)] + [m(u[:, t:t + 1], cache=cache) for t in range(50, 70)]
        outs.append(m(u[:, 70:], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=6e-4, atol=2e-3)
    assert math.isfinite(full.abs().max().item())


# ---- the mixer against a plain per-token float64 recurrence --------------------------------------

def silu(v):
    return v / (1 + torch.exp(-v))


def mamba_reference(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """The Mamba-2 mixer written out token by token in float64 from the module's own parameters:
    in_proj -> [z, x, B, C, dt]; causal depthwise conv1d + SiLU over [x, B, C]; dt = softplus(dt + dt_bias);
    A = -exp(A_log); h = exp(dt A) h + dt x B^T; y = h C + D x; rmsnorm(y * silu(z)) per group * weight;
    out_proj. Nothing from hybridchat.model.mamba but the parameters is used."""
    W_in = m.in_proj.weight.detach().double()
    conv_w, conv_b = m.conv1d.weight.detach().double()[:, 0], m.conv1d.bias.detach().double()
    dt_bias, A_log, D = (p.detach().double() for p in (m.dt_bias, m.A_log, m.D))
    norm_w, W_out = m.norm.weight.detach().double(), m.out_proj.weight.detach().double()
    d_inner, n, g, H, P, K = m.d_inner, m.d_state, m.ngroups, m.nheads, m.headdim, m.d_conv
    conv_dim = d_inner + 2 * g * n
    batch, T, _ = u.shape
    out = torch.zeros(batch, T, W_out.shape[0], dtype=torch.float64)
    for b in range(batch):
        proj = [W_in @ u[b, t].double() for t in range(T)]
        h = torch.zeros(H, P, n, dtype=torch.float64)
        for t in range(T):
            z = proj[t][:d_inner]
            conv_out = conv_b.clone()
            for k in range(K):  # weight k multiplies the input K-1-k steps back; zeros before the start
                s = t - (K - 1) + k
                if s >= 0:
                    conv_out += conv_w[:, k] * proj[s][d_inner:d_inner + conv_dim]
            xBC = silu(conv_out)
            x = xBC[:d_inner].reshape(H, P)
            B = xBC[d_inner:d_inner + g * n].reshape(g, n)
            C = xBC[d_inner + g * n:].reshape(g, n)
            dt_raw = proj[t][d_inner + conv_dim:]
            y = torch.zeros(H, P, dtype=torch.float64)
            for head in range(H):
                grp = head // (H // g)
                dt = math.log1p(math.exp(dt_raw[head].item() + dt_bias[head].item()))
                A = -math.exp(A_log[head].item())
                h[head] = math.exp(dt * A) * h[head] + dt * torch.outer(x[head], B[grp])
                y[head] = h[head] @ C[grp] + D[head] * x[head]
            gated = (y.reshape(d_inner) * silu(z)).reshape(g, d_inner // g)
            normed = gated / torch.sqrt((gated ** 2).mean(-1, keepdim=True) + m.norm.eps)
            out[b, t] = W_out @ (normed.reshape(d_inner) * norm_w)
    return out


@pytest.fixture
def mixer():
    torch.manual_seed(0)
    m = Mamba2(d_model=12, d_state=5, d_conv=4, expand=2, headdim=6, ngroups=2, chunk_size=4,
               backend="torch").double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # no zero projection, unit D or unit norm weight may hide a missing term
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
        m.D.copy_(torch.randn(m.nheads, generator=gen, dtype=torch.float64) * 2)
    return m


def test_mamba_mixer_equals_a_per_token_float64_recurrence(mixer):
    assert mixer.nheads == 4 and mixer.ngroups == 2
    u = torch.randn(2, 11, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = mamba_reference(mixer, u)
    with torch.no_grad():
        full = mixer(u)
        # Decode: prefill 5 tokens with a cache, then one token at a time (the step path).
        cache = InferenceCache.allocate([mixer], 2, 11, dtype=torch.float64)
        parts = [mixer(u[:, :5], cache=cache)]
        for t in range(5, 11):
            parts.append(mixer(u[:, t:t + 1], cache=cache))
        stepped = torch.cat(parts, dim=1)
        # Only single steps from the start (step path for every token).
        cache = InferenceCache.allocate([mixer], 2, 11, dtype=torch.float64)
        only_steps = torch.cat([mixer(u[:, t:t + 1], cache=cache) for t in range(11)], dim=1)
    torch.testing.assert_close(full, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(stepped, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(only_steps, ref, rtol=1e-9, atol=1e-10)


def test_mamba_skip_term_d_changes_the_output(mixer):
    u = torch.randn(1, 6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = mixer(u)
        mixer.D.zero_()
        after = mixer(u)
    assert (before - after).abs().max() > 1e-3  # D is not a no-op ...
    torch.testing.assert_close(after, mamba_reference(mixer, u), rtol=1e-9, atol=1e-10)  # ... and D = 0 is exact


# ---- dtypes, kernels (stand-in modules), caches, defaults ----------------------------------------

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
    model = tiny_lm("MM")
    idx = torch.randint(0, TINY_VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))
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
