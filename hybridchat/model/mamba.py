"""Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs").

Two backends share one set of parameters, named and shaped exactly like
`mamba_ssm.modules.mamba2.Mamba2`, so a state_dict trained on one runs on the other:

- "torch": our chunked SSD scan (`ssd_chunked`), plain PyTorch, runs on CPU, CUDA and MPS.
- "cuda":  the official Triton / CUDA kernels from mamba_ssm and causal_conv1d (GPU extra).
- "auto":  "cuda" for CUDA tensors when the kernels import, else "torch".

Per head h the layer runs the scalar-decay state-space recurrence

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t B_t^T        state: (headdim, d_state)
    y_t     = state_t C_t + D_h * x_t

with dt, B, C (and the gate z) computed from the input, so the model chooses per token what to keep.
`ssd_recurrent` is that recurrence token by token (the reference); `ssd_chunked` computes the same
thing as small attention-like matmuls inside chunks plus a short recurrence between chunks.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridchat.core.errors import UserError
from hybridchat.model.cache import SSMState

BACKENDS = ("auto", "torch", "cuda")
# On CPU the scan works through segments whose largest intermediate has about this many elements.
CPU_SEGMENT_ELEMENTS = 2**20


# -----------------------------------------------------------------------------------------------
# The scan: reference recurrence and chunked SSD


def ssd_recurrent(x, dt, A, B, C, chunk_size=None, initial_state=None):
    """Token-by-token reference. x (b, l, h, p), dt (b, l, h) (already softplus'd), A (h,),
    B/C (b, l, g, n), initial_state (b, h, p, n). Returns y (b, l, h, p), final_state (b, h, p, n).
    `chunk_size` is accepted only so the signature matches ssd_chunked."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Bh = B.repeat_interleave(h // g, dim=2)  # head i reads group i // (h/g), as in mamba_ssm
    Ch = C.repeat_interleave(h // g, dim=2)
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(x.dtype)
    decay = torch.exp(dt * A)  # (b, l, h)
    ys = []
    # unbind() gives every step its own slice, so backward stays O(L); indexing x[:, t] inside
    # the loop would make autograd accumulate a full-size zero gradient per step (O(L^2)).
    for x_t, dt_t, a_t, B_t, C_t in zip(x.unbind(1), dt.unbind(1), decay.unbind(1), Bh.unbind(1), Ch.unbind(1)):
        state = a_t[..., None, None] * state + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C_t))
    return torch.stack(ys, dim=1), state


class _DecayedScores(torch.autograd.Function):
    """scores[..., h, i, j] = CB[..., i, j] * exp(cum[..., h, i] - cum[..., h, j]) for j <= i, else 0.

    The same thing written with autograd ops materialises four (q x q)-per-head tensors and keeps
    them for backward; this keeps one (the decay) and its backward is two multiplies and three
    sums, which is most of the elementwise work of the scan on CPU."""

    @staticmethod
    def forward(ctx, CB, cum):  # CB (..., g, q, q), cum (..., g, hpg, q) in float32/64
        q = cum.shape[-1]
        causal = torch.ones(q, q, dtype=torch.bool, device=cum.device).tril()
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill_(~causal, -math.inf).exp_().to(CB.dtype)
        ctx.save_for_backward(CB, decay)
        return CB.unsqueeze(-3) * decay

    @staticmethod
    def backward(ctx, grad):
        CB, decay = ctx.saved_tensors
        grad_decayed = grad * decay
        grad_CB = grad_decayed.sum(-3)
        # d scores / d cum_i = scores, d scores / d cum_j = -scores
        grad_seg = grad_decayed.mul_(CB.unsqueeze(-3)).to(torch.promote_types(CB.dtype, torch.float32))
        return grad_CB, grad_seg.sum(-1) - grad_seg.sum(-2)


