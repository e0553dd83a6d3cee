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
from hybridchat.training.stages.refrag.warm_start import WarmStart

GOLD = ("person-0001", "company-0002")


def _warm_start(questions: list[Question], micro_batch: int, **settings) -> tuple[WarmStart, object]:
    tok = tokenizer()
    config = RefragConfig(min_documents=1, max_documents=2, needless_query=0.0, length_grouping=1, **settings)
    rag = SimpleNamespace(config=config, renderer=ChatRenderer(tok), width_limit=None, train_questions=[],
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
