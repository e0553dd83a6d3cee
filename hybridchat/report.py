"""Seeds report: what runs that differ only in their seed agree on.

    python -m hybridchat.train -m seed=0,1,2 debug=smoke        # one sweep folder, a job per seed
    python -m hybridchat.report outputs/sweeps/2026-12-06/18-30-00.123
    python -m hybridchat.report RUN_OR_SWEEP_FOLDER... EVAL_JSON... out=reports/ablation logger=wandb

Reads every training run (a folder holding metrics.jsonl) and evaluation (eval.json, from
python -m hybridchat.evaluate) found under each PATH, and groups them by the overrides they were
launched with (.hydra/overrides.yaml), leaving out `seed` and the keys that change no result
(IGNORED_KEYS). For every metric of a group (a training run's last value of each metric it logged,
an evaluation's rates per condition) it prints the mean across seeds and its 95% t-interval, as a
markdown table, and writes report.md and report.png (each group's training curves, every seed thin,
their mean thick) to out= (default: the deepest folder holding every PATH, e.g. the sweep folder).
With logger=wandb the table (and the plot) also go to Weights & Biases. docs/seeds.md says more.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from hybridchat.core.errors import UserError, run_hydra_app, run_or_exit
from hybridchat.core.fsutil import atomic_write_bytes, atomic_write_text
from hybridchat.core.metrics import t_interval
from hybridchat.infra import commands
from hybridchat.infra.config import LoggerConfig

# Override keys (or their first part) that name where and how a run was kept, not what it computed.
IGNORED_KEYS = ("seed", "resume", "overwrite", "progress", "logger", "paths")
CURVES = (("val/bpb", "validation bits per byte"), ("train/loss", "train loss (nats/token)"))
COLUMNS = ("metric", "group", "n", "mean", "95% interval", "seeds")
# An argument naming one of ReportConfig's keys is an option; any other is a PATH.
OPTION = re.compile(r"^(out|logger)(\.[\w.]+)?=")


@dataclass
class ReportConfig:
    out: Optional[str] = None          # folder for report.md and report.png; None: the deepest folder holding every PATH
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class Job:
    """One training run or evaluation: where it is, how it was launched, what it measured."""
    path: Path                         # metrics.jsonl or eval.json
    kind: str                          # "train" | "eval"
    overrides: tuple[str, ...]         # the command line's, seed and IGNORED_KEYS left out
    seed: Any                          # None where nothing says
    metrics: dict[str, float]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return f"{self.kind}: {' '.join(self.overrides) or '(defaults)'}"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _hydra_file(job_dir: Path, name: str) -> Any:
    """A job folder's .hydra/<name> parsed, None when it has none."""
    path = job_dir / ".hydra" / name
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not YAML ({' '.join(str(e).split())[:200]})") from None


def launched_with(job_dir: Path) -> tuple[tuple[str, ...], Any]:
    """(the overrides that tell this job's experiment, its seed) from the folder's .hydra files."""
    overrides = _hydra_file(job_dir, "overrides.yaml") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"{job_dir / '.hydra' / 'overrides.yaml'}: expected a list of key=value overrides")
    kept = tuple(sorted(o for o in overrides if _key(o).split(".")[0] not in IGNORED_KEYS))
    config = _hydra_file(job_dir, "config.yaml")
    if isinstance(config, dict) and "seed" in config:  # the value the job ran with
        return kept, config["seed"]
    given = [o.split("=", 1)[1] for o in overrides if _key(o) == "seed"]
    return kept, given[-1] if given else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_training(metrics_file: Path) -> Job:
    """A training run: every metric's last value, and each logged value against its step."""
    curves: dict[str, list[tuple[int, float]]] = {}
    with metrics_file.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(f"{metrics_file}:{line_no}: not a JSON line of metrics ({e})") from None
            if not isinstance(record, dict) or not _number(record.get("step")):
                raise UserError(f"{metrics_file}:{line_no}: expected an object with a numeric 'step' and metrics")
            for key, value in record.items():
                if key not in ("step", "time") and _number(value):
                    curves.setdefault(key, []).append((record["step"], float(value)))
    overrides, seed = launched_with(metrics_file.parent)
    return Job(metrics_file, "train", overrides, seed, {k: points[-1][1] for k, points in curves.items()}, curves)


