"""What the per-fold training loop decides, pinned with fixed expected values: which rows fit the metadata
transform, when early stopping ends a fold, which epoch's weights best.pt keeps, how many epochs a resumed fold
trains, and that a CSV write failing half-way leaves the previous file whole and no temporary file behind.

The validation scores are scripted (``script_scores``), so the epochs a fold runs and the epoch it keeps do not
depend on what the tiny network happens to learn. Everything this file needs from the loop's internals is in the
helpers of the first section, so a refactor of src/train.py is followed there alone.
"""
from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import src.train as train_module
from src.batches import Prepared, prepare
from src.config import experiment_recipe, load_config
from src.data import CLASSES
from src.experiment import ExperimentDir, probs_frame
from src.features import MetadataEncoder
from src.io_utils import atomic_write_csv

from .conftest import tiny

FOLD = 1


# ----------------------------------------------------------------------------------------------------
# the loop's internals this file relies on (adapt here when src/train.py changes)
# ----------------------------------------------------------------------------------------------------
def train(cfg, fold: int, data: Prepared) -> dict:
    """Train one fold in this process (resuming from its last.pt) and return its metrics."""
    return train_module.train_fold(experiment_recipe(cfg.experiment), cfg, fold, data)


def script_scores(monkeypatch, scores: list[float]) -> None:
    """The n-th validation of the fold scores ``scores[n]`` (the last one again past the end), whatever the
    network predicts: the score that picks the best epoch and drives early stopping."""
    calls = itertools.count()
    monkeypatch.setattr(train_module, "selection_score",
                        lambda *args, **kwargs: float(scores[min(next(calls), len(scores) - 1)]))


