"""Atomic writes: a failure leaves the previous file or directory exactly as it was."""

import pytest

from hybridchat.core import fsutil
from hybridchat.core.fsutil import atomic_directory, atomic_write_text


def test_atomic_directory_swaps_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "kb"
    for version in ("1", "2"):
        with atomic_directory(target) as tmp:
            (tmp / "data").write_text(version)
            (tmp / f"only-in-{version}").write_text("")
    assert (target / "data").read_text() == "2"
    assert sorted(p.name for p in target.iterdir()) == ["data", "only-in-2"]
    assert [p.name for p in tmp_path.iterdir()] == ["kb"]


def test_failed_build_keeps_the_previous_directory(tmp_path):
    target = tmp_path / "kb"
    with atomic_directory(target) as tmp:
        (tmp / "data").write_text("good")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "data").write_text("half")
            raise KeyboardInterrupt
    assert (target / "data").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["kb"]


def test_failed_file_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "meta.json"
    atomic_write_text(target, "old")

    def crash(fd):  # the new bytes are written to the temp file, then the disk "fails"
        raise OSError("disk full")

    monkeypatch.setattr(fsutil.os, "fsync", crash)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_temporaries_of_a_killed_writer_are_removed_and_live_or_foreign_ones_kept(tmp_path):
    """A kill -9 during a save left its .step_*.tmp folder forever. A real process is killed inside
    atomic_directory (and inside atomic_write_text); what it left goes, while the temporary this
    process is writing and one named by another host stay."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    killed = ("import os, signal, sys\n"
              "from pathlib import Path\n"
              "from hybridchat.core.fsutil import atomic_directory, atomic_write_text\n"
              "out = Path(sys.argv[1])\n"
              "with atomic_directory(out / 'step_000006') as tmp:\n"
              "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", killed, str(tmp_path)], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".step_000006.") and left[0].endswith(".tmp")
    foreign = tmp_path / ".step_000009.other-host-1.abcd1234.tmp"
    foreign.mkdir()
    with atomic_directory(tmp_path / "step_000007") as mine:
        assert fsutil.remove_stale_temporaries(tmp_path) == [tmp_path / left[0]]
        assert mine.is_dir() and foreign.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name, "step_000007"]
