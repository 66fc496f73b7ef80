"""Tabular models: scikit-learn classifiers on the lesion metadata, no images (``model=tabular``, exp000), and the
fold loop they share with the stacker (src/stacker.py).

Per fold k, the models are fitted on the other folds' lesions (features from a
``MetadataEncoder(extended=True)`` fitted on those lesions only) and predict fold k and the test set;
the fold folders hold the same files as an image experiment's (oof.csv, test.csv, encoder.json,
config.json, metrics.json last), so blending, stacking and submission treat both alike.

Every model is an unweighted softmax classifier: its probabilities estimate the class frequencies,
which the per-class thresholds applied later need.  ``cfg.tabular_models`` lists the models whose
probabilities are averaged: 'logreg', 'hgb', 'mlp'.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from .config import Config, ConfigError
from .data import CLASSES
from .decision import choose_rule, honest_scores
from .experiment import ExperimentDir, Lesions, data_fingerprint, fingerprint, load_lesions, probs_frame
from .features import InteractionFeatures, MetadataEncoder
from .preflight import check_outputs
from .scoring import fold_metrics
from .tracking import Tracker

MODELS = ("lrx", "logreg", "hgb", "mlp")
FINE_MIN = 40  # lrx: a diagnosis_full with at least this many training lesions is a target class of its own

# (encoder, features of the training rows, of the held-out rows, of the test rows) for a training mask.
FeatureBuilder = Callable[[np.ndarray], tuple[MetadataEncoder, np.ndarray, np.ndarray, np.ndarray]]


def parse_models(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    if not names or bad:
        raise ConfigError(f"tabular_models={text!r}: expected a comma list of {list(MODELS)}")
    return names


def fine_targets(y: np.ndarray, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(target code of each row, the class of each code): a (class, diagnosis_full) pair with at least FINE_MIN
    rows is its own target; the rest of a class is one target."""
    pairs = pd.Series([f"{CLASSES[t]}|{f}" for t, f in zip(y, fine)])
    labels = np.where(pairs.map(pairs.value_counts()).to_numpy() >= FINE_MIN, pairs.to_numpy(),
                      [f"{CLASSES[t]}|" for t in y])
    uniq, codes = np.unique(labels, return_inverse=True)
    return codes, np.array([CLASSES.index(u.split("|")[0]) for u in uniq])


def make_model(name: str, seed: int, y: np.ndarray, names: list[str] | None = None) -> BaseEstimator:
    """One unweighted multiclass classifier; the linear and neural ones see standardised features. ``names``:
    the feature columns' names (needed by 'lrx')."""
    if name == "lrx":
        return make_pipeline(InteractionFeatures(names or []), StandardScaler(),
                             LogisticRegression(C=0.01, max_iter=5000))
    if name == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=5000))
    if name == "hgb":
        return HistGradientBoostingClassifier(learning_rate=0.1, max_iter=60, max_depth=3, max_leaf_nodes=8,
                                              min_samples_leaf=20, l2_regularization=1.0, early_stopping=False,
                                              random_state=seed)
    if name == "mlp":
        # the early-stopping split is stratified and must hold at least one row per class
        fraction = min(0.5, max(0.15, (len(np.unique(y)) + 1) / len(y)))
        return make_pipeline(StandardScaler(), MLPClassifier(
            hidden_layer_sizes=(64,), alpha=1.0, learning_rate_init=1e-3, max_iter=300, early_stopping=True,
            validation_fraction=fraction, n_iter_no_change=15, random_state=seed))
    raise ConfigError(f"unknown tabular model {name!r}; use one of {list(MODELS)}")


def fit_predict(names: list[str], seed: int, x: np.ndarray, y: np.ndarray, *evaluate: np.ndarray,
                fine: np.ndarray | None = None, columns: list[str] | None = None) -> list[np.ndarray]:
    """Fit each model on (x, y) (class indices) and return, per array of ``evaluate``, the models' mean
    probabilities over all 11 classes; a class absent from ``y`` gets probability 0. 'lrx' learns the fine targets
    of ``fine`` (the rows' diagnosis_full, see ``fine_targets``) and sums their probabilities back to the classes;
    ``columns`` names the feature columns."""
    out = [np.zeros((len(e), len(CLASSES))) for e in evaluate]
    for name in names:
        codes, code_class = fine_targets(y, fine) if name == "lrx" and fine is not None else (y, np.arange(len(CLASSES)))
        xf, yf = x, codes
        if name == "mlp":  # a class seen once is repeated so the stratified split can hold it out
            once = np.flatnonzero(np.isin(codes, np.flatnonzero(np.bincount(codes) == 1)))
            xf, yf = np.concatenate([x, x[once]]), np.concatenate([codes, codes[once]])
        with threadpool_limits(1):  # small fits; OpenMP threads on a busy machine only spin
            model = make_model(name, seed, yf, columns).fit(xf, yf)
        for acc, e in zip(out, evaluate):
            np.add.at(acc.T, code_class[model.classes_], model.predict_proba(e).T / len(names))
    return out


