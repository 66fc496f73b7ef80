"""Decision rules: per-class thresholds folded into the probabilities.

The leaderboard cuts every class at > 0.5.  A per-class threshold t is applied by rewriting the
probabilities with a strictly increasing map f_t for which f_t(p) > 0.5 exactly when p > t, so the
submitted file carries the decision while each class keeps its ranking (AUC unchanged).

Rules: 'threshold' (thresholds maximising each class's F1 on labelled out-of-fold rows),
'expected_f1' (label-free: maximise the F1 expected under the predicted probabilities of the batch
itself), 'none' (the plain 0.5 cut).  Macro F1 is a sum of per-class terms, so tuning each class on
its own is an exact maximisation of the macro value.  ``decision=auto`` (the default) carries the rule
with the best honest out-of-fold estimate (``choose_rule``). A new rule is one entry of ``RULES``: the settings'
choices, blending, the submission and its sidecar, ``predict``, the model card, tuning, the spread over fold seeds and
the demo summary all read it from there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .scoring import f1_per_class

NOISE = 0.01  # differences of honest macro F1 below this are within the spread of one cross-validation run
MARGIN = 1e-6  # folded values keep this distance from 0.5, so no CSV round trip can flip a decision


def _as_probs(probs) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or not p.size:
        raise ValueError(f"probabilities must be a non-empty (rows, classes) array, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must be finite and inside [0, 1]")
    return p


def _as_labels(y_true, shape: tuple[int, ...]) -> np.ndarray:
    y = np.asarray(y_true, dtype=np.float64)
    if y.shape != shape:
        raise ValueError(f"labels {y.shape} do not match probabilities {shape}")
    return y > 0.5


def fold_probabilities(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Map each class through f_t: [0, t] -> [0, 0.5 - MARGIN] and (t, 1] -> [0.5 + MARGIN, 1], linearly.

    f_t(p) > 0.5 iff p > t.  A threshold <= 0 makes every row positive (f_t(0) > 0.5 when t < 0), one
    >= 1 makes every row negative.
    """
    p = _as_probs(probs)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.shape != (p.shape[1],) or not np.isfinite(t).all():
        raise ValueError(f"need {p.shape[1]} finite thresholds, got {np.asarray(thresholds).tolist()}")
    lo, hi = 0.5 - MARGIN, 0.5 + MARGIN
    scale = np.where(t > 0, np.minimum(t, 1.0), 1.0)
    below = lo * (np.minimum(p, scale) / scale)  # the ratio is <= 1 exactly, so below <= lo
    t0 = np.clip(t, 0.0, 1.0)
    above = np.minimum(hi + (1.0 - hi) * (p - t0) / np.where(t0 < 1, 1.0 - t0, 1.0), 1.0)
    return np.where(p > t, above, below)


def _cuts(v: np.ndarray) -> np.ndarray:
    """For distinct ascending values v (m,), thresholds c_0..c_m with exactly v[j:] > c_j.

    Interior cuts are midpoints; c_0 lies below v[0] (negative when v[0] == 0), c_m above v[-1] (1.0 at most).
    """
    lower = np.concatenate([[0.0 if v[0] > 0 else -1.0], v])
    upper = np.concatenate([v, [1.0]])
    mid = lower + (upper - lower) / 2
    return np.where(mid < upper, mid, lower)  # neighbouring doubles: the midpoint may round onto upper


def _tail_sums(x: np.ndarray) -> np.ndarray:
    """s_j = sum(x[j:]) for j = 0..len(x) (the last is 0)."""
    return np.concatenate([np.cumsum(x[::-1])[::-1], [0.0]])


