"""Retrieval coverage (hybridchat/rag/coverage.py) against hand-computed weights, and a calibration
choosing how much it weighs (rag/abstention.py) on hand-made validation scores. The answerers
applying it: tests/test_abstention.py."""

import json
import math

import pytest

from hybridchat.core.documents import Document
from hybridchat.core.questions import Question
from hybridchat.rag.abstention import (
    EXPONENTS,
    GOLD_DEPTH,
    Calibration,
    calibrate,
    choose_exponent,
    gold_missing_copies,
)
from hybridchat.rag.coverage import Coverage, evidence

KB = [Document("d1", "Vellport", "Vellport is a port city."),  # terms: vellport, port, citi
      Document("d2", "Kor", "Kor is a city."),                 # kor, citi
      Document("d3", "Tulvania", "Tulvania is a country.")]    # tulvania, countri


def idf(df: int, n: int = 3) -> float:
    return math.log((n + 1) / (df + 1)) + 1


def test_coverage_weighs_each_question_term_found_by_its_rarity_in_the_knowledge_base():
    coverage = Coverage.of(KB)
    assert coverage.document_frequency == {"vellport": 1, "port": 1, "citi": 2, "kor": 1, "tulvania": 1,
                                           "countri": 1}
    # "which" and "in" are not looked for; "city" is in two documents, "Zorbex" in none
    assert coverage("Which city is Zorbex in?", [KB[1]]) == pytest.approx(idf(2) / (idf(2) + idf(0)))
    assert coverage("Which city is Zorbex in?", KB) == pytest.approx(0.3505, abs=1e-4)  # by hand: 1.2877 / 3.6740
    assert coverage("Where is the port of Vellport?", [KB[0]]) == 1.0
    assert coverage("Where is the port of Vellport?", [KB[1], KB[2]]) == 0.0
    assert coverage("Ports of Vellport", [KB[1]]) == 0.0 and coverage("ports", [KB[0]]) == 1.0  # stems
    assert coverage("Where is it?", []) == 1.0  # nothing to look for
    assert coverage("Kor?", []) == 0.0  # something to look for, no document


def test_evidence_is_the_confidence_times_coverage_to_the_exponent():
    assert evidence(0.8, 0.5, 0.0) == 0.8 and evidence(0.8, 0.0, 0.0) == 0.8
    assert evidence(0.8, 0.5, 2.0) == pytest.approx(0.2)
    assert math.isnan(evidence(math.nan, 0.5, 1.0))


def plain_exponent(confidences, coverages, answerable):
    """The reference choice: for each exponent in turn, the share of (answerable, unanswerable) pairs
    whose weighed confidences are in the right order (ties half), by a plain loop; the first best."""
    best, chosen = -1.0, None
    for exponent in EXPONENTS:
        weighed = [c * v ** exponent for c, v in zip(confidences, coverages)]
        yes = [w for w, a in zip(weighed, answerable) if a]
        no = [w for w, a in zip(weighed, answerable) if not a]
        right = sum(1.0 if y > n else 0.5 if y == n else 0.0 for y in yes for n in no) / (len(yes) * len(no))
        if right > best:
            best, chosen = right, exponent
    return chosen


def _scored(confidence, answerable=True):
    return {"em": 1.0 if answerable else None, "confidence": confidence}


# Answerable questions the model is less sure of than of unanswerable ones, which their documents
# barely cover: the confidence alone separates them at AUROC 3/12, weighed by coverage at 1.
ANSWERABLE = [(0.9, 1.0), (0.8, 1.0), (0.7, 0.9), (0.6, 1.0)]
UNANSWERABLE = [(0.95, 0.2), (0.85, 0.3), (0.75, 0.1)]


