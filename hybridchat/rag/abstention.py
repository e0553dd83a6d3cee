"""The answer-or-abstain decision made on a calibrated threshold.

A model abstains by writing ABSTAIN; on documents unlike its training data it may never do so, or
answer everything at full confidence. A threshold t on its confidence (1 - P(reply == ABSTAIN),
hybridchat.rag.answer) makes the decision robust: answer only when the model does not abstain and
its confidence is >= t. t is chosen on validation questions for a target false-abstention rate: the
largest t such that at most that share of the answerable ones abstain (the model wrote ABSTAIN, or
its confidence is below t). It is never chosen on the questions it is then evaluated on: the rates
it reaches there would be optimistic.

The choice is stored with the checkpoint (meta.json "abstention", by the rag and refrag stages or
`python -m hybridchat.evaluate calibrate=true`); chat and the evaluator apply it
(hybridchat.training.runs.Run.abstain_threshold).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence


def choose_threshold(confidences: Sequence[float], abstained: Sequence[bool], target: float) -> float | None:
    """The largest t in [0, 1] such that, of these answerable questions, at most a share `target`
    abstain: the model wrote ABSTAIN or its confidence is < t. None without questions; 0.0 (no
    abstention beyond the model's own) where the model's own abstentions already exceed the target.
    A non-finite confidence is never below a threshold (a comparison with NaN is false)."""
    n = len(confidences)
    if n == 0:
        return None
    # Answers the threshold may still turn into abstentions; the epsilon keeps 0.29 x 100 at 29, not 28.
    allowed = math.floor(target * n + 1e-9) - sum(bool(a) for a in abstained)
    if allowed < 0:
        return 0.0
    answering = sorted(c for c, a in zip(confidences, abstained) if not a and math.isfinite(c))
    # Below the (allowed + 1)-th smallest confidence lie at most `allowed` of them (ties stay above).
    return answering[allowed] if allowed < len(answering) else 1.0


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
        try:
            return cls(**record)
        except TypeError as e:
            raise ValueError(f"'abstention' {e}") from None

    def describe(self) -> str:
        rates = f"false abstention {self.false_abstention:.3f} on {self.questions} answerable questions" \
            if self.false_abstention is not None else "no answerable question"
        if self.abstain_unanswerable is not None:
            rates += f", abstains on {self.abstain_unanswerable:.3f} of {self.unanswerable} unanswerable"
        return f"chosen on {self.chosen_on} for false abstention <= {self.target_false_abstention:g}: {rates}"


def is_threshold(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def calibrate(scores: Sequence[dict], target: float, chosen_on: str, questions_sha256: str | None = None
              ) -> Calibration:
    """The threshold for `target` on scored validation questions (hybridchat.rag.answer.score of the
    model's own replies, no threshold applied: "em" None marks an unanswerable question), and the
    rates it reaches on them."""
    answerable = [s for s in scores if s["em"] is not None]
    unanswerable = [s for s in scores if s["em"] is None]
    t = choose_threshold([s["confidence"] for s in answerable], [bool(s["abstain"]) for s in answerable], target)

    def abstaining(group: list[dict]) -> float | None:
        if not group or t is None:
            return None
        return sum(bool(s["abstain"]) or below(s["confidence"], t) for s in group) / len(group)

    return Calibration(t, target, len(answerable), abstaining(answerable), len(unanswerable), abstaining(unanswerable),
                       chosen_on, questions_sha256)
