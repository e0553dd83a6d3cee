"""The server's worker (serve/batcher.py) in-process, over the tiny cited checkpoint
(tests/serve_checkpoint.py): requests that arrive while others decode join the running batch, and
every reply, its confidence and its abstention are what the Answerer gives that question alone."""

import threading
from dataclasses import replace

import pytest
from serve_checkpoint import cited_assistant

from hybridchat.rag.answer import ABSTAIN, Answerer
from hybridchat.serve.batcher import Batcher, Job
from hybridchat.training.answering import Assistant

QUESTIONS = ["Where does Vipiren Reivailo live?", "Who founded Trogrouston Industries?", "When was it founded?",
             "Where was Ketha Drekris born?", "What does Ada Vell do?"]
TOKENS = 8


@pytest.fixture(scope="module")
def assistant(tmp_path_factory):
    return cited_assistant(tmp_path_factory.mktemp("batcher"), TOKENS)


class Client:
    """A job's events, and a hook run on its first reply piece (to send the next request mid-decode)."""

    def __init__(self, question: str, retrieval: bool = True, max_tokens: int = TOKENS, on_first_piece=None):
        self.events, self.finished = [], threading.Event()
        self.on_first_piece = on_first_piece
        self.job = Job(question, retrieval, max_tokens, self.send)

    def send(self, kind, payload):
        self.events.append((kind, payload))
        if kind == "delta" and self.on_first_piece is not None:
            hook, self.on_first_piece = self.on_first_piece, None
            hook()
        if kind in ("done", "error"):
            self.finished.set()

    @property
    def done(self):
        assert self.finished.wait(120), self.events
        kind, payload = self.events[-1]
        assert kind == "done", payload
        return payload

    @property
    def text(self) -> str:
        return "".join(p for kind, p in self.events if kind == "delta")


def expected(assistant: Assistant, clients: list[Client]):
    """What the Answerer answers each question alone (retrieval as the worker does it)."""
    out = []
    for c in clients:
        answerer = Answerer(assistant.run.model, assistant.run.tokenizer, assistant.max_context,
                            max_answer_tokens=c.job.max_tokens, threshold=assistant.threshold)
        documents = None
        if c.job.retrieval:
            documents = [h.document for h in assistant.retriever.search([c.job.question], top_k=3)[0]]
        out.append(answerer.answer([c.job.question], [documents])[0])
    return out


def serve(assistant: Assistant, clients: list[Client], first: int, batch_size: int = 4) -> Batcher:
    """Start a worker, submit the first `first` clients at once, the rest each on the previous one's
    first reply piece (so they join a batch that is decoding); wait for every answer."""
    batcher = Batcher(assistant, batch_size=batch_size, queue_size=16)
    for before, after in zip(clients[first - 1:], clients[first:]):
        before.on_first_piece = (lambda job: lambda: batcher.submit(job))(after.job)
    batcher.start()
    try:
        for c in clients[:first]:
            batcher.submit(c.job)
        for c in clients:
            c.done
    finally:
        batcher.stop()
    return batcher


def test_requests_joining_mid_decode_get_the_answerers_replies_and_decode_together(assistant):
    clients = [Client(QUESTIONS[0]), Client(QUESTIONS[1], max_tokens=3), Client(QUESTIONS[2]),
               Client(QUESTIONS[3], retrieval=False), Client(QUESTIONS[4], max_tokens=5)]
    want = expected(assistant, clients)
    batcher = serve(assistant, clients, first=2)
    for c, w in zip(clients, want):
        done = c.done
        assert done.answer.reply == w.reply and c.text == w.reply and w.reply
        assert done.answer.confidence == pytest.approx(w.confidence, abs=1e-6)
        assert [d.id for d in done.answer.documents] == [d.id for d in w.documents]
        assert done.mode == ("rag" if c.job.retrieval else "closed-book")
        assert 0 < done.completion_tokens <= c.job.max_tokens
        assert done.finish_reason == ("length" if done.completion_tokens == c.job.max_tokens else "stop")
        sources = [p for kind, p in c.events if kind == "sources"]
        assert sources == ([] if not c.job.retrieval else [(w.documents, w.dropped)])
    assert batcher.rows / batcher.steps > 1.5  # replies shared the steps


def test_a_client_that_leaves_mid_reply_leaves_the_batch_and_the_others_are_unchanged(assistant):
    clients = [Client(QUESTIONS[0]), Client(QUESTIONS[1]), Client(QUESTIONS[2])]
    want = expected(assistant, clients)
    gone = clients[1]
    gone.on_first_piece = lambda: setattr(gone.job, "cancelled", True)
    batcher = Batcher(assistant, batch_size=4, queue_size=16)
    batcher.start()
    try:
        for c in clients:
            batcher.submit(c.job)
        for c in (clients[0], clients[2]):
            assert c.done.answer.reply == want[clients.index(c)].reply
    finally:
        batcher.stop()
    assert not gone.finished.is_set() and len(gone.text) < len(want[1].reply)
    assert batcher.rows < 3 * TOKENS  # its row left; it was not decoded to the end


def test_a_threshold_abstains_without_decoding_or_overrules_an_abstention_by_decoding_again(assistant, monkeypatch):
    clients = [Client(q) for q in QUESTIONS[:3]]
    batcher = serve(replace(assistant, threshold=2.0), clients, first=3)  # every confidence is below 2
    assert batcher.steps == 0
    assert all(c.done.answer.reply == ABSTAIN and c.done.answer.below_threshold and c.text == ABSTAIN for c in clients)

    # The tiny model never abstains: have every first reply read as one, and the abstention begin
    # with the token every reply begins with ("[1]" is planted), so each is decoded again without
    # it, as Answerer.answers_instead does.
    monkeypatch.setattr(Answerer, "overrules", lambda self, reply: True)
    init, first = Answerer.__init__, assistant.run.tokenizer.encode("[1]")[0]

    def abstention_begins_as_replies_do(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.abstain_ids = [first] + self.abstain_ids[1:]

    monkeypatch.setattr(Answerer, "__init__", abstention_begins_as_replies_do)
    sure = replace(assistant, threshold=0.0)
    clients = [Client(q) for q in QUESTIONS[:4]]
    want = expected(sure, clients)
    serve(sure, clients, first=2)
    for c, w in zip(clients, want):
        assert w.over_abstention and c.done.answer.over_abstention and not w.reply.startswith("[")
        assert c.done.answer.reply == w.reply and c.done.answer.confidence == pytest.approx(w.confidence, abs=1e-6)
