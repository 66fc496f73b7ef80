"""An experiment's output folder, and the lesions every kind of experiment reads.

``ExperimentDir`` owns ``<output_dir>/<name>/``: it begins a run (the folder and its resolved config), says which
folds are still to do and what is complete, writes a fold's predictions (``metrics.json`` last: it marks the fold
complete), and joins the folds into the experiment's ``oof.csv`` (training order) and ``test.csv`` (fold mean).
Image, tabular and stacking experiments all leave the same files, so blending treats them alike. No torch here, so
tabular experiments, blending and scoring stay fast to start.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .config import Config
from .data import CLASSES, load_test, load_train
from .folds import load_or_make_folds
from .io_utils import atomic_write_csv, atomic_write_json
from .scoring import fold_metrics, read_prediction_csv


def probs_frame(ids, probs: np.ndarray) -> pd.DataFrame:
    """lesion_id + the 11 class columns: the submission's CSV format."""
    df = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=CLASSES)
    df.insert(0, "lesion_id", list(ids))
    return df


@dataclass(frozen=True)
class Lesions:
    """Training lesions (with labels), test lesions, and the shared fold of every training lesion."""

    train: pd.DataFrame
    test: pd.DataFrame
    folds: np.ndarray

    def labels(self) -> np.ndarray:
        return self.train[CLASSES].to_numpy(np.float64)


def load_lesions(cfg: Config, check_images: bool = False) -> Lesions:
    """The lesions of ``cfg.data_dir`` and the fold file every experiment shares (made on first use)."""
    train = load_train(cfg.data_dir, check_images=check_images)
    test = load_test(cfg.data_dir, check_images=check_images)
    folds = load_or_make_folds(train, cfg.resolved_folds_csv(), cfg.n_folds, cfg.fold_seed)["fold"]
    return Lesions(train, test, folds.to_numpy().astype(int))


class ExperimentDir:
    """The output folder of one experiment: ``<output_dir>/<name>/`` with ``fold<k>/`` below it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.path = cfg.exp_dir()

    def fold_path(self, fold: int) -> Path:
        return self.cfg.fold_dir(fold)

    # --- starting ---------------------------------------------------------------------------------
    def begin(self) -> list[int]:
        """Make the folder, save the resolved config, and return the listed folds that are not complete."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.cfg.save(self.path / "config.json")
        return self.folds_to_do()

    def begin_fold(self, fold: int) -> Path:
        """The fold's folder with the config that trains it."""
        path = self.fold_path(fold)
        path.mkdir(parents=True, exist_ok=True)
        self.cfg.save(path / "config.json")
        return path

    # --- state --------------------------------------------------------------------------------------
    def fold_done(self, fold: int) -> bool:
        """A fold is complete once its metrics.json (always written last) exists."""
        return (self.fold_path(fold) / "metrics.json").is_file()

    def folds_to_do(self) -> list[int]:
        return [k for k in self.cfg.fold_list() if not self.fold_done(k)]

    def missing(self) -> list[str]:
        """What the experiment still lacks to be blended or stacked: each fold's metrics.json, then the joined
        oof.csv and test.csv (paths relative to its folder); empty when complete."""
        lacking = [f"fold{k}/metrics.json" for k in range(self.cfg.n_folds) if not self.fold_done(k)]
        return lacking + [f for f in ("oof.csv", "test.csv") if not (self.path / f).is_file()]

    def incomplete_reason(self) -> str | None:
        """Why the experiment cannot be used yet, with the command that finishes it; None when complete."""
        fix = f"run `bash run.sh {self.cfg.name}` to finish it"
        if not self.path.is_dir():
            return f"experiment {self.cfg.name} is not complete: no outputs at {self.path}; {fix}"
        lacking = self.missing()
        folds = [int(f[4:f.index("/")]) for f in lacking if f.startswith("fold")]
        if folds:
            return (f"experiment {self.cfg.name} is not complete: fold(s) {folds} of {self.cfg.n_folds} have no "
                    f"metrics.json under {self.path}; {fix}")
        if lacking:
            return (f"experiment {self.cfg.name} is not complete: every fold is done but {self.path} has no "
                    f"{' or '.join(lacking)}; {fix} (it joins the folds)")
        return None

    # --- writing and reading ------------------------------------------------------------------------
    def write_fold(self, fold: int, oof: pd.DataFrame, test: pd.DataFrame, metrics: dict,
                   history: pd.DataFrame | None = None) -> None:
        """A fold's out-of-fold and test predictions (and history), then its metrics.json, which completes it."""
        path = self.fold_path(fold)
        atomic_write_csv(path / "oof.csv", oof)
        atomic_write_csv(path / "test.csv", test)
        if history is not None:
            atomic_write_csv(path / "history.csv", history)
        atomic_write_json(path / "metrics.json", metrics)

    def fold_oof(self, fold: int) -> pd.DataFrame:
        """A complete fold's out-of-fold probabilities, indexed by lesion_id."""
        return pd.read_csv(self.fold_path(fold) / "oof.csv").set_index("lesion_id")[CLASSES]

    def read_probs(self, file: str, expected_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """``oof.csv`` or ``test.csv`` of the experiment through the scorer's reader (header, duplicates, values in
        [0, 1], missing or extra ids), in the order of ``expected_ids`` when given."""
        frame = read_prediction_csv(self.path / file, expected_ids=expected_ids)
        return frame if expected_ids is None else frame.loc[list(expected_ids)]

    def collect(self, train: pd.DataFrame) -> dict:
        """Join the folds' predictions into oof.csv (train order) and test.csv (mean over folds), and score them."""
        n = self.cfg.n_folds
        folds = [k for k in range(n) if self.fold_done(k)]
        if len(folds) < n:
            return {"complete": False, "missing_folds": sorted(set(range(n)) - set(folds))}
        oof = pd.concat([pd.read_csv(self.fold_path(k) / "oof.csv") for k in folds])
        oof = oof.set_index("lesion_id").reindex(train["lesion_id"]).reset_index()
        if oof[CLASSES].isna().any().any():
            raise ValueError(f"{self.path}: the folds' oof.csv files do not cover every training lesion")
        tests = [pd.read_csv(self.fold_path(k) / "test.csv").set_index("lesion_id") for k in folds]
        test = sum(t[CLASSES] for t in tests) / len(tests)
        atomic_write_csv(self.path / "oof.csv", oof)
        atomic_write_csv(self.path / "test.csv", test.reset_index())
        metrics = fold_metrics(train[CLASSES].to_numpy(np.float32), oof[CLASSES].to_numpy(np.float32))
        metrics["complete"] = True
        atomic_write_json(self.path / "oof_metrics.json", metrics)
        return metrics
