"""The answer-or-abstain decision made on a calibrated threshold.

A model abstains by writing ABSTAIN; on documents unlike its training data it may abstain on almost
everything, never do so, or answer everything at full confidence. A threshold t on its confidence
(1 - P(reply == ABSTAIN), hybridchat.rag.answer) makes the decision robust: answer exactly where the
confidence is >= t. Below t the reply is ABSTAIN; at or above it, where the model would still write
ABSTAIN, its most likely reply that does not begin as ABSTAIN does is given instead (the model was
taught to abstain more often than this corpus needs). t is chosen on validation questions for a
target false-abstention rate: the largest t below which at most that share of the answerable ones
fall. It is never chosen on the questions it is then evaluated on: the rates it reaches there would
be optimistic.

Retrieval evidence may join the decision (rag/coverage.py): the score compared with t is then the
confidence x coverage ** e, the exponent e chosen on the same validation questions as the one of
EXPONENTS that best separates their answerable from their unanswerable ones (AUROC; 0, the
confidence alone, unless another does better), t then chosen on those scores.

Which questions it is chosen on matters as much as how. Most questions a knowledge base cannot answer
are about something it holds no document on, while retrieval still returns related ones that name the
same things; validation questions rarely include them (a question set's questions are about its
documents). gold_missing_copies makes them from the answerable validation questions: each again,
its documents retrieved as from the knowledge base without its gold ones, its answer dropped. The
single-hop calibrations (the rag stage's, `evaluate calibrate=true`) choose on both.

The choice is stored with the checkpoint (meta.json "abstention", by the rag and refrag stages or
`python -m hybridchat.evaluate calibrate=true`); chat and the evaluator apply it
(hybridchat.training.runs.Run.abstain_threshold).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from hybridchat.core.documents import Document
from hybridchat.core.metrics import auroc
from hybridchat.core.questions import Question
from hybridchat.rag.coverage import evidence

# The coverage exponents a calibration chooses among (0: the model's confidence alone).
EXPONENTS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
# Retrieved past top_k for a gold-missing copy: room for the gold documents' chunks that are left out.
GOLD_DEPTH = 16


def choose_threshold(confidences: Sequence[float], target: float) -> float | None:
    """The largest t in [0, 1] such that, of these answerable questions, at most a share `target`
    have a confidence < t (and so abstain). None without questions. A non-finite confidence is never
    below a threshold (a comparison with NaN is false), so it never counts against the target."""
    n = len(confidences)
    if n == 0:
        return None
    # The epsilon keeps 0.29 x 100 at 29, not 28.
    allowed = math.floor(target * n + 1e-9)
    finite = sorted(c for c in confidences if math.isfinite(c))
    # Below the (allowed + 1)-th smallest confidence lie at most `allowed` of them (ties stay above).
    return finite[allowed] if allowed < len(finite) else 1.0


def below(confidence: float, threshold: float | None) -> bool:
    """Whether the threshold turns an answer at this confidence into an abstention."""
    return threshold is not None and confidence < threshold


@dataclass(frozen=True)
class Calibration:
    """A threshold as chosen, and what it reaches on the questions it was chosen on; meta.json's
    "abstention" record."""
    threshold: float | None           # None: there was no answerable question to choose it on
    target_false_abstention: float
    questions: int                       # answerable questions it was chosen on
    false_abstention: float | None    # their share that abstains at the threshold
    unanswerable: int                    # unanswerable questions beside them
    abstain_unanswerable: float | None  # their share that abstains at the threshold
    chosen_on: str                       # which questions: "rag validation questions", a file
    questions_sha256: str | None = None  # the questions file's, to tell an evaluation on the same file
    coverage_exponent: float = 0.0       # the decision's score: confidence x coverage ** this (rag/coverage.py)

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, record: Any) -> "Calibration":
        """The record meta.json holds; ValueError saying what is wrong with a damaged one."""
        if not isinstance(record, dict):
            raise ValueError(f"'abstention' must be an object, got {type(record).__name__}")
        t = record.get("threshold")
        if t is not None and not is_threshold(t):
            raise ValueError(f"'abstention.threshold' must be a number in [0, 1] or null, got {t!r}")
        e = record.get("coverage_exponent", 0.0)
        if not isinstance(e, (int, float)) or isinstance(e, bool) or not 0 <= e < math.inf:
            raise ValueError(f"'abstention.coverage_exponent' must be a number >= 0, got {e!r}")
        try:
            return cls(**record)
        except TypeError as e:
            raise ValueError(f"'abstention' {e}") from None

    def describe(self) -> str:
        rates = f"false abstention {self.false_abstention:.3f} on {self.questions} answerable questions" \
            if self.false_abstention is not None else "no answerable question"
        if self.abstain_unanswerable is not None:
            rates += f", abstains on {self.abstain_unanswerable:.3f} of {self.unanswerable} unanswerable"
        weighed = f", on the confidence x coverage^{self.coverage_exponent:g}" if self.coverage_exponent else ""
        return (f"chosen on {self.chosen_on} for false abstention <= {self.target_false_abstention:g}{weighed}: "
                f"{rates}")


def is_threshold(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def choose_exponent(scores: Sequence[dict], coverages: Sequence[float]) -> float:
    """The exponent of EXPONENTS whose confidence x coverage ** exponent best separates the answerable
    questions of `scores` from the unanswerable ones (AUROC); the smallest of equals, and 0 where one
    kind is missing or a confidence is not a number (nothing to compare)."""
    if all(s["em"] is not None for s in scores) or all(s["em"] is None for s in scores):
        return 0.0
    if any(not math.isfinite(s["confidence"]) for s in scores):
        return 0.0
    pairs = list(zip(scores, coverages))

    def separation(exponent: float) -> float:
        combined = [(evidence(s["confidence"], c, exponent), s["em"] is not None) for s, c in pairs]
        return auroc([v for v, answerable in combined if answerable], [v for v, answerable in combined if not answerable])

    separations = [separation(e) for e in EXPONENTS]
    return EXPONENTS[separations.index(max(separations))]  # index(): the first, so the smallest of equals


def calibrate(scores: Sequence[dict], target: float, chosen_on: str, questions_sha256: str | None = None,
              coverages: Sequence[float] | None = None) -> Calibration:
    """The threshold for `target` on scored validation questions (hybridchat.rag.answer.score of the
    model's own replies, no threshold applied: "em" None marks an unanswerable question), and the
    rates it reaches on them: where a question abstains depends only on its score. coverages: each
    question's coverage by the documents it was shown, for the decision to weigh (choose_exponent);
    None: the confidence alone."""
    exponent = 0.0 if coverages is None else choose_exponent(scores, coverages)
    decided = [{"em": s["em"], "confidence": evidence(s["confidence"], c, exponent)}
               for s, c in zip(scores, coverages if coverages is not None else [1.0] * len(scores))]
    answerable = [s for s in decided if s["em"] is not None]
    unanswerable = [s for s in decided if s["em"] is None]
    t = choose_threshold([s["confidence"] for s in answerable], target)

    def abstaining(group: list[dict]) -> float | None:
        if not group or t is None:
            return None
        return sum(below(s["confidence"], t) for s in group) / len(group)

    return Calibration(t, target, len(answerable), abstaining(answerable), len(unanswerable), abstaining(unanswerable),
                       chosen_on, questions_sha256, exponent)


def gold_missing_copies(questions: Sequence[Question], search: Callable[[list[str], int], list[list[Document]]],
                        top_k: int) -> list[Question]:
    """Each answerable question with gold documents again, made unanswerable as a knowledge base
    without those documents makes it: no answers, and as candidates the first top_k documents
    search(questions, depth) finds that are neither gold nor a chunk of one."""
    chosen = [q for q in questions if q.answers and q.gold_doc_ids]
    if not chosen:
        return []
    found = search([q.question for q in chosen], top_k + GOLD_DEPTH)
    return [Question(q.question, (), (), tuple([d for d in row if d.parent_id not in q.gold_doc_ids][:top_k]),
                     f"{q.id}#gold-missing" if q.id else "", q.hops, q.split) for q, row in zip(chosen, found)]
