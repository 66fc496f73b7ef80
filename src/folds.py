"""Lesion-level cross-validation folds, stratified over the 11 classes and shared by every experiment."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from .data import CLASSES, DataError
from .io_utils import atomic_write_csv


def make_folds(train: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """Seeded, shuffled multilabel-stratified K-fold; returns ``lesion_id, fold`` in ``train``'s order.

    Iterative stratification places the rarest class first, so a class with at least ``n_folds``
    lesions appears in every fold and a rarer one lands in distinct folds (at most one per fold).
    """
    missing = [c for c in ["lesion_id", *CLASSES] if c not in train.columns]
    if missing:
        raise DataError(f"make_folds: training table lacks column(s) {missing}")
    dup = train["lesion_id"][train["lesion_id"].duplicated()]
    if len(dup):
        raise DataError(f"make_folds: lesion_id {dup.iloc[0]!r} appears more than once")
    if not 2 <= n_folds <= len(train):
        raise DataError(f"make_folds: n_folds={n_folds} needs 2 <= n_folds <= {len(train)} lesions")
    y = train[CLASSES].to_numpy(dtype=np.float64)
    fold = np.full(len(train), -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(np.zeros((len(train), 1)), y)):
        fold[val] = k
    assert (fold >= 0).all()
    return pd.DataFrame({"lesion_id": train["lesion_id"].to_numpy(), "fold": fold})


DAMAGED = ("the fold file is damaged or truncated: delete it and rerun to make it again (the same seed and data "
           "give the same folds), or point folds_csv at a good copy")


def _read_folds(path: Path) -> pd.DataFrame:
    """The fold CSV at ``path``; anything unreadable or malformed is a one-line DataError naming the file, the line
    where it can, and what to do."""
    try:
        df = pd.read_csv(path, dtype={"lesion_id": str, "fold": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: cannot read the folds CSV ({err}); {DAMAGED}") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the folds CSV ({err.strerror or err}); {DAMAGED}") from None
    for col in ("lesion_id", "fold"):
        if col not in df.columns:
            raise DataError(f"{path}: line 1: missing column {col!r} (expected lesion_id,fold); {DAMAGED}")
    values = pd.to_numeric(df["fold"], errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy() | (values % 1 != 0).to_numpy())
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: line {i + 2}: column 'fold' must be an integer, got {df['fold'].iloc[i]!r}; "
                        f"{DAMAGED}")
    dup = np.flatnonzero(df["lesion_id"].duplicated().to_numpy())
    if dup.size:
        i = int(dup[0])
        raise DataError(f"{path}: line {i + 2}: column 'lesion_id': {df['lesion_id'].iloc[i]!r} appears twice; "
                        f"{DAMAGED}")
    return pd.DataFrame({"lesion_id": df["lesion_id"], "fold": values.astype(np.int64)})


def load_or_make_folds(train: pd.DataFrame, path: str | os.PathLike, n_folds: int, seed: int) -> pd.DataFrame:
    """Read the fold CSV at ``path`` if it exists (never rewriting it), else make and write it.

    An existing file must hold exactly ``train``'s lesions and folds ``0..n_folds-1``; otherwise a
    DataError says what differs.  The result is aligned to ``train``'s row order.
    """
    path = Path(path)
    if not path.exists():
        folds = make_folds(train, n_folds, seed)
        atomic_write_csv(path, folds)
        return folds
    saved = _read_folds(path)
    fix = "delete it to make new folds, or point folds_csv at a file that matches this data"
    file_ids, train_ids = set(saved["lesion_id"]), set(train["lesion_id"])
    if file_ids != train_ids:
        only_file, only_train = sorted(file_ids - train_ids), sorted(train_ids - file_ids)
        example = (f"{len(only_train)} training lesion(s) are missing from it, e.g. {only_train[0]!r}" if only_train
                   else f"it lists {len(only_file)} lesion(s) not in the training data, e.g. {only_file[0]!r}")
        raise DataError(f"{path}: the fold file does not match the training lesions: {example}; {fix}")
    found = sorted(saved["fold"].unique().tolist())
    if found != list(range(n_folds)):
        raise DataError(f"{path}: the fold file has folds {found} but n_folds={n_folds} was asked for; {fix}")
    fold = saved.set_index("lesion_id")["fold"].reindex(train["lesion_id"].to_numpy()).to_numpy()
    return pd.DataFrame({"lesion_id": train["lesion_id"].to_numpy(), "fold": fold.astype(np.int64)})
