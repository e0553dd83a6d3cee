"""python -m hybridchat.results table / paired: a record's table from evaluations over seeds, checked
against hand-computed means and Student-t intervals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybridchat.core.errors import UserError
from hybridchat.results.seed_tables import budget_table, conditions_table, evaluations, paired

# t(0.975, df=2) = 4.302653 (tables); values 0.90, 0.95, 1.00 have s = 0.05: half-width 4.302653 * 0.05 / sqrt(3).
HALF = 4.302653 * 0.05 / 3 ** 0.5


def write_eval(folder: Path, seed: int, em: float, warm_em: float, hops: float, ttft: float) -> None:
    folder.mkdir(parents=True)
    conditions = [
        {"condition": "closed-book (mid model)", "em": [0.0, 0.0, 0.0], "hops": [0.0, 0.0, 0.0]},
        {"condition": "REFRAG after warm start (step 100)", "em": [warm_em, 0, 1], "hops": [hops, 0, 9]},
        {"condition": "REFRAG after RL (model-written queries)", "em": [em, 0, 1], "hops": [hops, 0, 9],
         "citation": [float("nan"), float("nan"), float("nan")]},
    ]
    budget = [{"model": f"run/s{seed}", "documents": k, "context_tokens": 100 * k + seed, "em": [em / k, 0, 1],
               "ttft_ms": 10.0 * k + seed} for k in (1, 2)]
    budget.append({"model": "another_run", "documents": 1, "context_tokens": 5, "em": [0.5, 0, 1], "ttft_ms": 1.0})
    report = {"run_name": f"run/s{seed}", "seed": seed, "hops": 2, "conditions": conditions, "context_budget": budget}
    (folder / "eval.json").write_text(json.dumps(report))


@pytest.fixture
def sweep(tmp_path):
    for job, (seed, em, warm) in enumerate([(0, 0.90, 0.90), (1, 0.95, 0.80), (2, 1.00, 0.85)]):
        write_eval(tmp_path / str(job), seed, em, warm, hops=1.5 + seed, ttft=0)
    return tmp_path


def test_each_cell_is_the_mean_and_its_t_interval_or_the_value_all_seeds_share(sweep):
    out = conditions_table(evaluations(sweep))
    assert out["seeds"] == [0, 1, 2]
    assert [c["name"] for c in out["table"]["columns"]] == ["condition", "EM", "retrievals per question"]
    closed, warm, rl = out["table"]["rows"]
    assert closed == ["closed-book (mid model)", 0.0, 0.0]  # the same for every seed: no interval
    assert rl[1] == {"value": 0.95, "ci": [round(0.95 - HALF, 3), 1.0]}  # the upper bound clipped to a rate's 1
    # retrievals are a count, not a rate: 1.5, 2.5, 3.5 (s = 1) keeps its interval above 1
    assert rl[2] == {"value": 2.5, "ci": [round(2.5 - 4.302653 / 3 ** 0.5, 3), round(2.5 + 4.302653 / 3 ** 0.5, 3)]}
    assert out["per_seed"]["REFRAG after warm start (step 100): em"] == [0.9, 0.8, 0.85]


def test_the_context_budget_is_the_evaluated_runs_own(sweep):
    out = budget_table(evaluations(sweep))
    # another_run is compared, not the seed's model: left out
    assert out["table"]["rows"] == [[1, 101, {"value": 0.95, "ci": [round(0.95 - HALF, 3), 1.0]}, 11.0],
                                    [2, 201, {"value": 0.475, "ci": [round(0.475 - HALF / 2, 3), round(0.475 + HALF / 2, 3)]}, 21.0]]


def test_paired_differences_decide_the_claim(sweep):
    reports = evaluations(sweep)
    out = paired(reports, "REFRAG after RL", "REFRAG after warm start")
    assert out["differences"] == [0.0, 0.15, 0.15]
    # mean 0.1, s = 0.0866: half-width 4.302653 * 0.0866 / sqrt(3) = 0.215 > 0.1
    assert out["mean"] == 0.1 and out["ci"][0] < 0 < out["ci"][1]
    assert out["verdict"].endswith("not distinguishable across these seeds")
    assert paired(reports, "REFRAG after RL", "closed-book")["verdict"].endswith("higher across seeds")
    assert paired(reports, "closed-book", "REFRAG after RL")["verdict"].endswith("lower across seeds")
    with pytest.raises(UserError, match="exactly one condition"):
        paired(reports, "REFRAG", "closed-book")


def test_evaluations_of_different_experiments_are_refused(sweep):
    write_eval(sweep / "again", 0, 0.5, 0.5, 1, 0)
    with pytest.raises(UserError, match="own seed"):
        evaluations(sweep)


def test_the_command_line_prints_json_or_one_error_line(sweep):
    run = lambda *args: subprocess.run([sys.executable, "-m", "hybridchat.results", *args], capture_output=True,
                                       text=True)
    done = run("table", str(sweep), "budget")
    assert done.returncode == 0 and json.loads(done.stdout)["seeds"] == [0, 1, 2]
    for bad in (["table", str(sweep), "nonsense"], ["table", str(sweep / "missing")], ["paired", str(sweep), "x"]):
        failed = run(*bad)
        assert failed.returncode == 2 and failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1
