"""rag/multihop.py's pieces on their own: the retriever call, the room kept for hops to come, the rule
that writes bridge queries, what makes a reply well-formed, and batches of answers with a threshold.
(The query hook's round trip with a scripted model is in tests/test_refrag.py.)"""

import time

import pytest
from test_answer import Preferring
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
from hybridchat.rag.multihop import BridgeQueries, Hop, MultiHop, QueryGenerator, RowState, Search, Trajectory


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


def test_no_queries_find_nothing():
    retriever = RecordingRetriever()
    assert Search(retriever, top_k=2)([]) == [] and Search(retriever, top_k=2)([], []) == []


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
    assert single.query_start == "<|query_start|>" and single.query_end == "<|query_end|>"
    assert single.query_pair == (tok.token_id("<|query_start|>"), tok.token_id("<|query_end|>"))
    # ChatML's query ends at a newline, ordinary text elsewhere: never ruled out
    from test_chat import chatml_tokenizer

    chatml = MultiHop(None, chatml_tokenizer(), Search(TitleRetriever(), 1), 1000)
    assert (chatml.query_start, chatml.query_end, chatml.query_pair) == ("Search: ", "\n", None)


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


def test_a_forced_hop_skips_the_documents_already_shown():
    """The bridge query names Ada Vell's and Kor Industries' titles alike (2 words each): the retriever
    ranks Ada Vell first, but hop 1 showed her document, so hop 2 gets Kor Industries'."""
    mh = multihop(None, tokenizer(), TitleRetriever())
    hops = mh.plan(QUESTION, [ADA], BridgeQueries())
    assert [[d.id for d in h.documents] for h in hops] == [["person-0001"], ["company-0002"]]
    assert "Kor Industries" in hops[1].query and hops[1].forced


def test_overrules_only_a_final_abstention_at_or_above_the_threshold(tok):
    mh = MultiHop(None, tok, Search(TitleRetriever(), 1), 256, threshold=0.5)
    abstains = _trajectory(tok, ABSTAIN)
    assert mh.overrules(abstains, 0.75) and mh.overrules(abstains, 0.5) and not mh.overrules(abstains, 0.25)
    assert not mh.overrules(_trajectory(tok, "[2] Tam Brel"), 0.75)
    assert not MultiHop(None, tok, Search(TitleRetriever(), 1), 256).overrules(abstains, 0.75)  # no threshold


def test_instead_replaces_the_final_answer_and_keeps_what_came_before(tok):
    stop = ChatRenderer(tok).stop_token
    t = Trajectory(0, [1, 2], [5, 6, 7, 8, stop], [1, 0, 0, 1, 1], [Hop("q", [ADA])], "stop", 3)
    mh = MultiHop(None, tok, Search(TitleRetriever(), 1), 256)
    done = mh.instead(t, [9, 10], "stop")
    assert (done.tokens, done.written, done.finish) == ([5, 6, 7, 9, 10, stop], [1, 0, 0, 1, 1, 1], "stop")
    cut = mh.instead(t, [9], "length")
    assert (cut.tokens, cut.written, cut.finish) == ([5, 6, 7, 9], [1, 0, 0, 1], "length")
    assert (t.tokens, t.written, t.finish) == ([5, 6, 7, 8, stop], [1, 0, 0, 1, 1], "stop")  # a new trajectory
    assert (done.index, done.prompt, done.hops, done.answer_start) == (0, [1, 2], t.hops, 3)


def abstains_after_a_query(tok) -> Preferring:
    """Writes the query "Kor Industries", then (after its documents) ABSTAIN; without ABSTAIN's first
    token, "[2] Tam Brel"."""
    t = tok.token_id
    ids = Answerer(None, tok, 200).abstain_ids
    script = chain([t("<|assistant_start|>"), t("<|query_start|>"), *tok.encode("Kor Industries"), t("<|query_end|>")])
    answer = tok.encode("[2] Tam Brel")
    prefs = {a: {b: 0.0} for a, b in {**script, **chain(ids), **chain([*answer, ids[-1]])}.items()}
    prefs[t("<|documents_end|>")] = {ids[0]: 30.0, answer[0]: 20.0}
    return Preferring(tok.vocab_size, prefs)


def test_answer_overrules_an_abstention_after_the_hops_and_reads_each_batchs_own_first_documents(tok):
    """At or above the threshold (0: always) the final ABSTAIN is replaced by the reply without its
    first token, generated from the prompt and the hops; the trace is kept. `first` gives each question
    its hop-1 documents, batch by batch (of 2); seconds are each batch's time per question."""
    model = abstains_after_a_query(tok)
    questions, first = [QUESTION, "Kor Industries?", "Where was Ada Vell born?"], [[ADA], [VELLPORT], [KOR]]
    mh = multihop(model, tok, TitleRetriever(), batch_size=2, max_answer_tokens=12, threshold=0.0)
    t0 = time.perf_counter()
    answers = mh.answer(questions, first)
    total = time.perf_counter() - t0
    assert [(a.reply, a.over_abstention, a.abstained) for a in answers] == [("[2] Tam Brel", True, False)] * 3
    # Well-formed where a second document was shown: the replaced answer stopped (its end token kept).
    assert [a.format_ok for a in answers] == [True, True, False] and answers[2].documents == [KOR]
    assert [[d.id for d in a.hops[0].documents] for a in answers] == [["person-0001"], ["city-0003"],
                                                                      ["company-0002"]]
    assert [h.query for h in answers[0].hops] == [QUESTION, "Kor Industries"]
    assert answers[0].seconds == answers[1].seconds > 0 and sum(a.seconds for a in answers) <= total
    own = multihop(model, tok, TitleRetriever(), max_answer_tokens=12).answer(questions, first)
    assert [(a.reply, a.over_abstention, a.abstained) for a in own] == [(ABSTAIN, False, True)] * 3


