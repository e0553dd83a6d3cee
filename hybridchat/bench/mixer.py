"""Sequence-mixing op benchmark: fwd+bwd time and peak memory against sequence length.

    python -m hybridchat.bench mixer [--lengths 256 512 1024 2048 4096 8192] [--batch 4] [--d-model 256]
                                     [--threads 1] [--impls ssd loop sdpa hf_mamba2 mambapy]

Only the mixing op runs (what differs between the layers; the projections around it cost the same
for attention and Mamba-2 up to a constant), on the shapes a d_model-wide layer gives it:

- ssd:       our chunked SSD scan (hybridchat.model.mamba.ssd_chunked), chunk 64, expand 2,
             headdim 64, d_state 64, one group;
- loop:      the token-by-token Mamba-2 recurrence (ssd_recurrent), same shapes;
- sdpa:      causal scaled_dot_product_attention, head_dim 64;
- hf_mamba2: transformers' pure-PyTorch Mamba-2 scan (models.mamba2 mamba2_chunk_scan), same shapes
             and chunk size as ssd (when transformers is installed);
- mambapy:   mambapy's Mamba-1 selective scan with its parallel pscan, d_inner 2*d_model,
             d_state 16 (when mambapy is installed).

Time is the best of --reps runs after a warm-up. Peak memory is the most memory allocated at once
during one fwd+bwd beyond the inputs (CPU: from the profiler's allocation events; CUDA:
max_memory_allocated). Slow or memory-hungry references stop at --max-loop-len / --max-mambapy-len.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

from hybridchat.bench import report
from hybridchat.model.mamba import ssd_chunked, ssd_recurrent

HEADDIM, D_STATE, CHUNK = 64, 64, 64


def _leaf(*shape, device, scale=1.0, positive=False):
    t = torch.rand(*shape, device=device) * scale if positive else torch.randn(*shape, device=device) * scale
    return t.requires_grad_()


def _mamba2_inputs(batch, length, d_model, device):
    nheads = 2 * d_model // HEADDIM
    x = _leaf(batch, length, nheads, HEADDIM, device=device)
    dt = _leaf(batch, length, nheads, device=device, scale=0.1, positive=True)
    A = -torch.linspace(1.0, 16.0, nheads, device=device)
    B = _leaf(batch, length, 1, D_STATE, device=device, scale=D_STATE ** -0.5)
    C = _leaf(batch, length, 1, D_STATE, device=device, scale=D_STATE ** -0.5)
    return x, dt, A, B, C


def op_ssd(batch, length, d_model, device):
    x, dt, A, B, C = _mamba2_inputs(batch, length, d_model, device)
    return (lambda: ssd_chunked(x, dt, A, B, C, CHUNK)[0]), [x, dt, B, C]


def op_loop(batch, length, d_model, device):
    x, dt, A, B, C = _mamba2_inputs(batch, length, d_model, device)
    return (lambda: ssd_recurrent(x, dt, A, B, C)[0]), [x, dt, B, C]


def op_sdpa(batch, length, d_model, device):
    q, k, v = (_leaf(batch, d_model // HEADDIM, length, HEADDIM, device=device) for _ in range(3))
    return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), [q, k, v]


def op_hf_mamba2(batch, length, d_model, device):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # its kernel hub lookup must never download
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    x, dt, A, B, C = _mamba2_inputs(batch, length, d_model, device)
    return (lambda: mamba2_chunk_scan(x, dt, A, B, C, CHUNK)), [x, dt, B, C]


def op_mambapy(batch, length, d_model, device):
    from mambapy.mamba import MambaBlock, MambaConfig

    block = MambaBlock(MambaConfig(d_model=d_model, n_layers=1)).to(device)
    d_inner, d_state = block.config.d_inner, block.config.d_state
    x = _leaf(batch, length, d_inner, device=device)
    delta = _leaf(batch, length, d_inner, device=device, scale=0.1, positive=True)
    B = _leaf(batch, length, d_state, device=device, scale=d_state ** -0.5)
    C = _leaf(batch, length, d_state, device=device, scale=d_state ** -0.5)
    A = -torch.exp(block.A_log.detach())
    D = block.D.detach()
    return (lambda: block.selective_scan(x, delta, A, B, C, D)), [x, delta, B, C]


OPS: dict[str, Callable] = {"ssd": op_ssd, "loop": op_loop, "sdpa": op_sdpa, "hf_mamba2": op_hf_mamba2,
                            "mambapy": op_mambapy}
PEERS = ("hf_mamba2", "mambapy")


def _fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None
    fn().sum().backward()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, leaves, reps, device) -> float:
    _fwd_bwd(fn, leaves)  # warm-up
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        _fwd_bwd(fn, leaves)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _peak_mb(fn, leaves, device) -> float:
    for t in leaves:
        t.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _fwd_bwd(fn, leaves)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _fwd_bwd(fn, leaves)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def _available(name: str) -> str | None:
    module = {"hf_mamba2": "transformers", "mambapy": "mambapy"}.get(name)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "peer not installed"
        return f"{module} not importable ({type(e).__name__})"
    return None


def _targets(rows: list[dict]) -> list[dict]:
    """The targets this project set for the torch SSD scan, checked against the measured rows."""
    ms = {(r["impl"], r["seq_len"]): r["fwd_bwd_ms"] for r in rows if r.get("fwd_bwd_ms") is not None}
    checks = []

    def check(name, value, goal, ok):
        checks.append({"target": name, "measured": None if value is None else round(value, 2), "goal": goal,
                       "status": "not measured" if value is None else ("met" if ok(value) else "MISSED")})

    for length, goal in ((2048, 1.5), (8192, 3.0)):
        value = ms[("sdpa", length)] / ms[("ssd", length)] if ("sdpa", length) in ms and ("ssd", length) in ms else None
        check(f"ssd speed-up over sdpa at L={length}", value, f">= {goal}x", lambda v, g=goal: v >= g)
    for length in sorted({L for (impl, L) in ms if impl in PEERS and L >= 1024}):
        peer = min((ms[(p, length)], p) for p in PEERS if (p, length) in ms)
        value = peer[0] / ms[("ssd", length)] if ("ssd", length) in ms else None
        check(f"ssd speed-up over fastest peer ({peer[1]}) at L={length}", value, ">= 3x", lambda v: v >= 3)
    value = None
    if ("ssd", 1024) in ms and ("ssd", 8192) in ms:
        value = (ms[("ssd", 8192)] / 8192) / (ms[("ssd", 1024)] / 1024)
    check("ssd time per token, L=8192 over L=1024", value, "<= 1.5x", lambda v: v <= 1.5)
    return checks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hybridchat.bench mixer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--impls", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0: torch's default")
    parser.add_argument("--max-loop-len", type=int, default=2048)
    parser.add_argument("--max-mambapy-len", type=int, default=2048,
                        help="mambapy materialises (B, L, d_inner, d_state) several times: ~GBs beyond this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="outputs/bench/mixer")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    limits = {"loop": args.max_loop_len, "mambapy": args.max_mambapy_len}

    rows = []
    for name in args.impls:
        missing = _available(name)
        for length in args.lengths:
            row = {"impl": name, "seq_len": length}
            if missing:
                row["note"] = missing
            elif length > limits.get(name, length):
                row["note"] = f"skipped above L={limits[name]}"
            else:
                torch.manual_seed(0)
                try:
                    fn, leaves = OPS[name](args.batch, length, args.d_model, device)
                    row["fwd_bwd_ms"] = _time_ms(fn, leaves, args.reps, device)
                    row["ms_per_1k_tok"] = row["fwd_bwd_ms"] / (args.batch * length) * 1000
                    row["peak_MB"] = _peak_mb(fn, leaves, device)
                    del fn, leaves
                except (RuntimeError, MemoryError) as e:  # e.g. out of memory: a row, not a crash
                    row["note"] = f"{type(e).__name__}: {e}"[:120]
            print(row, flush=True)
            rows.append(row)

    checks = _targets(rows)
    series = {name: [(r["seq_len"], r["fwd_bwd_ms"], r["peak_MB"]) for r in rows
                     if r["impl"] == name and r.get("fwd_bwd_ms") is not None] for name in args.impls}
    fig = report.two_panel_figure(series, ("fwd+bwd time (ms)", "peak memory beyond inputs (MB)"), "sequence length",
                                  suptitle=f"mixing op, batch {args.batch}, d_model {args.d_model}, {device.type}, "
                                           f"{torch.get_num_threads()} threads")
    report.save("mixer", rows, ["impl", "seq_len", "fwd_bwd_ms", "ms_per_1k_tok", "peak_MB", "note"], args.out,
                figure=fig, targets=checks, config=vars(args))
    print(report.format_table(checks, ["target", "measured", "goal", "status"]))
