"""Local metrics always; wandb (offline, no network) when asked."""

import json
import os
import subprocess
import sys
from pathlib import Path

from hybridchat.infra.config import Config, LoggerConfig
from hybridchat.infra.tracking import Tracker, run_tags
from hybridchat.model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_jsonl_and_plot(tmp_path):
    tracker = Tracker(tmp_path, LoggerConfig(name="none"))
    for step in range(1, 4):
        tracker.log(step, **{"train/loss": 5.0 / step, "train/tok_per_s": 1000.0})
    tracker.log(3, **{"val/bpb": 2.5})
    tracker.finish()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 3] and records[-1]["val/bpb"] == 2.5
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_non_main_rank_tracker_writes_nothing(tmp_path):
    tracker = Tracker(None)
    tracker.log(1, loss=1.0)
    tracker.finish()
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_run_records_config_group_and_job_type(tmp_path):
    logger = LoggerConfig(name="wandb", project="hybridchat-test", mode="offline")
    tracker = Tracker(tmp_path, logger, config={"model": {"n_layer": 2}}, group="sweep-1", job_type="pretrain",
                      name="unit")
    run = tracker.wandb_run
    assert run is not None and run.group == "sweep-1" and run.job_type == "pretrain"
    assert run.config["model"]["n_layer"] == 2
    tracker.log(1, **{"train/loss": 3.0})
    tracker.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run written"


FAKE_WANDB = '''
import json, os


def _record(event, **fields):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps({"event": event, **fields}) + "\\n")


class _Run:
    def log(self, metrics, step=None):
        pass

    def finish(self, exit_code=0):
        _record("finish", exit_code=exit_code)


def init(**kwargs):
    _record("init", **{k: kwargs[k] for k in ("name", "group", "job_type", "tags", "mode")})
    return _Run()
'''


def test_each_sweep_job_is_one_wandb_run_grouped_and_tagged(tmp_path):
    """A 2-job multirun with logger=wandb, against a stand-in `wandb` module that records wandb.init's
    arguments (nothing can reach the network)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "wandb.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb_calls.jsonl"
    sweep = tmp_path / "2026-01-01" / "sweep-7"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])),
           "FAKE_WANDB_LOG": str(log), "HYBRIDCHAT_RUN_DIR": str(sweep)}
    result = subprocess.run(
        [sys.executable, "-m", "hybridchat.train", "-m", "model=transformer_tiny,hybrid_tiny", "debug=smoke",
         "stage.num_steps=2", "logger=wandb", "logger.tags=[ablation]", f"paths.outputs={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["event"] for c in calls] == ["init", "finish", "init", "finish"]  # one run per job, closed in turn
    inits = [c for c in calls if c["event"] == "init"]
    # The sweep folder's last two parts (<date>/<time> by default): a time alone repeats every day.
    assert [c["group"] for c in inits] == ["2026-01-01/sweep-7"] * 2 and {c["job_type"] for c in inits} == {"pretrain"}
    assert len({c["name"] for c in inits}) == 2
    # debug=smoke makes both models 2 layers: all_attention's preset name, alternating's.
    assert [c["tags"] for c in inits] == [
        ["gpu=cpu", "model=transformer_tiny", "pattern=all_attention", "stage=pretrain", "ablation"],
        ["gpu=cpu", "model=hybrid_tiny", "pattern=alternating", "stage=pretrain", "ablation"]]


def test_inline_block_pattern_is_tagged_expanded():
    config = Config(model=ModelConfig(name="custom", n_layer=4, block_pattern="ma"))
    assert run_tags(config, "rag") == ["gpu=cpu", "model=custom", "pattern=MAMA", "stage=rag"]
    config.model.block_pattern, config.model.n_layer = "M", 80
    assert run_tags(config, "rag")[2] == "pattern=" + "M" * 56  # wandb's 64-character limit


def test_inactive_tracker_writes_nothing_anywhere(tmp_path, monkeypatch):
    from hybridchat.infra.config import LoggerConfig
    from hybridchat.infra.tracking import Tracker

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    for logger in (None, LoggerConfig(name="none"), LoggerConfig(name="wandb", mode="offline")):
        tracker = Tracker(None, logger)
        tracker.log(1, **{"train/loss": 1.0})
        assert tracker.plot() is None
        tracker.finish()
        assert tracker.wandb_run is None
    assert list(tmp_path.rglob("*")) == [cwd]
