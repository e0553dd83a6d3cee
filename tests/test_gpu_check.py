"""The GPU check (python -m hybridchat.bench gpu_check): every step is a row, a failing or overrunning
step is a FAILED row and the others still run; on CPU it runs at toy sizes."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybridchat.bench import gpu_check
from hybridchat.model.mamba import ssd_recurrent

ROOT = Path(__file__).resolve().parents[1]


def test_quick_check_reports_every_step_and_a_planted_failure_does_not_hide_the_others(tmp_path, monkeypatch):
    def planted(args, limit_s):
        raise RuntimeError("planted failure")

    def overrun(args, limit_s):
        gpu_check._run([sys.executable, "-c", "import time; time.sleep(60)"], limit_s, args.out / "overrun.log")

    # The transformer run is replaced by the planted failure (it would cost as much as the hybrid's) and
    # the pytest step (skipped without CUDA anyway) by one that overruns its 1 s limit.
    monkeypatch.setitem(gpu_check.STEPS, "train_transformer_d12", (110, planted))
    monkeypatch.setitem(gpu_check.STEPS, "pytest", (1, overrun))
    # What is tested is the report, not this machine's speed: the pipeline gets room on a loaded machine.
    monkeypatch.setitem(gpu_check.STEPS, "pipeline", (900, gpu_check.step_pipeline))
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert "train_transformer_d12" in str(exit_info.value) and "pytest" in str(exit_info.value)

    rows = {r["step"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    assert list(rows) == list(gpu_check.STEPS)
    assert rows["train_transformer_d12"]["status"] == "FAILED" and "planted failure" in rows["train_transformer_d12"][
        "detail"]
    assert rows["pytest"]["status"] == "FAILED" and "over its 1 s limit" in rows["pytest"]["detail"]
    assert rows["pytest"]["seconds"] < 20  # killed at its limit, not after the sleep
    hybrid = rows["train_hybrid_d12"]
    assert hybrid["status"] == "ok" and hybrid["tok_per_s"] > 0 and "mfu" not in hybrid  # cpu: no peak FLOP/s
    assert "median of steps 2-4" in hybrid["detail"]
    assert rows["scan"]["status"] == "ok" and set(rows["scan"]["ms"]) == {"ssd@128", "ssd@256", "sdpa@128", "sdpa@256"}
    assert rows["kernels"]["status"] == "skipped"
    pipeline = rows["pipeline"]  # gpu=cpu: no compile, so nothing recompiles
    assert pipeline["status"] == "ok" and pipeline["recompiles"] == {"pretrain": 0, "mid": 0, "rag": 0}
    assert "evaluate" in pipeline["detail"] and (tmp_path / "pipeline" / "runs" / "evaluate" / "eval.json").exists()


def test_preset_follows_the_gpu_name():
    assert gpu_check.preset_for("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert gpu_check.preset_for("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_check.preset_for("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_check.preset_for("NVIDIA H200") == "h100"  # no preset of its own: an H100's compute


def test_scan_comparison_measures_differences_and_times():
    """The kernel comparison's arithmetic, with the token-by-token reference standing in for mamba_ssm."""
    result = gpu_check.compare_scans(lambda x, dt, A, B, C: ssd_recurrent(x, dt, A, B, C)[0], "cpu", 1, 32, 64, 1)
    assert result["y_rel_diff"] < 1e-5 and result["dx_rel_diff"] < 1e-5
    assert result["torch_ms"] > 0 and result["kernel_ms"] > 0
    wrong = gpu_check.compare_scans(lambda x, dt, A, B, C: ssd_recurrent(x, dt, A, B, C)[0] * 1.1, "cpu", 1, 32, 64, 1)
    assert wrong["y_rel_diff"] > gpu_check.KERNEL_RTOL


# What torch 2.13 prints under TORCH_LOGS=recompiles for a compiled function called with a new shape.
RECOMPILE_LOG = """\
V1128 22:22:40.043000 13629 torch/_dynamo/guards.py:5396] [0/1] [__recompiles] Recompiling function forward in lm.py:79
V1128 22:22:40.043000 13629 torch/_dynamo/guards.py:5396] [0/1] [__recompiles]     triggered by the following guard failure(s):
V1128 22:22:40.043000 13629 torch/_dynamo/guards.py:5396] [0/1] [__recompiles]     - 0/0: tensor 'idx' size mismatch at index 1. expected 64, actual 128
"""


