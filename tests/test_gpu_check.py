"""The GPU check (python -m hybridchat.bench gpu_check): every step is a row, a failing or overrunning
step is a FAILED row and the others still run; on CPU it runs at toy sizes."""

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


@pytest.mark.gpu
@pytest.mark.skipif(bool(os.environ.get(gpu_check.INSIDE_ENV)), reason="the check's own pytest step: no recursion")
def test_gpu_check_on_cuda(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hybridchat.bench", "gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert all(r["status"] == "ok" for r in rows if r["step"] != "kernels"), rows
    assert all(r["mfu"] > 0 for r in rows if r["step"].startswith("train_"))
