"""The serving benchmark's misbehaving client (bench/serve.py --faults): while the others ask, it
sends what a careless or broken client sends, one kind after another, and records what came back.

Each kind has the answer the server must give (docs/serve.md's error table): a JSON error with a 4xx
status, or, for a client that leaves, nothing to answer: the server closes cleanly and goes on,
which the benchmark checks by answering everyone else and the request that follows.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Callable
from urllib.parse import urlsplit

# kind -> the status it must get (None: the client leaves before any answer)
EXPECTED = {"malformed JSON": 400, "unknown model": 404, "oversized prompt": 400, "left, not streamed": None,
            "left mid-stream": None}


def _request(url: str, body: bytes) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (parts.netloc.encode(), len(body), body))
    return sock


def _status(sock: socket.socket) -> int:
    """The response's status code (its first line), then the connection is closed."""
    with sock, sock.makefile("rb") as response:
        return int(response.readline().split()[1])


def send(url: str, model: str, kind: str) -> int | None:
    """One faulty request of `kind`; the status it got (None for a client that left)."""
    ask = lambda content, **more: json.dumps({"model": model, "messages": [  # noqa: E731
        {"role": "user", "content": content}], **more}).encode()
    if kind == "malformed JSON":
        return _status(_request(url, b'{"model": "' + model.encode() + b'", "messages": ['))
    if kind == "unknown model":
        return _status(_request(url, json.dumps({"model": "gpt-4o", "messages": [
            {"role": "user", "content": "Who?"}]}).encode()))
    if kind == "oversized prompt":  # longer than the model's context, within max_request_bytes
        return _status(_request(url, ask("Who? " * 3000)))
    if kind == "left, not streamed":
        _request(url, ask("Where was Ada Vell born?")).close()  # gone before the reply
        return None
    if kind == "left mid-stream":
        sock = _request(url, ask("Where was Ada Vell born?", stream=True))
        sock.recv(1)  # the stream has begun
        sock.close()
        return None
    raise ValueError(kind)


def misbehave(url: str, model: str, until: Callable[[], bool], pause: float = 0.5) -> list[tuple[str, int | None]]:
    """Faulty requests of every kind in turn, one each `pause` seconds until `until()`: (kind, status)."""
    got, kinds = [], list(EXPECTED)
    while not until():
        kind = kinds[len(got) % len(kinds)]
        try:
            got.append((kind, send(url, model, kind)))
        except (OSError, ValueError, IndexError):  # no status line: the server failed it
            got.append((kind, 0))
        time.sleep(pause)
    return got


def summary(got: list[tuple[str, int | None]]) -> list[dict]:
    """One row per kind: how many were sent, the statuses they got, and whether each got its expected one."""
    rows = []
    for kind, want in EXPECTED.items():
        statuses = [s for k, s in got if k == kind]
        rows.append({"kind": kind, "sent": len(statuses), "expected": want or "clean close",
                     "got": ", ".join(sorted({str(s) if s is not None else "clean close" for s in statuses})) or "-",
                     "as expected": all(s == want for s in statuses)})
    return rows