def read_evaluation(eval_file: Path) -> Job:
    """An evaluation: each condition's rates (their means) and the context budget's points."""
    try:
        report = json.loads(eval_file.read_text(encoding="utf-8"))
        metrics = {f"{c['condition']}: {key}": float(value[0]) for c in report["conditions"]
                   for key, value in c.items() if isinstance(value, list) and len(value) == 3 and _number(value[0])}
        for row in report.get("context_budget", []):
            # The evaluated run by its role, not its name: runs named per seed (headline/s0, ...) meet in one row.
            model = "evaluated model" if row["model"] == report["run_name"] else row["model"]
            metrics[f"{model} with {row['documents']} documents: em"] = float(row["em"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{eval_file}: not an eval.json of python -m hybridchat.evaluate "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    overrides, seed = launched_with(eval_file.parent)
    return Job(eval_file, "eval", overrides, report.get("seed") if seed is None else seed, metrics)


def find_jobs(path: Path) -> list[Job]:
    """The training runs and evaluations at or under `path` (a folder holding eval.json is an
    evaluation: its metrics.jsonl repeats the eval's main row)."""
    if not path.exists():
        raise UserError(f"{path} does not exist; give sweep or run folders, or eval.json files")
    if path.is_file():
        if path.name == "eval.json":
            return [read_evaluation(path)]
        if path.name == "metrics.jsonl":
            return [read_training(path)]
        raise UserError(f"{path} is neither a folder nor eval.json or metrics.jsonl")
    evaluations = sorted(path.rglob("eval.json"))
    evaluated = {p.parent for p in evaluations}
    runs = sorted(p for p in path.rglob("metrics.jsonl") if p.parent not in evaluated)
    jobs = [read_evaluation(p) for p in evaluations] + [read_training(p) for p in runs]
    if not jobs:
        raise UserError(f"no training run (metrics.jsonl) or evaluation (eval.json) under {path}")
    return jobs


def group_jobs(jobs: list[Job]) -> dict[str, list[Job]]:
    """Jobs by group, one per seed: of two with the same seed (a rerun) the newer counts, and stderr says so."""
    groups: dict[str, dict[Any, Job]] = {}
    for job in sorted(jobs, key=lambda j: j.path.stat().st_mtime):
        seen = groups.setdefault(job.group, {})
        if job.seed in seen:
            print(f"note: {seen[job.seed].path} and {job.path} are both seed {job.seed} of one group; "
                  f"the newer ({job.path}) counts", file=sys.stderr)
        seen[job.seed] = job
    return {name: sorted(by_seed.values(), key=lambda j: str(j.seed)) for name, by_seed in groups.items()}


def _format(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def rows(groups: dict[str, list[Job]]) -> list[list[Any]]:
    """The table's rows (COLUMNS): for each metric, each group that measured it."""
    metrics = sorted({m for jobs in groups.values() for job in jobs for m in job.metrics})
    out = []
    for metric in metrics:
        for name, jobs in groups.items():
            measured = [j for j in jobs if metric in j.metrics]
            if measured:
                mean, low, high = t_interval([j.metrics[metric] for j in measured])
                out.append([metric, name, len(measured), mean, low, high, ", ".join(str(j.seed) for j in measured)])
    return out


def markdown(table: list[list[Any]], groups: dict[str, list[Job]], paths: list[Path]) -> str:
    lines = ["# Seeds report", "",
             f"{sum(map(len, groups.values()))} jobs in {len(groups)} groups from {', '.join(map(str, paths))}. "
             "A group is the jobs launched with the same overrides but the seed; mean across its seeds and the "
             "95% Student-t interval (n: seeds). A training run counts with the last value it logged of each "
             "metric, an evaluation with each condition's rates.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for metric, group, n, mean, low, high, seeds in table:
        interval = f"[{_format(low)}, {_format(high)}]" if n > 1 else "n=1: no interval"
        lines.append(f"| {metric} | {group} | {n} | {_format(mean)} | {interval} | {seeds} |")
    return "\n".join(lines) + "\n"


def plot(groups: dict[str, list[Job]]) -> bytes | None:
    """Each group's training curves (CURVES), every seed thin and the mean at the steps all seeds
    logged thick, as PNG bytes; None when no job has a curve."""
    panels = [(key, title) for key, title in CURVES if any(key in j.curves for jobs in groups.values() for j in jobs)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for color, (name, jobs) in enumerate(groups.items()):
            runs = [dict(j.curves[key]) for j in jobs if key in j.curves]
            if not runs:
                continue
            for run in runs:
                ax.plot(list(run), list(run.values()), color=f"C{color}", alpha=0.3, linewidth=0.8)
            steps = sorted(set.intersection(*(set(run) for run in runs)))
            ax.plot(steps, [sum(run[s] for run in runs) / len(runs) for s in steps], color=f"C{color}",
                    linewidth=2, label=f"{name} (n={len(runs)})")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def log_to_wandb(logger: LoggerConfig, table: list[list[Any]], out: Path, png: Path | None) -> None:
    import wandb

    run = wandb.init(project=logger.project, entity=logger.entity, name="seeds-report", job_type="report",
                     tags=list(logger.tags), dir=str(out), mode=logger.mode or os.environ.get("WANDB_MODE", "offline"),
                     reinit="finish_previous")
    columns = ["metric", "group", "n", "mean", "low", "high", "seeds"]
    run.log({"seeds_report": wandb.Table(columns=columns, data=table),
             **({"seeds_report_curves": wandb.Image(str(png))} if png is not None else {})})
    run.finish()


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="report_schema", node=ReportConfig)


def compose(options: list[str]) -> ReportConfig:
    """conf/report.yaml with the command line's options, checked against ReportConfig."""
    return commands.compose("report", "report_schema", ReportConfig, options)


def default_out(paths: list[Path]) -> Path:
    """The deepest folder holding every PATH (a file's folder for a file)."""
    folders = [str((p if p.is_dir() else p.parent).resolve()) for p in paths]
    return Path(os.path.commonpath(folders))


def report(cfg: ReportConfig, paths: list[Path]) -> str:
    """Read, group, write report.md (and report.png), log to wandb if asked; the table's text."""
    jobs = [job for path in paths for job in find_jobs(path)]
    groups = group_jobs(jobs)
    table = rows(groups)
    out = Path(cfg.out).expanduser() if cfg.out else default_out(paths)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file; give a folder for report.md and report.png")
    text = markdown(table, groups, paths)
    png = plot(groups)
    try:
        atomic_write_text(out / "report.md", text)
        if png is not None:
            atomic_write_bytes(out / "report.png", png)
    except OSError as e:
        raise UserError(f"cannot write the report into {out} ({e.strerror or e}); give out=<a folder you can write>")
    if cfg.logger.name == "wandb":
        log_to_wandb(cfg.logger, table, out, out / "report.png" if png is not None else None)
    return text + f"\nreport: {out / 'report.md'}\n" + (
        f"plot:   {out / 'report.png'}\n" if png is not None else "plot:   none (no training curves among these jobs)\n")


def run(argv: list[str]) -> None:
    options = [a for a in argv if OPTION.match(a)]
    paths = [Path(a) for a in argv if not OPTION.match(a)]
    if not paths:
        raise UserError("give one or more PATHs: sweep or run folders, or eval.json files "
                        "(python -m hybridchat.report --help)")
    print(report(compose(options), paths), end="")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    run_hydra_app(lambda: run_or_exit(run, argv), argv)


if __name__ == "__main__":
    main()
