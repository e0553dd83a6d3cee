"""Decode benchmark: per-token latency and inference-cache bytes against context length.

    python -m hybridchat.bench decode [--contexts 256 1024 4096 8192 16384] [--n-layer 8] [--steps 32]
                                      [--batch 1] [--threads 1] [--checkpoints DIR ...]

Three models of the tiny size (conf/model/*_tiny.yaml: n_embd 256, 4 heads, 2 KV heads) with
--n-layer layers: a transformer (all_attention), a pure Mamba-2 model (all_mamba) and a Jamba-style
hybrid (jamba: one attention layer in 8); or, with --checkpoints, the models of those checkpoints
(a teacher and its distilled student: what the conversion buys). For each context length L the cache is allocated for
L + steps tokens and its position set to L, then --steps single-token forwards are timed (median).
The cache is not filled by a real prefill: a decode step's cost depends on how many positions are
cached, not on their values, and a 16K-token prefill of the transformer would dominate the run.
`cache_MB` is the size of a cache allocated for exactly L tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from hybridchat.bench import report
from hybridchat.infra import checkpoint
from hybridchat.infra.build import build_model
from hybridchat.model.lm import HybridLM
from hybridchat.training.runs import load_run

MODELS = {"transformer": ("transformer_tiny", "all_attention"), "mamba": ("mamba_tiny", "all_mamba"),
          "hybrid": ("hybrid_tiny", "jamba")}


def _model_config(preset: str, pattern: str, n_layer: int):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from hybridchat.infra import config as schema
    from hybridchat.training.stages import stage_schemas

    schema.register(stage_schemas())
    GlobalHydra.instance().clear()
    conf_dir = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={preset}", f"model/block_pattern={pattern}",
                                           f"model.n_layer={n_layer}", "run_name=bench"])
    return OmegaConf.to_object(cfg.model)


@torch.inference_mode()
def decode_ms(model: HybridLM, context: int, steps: int, batch: int, device) -> tuple[float, int]:
    cache = model.allocate_cache(batch, context + steps + 3)
    cache.pos = context  # see the module docstring: cost depends on the position, not the values
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    times = []
    for i in range(steps + 3):  # 3 warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(token, cache=cache, last_only=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, model.allocate_cache(batch, context).nbytes()


def _targets(rows: list[dict], contexts: list[int]) -> list[dict]:
    at = {(r["model"], r["context"]): r for r in rows}
    checks = []

    def check(name, value, goal, ok):
        checks.append({"target": name, "measured": None if value is None else round(value, 3), "goal": goal,
                       "status": "not measured" if value is None else ("met" if ok(value) else "MISSED")})

    lo, hi = min(contexts), max(contexts)
    value = None
    if ("mamba", lo) in at and ("mamba", hi) in at:
        value = at[("mamba", hi)]["ms_per_token"] / at[("mamba", lo)]["ms_per_token"]
    check(f"mamba ms/token at L={hi} over L={lo}", value, "<= 1.2x", lambda v: v <= 1.2)
    value = None
    if ("hybrid", 8192) in at and ("transformer", 8192) in at:
        value = at[("hybrid", 8192)]["cache_MB"] / at[("transformer", 8192)]["cache_MB"]
    check("hybrid cache / transformer cache at L=8192", value, "<= 1/6 (0.167)", lambda v: v <= 1 / 6)
    value = None
    if ("hybrid", 16384) in at and ("transformer", 16384) in at:
        value = at[("hybrid", 16384)]["tok_per_s"] / at[("transformer", 16384)]["tok_per_s"]
    check("hybrid tokens/s over transformer at L=16384", value, ">= 3x", lambda v: v >= 3)
    return checks


def _models(args) -> dict[str, Callable[[], HybridLM]]:
    """name -> builder: the checkpoints' own models when given (e.g. a teacher and its distilled
    student), else the tiny presets with fresh weights (decode cost does not depend on them)."""
    if args.checkpoints:
        def load(path: Path) -> HybridLM:
            return load_run(path).model

        paths = [Path(p) if (Path(p) / "meta.json").is_file() else checkpoint.latest(Path(p)) or Path(p)
                 for p in args.checkpoints]
        return {"/".join(p.parts[-3:-1]): partial(load, p) for p in paths}

    def fresh(preset: str, pattern: str) -> HybridLM:
        torch.manual_seed(0)
        model = build_model(_model_config(preset, pattern, args.n_layer), args.vocab)
        model.init_weights()
        return model

    return {name: partial(fresh, *MODELS[name]) for name in args.models}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hybridchat.bench decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", nargs="+", type=int, default=[256, 1024, 4096, 8192, 16384])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--checkpoints", nargs="+", default=[],
                        help="checkpoint step (or stage) folders to measure instead of --models, e.g. a teacher "
                             "and its distilled student")
    parser.add_argument("--n-layer", type=int, default=8, help="8: the jamba hybrid gets exactly 1 attention layer")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0: torch's default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="outputs/bench/decode")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = []
    for name, build in _models(args).items():
        model = build().to(device).eval()
        for context in args.contexts:
            ms, nbytes = decode_ms(model, context, args.steps, args.batch, device)
            row = {"model": name, "pattern": model.pattern, "context": context, "ms_per_token": ms,
                   "tok_per_s": args.batch * 1e3 / ms, "cache_MB": nbytes / 2**20}
            print(row, flush=True)
            rows.append(row)

    checks = _targets(rows, args.contexts)
    series = {name: [(r["context"], r["ms_per_token"], r["cache_MB"]) for r in rows if r["model"] == name]
              for name in dict.fromkeys(r["model"] for r in rows)}
    fig = report.two_panel_figure(series, ("decode latency (ms / token)", "inference cache (MB)"), "context length",
                                  suptitle=f"decode, batch {args.batch}, {args.n_layer} layers, {device.type}, "
                                           f"{torch.get_num_threads()} threads")
    report.save("decode", rows, ["model", "pattern", "context", "ms_per_token", "tok_per_s", "cache_MB"], args.out,
                figure=fig, targets=checks, config=vars(args))
    print(report.format_table(checks, ["target", "measured", "goal", "status"]))