def _ssd_segment(x, dt, A, B, C, chunk_size, state):
    """ssd_chunked on one segment, continuing from `state` (b, g, hpg, p, n) in float32/64."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hpg = h // g
    dtype, acc = x.dtype, state.dtype

    # Pad to a whole number of chunks. dt = 0 on padding: no decay and no input, so the final state
    # is exactly the state after the last real token.
    pad = (-l) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c, q = (l + pad) // chunk_size, chunk_size
    x = x.reshape(b, c, q, g, hpg, p)
    B = B.reshape(b, c, q, g, n)
    C = C.reshape(b, c, q, g, n)
    dt = dt.to(acc).reshape(b, c, q, g, hpg)
    xdt = x * dt.to(dtype)[..., None]
    # Log-decay from the chunk start, (b, c, g, hpg, q). The sum runs along the last axis: along a
    # middle axis torch.compile's Triton scan (torch 2.11, H200) failed to generate code.
    cum = torch.cumsum((dt * A.to(acc).reshape(g, hpg)).permute(0, 1, 3, 4, 2), dim=-1)
    # cum in the token-major layout of x: (b, c, q, g, hpg)
    cum_by_token = cum.permute(0, 1, 4, 2, 3)

    # 1. Inside each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j, a masked
    #    attention. C.B^T depends only on the group: computed once per group, broadcast to its heads.
    CB = torch.einsum("bcign,bcjgn->bcgij", C, B)
    scores = _DecayedScores.apply(CB, cum)  # (b, c, g, hpg, q, q)
    y = torch.einsum("bcghij,bcjghp->bcighp", scores, xdt)

    # 2. State each chunk adds by its end: sum_j exp(cum_last - cum_j) dt_j x_j B_j^T.
    to_end = torch.exp(cum_by_token[:, :, -1:] - cum_by_token).to(dtype)
    chunk_states = torch.einsum("bcjgn,bcjghp->bcghpn", B, xdt * to_end[..., None])

    # 3. Across chunks only the state is carried: a loop over chunks, O(L) (the minimal SSD form
    #    does this with an (L/Q)^2 segsum instead).
    chunk_decay = torch.exp(cum[..., -1])  # (b, c, g, hpg)
    entering = []
    for add, keep in zip(chunk_states.unbind(1), chunk_decay.unbind(1)):
        entering.append(state)
        state = keep[..., None, None] * state + add.to(acc)
    entering = torch.stack(entering, dim=1).to(dtype)  # state entering each chunk

    # 4. What the entering state contributes to every token of its chunk: exp(cum_i) C_i . state.
    y = y + torch.einsum("bcign,bcghpn->bcighp", C, entering) * torch.exp(cum_by_token).to(dtype)[..., None]
    return y.reshape(b, c * q, h, p)[:, :l], state


def ssd_chunked(x, dt, A, B, C, chunk_size, initial_state=None):
    """Chunked SSD scan, O(L) time and memory. Same contract as ssd_recurrent.

    Inside each chunk of Q tokens the output is a masked (Q x Q) attention C_i.B_j weighted by the
    decay between j and i; across chunks only the (h, p, n) state is carried. Decays and the carried
    state are kept in at least float32 whatever the input dtype.

    On CPU the sequence is also cut into segments of a few chunks processed one after another, so
    every intermediate stays a few MB: one big (L/Q)-chunk tensor per step is slower per token at
    long L (tensors past glibc's 32 MB mmap threshold are page-faulted in on every call).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc = torch.promote_types(x.dtype, torch.float32)
    state = (x.new_zeros(b, g, h // g, p, n, dtype=acc) if initial_state is None
             else initial_state.to(acc).reshape(b, g, h // g, p, n))
    if x.device.type == "cpu":
        chunks_per_segment = max(1, CPU_SEGMENT_ELEMENTS // (b * h * chunk_size * max(chunk_size, p)))
        segment = chunks_per_segment * chunk_size
    else:
        segment = l
    ys = []
    # split() (not slicing in the loop) keeps backward O(L): its gradient is one concatenation.
    for xs, dts, Bs, Cs in zip(x.split(segment, 1), dt.split(segment, 1), B.split(segment, 1), C.split(segment, 1)):
        y, state = _ssd_segment(xs, dts, A, Bs, Cs, chunk_size, state)
        ys.append(y)
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
    return y, state.reshape(b, h, p, n).to(x.dtype)


# -----------------------------------------------------------------------------------------------
# Official kernels (GPU extra), imported lazily


@functools.lru_cache(maxsize=1)
def _load_cuda_kernels():
    """The mamba_ssm / causal_conv1d kernels, or the import error as a string. Catch every
    Exception: triton raises RuntimeError ("0 active drivers") at import on a machine without a GPU,
    and a half-built mamba_ssm raises ImportError for its missing extension."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001 - any failure means "kernels unavailable"
        return None, f"{type(e).__name__}: {e}"
    kernels = SimpleNamespace(causal_conv1d_fn=causal_conv1d_fn, causal_conv1d_update=causal_conv1d_update,
                              rmsnorm_fn=rmsnorm_fn, selective_state_update=selective_state_update,
                              mamba_chunk_scan_combined=mamba_chunk_scan_combined)
    return kernels, None


def cuda_kernels_available() -> bool:
    return _load_cuda_kernels()[0] is not None


def _cuda_kernels():
    kernels, error = _load_cuda_kernels()
    if kernels is None:
        raise UserError(
            f"gpu.ssm_backend=cuda needs the mamba_ssm and causal_conv1d kernels, which did not import ({error}). "
            "Install them on a CUDA machine that already has torch: "
            "MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE pip install --no-build-isolation -e '.[gpu]' "
            "(see docs/mamba.md), or set gpu.ssm_backend=torch (pure PyTorch, runs everywhere).")
    return kernels


# -----------------------------------------------------------------------------------------------
# The module


class RMSNormGated(nn.Module):
    """rmsnorm(y * silu(z)) * weight, normalised over groups of `group_size` channels
    (mamba_ssm's RMSNorm with norm_before_gate=False; same `weight` parameter)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(y.dtype, torch.float32)  # statistics in at least float32
        grouped = (y * F.silu(z)).to(acc).unflatten(-1, (-1, self.group_size))
        normed = F.rms_norm(grouped, (self.group_size,), eps=self.eps).flatten(-2)
        return (normed * self.weight.to(acc)).to(y.dtype)


class Mamba2(nn.Module):
    def __init__(self, d_model: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 64, backend: str = "auto", layer_idx: int = 0,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        backend = getattr(backend, "value", backend)  # accept the config's SSMBackend enum too
        if backend not in BACKENDS:
            raise UserError(f"gpu.ssm_backend={backend!r} is not one of {list(BACKENDS)}")
        if backend == "cuda":
            _cuda_kernels()  # fail at build time, not in the middle of the first step
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        assert self.d_inner % headdim == 0, f"expand * d_model = {self.d_inner} must be divisible by headdim={headdim}"
        self.headdim, self.nheads, self.ngroups = headdim, self.d_inner // headdim, ngroups
        assert self.nheads % ngroups == 0, f"nheads={self.nheads} must be divisible by ngroups={ngroups}"
        self.chunk_size, self.backend, self.layer_idx = chunk_size, backend, layer_idx
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        # Order of the projection: [z, x, B, C, dt]; the depthwise causal conv runs over [x, B, C].
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = RMSNormGated(self.d_inner, group_size=self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        # Optimisers that honour this flag (mamba_ssm convention) keep weight decay off the
        # parameters that define the dynamics; decaying A_log or dt_bias towards 0 changes them.
        for param in (self.dt_bias, self.A_log, self.D):
            param._no_weight_decay = True
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        # in_proj: uniform with std 1/sqrt(d_model), like the attention and MLP inputs in this
        # project. conv1d: PyTorch's default (kaiming-uniform, what mamba_ssm keeps with conv_init=None).
        bound = math.sqrt(3.0) / math.sqrt(self.d_model)
        nn.init.uniform_(self.in_proj.weight, -bound, bound)
        self.conv1d.reset_parameters()
        # dt starts log-uniform in [dt_min, dt_max]; dt_bias stores softplus^-1(dt) because the
        # forward applies softplus(dt_raw + dt_bias).
        dt = torch.exp(torch.rand(self.nheads, device=self.dt_bias.device)
                       * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        dt = dt.clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # A = -exp(A_log) with A in [1, 16]: heads with memories from ~1/(16 dt) to ~1/dt tokens.
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1.0, 16.0)))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)
        # Zero output projection: the block starts as the identity on the residual stream.
        nn.init.zeros_(self.out_proj.weight)

    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> SSMState:
        """Decode state for this layer. Its size does not depend on max_len: that is the point.
        conv_state keeps the last d_conv inputs of the conv (activation dtype: the cuda conv update
        requires it); ssm_state is kept in at least float32 because it accumulates over the whole
        sequence."""
        device = device if device is not None else self.in_proj.weight.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        conv_state = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                dtype=torch.promote_types(dtype, torch.float32))
        return SSMState(conv_state, ssm_state)

    def _use_cuda(self, u: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "cuda":
            if not u.is_cuda:
                raise UserError(f"gpu.ssm_backend=cuda needs CUDA tensors, got a {u.device.type} input; "
                                "set gpu.ssm_backend=torch or auto")
            return True
        return u.is_cuda and cuda_kernels_available()

    def forward(self, u: torch.Tensor, rope=None, cache=None) -> torch.Tensor:
        """u (B, T, d_model) -> (B, T, d_model). `rope` is unused (positions live in the state).
        With a cache, this layer's conv and SSM state are read and updated in place: any T continues
        from the cached state (chunked prefill), T == 1 takes the cheap single-step path."""
        state = cache.layers[self.layer_idx] if cache is not None else None
        cuda = self._use_cuda(u)
        if state is not None and u.shape[1] == 1:
            return self._step_cuda(u, state) if cuda else self._step_torch(u, state)
        return self._forward_cuda(u, state) if cuda else self._forward_torch(u, state)

    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _split_xbc(self, xBC: torch.Tensor):
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        lead = x.shape[:-1]
        return (x.reshape(*lead, self.nheads, self.headdim), B.reshape(*lead, self.ngroups, self.d_state),
                C.reshape(*lead, self.ngroups, self.d_state))

    def _dt_A(self, dt_raw: torch.Tensor):
        # Decays exp(dt * A) compound over the whole sequence: at least float32, even under autocast.
        acc = torch.promote_types(dt_raw.dtype, torch.float32)
        return F.softplus(dt_raw.to(acc) + self.dt_bias.to(acc)), -torch.exp(self.A_log.to(acc))

    # --- torch backend ---------------------------------------------------------------------------

    def _forward_torch(self, u: torch.Tensor, state: SSMState | None) -> torch.Tensor:
        batch, seqlen, _ = u.shape
        z, xBC, dt = self._split(self.in_proj(u))

        # The conv sees [previous d_conv-1 inputs, new inputs]: zeros at the start of a sequence,
        # the cached inputs when continuing one, so chunked prefill equals one long prefill.
        if state is None:
            history = xBC.new_zeros(batch, self.d_conv - 1, self.conv_dim)
        else:
            history = state.conv_state[:, :, 1:].transpose(1, 2).to(xBC.dtype)
        xBC_padded = torch.cat([history, xBC], dim=1)
        if state is not None:
            state.conv_state.copy_(xBC_padded[:, -self.d_conv:].transpose(1, 2))
        xBC = F.silu(F.conv1d(xBC_padded.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                              groups=self.conv_dim).transpose(1, 2))
        x, B, C = self._split_xbc(xBC)

        dt, A = self._dt_A(dt)  # (B, T, nheads), (nheads,)
        y, final_state = ssd_chunked(x, dt, A, B, C, self.chunk_size,
                                     initial_state=None if state is None else state.ssm_state)
        if state is not None:
            state.ssm_state.copy_(final_state)
        y = y + x * self.D.to(x.dtype)[:, None]
        y = self.norm(y.reshape(batch, seqlen, self.d_inner), z)
        return self.out_proj(y)

    def _step_torch(self, u: torch.Tensor, state: SSMState) -> torch.Tensor:
        # One token: the same maths as _forward_torch, written with as few ops as possible because
        # at decode time per-op overhead, not arithmetic, is the cost.
        z, xBC, dt = self._split(self.in_proj(u[:, 0]))  # (B, ...)

        conv_in = torch.cat([state.conv_state[:, :, 1:], xBC[:, :, None].to(state.conv_state.dtype)], dim=-1)
        state.conv_state.copy_(conv_in)
        # (F.conv1d would do, but for one output position it costs ~10x this dot product on CPU.)
        xBC = F.silu(torch.linalg.vecdot(conv_in.to(xBC.dtype), self.conv1d.weight[:, 0]) + self.conv1d.bias)
        x, B, C = self._split_xbc(xBC)  # x (B, nheads, headdim), B/C (B, ngroups, d_state)

        # state <- exp(dt A) state + dt x B^T per head; the heads of a group share B and C.
        dt, A = self._dt_A(dt)  # (B, nheads), (nheads,)
        b, g = x.shape[0], self.ngroups
        s = state.ssm_state.view(b, g, self.nheads // g, self.headdim, self.d_state)
        s.mul_(torch.exp(dt * A).to(s.dtype).view(b, g, -1, 1, 1))
        s.addcmul_((x * dt[..., None]).to(s.dtype).view(b, g, -1, self.headdim, 1), B.to(s.dtype).view(b, g, 1, 1, -1))
        y = (s.view(b, g, -1, self.d_state) @ C.to(s.dtype).view(b, g, -1, 1)).view(b, self.nheads, self.headdim)
        y = y.to(x.dtype)
        y = torch.addcmul(y, x, self.D.to(x.dtype)[:, None])
        y = self.norm(y.reshape(b, self.d_inner), z)
        return self.out_proj(y)[:, None]

    # --- cuda backend (mamba_ssm kernels) --------------------------------------------------------

    def _forward_cuda(self, u: torch.Tensor, state: SSMState | None) -> torch.Tensor:
        k = _cuda_kernels()
        batch, seqlen, _ = u.shape
        z, xBC, dt = self._split(self.in_proj(u))
        if xBC.stride(1) % 8 or xBC.stride(0) % 8:
            # causal_conv1d's channel-last kernel requires x.stride(0) and x.stride(2) to be multiples
            # of 8 (TORCH_CHECK in csrc/causal_conv1d.cpp). As a view into in_proj's output the stride is
            # 2 * d_inner + 2 * ngroups * d_state + nheads: not one when nheads is not (smollm2_135m:
            # 2313). A contiguous copy has stride conv_dim, which the kernel needs divisible by 8 anyway.
            xBC = xBC.contiguous()
        xBC_t = xBC.transpose(1, 2)  # (B, conv_dim, T) channel-last view, what the conv kernel wants
        initial_conv = None
        if state is not None:
            # causal_conv1d takes the previous d_conv-1 inputs, channel-last like x.
            initial_conv = state.conv_state[:, :, 1:].to(xBC.dtype).transpose(1, 2).contiguous().transpose(1, 2)
            state.conv_state.copy_(torch.cat([state.conv_state.to(xBC.dtype), xBC_t], dim=-1)[:, :, -self.d_conv:])
        xBC = k.causal_conv1d_fn(xBC_t, self.conv1d.weight[:, 0], self.conv1d.bias, initial_states=initial_conv,
                                 activation="silu").transpose(1, 2)
        x, B, C = self._split_xbc(xBC)
        A = -torch.exp(self.A_log.float())
        out = k.mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
            initial_states=None if state is None else state.ssm_state, return_final_states=state is not None)
        if state is not None:
            y, final_state = out
            state.ssm_state.copy_(final_state)
        else:
            y = out
        y = k.rmsnorm_fn(y.reshape(batch, seqlen, self.d_inner), self.norm.weight, None, z=z, eps=self.norm.eps,
                         group_size=self.d_inner // self.ngroups, norm_before_gate=False)
        return self.out_proj(y)

    def _step_cuda(self, u: torch.Tensor, state: SSMState) -> torch.Tensor:
        k = _cuda_kernels()
        z, xBC, dt = self._split(self.in_proj(u[:, 0]))
        xBC = k.causal_conv1d_update(xBC, state.conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, "silu")
        x, B, C = self._split_xbc(xBC)
        # selective_state_update is written for per-channel parameters: broadcast the per-head ones.
        p, n = self.headdim, self.d_state
        A = (-torch.exp(self.A_log.float()))[:, None, None].expand(self.nheads, p, n)
        y = k.selective_state_update(state.ssm_state, x, dt[..., None].expand(-1, -1, p), A, B, C,
                                     D=self.D[:, None].expand(-1, p), z=None,
                                     dt_bias=self.dt_bias[:, None].expand(-1, p), dt_softplus=True)
        y = k.rmsnorm_fn(y.reshape(-1, self.d_inner), self.norm.weight, None, z=z, eps=self.norm.eps,
                         group_size=self.d_inner // self.ngroups, norm_before_gate=False)
        return self.out_proj(y)[:, None]
