"""JSONL read one line at a time, each line's problem named by `file:line`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from hybridchat.core.errors import UserError


def json_lines(f: BinaryIO, path: str | Path) -> Iterator[tuple[str, Any]]:
    """("file:line", value) for each line of f that is not blank; a line that is not UTF-8 or not
    JSON is a UserError naming it."""
    for lineno, raw in enumerate(f, 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not UTF-8 text ({e.reason} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # integers too long to convert, nesting too deep
            raise UserError(f"{where}: invalid JSON ({type(e).__name__}: {' '.join(str(e).split())})") from None
        yield where, value
