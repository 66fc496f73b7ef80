"""The statistics of the model card on fixed small inputs, against values computed by hand: the bootstrap interval,
macro F1 over the classes present, the smallest group scored, AUC with resampled lesions."""
from __future__ import annotations

import numpy as np
import pytest

from src.deliver.card import group_table
from src.stats import (MIN_GROUP, confusion, f1_from, macro_f1_interval, percentile_interval, present_macro_f1,
                       resample_counts, weighted_auc)

# three classes, four lesions: A is found once and once wrongly, B is missed, C is absent and never predicted
Y = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]])
DECIDED = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], bool)


def test_present_classes_only_macro_f1_leaves_out_a_class_the_group_lacks():
    # A: tp 1, fp 1, fn 1 -> 2 / 4 = 0.5; B: tp 0, fn 1 -> 0; C: no positive, none predicted
    f1 = f1_from(confusion(Y, DECIDED))
    np.testing.assert_allclose(f1, [0.5, 0.0, 1.0])                     # the leaderboard credits C with 1
    assert present_macro_f1(Y, DECIDED) == pytest.approx(0.25)           # (0.5 + 0) / 2, not (0.5 + 0 + 1) / 3
    predicted_absent = DECIDED.copy()
    predicted_absent[2, 2] = True                                        # C predicted once, never there
    assert present_macro_f1(Y, predicted_absent) == pytest.approx(0.25)  # still not a class of this group


def test_percentile_interval_by_hand():
    # numpy's linear percentiles of 1..100: position 0.025 * 99 = 2.475 -> 3.475; 0.975 * 99 = 96.525 -> 97.525
    assert percentile_interval(np.arange(1, 101)) == pytest.approx((3.475, 97.525))
    assert percentile_interval(np.r_[np.arange(1, 101), np.nan]) == pytest.approx((3.475, 97.525))  # NaN left out
    assert all(np.isnan(percentile_interval(np.array([np.nan]))))


def test_resamples_draw_every_lesion_n_times_in_all_and_repeat_for_a_seed():
    w = resample_counts(7, reps=50, seed=3)
    assert w.shape == (50, 7) and (w.sum(1) == 7).all()
    np.testing.assert_array_equal(w, resample_counts(7, reps=50, seed=3))


def test_bootstrap_interval_by_hand():
    # one class, two lesions: a true positive and a false positive. A resample holds the first a = 0, 1 or 2 times
    # (chances 1/4, 1/2, 1/4): F1 = 2a / (2a + (2 - a)) = 0, 2/3, 1, so the 95% interval is exactly (0, 1)
    y, decided = np.array([[1], [0]]), np.array([[True], [True]])
    assert macro_f1_interval(y, decided, reps=2000) == (0.0, 1.0)
    # a perfect classifier has no spread at all
    y = np.eye(3)[[0, 1, 2, 0, 1, 2]]
    assert macro_f1_interval(y, y.astype(bool)) == (1.0, 1.0)


def test_auc_with_resampled_lesions_by_hand():
    from sklearn.metrics import roc_auc_score

    y, p = np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.4])
    # pairs (positive, negative): (0.9, 0.1) 1, (0.9, 0.4) 1, (0.4, 0.1) 1, (0.4, 0.4) a tie, 0.5 -> 3.5 / 4
    assert weighted_auc(y, p, np.ones((1, 4)))[0] == pytest.approx(0.875)
    # the first lesion drawn twice: wins 2 * (1 + 1) + 1 * (1 + 0.5) = 5.5 over 3 * 2 pairs
    w = np.array([[2, 1, 1, 1]])
    assert weighted_auc(y, p, w)[0] == pytest.approx(5.5 / 6)
    assert weighted_auc(y, p, w)[0] == pytest.approx(roc_auc_score(y, p, sample_weight=w[0]))
    assert np.isnan(weighted_auc(y, p, np.array([[1, 0, 1, 0]]))[0])  # no negative drawn: undefined


def test_a_group_under_the_minimum_size_is_listed_not_scored():
    small, large = MIN_GROUP - 1, MIN_GROUP
    labels = np.array(["a"] * small + ["b"] * large)
    y = np.tile([[1, 0], [0, 1]], ((small + large) // 2 + 1, 1))[:small + large]
    decided = y.astype(bool)
    table = group_table(labels, y, decided, "group").set_index("group")
    assert table.loc["a", "lesions"] == small and table.loc["a"].iloc[-1].startswith("too few")
    assert table.loc["b", "lesions"] == large and table.loc["b"].iloc[-1] == "1.000 (1.000-1.000)"