def test_the_calibration_weighs_coverage_where_it_separates_the_kinds_and_chooses_the_threshold_on_that():
    scores = [_scored(c) for c, _ in ANSWERABLE] + [_scored(c, False) for c, _ in UNANSWERABLE]
    coverages = [v for _, v in ANSWERABLE + UNANSWERABLE]
    # exponent 0.5 already separates them perfectly (0.9, 0.8, 0.664, 0.6 against 0.425, 0.466, 0.237):
    # the smallest of the exponents that do
    assert choose_exponent(scores, coverages) == 0.5 == plain_exponent([c for c, _ in ANSWERABLE + UNANSWERABLE],
                                                                         coverages, [True] * 4 + [False] * 3)
    found = calibrate(scores, 0.25, "v.jsonl", coverages=coverages)
    # 4 answerable, 1 may abstain: the second-lowest weighed confidence, 0.7 x 0.9 ** 0.5
    assert found == Calibration(0.7 * math.sqrt(0.9), 0.25, 4, 1 / 4, 3, 3 / 3, "v.jsonl", None, 0.5)
    assert Calibration.from_meta(json.loads(json.dumps(found.to_meta()))) == found
    assert found.describe() == ("chosen on v.jsonl for false abstention <= 0.25, on the confidence x coverage^0.5: "
                                "false abstention 0.250 on 4 answerable questions, abstains on 1.000 of 3 unanswerable")
    # without coverages, as before: the confidence alone (the second-lowest answerable one; all 3 others answered)
    alone = calibrate(scores, 0.25, "v.jsonl")
    assert (alone.threshold, alone.coverage_exponent, alone.abstain_unanswerable) == (0.7, 0.0, 0.0)


@pytest.mark.parametrize("scores, coverages", [
    ([_scored(0.9), _scored(0.2, False)], [1.0, 1.0]),          # coverage says nothing: ties go to 0
    ([_scored(0.9), _scored(0.8)], [1.0, 0.1]),                 # no unanswerable question to separate
    ([_scored(0.2, False), _scored(0.8, False)], [1.0, 0.1]),  # no answerable one
    ([_scored(math.nan), _scored(0.9, False)], [1.0, 0.1]),     # a confidence that is not a number
    ([_scored(0.9), _scored(0.2, False)], [0.1, 1.0]),          # coverage only hurts
])
def test_the_confidence_alone_where_coverage_cannot_help(scores, coverages):
    assert choose_exponent(scores, coverages) == 0.0


def test_a_stored_record_without_an_exponent_reads_as_the_confidence_alone_and_a_bad_one_is_refused():
    record = Calibration(0.4, 0.1, 10, 0.1, 5, 0.6, "v").to_meta()
    del record["coverage_exponent"]  # written before coverage
    assert Calibration.from_meta(record).coverage_exponent == 0.0
    for bad in (-1.0, "high", True, math.inf):
        with pytest.raises(ValueError, match="abstention.coverage_exponent"):
            Calibration.from_meta({**record, "coverage_exponent": bad})


def test_gold_missing_copies_are_the_answerable_questions_retrieved_past_their_gold_documents():
    chunk = Document("d1#2", "Vellport", "The port of Vellport.", metadata={"parent_id": "d1"})
    ranked = {"Where is Vellport?": [KB[0], chunk, KB[1], KB[2]], "Who is Kor?": [KB[2], KB[1], KB[0]]}
    asked = []

    def search(queries, depth):
        asked.append((list(queries), depth))
        return [ranked[q] for q in queries]

    questions = [Question("Where is Vellport?", ("the coast",), ("d1",), id="v.jsonl:1"),
                 Question("Who is Kor?", ("a city",), ("d2",)),
                 Question("Who is Zorbex?", (), ()),                  # unanswerable already
                 Question("What is Kor?", ("a city",), ())]           # no gold document named: nothing to leave out
    copies = gold_missing_copies(questions, search, top_k=2)
    assert asked == [(["Where is Vellport?", "Who is Kor?"], 2 + GOLD_DEPTH)]
    assert [(q.question, q.answers, q.gold_doc_ids, q.id) for q in copies] == [
        ("Where is Vellport?", (), (), "v.jsonl:1#gold-missing"), ("Who is Kor?", (), (), "")]
    # the gold document and its chunks left out, the next ones in their rank order, top_k of them
    assert [[d.id for d in q.candidates] for q in copies] == [["d2", "d3"], ["d3", "d1"]]
    assert gold_missing_copies(questions[2:3], search, 2) == [] and len(asked) == 1  # nothing to search for
