"""Results as records (hybridchat/results): docs/results.md is what the records render; the renderer
against hand-written markdown; staleness against a config tree whose default was changed; bad
records are one error line naming the file and the key."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybridchat.core.errors import UserError
from hybridchat.results import config_hash as hashing
from hybridchat.results.__main__ import RENDERED, rendered
from hybridchat.results.records import AppConfig, load, load_all
from hybridchat.results.render import render, section

ROOT = Path(__file__).resolve().parents[1]


def record(**changes) -> dict:
    base = {
        "title": "Tiny model, single-hop", "group": "Examples", "status": "measured",
        "command": ["python -m hybridchat.train stage=rag", "python -m hybridchat.evaluate"],
        "configs": [{"app": "train", "overrides": ["stage=rag"]}, {"app": "evaluate", "overrides": []}],
        "config_hash": "a" * 64, "commit": "8610379", "date": "2026-11-29",
        "machine": {"cpu": "AMD EPYC", "cores": 2, "gpu": None}, "wall_time_s": 1682, "seeds": [1337],
        "table": {"columns": [{"name": "condition"}, {"name": "EM", "format": ".3f"}, {"name": "n", "format": ",d"}],
                  "rows": [["RAG | bm25", {"value": 0.99, "ci": [0.98, 1.0]}, 1200], ["closed-book", 0.0167, 3]]},
        "text": ["It reads.", "Second paragraph."],
    }
    return {**base, **changes}


def write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_docs_results_md_is_what_the_records_render():
    assert RENDERED.read_text(encoding="utf-8") == rendered(), "docs/results.md is out of date: run make results"


def test_a_section_against_hand_written_markdown(tmp_path):
    r = load(write(tmp_path, "tiny", record()))
    assert "\n".join(section(r, "a" * 64)) == """### Tiny model, single-hop

| condition | EM | n |
|---|---|---|
| RAG \\| bm25 | 0.990 [0.98, 1.00] | 1,200 |
| closed-book | 0.017 | 3 |

It reads.

Second paragraph.

