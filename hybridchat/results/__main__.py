"""python -m hybridchat.results render | check | hash APP [OVERRIDES...] [-- APP OVERRIDES...] | machine
       | table PATH [budget] | paired PATH CONDITION CONDITION [METRIC]

render: docs/results.md from docs/results/*.json (`make results`); check: exit 1 when docs/results.md
differs from that rendering; hash: the config hash of one or more Hydra commands, for a new record;
machine: this machine as a record states it; table: a record's table from one experiment's
evaluations over seeds (PATH: a sweep folder of eval.json files), its conditions or its context
budget; paired: one metric's difference between two conditions, seed by seed, with its interval
(hybridchat/results/seed_tables.py)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from hybridchat.core.errors import UserError, run_or_exit
from hybridchat.core.fsutil import atomic_write_text
from hybridchat.results.config_hash import config_hash, register_schemas
from hybridchat.results.records import APPS, AppConfig, Record, load_all
from hybridchat.results.render import render
from hybridchat.results.seed_tables import budget_table, conditions_table, evaluations, paired

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "docs" / "results"
RENDERED = ROOT / "docs" / "results.md"
USAGE = " ".join(__doc__.split("\n\n")[0].split())


def todays_hashes(records: list[Record]) -> dict[str, str | None]:
    register_schemas()
    return {r.name: config_hash(r.configs) if r.configs else None for r in records}


def rendered() -> str:
    records = load_all(RECORDS)
    return render(records, todays_hashes(records))


def commands(args: list[str]) -> list[AppConfig]:
    """`train stage=rag -- evaluate hops=2` -> one AppConfig per command."""
    groups, current = [], []
    for arg in args + ["--"]:
        if arg != "--":
            current.append(arg)
        elif current:
            groups.append(current)
            current = []
    if not groups or any(g[0] not in APPS for g in groups):
        raise UserError(f"hash: each command starts with its app, one of {', '.join(APPS)} "
                        f"(e.g. hash train stage=rag -- evaluate hops=2)")
    return [AppConfig(g[0], tuple(g[1:])) for g in groups]


def this_machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}


def main(argv: list[str]) -> None:
    command = argv[0] if argv else None
    if command == "render":
        atomic_write_text(RENDERED, rendered())
        print(f"wrote {RENDERED.relative_to(ROOT)}")
    elif command == "check":
        if not RENDERED.is_file() or RENDERED.read_text(encoding="utf-8") != rendered():
            print(f"{RENDERED.relative_to(ROOT)} differs from what docs/results/ renders: run make results",
                  file=sys.stderr)
            sys.exit(1)
        print(f"{RENDERED.relative_to(ROOT)} is what docs/results/ renders")
    elif command == "hash":
        configs = commands(argv[1:])
        register_schemas()
        print(config_hash(configs))
    elif command == "machine":
        print(json.dumps(this_machine()))
    elif command == "table" and len(argv) in (2, 3) and argv[2:] in ([], ["budget"]):
        reports = evaluations(Path(argv[1]))
        print(json.dumps(budget_table(reports) if argv[2:] else conditions_table(reports), indent=1))
    elif command == "paired" and len(argv) in (4, 5):
        print(json.dumps(paired(evaluations(Path(argv[1])), *argv[2:]), indent=1))
    else:
        raise UserError(f"python -m hybridchat.results: the first word is render, check, hash, machine, table or "
                        f"paired, with their arguments (got {' '.join(argv)!r}); usage: {USAGE}")


if __name__ == "__main__":
    run_or_exit(main, sys.argv[1:])
