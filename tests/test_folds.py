"""Lesion-level stratified folds and the shared fold CSV.

One test reads tests/fixtures/milk10k_sample (MILK10k, "MILK study team", CC-BY-NC).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import src.folds as folds_mod
from src.data import CLASSES, DataError, load_train
from src.folds import load_or_make_folds, make_folds

FIXTURES = Path(__file__).parent / "fixtures" / "milk10k_sample"


def synthetic_train(counts: list[int], seed: int = 0) -> pd.DataFrame:
    """One-hot lesions with the given count per class, in shuffled order."""
    labels = np.repeat(np.arange(len(CLASSES)), counts)
    np.random.default_rng(seed).shuffle(labels)
    df = pd.DataFrame(np.eye(len(CLASSES))[labels], columns=CLASSES)
    df.insert(0, "lesion_id", [f"IL_{i:07d}" for i in np.random.default_rng(seed + 1).permutation(len(labels))])
    return df


TRAIN = synthetic_train([60, 40, 3, 20, 5, 7, 2, 30, 25, 10, 4])


def check_stratified(train: pd.DataFrame, folds: pd.DataFrame, n_folds: int) -> None:
    assert list(folds.columns) == ["lesion_id", "fold"] and folds["fold"].dtype.kind == "i"
    assert folds["lesion_id"].tolist() == train["lesion_id"].tolist()
    assert sorted(folds["fold"].unique()) == list(range(n_folds))
    per_fold = pd.DataFrame(train[CLASSES].to_numpy(), columns=CLASSES).groupby(folds["fold"].to_numpy()).sum()
    for c in CLASSES:
        total = int(train[c].sum())
        if total >= n_folds:
            assert (per_fold[c] >= 1).all(), f"{c} ({total} lesions) missing from a fold"
        else:
            assert per_fold[c].max() == 1, f"{c} ({total} lesions) doubled up in a fold"
        assert per_fold[c].max() - per_fold[c].min() <= 1 + total // 10, c
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 3


@pytest.mark.parametrize("n_folds", [3, 5])
def test_every_lesion_once_and_classes_spread(n_folds):
    check_stratified(TRAIN, make_folds(TRAIN, n_folds, seed=42), n_folds)


def test_real_ground_truth_sample():
    train = load_train(FIXTURES, check_images=False)
    assert len(train) == 328
    check_stratified(train, make_folds(train, 5, seed=42), 5)


def test_seeded_and_shuffled():
    a = make_folds(TRAIN, 5, seed=1)
    pd.testing.assert_frame_equal(a, make_folds(TRAIN, 5, seed=1))
    assert (a["fold"] != make_folds(TRAIN, 5, seed=2)["fold"]).any()


def test_bad_tables_are_refused():
    with pytest.raises(DataError, match="MEL"):
        make_folds(TRAIN.drop(columns="MEL"), 5, 0)
    with pytest.raises(DataError, match="more than once"):
        make_folds(pd.concat([TRAIN, TRAIN.iloc[:1]]), 5, 0)
    with pytest.raises(DataError, match="n_folds"):
        make_folds(TRAIN, 1, 0)


def test_load_or_make_writes_once_then_reads(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "folds.csv"
    made = load_or_make_folds(TRAIN, path, 5, seed=7)
    pd.testing.assert_frame_equal(made, make_folds(TRAIN, 5, seed=7))
    assert [p.name for p in path.parent.iterdir()] == ["folds.csv"]
    text, mtime = path.read_text(), path.stat().st_mtime_ns

    def no_new_split(*args, **kwargs):
        raise AssertionError("an existing fold file must be read, not remade")

    monkeypatch.setattr(folds_mod, "make_folds", no_new_split)
    shuffled = TRAIN.sample(frac=1.0, random_state=3).reset_index(drop=True)
    read = load_or_make_folds(shuffled, path, 5, seed=999)  # the file wins over the seed
    assert read["lesion_id"].tolist() == shuffled["lesion_id"].tolist()
    assert read["fold"].dtype.kind == "i"
    expected = made.set_index("lesion_id")["fold"]
    np.testing.assert_array_equal(read["fold"], expected.loc[shuffled["lesion_id"]].to_numpy())
    assert path.read_text() == text and path.stat().st_mtime_ns == mtime


def test_mismatched_file_is_refused(tmp_path):
    path = tmp_path / "folds.csv"
    load_or_make_folds(TRAIN, path, 5, seed=0)
    text = path.read_text()
    dropped = TRAIN["lesion_id"].iloc[10]
    with pytest.raises(DataError, match=rf"folds\.csv.*{dropped}.*delete it.*folds_csv"):
        load_or_make_folds(TRAIN.drop(index=10), path, 5, seed=0)
    extra = pd.concat([TRAIN, TRAIN.iloc[:1].assign(lesion_id="IL_9999999")], ignore_index=True)
    with pytest.raises(DataError, match=r"folds\.csv.*IL_9999999"):
        load_or_make_folds(extra, path, 5, seed=0)
    with pytest.raises(DataError, match=r"folds\.csv.*n_folds=4"):
        load_or_make_folds(TRAIN, path, 4, seed=0)
    assert path.read_text() == text


def test_malformed_file_names_line_and_column(tmp_path):
    path = tmp_path / "folds.csv"
    rows = make_folds(TRAIN, 5, 0).astype({"fold": str})
    rows.loc[4, "fold"] = "two"
    rows.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"folds\.csv: line 6: column 'fold'.*'two'"):
        load_or_make_folds(TRAIN, path, 5, 0)
    rows[["lesion_id"]].to_csv(path, index=False)
    with pytest.raises(DataError, match=r"line 1: missing column 'fold'"):
        load_or_make_folds(TRAIN, path, 5, 0)


@pytest.mark.parametrize("damage", ["cut mid-file", "cut in the header", "empty", "binary", "a folder"])
def test_a_damaged_or_truncated_fold_file_says_to_delete_it(tmp_path, damage):
    path = tmp_path / "folds.csv"
    made = load_or_make_folds(TRAIN, path, 5, seed=3)
    raw = path.read_bytes()
    if damage == "a folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes({"cut mid-file": raw[: len(raw) // 2 - 3], "cut in the header": raw[:8], "empty": b"",
                          "binary": bytes(range(128, 256)) * 4}[damage])
    with pytest.raises(DataError, match=rf"^{path}: .*delete it and rerun to make it again") as err:
        load_or_make_folds(TRAIN, path, 5, seed=3)
    assert "\n" not in str(err.value)
    path.rmdir() if path.is_dir() else path.unlink()
    pd.testing.assert_frame_equal(load_or_make_folds(TRAIN, path, 5, seed=3), made)   # remade identically
