"""Multi-hop replies in the server's continuous batch (serve/batcher.py): each is one sequence of
the batch, fed its queries' documents mid-decode, and its reply (text, citations, hops, documents,
confidence, the threshold's decisions) is exactly what rag/multihop.py's MultiHop answers for the
same question alone; a single-hop reply decodes on meanwhile. Scripted tiny models (as in
tests/test_refrag.py) write the queries; where nothing is scripted the random model writes."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_refrag import ADA, KOR, QUESTION, Scripted, TitleRetriever, chain, multihop, tokenizer
from test_serve_batcher import Client, serve

from hybridchat.data.chat import ChatRenderer
from hybridchat.rag.answer import ABSTAIN
from hybridchat.retrieval.config import RetrieverConfig
from hybridchat.training.answering import Assistant

QUESTIONS = [QUESTION, "Where was Ada Vell born?", "Who lives in Vellport?", "Who founded Kor Industries?"]


class Bigram(Scripted):
    """Scripted at every position, not only the last: the reference's confidence (one forward over
    the whole prefix) and the server's (read from the row's cache) see the same logits. The forced
    token is lifted above the model's own, so where it is ruled out the model's own choice follows.
    A small `lift` makes the script a leaning, the model's own logits still count. Its random weights are shaken up, so that what it writes unscripted depends on what it read."""

    def __init__(self, vocab: int, script: dict[int, int], lift: float = 1e4):
        super().__init__(vocab, script)
        self.lift = lift
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.inner.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, idx, targets=None, cache=None, last_only=False, reduction="mean"):
        logits = self.inner(idx, cache=cache, last_only=last_only).clone()
        following = torch.full((logits.shape[-1],), -1, dtype=torch.long)
        following[list(self.script)] = torch.tensor(list(self.script.values()))
        forced = following[idx[:, -logits.shape[1]:]]
        rows, at = (forced >= 0).nonzero(as_tuple=True)
        logits[rows, at, forced[rows, at]] += self.lift
        return logits


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


class HopClient(Client):
    """Its hook runs on its first sources, not its first reply piece (a multi-hop reply comes whole,
    at its end): the next request is then sent while this one decodes."""

    def send(self, kind, payload):
        if kind == "sources" and self.on_first_piece is not None:
            hook, self.on_first_piece = self.on_first_piece, None
            hook()
        super().send(kind, payload)


def asks(tok, query: str, then: str | None = None) -> dict[int, int]:
    """<|assistant_start|> -> the query -> (documents) -> `then` and the end, or whatever the model writes."""
    t = tok.token_id
    script = chain([t("<|assistant_start|>"), t("<|query_start|>"), *tok.encode(query), t("<|query_end|>")])
    if then is not None:
        script.update(chain([t("<|documents_end|>"), *tok.encode(then), t("<|assistant_end|>")]))
    return script


def scripts(tok) -> dict[str, dict[int, int]]:
    t = tok.token_id
    answer = chain([t("<|documents_end|>"), *tok.encode("[1] Tam Brel"), t("<|assistant_end|>")])
    return {
        # after every documents section the same query again: it never stops asking
        "asks on": {**asks(tok, "Vellport"), t("<|documents_end|>"): t("<|query_start|>")},
        "empty": {**chain([t("<|assistant_start|>"), t("<|query_start|>"), t("<|query_end|>")]), **answer},
        "malformed": {**chain([t("<|assistant_start|>"), *tok.encode("Kor"), t("<|query_end|>")]), **answer},
        "malformed first": {**chain([t("<|assistant_start|>"), t("<|query_end|>")]), **answer},  # the prefill's token
        "answers": asks(tok, "Kor Industries", "[2] Tam Brel"),
    }


def served(model, tok, max_context=512, hop_tokens=64, **options) -> Assistant:
    """The server's view of a scripted checkpoint: top-1 retrieval, queries of up to 8 tokens."""
    run = SimpleNamespace(model=model, tokenizer=tok, config=SimpleNamespace(model=SimpleNamespace(sequence_len=max_context)),
                          stage=SimpleNamespace(max_query_tokens=8, hop_tokens=hop_tokens))
    return Assistant(Path("scripted"), run, RetrieverConfig(kind="bm25", top_k=1), TitleRetriever(),
                     options.get("threshold"), options.get("max_hops", 2), max_answer_tokens=8)


