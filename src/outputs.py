"""What every experiment leaves on disk, and how the folds' files become the experiment's (no torch here,
so metadata-only experiments, blending and scoring stay fast to start)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .config import Config
from .data import CLASSES
from .io_utils import atomic_write_csv, atomic_write_json
from .scoring import f1_per_class


def probs_frame(ids, probs: np.ndarray) -> pd.DataFrame:
    """lesion_id + the 11 class columns: the submission's CSV format."""
    df = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=CLASSES)
    df.insert(0, "lesion_id", list(ids))
    return df


def fold_done(cfg: Config, fold: int) -> bool:
    """A fold is complete once its metrics.json (always written last) exists."""
    return (cfg.fold_dir(fold) / "metrics.json").is_file()


def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary log-loss over every row and class."""
    q = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def missing_outputs(cfg: Config) -> list[str]:
    """What an experiment still lacks to be blended or stacked: each fold's metrics.json, then the joined
    oof.csv and test.csv (paths relative to its folder); empty when complete."""
    lacking = [f"fold{k}/metrics.json" for k in range(cfg.n_folds) if not fold_done(cfg, k)]
    return lacking + [f for f in ("oof.csv", "test.csv") if not (cfg.exp_dir() / f).is_file()]


def fold_metrics(y: np.ndarray, probs: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    per_class = f1_per_class(y, probs)
    aucs = {}
    for i, c in enumerate(CLASSES):
        if 0 < y[:, i].sum() < len(y):
            aucs[c] = float(roc_auc_score(y[:, i], probs[:, i]))
    return {"macro_f1": float(per_class.mean()), "f1": dict(zip(CLASSES, map(float, per_class))),
            "auc": aucs, "auc_macro": float(np.mean(list(aucs.values()))) if aucs else None,
            "accuracy": float((probs.argmax(1) == y.argmax(1)).mean()), "loss": log_loss(y, probs),
            "n": int(len(y))}


def collect(cfg: Config, train: pd.DataFrame) -> dict:
    """Join the folds' predictions into <exp>/oof.csv (train order) and <exp>/test.csv (mean over folds)."""
    folds = [k for k in range(cfg.n_folds) if fold_done(cfg, k)]
    if len(folds) < cfg.n_folds:
        missing = sorted(set(range(cfg.n_folds)) - set(folds))
        return {"complete": False, "missing_folds": missing}
    oof = pd.concat([pd.read_csv(cfg.fold_dir(k) / "oof.csv") for k in folds])
    oof = oof.set_index("lesion_id").reindex(train["lesion_id"]).reset_index()
    if oof[CLASSES].isna().any().any():
        raise ValueError(f"{cfg.exp_dir()}: the folds' oof.csv files do not cover every training lesion")
    tests = [pd.read_csv(cfg.fold_dir(k) / "test.csv").set_index("lesion_id") for k in folds]
    test = sum(t[CLASSES] for t in tests) / len(tests)
    atomic_write_csv(cfg.exp_dir() / "oof.csv", oof)
    atomic_write_csv(cfg.exp_dir() / "test.csv", test.reset_index())
    metrics = fold_metrics(train[CLASSES].to_numpy(np.float32), oof[CLASSES].to_numpy(np.float32))
    metrics["complete"] = True
    atomic_write_json(cfg.exp_dir() / "oof_metrics.json", metrics)
    return metrics
