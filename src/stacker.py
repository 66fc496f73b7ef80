"""Second-stage stacker: a model on the inputs' out-of-fold probabilities plus metadata.

Features of a lesion: the logits of every input experiment's probabilities (``cfg.stack_inputs``,
read from ``<output_dir>/<input>/oof.csv`` for training lesions and ``test.csv`` for test lesions)
and the base metadata features.  Fold k's model is fitted on the other folds' rows only,
so the stacker's out-of-fold predictions never see their own fold's labels; it writes the same files
as every experiment, so it can itself be blended, thresholded and submitted. Its path without MONET is fitted on the inputs'
out-of-fold predictions without MONET (their oof_nomonet.csv) and the metadata with every MONET score removed, as a
lesion without MONET scores reaches it.  The models are those of
src/tabular.py, chosen with ``cfg.tabular_models`` ('logreg', 'hgb' or a comma list averaged). ``StackRecipe``
is the tabular recipe with the inputs' logits as extra columns; ``STACK_KEYS`` its keys.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .config import Config, ConfigError, key
from .experiment import NOMONET, ExperimentDir, Lesions, data_fingerprint, load_lesions
from .features import MetadataFeatures
from .scoring import SubmissionError, read_prediction_csv
from .tabular import TabularData, TabularRecipe

LOGIT_CLIP = 1e-6
SAME_FOLDS = ("n_folds", "fold_seed", "folds_csv")


class StackError(ValueError):
    """A stacker input that cannot be used: incomplete, built on other folds, or malformed."""


def input_names(cfg: Config) -> list[str]:
    names = [s.strip() for s in cfg.stack_inputs.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"{cfg.name}: stack_inputs is empty; name the experiments to stack, e.g. stack_inputs=exp000,exp001")
    if cfg.name in names or len(set(names)) < len(names):
        raise ConfigError(f"{cfg.name}: stack_inputs={cfg.stack_inputs!r} repeats an experiment or names the stacker itself")
    return names


def read_probs(path: Path, ids: pd.Series) -> np.ndarray:
    """Probabilities (len(ids), 11) of ``path`` (lesion_id + CLASSES) in the order of ``ids``, read and checked
    by the scorer's own reader (header, duplicates, values in [0, 1], missing or extra ids)."""
    try:
        frame = read_prediction_csv(path, expected_ids=list(ids))
    except SubmissionError as err:
        raise StackError(str(err)) from None
    return frame.loc[list(ids)].to_numpy()


def _check_input(cfg: Config, name: str) -> Path:
    """The folder of a complete input experiment built on the stacker's folds, with the predictions of its path
    without MONET."""
    folder = Path(cfg.output_dir) / name
    lacking = ExperimentDir(cfg.replace(name=name)).missing()
    if lacking:
        raise StackError(f"stack input {name!r} is not complete: {folder} lacks {', '.join(lacking)}; "
                         f"run experiment {name} (all {cfg.n_folds} folds) first")
    saved = folder / "config.json"
    if saved.is_file():
        theirs = json.loads(saved.read_text(encoding="utf-8"))
        for k in SAME_FOLDS:
            if k in theirs and theirs[k] != getattr(cfg, k):
                raise StackError(f"stack input {name!r}: {saved} has {k}={theirs[k]!r} but the stacker uses "
                                 f"{getattr(cfg, k)!r}; stacked experiments must share one fold split")
    if not (folder / NOMONET).is_file():
        raise StackError(f"stack input {name!r}: {folder / NOMONET} is missing (the predictions of its path without "
                         f"MONET); rerun experiment {name} with retrain=true")
    return folder


INPUT_FILES = ("oof.csv", "test.csv", NOMONET)


def load_inputs(cfg: Config, train: pd.DataFrame, test: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of every input's out-of-fold (train order), test, and out-of-fold without MONET probabilities, inputs
    side by side."""
    parts: dict[str, list] = {f: [] for f in INPUT_FILES}
    for name in input_names(cfg):
        folder = _check_input(cfg, name)
        for f in INPUT_FILES:
            parts[f].append(read_probs(folder / f, (test if f == "test.csv" else train)["lesion_id"]))

    def logit(probs: list[np.ndarray]) -> np.ndarray:
        p = np.clip(np.hstack(probs), LOGIT_CLIP, 1 - LOGIT_CLIP)
        return np.log(p / (1 - p))

    return tuple(logit(parts[f]) for f in INPUT_FILES)


STACK_KEYS = {
    "stack_inputs": key("", "comma list of experiments whose out-of-fold and test probabilities the stacker uses",
                        results=True, text=True),
}


def base_features(cfg: Config) -> MetadataFeatures:
    return MetadataFeatures("base")


@dataclass(frozen=True)
class StackRecipe(TabularRecipe):
    """The tabular recipe over the logits of ``stack_inputs``' predictions plus the base metadata features."""

    features: Callable = base_features
    kind = "stack"

    def key_groups(self) -> dict[str, dict]:
        return {**super().key_groups(), "stacking": STACK_KEYS}

    def data_print(self, cfg: Config, lesions: Lesions) -> dict:
        files = [Path(cfg.output_dir) / n / f for n in input_names(cfg) for f in INPUT_FILES]
        for name in input_names(cfg):
            _check_input(cfg, name)
        return data_fingerprint(lesions, inputs=files)

    def prepare(self, cfg: Config, lesions: Lesions | None = None) -> TabularData:
        lesions = lesions if lesions is not None else load_lesions(cfg)
        z_train, z_test, z_blind = load_inputs(cfg, lesions.train, lesions.test)
        return TabularData(lesions, self.data_print(cfg, lesions), z_train, z_test, z_blind)
