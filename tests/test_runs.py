"""What a real run trips over: folds made under other settings or data, two runs on one folder, divergence, and
checks that must come before anything expensive."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.blend import BlendError
from src.config import ConfigError, load_config
from src.experiment import ExperimentBusy, ExperimentDir, StaleOutputs, folder_lock
from src.preflight import SetupError
from src.runner import run_experiment
from src.train import NonFiniteLoss

from .conftest import run_cli, tiny


def _cfg(mini_data, out, **extra):
    return load_config("exp001", tiny(mini_data, out, **{"epochs": 1, "n_folds": 2, **extra}))


def run_folds(cfg, folds="", retrain=False):
    return run_experiment(cfg, folds=folds, retrain=retrain)


@pytest.fixture(scope="module")
def finished(mini_data, tmp_path_factory):
    """A complete two-fold exp001 at 32 px, and fold 0 of it alone at 48 px elsewhere."""
    root = tmp_path_factory.mktemp("runs")
    run_folds(_cfg(mini_data, root / "a"))
    run_folds(_cfg(mini_data, root / "b", img_size=48), folds="0")
    return root


def _copy(finished, tmp_path, which="a") -> Path:
    shutil.copytree(finished / which, tmp_path / which)
    return tmp_path / which


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_folds_of_other_settings_are_refused_naming_the_keys_and_the_ways_out(mini_data, finished, tmp_path):
    out = _copy(finished, tmp_path, "b")
    before = _snapshot(out)
    with pytest.raises(StaleOutputs) as err:
        run_folds(_cfg(mini_data, out))                     # the README's smoke-test pattern: 48 px, then 32 px
    text = str(err.value)
    assert "fold 0 (complete): img_size=48 -> 32" in text
    assert "name=<another name>" in text and "retrain=true" in text
    assert _snapshot(out) == before                         # nothing trained, nothing rewritten (config.json too)


def test_a_finished_run_rerun_with_more_epochs_is_refused(mini_data, finished, tmp_path):
    out = _copy(finished, tmp_path)
    with pytest.raises(StaleOutputs, match=r"fold 0 \(complete\): epochs=1 -> 5.*\n  fold 1 \(complete\): epochs"):
        run_folds(_cfg(mini_data, out, epochs=5))


def test_settings_that_do_not_change_results_reuse_the_folds(mini_data, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    oof = (out / "exp001" / "oof.csv").read_bytes()
    result = run_folds(_cfg(mini_data, out, num_workers=1, eval_batch_size=7, wandb_mode="offline",
                            cache_on_device="no", submission_dir=tmp_path / "elsewhere", fuse_backbones=True))
    assert result["complete"] and "folds to train" not in capsys.readouterr().out
    assert (out / "exp001" / "oof.csv").read_bytes() == oof


def test_retrain_true_replaces_only_the_stale_folds(mini_data, finished, tmp_path):
    out = _copy(finished, tmp_path, "b")
    result = run_folds(_cfg(mini_data, out), retrain=True)
    assert result["complete"]
    exp = ExperimentDir(_cfg(mini_data, out))
    prints = [exp.saved_fingerprint(k) for k in (0, 1)]
    assert prints[0] == prints[1] and prints[0]["settings"]["img_size"] == 32
    reference = pd.read_csv(finished / "a" / "exp001" / "oof.csv")
    pd.testing.assert_frame_equal(pd.read_csv(out / "exp001" / "oof.csv"), reference, check_exact=False, atol=1e-6)


def test_a_checkpoint_is_never_continued_under_other_settings(mini_data, finished, tmp_path):
    out = _copy(finished, tmp_path)
    (out / "exp001" / "fold1" / "metrics.json").unlink()    # fold 1 back in progress, its last.pt kept
    with pytest.raises(StaleOutputs, match=r"fold 1 \(in progress\): batch_size=16 -> 8; img_size=32 -> 96"):
        run_folds(_cfg(mini_data, out, img_size=96, batch_size=8))
    saved = json.loads((out / "exp001" / "fold1" / "config.json").read_text())
    assert (saved["img_size"], saved["batch_size"]) == (32, 16)   # the record still says what made the checkpoint


def test_changed_labels_are_refused_by_training_and_by_the_blend(mini_data, finished, tmp_path):
    out = _copy(finished, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(mini_data, data)
    gt = pd.read_csv(data / "MILK10k_Training_GroundTruth.csv", dtype=str)
    gt.loc[0, ["AKIEC", "BCC", "BEN_OTH", "BKL", "DF", "INF", "MAL_OTH", "MEL", "NV", "SCCKA", "VASC"]] = \
        ["1.0"] + ["0.0"] * 10 if gt.loc[0, "AKIEC"] != "1.0" else ["0.0", "1.0"] + ["0.0"] * 9
    gt.to_csv(data / "MILK10k_Training_GroundTruth.csv", index=False)
    cfg = load_config("exp001", tiny(data, out, epochs=1, n_folds=2, folds_csv=out / "folds_k2_s42.csv"))
    with pytest.raises(StaleOutputs, match="the tables differ \\(labels or metadata changed\\)"):
        run_folds(cfg)
    from src.submission import finalize

    with pytest.raises(BlendError, match="exp001 was made from other data .* labels or metadata changed"):
        finalize(cfg, [cfg])


def test_folds_of_different_fingerprints_are_never_joined(mini_data, finished, tmp_path):
    out = _copy(finished, tmp_path)
    other = finished / "b" / "exp001" / "fold0"
    shutil.rmtree(out / "exp001" / "fold0")
    shutil.copytree(other, out / "exp001" / "fold0")        # a 48 px fold put in by hand
    exp = ExperimentDir(_cfg(mini_data, out))
    with pytest.raises(StaleOutputs, match=r"cannot be joined .*\n  fold 1 \(img_size=32 -> 48\)"):
        exp.collect(pd.read_csv(mini_data / "MILK10k_Training_GroundTruth.csv"))


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_while_the_first_lives(mini_data, finished, tmp_path):
    out = _copy(finished, tmp_path)
    with folder_lock(out / "exp001"):
        with pytest.raises(ExperimentBusy, match=r"is in use by another run \(pid \d+ on .* since"):
            run_folds(_cfg(mini_data, out))
        proc = run_cli("run", "exp001", *tiny(mini_data, out, epochs=1, n_folds=2))
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "is in use by another run" in text and "Traceback" not in text
    assert run_folds(_cfg(mini_data, out))["complete"]      # released with its holder


def test_divergence_stops_the_fold_and_is_never_checkpointed(mini_data, tmp_path):
    cfg = _cfg(mini_data, tmp_path, stage1_lr=1e30, lr=1e30, backbone_lr=1e30)
    with pytest.raises(NonFiniteLoss, match="epoch 1 .*diverged.*Lower the learning rates"):
        run_folds(cfg, folds="0")
    fold = tmp_path / "exp001" / "fold0"
    assert not (fold / "last.pt").exists() and not (fold / "best.pt").exists()
    assert not (fold / "metrics.json").exists()


@pytest.mark.slow
def test_the_cache_build_follows_num_workers(mini_data, tmp_path, monkeypatch):
    import src.batches as batches

    seen = []
    real = batches.build_cache
    monkeypatch.setattr(batches, "build_cache", lambda *a, **k: seen.append(k["num_workers"]) or real(*a, **k))
    batches.prepare(_cfg(mini_data, tmp_path, num_workers=0))
    batches.prepare(_cfg(mini_data, tmp_path, num_workers=2, img_size=40))
    assert seen == [1, 1, 2, 2]


@pytest.mark.slow
def test_unusable_folders_and_devices_are_refused_before_anything_runs(mini_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for key in ("output_dir", "submission_dir", "cache_dir"):
        cfg = _cfg(mini_data, tmp_path / "out", **{key: blocker / "sub"})
        with pytest.raises((SetupError, NotADirectoryError, FileExistsError)) as err:
            run_folds(cfg)
        assert "a_file" in str(err.value)
    assert not (tmp_path / "out" / "cache").exists()
    proc = run_cli("run", "exp001", *tiny(mini_data, tmp_path / "out", epochs=1, submission_dir=blocker / "s"))
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "cannot write to submission_dir" in text and "Traceback" not in text
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SetupError, match="device='cuda' but this machine has no usable CUDA GPU"):
            run_folds(_cfg(mini_data, tmp_path / "dev", device="cuda"))


@pytest.mark.slow
def test_missing_weights_stop_the_run_before_the_image_cache(mini_data, tmp_path):
    proc = run_cli("run", "exp001", *tiny(mini_data, tmp_path, pretrained=True), env={"HF_HUB_OFFLINE": "1"})
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "cannot get pretrained weights for 'test_efficientnet'" in text
    assert "pretrained_path=" in text and "Traceback" not in text
    assert not list((tmp_path / "cache").glob("*.npy")) if (tmp_path / "cache").exists() else True


def test_tuning_settings_that_cannot_score_a_trial_are_refused_before_training(mini_data, tmp_path):
    from src.tune import TuneArgs, run_tune

    cfg = load_config("exp001", tiny(mini_data, tmp_path, decision="threshold"))
    with pytest.raises(ConfigError, match="--folds 0: decision=threshold .* at least two folds"):
        run_tune(cfg, TuneArgs(trials=1, folds="0"))
    assert not (tmp_path / "exp001" / "tune").exists()


@pytest.mark.slow
def test_the_hint_to_finish_keeps_the_users_settings(mini_data, tmp_path):
    args = tiny(mini_data, tmp_path, epochs=1, n_folds=2, folds=0, name="myrun")
    proc = run_cli("run", "exp001", *args)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    hint = next(line for line in text.splitlines() if "not complete" in line)
    assert "img_size=32" in hint and "n_folds=2" in hint and "folds=0" not in hint
    command = hint.split("`")[1]
    assert command.startswith("bash run.sh exp001 ") and "name=myrun" in command   # a command that exists
    assert np.isfinite(pd.read_csv(tmp_path / "myrun" / "fold0" / "oof.csv").iloc[:, 1:].to_numpy()).all()
