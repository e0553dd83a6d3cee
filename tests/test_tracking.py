"""Local metrics always; wandb (offline, no network) when asked."""

import json

from hybridchat.config import LoggerConfig
from hybridchat.tracking import Tracker


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
