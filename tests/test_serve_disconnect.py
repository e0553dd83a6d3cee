"""A client that leaves before its non-streamed reply is written: the reply leaves the batch at the
next decode step instead of being decoded to the end (a streaming one's test is in test_serve.py).

The app runs in-process (uvicorn in a thread, over tests/serve_checkpoint.py's tiny model), so the
worker's own count of decoded rows shows what was decoded; each decode step is slowed down so that
a whole reply takes seconds and the disconnect lands in the middle of it."""

import http.client
import json
import socket
import threading
import time

import pytest
from serve_checkpoint import save_cited_checkpoint

from hybridchat.model.engine import DecodeBatch
from hybridchat.retrieval.config import RetrieverConfig
from hybridchat.serve.app import build_app
from hybridchat.serve.batcher import Batcher
from hybridchat.serve.config import ServeConfig
from hybridchat.training.answering import Assistant
from hybridchat.training.runs import load_run

uvicorn = pytest.importorskip("uvicorn")

TOKENS = 40
STEP_SECONDS = 0.05


@pytest.fixture
def server(tmp_path, monkeypatch):
    step = save_cited_checkpoint(tmp_path)
    run = load_run(step)
    settings = RetrieverConfig(kind="bm25", top_k=3)
    retriever = run.build_retriever(settings, tmp_path / "cache", progress=False)
    assistant = Assistant(step, run, settings, retriever, threshold=None, max_hops=1, max_answer_tokens=TOKENS)
    batcher = Batcher(assistant, batch_size=4, queue_size=8)
    model_id = "tiny/rag"
    step_once = DecodeBatch.step

    def slow_step(self):
        time.sleep(STEP_SECONDS)
        return step_once(self)

    monkeypatch.setattr(DecodeBatch, "step", slow_step)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    app = build_app(batcher, ServeConfig(api_key=None), model_id)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started
    yield batcher, sock.getsockname()[1], model_id
    uv.should_exit = True
    thread.join(timeout=30)


def body(model_id: str) -> bytes:
    return json.dumps({"model": model_id, "max_tokens": TOKENS,
                       "messages": [{"role": "user", "content": "Who founded Trogrouston Industries?"}]}).encode()


def settled(batcher: Batcher) -> int:
    """The worker's decoded rows once it has stopped decoding (nothing new for 1 s, at most 30 s)."""
    deadline, rows = time.monotonic() + 30, -1
    while rows != batcher.rows and time.monotonic() < deadline:
        rows = batcher.rows
        time.sleep(1.0)
    return rows


def test_a_non_streamed_request_whose_client_left_leaves_the_batch(server):
    batcher, port, model_id = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body(model_id), {"Content-Type": "application/json"})
    whole = json.loads(conn.getresponse().read())
    conn.close()
    # The reply runs to max_tokens: decoded to the end it takes TOKENS - 1 steps after its prefill.
    assert whole["usage"]["completion_tokens"] == TOKENS
    full = settled(batcher)
    assert full >= TOKENS - 1

    gone = socket.create_connection(("127.0.0.1", port))
    data = body(model_id)
    gone.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    deadline = time.monotonic() + 30
    while batcher.rows < full + 3 and time.monotonic() < deadline:  # it is decoding
        time.sleep(0.01)
    gone.close()
    decoded = settled(batcher) - full
    assert 3 <= decoded < TOKENS // 2, decoded

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)  # the server goes on
    conn.request("POST", "/v1/chat/completions", body(model_id), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["choices"][0]["message"]["content"] == \
        whole["choices"][0]["message"]["content"]