def test_recompiles_are_counted_in_torch_logs():
    assert gpu_check.count_recompiles("step 1 loss 3.2\n") == 0
    assert gpu_check.count_recompiles(RECOMPILE_LOG * 3) == 3
    # A real compiled function with a new shape: the first call compiles, the second recompiles.
    code = ("import torch\nf = torch.compile(lambda x: x * 2, backend='eager', dynamic=False)\n"
            "f(torch.ones(2)); f(torch.ones(3))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TORCH_LOGS": "recompiles"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert gpu_check.count_recompiles(result.stdout + result.stderr) == 1


def test_pipeline_fails_when_a_stage_recompiles_past_the_bound(tmp_path, monkeypatch):
    # chunk counts 1, 2, 4, 8 at 512 tokens in chunks of 64, plus dynamo's first recompilation
    assert gpu_check.recompile_bound(512, 64) == 5 and gpu_check.recompile_bound(2048, 64) == 7
    bound = gpu_check.recompile_bound(gpu_check.PIPELINE_SEQUENCE_LEN, gpu_check.PIPELINE_CHUNK)
    recompiles = {"pretrain": 0, "mid": bound, "rag": 1}
    limit_hit = "W1128 convert_frame.py:1994] [0/8] torch._dynamo hit config.recompile_limit (8)\n"
    extra, commands = {}, {}

    def fake_run(cmd, limit_s, log, env=None):  # each stage's log with that many recompilations
        assert env == {"TORCH_LOGS": "recompiles"}
        stage = next((a.split("=")[1] for a in cmd if a.startswith("stage=")), "evaluate")
        commands[stage] = cmd
        output = RECOMPILE_LOG * recompiles.get(stage, 0) + extra.get(stage, "")
        if stage == "timeout":
            log.write_text(output)
            raise TimeoutError("over its 150 s limit")
        return output

    monkeypatch.setattr(gpu_check, "_run", fake_run)
    args = argparse.Namespace(out=tmp_path, gpu="h100", quick=True)
    assert gpu_check.step_pipeline(args, 150)["recompiles"] == recompiles  # at the bound: fine
    # pretraining runs uncompiled (its fixed shapes compile in the train_* steps); mid and rag as the preset says
    assert "gpu.compile=false" in commands["pretrain"] and not any("gpu.compile" in a for a in commands["mid"])
    recompiles["rag"] = bound + 1
    with pytest.raises(RuntimeError, match=f"rag recompiled more than {bound} times"):
        gpu_check.step_pipeline(args, 150)
    # Dynamo's recompile limit stops the count below the bound and runs the model eagerly: a failure too.
    recompiles["rag"], extra["mid"] = 1, limit_hit
    with pytest.raises(RuntimeError, match="mid recompiled more than .* recompile limit"):
        gpu_check.step_pipeline(args, 150)
    # A stage that runs out of time: the row keeps what it and the stages before it measured.
    extra.clear()
    monkeypatch.setattr(gpu_check, "_run", lambda cmd, limit_s, log, env=None: fake_run(
        [a.replace("stage=rag", "stage=timeout") for a in cmd], limit_s, log, env))
    recompiles["timeout"] = 4
    with pytest.raises(RuntimeError, match=r"rag \(4 recompiles so far\): over its 150 s limit; before it: "
                                           r"pretrain \d+ s \(0 recompiles\), mid \d+ s \(5 recompiles\)"):
        gpu_check.step_pipeline(args, 150)


@pytest.mark.gpu
@pytest.mark.skipif(bool(os.environ.get(gpu_check.INSIDE_ENV)), reason="the check's own pytest step: no recursion")
def test_gpu_check_on_cuda(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hybridchat.bench", "gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=720)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert all(r["status"] == "ok" for r in rows if r["step"] != "kernels"), rows
    assert all(r["mfu"] > 0 for r in rows if r["step"].startswith("train_"))
