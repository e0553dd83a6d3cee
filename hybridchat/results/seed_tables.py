"""A record's table from the evaluations of one experiment run once per seed (e.g. `make seeds`'s
evaluate/ folder): each cell the mean across seeds and its 95% Student-t interval, so a new record
is written from the files, not copied by hand.

    python -m hybridchat.results table outputs/seeds/evaluate_2hop            # the conditions' rates
    python -m hybridchat.results table outputs/seeds/evaluate budget           # the context budget
    python -m hybridchat.results paired outputs/seeds/evaluate_2hop "REFRAG after RL" "REFRAG after warm start"

Each prints JSON: {"seeds": [...], "table": {columns, rows} as a record holds it, "per_seed": ...};
`paired` the per-seed differences of one metric between two conditions with their t-interval (the
seeds' runs are paired: the same seed trained both)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from hybridchat.core.errors import UserError
from hybridchat.core.metrics import t_interval
from hybridchat.rag.report import columns_for

# Rates live in [0, 1] and their intervals are clipped there; these counts and times are not rates.
UNBOUNDED = ("hops", "seconds")


def evaluations(path: Path) -> list[dict[str, Any]]:
    """Every eval.json at or under `path`, one per seed, in seed order."""
    files = [path] if path.name == "eval.json" else sorted(path.rglob("eval.json")) if path.is_dir() else []
    if not files:
        raise UserError(f"{path}: no eval.json (from python -m hybridchat.evaluate) at or under it")
    reports = []
    for file in files:
        try:
            report = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{file}: not a readable JSON file ({e})") from None
        if not isinstance(report, dict) or not isinstance(report.get("conditions"), list) or "seed" not in report:
            raise UserError(f"{file}: not an eval.json of python -m hybridchat.evaluate (it needs its conditions "
                            "and seed)")
        reports.append(report)
    seeds = [r["seed"] for r in reports]
    if len(set(map(str, seeds))) != len(seeds):
        raise UserError(f"{path}: its evaluations must each have their own seed, got seeds {seeds} "
                        "(give one experiment's sweep folder)")
    names = [[c["condition"] for c in r["conditions"]] for r in reports]
    if any(n != names[0] for n in names):
        raise UserError(f"{path}: its evaluations answer different conditions ({names[0]} vs another's): "
                        "give one experiment's sweep folder")
    return sorted(reports, key=lambda r: r["seed"])


def across_seeds(values: Sequence[float], bounded: bool = True) -> Any:
    """One cell: the value where every seed agrees, else the mean with its interval (rounded to 3
    places, as the tables show them; a rate's bounds clipped to [0, 1])."""
    if all(v == values[0] for v in values):
        return round(values[0], 3)
    mean, low, high = t_interval(values)
    if bounded:
        low, high = max(low, 0.0), min(high, 1.0)
    return {"value": round(mean, 3), "ci": [round(low, 3), round(high, 3)]}


def _mean(cell: Any) -> float | None:
    """An eval.json rate is [mean, low, high]; a missing or undefined one is None."""
    if isinstance(cell, list) and len(cell) == 3 and isinstance(cell[0], (int, float)) and not math.isnan(cell[0]):
        return float(cell[0])
    return None


def conditions_table(reports: list[dict[str, Any]]) -> dict[str, Any]:
    columns = columns_for(reports[0].get("hops", 1))
    present = [(key, title) for key, title in columns
               if any(_mean(c.get(key)) is not None for r in reports for c in r["conditions"])]
    rows, per_seed = [], {}
    for i, name in enumerate(c["condition"] for c in reports[0]["conditions"]):
        row: list[Any] = [name]
        for key, title in present:
            values = [_mean(r["conditions"][i].get(key)) for r in reports]
            if any(v is None for v in values):
                row.append("-")
                continue
            row.append(across_seeds(values, key not in UNBOUNDED))
            per_seed[f"{name}: {key}"] = [round(v, 3) for v in values]
        rows.append(row)
    formats = [{"name": title, "format": ".3f"} for _, title in present]
    return {"seeds": [r["seed"] for r in reports], "table": {"columns": [{"name": "condition"}] + formats, "rows": rows},
            "per_seed": per_seed}


def budget_table(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluated model's context-budget points (each report's own run; other compared models are
    left out, as they are not the seed's)."""
    points = [{row["documents"]: row for row in r["context_budget"] if row["model"] == r["run_name"]} for r in reports]
    documents = sorted(points[0])
    if not documents or any(sorted(p) != documents for p in points):
        raise UserError("budget: every evaluation needs the same context_budget points "
                        f"(got {[sorted(p) for p in points]}); run them with the same context_budget=[...]")
    rows, per_seed = [], {}
    for k in documents:
        em = [p[k]["em"][0] for p in points]
        rows.append([k, round(sum(p[k]["context_tokens"] for p in points) / len(points)), across_seeds(em),
                     round(sum(p[k]["ttft_ms"] for p in points) / len(points), 1)])
        per_seed[f"{k} documents: em"] = [round(v, 3) for v in em]
    columns = [{"name": "documents in context"}, {"name": "context tokens"}, {"name": "EM", "format": ".3f"},
               {"name": "time to first token (ms)", "format": ".1f"}]
    return {"seeds": [r["seed"] for r in reports], "table": {"columns": columns, "rows": rows}, "per_seed": per_seed}


def _condition(report: dict[str, Any], prefix: str) -> dict[str, Any]:
    found = [c for c in report["conditions"] if c["condition"].startswith(prefix)]
    if len(found) != 1:
        raise UserError(f"paired: {prefix!r} must start exactly one condition's name, one of "
                        f"{[c['condition'] for c in report['conditions']]}")
    return found[0]


def paired(reports: list[dict[str, Any]], first: str, second: str, metric: str = "em") -> dict[str, Any]:
    """first - second per seed, and the mean difference's t-interval: does `first` beat `second`
    across seeds (the interval above 0), or not?"""
    differences = []
    for r in reports:
        a, b = _mean(_condition(r, first).get(metric)), _mean(_condition(r, second).get(metric))
        if a is None or b is None:
            raise UserError(f"paired: metric {metric!r} is missing from a condition of seed {r['seed']}")
        differences.append(a - b)
    mean, low, high = t_interval(differences)
    verdict = ("higher across seeds" if low > 0 else "lower across seeds" if high < 0
               else "not distinguishable across these seeds") if len(differences) > 1 else "one seed: no interval"
    return {"seeds": [r["seed"] for r in reports], "metric": metric, "first": first, "second": second,
            "differences": [round(d, 3) for d in differences], "mean": round(mean, 3),
            "ci": [round(low, 3), round(high, 3)] if len(differences) > 1 else None, "verdict": f"{first}: {verdict}"}
