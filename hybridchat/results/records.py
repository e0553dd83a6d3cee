"""The record format: one JSON object per result (docs/results/<name>.json), read and checked here.

    {"title": str, "group": str, "status": "measured" | "historical",
     "command": [shell lines, in the order run],
     "configs": [{"app": "train" | "evaluate" | "plan", "overrides": [str, ...]}, ...],
     "config_hash": sha256 hex of those configs as composed at the commit (null when configs is empty),
     "commit": git commit the code was at, "date": "YYYY-MM-DD",
     "machine": {"cpu": str, "cores": int | null, "gpu": str | null}, "wall_time_s": number | null,
     "seeds": [int, ...] | null (one seed or null: one run, an observation; several: a mean over them),
     "table": {"columns": [{"name": str, "format": str, "ci_format": str (both optional: ".3f")}, ...],
               "rows": [[cell, ...], ...]},
     "text": [paragraph, ...]}

A cell is text (shown as given), a number (shown with its column's format) or
{"value": number, "ci": [low, high]} (a value with its 95% interval, bounds in ci_format, ".2f" unless
said). "historical" marks an
observation that today's code no longer reproduces (its text says why); it is kept for what it
showed, with the commit it was measured at.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from hybridchat.core.errors import UserError

STATUSES = ("measured", "historical")
APPS = ("train", "evaluate", "plan")
Cell = Union[str, int, float, dict]


@dataclass(frozen=True)
class AppConfig:
    """One Hydra command of a record: `python -m hybridchat.<app> <overrides>`."""
    app: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Column:
    name: str
    format: str = ""         # for numbers and interval values, e.g. ".3f"
    ci_format: str = ".2f"   # for interval bounds


@dataclass(frozen=True)
class Record:
    name: str                      # the file's stem: the record's id and its anchor in results.md
    title: str
    group: str
    status: str
    command: tuple[str, ...]
    configs: tuple[AppConfig, ...]
    config_hash: str | None
    commit: str
    date: str
    machine: dict[str, Any]
    wall_time_s: float | None
    seeds: tuple[int, ...] | None
    columns: tuple[Column, ...]
    rows: tuple[tuple[Cell, ...], ...]
    text: tuple[str, ...]


class _Fields:
    """Typed reads of one record's keys; every mistake is a UserError naming the file and the key."""

    def __init__(self, path: Path, data: Any):
        if not isinstance(data, dict):
            raise UserError(f"{path}: a record is a JSON object, got {type(data).__name__}")
        self.path, self.data = path, data

    def fail(self, key: str, allowed: str) -> UserError:
        return UserError(f"{self.path}: key {key!r} must be {allowed} (got {self.data.get(key)!r:.80})")

    def text(self, key: str, pattern: str = r".+", allowed: str = "a non-empty string") -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not re.fullmatch(pattern, value, re.DOTALL):
            raise self.fail(key, allowed)
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.data.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "a non-empty list of non-empty strings")
        return tuple(value)

    def number_or_null(self, key: str) -> float | None:
        value = self.data.get(key, "missing")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise self.fail(key, "a number >= 0 or null")
        return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _valid_cell(cell: Any) -> bool:
    if isinstance(cell, str) or _is_number(cell):
        return True
    return (isinstance(cell, dict) and set(cell) == {"value", "ci"} and _is_number(cell["value"])
            and isinstance(cell["ci"], list) and len(cell["ci"]) == 2 and all(_is_number(c) for c in cell["ci"]))


def _configs(f: _Fields) -> tuple[AppConfig, ...]:
    value = f.data.get("configs")
    if not isinstance(value, list):
        raise f.fail("configs", "a list of {\"app\": ..., \"overrides\": [...]} objects")
    configs = []
    for item in value:
        if (not isinstance(item, dict) or set(item) != {"app", "overrides"} or item["app"] not in APPS
                or not isinstance(item["overrides"], list) or not all(isinstance(o, str) for o in item["overrides"])):
            raise f.fail("configs", f"a list of {{\"app\": one of {', '.join(APPS)}, \"overrides\": [strings]}} objects")
        configs.append(AppConfig(item["app"], tuple(item["overrides"])))
    return tuple(configs)