def reference(model, tok, clients, max_context=512, hop_tokens=64, **options):
    """MultiHop's answer to each client's question alone, its reply length the client's."""
    return [multihop(model, tok, TitleRetriever(), max_context=max_context, hop_tokens=hop_tokens,
                     max_answer_tokens=c.job.max_tokens, **options).answer([c.job.question])[0] for c in clients]


def assert_same(client: Client, want) -> None:
    done = client.done
    got = done.answer
    assert (got.reply, got.answer, got.citations, got.abstained, got.format_ok) == \
        (want.reply, want.answer, want.citations, want.abstained, want.format_ok)
    assert (got.below_threshold, got.over_abstention) == (want.below_threshold, want.over_abstention)
    assert [(h.query, h.status, [d.id for d in h.documents]) for h in got.hops] == \
        [(h.query, h.status, [d.id for d in h.documents]) for h in want.hops]
    assert [d.id for d in got.documents] == [d.id for d in want.documents]
    assert got.confidence == pytest.approx(want.confidence, abs=1e-5)
    assert done.mode == "multi-hop" and client.text == got.reply
    # the sources sent: hop 1's documents, then all shown so far after each hop that found some
    sources = [[d.id for d in shown] for kind, (shown, _) in
               ((k, p) for k, p in client.events if k == "sources")]
    assert sources[0] == [d.id for d in want.hops[0].documents] and sources[-1] == [d.id for d in want.documents]
    # each query as it was answered or refused, with every source shown by then
    hops = [(h.query, h.status, [d.id for d in h.documents], [d.id for d in shown])
            for kind, (h, shown) in ((k, p) for k, p in client.events if k == "hop")]
    assert hops == [(h.query, h.status, [d.id for d in h.documents],
                     [d.id for earlier in want.hops[:i + 1] for d in earlier.documents])
                    for i, h in enumerate(want.hops[1:], 1)]


def test_multi_hop_replies_joining_mid_decode_get_multihop_s_answers_and_decode_together(tok):
    model = Bigram(tok.vocab_size, asks(tok, "Kor Industries"))
    clients = [HopClient(QUESTIONS[0]), HopClient(QUESTIONS[1], max_tokens=5), HopClient(QUESTIONS[2]),
               HopClient(QUESTIONS[3], max_tokens=6)]
    want = reference(model, tok, clients)
    assert {h.status for w in want for h in w.hops[1:]} == {"ok"} and any(len(w.documents) == 2 for w in want)
    batcher = serve(served(model, tok), clients, first=2)
    for c, w in zip(clients, want):
        assert_same(c, w)
    assert batcher.rows / batcher.steps > 1.5  # the replies shared the steps


@pytest.mark.parametrize("script, max_hops, max_tokens, context", [
    ("asks on", 2, 8, 512), ("asks on", 3, 8, 512), ("asks on", 3, 20, 512),  # hops past max_hops refused
    ("empty", 2, 8, 512), ("malformed", 2, 8, 512), ("malformed first", 2, 8, 512),
    ("answers", 2, 8, 512), ("answers", 2, 8, "a token short"),  # the query's documents do not fit
])
def test_hop_budgets_refused_queries_and_the_end_of_the_reply_are_multihop_s(tok, script, max_hops, max_tokens, context):
    if context == "a token short":  # for the first question's documents after its query (by hand, as in test_refrag)
        renderer = ChatRenderer(tok)
        context = (len(renderer.prompt([{"role": "user", "content": QUESTION, "documents": [ADA]}]))
                   + len(renderer.query("Kor Industries")) + len(renderer.results([KOR], 2)) + max_tokens + 1 - 1)
    model = Bigram(tok.vocab_size, scripts(tok)[script])
    clients = [HopClient(q, max_tokens=max_tokens) for q in QUESTIONS[:2]]
    want = reference(model, tok, clients, max_hops=max_hops, max_context=context, hop_tokens=1)
    serve(served(model, tok, max_hops=max_hops, max_context=context, hop_tokens=1), clients, first=1)
    for c, w in zip(clients, want):
        assert_same(c, w)
    statuses = [h.status for w in want for h in w.hops[1:]]
    if script.startswith("malformed"):  # the end marker is never sampled outside a query: none asked
        assert not statuses and all("<|query_end|>" not in w.reply for w in want)
    else:
        assert {"asks on": "over_max_hops", "answers": "ok" if context == 512 else "no_room"}.get(script, script) in statuses


