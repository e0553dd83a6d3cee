"""Answer metrics for QA/RAG evaluation, with bootstrap confidence intervals.

Exact match and token F1 follow the official SQuAD evaluation script, so numbers are comparable
with published ones. A few hundred questions leave a wide interval around any rate, hence the
bootstrap helpers: report (mean, low, high), never a bare mean.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

import numpy as np

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, delete ASCII punctuation, drop the words a/an/the, collapse whitespace (SQuAD).

    Punctuation is deleted, not replaced by a space, exactly as SQuAD does; that is what makes
    "1,200,000" and "1200000" equal. The price, also SQuAD's: "1.5" equals "15" and "well-known"
    equals "wellknown" but not "well known".
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _check_answers(answers: Sequence[str]) -> None:
    # A bare string is a Sequence[str] too: its characters would silently be scored as answers.
    if isinstance(answers, str):
        raise TypeError(f"answers must be a sequence of strings, not the string {answers[:40]!r}; wrap it in a list")


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized answer, else 0.0 (0.0 for no answers)."""
    _check_answers(answers)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # SQuAD v2: an empty answer (e.g. an abstention against "no answer") scores 1 only against
        # another empty one; v1 would divide by zero here.
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token-overlap F1 (multiset intersection of normalized tokens), max over answers; 0.0 for none."""
    _check_answers(answers)
    pred = normalize_answer(prediction).split()
    return max((_f1(pred, normalize_answer(a).split()) for a in answers), default=0.0)


def _percentile_bounds(estimates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


def _check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(values: Sequence[float | None], n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the defined values and its percentile-bootstrap interval.

    None marks an item where the metric is undefined (citation accuracy on a wrong answer). Items,
    defined or not, are resampled with replacement and each resample averages only its defined
    items, so the interval also carries the randomness of how many items are defined. Resamples
    without a defined item are skipped; when no resample holds one (few defined items, few
    resamples) the interval is undefined, (mean, nan, nan); with no defined item at all the result
    is (nan, nan, nan).
    """
    _check_bootstrap_args(n_resamples, confidence)
    values = list(values)  # read twice below; a generator would be empty the second time
    defined = np.array([v is not None for v in values], dtype=bool)
    filled = np.array([0.0 if v is None else v for v in values], dtype=float)
    if not defined.any():
        return (float("nan"),) * 3
    if np.isnan(filled).any():
        raise ValueError("values contain NaN; use None for items where the metric is undefined")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(filled), size=(n_resamples, len(filled)))
    sums = filled[idx].sum(axis=1)
    counts = defined[idx].sum(axis=1)
    means = sums[counts > 0] / counts[counts > 0]
    mean = float(filled[defined].mean())
    if not len(means):
        return mean, float("nan"), float("nan")
    return (mean, *_percentile_bounds(means, confidence))


def _scores(scores: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(scores, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} contain NaN, which has no order")
    return array


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    # Mann-Whitney: U = (rank sum of the positives) - n_pos (n_pos + 1) / 2, ties at their mean rank.
    values, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last copy of each distinct value
    mean_rank = ends - (counts - 1) / 2
    u = mean_rank[inverse[: len(pos)]].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def auroc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
    """P(a random positive scores above a random negative), ties counting 1/2; nan if a side is empty."""
    pos = _scores(positive_scores, "positive_scores")
    neg = _scores(negative_scores, "negative_scores")
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return _auroc(pos, neg)


def _draw_counts(rng: np.random.Generator, n: int, n_resamples: int) -> np.ndarray:
    """(n_resamples, n): how often each item is drawn when resampling n items with replacement."""
    idx = rng.integers(0, n, size=(n_resamples, n))
    offsets = (np.arange(n_resamples) * n)[:, None]
    return np.bincount((idx + offsets).ravel(), minlength=n_resamples * n).reshape(n_resamples, n)


def bootstrap_auroc_ci(positive_scores: Sequence[float], negative_scores: Sequence[float], n_resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(auc, low, high): AUROC and its percentile-bootstrap interval, each side resampled on its own.

    Positives and negatives are resampled separately so every resample keeps both class sizes (a
    pooled resample could draw no negative at all). (nan, nan, nan) if a side is empty.
    """
    _check_bootstrap_args(n_resamples, confidence)
    pos = _scores(positive_scores, "positive_scores")
    neg = _scores(negative_scores, "negative_scores")
    if len(pos) == 0 or len(neg) == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    pos_counts = _draw_counts(rng, len(pos), n_resamples)
    order = np.argsort(neg, kind="stable")
    neg_sorted = neg[order]
    neg_counts = _draw_counts(rng, len(neg), n_resamples)[:, order]
    # drawn_below[r, k]: how many of resample r's negatives are among the k smallest negatives.
    drawn_below = np.concatenate([np.zeros((n_resamples, 1)), np.cumsum(neg_counts, axis=1)], axis=1)
    below = drawn_below[:, np.searchsorted(neg_sorted, pos, side="left")]
    tied = drawn_below[:, np.searchsorted(neg_sorted, pos, side="right")] - below
    # O(n_resamples * (n_pos + n_neg)) instead of ranking every resample again.
    aucs = (pos_counts * (below + 0.5 * tied)).sum(axis=1) / (len(pos) * len(neg))
    low, high = _percentile_bounds(aucs, confidence)
    return _auroc(pos, neg), low, high


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of independent runs' values (one per seed) and its Student-t
    interval, mean +- t((1 + confidence) / 2, n - 1) x s / sqrt(n), s the sample standard deviation.
    A handful of seeds are too few for a bootstrap; the t-interval assumes roughly normal values.
    One value: (value, nan, nan), no interval."""
    from scipy.stats import t

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or not len(array):
        raise ValueError(f"values must be a non-empty list of numbers, got shape {array.shape}")
    mean = float(array.mean())
    if len(array) == 1:
        return mean, float("nan"), float("nan")
    half = float(t.ppf((1 + confidence) / 2, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array)))
    return mean, mean - half, mean + half
