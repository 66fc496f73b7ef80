"""What a run reads back of its own checkpoints: plain tensors and JSON-like state only, checked before anything is
trained, a damaged one named with what to do."""
from __future__ import annotations

import shutil

import pytest
import torch

from src.config import load_config
from src.runner import run_experiment
from src.train import CheckpointError, read_checkpoint

from .conftest import tiny


def _cfg(mini_data, out):
    return load_config("exp001", tiny(mini_data, out, stage1_epochs=1, epochs=1, n_folds=2, tta=False))


@pytest.fixture(scope="module")
def unfinished(mini_data, tmp_path_factory):
    """Fold 0 of a two-fold exp001 trained to the end, then put back in progress (metrics.json removed)."""
    out = tmp_path_factory.mktemp("ckpt")
    cfg = _cfg(mini_data, out)
    run_experiment(cfg, folds="0")
    (cfg.fold_dir(0) / "metrics.json").unlink()
    return out


def _copy(unfinished, tmp_path):
    shutil.copytree(unfinished, tmp_path / "o")
    return tmp_path / "o"


class Payload:
    """Unpickling this object writes a file: what a planted checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoints_hold_only_plain_tensors_and_state(unfinished):
    fold = unfinished / "exp001" / "fold0"
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(fold / name, weights_only=True)           # would raise on any pickled object
        assert isinstance(ckpt["model"]["head.classifier.weight"], torch.Tensor)
    assert read_checkpoint(fold / "last.pt")["state"]["epoch"] == 1


def test_a_planted_checkpoint_never_runs_its_code(mini_data, unfinished, tmp_path):
    out = _copy(unfinished, tmp_path)
    marker = tmp_path / "payload_ran"
    last = out / "exp001" / "fold0" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["state"]["wandb_id"] = Payload(marker)
    torch.save(ckpt, last)
    with pytest.raises(CheckpointError, match=r"last.pt cannot be read back .*retrain=true to restart fold 0"):
        run_experiment(_cfg(mini_data, out))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate_last", "truncate_best", "remove_best"])
def test_damaged_resume_files_are_named_before_training_and_retrain_restarts_the_fold(mini_data, unfinished,
                                                                                       tmp_path, damage, capsys):
    out = _copy(unfinished, tmp_path)
    fold = out / "exp001" / "fold0"
    name = "last.pt" if damage == "truncate_last" else "best.pt"
    if damage == "remove_best":
        (fold / name).unlink()
    else:
        data = (fold / name).read_bytes()
        (fold / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{name}.*(cannot be read back|is missing).*retrain=true"):
        run_experiment(_cfg(mini_data, out), folds="0")
    assert not (fold / "metrics.json").exists()                     # refused before any epoch was trained
    result = run_experiment(_cfg(mini_data, out), folds="0", retrain=True)
    assert "restarting the fold (retrain=true)" in capsys.readouterr().out
    assert (fold / "metrics.json").exists() and read_checkpoint(fold / "best.pt")["epoch"] >= 0
    assert not result["complete"]                                   # fold 1 was never asked for


def test_a_checkpoint_of_another_network_is_named(mini_data, unfinished, tmp_path):
    """A last.pt whose weights do not fit the experiment's network is refused with the fold folder to delete, never
    loaded half-way."""
    out = _copy(unfinished, tmp_path)
    last = out / "exp001" / "fold0" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["model"]["head.classifier.weight"] = torch.zeros(11, 3)
    torch.save(ckpt, last)
    with pytest.raises(CheckpointError, match=r"last.pt holds the weights of another network .*delete .*fold0"):
        run_experiment(_cfg(mini_data, out), folds="0")


def test_a_fold_made_by_an_earlier_version_is_refused_in_one_line_and_retrained_on_request(mini_data, unfinished,
                                                                                        tmp_path):
    """A fold whose fingerprint is of another version (an earlier layout of the project) is not translated: the run
    stops in one line saying what to do, and retrain=true retrains it."""
    import json

    from src.experiment import FINGERPRINT_VERSION, StaleOutputs

    out = _copy(unfinished, tmp_path / "a")
    fold = out / "exp001" / "fold0"
    saved = json.loads((fold / "fingerprint.json").read_text())
    (fold / "fingerprint.json").write_text(json.dumps({**saved, "version": 2}))
    with pytest.raises(StaleOutputs) as err:
        run_experiment(_cfg(mini_data, out), folds="0")
    assert "\n" not in str(err.value)
    assert f"fold(s) [0] were made by another version of the project (fingerprint version 2, this one " \
        f"{FINGERPRINT_VERSION})" in str(err.value) and "retrain=true" in str(err.value)
    run_experiment(_cfg(mini_data, out), folds="0", retrain=True)
    assert json.loads((fold / "fingerprint.json").read_text())["version"] == FINGERPRINT_VERSION == 4
    assert (fold / "metrics.json").is_file()
