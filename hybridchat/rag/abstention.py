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

The choice is stored with the checkpoint (meta.json "abstention", by the rag and refrag stages or
`python -m hybridchat.evaluate calibrate=true`); chat and the evaluator apply it
(hybridchat.training.runs.Run.abstain_threshold).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence


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
    rates it reaches on them: where a question abstains depends only on its confidence."""
    answerable = [s for s in scores if s["em"] is not None]
    unanswerable = [s for s in scores if s["em"] is None]
    t = choose_threshold([s["confidence"] for s in answerable], target)

    def abstaining(group: list[dict]) -> float | None:
        if not group or t is None:
            return None
        return sum(below(s["confidence"], t) for s in group) / len(group)

    return Calibration(t, target, len(answerable), abstaining(answerable), len(unanswerable), abstaining(unanswerable),
                       chosen_on, questions_sha256)
