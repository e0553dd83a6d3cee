"""Rank-order replies (reading=rank_order) in the server's continuous batch (serve/batcher.py): each
document's prompt is a sequence of its own, and the reply (text, the document read, citations,
every document's confidence) is exactly what RankOrderReader answers for the same question alone,
over the tiny cited checkpoint (tests/serve_checkpoint.py); a single-hop reply decodes on meanwhile."""

from dataclasses import replace

import pytest
from serve_checkpoint import cited_assistant
from test_serve_batcher import QUESTIONS, TOKENS, Client, serve

from hybridchat.data.chat import ChatRenderer
from hybridchat.model.engine import Engine
from hybridchat.rag import answer as answering
from hybridchat.rag.answer import RANK_ORDER, Answerer, RankOrderReader
from hybridchat.serve.batcher import Batcher
from hybridchat.training.answering import Assistant


@pytest.fixture(scope="module")
def assistant(tmp_path_factory):
    return cited_assistant(tmp_path_factory.mktemp("rank_order"), TOKENS, reading=RANK_ORDER)


def documents(assistant: Assistant, question: str) -> list:
    return [h.document for h in assistant.retriever.search([question], top_k=3)[0]]


def answerer(assistant: Assistant, max_tokens: int = TOKENS) -> Answerer:
    return Answerer(assistant.run.model, assistant.run.tokenizer, assistant.max_context, max_answer_tokens=max_tokens,
                    threshold=assistant.threshold)


def reference(assistant: Assistant, clients: list[Client]):
    """RankOrderReader's answer to each question alone (retrieval as the worker does it)."""
    return [RankOrderReader(answerer(assistant, c.job.max_tokens)).answer(
        [c.job.question], [documents(assistant, c.job.question)])[0] for c in clients]


def assert_same(client: Client, want) -> None:
    done = client.done
    got = done.answer
    assert (got.reply, got.answer, got.citations, got.abstained, got.read) == \
        (want.reply, want.answer, want.citations, want.abstained, want.read)
    assert (got.below_threshold, got.over_abstention, got.dropped) == (want.below_threshold, want.over_abstention,
                                                                       want.dropped)
    assert [d.id for d in got.documents] == [d.id for d in want.documents]
    assert got.read_confidences == pytest.approx(want.read_confidences, abs=1e-5)
    assert got.confidence == pytest.approx(want.confidence, abs=1e-5)
    assert done.mode == "rank-order" and client.text == got.reply
    assert [p for kind, p in client.events if kind == "sources"] == [(want.documents, want.dropped)]


