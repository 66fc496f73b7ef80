"""Tabular models: scikit-learn classifiers on the lesion metadata, no images (exp000), and the recipe they share with
the stacker (src/stacker.py).

Per fold k, the models are fitted on the other folds' lesions (the recipe's metadata features, fitted on those
lesions only) and predict fold k and the test set; the fold folders hold the same files as an image experiment's
(oof.csv, oof_nomonet.csv, test.csv, features.json, config.json, metrics.json last), so blending, stacking and
submission treat both alike. The same models are fitted a second time on the same lesions with every MONET score
removed: the path a lesion without MONET scores takes (src/features.py: ``has_monet``). Both are kept in
models.skops, described by models.json (``save_models``).

Every model is an unweighted softmax classifier: its probabilities estimate the class frequencies, which the
per-class thresholds applied later need. ``tabular_models`` (a key of the experiments that use this recipe,
``TABULAR_KEYS``) lists the models whose probabilities are averaged: 'lrx', 'logreg', 'hgb', 'mlp'.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
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

from .config import Config, ConfigError, key
from .settings import keys_of
from .data import CLASSES
from .experiment import ExperimentDir, Lesions, data_fingerprint, fingerprint, load_lesions, probs_frame
from .features import MetadataFeatures, blank_monet
from .interactions import InteractionFeatures
from .io_utils import atomic_write_json
from .scoring import fold_metrics
from .tracking import Tracker, fold_scores

MODELS = ("lrx", "logreg", "hgb", "mlp")
FINE_MIN = 40  # lrx: a diagnosis_full with at least this many training lesions is a target class of its own



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
    the feature columns' names (needed by 'lrx'). 'probe' and 'probe_metadata' (not choices of ``tabular_models``)
    are the model of an image fold's path without MONET, with and without the network's embeddings (src/train.py):
    on exp001 with signal-free images, embeddings and metadata, its stronger regularisation scored 0.2298 honest
    macro F1 without MONET against 0.2249 for 'logreg'."""
    if name == "lrx":
        return make_pipeline(InteractionFeatures(names or []), StandardScaler(),
                             LogisticRegression(C=0.01, max_iter=5000))
    if name == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=5000))
    if name in ("probe", "probe_metadata"):  # an image fold's model without MONET (src/train.py: PROBES)
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=5000))
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
                fine: np.ndarray | None = None, columns: list[str] | None = None,
                fitted: list | None = None) -> list[np.ndarray]:
    """Fit each model on (x, y) (class indices) and return, per array of ``evaluate``, the models' mean
    probabilities over all 11 classes; a class absent from ``y`` gets probability 0. 'lrx' learns the fine targets
    of ``fine`` (the rows' diagnosis_full, see ``fine_targets``) and sums their probabilities back to the classes;
    ``columns`` names the feature columns. ``fitted``: a list that receives (name, fitted model, class of each of
    its targets) per model, for ``save_models``."""
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
        if fitted is not None:
            fitted.append((name, model, code_class))
    return out


PATHS = ("with_monet", "without_monet")  # a fold's models for lesions with all 14 MONET scores, and for the rest
MODELS_FILE = "models.skops"
MODELS_VERSION = 2  # 2: the fitted models in models.skops (src/sklearn_io.py), both paths


def save_models(fdir: Path, fitted: dict[str, list]) -> None:
    """The fold's models of each path (``fit_predict(..., fitted=)``): the fitted objects in models.skops
    (src/sklearn_io.py: no pickle, read back with an explicit list of trusted types), and in models.json what
    each is (its name, the class of each of its targets)."""
    from . import sklearn_io

    sklearn_io.dump({path: [model for _, model, _ in models] for path, models in fitted.items()}, fdir / MODELS_FILE)
    atomic_write_json(fdir / "models.json", {
        "version": MODELS_VERSION, "file": MODELS_FILE,
        **{path: [{"name": name, "code_class": np.asarray(cc).tolist()} for name, _, cc in models]
           for path, models in fitted.items()}})


