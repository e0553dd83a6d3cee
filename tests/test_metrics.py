"""Answer metrics against hand-computed values and plain-loop reference implementations."""

import math
import warnings

import numpy as np
import pytest

from hybridchat.core.metrics import (
    auroc,
    bootstrap_auroc_ci,
    bootstrap_ci,
    exact_match,
    normalize_answer,
    t_interval,
    token_f1,
)

# ---------------------------------------------------------------------------------------------
# normalize_answer, exact_match, token_f1


@pytest.mark.parametrize("text,expected", [
    ("The Quick, Brown Fox!", "quick brown fox"),
    ("An apple a day", "apple day"),
    ("Theater and banana", "theater and banana"),  # articles only as whole words
    ("  Santa   Clara,\tCalifornia. ", "santa clara california"),
    ("Levi's Stadium", "levis stadium"),  # punctuation is deleted, as in SQuAD
    ("1,200,000", "1200000"),
    ("$1,200,000.", "1200000"),
    ("June 5, 1968", "june 5 1968"),
    ("the", ""),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("Denver Broncos", ["Denver Broncos"]) == 1.0
    assert exact_match("the denver broncos!", ["Denver Broncos"]) == 1.0
    assert exact_match("Broncos", ["Denver Broncos"]) == 0.0
    assert exact_match("Levi's Stadium", ["Santa Clara, California", "Levi's Stadium"]) == 1.0  # any answer
    assert exact_match("1200000", ["1,200,000"]) == 1.0
    assert exact_match("1,200,000", ["1200000"]) == 1.0
    assert exact_match("Paris", []) == 0.0
    assert exact_match("The", ["an"]) == 1.0  # both normalize to ""


# SQuAD v1.1 dev, Super Bowl 50: "Where did Super Bowl 50 take place?"
SUPER_BOWL_VENUE = ["Santa Clara, California", "Levi's Stadium",
                    "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California."]


@pytest.mark.parametrize("prediction,answers,expected", [
    ("Broncos", ["Denver Broncos"], 2 / 3),  # P = 1, R = 1/2
    ("Denver Broncos", ["Denver Broncos"], 1.0),
    ("the cat sat on the mat", ["cat on mat"], 6 / 7),  # P = 3/4, R = 1
    # vs the three answers: P 2/4 R 2/3 -> 4/7; P 1/4 R 1/2 -> 1/3; P 4/4 R 4/11 -> 8/15; max 4/7
    ("Stadium in Santa Clara", SUPER_BOWL_VENUE, 4 / 7),
    # 5 tokens: P 2/5 R 2/3 -> 1/2; P 2/5 R 1 -> 4/7; P 5/5 R 5/11 -> 5/8; the last answer wins
    ("Levi's Stadium at Santa Clara", SUPER_BOWL_VENUE, 5 / 8),
    # Repeated tokens count at most as often as in the other side (multiset intersection):
    ("paris paris", ["paris paris france"], 0.8),  # common 2: P = 1, R = 2/3
    ("paris paris paris", ["paris france"], 0.4),  # common 1: P = 1/3, R = 1/2
    ("$1,200,000 dollars", ["1200000"], 2 / 3),
    ("London", ["Paris"], 0.0),
    ("Paris", [], 0.0),
    ("", ["Paris"], 0.0),
    ("the", ["a"], 1.0),  # empty against empty (SQuAD v2), not a division by zero
])
def test_token_f1(prediction, answers, expected):
    assert token_f1(prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize("metric", [exact_match, token_f1])
def test_a_bare_string_is_not_a_list_of_answers(metric):
    with pytest.raises(TypeError, match="wrap it in a list"):
        metric("P", "Paris")  # would otherwise score "P" against the letters P, a, r, i, s


# ---------------------------------------------------------------------------------------------
# bootstrap_ci


def reference_bootstrap(values, n_resamples, confidence, seed):
    """Plain loops over the same draws: each resample averages its defined items, empty ones skipped."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(values), size=(n_resamples, len(values)))
    means = []
    for row in rows:
        picked = [values[i] for i in row if values[i] is not None]
        if picked:
            means.append(sum(picked) / len(picked))
    tail = 100 * (1 - confidence) / 2
    defined = [v for v in values if v is not None]
    if not means:  # no resample drew a defined item: no interval
        return sum(defined) / len(defined), math.nan, math.nan
    return (sum(defined) / len(defined), *np.percentile(means, [tail, 100 - tail]))


def test_bootstrap_handles_undefined_items_like_the_plain_loop():
    # 3 of 6 items defined: about 1 resample in 64 has no defined item and must be skipped.
    values = [1.0, None, 0.0, None, 1.0, None]
    got = bootstrap_ci(values, n_resamples=2000, confidence=0.9, seed=7)
    assert got == pytest.approx(reference_bootstrap(values, 2000, 0.9, 7), abs=1e-12)
    values = [0.2, None, 0.9, 0.4, None, 1.0, 0.0, 0.7, None, 0.5, 0.3]
    got = bootstrap_ci(values, n_resamples=500, confidence=0.8, seed=3)
    assert got == pytest.approx(reference_bootstrap(values, 500, 0.8, 3), abs=1e-12)


def test_bootstrap_without_a_resample_holding_a_defined_item_gives_an_undefined_interval():
    """Was an IndexError (the percentile of no means): `evaluate bootstrap=1` with one correct answer
    in a dozen (citation accuracy is defined on correct answers only) hits it about a third of the time."""
    values = [None] * 11 + [1.0]
    undefined = 0
    for seed in range(30):
        got = bootstrap_ci(values, n_resamples=1, seed=seed)
        assert got == pytest.approx(reference_bootstrap(values, 1, 0.95, seed), nan_ok=True)
        assert got[0] == 1.0
        undefined += math.isnan(got[1]) and math.isnan(got[2])
    assert 0 < undefined < 30  # both cases were met


def test_bootstrap_is_deterministic_and_contains_the_mean():
    values = list(np.random.default_rng(0).random(300))
    mean, low, high = bootstrap_ci(values, seed=1)
    assert mean == pytest.approx(np.mean(values))
    assert low < mean < high
    assert bootstrap_ci(values, seed=1) == (mean, low, high)
    assert bootstrap_ci(values, seed=2) != (mean, low, high)
    narrow = bootstrap_ci(values, confidence=0.5, seed=1)
    assert low < narrow[1] < narrow[2] < high


def test_bootstrap_width_matches_the_normal_approximation():
    # Half ones: the mean's standard error is 0.5 / sqrt(n), so a 95% interval is 2 * 1.96 * that
    # wide, and quadrupling n halves it.
    widths = {}
    for n in (100, 400, 1600):
        _, low, high = bootstrap_ci([1.0, 0.0] * (n // 2), n_resamples=2000, seed=0)
        widths[n] = high - low
        assert widths[n] == pytest.approx(2 * 1.96 * 0.5 / math.sqrt(n), rel=0.12)
    assert widths[100] / widths[400] == pytest.approx(2, rel=0.2)
    assert widths[400] / widths[1600] == pytest.approx(2, rel=0.2)


def test_bootstrap_edge_cases():
    assert all(math.isnan(x) for x in bootstrap_ci([None, None]))
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    assert bootstrap_ci([None, 0.25, None]) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="use None"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=95)


# ---------------------------------------------------------------------------------------------
# auroc, bootstrap_auroc_ci


def reference_auroc(pos, neg):
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("pos,neg,expected", [
    ([2, 3], [0, 1], 1.0),
    ([0, 1], [2, 3], 0.0),
    ([5, 5, 5], [5, 5], 0.5),
    ([1, 2], [2], 0.25),  # 1 < 2 counts 0, the tie 2 = 2 counts 1/2
    ([3, 1, 2], [2, 0], 4.5 / 6),  # wins: 3>2, 3>0, 1>0, 2>0, tie 2=2
])
def test_auroc_by_hand(pos, neg, expected):
    assert auroc(pos, neg) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_the_double_loop_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_pos, n_neg = rng.integers(1, 80, size=2)
    pos = rng.integers(0, 6, size=n_pos) + (seed % 2)  # few distinct values: many ties
    neg = rng.normal(2, 2, size=n_neg).round(0)
    assert auroc(pos, neg) == pytest.approx(reference_auroc(pos, neg), abs=1e-12)


def test_auroc_empty_side_is_nan():
    assert math.isnan(auroc([], [1.0]))
    assert math.isnan(auroc([1.0], []))
    assert all(math.isnan(x) for x in bootstrap_auroc_ci([1.0], []))


def reference_bootstrap_auroc(pos, neg, n_resamples, confidence, seed):
    """Each resample drawn as plain index rows (positives first, then negatives) and scored by the double loop."""
    draws = np.random.default_rng(seed)
    pos_rows = draws.integers(0, len(pos), size=(n_resamples, len(pos)))
    neg_rows = draws.integers(0, len(neg), size=(n_resamples, len(neg)))
    aucs = [reference_auroc(pos[p], neg[n]) for p, n in zip(pos_rows, neg_rows)]
    tail = 100 * (1 - confidence) / 2
    return (reference_auroc(pos, neg), *np.percentile(aucs, [tail, 100 - tail]))


def test_bootstrap_auroc_matches_the_plain_loop():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 5, size=15).astype(float) + 1
    neg = rng.integers(0, 5, size=12).astype(float)
    got = bootstrap_auroc_ci(pos, neg, n_resamples=300, confidence=0.9, seed=11)
    assert got == pytest.approx(reference_bootstrap_auroc(pos, neg, 300, 0.9, 11), abs=1e-12)


def test_bootstrap_auroc_interval():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1, 1, 400), rng.normal(0, 1, 300)
    auc, low, high = bootstrap_auroc_ci(pos, neg, seed=4)
    assert auc == auroc(pos, neg)
    assert low < auc < high
    assert bootstrap_auroc_ci(pos, neg, seed=4) == (auc, low, high)
    assert bootstrap_auroc_ci([2, 3, 4], [0, 1]) == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Defaults, single items, empty sides and messages (mutation testing found these unpinned)


def test_the_defaults_are_1000_resamples_at_95_percent_with_seed_0():
    # Continuous values: another resample count or seed moves the percentiles.
    rng = np.random.default_rng(5)
    values = [None if rng.random() < 0.2 else float(x) for x in rng.random(40)]
    assert bootstrap_ci(values) == pytest.approx(reference_bootstrap(values, 1000, 0.95, 0), abs=1e-12)
    pos, neg = rng.random(30) + 0.2, rng.random(25)
    assert bootstrap_auroc_ci(pos, neg) == pytest.approx(reference_bootstrap_auroc(pos, neg, 1000, 0.95, 0),
                                                         abs=1e-12)


def test_one_item_on_a_side_is_scored_and_an_empty_side_is_nan_without_a_warning():
    # One positive, one negative: AUROC is defined (never a single-item shortcut to nan).
    assert auroc([0.5], [0.1, 0.9]) == 0.5
    assert bootstrap_auroc_ci([0.5], [0.1, 0.9], n_resamples=50)[0] == 0.5
    assert bootstrap_auroc_ci([2, 3], [1]) == (1.0, 1.0, 1.0)
    # An empty side is answered before any arithmetic: no 0/0 RuntimeWarning (fatal under -W error).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pos, neg in (([], [1.0]), ([1.0], []), ([], [])):
            assert math.isnan(auroc(pos, neg))
            result = bootstrap_auroc_ci(pos, neg, n_resamples=20)
            assert len(result) == 3 and all(math.isnan(x) for x in result)
    result = bootstrap_ci([None, None])
    assert len(result) == 3 and all(math.isnan(x) for x in result)


@pytest.mark.parametrize("confidence", [0, 1, 1.5, -0.1])
def test_confidence_must_be_strictly_between_0_and_1(confidence):
    for call in (lambda: bootstrap_ci([1.0, 0.0], confidence=confidence),
                 lambda: bootstrap_auroc_ci([1.0], [0.0], confidence=confidence)):
        with pytest.raises(ValueError, match=rf"^confidence must be in \(0, 1\), got {confidence}$"):
            call()


def test_every_refusal_says_what_and_which_argument():
    with pytest.raises(ValueError, match="^n_resamples must be at least 1, got 0$"):
        bootstrap_ci([1.0], n_resamples=0)
    with pytest.raises(ValueError, match="^values contain NaN; use None for items where the metric is undefined$"):
        bootstrap_ci([1.0, float("nan")])
    for metric in (auroc, bootstrap_auroc_ci):
        with pytest.raises(ValueError, match=r"^positive_scores must be one-dimensional, got shape \(1, 2\)$"):
            metric([[1.0, 2.0]], [0.0])
        with pytest.raises(ValueError, match=r"^negative_scores must be one-dimensional, got shape \(2, 1\)$"):
            metric([1.0], [[0.0], [1.0]])
        with pytest.raises(ValueError, match="^positive_scores contain NaN, which has no order$"):
            metric([float("nan")], [0.0])
        with pytest.raises(ValueError, match="^negative_scores contain NaN, which has no order$"):
            metric([1.0], [0.0, float("nan")])
    # The bare string is quoted, cut at 40 characters.
    long_answer = "abcdefghij" * 5
    with pytest.raises(TypeError) as refused:
        exact_match("x", long_answer)
    assert str(refused.value) == (f"answers must be a sequence of strings, not the string {long_answer[:40]!r}; "
                                  "wrap it in a list")


# ---------------------------------------------------------------------------------------------
# t_interval: Student-t quantiles from a table (t(0.975, 1) = 12.706205, t(0.975, 2) = 4.302653,
# t(0.95, 4) = 2.131847, t(0.995, 3) = 5.840909), sample standard deviations by hand


@pytest.mark.parametrize("values, confidence, mean, half", [
    ([1.0, 2.0, 6.0], 0.95, 3.0, 4.302653 * math.sqrt(7) / math.sqrt(3)),      # s^2 = (4 + 1 + 9) / 2
    ([1.0, 3.0], 0.95, 2.0, 12.706205 * math.sqrt(2) / math.sqrt(2)),           # s^2 = (1 + 1) / 1
    ([1.0, 2.0, 3.0, 4.0, 5.0], 0.90, 3.0, 2.131847 * math.sqrt(2.5) / math.sqrt(5)),  # s^2 = 10 / 4
    ([0.5, 0.5, 0.5, 1.5], 0.99, 0.75, 5.840909 * 0.5 / 2),                      # s^2 = (3 x 1/16 + 9/16) / 3
    ([4.0, 4.0, 4.0], 0.95, 4.0, 0.0),                                           # no spread, no width
])
def test_t_interval_is_the_mean_plus_minus_t_times_s_over_root_n(values, confidence, mean, half):
    got = t_interval(values, confidence=confidence)
    assert got == pytest.approx((mean, mean - half, mean + half), abs=1e-5)
    assert all(type(x) is float for x in got)


def test_t_interval_defaults_to_95_percent_and_one_value_has_no_interval():
    assert t_interval((1.0, 2.0, 6.0)) == pytest.approx(t_interval([1.0, 2.0, 6.0], 0.95))
    assert t_interval([1.0, 2.0, 6.0])[2] - 3.0 == pytest.approx(4.302653 * math.sqrt(7 / 3), abs=1e-5)
    mean, low, high = t_interval([0.25])
    assert mean == 0.25 and math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize("confidence", [0, 1, 1.5, -0.1])
def test_t_interval_confidence_must_be_strictly_between_0_and_1(confidence):
    with pytest.raises(ValueError, match=rf"^confidence must be in \(0, 1\), got {confidence}$"):
        t_interval([1.0, 2.0], confidence=confidence)


def test_t_interval_refuses_no_values_and_a_table_of_them():
    with pytest.raises(ValueError, match=r"^values must be a non-empty list of numbers, got shape \(0,\)$"):
        t_interval([])
    with pytest.raises(ValueError, match=r"^values must be a non-empty list of numbers, got shape \(2, 2\)$"):
        t_interval([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match=r"^values must be a non-empty list of numbers, got shape \(\)$"):
        t_interval(3.0)