@pytest.mark.parametrize("threshold", [None, 0.65])
def test_the_confidence_after_the_last_hop_and_the_threshold_s_decisions_are_multihop_s(tok, threshold):
    """Leaning (not forced) to abstain after the documents: confidences between 0.6 and 0.72; at 0.65
    the first question's abstention is overruled (its answer decoded again from after the documents)
    and the others' replies withheld."""
    model = Bigram(tok.vocab_size, asks(tok, "Kor Industries", ABSTAIN), lift=10)
    clients = [HopClient(q) for q in QUESTIONS]
    want = reference(model, tok, clients, threshold=threshold)
    assert all(0.6 < w.confidence < 0.72 and len(w.hops) == 2 for w in want)
    if threshold is not None:
        assert want[0].over_abstention and want[0].reply != ABSTAIN
        assert all(w.below_threshold and w.reply == ABSTAIN for w in want[1:])
    serve(served(model, tok, threshold=threshold), clients, first=2)
    for c, w in zip(clients, want):
        assert_same(c, w)


def test_a_single_hop_reply_decodes_and_finishes_while_a_multi_hop_one_is_in_flight(tok):
    model = Bigram(tok.vocab_size, scripts(tok)["asks on"])
    order = []

    class Recorded(HopClient):
        def send(self, kind, payload):
            order.append((self.job.question, kind))
            super().send(kind, payload)

    hops, alone = Recorded(QUESTION, max_tokens=8), Recorded("Where was Ada Vell born?", retrieval=False, max_tokens=3)
    [want] = reference(model, tok, [hops], max_hops=3)
    batcher = serve(served(model, tok, max_hops=3), [hops, alone], first=2)
    assert_same(hops, want)
    assert alone.done.mode == "closed-book" and alone.done.completion_tokens == 3
    done = [q for q, kind in order if kind == "done"]
    assert done == [alone.job.question, hops.job.question]  # the short reply did not wait for the long one
    assert batcher.rows > batcher.steps  # they decoded together


def test_a_streamed_multi_hop_reply_sends_each_hop_as_a_chunk_before_its_reply():
    """app._stream turns the batcher's events into OpenAI chunks: a hop's chunk carries its query,
    status and its documents' numbers among the sources shown so far (hand values)."""
    import asyncio
    import json

    from hybridchat.core.documents import Document
    from hybridchat.rag.multihop import Hop
    from hybridchat.serve.app import _stream
    from hybridchat.serve.protocol import Completion

    a, b, c = (Document(id=x, title=x.upper(), text=f"text of {x}") for x in ("a", "b", "c"))
    events: asyncio.Queue = asyncio.Queue()
    for event in [("sources", ([a, b], 0)), ("hop", (Hop("B's founder", [c], "ok"), [a, b, c])),
                  ("sources", ([a, b, c], 0)), ("hop", (Hop("", [], "empty"), [a, b, c])), ("error", "stop here")]:
        events.put_nowait(event)
    job = SimpleNamespace(cancelled=False)

    async def chunks():
        return [json.loads(s[len("data: "):]) async for s in _stream(job, events, Completion("m"), None)]

    got = [chunk.get("hybridchat", {}).get("hop") for chunk in asyncio.run(chunks())]
    assert [h for h in got if h is not None] == [{"query": "B's founder", "status": "ok", "documents": [3]},
                                                 {"query": "", "status": "empty", "documents": []}]
    assert got.index({"query": "B's founder", "status": "ok", "documents": [3]}) == 2  # after the role and sources