def _exact_threshold(y: np.ndarray, p: np.ndarray) -> float:
    v, inv = np.unique(p, return_inverse=True)
    predicted = _tail_sums(np.bincount(inv, minlength=len(v)).astype(np.float64))
    tp = _tail_sums(np.bincount(inv, weights=y.astype(np.float64), minlength=len(v)))
    den = predicted + y.sum()  # 2TP + FP + FN = predicted positives + actual positives
    f1 = np.where(den == 0, 1.0, 2 * tp / np.where(den == 0, 1.0, den))
    cuts = _cuts(v)
    best = np.flatnonzero(f1 == f1.max())
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def tune_thresholds(y_true, probs) -> np.ndarray:
    """Per-class thresholds maximising the leaderboard F1 on (y_true, probs): every distinct cut is scored
    (midpoints between sorted distinct probabilities, plus all and no positives) and, among the best, the threshold
    closest to 0.5 is kept. Macro F1 is a mean of per-class terms, so this is the exact maximum of the macro value."""
    p = _as_probs(probs)
    y = _as_labels(y_true, p.shape)
    return np.array([_exact_threshold(y[:, j], p[:, j]) for j in range(p.shape[1])])


def expected_f1_thresholds(probs) -> np.ndarray:
    """Label-free thresholds from the batch itself.

    Per class, with p sorted descending, predicting the top k positive has expected F1 about
    2 * sum(top-k p) / (k + sum(all p)); the k maximising it (fewest positives among equals; k only at
    boundaries between distinct values) sets the threshold between the k-th and (k+1)-th value.
    """
    p = _as_probs(probs)
    out = np.empty(p.shape[1])
    for j in range(p.shape[1]):
        v, counts = np.unique(p[:, j], return_counts=True)
        k = _tail_sums(counts.astype(np.float64))
        top = _tail_sums(v * counts)
        den = k + top[0]
        ef1 = np.where(den == 0, 1.0, 2 * top / np.where(den == 0, 1.0, den))
        out[j] = _cuts(v)[np.flatnonzero(ef1 == ef1.max())[-1]]
    return out


# ----------------------------------------------------------------------------------------------------
# the rules: one registry that blend, submission, tune, spread and the demo summary iterate over
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A decision rule: ``fit(y_fit, p_fit, batch)`` gives the thresholds for the rows of ``batch``; a ``labelled``
    rule learns them from labelled rows (y_fit, p_fit), a label-free one from the batch itself (a new batch given to
    ``predict`` gets its own). ``score_key`` names its honest out-of-fold score in the score tables, ``label`` its
    column, ``meaning`` how that score is made; ``rank`` breaks ties in ``choose_rule`` (lower first: label-free rules
    need no labelled rows to transfer). ``explain``: what the rule does, in a sentence, for reports and model cards."""

    name: str
    labelled: bool
    fit: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    score_key: str
    label: str
    meaning: str
    rank: int
    explain: str = ""
    source: str = ""  # where a submission's thresholds come from, when not the default of its kind

    @property
    def thresholds_from(self) -> str:
        """Where a submission's thresholds under this rule come from."""
        return self.source or ("all blended out-of-fold rows" if self.labelled else "the submitted batch")


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("threshold", True, lambda y, p, batch: tune_thresholds(y, p), "f1_threshold_honest", "thr_hon",
         "per-class thresholds tuned on the other folds", 1,
         "one threshold per class, the one that maximises that class's F1 on the labelled out-of-fold rows"),
    Rule("expected_f1", False, lambda y, p, batch: expected_f1_thresholds(batch), "f1_expected_f1_honest", "ef1_hon",
         "expected-F1 thresholds of each held-out fold as its own batch", 0,
         "per class, the top-k of the batch that maximises the F1 expected under the model's own probabilities "
         "(label-free; it transfers better where a class has too few lesions to tune a threshold on)"),
    Rule("none", False, lambda y, p, batch: np.full(np.shape(batch)[1], 0.5), "f1_raw", "f1@0.5",
         "macro F1 of the raw probabilities cut at 0.5", 2, "the probabilities cut at 0.5 as they are",
         "the plain 0.5 cut"),
)}


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise ValueError(f"unknown decision rule {name!r}; use one of {tuple(RULES)}")
    return RULES[name]


