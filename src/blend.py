"""Blend complete experiments and score every input and the blend side by side on the out-of-fold rows.

A blend is a weighted average of its inputs' probabilities (weights non-negative, summing to 1), the test
probabilities blended with the same weights. Several ways of choosing the weights are candidates (``CANDIDATES``):
each single input, the weights minimising the mean binary log-loss, equal weights, and greedy ensemble selection
on the leaderboard's macro F1. Each is scored honestly, with its weights and the decision rule's thresholds fitted
on the other folds and the held-out fold decided with them; the blend is the candidate with the best honest macro
F1, the simpler one when the lead is within the noise of one CV run (``choose_candidate``). The decision rule, the
submission and the report are the next steps (src/submission.py, ``bash run.sh blend``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import softmax
from sklearn.metrics import roc_auc_score

from .config import Config, apply_overrides, load_named, parse_cli_overrides
from .data import CLASSES
from .decision import NOISE, RULES, choose_rule, fold_probabilities, honest_oof, tune_thresholds, usable_rules
from .experiment import ExperimentDir, Lesions, data_fingerprint
from .folds import load_or_make_folds
from .scoring import SubmissionError, log_loss, macro_f1

EPS = 1e-7
# Out-of-fold scores reported for every input and the blend: key -> (short label, meaning); each decision rule's
# honest score comes from the rule registry (src/decision.py), read at call time: ``score_meanings``.
BASE_SCORES = {
    "log_loss": ("logloss", "mean binary log-loss over the 11 classes"),
    "auc": ("auc", "mean per-class ROC AUC"),
    "f1_raw": ("f1@0.5", "macro F1 of the raw probabilities cut at 0.5"),
    "f1_argmax": ("argmax", "macro F1 with only the top class positive"),
    "f1_threshold_optimistic": ("thr_opt", "per-class thresholds tuned on all OOF rows, scored on the same rows"),
}


def score_meanings() -> dict[str, tuple[str, str]]:
    """Every reported score: key -> (short label, meaning), the registry's rules included."""
    return {**BASE_SCORES, **{r.score_key: (r.label, r.meaning) for r in RULES.values()}}


BLEND = "blend"  # the blend's row in the score tables


class BlendError(ValueError):
    """Experiments that cannot be blended: incomplete, or made on different lesions or folds."""