def cross_fit(cfg: Config, lesions: Lesions, build: FeatureBuilder, current: dict) -> dict:
    """Fit and predict every missing fold of ``cfg.fold_list()``, then collect the experiment. ``current`` is the
    fingerprint of the settings and data (folds made under another are refused, see ExperimentDir.session)."""
    names = parse_models(cfg.tabular_models)
    exp = ExperimentDir(cfg)
    check_outputs(cfg)
    with exp.session(current) as todo:
        return _cross_fit(cfg, exp, todo, names, lesions, build, current)


def _cross_fit(cfg: Config, exp: ExperimentDir, todo: list[int], names: list[str], lesions: Lesions,
               build: FeatureBuilder, current: dict) -> dict:
    train, test, folds = lesions.train, lesions.test, lesions.folds
    tracker = Tracker(cfg, cfg.model, job_type=cfg.model) if todo else None
    y = train["target"].to_numpy()
    for k in todo:
        start = time.time()
        held = folds == k
        encoder, x_tr, x_va, x_te = build(~held)
        columns = [f"input_{i}" for i in range(x_tr.shape[1] - encoder.n_features)] + encoder.feature_names
        oof, test_probs = fit_predict(names, cfg.seed * 1000 + k, x_tr, y[~held], x_va, x_te,
                                      fine=train["diagnosis_full"].to_numpy()[~held], columns=columns)
        encoder.save(exp.begin_fold(k, current) / "encoder.json")
        metrics = fold_metrics(train.loc[held, CLASSES].to_numpy(np.float32), oof.astype(np.float32))
        metrics.update(fold=k, models=names, n_features=int(x_tr.shape[1]), n_train=int((~held).sum()),
                       wall_time_s=time.time() - start, fingerprint=current)
        exp.write_fold(k, probs_frame(train["lesion_id"][held], oof), probs_frame(test["lesion_id"], test_probs),
                       metrics)
        print(f"[{cfg.name} fold {k}] oof macro F1 {metrics['macro_f1']:.4f} ({metrics['wall_time_s']:.1f}s)", flush=True)
        if tracker is not None:
            tracker.log({"fold": k, "macro_f1": metrics["macro_f1"], **{f"f1/{c}": v for c, v in metrics["f1"].items()}})
    result = finish(cfg, train, folds)
    if tracker is not None:
        tracker.summary({k: v for k, v in result.items() if isinstance(v, (int, float))})
        tracker.finish()
    return result


def finish(cfg: Config, train: pd.DataFrame, folds: np.ndarray) -> dict:
    """collect(), plus the honest out-of-fold macro F1 of every decision rule and the one ``cfg.decision`` picks."""
    result = ExperimentDir(cfg).collect(train)
    if not result.get("complete"):
        return result
    y = train[CLASSES].to_numpy(np.float64)
    oof = pd.read_csv(cfg.exp_dir() / "oof.csv")[CLASSES].to_numpy(np.float64)
    honest = honest_scores(y, oof, folds, method=cfg.threshold_method, n_trials=cfg.threshold_trials, seed=cfg.seed)
    rule, reason = choose_rule(cfg.decision, honest)
    result.update({f"macro_f1_{r}_honest": float(v) for r, v in honest.items()}, decision=rule)
    print(f"[{cfg.name}] oof macro F1 {result['macro_f1']:.4f} at 0.5, {honest[rule]:.4f} honest with {rule}; "
          f"{reason}", flush=True)
    return result


def run_tabular(cfg: Config) -> dict:
    """Run the metadata-only experiment ``cfg`` (complete folds are kept) and return collect()'s metrics."""
    lesions = load_lesions(cfg)
    train, test = lesions.train, lesions.test

    def build(rows: np.ndarray):
        encoder = MetadataEncoder(extended=True).fit(train[rows])
        return encoder, encoder.transform(train[rows]), encoder.transform(train[~rows]), encoder.transform(test)

    return cross_fit(cfg, lesions, build, fingerprint(cfg, data_fingerprint(lesions)))
