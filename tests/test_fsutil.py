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