def _machine(f: _Fields) -> dict[str, Any]:
    value = f.data.get("machine")
    if (not isinstance(value, dict) or set(value) != {"cpu", "cores", "gpu"} or not isinstance(value["cpu"], str)
            or not (value["cores"] is None or (isinstance(value["cores"], int) and value["cores"] > 0))
            or not (value["gpu"] is None or isinstance(value["gpu"], str))):
        raise f.fail("machine", '{"cpu": string, "cores": positive integer or null, "gpu": string or null}')
    return dict(value)


def _seeds(f: _Fields) -> tuple[int, ...] | None:
    value = f.data.get("seeds", "missing")
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value) or len(set(value)) != len(value):
        raise f.fail("seeds", "null or a non-empty list of distinct integers")
    return tuple(value)


def _table(f: _Fields) -> tuple[tuple[Column, ...], tuple[tuple[Cell, ...], ...]]:
    table = f.data.get("table")
    if not isinstance(table, dict) or set(table) != {"columns", "rows"}:
        raise f.fail("table", 'an object with "columns" and "rows"')
    columns = []
    for c in table["columns"] if isinstance(table["columns"], list) else [None]:
        if (not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]
                or not set(c) <= {"name", "format", "ci_format"}
                or not all(isinstance(c.get(k, ""), str) for k in ("format", "ci_format"))):
            raise f.fail("table", 'columns of {"name": string, "format", "ci_format": optional format specs}')
        column = Column(c["name"], c.get("format", ""), c.get("ci_format", ".2f"))
        try:
            format(1, column.format), format(0.5, column.ci_format)
        except ValueError:
            raise f.fail("table", f"columns with number formats Python accepts (column {c['name']!r})") from None
        columns.append(column)
    rows = table["rows"]
    if not isinstance(rows, list) or not rows:
        raise f.fail("table", "an object whose rows are a non-empty list")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, list) or len(row) != len(columns):
            raise f.fail("table", f"rows of {len(columns)} cells, one per column (row {i})")
        for cell, column in zip(row, columns):
            if not _valid_cell(cell):
                raise f.fail("table", f'cells that are text, a number or {{"value": number, "ci": [low, high]}} '
                                      f"(row {i}: {cell!r:.60})")
            try:
                for number in [] if isinstance(cell, str) else [cell] if _is_number(cell) else [cell["value"]]:
                    format(number, column.format)
            except ValueError:
                raise f.fail("table", f"numbers that column {column.name!r}'s format {column.format!r} can show "
                                      f"(row {i}: {cell!r:.60})") from None
    return tuple(columns), tuple(tuple(row) for row in rows)


KEYS = {"title", "group", "status", "command", "configs", "config_hash", "commit", "date", "machine", "wall_time_s",
        "seeds", "table", "text"}


def parse(path: Path, data: Any) -> Record:
    f = _Fields(path, data)
    if unknown := sorted(set(data) - KEYS):
        raise UserError(f"{path}: unknown key {unknown[0]!r}; a record has {', '.join(sorted(KEYS))}")
    configs = _configs(f)
    if configs:
        config_hash = f.text("config_hash", r"[0-9a-f]{64}", "the sha256 (64 hex digits) of its configs")
    elif data.get("config_hash") is not None:
        raise f.fail("config_hash", "null when configs is empty")
    else:
        config_hash = None
    columns, rows = _table(f)
    return Record(
        name=path.stem, title=f.text("title"), group=f.text("group"),
        status=f.text("status", "|".join(STATUSES), f"one of {', '.join(STATUSES)}"),
        command=f.strings("command"), configs=configs, config_hash=config_hash,
        commit=f.text("commit", r"[0-9a-f]{7,40}", "a git commit (7 to 40 hex digits)"),
        date=f.text("date", r"\d{4}-\d{2}-\d{2}", "a date YYYY-MM-DD"),
        machine=_machine(f), wall_time_s=f.number_or_null("wall_time_s"), seeds=_seeds(f),
        columns=columns, rows=rows, text=f.strings("text"))


def load(path: Path) -> Record:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON record ({e})") from None
    return parse(path, data)


def load_all(directory: Path) -> list[Record]:
    """Every docs/results/*.json, in file-name order (the order of results.md)."""
    if not directory.is_dir():
        raise UserError(f"{directory}: no such folder of result records")
    return [load(path) for path in sorted(directory.glob("*.json"))]