def load_models(fdir: Path, paths: tuple[str, ...] = PATHS) -> dict[str, list[tuple[str, BaseEstimator, np.ndarray]]]:
    """What ``save_models`` wrote: per path of ``paths``, (name, fitted model, class of each target) of every model.
    A fold written by another version, without one of ``paths``, or whose files do not match, raises a ValueError
    naming the folder."""
    from . import sklearn_io

    try:
        meta = json.loads((fdir / "models.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("version") != MODELS_VERSION:
            raise ValueError(f"{fdir}: written by another version of the project (models version "
                             f"{meta.get('version') if isinstance(meta, dict) else 1}, this one {MODELS_VERSION}); "
                             "rerun the experiment with retrain=true")
        fitted = sklearn_io.load(fdir / MODELS_FILE)
        out = {}
        for path in paths:
            if len(meta[path]) != len(fitted[path]) or not meta[path]:
                raise ValueError(f"{fdir}: models.json and {MODELS_FILE} disagree on the {path} models")
            out[path] = [(d["name"], m, np.asarray(d["code_class"], dtype=np.int64))
                         for d, m in zip(meta[path], fitted[path])]
        return out
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{fdir}: not a fold's models ({type(exc).__name__}: {exc})") from None


def predict_saved(models: list[tuple[str, BaseEstimator, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """The probabilities over the 11 classes that one path's models (``load_models``) give ``x``, averaged exactly
    as ``fit_predict`` averages them."""
    acc = np.zeros((len(x), len(CLASSES)))
    for _, model, code_class in models:
        np.add.at(acc.T, code_class[model.classes_], model.predict_proba(x).T / len(models))
    return acc


TABULAR_KEYS = {
    "tabular_models": key("logreg,hgb,mlp", "scikit-learn models whose probabilities are averaged: a comma list of "
                          "'lrx' (logistic regression on interaction features and fine-grained targets), 'logreg', "
                          "'hgb', 'mlp'", results=True, text=True),
}


@dataclass(frozen=True)
class TabularData:
    """The lesions, the fingerprint of what the folds are made from (``data_print``, taken once), and per training and
    test lesion the extra input columns (a stacker's input logits; ``extra_train_blind``: those of the training
    lesions by the inputs' paths without MONET)."""

    lesions: Lesions
    data_print: dict
    extra_train: np.ndarray | None = None
    extra_test: np.ndarray | None = None
    extra_train_blind: np.ndarray | None = None


def extended_features(cfg: Config) -> MetadataFeatures:
    return MetadataFeatures("extended")


@dataclass(frozen=True)
class TabularRecipe:
    """A metadata-only experiment: ``features(cfg)`` (unfitted MetadataFeatures) and the models of
    ``cfg.tabular_models``, fitted per fold on the other folds' lesions."""

    features: Callable = extended_features

    images = False
    kind = "tabular"

    def key_groups(self) -> dict[str, dict]:
        """The settings of an experiment of this recipe, by the part that reads them."""
        return {"features": keys_of(self.features), "tabular": TABULAR_KEYS}

    def data_print(self, cfg: Config, lesions: Lesions) -> dict:
        return data_fingerprint(lesions)

    def check(self, cfg: Config) -> None:
        parse_models(cfg.tabular_models)  # the output folders are checked by the runner before anything else

    def check_resume(self, cfg: Config, todo: list[int], retrain: bool) -> None:
        return None

    def prepare(self, cfg: Config, lesions: Lesions | None = None) -> TabularData:
        lesions = lesions if lesions is not None else load_lesions(cfg)
        return TabularData(lesions, self.data_print(cfg, lesions))

    def train_fold(self, cfg: Config, fold: int, data: TabularData, dist=None) -> dict:
        """Fit the fold's models on the other folds' lesions and write its predictions and metrics; fit the same
        models again on those lesions with every MONET score removed (the path without MONET, whose predictions of
        the fold's lesions, with their MONET scores removed too, are its oof_nomonet.csv)."""
        start = time.time()
        train, test, folds = data.lesions.train, data.lesions.test, data.lesions.folds
        held = folds == fold
        features = self.features(cfg).fit(train[~held])

        def x(rows: pd.DataFrame, extra: np.ndarray | None, where: np.ndarray | None = None) -> np.ndarray:
            own = features.transform(rows if where is None else rows[where])
            return own if extra is None else np.hstack([extra if where is None else extra[where], own])

        names = parse_models(cfg.tabular_models)
        seed, y_tr, fine = cfg.seed * 1000 + fold, train["target"].to_numpy()[~held], \
            train["diagnosis_full"].to_numpy()[~held]
        x_tr = x(train, data.extra_train, ~held)
        columns = [f"input_{i}" for i in range(x_tr.shape[1] - len(features.feature_names))] + features.feature_names
        fitted: dict[str, list] = {path: [] for path in PATHS}
        oof, test_probs = fit_predict(names, seed, x_tr, y_tr, x(train, data.extra_train, held),
                                      x(test, data.extra_test), fine=fine, columns=columns,
                                      fitted=fitted["with_monet"])
        blind = blank_monet(train)
        oof_blind, = fit_predict(names, seed, x(blind, data.extra_train_blind, ~held), y_tr,
                                 x(blind, data.extra_train_blind, held), fine=fine, columns=columns,
                                 fitted=fitted["without_monet"])
        current = fingerprint(cfg, data.data_print)
        exp = ExperimentDir(cfg)
        fdir = exp.begin_fold(fold, current)
        features.save_fitted(fdir / "features.json")
        save_models(fdir, fitted)
        metrics = fold_metrics(train.loc[held, CLASSES].to_numpy(np.float32), oof.astype(np.float32))
        metrics.update(fold=fold, models=names, n_features=int(x_tr.shape[1]), n_train=int((~held).sum()),
                       wall_time_s=time.time() - start, fingerprint=current)
        exp.write_fold(fold, probs_frame(train["lesion_id"][held], oof), probs_frame(test["lesion_id"], test_probs),
                       metrics, oof_nomonet=probs_frame(train["lesion_id"][held], oof_blind))
        print(f"[{cfg.name} fold {fold}] oof macro F1 {metrics['macro_f1']:.4f} ({metrics['wall_time_s']:.1f}s)",
              flush=True)
        tracker = Tracker(cfg, f"fold{fold}", kind=self.kind)
        tracker.log({"fold": fold, **fold_scores(metrics)})
        tracker.finish()
        return metrics