def apply_rule(rule: str, probs, y_true=None) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, folded probabilities) of a rule on one batch; a labelled rule is tuned on (y_true, probs)."""
    r = get_rule(rule)
    p = _as_probs(probs)
    if r.labelled and y_true is None:
        raise ValueError(f"rule {rule!r} needs labels")
    t = r.fit(None if y_true is None else _as_labels(y_true, p.shape), p, p)
    return t, fold_probabilities(p, t)


def honest_oof(rule: str, y_true, probs, folds: np.ndarray,
               fold_probs: Callable[[int], np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """Decide every fold's rows without using any of their labels: a labelled rule is tuned on the other folds'
    rows, a label-free one takes the fold as its own batch. ``fold_probs(f)`` gives the probabilities that fold
    ``f`` is decided with (a blend with weights fitted without that fold); default ``probs`` for every fold.
    Returns the folded probabilities and {"folds": [...], "per_fold_thresholds": [[...] per fold]}."""
    r = get_rule(rule)
    p = _as_probs(probs)
    y = _as_labels(y_true, p.shape)
    folds = np.asarray(folds).reshape(-1)
    if folds.shape != (len(p),):
        raise ValueError(f"need one fold id per row ({len(p)}), got {folds.shape}")
    ids = np.unique(folds)
    if r.labelled and len(ids) < 2:
        raise ValueError(f"rule {rule!r} needs at least two folds to tune without the held-out labels")
    out = np.empty_like(p)
    per_fold = []
    for f in ids:
        q = p if fold_probs is None else _as_probs(fold_probs(int(f)))
        held = folds == f
        t = r.fit(y[~held], q[~held], q[held])
        out[held] = fold_probabilities(q[held], t)
        per_fold.append(np.asarray(t).tolist())
    return out, {"folds": ids.tolist(), "per_fold_thresholds": per_fold}


def usable_rules(folds: np.ndarray) -> list[str]:
    """The rules that can be scored honestly on these folds (a labelled rule needs two folds or more)."""
    return [n for n, r in RULES.items() if not r.labelled or len(np.unique(folds)) > 1]


def honest_scores(y_true, probs, folds: np.ndarray) -> dict[str, float]:
    """The one honest score: each usable rule's out-of-fold macro F1 with no fold decided by its own labels."""
    return {r: float(f1_per_class(y_true, honest_oof(r, y_true, probs, folds)[0]).mean()) for r in usable_rules(folds)}


def choose_rule(setting: str, honest: dict[str, float]) -> tuple[str, str]:
    """The rule a submission carries and why. ``setting`` is the config's ``decision``: a rule is kept as asked;
    'auto' takes the rule with the best honest out-of-fold macro F1 in ``honest`` (rule -> score), the lower
    ``rank`` first among equals."""
    listed = ", ".join(f"{r} {honest[r]:.4f}" for r in sorted(honest, key=honest.get, reverse=True))
    if setting != "auto":
        return setting, f"decision={setting} as configured (honest CV: {listed})"
    order = sorted((r for r in RULES if r in honest), key=lambda r: RULES[r].rank)
    best = max(order, key=lambda r: honest[r])
    runner_up = max((honest[r] for r in order if r != best), default=honest[best])
    margin = honest[best] - runner_up
    note = (f"; its lead of {margin:.4f} is within the noise of one CV run (< {NOISE})" if margin < NOISE else "")
    return best, f"decision=auto: {best} has the best honest CV ({listed}){note}"


def submitted_thresholds(rule: str, y_true, oof, batch) -> np.ndarray:
    """The thresholds a submission of ``batch`` carries under ``rule``: tuned on all labelled out-of-fold rows
    (y_true, oof) for a labelled rule, from the batch itself for a label-free one."""
    r = get_rule(rule)
    b = _as_probs(batch)
    if r.labelled:
        o = _as_probs(oof)
        return r.fit(_as_labels(y_true, o.shape), o, b)
    return r.fit(None, None, b)
