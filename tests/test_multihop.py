"""rag/multihop.py's pieces on their own: the retriever call, the room kept for hops to come, the rule
that writes bridge queries, what makes a reply well-formed, and batches of answers with a threshold.
(The query hook's round trip with a scripted model is in tests/test_refrag.py.)"""

import pytest
from test_refrag import (
    ADA,
    DOCS,
    KOR,
    QUESTION,
    VELLPORT,
    Scripted,
    TitleRetriever,
    chain,
    multihop,
    script_query_then_answer,
    tokenizer,
)

from hybridchat.core.documents import Document
from hybridchat.data.chat import ChatRenderer
from hybridchat.rag.answer import ABSTAIN, Answerer
from hybridchat.rag.multihop import BridgeQueries, Hop, MultiHop, Search, Trajectory


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


class RecordingRetriever(TitleRetriever):
    """TitleRetriever that also records each call's top_k and filters."""

    def __init__(self, documents=DOCS):
        super().__init__(documents)
        self.calls = []

    def search(self, queries, top_k, filters=None):
        self.calls.append((list(queries), top_k, filters))
        return super().search(queries, top_k)


def test_search_asks_for_enough_to_skip_the_documents_already_shown():
    many = [Document(f"d{i}", f"Kor {i}", "x") for i in range(6)]
    retriever = RecordingRetriever(many)
    search = Search(retriever, top_k=2, filters={"source": "wiki"})
    got = search(["Kor 0 1 2", "Kor 4"], [[many[0], many[1]], []])
    # The longest shown list (2) is added to top_k, so 2 new ones remain after skipping.
    assert retriever.calls == [(["Kor 0 1 2", "Kor 4"], 4, {"source": "wiki"})]
    assert [[d.id for d in row] for row in got] == [["d2", "d3"], ["d4", "d0"]]
    assert [[d.id for d in row] for row in search(["Kor 5"])] == [["d5", "d0"]]  # nothing shown yet
    assert retriever.calls[-1][1] == 2


def test_max_hops_below_one_is_refused(tok):
    with pytest.raises(ValueError, match="^max_hops=0 must be >= 1$"):
        MultiHop(None, tok, Search(TitleRetriever(), 1), 256, max_hops=0)


def test_the_reply_budget_and_the_room_kept_for_hops_to_come_by_hand(tok):
    mh = MultiHop(None, tok, Search(TitleRetriever(), 1), 1000, max_hops=3, max_query_tokens=10,
                  max_answer_tokens=20, hop_tokens=100)
    assert mh.max_new_tokens == 2 * (10 + 2) + 20  # two queries with their markers, then the answer
    assert mh._room(0) == 21 and mh._room(2) == 21 + 2 * (12 + 100)
    assert mh._first_hop_tokens == 1000 - 21 - 2 * 112
    defaults = MultiHop(None, tok, Search(TitleRetriever(), 1), 1000)
    assert (defaults.max_hops, defaults.max_query_tokens, defaults.max_answer_tokens, defaults.hop_tokens,
            defaults.batch_size, defaults.threshold) == (2, 16, 24, 256, 32, None)
    # One hop: the first prompt leaves exactly the single-shot answerer's room for the reply.
    single = MultiHop(None, tok, Search(TitleRetriever(), 1), 300, max_hops=1, max_answer_tokens=20)
    assert single._first_hop_tokens == Answerer(None, tok, 300, max_answer_tokens=20).prompt_tokens == 279
    assert single.query_start == "<|query_start|>" and single.query_end == "<|query_end|>" and single.end_is_token


