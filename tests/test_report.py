"""The seeds report (hybridchat/report.py) on run folders and eval.json files written here by hand,
against hand-computed means and Student-t intervals; and once on a real 2-seed multirun."""

import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import command_result

from hybridchat.report import main

ROOT = Path(__file__).resolve().parents[1]
# Student-t quantiles t(0.975, df), from a printed table: the interval's half-width is t x s / sqrt(n).
T_975 = {1: 12.706204736, 2: 4.302652730}


def write_job(folder: Path, overrides: list[str], seed, metrics: list[dict] | None = None,
              evaluation: dict | None = None) -> Path:
    """A job folder as Hydra and the entry points leave it: .hydra/overrides.yaml and config.yaml
    (seed), and metrics.jsonl (a training run) or eval.json (an evaluation)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "stage": {"name": "pretrain"}}))
    if metrics is not None:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if evaluation is not None:
        (folder / "eval.json").write_text(json.dumps(evaluation))
    return folder


def training(final_bpb: float, final_loss: float) -> list[dict]:
    """A run's metrics.jsonl records: evaluations at steps 0 and 4, training losses at steps 1-4."""
    return [{"step": 0, "time": 1.0, "val/bpb": 9.0},
            *({"step": s, "time": 1.0 + s, "train/loss": 5.0 - s} for s in (1, 2, 3)),
            {"step": 4, "time": 5.0, "train/loss": final_loss}, {"step": 4, "time": 5.5, "val/bpb": final_bpb}]


def evaluation(em: float, seed: int) -> dict:
    """An eval.json of run p/s<seed> (runs named per seed), with one compared model, t, in its context budget."""
    return {"run_name": f"p/s{seed}", "seed": seed, "conditions": [
        {"condition": "RAG, bm25 top-3", "answerable": 12, "em": [em, em - 0.1, em + 0.1], "total_seconds": 3.0},
        {"condition": "gold documents", "em": [1.0, 1.0, 1.0]}],
        "context_budget": [{"model": f"p/s{seed}", "documents": 2, "em": [em / 2, 0.0, 1.0], "ttft_ms": 4.0},
                           {"model": "t", "documents": 2, "em": [em / 4, 0.0, 1.0], "ttft_ms": 4.0}]}


def table(out: str) -> dict[tuple[str, str], list[str]]:
    """The printed table's cells by (metric, group): [n, mean, interval, seeds]."""
    cells = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(parts) == 6 and parts[0] != "metric":
            cells[parts[0], parts[1]] = parts[2:]
    return cells


def interval(text: str) -> tuple[float, float]:
    low, high = re.fullmatch(r"\[(\S+), (\S+)\]", text).groups()
    return float(low), float(high)


