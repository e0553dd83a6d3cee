"""Read users' chat data: JSONL, one conversation per line.

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

A conversation is an optional system message, then turns alternating user, assistant, ... that
start with the user and end with the assistant (the last reply is what a chat model learns to
write). Every rule is checked while reading, so a bad line fails with its file:line before any
training starts instead of as a shape error hours later. Keys other than "messages", "role" and
"content" are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

from hybridchat.core.errors import UserError

ROLES = ("system", "user", "assistant")
EXAMPLE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    text = repr(value)  # repr escapes newlines: the message stays on one line
    return text if len(text) <= 40 else text[:37] + "..."


def _check_message(where: str, i: int, message: object, expected: str | None) -> dict[str, str]:
    """The message as {"role", "content"}, or a UserError; `expected` is the role the order requires."""
    if not isinstance(message, dict):
        raise UserError(f"{where}: messages[{i}] is {_json_type(message)}; each message must be an object "
                        f'{{"role": ..., "content": ...}}')
    role = message.get("role")
    if role not in ROLES:
        got = "has no role" if "role" not in message else f"has role {_short(role)}"
        raise UserError(f"{where}: messages[{i}] {got}; allowed roles: {', '.join(ROLES)}")
    content = message.get("content")
    if not isinstance(content, str):
        got = "has no content" if "content" not in message else f"content is {_json_type(content)}"
        raise UserError(f"{where}: messages[{i}] {got}; content must be a string")
    if role == "system" and i > 0:
        raise UserError(f"{where}: messages[{i}] is a system message; only the first message may be one")
    if expected is not None and role != expected:
        raise UserError(f"{where}: messages[{i}] is from the {role}, expected the {expected}; after an optional "
                        f"system message, turns alternate user, assistant, user, ...")
    return {"role": role, "content": content}


def _parse_line(where: str, line: str) -> list[dict[str, str]]:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, huge integers, deep nesting
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"{where}: not valid JSON ({type(e).__name__}: {detail}); each line must look like "
                        f"{EXAMPLE}") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object like {EXAMPLE}, got {_json_type(record)}")
    if "messages" not in record:
        raise UserError(f"{where}: no \"messages\" key (keys: {_short(sorted(record))}); each line must look like "
                        f"{EXAMPLE}")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        got = "an empty array" if messages == [] else _json_type(messages)
        raise UserError(f"{where}: \"messages\" is {got}; it must be a non-empty array of messages")
    # The first message may be the system's; after it the order is fixed: user, assistant, ...
    has_system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
    out = []
    for i, message in enumerate(messages):
        turn = i - has_system
        expected = None if turn < 0 else ("user", "assistant")[turn % 2]
        out.append(_check_message(where, i, message, expected))
    if out[-1]["role"] != "assistant":
        what = "only a system message" if out[-1]["role"] == "system" else f"a {out[-1]['role']} message"
        raise UserError(f"{where}: the conversation ends with {what}; it must end with an assistant reply")
    return out


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Every conversation of a JSONL chat file, as lists of {"role", "content"}; UserError on any bad line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a JSONL file with one {EXAMPLE} per line")
    conversations = []
    try:
        with path.open("rb") as f:
            # Bytes, split on b"\n" only: str.splitlines would also split at U+2028 and friends,
            # which JSON allows unescaped inside strings, and would shift the line numbers.
            for line_no, raw in enumerate(f, start=1):
                where = f"{path}:{line_no}"
                try:
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # tolerate a BOM
                except UnicodeDecodeError as e:
                    raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                                    f"chat files must be UTF-8 JSONL") from None
                if line.strip():
                    conversations.append(_parse_line(where, line))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; expected a JSONL file with one {EXAMPLE} per line") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not conversations:
        raise UserError(f"{path}: no conversations (the file is empty or blank); expected one {EXAMPLE} per line")
    return conversations
