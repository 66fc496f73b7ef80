"""Small statistics for honest reporting: bootstrap intervals over lesions, macro F1 over the classes a group holds,
and the smallest group worth scoring.

Every interval is a percentile bootstrap: ``reps`` resamples of the lesions (with replacement, a fixed seed), the
statistic computed on each, the 2.5th and 97.5th percentiles kept. Resamples are drawn as counts per lesion
(``resample_counts``), so a statistic of confusion counts is one matrix product for all resamples at once.
"""
from __future__ import annotations

import numpy as np

MIN_GROUP = 50   # a group of fewer lesions is reported as "too few", not scored
REPS = 1000      # bootstrap resamples
SEED = 0
LEVEL = 0.95


def resample_counts(n: int, reps: int = REPS, seed: int = SEED) -> np.ndarray:
    """(reps, n): how often each of ``n`` lesions is drawn in each resample of ``n`` draws with replacement."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=reps)


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` share of ``values`` (NaN values, resamples where the statistic is undefined, left out);
    (nan, nan) when none is defined."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))


def confusion(y: np.ndarray, decided: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per class true/false positives and negatives of boolean decisions against labels; with ``weights`` (reps, n)
    each row counted that often, one row of counts per resample."""
    truth, pred = np.asarray(y) > 0.5, np.asarray(decided, bool)
    w = np.ones((1, len(truth))) if weights is None else np.asarray(weights, np.float64)
    out = {"tp": w @ (truth & pred), "fp": w @ (~truth & pred), "fn": w @ (truth & ~pred),
           "tn": w @ (~truth & ~pred)}
    return {k: v[0] for k, v in out.items()} if weights is None else out


def f1_from(c: dict[str, np.ndarray], present_only: bool = False) -> np.ndarray:
    """Per class F1 from ``confusion`` counts. The leaderboard's convention: a class with no positives and none
    predicted has F1 1; ``present_only``: such a class (and any class without a positive lesion) is NaN instead."""
    den = 2 * c["tp"] + c["fp"] + c["fn"]
    f1 = np.where(den > 0, 2 * c["tp"] / np.maximum(den, 1e-300), 1.0)
    return np.where(c["tp"] + c["fn"] > 0, f1, np.nan) if present_only else f1


def macro(values: np.ndarray) -> np.ndarray | float:
    """Mean over the last axis, NaN (a class left out) ignored; NaN when every class is left out."""
    v = np.asarray(values, np.float64)
    n = np.isfinite(v).sum(-1)
    out = np.where(n > 0, np.nansum(v, -1) / np.maximum(n, 1), np.nan)
    return float(out) if out.ndim == 0 else out


def present_macro_f1(y: np.ndarray, decided: np.ndarray) -> float:
    """Macro F1 over the classes with at least one positive lesion in ``y`` (a group that holds no lesion of a class
    is not credited F1 = 1 for it)."""
    return macro(f1_from(confusion(y, decided), present_only=True))


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)


def class_rates(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sensitivity (recall) and specificity per class from ``confusion`` counts (NaN where undefined)."""
    return {"sensitivity": ratio(c["tp"], c["tp"] + c["fn"]), "specificity": ratio(c["tn"], c["tn"] + c["fp"])}


def weighted_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of one class's scores ``p`` against labels ``y``, per resample (``weights`` (reps, n)): the chance that
    a positive lesion scores above a negative one, ties counting half; NaN where a resample lacks either."""
    from scipy import sparse

    truth = np.asarray(y) > 0.5
    values, inv = np.unique(np.asarray(p, np.float64), return_inverse=True)
    onehot = sparse.csr_matrix((np.ones(len(inv)), (np.arange(len(inv)), inv)), shape=(len(inv), len(values)))
    w = np.asarray(weights, np.float64)
    pos = np.asarray((sparse.csr_matrix(w * truth) @ onehot).todense())
    neg = np.asarray((sparse.csr_matrix(w * ~truth) @ onehot).todense())
    below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (below + 0.5 * neg)).sum(1)
    return ratio(wins, pos.sum(1) * neg.sum(1))


def interval(stat, n: int, reps: int = REPS, seed: int = SEED) -> tuple[float, float]:
    """Percentile interval of ``stat(weights)`` (a statistic of resample counts, one value per resample)."""
    return percentile_interval(stat(resample_counts(n, reps, seed)))


def macro_f1_interval(y: np.ndarray, decided: np.ndarray, present_only: bool = False, reps: int = REPS,
                      seed: int = SEED) -> tuple[float, float]:
    """Bootstrap interval of the macro F1 of ``decided`` (leaderboard convention, or ``present_only``)."""
    return interval(lambda w: macro(f1_from(confusion(y, decided, w), present_only)), len(y), reps, seed)