def test_bridge_queries_name_what_the_newest_documents_add():
    question = "Who founded the company Ada Vell works for?"
    ada = Document("p", "Ada Vell", "Ada Vell met Tam Brel of Kor Industries in Vellport. Ada Vell left. I saw X.")
    other = Document("q", "Kor Industries", "Kor Industries hired Lin Ashe.")
    # Names of the first document only (the default): new ones, once each, in order; the document's own
    # title, the question's words and one-letter names (I, X) are not news.
    assert BridgeQueries().query(question, [Hop(question, [ada, other])]) == \
        f"{question} Tam Brel of Kor Industries Vellport"
    assert BridgeQueries(documents=2).query(question, [Hop(question, [ada, other])]) == \
        f"{question} Tam Brel of Kor Industries Vellport Lin Ashe"
    # Earlier queries and earlier hops' titles are known; only the newest hop's documents are read.
    hops = [Hop(question, [ada]), Hop("Kor Industries", [other])]
    assert BridgeQueries().query(question, hops) == f"{question} Lin Ashe"
    assert BridgeQueries().query(question, [Hop(question, [Document("r", "R", "nothing here")])]) is None
    assert BridgeQueries().query(question, [Hop(question, [])]) is None


def test_bridge_queries_know_every_earlier_hop_s_titles_and_two_letter_names_are_names():
    """Three hops: the titles of both earlier hops' documents are known (not only the first's), the
    newest hop's are read for news; a two-letter name ("Bo") is a name, a one-letter one ("X") not."""
    question = "Who runs the mill Ada Vell sold?"
    hops = [Hop(question, [Document("a", "Ada Vell", "Ada Vell sold Quarrow Mill.")]),
            Hop("Quarrow Mill", [Document("t", "Tessaly Works", "Tessaly Works bought Quarrow Mill.")]),
            Hop("Tessaly Works", [Document("j", "Jep Holdings", "Jep Holdings owns Tessaly Works; Bo runs it "
                                                                "with X.")])]
    assert BridgeQueries().query(question, hops) == f"{question} Bo"
    # The second hop's title is known from its document, not only from a query that named it.
    hops[2] = Hop("Jep", hops[2].documents)
    assert BridgeQueries().query(question, hops) == f"{question} Bo"


def _trajectory(tok, text: str, hops=None, finish="stop", documents=2) -> Trajectory:
    renderer = ChatRenderer(tok)
    tokens = tok.encode(text) + ([renderer.stop_token] if finish == "stop" else [])
    hops = hops or [Hop("q", [ADA, KOR][:documents])]
    return Trajectory(0, [1, 2], tokens, [1] * len(tokens), hops, finish, 0)


@pytest.mark.parametrize("text, hops_ok, finish, ok", [
    ("[2] Tam Brel", True, "stop", True),
    (ABSTAIN, True, "stop", True),             # an abstention needs no citation
    ("[1] [2] Tam Brel", True, "stop", True),
    ("[3] Tam Brel", True, "stop", False),     # only 2 documents were shown
    ("[0] Tam Brel", True, "stop", False),
    ("[2] [3] Tam Brel", True, "stop", False),  # every citation must be valid
    ("Tam Brel", True, "stop", False),         # an answer must cite
    ("[2] Tam Brel", True, "length", False),   # did not stop
    ("[2] Tam Brel", False, "stop", False),    # a query was refused
    ("[2] <|query_start|>Kor", True, "stop", False),  # an unfinished query in the reply
])
def test_a_well_formed_reply_stops_follows_every_query_and_cites_a_document_shown(tok, text, hops_ok, finish, ok):
    hops = [Hop("q", [ADA]), Hop("Kor", [KOR], "ok" if hops_ok else "empty")]
    t = _trajectory(tok, text, hops, finish)
    mh = MultiHop(None, tok, Search(TitleRetriever(), 1), 256)
    reply, well_formed = mh.reply(t)
    assert reply == text and well_formed is ok


