"""Shared output for benchmarks: a printed table, a JSON file with the machine, an optional PNG."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from hybridchat.core.fsutil import atomic_write_bytes, atomic_write_json


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def save(name: str, rows: list[dict[str, Any]], columns: list[str], out_dir: str | Path, figure=None,
         **extra: Any) -> Path:
    """Print the table (markdown, pasteable into a result record), write <out_dir>/<name>.json and .png."""
    out_dir = Path(out_dir)
    print(format_table(rows, columns))
    path = out_dir / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
                             "rows": rows, **extra})
    if figure is not None:
        import io

        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        atomic_write_bytes(out_dir / f"{name}.png", buffer.getvalue())
    print(f"saved {path}" + (f" and {path.with_suffix('.png')}" if figure is not None else ""))
    return path


def two_panel_figure(series: dict[str, list[tuple[float, float, float]]], titles: tuple[str, str], xlabel: str,
                     log_y: bool = True, suptitle: str | None = None):
    """Two log-x panels (e.g. time and memory) against one x (sequence or context length); each
    series is a label and its (x, left value, right value) points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, points in series.items():
        if points:
            x, left, right = zip(*points)
            axes[0].plot(x, left, marker="o", label=label)
            axes[1].plot(x, right, marker="o", label=label)
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
