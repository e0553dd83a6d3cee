"""python -m hybridchat.bench train at toy sizes: one row per model, length and Newton-Schulz dtype,
each measured in its own process, written as the table's JSON and a figure."""

import json

from hybridchat.bench import train


def test_one_row_per_newton_schulz_dtype_with_the_dtype_the_step_ran(tmp_path, capsys):
    train.main(["--models", "hybrid_tiny", "--lengths", "64", "--batch-tokens", "128", "--steps", "1",
                "--gpu", "cpu", "--newton-schulz", "auto", "float32", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "train.json").read_text())["rows"]
    assert [(r["model"], r["seq_len"], r["batch"], r["newton_schulz"]) for r in rows] == \
        [("hybrid_tiny", 64, 2, "float32")] * 2  # auto is float32 on a CPU
    assert all(r["step_ms"] > 0 and "error" not in r for r in rows)
    assert (tmp_path / "train.png").stat().st_size > 0
    assert "newton_schulz" in capsys.readouterr().out