@pytest.fixture
def abstaining(assistant, monkeypatch):
    """The tiny model never abstains, and is sure of it (every confidence is 1): make the reply it
    writes reading the first question's first document alone the abstention, and score as the
    abstention that reply's first token after "[1]" (a confidence near, not at, 1 that depends on the
    document), so the first question is answered from its second document."""
    first = answerer(assistant).answer([QUESTIONS[0]], [documents(assistant, QUESTIONS[0])[:1]])[0]
    monkeypatch.setattr(answering, "ABSTAIN", first.answer)
    init = Answerer.__init__

    def scored_as_abstention(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.abstain_ids = self.tokenizer.encode(first.reply)[:len(self.tokenizer.encode("[1]")) + 1]

    monkeypatch.setattr(Answerer, "__init__", scored_as_abstention)


def test_the_first_document_whose_reply_does_not_abstain_is_read_as_the_reader_reads_it(assistant, abstaining):
    clients = [Client(QUESTIONS[0]), Client(QUESTIONS[1], max_tokens=5), Client(QUESTIONS[2]), Client(QUESTIONS[3])]
    want = reference(assistant, clients)
    assert want[0].read == 2 and [w.read for w in want[1:]] == [1, 1, 1]
    assert all(len(set(w.read_confidences)) == 3 for w in want)
    batcher = serve(assistant, clients, first=2)
    for c, w in zip(clients, want):
        assert_same(c, w)
    assert batcher.rows / batcher.steps > 1.5  # the documents' replies and the questions shared the steps


def test_with_a_threshold_only_the_first_document_at_or_above_it_is_generated(assistant, abstaining):
    confidences = {q: RankOrderReader(answerer(assistant)).answer([q], [documents(assistant, q)])[0].read_confidences
                   for q in QUESTIONS}
    # between the best and the next of a question whose best document is not its first
    question, read = next((q, c) for q, c in confidences.items() if c and max(c) > c[0])
    threshold = sum(sorted(read)[-2:]) / 2
    sure = replace(assistant, threshold=threshold)
    # the questions whose documents are all clearly on one side of it (one with none is below it)
    clients = [Client(q) for q, c in confidences.items() if all(abs(x - threshold) > 1e-7 for x in c)]
    want = reference(sure, clients)
    assert want[[c.job.question for c in clients].index(question)].read == read.index(max(read)) + 1 > 1
    assert len(clients) >= 3 and any(w.read is None and w.below_threshold for w in want)
    batcher = serve(sure, clients, first=2)
    for c, w in zip(clients, want):
        assert_same(c, w)
    assert batcher.rows <= TOKENS * sum(w.read is not None for w in want)  # one document's reply per question read
def test_a_single_hop_reply_decodes_and_finishes_while_a_rank_order_one_is_in_flight(assistant):
    order = []

    class Recorded(Client):
        def send(self, kind, payload):
            order.append((self.job.question, kind))
            super().send(kind, payload)

    read, alone = Recorded(QUESTIONS[0]), Recorded(QUESTIONS[1], retrieval=False, max_tokens=2)
    [want] = reference(assistant, [read])
    batcher = serve(assistant, [read, alone], first=2)
    assert_same(read, want)
    assert alone.done.mode == "closed-book"
    assert [q for q, kind in order if kind == "done"] == [alone.job.question, read.job.question]
    assert batcher.rows > batcher.steps


def test_a_document_s_reply_that_answers_ends_the_later_ones_and_an_earlier_one_is_still_read(assistant, abstaining,
                                                                                             monkeypatch):
    """Make a token of the second document's reply (and of no other) the stop token: that reply ends
    first, answering; the third's is cut short (it cannot be read), the first's decodes on and is read."""
    question = QUESTIONS[1]
    prompts = [answerer(assistant).prompt(question, [d])[0] for d in documents(assistant, question)]
    replies = Engine(assistant.run.model).generate(prompts, TOKENS, temperature=0).tokens
    stop = next(t for t in replies[1][3:] if t not in replies[0] + replies[2])
    monkeypatch.setattr(ChatRenderer, "stop_token", property(lambda self: stop))
    client = Client(question)
    [want] = reference(assistant, [client])
    assert want.read == 1
    batcher = serve(assistant, [client], first=1)
    assert_same(client, want)
    # decode steps per reply: the first's to its end, the second's to its stop, the third's as many
    ended = replies[1].index(stop)
    assert batcher.rows == (TOKENS - 1) + ended + ended


def test_a_rank_order_reply_waits_for_as_many_free_rows_as_documents_it_reads(assistant, monkeypatch):
    """batch_size 4, bm25's top 3, no threshold: each rank-order reply takes 3 rows, so the second waits
    for the first to end instead of growing the batch to 6; a closed-book reply (1 row) fits beside
    the first. Rows in use are counted at every step."""
    from hybridchat.model.engine import DecodeBatch

    widths = []
    step = DecodeBatch.step

    def counted(self):
        widths.append(len(self))
        return step(self)
    monkeypatch.setattr(DecodeBatch, "step", counted)
    first, second, alone = Client(QUESTIONS[0]), Client(QUESTIONS[1]), Client(QUESTIONS[2], retrieval=False)
    want = reference(assistant, [first, second])
    batcher = Batcher(assistant, batch_size=4, queue_size=8)
    assert [batcher.rows_taken(c.job) for c in (first, second, alone)] == [3, 3, 1]
    for c in (first, second, alone):
        batcher.submit(c.job)
    batcher.start()
    try:
        for c, w in zip((first, second), want):
            assert_same(c, w)
        assert alone.done.mode == "closed-book"
    finally:
        batcher.stop()
    assert max(widths) == 4 and 4 in widths  # the closed-book reply beside the first rank-order one
    threshold = replace(assistant, threshold=0.5)
    assert Batcher(threshold, batch_size=4, queue_size=8).rows_taken(first.job) == 1  # only one document generated