- command: `python -m hybridchat.train stage=rag`; `python -m hybridchat.evaluate`
- commit `8610379`, 2026-11-29, AMD EPYC, 2 cores, no GPU; wall time 28.0 min; one run (seed 1337): an observation, not a mean over seeds
- config hash `aaaaaaaaaaaa`: today's defaults compose the same config
- record: [results/tiny.json](results/tiny.json)
"""


def test_stale_historical_and_mean_over_seeds_are_said(tmp_path):
    stale = load(write(tmp_path, "stale", record(seeds=[1, 2, 3], wall_time_s=95, machine={
        "cpu": "Xeon", "cores": None, "gpu": "NVIDIA H100"})))
    lines = section(stale, "b" * 64)
    assert lines[2] == "**Stale**: today's defaults compose a different config for this command."
    assert ("- commit `8610379`, 2026-11-29, Xeon, GPU NVIDIA H100; wall time 95 s; mean over 3 seeds (1, 2, 3), "
            "intervals 95% Student-t across seeds") in lines
    assert ("- **stale**: config hash `aaaaaaaaaaaa` when measured, `bbbbbbbbbbbb` with today's defaults: "
            "measure it again") in lines
    old = load(write(tmp_path, "old", record(status="historical", configs=[], config_hash=None, seeds=None,
                                             wall_time_s=None)))
    lines = section(old, None)
    assert lines[2] == "**Historical observation, not reproducible with today's code** (recorded at `8610379`)."
    assert "- config: no Hydra command to hash" in lines
    assert lines[-4].endswith("wall time not recorded; one run: an observation, not a mean over seeds")


def test_the_page_groups_records_in_file_order_with_a_contents_list(tmp_path):
    write(tmp_path, "02-b", record(title="B: second", group="Group two"))
    write(tmp_path, "01-a", record(title="A `first`", group="Group one"))
    write(tmp_path, "03-c", record(title="C third", group="Group one"))
    today = {path.stem: "a" * 64 for path in tmp_path.glob("*.json")}
    page = render(load_all(tmp_path), today)
    contents = page.split("## Contents\n\n")[1].split("\n\n")[0]
    assert contents == """- [Group one](#group-one)
  - [A `first`](#a-first)
  - [C third](#c-third)
- [Group two](#group-two)
  - [B: second](#b-second)"""
    headings = [line for line in page.splitlines() if line.startswith("##")]
    assert headings == ["## Contents", "## Group one", "### A `first`", "### C third", "## Group two",
                        "### B: second"]
    assert page == render(load_all(tmp_path), today)  # deterministic
    with pytest.raises(UserError, match="two records have the title 'C third'"):
        write(tmp_path, "04-d", record(title="C third"))
        render(load_all(tmp_path), today)


def test_staleness_follows_the_defaults_of_the_config_tree(tmp_path):
    """A record hashed against today's conf/ is current; change one default in a copy of conf/ and the
    same command hashes differently (stale), while an override restating the old value hashes as before."""
    hashing.register_schemas()
    configs = [AppConfig("train", ("stage=rag",)), AppConfig("evaluate", ("hops=2",))]
    today = hashing.config_hash(configs)
    assert today == hashing.config_hash(configs)
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    rag = conf / "stage" / "rag.yaml"
    rag.write_text(rag.read_text().replace("num_steps: 300", "num_steps: 301"))
    assert hashing.config_hash(configs, conf) != today
    assert hashing.config_hash([AppConfig("train", ("stage=rag", "stage.num_steps=301")), configs[1]], conf) == \
        hashing.config_hash([AppConfig("train", ("stage=rag", "stage.num_steps=301")), configs[1]])
    # where output goes is not what is computed
    assert hashing.config_hash([AppConfig("train", ("stage=rag", "paths.outputs=/elsewhere", "progress=false")),
                                configs[1]]) == today
    # the order of the commands is part of what was run
    assert hashing.config_hash(configs[::-1]) != today
    r = load(write(tmp_path, "r", record(configs=[{"app": "train", "overrides": ["stage=rag"]},
                                                  {"app": "evaluate", "overrides": ["hops=2"]}], config_hash=today)))
    assert "today's defaults compose the same config" in "\n".join(section(r, hashing.config_hash(r.configs)))
    assert "**Stale**" in "\n".join(section(r, hashing.config_hash(r.configs, conf)))


def test_an_option_added_at_no_effect_leaves_the_hash_unless_set():
    """model.qkv_bias came after the records: at false the model computes what it did before the
    key existed, so records stay current; set true, it is hashed like any key."""
    hashing.register_schemas()
    today = hashing.config_hash([AppConfig("train", ("stage=rag",))])
    assert hashing.config_hash([AppConfig("train", ("stage=rag", "model.qkv_bias=false"))]) == today
    assert hashing.config_hash([AppConfig("train", ("stage=rag", "model.qkv_bias=true"))]) != today


def test_a_command_that_does_not_compose_is_one_error(tmp_path):
    hashing.register_schemas()
    with pytest.raises(UserError, match="config.yaml with stage.num_stepz=3 does not compose"):
        hashing.config_hash([AppConfig("train", ("stage.num_stepz=3",))])


@pytest.mark.parametrize("changes, message", [
    ({"status": "done"}, "key 'status' must be one of measured, historical"),
    ({"commit": "HEAD"}, "key 'commit' must be a git commit"),
    ({"config_hash": "abc"}, "key 'config_hash' must be the sha256"),
    ({"configs": [], "config_hash": "a" * 64}, "key 'config_hash' must be null when configs is empty"),
    ({"configs": [{"app": "chat", "overrides": []}]}, "key 'configs' must be a list of {\"app\": one of train"),
    ({"machine": {"cpu": "x", "cores": 0, "gpu": None}}, "key 'machine' must be"),
    ({"seeds": [1, 1]}, "key 'seeds' must be null or a non-empty list of distinct integers"),
    ({"date": "Nov 29"}, "key 'date' must be a date YYYY-MM-DD"),
    ({"wall_time_s": -1}, "key 'wall_time_s' must be a number >= 0 or null"),
    ({"text": "one string"}, "key 'text' must be a non-empty list of non-empty strings"),
    ({"extra": 1}, "unknown key 'extra'"),
    ({"table": {"columns": [{"name": "a"}], "rows": [["x", "y"]]}}, r"rows of 1 cells, one per column \(row 1\)"),
    ({"table": {"columns": [{"name": "a"}], "rows": [[{"value": 1}]]}}, "cells that are text, a number or"),
    ({"table": {"columns": [{"name": "a", "format": "d"}], "rows": [[0.5]]}}, "column 'a'.s format 'd' can show"),
    ({"table": {"columns": [{"name": "a", "format": "zz"}], "rows": [[1]]}}, "number formats Python accepts"),
])
def test_bad_records_name_the_file_and_the_key(tmp_path, changes, message):
    path = write(tmp_path, "bad", record(**changes))
    with pytest.raises(UserError, match=message) as e:
        load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_the_command_line_says_bad_input_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "hybridchat.results", "hash", "chat", "x=1"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: hash: each command starts with its app")
    assert len(run.stderr.splitlines()) == 1
    run = subprocess.run([sys.executable, "-m", "hybridchat.results", "hash", "train", "stage=rag", "--",
                          "evaluate", "hops=2"], cwd=ROOT, capture_output=True, text=True)
    hashing.register_schemas()
    assert run.stdout.strip() == hashing.config_hash([AppConfig("train", ("stage=rag",)),
                                                      AppConfig("evaluate", ("hops=2",))])


def test_the_readme_headline_table_is_the_make_run_record():
    """README.md's table is a copy of columns of a record: the numbers there are the record's."""
    from hybridchat.results.render import format_cell

    r = load(ROOT / "docs" / "results" / "72-make-run-seeds-when-to-query-single-hop.json")
    shown = ["condition", "EM", "hallucination", "false abstention", "abstains (unanswerable)", "AUROC"]
    index = [[c.name for c in r.columns].index(name) for name in shown]
    expected = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    expected += ["| " + " | ".join(format_cell(row[i], r.columns[i]) for i in index) + " |" for row in r.rows]
    assert "\n".join(expected) in (ROOT / "README.md").read_text(encoding="utf-8")


def test_a_path_interpolated_into_the_config_is_hashed_by_name_not_by_where_it_is():
    """experiment=smollm2_refrag_rl starts from ${paths.checkpoints}/...: another outputs folder is the
    same computation, another source checkpoint is not."""
    hashing.register_schemas()
    rl = hashing.config_hash([AppConfig("train", ("experiment=smollm2_refrag_rl",))])
    assert rl == hashing.config_hash([AppConfig("train", ("experiment=smollm2_refrag_rl", "paths.outputs=/data/x"))])
    assert rl != hashing.config_hash([AppConfig("train", ("experiment=smollm2_refrag_rl", "stage.source=/data/x"))])
