"""GPU check: does the GPU path work on this machine, and how fast is it? One table in minutes.

    python -m hybridchat.bench gpu_check [--gpu PRESET] [--device cuda|cpu] [--quick] [--only STEP ...]

Steps, each in a process of its own under its own time limit (together at most 10 minutes); a step
that fails or runs out of time becomes a FAILED row and the others still run:

- pytest:                 the `gpu`-marked tests (skipped without CUDA);
- train_hybrid_d12,
  train_transformer_d12:  short `python -m hybridchat.train` runs with the preset's bf16 +
                          torch.compile; tokens/s and MFU are medians of the steps after the first
                          third (those include compilation), read from the run's metrics.jsonl;
- pipeline:               pretrain -> mid -> rag -> evaluate at smoke sizes on the preset, as `make
                          smoke` runs them: seconds and torch.compile recompilations per stage (the
                          conversation stages' batches of varying width must not recompile each step);
- scan:                   our torch SSD scan against SDPA, fwd+bwd at 2K and 8K tokens
                          (`python -m hybridchat.bench mixer`);
- kernels:                the mamba_ssm scan kernel against our scan (largest difference, fwd+bwd
                          time) when mamba_ssm is installed.

The preset comes from the GPU's name (an H200 computes like an H100: h100; anything unknown: h100)
unless --gpu names one. `--device cpu --quick` runs the same steps at toy sizes (the test suite does).
Exit status 1 when a step failed. On a machine without network: launchers/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from hybridchat.bench import mixer, report
from hybridchat.model.mamba import ssd_chunked

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["step", "status", "seconds", "tok_per_s", "mfu", "detail"]
# Set for every step's processes: the gpu-marked test that runs this whole check skips itself there.
INSIDE_ENV = "HYBRIDCHAT_GPU_CHECK"
# Output differences beyond this fraction of the output's scale are a wrong kernel, not rounding
# (the Triton kernel's fp32 dots may run in TF32).
KERNEL_RTOL = 5e-3


class Skipped(Exception):
    """The step does not apply here (no CUDA, kernels not installed): a row, not a failure."""


def preset_for(device_name: str) -> str:
    """The gpu preset whose name appears in the device's ("NVIDIA GeForce RTX 4090" -> rtx4090), else h100."""
    name = device_name.lower().replace(" ", "")
    presets = sorted((p.stem for p in (ROOT / "conf" / "gpu").glob("*.yaml") if p.stem != "cpu"), key=len, reverse=True)
    return next((p for p in presets if p in name), "h100")