def test_a_reply_that_ran_out_inside_a_query_is_no_answer(tok):
    mh = MultiHop(None, tok, Search(TitleRetriever(), 1), 256)
    t = _trajectory(tok, "[1] Ada <|query_start|>Kor", finish="length")
    a = mh.to_answer("Q?", t, 0.75, 2.0)
    assert (a.reply, a.answer, a.citations, a.abstained, a.format_ok) == ("[1] Ada <|query_start|>Kor", ABSTAIN, [],
                                                                         True, False)
    assert (a.question, a.confidence, a.seconds, a.documents, a.dropped) == ("Q?", 0.75, 2.0, [ADA, KOR], 0)
    plain = mh.to_answer("Q?", _trajectory(tok, "[2] Tam Brel"))
    assert (plain.answer, plain.citations, plain.abstained, plain.format_ok) == ("Tam Brel", [2], False, True)
    assert plain.confidence != plain.confidence and plain.seconds == 0.0  # nan unless given


def test_below_the_threshold_the_reply_is_withheld_after_the_hops(tok):
    mh = MultiHop(None, tok, Search(TitleRetriever(), 1), 256, threshold=0.5)
    assert mh.threshold == 0.5
    t = _trajectory(tok, "[2] Tam Brel")
    low = mh.to_answer("Q?", t, 0.25)
    assert (low.reply, low.answer, low.citations, low.abstained, low.below_threshold) == (ABSTAIN, ABSTAIN, [], True,
                                                                                        True)
    assert low.confidence == 0.25 and low.hops == t.hops and low.format_ok  # the trace is kept
    at = mh.to_answer("Q?", t, 0.5)
    assert (at.reply, at.abstained, at.below_threshold) == ("[2] Tam Brel", False, False)


def test_answers_come_in_batches_with_the_confidence_after_the_last_hop(tok, monkeypatch):
    model = Scripted(tok.vocab_size, script_query_then_answer(tok, "Kor Industries", "[2] Tam Brel"))
    seen = []
    real = Answerer.confidence
    monkeypatch.setattr(Answerer, "confidence", lambda self, prefixes: seen.append(prefixes) or real(self, prefixes))
    mh = multihop(model, tok, TitleRetriever(), batch_size=2)
    answers = mh.answer([QUESTION, "Where was Ada Vell born?", "Kor Industries?"])
    assert [len(p) for p in seen] == [2, 1]  # two batches
    t = mh.rollouts([QUESTION])[0]
    # Scored on the prompt and everything before the answer: the query and its documents included.
    assert seen[0][0] == t.prompt + t.tokens[:t.answer_start]
    assert t.tokens[t.answer_start:] == tok.encode("[2] Tam Brel") + [ChatRenderer(tok).stop_token]
    assert all(a.seconds > 0 and 0 <= a.confidence <= 1 for a in answers)
    assert [a.question for a in answers] == [QUESTION, "Where was Ada Vell born?", "Kor Industries?"]
    assert answers[0].documents == [ADA, KOR] and [h.query for h in answers[0].hops] == [QUESTION, "Kor Industries"]


def test_several_samples_per_question_each_keep_their_own_trace(tok):
    t_ = tok.token_id
    model = Scripted(tok.vocab_size, {**chain([t_("<|assistant_start|>"), t_("<|query_start|>"),
                                                *tok.encode("Vellport"), t_("<|query_end|>")]),
                                      **chain([t_("<|documents_end|>"), *tok.encode("[2] x"), t_("<|assistant_end|>")])})
    retriever = TitleRetriever()
    mh = multihop(model, tok, retriever)
    trajectories = mh.rollouts([QUESTION, "Ada Vell?"], first=[[ADA], [KOR]], num_samples=3)
    assert [t.index for t in trajectories] == [0, 0, 0, 1, 1, 1]
    assert retriever.queries == ["Vellport"] * 6  # hop 1 given: only the written queries are searched
    # Each row skips what it was shown: ADA ranks first for "Vellport" (its title's "Vell"), so the row
    # shown ADA gets Vellport's document and the row shown KOR gets ADA.
    for t in trajectories:
        assert [h.query for h in t.hops] == [t.hops[0].query, "Vellport"] and len(t.hops) == 2
        assert t.documents == ([ADA, VELLPORT] if t.index == 0 else [KOR, ADA])
