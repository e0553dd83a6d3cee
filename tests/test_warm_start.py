"""training/stages/refrag/warm_start.py's traces on hand-made documents: the first hop shows the first
gold document whether retrieval found it or not, on every rank, and the bridge query names the second
hop's entity (its retrieval and the cited answer follow). A stand-in rag stage and the engine without
a model (the planner) build them, as the refrag stage does. (Traces from a trained smoke checkpoint:
tests/test_refrag.py.)"""

from types import SimpleNamespace

from test_refrag import ADA, DOCS, KOR, QUESTION, VELLPORT, TitleRetriever, multihop, tokenizer

from hybridchat.core.questions import Question
from hybridchat.data.chat import ChatRenderer
from hybridchat.training.stages.refrag import RefragConfig
from hybridchat.training.stages.refrag.warm_start import WarmStart, bridge_questions

GOLD = ("person-0001", "company-0002")


def _warm_start(questions: list[Question], micro_batch: int, train_questions=(), **settings) -> tuple[WarmStart, object]:
    tok = tokenizer()
    config = RefragConfig(min_documents=1, max_documents=2, needless_query=0.0, length_grouping=1, **settings)
    rag = SimpleNamespace(config=config, renderer=ChatRenderer(tok), width_limit=None, train_questions=list(train_questions),
                          ctx=SimpleNamespace(config=SimpleNamespace(seed=0, gpu=SimpleNamespace(micro_batch=micro_batch)),
                                              knowledge_base=SimpleNamespace(documents=DOCS)))
    planner = multihop(None, tok, TitleRetriever(), top_k=1)
    return WarmStart(rag, questions, [], 0, planner, {d.parent_id: d.title for d in DOCS}), tok


def test_the_first_hop_shows_the_first_gold_document_on_every_rank_even_where_retrieval_missed_it():
    # Retrieval found the first gold document for half of the questions only.
    found = [Question(QUESTION, ("Tam Brel",), GOLD, (VELLPORT, ADA))] * 4
    missed = [Question(QUESTION, ("Tam Brel",), GOLD, (VELLPORT,))] * 4
    warm, tok = _warm_start(found + missed, micro_batch=2)
    seen = 0
    for rank in (0, 1):
        for batch in warm.batches(0, 4, rank, 2):  # every item once across the 2 ranks
            for row in batch["inputs"].tolist():
                text = tok.decode(row)
                first = text.split("<|documents_start|>")[1].split("<|documents_end|>")[0]
                assert " (person-0001)\n" in first, text
                # The bridge query names the company, whose document the next hop shows.
                query = text.split("<|query_start|>")[1].split("<|query_end|>")[0]
                assert query.endswith("Kor Industries"), query
                later = text.split("<|query_end|>")[1]
                assert f" ({KOR.id})\n" in later and "Tam Brel" in later.split("<|documents_end|>")[-1]
                seen += 1
    assert seen == 8


def test_both_gold_traces_show_both_documents_at_once_and_answer_without_a_query():
    questions = [Question(QUESTION, ("Tam Brel",), GOLD, (VELLPORT, ADA))] * 8
    warm, tok = _warm_start(questions, micro_batch=2, both_gold=1.0)
    ranks = set()
    for i in range(len(questions)):
        for epoch in (0, 1):
            ids, mask = warm.example(i, epoch)
            text = tok.decode(ids)
            assert "<|query_start|>" not in text and text.count("<|documents_start|>") == 1, text
            titles = [d.split("\n")[0] for d in text.split("<|document_start|>")[1:]]
            numbers = {t.split("(")[-1].rstrip(")"): int(t[1:t.index("]")]) for t in titles}
            # both gold documents, as many as the trace shows: the distractor gave way
            assert set(numbers) == set(GOLD), titles
            cited = numbers[KOR.id]  # the one that states the answer
            written = tok.decode([t for t, m in zip(ids, mask) if m])
            assert written == f"[{cited}] Tam Brel<|assistant_end|>", written
            ranks.add(cited)
    assert ranks == {1, 2}  # the answer's document at either rank
    # none of them at both_gold=0: every trace queries
    warm, tok = _warm_start(questions, micro_batch=2)
    assert all("<|query_start|>" in tok.decode(warm.example(i, 0)[0]) for i in range(len(questions)))


BRIDGE = Question("Which company does Ada Vell work for?", ("Kor Industries",), ("person-0001",))


def test_a_traces_bridge_question_is_the_one_about_its_first_document_answered_by_the_name_it_queries():
    trace = Question(QUESTION, ("Tam Brel",), GOLD)
    single_hop = [
        Question("Where was Ada Vell born?", ("Vellport",), ("person-0001",)),         # another fact of the document
        Question("Who founded Kor Industries?", ("Tam Brel",), ("company-0002",)),     # the second hop's own question
        Question("Which firm employs Kor Industries?", ("Kor Industries",), ("company-0002",)),  # the name, another document
        Question("Who employs Ada Vell?", ("kor industries.",), ("person-0001",)),     # the bridge, written otherwise
        Question("Where does Bo Nim work?", (), ()),                                   # unanswerable
    ]
    titles = {d.parent_id: d.title for d in DOCS}
    assert bridge_questions([trace], single_hop, titles) == [single_hop[3]]
    # one per trace, in the traces' order; a trace whose bridge fact nobody asks about has none
    other = Question("Who founded the company Bo Nim works for?", ("Tam Brel",), ("person-0009", "company-0002"))
    assert bridge_questions([trace, other, trace], single_hop + [BRIDGE], titles) == [BRIDGE, BRIDGE]
    assert bridge_questions([trace], single_hop[:3], titles) == []


def test_bridge_questions_take_their_share_of_the_single_hop_examples_and_rags_questions_the_rest():
    asked = []
    traces = [Question(QUESTION, ("Tam Brel",), GOLD, (VELLPORT, ADA))] * 4
    others = [Question(f"Where was person {i} born?", ("Vellport",), (f"person-{i:04d}",)) for i in range(10)]

    def warm_start(share: float) -> WarmStart:
        warm, _ = _warm_start(traces, micro_batch=2, train_questions=others + [BRIDGE], bridge_questions=share)
        warm.rag.example = lambda q, rng: asked.append(("bridge", q)) or ([1], [1])
        warm.rag.epoch_example = lambda qs, j, epoch: asked.append(("rag", qs[j])) or ([1], [1])
        warm.n_single = 200
        return warm

    warm = warm_start(0.25)
    for i in range(len(traces), len(traces) + warm.n_single):
        warm.example(i, epoch=0)
    bridges = [q for kind, q in asked if kind == "bridge"]
    assert set(bridges) == {BRIDGE} and 35 <= len(bridges) <= 65, len(bridges)  # ~50 of 200
    assert {kind for kind, q in asked if q is not BRIDGE} == {"rag"}
    # at 0 none, and the rag examples are the ones asked before the option existed
    asked.clear()
    warm = warm_start(0.0)
    assert warm.bridges == []
    for i in range(len(traces), len(traces) + 20):
        warm.example(i, epoch=0)
    assert asked == [("rag", (others + [BRIDGE])[j % 11]) for j in range(20)]