def test_the_prompt_is_the_question_with_hop_1s_documents_then_each_forced_query_and_its_results(tok):
    renderer = ChatRenderer(tok)
    mh = multihop(None, tok, TitleRetriever(), max_hops=3)
    hops = [Hop(QUESTION, [ADA]), Hop("Kor Industries", [KOR], forced=True), Hop("Vellport", [VELLPORT], forced=True)]
    want = (renderer.prompt([{"role": "user", "content": QUESTION, "documents": [ADA]}])
            + renderer.query("Kor Industries") + renderer.results([KOR], 2)
            + renderer.query("Vellport") + renderer.results([VELLPORT], 3))
    assert mh.prompt(QUESTION, hops) == want
    assert tok.decode(want).count("<|query_start|>") == 2 and "[3] Vellport (city-0003)" in tok.decode(want)


def test_a_written_query_is_the_text_after_the_latest_opening_marker(tok):
    t = tok.token_id
    mh = multihop(None, tok, TitleRetriever())
    out = [t("<|query_start|>"), *tok.encode("Kor"), t("<|query_start|>"), *tok.encode("Vellport"), t("<|query_end|>")]
    hop = mh.written_query(RowState(5, [Hop(QUESTION, [ADA])]), out)
    assert (hop.query, hop.status, hop.documents) == ("Vellport", "ok", [])
    assert mh.written_query(RowState(5, [Hop(QUESTION, [ADA])]), out[:-1]) is None  # not closed yet


def test_retrieval_is_not_called_when_no_hop_is_followed(tok):
    retriever = RecordingRetriever()
    mh = multihop(None, tok, retriever)
    state = RowState(5, [Hop(QUESTION, [ADA])])
    assert mh.retrieve([(state, Hop("x", [], "over_max_hops")), (state, Hop("", [], "empty"))]) == [[], []]
    assert retriever.calls == []
    assert mh.retrieve([(state, Hop("x", [], "empty")), (state, Hop("Kor Industries", []))]) == [[], [KOR]]
    assert retriever.calls == [(["Kor Industries"], 1 + 1, None)]  # one call, for the hop followed


def test_a_trajectory_marks_the_injected_tokens_as_not_written(tok):
    stop = ChatRenderer(tok).stop_token
    mh = multihop(None, tok, TitleRetriever())
    state = RowState(4, [Hop(QUESTION, [ADA])], segment=6, injected=[(2, 3)])
    t = mh.trajectory(1, [1, 2, 3, 4], state, [11, 12, 13, 14, 15, 16, 17], "stop")
    assert (t.tokens, t.written) == ([11, 12, 13, 14, 15, 16, 17, stop], [1, 1, 0, 0, 0, 1, 1, 1])
    assert (t.index, t.prompt, t.hops, t.finish, t.answer_start) == (1, [1, 2, 3, 4], state.hops, "stop", 6)
    cut = mh.trajectory(0, [1], state, [11, 12, 13, 14, 15], "length")
    assert (cut.tokens, cut.written) == ([11, 12, 13, 14, 15], [1, 1, 0, 0, 0])


def test_a_forced_hops_room_counts_its_documents_numbers_as_shown(tok):
    """Hop 2's documents number on from hop 1's: after 8 documents its first is [9], after 9 it is
    [10], a token longer. Fitted at exactly its room (by hand) it is shown, one token less it is not."""
    renderer = ChatRenderer(tok)

    class Forced(QueryGenerator):
        def query(self, question, hops):
            return "Kor Industries"

    for n in (8, 9):
        first = [Document(f"note-{i}", f"Note {i}", "x.") for i in range(n)]
        prompt = renderer.prompt([{"role": "user", "content": QUESTION, "documents": first}])
        exact = len(prompt) + len(renderer.query("Kor Industries")) + len(renderer.results([KOR], n + 1)) + 8 + 1
        assert len(renderer.results([KOR], n + 1)) == len(renderer.results([KOR], 1)) + (n + 1 >= 10)
        for max_context, shown in ((exact, ["company-0002"]), (exact - 1, [])):
            mh = multihop(None, tok, TitleRetriever(), max_context=max_context, max_answer_tokens=8, hop_tokens=1)
            hops = mh.plan(QUESTION, first, Forced())
            assert (len(hops[0].documents), [d.id for d in hops[1].documents]) == (n, shown)
