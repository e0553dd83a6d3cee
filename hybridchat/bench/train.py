"""Training-step throughput and peak memory of the tiny models against sequence length.

    python -m hybridchat.bench train [--models transformer_tiny mamba_tiny hybrid_tiny]
                                     [--lengths 256 1024 4096] [--batch-tokens 8192] [--gpu cpu]
                                     [--newton-schulz auto bfloat16 float32]

Each (model, length) runs in a fresh process so that peak memory is that configuration's own: peak
resident set size (CPU) or torch.cuda.max_memory_allocated (CUDA). The batch holds --batch-tokens
tokens at every length (batch = batch_tokens / length), so tokens/s compare directly.
--newton-schulz runs each configuration once per dtype of Muon's Newton-Schulz iterations (auto:
bfloat16 on CUDA, float32 elsewhere, training/muon.py; bfloat16 everywhere is torch.optim.Muon).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

from hybridchat.bench import report


def _compose_model(model: str, gpu: str, length: int):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from hybridchat.infra import config as schema
    from hybridchat.training.stages import stage_schemas

    schema.register(stage_schemas())
    conf_dir = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", f"gpu={gpu}", f"model.sequence_len={length}",
                                           "run_name=bench"])
    return OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.gpu), OmegaConf.to_object(cfg.stage)


def _measure(model_name: str, gpu_name: str, length: int, batch_tokens: int, vocab: int, steps: int,
             newton_schulz: str, queue) -> None:
    from hybridchat.infra import runtime
    from hybridchat.infra.build import build_model
    from hybridchat.training.loop import build_optimizers
    from hybridchat.training.muon import Muon, iteration_dtype

    try:
        model_cfg, gpu_cfg, stage_cfg = _compose_model(model_name, gpu_name, length)
        rt = runtime.setup(gpu_cfg, seed=0)
        model = build_model(model_cfg, vocab, ssm_backend=gpu_cfg.ssm_backend.value).to(rt.device)
        model.init_weights()
        optimizers = build_optimizers(model, stage_cfg)
        ns_dtype = iteration_dtype(rt.device) if newton_schulz == "auto" else getattr(torch, newton_schulz)
        for opt in optimizers:
            if isinstance(opt, Muon):
                opt.ns_dtype = ns_dtype
        batch = max(1, batch_tokens // length)
        tokens = torch.randint(0, vocab, (batch, length + 1), device=rt.device)
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for i in range(steps + 2):  # 2 warm-up steps
            t0 = time.perf_counter()
            with rt.autocast():
                loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        seconds = sorted(times)[len(times) // 2]
        if rt.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:  # ru_maxrss is KiB on Linux, bytes on macOS
            scale = 1 if sys.platform == "darwin" else 1024
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
            base_mb = base_rss * scale / 2**20
        queue.put({"model": model_name, "pattern": model.pattern, "params_M": model.num_params() / 1e6,
                   "newton_schulz": str(ns_dtype).removeprefix("torch."), "seq_len": length, "batch": batch,
                   "step_ms": seconds * 1e3, "tok_per_s": batch * length / seconds, "peak_mem_MB": peak_mb,
                   **({"rss_before_step_MB": base_mb} if rt.device.type != "cuda" else {})})
    except Exception as e:  # report the failure (e.g. out of memory) as a row instead of dying
        queue.put({"model": model_name, "seq_len": length, "error": f"{type(e).__name__}: {e}"[:200]})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hybridchat.bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["transformer_tiny", "mamba_tiny", "hybrid_tiny"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 4096])
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--gpu", default="cuda_auto", help="gpu preset; default: rtx4090 if CUDA else cpu")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--newton-schulz", nargs="+", default=["auto"], choices=["auto", "bfloat16", "float32"],
                        help="dtype of Muon's Newton-Schulz iterations, one run per value")
    parser.add_argument("--out", default="outputs/bench/train")
    args = parser.parse_args(argv)
    gpu = args.gpu if args.gpu != "cuda_auto" else ("rtx4090" if torch.cuda.is_available() else "cpu")

    ctx = mp.get_context("spawn")
    rows = []
    runs = [(model, ns) for model in args.models for ns in args.newton_schulz]
    for model, ns in runs:
        for length in args.lengths:
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure, args=(model, gpu, length, args.batch_tokens, args.vocab, args.steps,
                                                      ns, queue))
            proc.start()
            proc.join()
            row = queue.get() if not queue.empty() else {"model": model, "seq_len": length,
                                                         "error": f"exit code {proc.exitcode}"}
            print(row, flush=True)
            rows.append({**row, "run": (model, ns)})

    def label(model: str, ns: str) -> str:
        return model if len(args.newton_schulz) == 1 else f"{model}, Newton-Schulz {ns}"
    series = {label(*run): [(r["seq_len"], r["tok_per_s"], r["peak_mem_MB"]) for r in rows
                            if r["run"] == run and "error" not in r] for run in runs}
    rows = [{k: v for k, v in r.items() if k != "run"} for r in rows]
    fig = report.two_panel_figure(series, ("training tokens / s", "peak memory (MB)"), "sequence length", log_y=False,
                                  suptitle=f"training step, {args.batch_tokens} tokens per batch, gpu={gpu}")
    report.save("train", rows, ["model", "pattern", "params_M", "newton_schulz", "seq_len", "batch", "step_ms",
                                "tok_per_s", "peak_mem_MB", "error"], args.out, figure=fig, gpu_preset=gpu,
                batch_tokens=args.batch_tokens)