@dataclass(frozen=True)
class BlendInput:
    cfg: Config
    oof: np.ndarray  # (training lesions, 11) in training order
    test: np.ndarray  # (test lesions, 11) in the order of the first experiment's test.csv


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------
def resolve_configs(experiments: Sequence[str | Config], overrides: list[str] | None = None) -> list[Config]:
    """Configs of the experiments: names (experiment folders, or runs given ``name=``) are loaded with
    ``overrides``; Config objects get them applied."""
    if not experiments:
        raise BlendError("no experiments to blend")
    cli = parse_cli_overrides(overrides or [])
    cfgs = [load_named(e, overrides) if isinstance(e, str) else apply_overrides(e, cli, "command line")
            for e in experiments]
    names = [c.name for c in cfgs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BlendError(f"experiment(s) {dup} listed more than once")
    if BLEND in names:
        raise BlendError(f"an experiment named {BLEND!r} would clash with the blend's own row; rename it")
    return cfgs


def _read_probs(cfg: Config, file: str, expected_ids: Sequence[str] | None):
    exp = ExperimentDir(cfg)
    reason = exp.incomplete_reason()
    if reason:
        raise BlendError(reason)
    try:
        return exp.read_probs(file, expected_ids)
    except SubmissionError as e:
        raise BlendError(f"experiment {cfg.name}: {e}; rerun `bash run.sh {cfg.name}`") from None


def shared_folds(cfgs: list[Config], train: pd.DataFrame) -> np.ndarray:
    """The fold of each training lesion, from the one fold file every experiment was trained with."""
    first = cfgs[0]
    if any((c.resolved_folds_csv().resolve(), c.n_folds) != (first.resolved_folds_csv().resolve(), first.n_folds)
           for c in cfgs):
        listing = "; ".join(f"{c.name}: {c.resolved_folds_csv()} (n_folds={c.n_folds})" for c in cfgs)
        raise BlendError(f"the experiments were not made with the same folds ({listing}); "
                         "out-of-fold predictions blend only on one shared fold file")
    path = first.resolved_folds_csv()
    if not path.is_file():
        raise BlendError(f"{path}: fold file not found; the out-of-fold predictions of {[c.name for c in cfgs]} "
                         "can only be scored with the folds they were made with (check output_dir / folds_csv)")
    return load_or_make_folds(train, path, first.n_folds, first.fold_seed)["fold"].to_numpy()


def check_current(cfg: Config, current: dict) -> None:
    """Refuse an experiment whose predictions were made from other lesions, labels or folds than ``current``
    (``data_fingerprint`` of the data the blend scores them on)."""
    saved = ExperimentDir(cfg).recorded_data()
    changed = [part for part in ("tables", "folds") if saved and saved.get(part) not in (None, current[part])]
    if changed:
        what = "labels or metadata" if "tables" in changed else "folds"
        raise BlendError(f"experiment {cfg.name} was made from other data than {cfg.data_dir} holds now (its "
                         f"{what} changed since): its scores would be wrong; rerun it with retrain=true")


def load_members(cfgs: list[Config], train: pd.DataFrame) -> tuple[list[BlendInput], list[str]]:
    """Each experiment's OOF (training order) and test probabilities; all must cover the same lesions."""
    train_ids = train["lesion_id"].tolist()
    members: list[BlendInput] = []
    test_ids: list[str] | None = None
    for cfg in cfgs:
        oof = _read_probs(cfg, "oof.csv", train_ids)
        test = _read_probs(cfg, "test.csv", test_ids)
        test_ids = test_ids or test.index.tolist()
        members.append(BlendInput(cfg, oof.to_numpy(np.float64), test.to_numpy(np.float64)))
    assert test_ids is not None
    return members, test_ids


# ----------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------
Fit = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (labels, stack, fold ids) of some rows -> weights
GREEDY_STEPS = 20  # greedy selection stops after this many picks (weights in steps of 1/20 at the finest)


def fit_weights(y: np.ndarray, probs: list[np.ndarray]) -> np.ndarray:
    """Non-negative weights summing to 1 minimising ``log_loss(y, sum_k w_k probs_k)``.

    L-BFGS over softmax logits from equal weights (deterministic); each single input is also a
    candidate, so the blend is never worse than the best input on this loss.
    """
    stack = np.stack(probs)
    if len(stack) == 1:
        return np.ones(1)
    y = np.asarray(y, np.float64)

    def loss_and_grad(z: np.ndarray) -> tuple[float, np.ndarray]:
        w = softmax(z)
        q = np.clip(np.tensordot(w, stack, axes=1), EPS, 1 - EPS)
        dq = (q - y) / (q * (1 - q)) / q.size
        dw = np.tensordot(stack, dq, axes=([1, 2], [0, 1]))
        return log_loss(y, q), w * (dw - w @ dw)

    fitted = softmax(minimize(loss_and_grad, np.zeros(len(stack)), jac=True, method="L-BFGS-B").x)
    candidates = [fitted, *np.eye(len(stack))]
    return min(candidates, key=lambda w: log_loss(y, np.tensordot(w, stack, axes=1)))


def logloss_weights(y: np.ndarray, stack: np.ndarray, folds: np.ndarray) -> np.ndarray:
    return fit_weights(y, list(stack))


def equal_weights(y: np.ndarray, stack: np.ndarray, folds: np.ndarray) -> np.ndarray:
    return np.full(len(stack), 1.0 / len(stack))


def honest_f1(y: np.ndarray, probs: np.ndarray, folds: np.ndarray, rules: Sequence[str]) -> float:
    """The best honest macro F1 among ``rules`` (those usable on ``folds``) on these rows: each fold decided without
    its own labels (``decision.honest_oof``)."""
    usable = [r for r in rules if r in usable_rules(folds)] or usable_rules(folds)
    return max(macro_f1(y, honest_oof(r, y, probs, folds)[0]) for r in usable)


def greedy_weights(y: np.ndarray, stack: np.ndarray, folds: np.ndarray, rules: Sequence[str] = tuple(RULES),
                   steps: int = GREEDY_STEPS) -> np.ndarray:
    """Ensemble selection with replacement (Caruana et al., 2004) on the leaderboard's metric: start from the input
    with the best :func:`honest_f1` on these rows (``folds`` their fold ids, ``rules`` the decision rules scored),
    then add, again or for the first time, the input whose addition raises it most, until no addition raises it or
    ``steps`` inputs are picked. An input's weight is its share of the picks (ties: the earlier input)."""
    def score(p: np.ndarray) -> float:
        return honest_f1(y, p, folds, rules)

    singles = [score(p) for p in stack]
    counts = np.zeros(len(stack))
    first = int(np.argmax(singles))
    counts[first], total, current = 1, stack[first].copy(), singles[first]
    while counts.sum() < steps:
        gains = [score((total + p) / (counts.sum() + 1)) for p in stack]
        pick = int(np.argmax(gains))
        if gains[pick] <= current:
            break
        counts[pick] += 1
        total += stack[pick]
        current = gains[pick]
    return counts / counts.sum()


# ----------------------------------------------------------------------------------------------------
# honest scores
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    scores: dict[str, float]
    thresholds: np.ndarray  # 'threshold' rule tuned on all OOF rows of the blend fitted on all of them
    honest: dict[str, tuple[np.ndarray, dict]]  # rule -> (folded OOF probabilities, per-fold info)
    in_sample_honest: dict[str, float]  # a blend's honest scores had its weights been fitted on all OOF rows
    weights: np.ndarray  # fitted on all OOF rows: what a submission applies to the test probabilities


def nested_weights(y: np.ndarray, stack: np.ndarray, folds: np.ndarray,
                   fit: Fit = logloss_weights) -> dict[int, np.ndarray]:
    """Blend weights for each fold, fitted (``fit``) on the other folds' out-of-fold rows only."""
    if len(stack) == 1:
        return {int(f): np.ones(1) for f in np.unique(folds)}
    return {int(f): fit(y[folds != f], stack[:, folds != f], folds[folds != f]) for f in np.unique(folds)}


def honest_rule(rule: str, y: np.ndarray, stack: np.ndarray, folds: np.ndarray,
                weights: dict[int, np.ndarray]) -> tuple[np.ndarray, dict]:
    """``decision.honest_oof`` of the blend: each held-out fold decided with everything fitted without its labels,
    the blend weights (``weights``, from :func:`nested_weights`) included."""
    out, info = honest_oof(rule, y, stack[0], folds, fold_probs=lambda f: np.tensordot(weights[f], stack, axes=1))
    return out, {**info, "per_fold_weights": [w.tolist() for w in weights.values()]}


def evaluate(y: np.ndarray, stack: np.ndarray, folds: np.ndarray, fit: Fit = logloss_weights) -> Evaluation:
    """Every score of ``score_meanings`` for the out-of-fold probabilities of the inputs ``stack`` (inputs, rows,
    classes) blended with weights from ``fit``; one input is scored as it is. The blend's own scores are honest like
    its inputs': each fold is blended with weights fitted on the other folds (only ``thr_opt`` uses all rows, as its
    name says)."""
    weights = nested_weights(y, stack, folds, fit)
    full_weights = fit(y, stack, folds) if len(stack) > 1 else np.ones(1)
    nested = np.empty(stack.shape[1:])
    for f, w in weights.items():
        nested[folds == f] = np.tensordot(w, stack[:, folds == f], axes=1)
    full = np.tensordot(full_weights, stack, axes=1)
    thresholds = tune_thresholds(y, full)
    honest = {rule: honest_rule(rule, y, stack, folds, weights) for rule in RULES}
    aucs = [roc_auc_score(y[:, j], nested[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    scores = {
        "log_loss": log_loss(y, nested),
        "auc": float(np.mean(aucs)) if aucs else float("nan"),
        "f1_raw": macro_f1(y, nested),
        "f1_argmax": macro_f1(y, np.eye(y.shape[1])[nested.argmax(1)]),
        "f1_threshold_optimistic": macro_f1(y, fold_probabilities(full, thresholds)),
        **{r.score_key: macro_f1(y, honest[name][0]) for name, r in RULES.items()},
    }
    in_sample = {}
    if any(not np.array_equal(w, full_weights) for w in weights.values()):  # the optimism of fitting the weights
        fixed = {f: full_weights for f in weights}                          # on the rows they are scored on
        in_sample = {RULES[r].score_key: macro_f1(y, honest_rule(r, y, stack, folds, fixed)[0]) for r in RULES}
    return Evaluation(scores, thresholds, honest, in_sample, full_weights)


# ----------------------------------------------------------------------------------------------------
# candidates: the blend is the one with the best honest macro F1
# ----------------------------------------------------------------------------------------------------
# name -> (simplicity: lower is preferred within the noise, meaning); each single input is a candidate of simplicity 0
CANDIDATES = {
    "blend:logloss": (1, "weights minimising the mean binary log-loss of the blended out-of-fold probabilities"),
    "blend:equal": (2, "equal weights"),
    "blend:greedy": (3, "greedy selection with replacement on the decision rule's honest macro F1 (inner folds)"),
}


@dataclass(frozen=True)
class Candidate:
    """One way of blending the inputs, scored honestly: its evaluation, the rule it would carry and that rule's
    honest macro F1."""

    name: str
    evaluation: Evaluation
    weights: np.ndarray  # over all inputs, fitted on every out-of-fold row
    rule: str
    honest: float
    simplicity: int

    @property
    def honest_by_rule(self) -> dict[str, float]:
        return {r: self.evaluation.scores[RULES[r].score_key] for r in RULES}


def candidate(name: str, evaluation: Evaluation, weights: np.ndarray, setting: str, simplicity: int) -> Candidate:
    scores = {r: evaluation.scores[RULES[r].score_key] for r in RULES}
    rule, _ = choose_rule(setting, scores)
    return Candidate(name, evaluation, np.asarray(weights, np.float64), rule, scores[rule], simplicity)


def choose_candidate(candidates: Sequence[Candidate]) -> tuple[Candidate, str]:
    """The candidate a submission carries, and why: the best honest macro F1, except that among the candidates within
    ``decision.NOISE`` of the best the simplest is taken (a single input, then log-loss weights, equal weights,
    greedy selection; the better score among equally simple ones), so a lead within the noise of one CV run never
    buys a more complex blend. Its honest score is never below the best single input's: that input is taken itself
    when it is within the noise of the best."""
    ranked = sorted(candidates, key=lambda c: -c.honest)
    best = ranked[0]
    near = [c for c in candidates if best.honest - c.honest < NOISE]
    chosen = min(near, key=lambda c: (c.simplicity, -c.honest))
    if len(candidates) == 1:
        return chosen, f"{chosen.name} is the only input"
    runner_up = next(c for c in ranked if c is not chosen)
    if chosen is not best:
        return chosen, (f"{best.name} leads with {best.honest:.4f} by {best.honest - chosen.honest:.4f}, less than the "
                        f"noise of one CV run ({NOISE}), so the simpler {chosen.name} ({chosen.honest:.4f}, rule "
                        f"{chosen.rule}) is submitted")
    margin = chosen.honest - runner_up.honest
    note = (f", a tie within the noise of one CV run (< {NOISE}) of which {chosen.name} is the simplest"
            if margin < NOISE else "")
    return chosen, (f"{chosen.name} has the best honest macro F1 ({chosen.honest:.4f}, rule {chosen.rule}); the "
                    f"runner-up {runner_up.name} ({runner_up.honest:.4f}) is {margin:.4f} behind{note}")


def candidate_frame(candidates: Sequence[Candidate], names: Sequence[str], chosen: str) -> pd.DataFrame:
    """One row per candidate: its weights over the inputs ``names`` (zero weights left out), each rule's honest macro
    F1, the rule it carries and its score; '*' marks the submitted one."""
    return pd.DataFrame([{"candidate": c.name + ("*" if c.name == chosen else ""),
                          "weights": ", ".join(f"{n} {w:.2f}" for n, w in zip(names, c.weights) if w > 0),
                          **{RULES[r].label: v for r, v in c.honest_by_rule.items()}, "rule": c.rule,
                          "honest": c.honest} for c in candidates])


def candidate_legend() -> str:
    return ("* = submitted. Each candidate is scored honestly: its weights and the rule's thresholds are fitted on "
            "the other folds and the held-out fold is decided with them; " +
            "; ".join(f"{n}: {m}" for n, (_, m) in CANDIDATES.items()) + "; an input's name: that input alone. Taking "
            f"the best of a few honest scores is itself slightly optimistic; a lead under {NOISE} is within the noise "
            "of one CV run, and then the simplest candidate within it is submitted.")


# ----------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------
def score_frame(scores: dict[str, dict[str, float]], weights: dict[str, float], rule: str) -> pd.DataFrame:
    """One row per input and the blend, one column per score; '*' marks the chosen rule's honest score."""
    meanings = score_meanings()
    labels = {k: meanings[k][0] + ("*" if k == RULES[rule].score_key else "") for k in meanings}
    return pd.DataFrame([{"input": name, "weight": weights.get(name, float("nan")),
                          **{labels[k]: row[k] for k in meanings}} for name, row in scores.items()])


def score_legend(rule: str) -> str:
    return (f"* = the honest CV of decision rule '{rule}'. " +
            "; ".join(f"{label}: {meaning}" for label, meaning in score_meanings().values()) + ".")


def text_table(frame: pd.DataFrame) -> str:
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="")


def format_scores(scores: dict[str, dict[str, float]], weights: dict[str, float], rule: str) -> str:
    """Side-by-side text table of :func:`score_frame` and its legend."""
    return f"{text_table(score_frame(scores, weights, rule))}\n{score_legend(rule)}"


# ----------------------------------------------------------------------------------------------------
# the blend
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Blend:
    """The experiments, the chosen candidate's weights and blended probabilities, every row's scores, and every
    candidate with why the chosen one won."""

    cfgs: list[Config]
    weights: dict[str, float]
    oof: np.ndarray
    test: np.ndarray
    test_ids: list[str]
    folds: np.ndarray
    evals: dict[str, Evaluation]  # each input's and BLEND's (the chosen candidate's)
    candidates: list[Candidate]
    chosen: str
    reason: str

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        return {k: e.scores for k, e in self.evals.items()}


def choose_blend(y: np.ndarray, stack: np.ndarray, folds: np.ndarray, names: Sequence[str],
                 setting: str) -> tuple[dict[str, Evaluation], list[Candidate], Candidate, str]:
    """Each input's evaluation, every candidate (each input alone, then with more than one input those of
    :data:`CANDIDATES`) scored honestly under the decision ``setting``, the chosen one and why."""
    evals = {name: evaluate(y, p[None], folds) for name, p in zip(names, stack)}
    candidates = [candidate(name, e, np.eye(len(names))[i], setting, 0) for i, (name, e) in enumerate(evals.items())]
    if len(names) > 1:
        rules = tuple(RULES) if setting == "auto" else (setting,)
        fits: dict[str, Fit] = {"blend:logloss": logloss_weights, "blend:equal": equal_weights,
                                "blend:greedy": lambda y_, s, f: greedy_weights(y_, s, f, rules)}
        for name, fit in fits.items():
            e = evaluate(y, stack, folds, fit)
            candidates.append(candidate(name, e, e.weights, setting, CANDIDATES[name][0]))
    chosen, reason = choose_candidate(candidates)
    return evals, candidates, chosen, reason


def blend_experiments(cfgs: list[Config], train: pd.DataFrame, test: pd.DataFrame) -> Blend:
    """Every candidate blend of the experiments scored honestly on the out-of-fold rows under the first experiment's
    decision setting (:func:`choose_blend`), the chosen one's weights and blended probabilities, and every input's
    scores."""
    y = train[CLASSES].to_numpy(np.float64)
    members, test_ids = load_members(cfgs, train)
    folds = shared_folds(cfgs, train)
    current = data_fingerprint(Lesions(train, test, folds))
    for cfg in cfgs:
        check_current(cfg, current)
    stack = np.stack([m.oof for m in members])
    evals, candidates, chosen, reason = choose_blend(y, stack, folds, [c.name for c in cfgs], cfgs[0].decision)
    evals[BLEND] = chosen.evaluation
    w = chosen.weights
    return Blend(cfgs, {c.name: float(v) for c, v in zip(cfgs, w)}, np.tensordot(w, stack, axes=1),
                 np.tensordot(w, np.stack([m.test for m in members]), axes=1), test_ids, folds, evals, candidates,
                 chosen.name, reason)
