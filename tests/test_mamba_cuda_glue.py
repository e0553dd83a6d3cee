"""The "cuda" backend's glue (`Mamba2._forward_cuda`, `Mamba2._step_cuda`) run on CPU with stand-in kernels.

No GPU is needed: the five official kernels are replaced by plain-PyTorch stand-ins written here from
the documented behaviour of the real ones (their docstrings, asserts / TORCH_CHECKs and `*_ref`
functions), not from hybridchat's code:

- `mamba_chunk_scan_combined`   mamba_ssm/ops/triton/ssd_combined.py (+ ssd_chunk_scan.py: chunk_scan_ref)
- `selective_state_update`      mamba_ssm/ops/triton/selective_state_update.py (selective_state_update_ref)
- `rmsnorm_fn`                  mamba_ssm/ops/triton/layernorm_gated.py (rms_norm_ref, LayerNormFn)
- `causal_conv1d_fn`, `causal_conv1d_update`
                                causal_conv1d/causal_conv1d_interface.py (+ csrc/causal_conv1d.cpp checks)

Each stand-in has the official signature and defaults, checks the shapes / layouts / dtypes the
official kernel asserts (those that can be checked on CPU), and records that it was called. The stand-ins
compute in the input dtype (float64 here; the real kernels take only float32/float16/bfloat16), so the
"cuda" path must equal the torch path to float64 rounding.

The stand-ins go into sys.modules the way tests/test_mamba.py does it, and
`mamba._load_cuda_kernels` is cleared before and after. `_forward_cuda` / `_step_cuda` do not check the
device themselves, so most tests call them directly; the one test that goes through `Mamba2.forward`
patches `Mamba2._use_cuda` (the only device check) to return True.
"""

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from hybridchat.model import mamba
from hybridchat.model.cache import SSMState

CALLS: dict[str, int] = {}
CONV_INPUTS: list[torch.Tensor] = []  # the x of every causal_conv1d_fn call


def _silu(v):
    return v * torch.sigmoid(v)


def _head_to_group(nheads, ngroups, device):
    """Official convention: B/C are repeated "g n -> (g h) n", so head i reads group i // (nheads/ngroups)."""
    return torch.arange(nheads, device=device) // (nheads // ngroups)


# -----------------------------------------------------------------------------------------------
# Stand-in kernels


def sk_mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                 seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                                 return_final_states=False, return_varlen_states=False, state_dtype=None):
    """x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), D (h,) or (h, p), z like x, dt_bias (h,),
    initial_states (b, h, p, n). Output (b, l, h, p) in x's dtype; (out, final_states) when asked.
    dt <- softplus(dt + dt_bias) (softplus only if dt_softplus), clamped to dt_limit;
    state_t = exp(dt A) state_{t-1} + dt x_t B_t^T, y_t = state_t C_t + D x_t, then y * silu(z).
    Computed token by token (the result does not depend on chunk_size)."""
    CALLS["mamba_chunk_scan_combined"] = CALLS.get("mamba_chunk_scan_combined", 0) + 1
    batch, seqlen, nheads, headdim = x.shape
    _, _, ngroups, dstate = B.shape
    assert nheads % ngroups == 0
    assert B.shape == (batch, seqlen, ngroups, dstate) and C.shape == B.shape
    assert dt.shape == (batch, seqlen, nheads)
    assert A.shape == (nheads,)
    assert isinstance(chunk_size, int) and chunk_size > 0
    if z is not None:
        assert z.shape == x.shape
    if D is not None:
        assert D.shape in ((nheads, headdim), (nheads,))
    if dt_bias is not None:
        assert dt_bias.shape == (nheads,)
    if initial_states is not None:
        assert initial_states.shape == (batch, nheads, headdim, dstate)
    assert seq_idx is None and cu_seqlens is None and not return_varlen_states  # not exercised by our glue

    acc = torch.promote_types(x.dtype, torch.float32)
    dt = dt.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    if dt_softplus:
        dt = torch.where(dt > 20, dt, torch.log1p(torch.exp(dt)))  # softplus, threshold 20 as F.softplus
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    group = _head_to_group(nheads, ngroups, x.device)
    Bh, Ch = B.to(acc)[:, :, group], C.to(acc)[:, :, group]  # (b, l, h, n)
    state = (torch.zeros(batch, nheads, headdim, dstate, dtype=acc, device=x.device) if initial_states is None
             else initial_states.to(acc).clone())
    out = torch.empty(batch, seqlen, nheads, headdim, dtype=acc, device=x.device)
    for t in range(seqlen):
        keep = torch.exp(dt[:, t] * A.to(acc))  # (b, h)
        state = state * keep[:, :, None, None] + (dt[:, t, :, None] * x[:, t].to(acc))[..., None] * Bh[:, t, :, None, :]
        out[:, t] = (state * Ch[:, t, :, None, :]).sum(-1)
    if D is not None:
        Dv = D.to(acc) if D.dim() == 2 else D.to(acc)[:, None]
        out = out + x.to(acc) * Dv
    if z is not None:
        out = out * _silu(z.to(acc))
    out = out.to(x.dtype)
    return (out, state) if return_final_states else out


