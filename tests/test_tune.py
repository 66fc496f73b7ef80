"""Optuna tuning: resumable SQLite study, shared by several processes, best trial written as an experiment."""
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from src.config import load_config
from src.tune import TuneArgs, run_tune, storage_url, write_best

from .conftest import tiny

REPO = Path(__file__).resolve().parent.parent


def tune_args(mini_data, out):
    return tiny(mini_data, out, stage1_epochs=0, tta="false")


def tune_opts(trials):
    return TuneArgs(trials=trials, folds="0,1", epochs=1)


def complete_trials(cfg):
    study = optuna.load_study(study_name=f"{cfg.name}-tune", storage=storage_url(cfg))
    return study.get_trials(states=(TrialState.COMPLETE,))


def test_study_resumes_and_writes_best_experiment(mini_data, tmp_path, monkeypatch):
    import src.config as config

    cfg = load_config("exp001", tune_args(mini_data, tmp_path))
    run_tune(cfg, tune_opts(2))
    first = complete_trials(cfg)
    assert len(first) == 2
    assert all(0.0 <= t.params["pos_weight_power"] <= 1.0 for t in first)
    assert all(0.0 <= t.value <= 1.0 for t in first)
    # an interrupted or repeated run resumes the same study and adds nothing once it is full
    study = run_tune(cfg, tune_opts(2))
    assert [t.number for t in complete_trials(cfg)] == [t.number for t in first]

    monkeypatch.setattr(config, "EXP_ROOT", tmp_path / "exp")
    (tmp_path / "exp" / "exp001").mkdir(parents=True)
    for name in ("config.py", "train.py"):
        (tmp_path / "exp" / "exp001" / name).write_text((REPO / "exp/exp001" / name).read_text())
    monkeypatch.setenv("MILK10K_EXP_PATH", str(tmp_path / "exp"))
    path = write_best(cfg, study, "exp001_tuned", tune_opts(2))
    tuned = load_config("exp001_tuned")
    assert path.is_file() and (path.parent / "train.py").is_file()
    assert tuned.experiment == "exp001_tuned" and tuned.stage1_weight_decay == load_config("exp001").stage1_weight_decay
    with pytest.raises(Exception, match="use a plain name"):
        write_best(cfg, study, "../outside", tune_opts(2))
    assert not (tmp_path / "outside").exists()
    assert tuned.pos_weight_power == study.best_params["pos_weight_power"]
    assert tuned.backbone == load_config("exp001").backbone and "MAL_OTH=" in tuned.class_mult


@pytest.mark.slow
def test_two_processes_share_one_study(mini_data, tmp_path):
    args = tune_args(mini_data, tmp_path)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    opts = ["--trials", "3", "--folds", "0,1", "--epochs", "1"]
    procs = [subprocess.Popen([sys.executable, "-m", "src.cli", "tune", "exp001", *opts, *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    cfg = load_config("exp001", args)
    trials = complete_trials(cfg)
    assert len(trials) == 3
    assert len({t.number for t in trials}) == 3
    assert len({t.user_attrs["trial_dir"] for t in trials}) == 3