def _run(cmd: list[str], limit_s: float, log: Path, env: dict[str, str] | None = None) -> str:
    """Run cmd under a time limit and return its output (also written to `log`). It gets a session of
    its own, so that a timeout also ends what it started (compile workers, pytest's subprocesses).
    env: variables added to this process's environment."""
    # Unbuffered: a killed step's log is complete. HYDRA_FULL_ERROR: the exception is the output's last line.
    env = {**os.environ, INSIDE_ENV: "1", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        log.write_text(output)
        raise TimeoutError(f"over its {limit_s:.0f} s limit (log: {log})") from None
    log.write_text(output)
    if proc.returncode != 0:
        last = next((line for line in reversed(output.splitlines()) if line.strip()), "")
        raise RuntimeError(f"exit code {proc.returncode}: {last.strip()[:200]} (log: {log})")
    return output


def _child(queue, fn, args) -> None:
    try:
        queue.put(fn(*args))
    except Skipped as e:
        queue.put(("skipped", str(e)))
    except Exception as e:  # noqa: BLE001 - the parent turns it into the step's row
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _in_child(fn: Callable[..., dict], limit_s: float, *args) -> dict:
    """fn(*args) in a fresh process, so that a crashing kernel takes only its own step down."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    proc.join(limit_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"over its {limit_s:.0f} s limit")
    if queue.empty():
        raise RuntimeError(f"the process died with exit code {proc.exitcode}")
    result = queue.get()
    if isinstance(result, tuple):
        kind, message = result
        raise (Skipped if kind == "skipped" else RuntimeError)(message)
    return result


# -----------------------------------------------------------------------------------------------
# The steps: each takes the options and its time limit and returns its row's fields, or raises.


def step_pytest(args, limit_s: float) -> dict:
    if args.device != "cuda":
        raise Skipped("no CUDA")
    output = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], limit_s,
                  args.out / "pytest.log")
    return {"detail": output.strip().splitlines()[-1]}


def step_train(model: str, args, limit_s: float) -> dict:
    name = f"train_{model}"
    run_dir = args.out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: an earlier check's steps must not count
    steps = args.train_steps
    # Evaluation and the checkpoint only at the start and the end: the timed steps are training steps.
    overrides = [f"model={model}", f"gpu={args.gpu}", f"stage.num_steps={steps}", f"stage.eval_every={steps}",
                 f"stage.checkpoint_every={steps}", f"paths.outputs={args.out / 'work'}", f"hydra.run.dir={run_dir}",
                 f"run_name=gpu_check_{model}", "progress=false"]
    # Toy sizes on --quick; else the d12 models' real 32K vocabulary (the world's tokenizer has 4K), so
    # that the LM head costs what it costs in training on real data.
    overrides.append("debug=smoke" if args.quick else "model.vocab_size=32768")
    output = _run([sys.executable, "-m", "hybridchat.train", *overrides], limit_s, args.out / f"{name}.log")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/tok_per_s" in r]
    timed = train[len(train) // 3:]
    if not timed:
        raise RuntimeError(f"no training steps in {run_dir / 'metrics.jsonl'}")
    params = re.search(r"([\d.]+)M parameters", output)
    row = {"tok_per_s": statistics.median(r["train/tok_per_s"] for r in timed),
           "detail": f"gpu={args.gpu}, {params.group(1) if params else '?'}M params, loss "
                     f"{train[0]['train/loss']:.2f} -> {train[-1]['train/loss']:.2f}, median of steps "
                     f"{timed[0]['step']}-{timed[-1]['step']}"}
    if "train/mfu" in timed[0]:  # presets without a peak FLOP/s (cpu) log none
        row["mfu"] = statistics.median(r["train/mfu"] for r in timed)
    return row


# The pipeline step: `make smoke`'s sizes (512 tokens: room for rag's documents), with Mamba chunks of
# 64 tokens as the real models have (smoke's 16 would make twice the chunk counts to compile for).
PIPELINE_SEQUENCE_LEN, PIPELINE_CHUNK = 512, 64
# What dynamo logs under TORCH_LOGS=recompiles for each recompilation (torch 2.x), and once a function
# has recompiled config.recompile_limit times (8) and runs eagerly from then on: a count that stops
# there would hide a stage that makes a new shape every step, so the limit's line fails the step too.
RECOMPILE_LINE = "Recompiling function"
RECOMPILE_LIMIT_LINE = "hit config.recompile_limit"


def recompile_bound(sequence_len: int, chunk_size: int) -> int:
    """The most recompilations a compiled training stage may do. The SSD scan's loop over chunks is
    unrolled, so each new number of chunks is a new graph; padded_width's power-of-two widths up to
    sequence_len give log2(sequence_len / chunk_size) + 1 of them (1, 2, 4, 8 at 512 / 64), and one
    more for dynamo's first recompilation, after which it traces the width as a symbol. Unpadded
    batches of 20 random widths make about 7 (a dynamo count with the eager backend)."""
    return (sequence_len // chunk_size).bit_length() + 1


def count_recompiles(output: str) -> int:
    """Recompilations in a TORCH_LOGS=recompiles log."""
    return sum(RECOMPILE_LINE in line for line in output.splitlines())


def step_pipeline(args, limit_s: float) -> dict:
    work = args.out / "pipeline"
    shutil.rmtree(work, ignore_errors=True)  # a fresh run: no checkpoint of an earlier check to resume from
    # The evaluator finds the rag checkpoint by paths.outputs and run_name; the sizes come with it.
    common = [f"gpu={args.gpu}", f"paths.outputs={work}", "run_name=gpu_check_pipeline"]
    train = [*common, "debug=smoke", f"model.sequence_len={PIPELINE_SEQUENCE_LEN}",
             f"model.chunk_size={PIPELINE_CHUNK}", "progress=false"]
    # 20 steps on a GPU: batches of new widths at every step would show as recompilations past the
    # bound (the H200's first run: 6 mid steps of 20-50 s each, its recompilations not logged).
    steps = 2 if args.quick else 20
    stage_steps = [f"stage.num_steps={steps}", f"stage.eval_every={steps}", f"stage.checkpoint_every={steps}"]
    evaluation = (["n_questions=6", "n_unanswerable=4", "context_budget=[1]", "context_questions=4", "bootstrap=20"]
                  if args.quick else ["n_questions=30", "n_unanswerable=20", "context_budget=[1,2]",
                                      "context_questions=10", "bootstrap=200"])
    # Pretraining's fixed-width batches compile in the train_* steps already: here it only makes the
    # checkpoint, uncompiled. mid and rag (batches of varying width) run compiled as the preset says.
    commands = {stage: ["hybridchat.train", f"stage={stage}", *train, *stage_steps, *extra,
                        f"hydra.run.dir={work}/runs/{stage}"]
                for stage, extra in (("pretrain", ["gpu.compile=false"]), ("mid", []), ("rag", []))}
    commands["evaluate"] = ["hybridchat.evaluate", *common, *evaluation, f"hydra.run.dir={work}/runs/evaluate"]
    deadline = time.perf_counter() + limit_s
    bound = recompile_bound(PIPELINE_SEQUENCE_LEN, PIPELINE_CHUNK)
    parts, recompiles, over = [], {}, []
    for name, cmd in commands.items():
        t0, log = time.perf_counter(), args.out / f"pipeline_{name}.log"
        try:
            output = _run([sys.executable, "-m", *cmd], max(deadline - t0, 1), log, env={"TORCH_LOGS": "recompiles"})
        except (TimeoutError, RuntimeError) as e:  # what the stages before it measured stays in the row
            so_far = f" ({count_recompiles(log.read_text())} recompiles so far)" if log.is_file() else ""
            raise RuntimeError(f"{name}{so_far}: {e}; before it: {', '.join(parts) or 'nothing'}") from None
        seconds = time.perf_counter() - t0
        if name == "evaluate":  # generation runs the model eagerly: nothing to recompile
            parts.append(f"{name} {seconds:.0f} s")
            continue
        recompiles[name] = count_recompiles(output)
        parts.append(f"{name} {seconds:.0f} s ({recompiles[name]} recompiles)")
        if recompiles[name] > bound or RECOMPILE_LIMIT_LINE in output:
            over.append(name)
    detail = f"gpu={args.gpu}, " + ", ".join(parts)
    if over:
        raise RuntimeError(f"{', '.join(over)} recompiled more than {bound} times or hit dynamo's recompile "
                           f"limit: {detail}")
    return {"detail": detail, "recompiles": recompiles}


def step_scan(args, limit_s: float) -> dict:
    lengths = (128, 256) if args.quick else (2048, 8192)
    sizes = ["--batch", "1", "--d-model", "64", "--reps", "1"] if args.quick else \
        ["--batch", "4", "--d-model", "768", "--reps", "3", "--threads", "0"]
    out = args.out / "mixer"
    _run([sys.executable, "-m", "hybridchat.bench", "mixer", "--impls", "ssd", "sdpa", "--lengths",
          *map(str, lengths), "--device", args.device, "--out", str(out), *sizes], limit_s, args.out / "scan.log")
    ms = {}
    for r in json.loads((out / "mixer.json").read_text())["rows"]:
        if r.get("fwd_bwd_ms") is None:
            raise RuntimeError(f"{r['impl']} at L={r['seq_len']}: {r.get('note')}")
        ms[r["impl"], r["seq_len"]] = r["fwd_bwd_ms"]
    parts = [f"L={n}: ssd {ms['ssd', n]:.3g} ms, sdpa {ms['sdpa', n]:.3g} ms ({ms['sdpa', n] / ms['ssd', n]:.2f}x)"
             for n in lengths]
    return {"detail": "fwd+bwd fp32; " + "; ".join(parts), "ms": {f"{impl}@{n}": v for (impl, n), v in ms.items()}}


def compare_scans(kernel: Callable, device: str, batch: int, length: int, d_model: int, reps: int) -> dict:
    """Our chunked scan against `kernel` (same contract: y from x, dt, A, B, C) on the mixer benchmark's
    inputs: the largest difference of y and of dy/dx, each relative to its scale, and fwd+bwd times."""
    torch.manual_seed(0)
    x, dt, A, B, C = mixer._mamba2_inputs(batch, length, d_model, torch.device(device))
    leaves = [x, dt, B, C]
    fns = {"torch": lambda: ssd_chunked(x, dt, A, B, C, mixer.CHUNK)[0], "kernel": lambda: kernel(x, dt, A, B, C)}
    outputs, grads = {}, {}
    for name, fn in fns.items():
        x.grad = None
        y = fn()
        y.square().sum().backward()
        outputs[name], grads[name] = y.detach().float(), x.grad.float()

    def rel_diff(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    return {"y_rel_diff": rel_diff(outputs["kernel"], outputs["torch"]),
            "dx_rel_diff": rel_diff(grads["kernel"], grads["torch"]),
            **{f"{name}_ms": mixer._time_ms(fn, leaves, reps, torch.device(device)) for name, fn in fns.items()}}


def _mamba_ssm_vs_torch(device: str, quick: bool) -> dict:
    from hybridchat.model.mamba import _load_cuda_kernels

    kernels, error = _load_cuda_kernels()
    if kernels is None:
        raise Skipped(f"mamba_ssm installed but not importable: {error}")

    def kernel(x, dt, A, B, C):
        return kernels.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=mixer.CHUNK)

    return compare_scans(kernel, device, *((1, 256, 64, 1) if quick else (4, 8192, 768, 3)))


def step_kernels(args, limit_s: float) -> dict:
    if importlib.util.find_spec("mamba_ssm") is None:  # looked up, not imported: no CUDA init here
        raise Skipped("mamba_ssm not installed")
    if args.device != "cuda":
        raise Skipped("no CUDA")
    r = _in_child(_mamba_ssm_vs_torch, limit_s, args.device, args.quick)
    detail = (f"fp32 scan, relative max diff y {r['y_rel_diff']:.1e}, dy/dx {r['dx_rel_diff']:.1e}; fwd+bwd "
              f"kernel {r['kernel_ms']:.3g} ms, torch {r['torch_ms']:.3g} ms ({r['torch_ms'] / r['kernel_ms']:.2f}x)")
    if max(r["y_rel_diff"], r["dx_rel_diff"]) > KERNEL_RTOL:
        raise RuntimeError(f"kernel and torch scan disagree beyond {KERNEL_RTOL}: {detail}")
    return {"detail": detail, **r}


# name -> (time limit in seconds, step). The limits add up to 9 min 50 s; --quick runs far below them.
STEPS: dict[str, tuple[float, Callable[[argparse.Namespace, float], dict]]] = {
    "pytest": (60, step_pytest),
    "train_hybrid_d12": (130, partial(step_train, "hybrid_d12")),
    "train_transformer_d12": (110, partial(step_train, "transformer_d12")),
    "pipeline": (200, step_pipeline),
    "scan": (40, step_scan),
    "kernels": (50, step_kernels),
}


def run_step(name: str, args) -> dict:
    limit_s, step = STEPS[name]
    t0 = time.perf_counter()
    try:
        row = {"status": "ok", **step(args, limit_s)}
    except Skipped as e:
        row = {"status": "skipped", "detail": str(e)}
    except Exception as e:  # noqa: BLE001 - one failing step must not hide the others
        row = {"status": "FAILED", "detail": f"{type(e).__name__}: {e}"[:300]}
    row = {"step": name, **row, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"[gpu_check] {name}: {row['status']} in {row['seconds']:.0f} s", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hybridchat.bench gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu", help="gpu preset for the training runs; default: from the GPU's name (cpu on CPU)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: seconds on a CPU")
    parser.add_argument("--train-steps", type=int, help="steps per training run; default 30 (--quick: 4)")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), default=list(STEPS), metavar="STEP",
                        help=f"run only these steps ({', '.join(STEPS)})")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/gpu_check"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("torch.cuda.is_available() is False here; use --device cpu --quick to try the check")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    args.gpu = args.gpu or (preset_for(device_name) if args.device == "cuda" else "cpu")
    args.train_steps = args.train_steps or (4 if args.quick else 30)
    args.out = args.out.resolve()  # the steps run from the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"[gpu_check] device {device_name}, preset gpu={args.gpu}{', quick' if args.quick else ''}", flush=True)

    rows = [run_step(name, args) for name in args.only]
    report.save("gpu_check", rows, COLUMNS, args.out, device=device_name, preset=args.gpu, quick=args.quick,
                limits_s={name: STEPS[name][0] for name in args.only})
    failed = [r["step"] for r in rows if r["status"] == "FAILED"]
    if failed:
        sys.exit(f"gpu_check: {len(failed)} step(s) failed: {', '.join(failed)} (logs in {args.out})")