def test_mean_and_t_interval_across_seeds_of_each_metrics_last_value(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for job, (bpb, loss) in enumerate([(1.0, 3.0), (2.0, 3.5), (6.0, 4.0)]):
        write_job(sweep / str(job), ["debug=smoke", f"seed={job}", f"paths.outputs=/tmp/o{job}"], job,
                  training(bpb, loss))
    code, out, err = command_result(main, [sweep, f"out={tmp_path / 'out'}"], capsys)
    assert code == 0, err
    cells = table(out)
    group = "train: debug=smoke"
    assert set(cells) == {("val/bpb", group), ("train/loss", group)}  # seed and paths.* do not split the group
    # val/bpb: 1, 2, 6 (the last value of each run, not step 0's 9): mean 3, s = sqrt(7)
    n, mean, ci, seeds = cells["val/bpb", group]
    assert (n, float(mean), seeds) == ("3", 3.0, "0, 1, 2")
    half = T_975[2] * math.sqrt(7) / math.sqrt(3)
    assert interval(ci) == pytest.approx((3 - half, 3 + half), abs=1e-3)
    # train/loss: 3, 3.5, 4: mean 3.5, s = 0.5
    n, mean, ci, _ = cells["train/loss", group]
    half = T_975[2] * 0.5 / math.sqrt(3)
    assert float(mean) == 3.5 and interval(ci) == pytest.approx((3.5 - half, 3.5 + half), abs=1e-3)
    assert (tmp_path / "out" / "report.md").read_text() in out  # the printed table is the file's


def test_groups_keep_other_overrides_apart_and_one_seed_is_said_as_such(tmp_path, capsys):
    for name, overrides, seed, bpb in [("a0", ["model=a", "seed=0"], 0, 1.0), ("a1", ["seed=1", "model=a"], 1, 3.0),
                                       ("b0", ["model=b", "seed=0", "progress=false"], 0, 5.0),
                                       ("c", ["model=a", "stage.num_steps=9"], 1337, 7.0)]:
        write_job(tmp_path / "runs" / name, overrides, seed, training(bpb, 1.0))
    code, out, err = command_result(main, [tmp_path / "runs"], capsys)
    assert code == 0, err
    cells = {group: values for (metric, group), values in table(out).items() if metric == "val/bpb"}
    assert set(cells) == {"train: model=a", "train: model=b", "train: model=a stage.num_steps=9"}
    n, mean, ci, seeds = cells["train: model=a"]  # 1 and 3: mean 2, s = sqrt(2)
    assert (n, float(mean), seeds) == ("2", 2.0, "0, 1")
    assert interval(ci) == pytest.approx((2 - T_975[1], 2 + T_975[1]), abs=1e-2)
    assert cells["train: model=b"] == ["1", "5", "n=1: no interval", "0"]
    assert cells["train: model=a stage.num_steps=9"][3] == "1337"  # the seed the run's config holds
    assert (tmp_path / "runs" / "report.md").is_file()  # default: the folder given


def test_a_rerun_of_one_seed_counts_once_the_newer(tmp_path, capsys):
    old = write_job(tmp_path / "old", ["seed=0"], 0, training(1.0, 1.0))
    new = write_job(tmp_path / "new", ["seed=0"], 0, training(2.0, 1.0))
    os.utime(old / "metrics.jsonl", (1000, 1000))
    code, out, err = command_result(main, [old, new, f"out={tmp_path}"], capsys)
    assert code == 0
    assert table(out)["val/bpb", "train: (defaults)"][:2] == ["1", "2"]
    assert "both seed 0 of one group; the newer" in err and str(new / "metrics.jsonl") in err


def test_evaluations_report_each_conditions_rates_given_as_files_or_folders(tmp_path, capsys):
    files = [write_job(tmp_path / "sweep" / str(s), ["retriever=bm25", f"seed={s}"], s,
                       metrics=[{"step": 0, "eval/em": em}], evaluation=evaluation(em, s)) / "eval.json"
             for s, em in [(0, 0.5), (1, 0.7)]]
    loose = tmp_path / "copied" / "eval.json"  # no .hydra beside it: its seed from the file, no overrides
    loose.parent.mkdir()
    loose.write_text(json.dumps(evaluation(0.25, 4)))
    code, out, err = command_result(main, [*files, loose, f"out={tmp_path / 'out'}"], capsys)
    assert code == 0, err
    cells = table(out)
    n, mean, ci, seeds = cells["RAG, bm25 top-3: em", "eval: retriever=bm25"]  # 0.5, 0.7: mean 0.6, s = 0.1 sqrt(2)
    assert (n, float(mean), seeds) == ("2", 0.6, "0, 1")
    assert interval(ci) == pytest.approx((0.6 - T_975[1] * 0.1, 0.6 + T_975[1] * 0.1), abs=1e-3)
    # the evaluated run's points meet across seeds whatever its per-seed name; a compared model keeps its name
    assert cells["evaluated model with 2 documents: em", "eval: retriever=bm25"][:2] == ["2", "0.3"]
    assert cells["t with 2 documents: em", "eval: retriever=bm25"][:2] == ["2", "0.15"]
    assert cells["RAG, bm25 top-3: em", "eval: (defaults)"] == ["1", "0.25", "n=1: no interval", "4"]
    assert not any(metric.startswith("eval/") for metric, _ in cells)  # the eval's metrics.jsonl is not a run
    assert "plot:   none" in out and not (tmp_path / "out" / "report.png").exists()


def test_the_plot_overlays_each_groups_curves(tmp_path, capsys):
    import matplotlib.image

    for name, model, bpb in [("a0", "a", 1.0), ("a1", "a", 2.0), ("b0", "b", 3.0)]:
        write_job(tmp_path / name, [f"model={model}", f"seed={name[1]}"], int(name[1]), training(bpb, 1.0))
    code, out, err = command_result(main, [tmp_path], capsys)
    assert code == 0, err
    png = tmp_path / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert (height, width) == (400, 1200)  # two panels: val/bpb and train/loss
    assert f"plot:   {png}" in out


def test_wandb_gets_the_table_and_the_plot_when_the_logger_says_so(tmp_path, capsys, monkeypatch):
    calls = []

    class Run:
        def log(self, data):
            calls.append(("log", data))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    fake = types.SimpleNamespace(init=init, Table=lambda columns, data: ("table", columns, data),
                                 Image=lambda path: ("image", path))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for s, bpb in [(0, 1.0), (1, 3.0)]:
        write_job(tmp_path / str(s), [f"seed={s}"], s, training(bpb, 1.0))
    code, _, err = command_result(main, [tmp_path, "logger=wandb", "logger.project=seeds"], capsys)
    assert code == 0, err
    (_, init_args), (_, logged), finished = calls
    assert init_args["project"] == "seeds" and init_args["job_type"] == "report" and finished == ("finish",)
    kind, columns, rows = logged["seeds_report"]
    assert columns == ["metric", "group", "n", "mean", "low", "high", "seeds"]
    bpb = next(r for r in rows if r[0] == "val/bpb")
    assert bpb[:4] == ["val/bpb", "train: (defaults)", 2, 2.0]
    assert bpb[4:6] == pytest.approx([2 - T_975[1], 2 + T_975[1]], abs=1e-6)
    assert logged["seeds_report_curves"] == ("image", str(tmp_path / "report.png"))
    calls.clear()
    assert command_result(main, [tmp_path], capsys)[0] == 0 and calls == []  # logger=none: no wandb


@pytest.mark.parametrize("case", ["no paths", "missing", "empty", "bad line", "bad eval", "bad overrides",
                                  "out is a file", "unknown option"])
def test_bad_inputs_are_one_error_line_and_leave_the_last_report(tmp_path, capsys, case):
    good = write_job(tmp_path / "good", ["seed=0"], 0, training(1.0, 1.0))
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("the last report\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    argv, named = [good, f"out={out}"], None
    if case == "no paths":
        argv, named = [f"out={out}"], "give one or more PATHs"
    elif case == "missing":
        argv, named = [good, tmp_path / "nowhere", f"out={out}"], f"{tmp_path / 'nowhere'} does not exist"
    elif case == "empty":
        argv, named = [good, bad, f"out={out}"], f"no training run (metrics.jsonl) or evaluation (eval.json) under {bad}"
    elif case == "bad line":
        write_job(bad / "0", [], 1, [{"step": 0, "val/bpb": 1.0}])
        with (bad / "0" / "metrics.jsonl").open("a") as f:
            f.write('{"step": 1, "val/bpb": \n')
        argv, named = [good, bad, f"out={out}"], f"{bad / '0' / 'metrics.jsonl'}:2: not a JSON line of metrics"
    elif case == "bad eval":
        (bad / "eval.json").write_text(json.dumps({"conditions": [{"em": [1, 2, 3]}]}))
        argv, named = [good, bad, f"out={out}"], f"{bad / 'eval.json'}: not an eval.json"
    elif case == "bad overrides":
        write_job(bad / "0", [], 1, training(1.0, 1.0))
        (bad / "0" / ".hydra" / "overrides.yaml").write_text("seed: 0\n")
        argv, named = [good, bad, f"out={out}"], "overrides.yaml: expected a list of key=value overrides"
    elif case == "out is a file":
        argv, named = [good, f"out={out / 'report.md'}"], "is a file; give a folder"
    elif case == "unknown option":
        argv, named = [good, f"out={out}", "logger.projekt=x"], "projekt"
    code, printed, err = command_result(main, argv, capsys)
    assert code == 2 and printed == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and named in err, err
    assert (out / "report.md").read_text() == "the last report\n" and not (out / "report.png").exists()


def test_a_two_seed_multirun_reports_the_seeds_it_ran(tmp_path):
    """End to end: python -m hybridchat.train -m seed=0,1, then the report of its sweep folder,
    against the two runs' metrics.jsonl read here."""
    env = {**os.environ, "HYBRIDCHAT_RUN_DIR": str(tmp_path / "sweep")}
    train = subprocess.run([sys.executable, "-m", "hybridchat.train", "-m", "seed=0,1", "debug=smoke",
                            "stage.num_steps=2", "stage.eval_every=1", f"paths.outputs={tmp_path}", "progress=false"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    result = subprocess.run([sys.executable, "-m", "hybridchat.report", str(tmp_path / "sweep")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    finals = []
    for job in ("0", "1"):
        records = [json.loads(line) for line in (tmp_path / "sweep" / job / "metrics.jsonl").read_text().splitlines()]
        finals.append([r["val/bpb"] for r in records if "val/bpb" in r][-1])
    assert finals[0] != finals[1]  # the seed changed the run
    n, mean, ci, seeds = table(result.stdout)["val/bpb", "train: debug=smoke stage.eval_every=1 stage.num_steps=2"]
    assert (n, seeds) == ("2", "0, 1")
    m, half = sum(finals) / 2, T_975[1] * abs(finals[0] - finals[1]) / 2  # s / sqrt(2) = |a - b| / 2
    assert float(mean) == pytest.approx(m, rel=1e-3)
    assert interval(ci) == pytest.approx((m - half, m + half), rel=1e-3, abs=1e-3)
    assert (tmp_path / "sweep" / "report.md").is_file() and (tmp_path / "sweep" / "report.png").is_file()