def sk_selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                              state_batch_indices=None):
    """state (b, h, p, n) updated in place; x, dt (b, h, p); A (h, p, n); B/C (b, g, n); D, dt_bias (h, p);
    z like x. Also the head-less forms ((b, p, n) state etc.). Returns out like x."""
    CALLS["selective_state_update"] = CALLS.get("selective_state_update", 0) + 1
    has_heads = state.dim() > 3
    st = state if has_heads else state.unsqueeze(1)  # a view: writing it writes `state`
    x = x if x.dim() == 3 else x.unsqueeze(1)
    dt = dt if dt.dim() == 3 else dt.unsqueeze(1)
    A = A if A.dim() == 3 else A.unsqueeze(0)
    B = B if B.dim() == 3 else B.unsqueeze(1)
    C = C if C.dim() == 3 else C.unsqueeze(1)
    D = None if D is None else (D if D.dim() == 2 else D.unsqueeze(0))
    z = None if z is None else (z if z.dim() == 3 else z.unsqueeze(1))
    dt_bias = None if dt_bias is None else (dt_bias if dt_bias.dim() == 2 else dt_bias.unsqueeze(0))
    batch, nheads, dim, dstate = st.shape
    assert x.shape == (batch, nheads, dim) and dt.shape == x.shape
    assert A.shape == (nheads, dim, dstate)
    ngroups = B.shape[1]
    assert nheads % ngroups == 0 and B.shape == (batch, ngroups, dstate) and C.shape == B.shape
    if D is not None:
        assert D.shape == (nheads, dim)
    if z is not None:
        assert z.shape == x.shape
    # The wrapper reads dt_bias.stride(-1) unconditionally (tie_hdim): dt_bias=None crashes the real one.
    assert dt_bias is not None and dt_bias.shape == (nheads, dim)
    assert state_batch_indices is None

    acc = torch.promote_types(st.dtype, torch.float32)
    d = dt.to(acc) + dt_bias.to(acc)
    if dt_softplus:
        d = torch.where(d > 20, d, torch.log1p(torch.exp(d)))
    group = _head_to_group(nheads, ngroups, x.device)
    Bh, Ch = B.to(acc)[:, group], C.to(acc)[:, group]  # (b, h, n)
    new = st.to(acc) * torch.exp(d[..., None] * A.to(acc)) + (d * x.to(acc))[..., None] * Bh[:, :, None, :]
    st.copy_(new)
    out = (st.to(acc) * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        out = out + x.to(acc) * D.to(acc)
    if z is not None:
        out = out * _silu(z.to(acc))
    out = out.to(x.dtype)
    return out if has_heads else out.squeeze(1)


def sk_rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Over the last dim N, in groups of group_size (None: N): rmsnorm(x * silu(z)) * weight + bias if
    not norm_before_gate, rmsnorm(x) * weight + bias then * silu(z) if norm_before_gate. Output x's dtype
    and shape; statistics in at least float32."""
    CALLS["rmsnorm_fn"] = CALLS.get("rmsnorm_fn", 0) + 1
    N = x.shape[-1]
    group_size = N if group_size is None else group_size
    assert N % group_size == 0
    assert weight.shape == (N,)
    if bias is not None:
        assert bias.shape == (N,)
    if z is not None:
        assert z.shape == x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    v = x.to(acc)
    if z is not None and not norm_before_gate:
        v = v * _silu(z.to(acc))
    shape = v.shape
    v = v.reshape(*shape[:-1], N // group_size, group_size)
    v = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    out = v.reshape(shape) * weight.to(acc)
    if bias is not None:
        out = out + bias.to(acc)
    if z is not None and norm_before_gate:
        out = out * _silu(z.to(acc))
    return out.to(x.dtype)


def _depthwise_causal(xs, weight, bias, seqlen):
    """xs (b, dim, width-1+seqlen) already left-padded with history: out_t = bias + sum_k w_k xs_{t+k}."""
    width = weight.shape[1]
    out = sum(weight[None, :, k, None] * xs[:, :, k:k + seqlen] for k in range(width))
    return out if bias is None else out + bias[None, :, None]


def sk_causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                        final_states_out=None, activation=None):
    """x (b, dim, l), weight (dim, width), bias (dim,), initial_states (b, dim, width-1): the width-1
    inputs before x (zeros if None). Depthwise causal conv, then silu if activation is "silu"/"swish"."""
    CALLS["causal_conv1d_fn"] = CALLS.get("causal_conv1d_fn", 0) + 1
    CONV_INPUTS.append(x)
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    assert weight.shape == (dim, width) and 2 <= width <= 4
    assert x.stride(2) == 1 or x.stride(1) == 1
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:  # csrc/causal_conv1d.cpp, causal_conv1d_fwd
        assert dim % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now"
        assert x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, (
            "causal_conv1d with channel last layout requires strides (x.stride(0) and x.stride(2)) to be multiples of 8")
    if bias is not None:
        assert bias.dtype == weight.dtype and bias.shape == (dim,) and bias.stride(-1) == 1
    assert seq_idx is None
    if initial_states is not None:
        # csrc/causal_conv1d.cpp: "initial_states is only supported for channel last layout"
        assert channel_last, "initial_states is only supported for channel last layout"
        assert initial_states.dtype == x.dtype
        assert initial_states.shape == (batch, dim, width - 1)
        assert initial_states.stride(1) == 1
    if return_final_states:
        assert channel_last
    acc = torch.promote_types(x.dtype, weight.dtype)
    history = (torch.zeros(batch, dim, width - 1, dtype=acc, device=x.device) if initial_states is None
               else initial_states.to(acc))
    xs = torch.cat([history, x.to(acc)], dim=-1)
    out = _depthwise_causal(xs, weight.to(acc), None if bias is None else bias.to(acc), seqlen)
    if activation is not None:
        out = _silu(out)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    final = xs[:, :, -(width - 1):].to(x.dtype)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def sk_causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                            conv_state_indices=None):
    """x (b, dim) or (b, dim, l); conv_state (b, dim, state_len >= width-1), updated in place to its last
    state_len inputs (shifted left); out like x: the causal conv of the last width inputs, silu'd."""
    CALLS["causal_conv1d_update"] = CALLS.get("causal_conv1d_update", 0) + 1
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    assert cache_seqlens is None and conv_state_indices is None
    squeeze = x.dim() == 2
    xs = x.unsqueeze(-1) if squeeze else x
    batch, dim, seqlen = xs.shape
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    assert conv_state.dtype == x.dtype, "csrc/causal_conv1d.cpp: conv_state.scalar_type() == input_type"
    assert conv_state.shape == (batch, dim, state_len) and state_len >= width - 1
    assert weight.shape == (dim, width) and 2 <= width <= 4
    if bias is not None:
        assert bias.dtype == weight.dtype and bias.shape == (dim,)
    acc = torch.promote_types(x.dtype, weight.dtype)
    full = torch.cat([conv_state.to(acc), xs.to(acc)], dim=-1)  # (b, dim, state_len + l)
    conv_state.copy_(full[:, :, -state_len:])
    out = _depthwise_causal(full[:, :, -(width - 1 + seqlen):], weight.to(acc),
                            None if bias is None else bias.to(acc), seqlen)
    if activation is not None:
        out = _silu(out)
    out = out.to(x.dtype)
    return out.squeeze(-1) if squeeze else out


MODULES = {
    "causal_conv1d": {"causal_conv1d_fn": sk_causal_conv1d_fn, "causal_conv1d_update": sk_causal_conv1d_update},
    "mamba_ssm": {}, "mamba_ssm.ops": {}, "mamba_ssm.ops.triton": {},
    "mamba_ssm.ops.triton.layernorm_gated": {"rmsnorm_fn": sk_rmsnorm_fn},
    "mamba_ssm.ops.triton.selective_state_update": {"selective_state_update": sk_selective_state_update},
    "mamba_ssm.ops.triton.ssd_combined": {"mamba_chunk_scan_combined": sk_mamba_chunk_scan_combined},
}


@pytest.fixture
def kernels(monkeypatch):
    """The stand-ins importable under the official module names; CALLS counts their calls."""
    mamba._load_cuda_kernels.cache_clear()
    for name, attrs in MODULES.items():
        module = types.ModuleType(name)
        for attr, fn in attrs.items():
            setattr(module, attr, fn)
        monkeypatch.setitem(sys.modules, name, module)
    CALLS.clear()
    CONV_INPUTS.clear()
    assert mamba._cuda_kernels().mamba_chunk_scan_combined is sk_mamba_chunk_scan_combined
    yield CALLS
    mamba._load_cuda_kernels.cache_clear()


# -----------------------------------------------------------------------------------------------
# Helpers

D_MODEL, D_STATE, HEADDIM, CHUNK = 32, 8, 16, 4


def layer(ngroups, seed=0):
    """A float64 layer (torch backend: building it needs no kernels) with every parameter perturbed so
    no zero or identity init hides a wiring mistake (out_proj starts at zero, norm weight and D at one)."""
    torch.manual_seed(seed)
    m = mamba.Mamba2(D_MODEL, d_state=D_STATE, headdim=HEADDIM, ngroups=ngroups, chunk_size=CHUNK,
                     backend="torch").double()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        m.out_proj.weight.normal_(0, 0.3, generator=gen)
        m.norm.weight.copy_(1 + 0.5 * torch.randn(m.norm.weight.shape, generator=gen, dtype=torch.float64))
        m.D.copy_(torch.randn(m.D.shape, generator=gen, dtype=torch.float64))
        m.conv1d.bias.add_(0.3 * torch.randn(m.conv1d.bias.shape, generator=gen, dtype=torch.float64))
        m.dt_bias.add_(torch.randn(m.dt_bias.shape, generator=gen, dtype=torch.float64))
        m.in_proj.weight.mul_(2.0)
    return m


def twin(m):
    """The torch-path reference for layer m: a copy whose A = -exp(A_log) is the float32 A the cuda glue
    computes (`-torch.exp(A_log.float())`, as mamba_ssm's Mamba2 does: the kernels take A in float32).
    That rounding (~1e-7 relative) is the glue's one intended difference from the float64 torch path;
    with it matched, everything else must agree to float64 rounding."""
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.A_log.copy_(torch.log(torch.exp(m.A_log.float()).double()))
    assert torch.equal(-torch.exp(ref.A_log.float()), -torch.exp(m.A_log.float()))
    return ref


def random_state(m, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    state = m.allocate_cache(batch, 16)
    state.conv_state.copy_(torch.randn(state.conv_state.shape, generator=gen, dtype=torch.float64))
    state.ssm_state.copy_(torch.randn(state.ssm_state.shape, generator=gen, dtype=torch.float64))
    return state


def clone(state):
    return SSMState(state.conv_state.clone(), state.ssm_state.clone())


def inputs(batch=2, seqlen=10, seed=1):
    return torch.randn(batch, seqlen, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)


NGROUPS = pytest.mark.parametrize("ngroups", [1, 2])


# -----------------------------------------------------------------------------------------------
# The stand-ins themselves


def test_stand_ins_agree_with_each_other_and_with_torch_conv(kernels):
    """Sanity of the stand-ins (independent of hybridchat): the chunk scan over L tokens equals L
    selective_state_update calls (per-head parameters expanded over headdim, as a caller must pass
    them); causal_conv1d_fn equals F.conv1d with left padding and equals causal_conv1d_update token by
    token; rmsnorm_fn with one group and no gate is F.rms_norm."""
    gen = torch.Generator().manual_seed(5)
    b, l, h, p, g, n = 2, 7, 4, 3, 2, 5
    x = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    dt = torch.randn(b, l, h, generator=gen, dtype=torch.float64)
    A = -torch.rand(h, generator=gen, dtype=torch.float64) - 0.2
    B, C = (torch.randn(b, l, g, n, generator=gen, dtype=torch.float64) for _ in range(2))
    D, dt_bias = torch.randn(h, generator=gen, dtype=torch.float64), torch.randn(h, generator=gen, dtype=torch.float64)
    z = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    s0 = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    y, final = sk_mamba_chunk_scan_combined(x, dt, A, B, C, 4, D=D, z=z, dt_bias=dt_bias, initial_states=s0,
                                            dt_softplus=True, return_final_states=True)
    s = s0.clone()
    steps = [sk_selective_state_update(s, x[:, t], dt[:, t, :, None].expand(-1, -1, p),
                                       A[:, None, None].expand(h, p, n), B[:, t], C[:, t],
                                       D=D[:, None].expand(h, p), z=z[:, t],
                                       dt_bias=dt_bias[:, None].expand(h, p), dt_softplus=True) for t in range(l)]
    assert_close(torch.stack(steps, 1), y)
    assert_close(s, final)

    dim, width = 8, 4
    xc = torch.randn(b, dim, l, generator=gen, dtype=torch.float64)
    w, bias = torch.randn(dim, width, generator=gen, dtype=torch.float64), torch.randn(dim, generator=gen, dtype=torch.float64)
    want = F.silu(F.conv1d(F.pad(xc, (width - 1, 0)), w[:, None], bias, groups=dim))
    assert_close(sk_causal_conv1d_fn(xc, w, bias, activation="silu"), want)
    conv_state = torch.zeros(b, dim, width, dtype=torch.float64)
    token_by_token = [sk_causal_conv1d_update(xc[:, :, t], conv_state, w, bias, "silu") for t in range(l)]
    assert_close(torch.stack(token_by_token, -1), want)
    assert_close(conv_state, xc[:, :, -width:])
    v = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    assert_close(sk_rmsnorm_fn(v, torch.ones(12, dtype=torch.float64), None, eps=1e-5),
                 F.rms_norm(v, (12,), eps=1e-5))


# -----------------------------------------------------------------------------------------------
# The glue


@NGROUPS
def test_forward_cuda_equals_forward_torch_without_cache(kernels, ngroups):
    """_forward_cuda(u, None) == _forward_torch(u, None) to float64 rounding (10 tokens, chunk 4, so the
    last chunk is partial), and it ran through the conv, the chunk scan and the gated norm kernels.
    Here d_in_proj = 148 / 164 (nheads = 4): the conv stand-in's channel-last stride check (x.stride(0),
    x.stride(2) multiples of 8, a TORCH_CHECK of the real kernel) fails if the glue hands it the
    transposed in_proj view instead of a contiguous copy."""
    m = layer(ngroups)
    r = twin(m)
    u = inputs()
    with torch.no_grad():
        got = m._forward_cuda(u, None)
        want = r._forward_torch(u, None)
    assert_close(got, want)
    assert kernels == {"causal_conv1d_fn": 1, "mamba_chunk_scan_combined": 1, "rmsnorm_fn": 1}


@NGROUPS
def test_forward_cuda_continues_a_cache_like_forward_torch(kernels, ngroups):
    """From the same non-zero cache (conv inputs and SSM state), _forward_cuda and _forward_torch give the
    same output and leave the same conv_state (last d_conv inputs) and ssm_state, updated in place;
    also for a chunk shorter than d_conv - 1, where part of the new conv_state is old history."""
    m = layer(ngroups, seed=3)
    r = twin(m)
    for seqlen in (10, 2):
        u = inputs(seqlen=seqlen, seed=seqlen)
        cuda_state = random_state(m, 2, seed=7)
        torch_state = clone(cuda_state)
        conv_id, ssm_id = cuda_state.conv_state.data_ptr(), cuda_state.ssm_state.data_ptr()
        with torch.no_grad():
            got = m._forward_cuda(u, cuda_state)
            want = r._forward_torch(u, torch_state)
        assert_close(got, want)
        assert_close(cuda_state.conv_state, torch_state.conv_state)
        assert_close(cuda_state.ssm_state, torch_state.ssm_state)
        assert (cuda_state.conv_state.data_ptr(), cuda_state.ssm_state.data_ptr()) == (conv_id, ssm_id)
        assert not torch.equal(cuda_state.ssm_state, random_state(m, 2, seed=7).ssm_state)


@NGROUPS
def test_step_cuda_equals_step_torch(kernels, ngroups):
    """Five single-token steps from the same non-zero cache: _step_cuda == _step_torch token by token,
    with the same conv_state and ssm_state (in place) after every step; the step used the conv-update,
    state-update and gated-norm kernels."""
    m = layer(ngroups, seed=4)
    r = twin(m)
    u = inputs(seqlen=5, seed=9)
    cuda_state = random_state(m, 2, seed=8)
    torch_state = clone(cuda_state)
    with torch.no_grad():
        for t in range(5):
            got = m._step_cuda(u[:, t:t + 1], cuda_state)
            want = r._step_torch(u[:, t:t + 1], torch_state)
            assert got.shape == (2, 1, D_MODEL)
            assert_close(got, want)
            assert_close(cuda_state.conv_state, torch_state.conv_state)
            assert_close(cuda_state.ssm_state, torch_state.ssm_state)
    assert kernels == {"causal_conv1d_update": 5, "selective_state_update": 5, "rmsnorm_fn": 5}


@NGROUPS
def test_cuda_prefill_chunks_then_steps_equal_the_full_forward(kernels, ngroups):
    """On the cuda path alone: a 10-token forward without cache == prefill of 4 tokens + a second
    prefill chunk of 3 continuing the cache + 3 cached steps; the final cache equals the torch path's
    after the same calls."""
    m = layer(ngroups, seed=5)
    r = twin(m)
    u = inputs(seed=11)
    with torch.no_grad():
        full = m._forward_cuda(u, None)
        cuda_state, torch_state = m.allocate_cache(2, 10), r.allocate_cache(2, 10)
        parts = [m._forward_cuda(u[:, :4], cuda_state), m._forward_cuda(u[:, 4:7], cuda_state)]
        parts += [m._step_cuda(u[:, t:t + 1], cuda_state) for t in range(7, 10)]
        r._forward_torch(u[:, :4], torch_state), r._forward_torch(u[:, 4:7], torch_state)
        for t in range(7, 10):
            r._step_torch(u[:, t:t + 1], torch_state)
    assert_close(torch.cat(parts, 1), full)
    assert_close(cuda_state.conv_state, torch_state.conv_state)
    assert_close(cuda_state.ssm_state, torch_state.ssm_state)


def test_forward_dispatches_to_the_cuda_glue(kernels, monkeypatch):
    """Through Mamba2.forward with an InferenceCache-like object: a backend="cuda" layer (building it
    asks for the kernels: the stand-ins) takes _forward_cuda for T > 1 and _step_cuda for T == 1 and
    matches a torch-backend copy. Patched: this layer's _use_cuda -> True (instance attribute), because the real one refuses CPU
    tensors for backend="cuda"; nothing else."""
    ref = layer(2, seed=6)
    m = mamba.Mamba2(D_MODEL, d_state=D_STATE, headdim=HEADDIM, ngroups=2, chunk_size=CHUNK, backend="cuda").double()
    m.load_state_dict(ref.state_dict())
    ref = twin(ref)
    monkeypatch.setattr(m, "_use_cuda", lambda u: True)  # this instance only: ref stays on torch
    u = inputs(seed=12)
    cache_cuda = types.SimpleNamespace(layers=[m.allocate_cache(2, 10)])
    cache_torch = types.SimpleNamespace(layers=[ref.allocate_cache(2, 10)])
    with torch.no_grad():
        got = torch.cat([m(u[:, :6], cache=cache_cuda)] + [m(u[:, t:t + 1], cache=cache_cuda) for t in range(6, 10)], 1)
        want = torch.cat([ref(u[:, :6], cache=cache_torch)] + [ref(u[:, t:t + 1], cache=cache_torch) for t in range(6, 10)], 1)
        assert_close(m(u), ref(u))
    assert_close(got, want)
    assert kernels["causal_conv1d_fn"] == 2 and kernels["causal_conv1d_update"] == 4
    assert kernels["mamba_chunk_scan_combined"] == 2 and kernels["selective_state_update"] == 4


def test_conv_input_is_copied_only_when_its_strides_break_the_kernels_rule(kernels):
    """causal_conv1d_fn's channel-last kernel requires x.stride(0) and x.stride(2) multiples of 8. With
    nheads = 8 (d_model 64) in_proj's width, 280, is one: the glue hands the kernel the transposed view
    into in_proj's output, no copy (its storage is the whole projection); with nheads = 4 (width 148) it
    hands a contiguous copy of just the conv input. Both equal the torch path."""
    for d_model, aligned in ((64, True), (32, False)):
        torch.manual_seed(0)
        m = mamba.Mamba2(d_model, d_state=D_STATE, headdim=HEADDIM, chunk_size=CHUNK, backend="torch").double()
        with torch.no_grad():
            m.out_proj.weight.normal_(0, 0.3)
            u = torch.randn(2, 10, d_model, dtype=torch.float64)
            got = m._forward_cuda(u, None)
            want = twin(m)._forward_torch(u, None)
        assert_close(got, want)
        x = CONV_INPUTS.pop()
        assert (x.stride(2) % 8, x.stride(0) % 8) == (0, 0)
        whole = x.untyped_storage().nbytes() // x.element_size()
        assert (whole > x.numel()) == aligned, (d_model, x.stride(), whole, x.numel())


@NGROUPS
def test_forward_cuda_continues_a_float32_cache_of_a_float64_layer(kernels, ngroups):
    """A cache in another dtype than the activations (here float32 for a float64 layer): the glue casts
    the cached conv inputs to the activation dtype for causal_conv1d_fn (the real kernel requires
    initial_states in x's dtype) and the cuda prefill matches the torch one to float32 rounding, with
    the same cache after it. (Single steps with such a cache are not supported by the cuda path: the
    real causal_conv1d_update requires conv_state in x's dtype, and the glue does not cast.)"""
    m = layer(ngroups, seed=13)
    r = twin(m)
    u = inputs(seed=14)
    cuda_state = r.allocate_cache(2, 10, dtype=torch.float32)
    gen = torch.Generator().manual_seed(15)
    cuda_state.conv_state.copy_(torch.randn(cuda_state.conv_state.shape, generator=gen))
    cuda_state.ssm_state.copy_(torch.randn(cuda_state.ssm_state.shape, generator=gen))
    torch_state = clone(cuda_state)
    with torch.no_grad():
        got = m._forward_cuda(u, cuda_state)
        want = r._forward_torch(u, torch_state)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cuda_state.conv_state.dtype == cuda_state.ssm_state.dtype == torch.float32
    torch.testing.assert_close(cuda_state.conv_state, torch_state.conv_state, rtol=0, atol=0)
    torch.testing.assert_close(cuda_state.ssm_state, torch_state.ssm_state, rtol=1e-5, atol=1e-5)
