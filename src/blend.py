"""Blend complete experiments and score every input and the blend side by side on the out-of-fold rows.

Blend weights (non-negative, summing to 1) minimise the mean binary log-loss of the out-of-fold
probabilities over the 11 classes; the test probabilities are blended with the same weights.  The
decision rule, the submission and the report are the next steps (src/submission.py, ``bash run.sh blend``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import softmax
from sklearn.metrics import roc_auc_score

from .config import Config, apply_overrides, load_named, parse_cli_overrides
from .data import CLASSES
from .decision import RULES, fold_probabilities, honest_oof, tune_thresholds
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
# weights and scores
# ----------------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Evaluation:
    scores: dict[str, float]
    thresholds: np.ndarray  # 'threshold' rule tuned on all OOF rows of the blend fitted on all of them
    honest: dict[str, tuple[np.ndarray, dict]]  # rule -> (folded OOF probabilities, per-fold info)
    in_sample_honest: dict[str, float]  # a blend's honest scores had its weights been fitted on all OOF rows


def nested_weights(y: np.ndarray, stack: np.ndarray, folds: np.ndarray) -> dict[int, np.ndarray]:
    """Blend weights for each fold, fitted on the other folds' out-of-fold rows only."""
    if len(stack) == 1:
        return {int(f): np.ones(1) for f in np.unique(folds)}
    return {int(f): fit_weights(y[folds != f], list(stack[:, folds != f])) for f in np.unique(folds)}


def honest_rule(rule: str, y: np.ndarray, stack: np.ndarray, folds: np.ndarray,
                weights: dict[int, np.ndarray]) -> tuple[np.ndarray, dict]:
    """``decision.honest_oof`` of the blend: each held-out fold decided with everything fitted without its labels,
    the blend weights (``weights``, from :func:`nested_weights`) included."""
    out, info = honest_oof(rule, y, stack[0], folds, fold_probs=lambda f: np.tensordot(weights[f], stack, axes=1))
    return out, {**info, "per_fold_weights": [w.tolist() for w in weights.values()]}


def evaluate(y: np.ndarray, stack: np.ndarray, folds: np.ndarray) -> Evaluation:
    """Every score of ``score_meanings`` for the out-of-fold probabilities of the inputs ``stack`` (inputs, rows,
    classes) blended; one input is scored as it is. The blend's own scores are honest like its inputs': each fold is
    blended with weights fitted on the other folds (only ``thr_opt`` uses all rows, as its name says)."""
    weights = nested_weights(y, stack, folds)
    nested = np.empty(stack.shape[1:])
    for f, w in weights.items():
        nested[folds == f] = np.tensordot(w, stack[:, folds == f], axes=1)
    full = np.tensordot(fit_weights(y, list(stack)), stack, axes=1)
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
    if len(stack) > 1:  # the optimism of fitting the weights on the rows they are scored on, measured
        fixed = {f: fit_weights(y, list(stack)) for f in weights}
        in_sample = {RULES[r].score_key: macro_f1(y, honest_rule(r, y, stack, folds, fixed)[0]) for r in RULES}
    return Evaluation(scores, thresholds, honest, in_sample)


def score_frame(scores: dict[str, dict[str, float]], weights: dict[str, float], rule: str) -> pd.DataFrame:
    """One row per input and the blend, one column per score; '*' marks the chosen rule's honest score."""
    meanings = score_meanings()
    labels = {k: meanings[k][0] + ("*" if k == RULES[rule].score_key else "") for k in meanings}
    return pd.DataFrame([{"input": name, "weight": weights.get(name, float("nan")),
                          **{labels[k]: row[k] for k in meanings}} for name, row in scores.items()])


def score_legend(rule: str) -> str:
    return (f"* = the honest CV of decision rule '{rule}'. " +
            "; ".join(f"{label}: {meaning}" for label, meaning in score_meanings().values()) + ".")


def format_scores(scores: dict[str, dict[str, float]], weights: dict[str, float], rule: str) -> str:
    """Side-by-side text table of :func:`score_frame` and its legend."""
    table = score_frame(scores, weights, rule).to_string(index=False, float_format=lambda v: f"{v:.4f}",
                                                         na_rep="")
    return f"{table}\n{score_legend(rule)}"


@dataclass(frozen=True)
class Blend:
    """The experiments, their blend weights and blended probabilities, and every row's scores."""

    cfgs: list[Config]
    weights: dict[str, float]
    oof: np.ndarray
    test: np.ndarray
    test_ids: list[str]
    folds: np.ndarray
    evals: dict[str, Evaluation]  # each input's and BLEND's

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        return {k: e.scores for k, e in self.evals.items()}


def blend_experiments(cfgs: list[Config], train: pd.DataFrame, test: pd.DataFrame) -> Blend:
    """Weights fitted on the out-of-fold rows, the blended probabilities, and every input's and the blend's
    scores under the first experiment's threshold search."""
    y = train[CLASSES].to_numpy(np.float64)
    members, test_ids = load_members(cfgs, train)
    folds = shared_folds(cfgs, train)
    current = data_fingerprint(Lesions(train, test, folds))
    for cfg in cfgs:
        check_current(cfg, current)
    stack = np.stack([m.oof for m in members])
    weights = fit_weights(y, list(stack))
    blend_oof = np.tensordot(weights, stack, axes=1)
    blend_test = np.tensordot(weights, np.stack([m.test for m in members]), axes=1)
    evals = {m.cfg.name: evaluate(y, m.oof[None], folds) for m in members}
    evals[BLEND] = evaluate(y, stack, folds)
    return Blend(cfgs, {c.name: float(w) for c, w in zip(cfgs, weights)}, blend_oof, blend_test, test_ids, folds,
                 evals)
