"""Metrics: metrics.jsonl and metrics.png in the run dir always; wandb from rank 0 when logger=wandb."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from hybridchat.core.fsutil import atomic_write_bytes
from hybridchat.infra.config import Config, LoggerConfig
from hybridchat.model.blocks import PATTERN_PRESETS, expand_pattern

WANDB_TAG_MAX = 64  # wandb.init raises on a longer tag


def run_tags(config: Config, stage: str) -> list[str]:
    """What a sweep's runs are told apart by in wandb: gpu preset, model, block pattern (a preset's
    name, else the expanded letters) and stage, as key=value tags like Hydra's overrides."""
    pattern = config.model.block_pattern
    if pattern not in PATTERN_PRESETS:
        pattern = expand_pattern(pattern, config.model.n_layer)
    tags = [f"gpu={config.gpu.name}", f"model={config.model.name}", f"pattern={pattern}", f"stage={stage}"]
    return [tag[:WANDB_TAG_MAX] for tag in tags]


class Tracker:
    """Only rank 0 constructs an active tracker; other ranks get `Tracker(None)`, which does nothing."""

    def __init__(self, run_dir: Path | None, logger: LoggerConfig | None = None, config: dict | None = None,
                 group: str | None = None, job_type: str | None = None, name: str | None = None,
                 tags: list[str] | None = None):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.wandb_run = None
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.plot_path = self.run_dir / "metrics.png"
        self._file = self.metrics_path.open("a")
        if logger is not None and logger.name == "wandb":
            import wandb

            self.wandb_run = wandb.init(
                project=logger.project, entity=logger.entity, name=name, group=group, job_type=job_type,
                config=config, tags=list(dict.fromkeys([*(tags or []), *logger.tags])), dir=str(self.run_dir),
                mode=logger.mode or os.environ.get("WANDB_MODE", "offline"), reinit="finish_previous")

    def log(self, step: int, **metrics: Any) -> None:
        if self.run_dir is None:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def plot(self) -> Path | None:
        """Loss, validation bits per byte and throughput against step, as one PNG."""
        if self.run_dir is None:
            return None
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        panels = [("train/loss", "train loss (nats/token)"), ("val/bpb", "validation bits per byte"),
                  ("train/tok_per_s", "tokens / s")]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
        for ax, (key, title) in zip(axes, panels):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(self.plot_path, buffer.getvalue())
        return self.plot_path

    def finish(self, exit_code: int = 0) -> None:
        """Close the metrics file, draw the plot (also after a failure: the curve so far), end wandb."""
        if self.run_dir is None:
            return
        self._file.close()
        self.plot()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