def record_trained_epochs(monkeypatch) -> list[int]:
    """The 0-based index of every epoch the loop trains (one pass over its batches), in order."""
    trained: list[int] = []
    real = train_module.train_epoch

    def counting(run, stage, epoch, *args, **kwargs):
        trained.append(epoch)
        return real(run, stage, epoch, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", counting)
    return trained


def after_each_epoch(monkeypatch, callback) -> None:
    """Call ``callback(epoch)`` (0-based) once an epoch is validated and its last.pt written."""
    real = train_module.end_epoch

    def wrapped(run, stage, state, epoch, *args, **kwargs):
        real(run, stage, state, epoch, *args, **kwargs)
        callback(epoch)

    monkeypatch.setattr(train_module, "end_epoch", wrapped)


def predict_validation(cfg, fold: int, data: Prepared, weights: dict) -> np.ndarray:
    """The fold's validation lesions predicted (one view, validation order) by a network holding ``weights``."""
    recipe = experiment_recipe(cfg.experiment)
    inputs = train_module.fold_inputs(recipe, cfg, fold, data)
    device = torch.device("cpu")
    model, augment = recipe.build(cfg, inputs.meta_tr.shape[1], len(inputs.aux_vocab), device)
    model.load_state_dict(weights)
    return train_module.predict(model, torch.sigmoid, cfg, data.train_cache, inputs.va_rows, inputs.meta_va, augment,
                                device, 1, "check")


def spy_metadata_fits(monkeypatch) -> list[list[str]]:
    """The lesion ids of the rows every MetadataEncoder.fit call sees."""
    seen: list[list[str]] = []
    real = MetadataEncoder.fit

    def spying(self, lesions, *args, **kwargs):
        seen.append(lesions["lesion_id"].tolist())
        return real(self, lesions, *args, **kwargs)

    monkeypatch.setattr(MetadataEncoder, "fit", spying)
    return seen


# ----------------------------------------------------------------------------------------------------
# settings and files
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One image cache for the whole file (cache_dir changes no result)."""
    return tmp_path_factory.mktemp("fold_loop_cache")


def make_cfg(mini_data, out, cache_dir, **extra):
    """exp001 with the tests' tiny settings on the CPU (where predictions repeat exactly), one TTA view, early
    stopping out of the way unless asked for."""
    settings = {"cache_dir": cache_dir, "device": "cpu", "tta": False, "patience": 20, **extra}
    return load_config("exp001", tiny(mini_data, out, **settings))


def history(cfg, fold: int = FOLD) -> pd.DataFrame:
    return pd.read_csv(cfg.fold_dir(fold) / "history.csv")


def saved_metrics(cfg, fold: int = FOLD) -> dict:
    return json.loads((cfg.fold_dir(fold) / "metrics.json").read_text())


def checkpoint(cfg, name: str, fold: int = FOLD) -> dict:
    return train_module.read_checkpoint(cfg.fold_dir(fold) / name)


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def failing_to_csv(monkeypatch, only: str = "") -> None:
    """DataFrame.to_csv into a file whose name contains ``only`` writes the first half of the CSV text, then
    fails as a full disk does."""
    real = pd.DataFrame.to_csv

    def half_then_fail(self, path_or_buf=None, *args, **kwargs):
        if path_or_buf is None or only not in os.path.basename(str(path_or_buf)):
            return real(self, path_or_buf, *args, **kwargs)
        text = real(self, None, *args, **kwargs)
        with open(path_or_buf, "w", encoding="utf-8") as fh:
            fh.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (injected by the test)", str(path_or_buf))

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)


# ----------------------------------------------------------------------------------------------------
# the metadata transform is fitted on the fold's training rows only
# ----------------------------------------------------------------------------------------------------
def test_metadata_encoder_is_fitted_on_the_fold_training_rows_only(mini_data, tmp_path, cache_dir, monkeypatch):
    """Catches a metadata transform fitted on training and validation rows together (e.g. ``fold_inputs`` fitting
    on ``data.train`` instead of the fold's training rows): the validation lesions get an age of 100 and one of
    them a site no training lesion has, so any leak shows in the saved features.json."""
    cfg = make_cfg(mini_data, tmp_path, cache_dir, stage1_epochs=1, epochs=0)
    data = prepare(cfg)
    val = data.folds == FOLD
    lesions = data.train.copy()
    lesions.loc[val, "age_approx"] = 100.0
    lesions.iloc[np.flatnonzero(val)[0], lesions.columns.get_loc("site")] = "validation_only_site"
    data = dataclasses.replace(data, train=lesions)
    fits = spy_metadata_fits(monkeypatch)

    train(cfg, FOLD, data)

    train_rows = lesions[data.folds != FOLD]
    assert len(train_rows) == 96 and (~val).sum() == 96           # 120 lesions in 5 folds of 24
    assert len(fits) == 1 and fits[0] == train_rows["lesion_id"].tolist()
    saved = json.loads((cfg.fold_dir(FOLD) / "features.json").read_text())["encoder"]
    ages = train_rows["age_approx"].dropna().to_numpy(np.float64)
    assert saved["age"]["median"] == pytest.approx(float(np.median(ages)))
    assert saved["age"]["mean"] == pytest.approx(float(ages.mean()))
    assert saved["age"]["std"] == pytest.approx(float(ages.std()))
    assert saved["age"]["mean"] < 70                                # the validation ages (100) stayed out
    sites = sorted({s for s in train_rows["site"].dropna() if s and s != "unknown"})
    assert saved["sites"] == sites == ["head_neck_face", "lower_extremity", "trunk", "upper_extremity"]
    tones = train_rows["skin_tone_class"].dropna().to_numpy(np.float64)
    assert saved["skin_tone"]["mean"] == pytest.approx(float(tones.mean()))


@pytest.mark.parametrize("probe", ["probe", "probe_metadata"])
def test_the_path_without_monet_is_fitted_beside_the_trained_network_and_leaves_it_as_it_was(mini_data, tmp_path,
                                                                                          cache_dir, monkeypatch,
                                                                                          probe):
    """A fold's path without MONET is a linear model on the metadata with every MONET score removed and, where an
    inner cross-validation on the fold's training rows finds they help, the trained network's image embeddings:
    its stored model gives the validation rows what oof_nomonet.csv holds, and the network's own predictions
    (oof.csv) are those of the fold without it."""
    from src.features import blank_monet
    from src.inference import embeddings
    from src.tabular import load_models, predict_saved

    cfg = make_cfg(mini_data, tmp_path, cache_dir, stage1_epochs=1, epochs=0)
    data = prepare(cfg)
    monkeypatch.setattr(train_module, "inner_log_loss", lambda name, *args: 0.0 if name == probe else 1.0)
    train(cfg, FOLD, data)
    inputs = train_module.fold_inputs(experiment_recipe(cfg.experiment), cfg, FOLD, data)
    names = load_models(cfg.fold_dir(FOLD), ("without_monet",))["without_monet"]
    assert [n for n, _, _ in names] == [probe]
    weights = train_module.read_checkpoint(cfg.fold_dir(FOLD) / "best.pt")["model"]
    np.testing.assert_allclose(predict_validation(cfg, FOLD, data, weights),
                               pd.read_csv(cfg.fold_dir(FOLD) / "oof.csv")[CLASSES].to_numpy(), rtol=0, atol=1e-6)
    recipe = experiment_recipe(cfg.experiment)
    model, augment = recipe.build(cfg, inputs.meta_tr.shape[1], len(inputs.aux_vocab), torch.device("cpu"))
    model.load_state_dict(weights)
    meta = inputs.features.transform(blank_monet(data.train.iloc[inputs.va_rows]))
    x = meta.astype(np.float64)
    if train_module.PROBES[names[0][0]]:
        x = np.hstack([embeddings(model, cfg, data.train_cache, inputs.va_rows, augment, torch.device("cpu")), x])
    np.testing.assert_allclose(predict_saved(names, x),
                               pd.read_csv(cfg.fold_dir(FOLD) / "oof_nomonet.csv")[CLASSES].to_numpy(), atol=1e-6)
    np.testing.assert_array_equal(inputs.meta_va_blind, meta)


# ----------------------------------------------------------------------------------------------------
# early stopping counts stage-2 epochs only
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scores, epochs_run, best_epoch, stopped, bad_epochs", [
    # best at epoch 1, never better: 3 stage-1 epochs, then patience (2) stage-2 epochs, then stop
    ([0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], 5, 1, True, 2),
    # a better stage-2 epoch (4) resets the count: stop after epochs 5 and 6
    ([0.5, 0.1, 0.1, 0.6, 0.2, 0.2, 0.2, 0.2], 6, 4, True, 2),
    # better every other stage-2 epoch: never 2 bad epochs in a row, all 8 epochs run
    ([0.5, 0.1, 0.1, 0.6, 0.2, 0.7, 0.2, 0.8], 8, 8, False, 0),
], ids=["no-improvement", "improvement-resets", "never-stops"])
def test_early_stopping_counts_only_stage_2_epochs(mini_data, tmp_path, cache_dir, monkeypatch, scores, epochs_run,
                                                   best_epoch, stopped, bad_epochs):
    """Catches early stopping that counts stage-1 epochs (``elif stage.number == 2`` turned into ``else``, or a
    stop check not restricted to stage 2): with stage1_epochs=3, epochs=5, patience=2 and a score that peaks at
    epoch 1, the fold must still run all 3 stage-1 epochs and exactly 2 stage-2 epochs (5 epochs)."""
    cfg = make_cfg(mini_data, tmp_path, cache_dir, stage1_epochs=3, epochs=5, patience=2)
    script_scores(monkeypatch, scores)
    trained = record_trained_epochs(monkeypatch)

    metrics = train(cfg, FOLD, prepare(cfg))

    assert trained == list(range(epochs_run))
    hist = history(cfg)
    assert hist["epoch"].tolist() == list(range(1, epochs_run + 1))
    assert hist["stage"].tolist() == [1, 1, 1, 2, 2, 2, 2, 2][:epochs_run]
    assert hist["val_score"].tolist() == pytest.approx(scores[:epochs_run])
    assert metrics["epochs_run"] == saved_metrics(cfg)["epochs_run"] == epochs_run
    assert metrics["best_epoch"] == saved_metrics(cfg)["best_epoch"] == best_epoch
    state = checkpoint(cfg, "last.pt")["state"]
    assert state["stopped"] is stopped and state["epoch"] == epochs_run - 1
    assert state["bad_epochs"] == bad_epochs


# ----------------------------------------------------------------------------------------------------
# best.pt holds the best epoch, and the fold's predictions come from it
# ----------------------------------------------------------------------------------------------------
def test_best_pt_keeps_the_weights_of_the_best_epoch(mini_data, tmp_path, cache_dir, monkeypatch):
    """Catches best.pt rewritten every epoch (the predictions then come from the last epoch while metrics.json
    names another): scores 0.2, 0.6, 0.3, 0.4 must leave epoch 2's weights in best.pt, named there and in
    metrics.json, and the out-of-fold predictions must be those weights' predictions."""
    cfg = make_cfg(mini_data, tmp_path, cache_dir, stage1_epochs=1, epochs=3)
    script_scores(monkeypatch, [0.2, 0.6, 0.3, 0.4])
    weights: dict[int, dict] = {}
    after_each_epoch(monkeypatch, lambda epoch: weights.__setitem__(epoch, checkpoint(cfg, "last.pt")["model"]))
    data = prepare(cfg)

    metrics = train(cfg, FOLD, data)

    assert sorted(weights) == [0, 1, 2, 3]
    assert history(cfg)["val_score"].tolist() == pytest.approx([0.2, 0.6, 0.3, 0.4])
    assert metrics["best_epoch"] == saved_metrics(cfg)["best_epoch"] == 2          # 1-based
    best = checkpoint(cfg, "best.pt")
    assert best["epoch"] == 1 and best["score"] == pytest.approx(0.6)             # 0-based
    assert best["model"].keys() == weights[1].keys()
    for name, tensor in best["model"].items():
        assert torch.equal(tensor, weights[1][name]), name
    changed = [n for n, t in best["model"].items() if t.is_floating_point() and not torch.equal(t, weights[3][n])]
    assert changed, "the last epoch's weights equal the best epoch's: the test cannot tell them apart"

    # the out-of-fold predictions are epoch 2's: the validation lesions predicted again with best.pt's weights
    oof = pd.read_csv(cfg.fold_dir(FOLD) / "oof.csv")
    assert oof["lesion_id"].tolist() == data.train["lesion_id"][data.folds == FOLD].tolist()
    expected = predict_validation(cfg, FOLD, data, best["model"])
    np.testing.assert_allclose(oof[CLASSES].to_numpy(), expected, rtol=0, atol=1e-6)
    assert not np.allclose(predict_validation(cfg, FOLD, data, weights[3]), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# a resumed fold trains each epoch once
# ----------------------------------------------------------------------------------------------------
class Interrupted(Exception):
    """Stands for a process killed between two epochs."""


def stop_after(monkeypatch, cfg, data, last_done: int) -> None:
    """Train fold ``FOLD`` and stop it as a killed process would, once epoch ``last_done`` (0-based) is
    checkpointed."""
    def interrupt(epoch):
        if epoch == last_done:
            raise Interrupted

    with monkeypatch.context() as patch:
        after_each_epoch(patch, interrupt)
        with pytest.raises(Interrupted):
            train(cfg, FOLD, data)


@pytest.mark.parametrize("last_done", [0, 2], ids=["after-stage-1", "mid-stage-2"])
def test_resume_trains_only_the_epochs_not_yet_finished(mini_data, tmp_path, cache_dir, monkeypatch, last_done):
    """Catches a resume that repeats its last finished epoch (``range(state.epoch, ...)`` for
    ``range(state.epoch + 1, ...)``) or starts over: a 4-epoch fold interrupted once epoch ``last_done``
    (0-based) is checkpointed must train exactly the remaining 3 - last_done epochs when run again, and its
    history.csv must hold epochs 1..4 once each."""
    cfg = make_cfg(mini_data, tmp_path, cache_dir, stage1_epochs=1, epochs=3)
    data = prepare(cfg)
    script_scores(monkeypatch, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])

    stop_after(monkeypatch, cfg, data, last_done)
    assert checkpoint(cfg, "last.pt")["state"]["epoch"] == last_done
    assert not (cfg.fold_dir(FOLD) / "metrics.json").exists()

    trained = record_trained_epochs(monkeypatch)
    metrics = train(cfg, FOLD, data)

    assert trained == list(range(last_done + 1, 4))
    assert len(trained) == 4 - (last_done + 1)
    hist = history(cfg)
    assert hist["epoch"].tolist() == [1, 2, 3, 4]
    assert hist["stage"].tolist() == [1, 2, 2, 2]
    assert hist["val_score"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert metrics["epochs_run"] == 4 and metrics["best_epoch"] == 4


# ----------------------------------------------------------------------------------------------------
# a CSV write that fails half-way leaves the previous file and no temporary file
# ----------------------------------------------------------------------------------------------------
def _frame(value: float) -> pd.DataFrame:
    return probs_frame([f"IL_{i:07d}" for i in range(50)], np.full((50, len(CLASSES)), value))


@pytest.mark.parametrize("previous", [True, False], ids=["replacing", "new-file"])
def test_atomic_write_csv_failing_half_way_leaves_the_previous_file(tmp_path, monkeypatch, previous):
    """Catches a CSV written in place (``atomic_write_csv`` as a plain ``df.to_csv(path)``): a write that fails
    half-way must leave the previous complete file (or none) and no temporary file."""
    path = tmp_path / "probs.csv"
    if previous:
        atomic_write_csv(path, _frame(0.25))
        old = path.read_bytes()
        assert old.count(b"\n") == 51 and b"0.25" in old
    failing_to_csv(monkeypatch)

    with pytest.raises(OSError):
        atomic_write_csv(path, _frame(0.75))

    if previous:
        assert path.read_bytes() == old
        assert sorted(p.name for p in tmp_path.iterdir()) == ["probs.csv"]
    else:
        assert not path.exists() and list(tmp_path.iterdir()) == []


def test_write_fold_failing_half_way_keeps_the_previous_oof_csv(mini_data, tmp_path, cache_dir, monkeypatch):
    """Catches a fold's CSV written in place (``ExperimentDir.write_fold`` or ``atomic_write_csv`` writing
    straight into oof.csv): a failure half-way through oof.csv keeps the previous oof.csv and metrics.json whole
    and leaves no temporary file."""
    cfg = make_cfg(mini_data, tmp_path, cache_dir)
    exp = ExperimentDir(cfg)
    exp.write_fold(FOLD, _frame(0.25), _frame(0.5), {"macro_f1": 0.25})
    folder = cfg.fold_dir(FOLD)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(before) == ["metrics.json", "oof.csv", "test.csv"]
    failing_to_csv(monkeypatch, only="oof.csv")

    with pytest.raises(OSError):
        exp.write_fold(FOLD, _frame(0.75), _frame(0.75), {"macro_f1": 0.75})

    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert temp_files(folder) == []


def test_a_fold_whose_oof_write_fails_is_left_incomplete_and_finishes_on_rerun(mini_data, tmp_path, cache_dir,
                                                                              monkeypatch):
    """Catches a trained fold's oof.csv written in place: when the write fails half-way there is no oof.csv (not
    a truncated one), no metrics.json (the fold is not complete) and no temporary file; run again, the fold
    completes with a whole oof.csv of its 24 validation lesions."""
    cfg = make_cfg(mini_data, tmp_path, cache_dir, stage1_epochs=1, epochs=0)
    data = prepare(cfg)
    folder = cfg.fold_dir(FOLD)
    with monkeypatch.context() as patch:
        failing_to_csv(patch, only="oof.csv")
        with pytest.raises(OSError):
            train(cfg, FOLD, data)
    assert not (folder / "oof.csv").exists()
    assert not (folder / "metrics.json").exists()
    assert temp_files(folder) == []

    train(cfg, FOLD, data)
    oof = pd.read_csv(folder / "oof.csv")
    assert len(oof) == 24 and list(oof.columns) == ["lesion_id", *CLASSES]
    assert (folder / "metrics.json").is_file() and temp_files(folder) == []
