"""Stacker: complete outputs, no label leakage into its own fold, a gain over complementary inputs, clear errors.

The inputs are fake experiments written into tmp_path: noisy probabilities that know the true class of
some classes only.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.config import Config, load_config
from src.data import CLASSES, load_test, load_train
from src.folds import load_or_make_folds
from src.io_utils import atomic_write_csv, atomic_write_json
from src.runner import run_experiment
from src.stacker import StackError
from src.experiment import NOMONET, ExperimentDir, probs_frame

HALF = len(CLASSES) // 2
FOLD, OTHER = 1, 3


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def base_config(data_dir: Path, out: Path, name: str, experiment: str = "exp001", **kw) -> Config:
    return load_config(experiment, {"name": name, "data_dir": str(data_dir), "output_dir": str(out),
                                    "folds_csv": str(out / "folds.csv"), "wandb_mode": "disabled", **kw})


def fake_input(data_dir: Path, out: Path, name: str, known: np.ndarray, seed: int) -> Config:
    """A complete experiment whose probabilities point at the true class when it is in ``known`` (less so by its path
    without MONET)."""
    cfg = base_config(data_dir, out, name)
    train, test = load_train(data_dir, check_images=False), load_test(data_dir, check_images=False)
    folds = load_or_make_folds(train, cfg.resolved_folds_csv(), cfg.n_folds, cfg.fold_seed)["fold"].to_numpy()
    rng = np.random.default_rng(seed)

    def probs(target: np.ndarray | None, n: int, signal: float = 3.0) -> np.ndarray:
        z = rng.normal(0, 1, (n, len(CLASSES)))
        if target is not None:
            hit = np.isin(target, known)
            z[np.flatnonzero(hit), target[hit]] += signal
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    target = train["target"].to_numpy()
    for k in range(cfg.n_folds):
        held = folds == k
        atomic_write_csv(cfg.fold_dir(k) / "oof.csv", probs_frame(train["lesion_id"][held], probs(target[held], held.sum())))
        atomic_write_csv(cfg.fold_dir(k) / NOMONET, probs_frame(train["lesion_id"][held],
                                                                 probs(target[held], held.sum(), 1.5)))
        atomic_write_csv(cfg.fold_dir(k) / "test.csv", probs_frame(test["lesion_id"], probs(None, len(test))))
        atomic_write_json(cfg.fold_dir(k) / "metrics.json", {"macro_f1": 0.0})
    cfg.save(cfg.exp_dir() / "config.json")
    assert ExperimentDir(cfg).collect(train)["complete"]
    return cfg


@pytest.fixture(scope="module")
def stacked(mini_data, tmp_path_factory):
    """Two complementary fake inputs and a logistic-regression stacker over them, all folds: (out, config, result)."""
    out = tmp_path_factory.mktemp("stack")
    fake_input(mini_data, out, "fakeA", np.arange(HALF), seed=1)
    fake_input(mini_data, out, "fakeB", np.arange(HALF, len(CLASSES)), seed=2)
    cfg = base_config(mini_data, out, "stack", "stack001", stack_inputs="fakeA,fakeB", tabular_models="logreg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        return out, cfg, run_experiment(cfg)


def log_loss(path: Path, train: pd.DataFrame) -> float:
    p = pd.read_csv(path).set_index("lesion_id").loc[train["lesion_id"], CLASSES].to_numpy()
    return float(-np.log(np.clip(p[np.arange(len(p)), train["target"].to_numpy()], 1e-7, 1)).mean())


def test_outputs_complete(mini_data, stacked):
    out, cfg, result = stacked
    assert result["complete"]
    train, test = load_train(mini_data, check_images=False), load_test(mini_data, check_images=False)
    for k in range(cfg.n_folds):
        assert ExperimentDir(cfg).fold_done(k)
        assert all((cfg.fold_dir(k) / f).is_file() for f in ("oof.csv", NOMONET, "test.csv", "features.json",
                                                             "config.json", "models.json", "models.skops"))
    oof, tst = pd.read_csv(cfg.exp_dir() / "oof.csv"), pd.read_csv(cfg.exp_dir() / "test.csv")
    blind = pd.read_csv(cfg.exp_dir() / NOMONET)
    assert oof["lesion_id"].tolist() == train["lesion_id"].tolist() == blind["lesion_id"].tolist()
    assert sorted(tst["lesion_id"]) == sorted(test["lesion_id"])
    assert np.abs(blind[CLASSES].to_numpy() - oof[CLASSES].to_numpy()).max() > 1e-3
    for frame in (oof, tst, blind):
        np.testing.assert_allclose(frame[CLASSES].to_numpy().sum(1), 1.0, atol=1e-6)


def test_beats_complementary_inputs_on_log_loss(mini_data, stacked):
    out, cfg, _ = stacked
    train = load_train(mini_data, check_images=False)
    inputs = [log_loss(out / name / "oof.csv", train) for name in ("fakeA", "fakeB")]
    assert log_loss(cfg.exp_dir() / "oof.csv", train) < min(inputs)


def relabel(data_dir: Path, dest: Path, lesions: set[str]) -> Path:
    """A copy of the CSVs of ``data_dir`` in which every lesion of ``lesions`` has the next class."""
    dest.mkdir()
    for csv in data_dir.glob("*.csv"):
        shutil.copy(csv, dest / csv.name)
    gt_path = dest / "MILK10k_Training_GroundTruth.csv"
    gt = pd.read_csv(gt_path, dtype=str)
    rows = gt["lesion_id"].isin(lesions).to_numpy()
    target = gt[CLASSES].astype(float).to_numpy().argmax(1)
    gt.loc[rows, CLASSES] = np.where(np.eye(len(CLASSES))[(target[rows] + 1) % len(CLASSES)] > 0, "1.0", "0.0")
    gt.to_csv(gt_path, index=False)
    return dest


@pytest.mark.parametrize("models", ["logreg", pytest.param("hgb", marks=pytest.mark.slow)])
def test_fold_predictions_never_see_their_own_labels(mini_data, stacked, tmp_path, models):
    out, cfg, _ = stacked
    folds = pd.read_csv(cfg.resolved_folds_csv())
    reference = cfg.replace(name=f"ref_{models}", tabular_models=models)
    run_experiment(reference, folds=str(FOLD))
    for changed, same in ((FOLD, True), (OTHER, False)):
        data = relabel(mini_data, tmp_path / f"labels{changed}", set(folds.loc[folds["fold"] == changed, "lesion_id"]))
        run = reference.replace(name=f"relabel{changed}_{models}", data_dir=str(data))
        run_experiment(run, folds=str(FOLD))
        for file in ("oof.csv", NOMONET):     # the path without MONET never sees its fold's labels either
            expected = pd.read_csv(reference.fold_dir(FOLD) / file)
            got = pd.read_csv(run.fold_dir(FOLD) / file)
            assert got["lesion_id"].tolist() == expected["lesion_id"].tolist()
            if same:
                pd.testing.assert_frame_equal(got, expected)
            else:
                assert np.abs(got[CLASSES].to_numpy() - expected[CLASSES].to_numpy()).max() > 1e-3


def test_missing_incomplete_or_foreign_inputs_are_named(mini_data, stacked, tmp_path):
    out, cfg, _ = stacked
    with pytest.raises(StackError, match="'nothere' is not complete"):
        run_experiment(cfg.replace(name="s1", stack_inputs="fakeA,nothere"))
    shutil.copytree(out / "fakeA", out / "fakeC")
    (out / "fakeC" / "fold4" / "metrics.json").unlink()
    with pytest.raises(StackError, match=r"'fakeC' is not complete: .*fold4/metrics\.json"):
        run_experiment(cfg.replace(name="s2", stack_inputs="fakeA,fakeC"))
    shutil.copytree(out / "fakeA", out / "fakeD")
    saved = json.loads((out / "fakeD" / "config.json").read_text())
    (out / "fakeD" / "config.json").write_text(json.dumps({**saved, "fold_seed": 7}))
    with pytest.raises(StackError, match="'fakeD'.*fold_seed=7"):
        run_experiment(cfg.replace(name="s3", stack_inputs="fakeD"))
    shutil.copytree(out / "fakeA", out / "fakeF")
    (out / "fakeF" / NOMONET).unlink()
    with pytest.raises(StackError, match=r"'fakeF': .*oof_nomonet\.csv is missing .* retrain=true"):
        run_experiment(cfg.replace(name="s5", stack_inputs="fakeF"))
    assert not (out / "s1").joinpath("fold0").exists()


def test_malformed_input_names_line_and_column(mini_data, stacked):
    out, cfg, _ = stacked
    shutil.copytree(out / "fakeB", out / "fakeE")
    oof = pd.read_csv(out / "fakeE" / "oof.csv")
    oof.loc[4, "MEL"] = 1.5
    oof.to_csv(out / "fakeE" / "oof.csv", index=False)
    with pytest.raises(StackError, match=r"fakeE/oof\.csv: line 6, column MEL"):
        run_experiment(cfg.replace(name="s4", stack_inputs="fakeE"))
