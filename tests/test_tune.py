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


def _gone_pid() -> int:
    """The pid of a process that no longer exists."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def _running_trial(study, owner: dict | None, retries: list[int] | None = None):
    from src.tune import suggest

    trial = study.ask()
    suggest(trial)
    if owner is not None:
        trial.set_user_attr("owner", {"trial": trial.number, **owner})
    if retries:
        study._storage.set_trial_system_attr(trial._trial_id, "retry_history", retries)
    return trial.number


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_only_trials_of_dead_processes_of_this_host_are_failed_and_queued_again(tmp_path):
    from src.io_utils import HOST
    from src.tune import join_study, recover_dead_trials

    study = join_study(f"sqlite:///{tmp_path / 'optuna.db'}", "s", optuna.samplers.RandomSampler(seed=0))
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = _running_trial(study, {"pid": _gone_pid(), "host": HOST})
        alive = _running_trial(study, {"pid": live.pid, "host": HOST})
        other_host = _running_trial(study, {"pid": _gone_pid(), "host": "elsewhere"})
        no_owner = _running_trial(study, None)
        copied = _running_trial(study, None)                      # a retry still carrying its original's owner
        study._storage.set_trial_user_attr(study.trials[copied]._trial_id, "owner",
                                           {"pid": _gone_pid(), "host": HOST, "trial": dead})
        worn_out = _running_trial(study, {"pid": _gone_pid(), "host": HOST}, retries=[1, 4])
        lines = recover_dead_trials(study)
        again = recover_dead_trials(study)
    finally:
        live.kill()
        live.wait()
    states = {t.number: t.state for t in study.trials}
    assert states[dead] == states[worn_out] == TrialState.FAIL
    assert {states[n] for n in (alive, other_host, no_owner, copied)} == {TrialState.RUNNING}
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == study.trials[dead].params
    assert "owner" not in waiting[0].user_attrs and waiting[0].system_attrs["retry_history"] == [dead]
    assert len(lines) == 2 and "queued again" in lines[0] and "died 3 times" in lines[1]
    assert again == []                                         # once only


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_left_running_by_a_killed_process_is_retried_by_a_rerun_at_once(mini_data, tmp_path, capsys):
    from src.io_utils import HOST
    from src.tune import join_study

    cfg = load_config("exp001", tune_args(mini_data, tmp_path))
    study = join_study(storage_url(cfg), f"{cfg.name}-tune", optuna.samplers.RandomSampler(seed=0))
    dead = _running_trial(study, {"pid": _gone_pid(), "host": HOST})   # its heartbeat is still fresh
    run_tune(cfg, tune_opts(1))
    out = capsys.readouterr().out
    assert f"trial {dead} was left running by process" in out and "queued again with the same parameters" in out
    complete = complete_trials(cfg)
    assert len(complete) == 1 and complete[0].params == study.trials[dead].params
    assert optuna.load_study(study_name=f"{cfg.name}-tune", storage=storage_url(cfg)).trials[dead].state == \
        TrialState.FAIL


@pytest.mark.slow
def test_kill_9_during_a_trial_then_a_rerun_at_once_completes_every_trial(mini_data, tmp_path):
    args = ["--trials", "2", "--folds", "0,1", "--epochs", "1", *tune_args(mini_data, tmp_path)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "src.cli", "tune", "exp001", *args]
    killed = subprocess.run(cmd, cwd=REPO, env={**env, "MILK10K_FAULT": "kill@step#3"}, capture_output=True,
                            text=True, timeout=900)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert len(complete_trials(load_config("exp001", tune_args(mini_data, tmp_path)))) == 2
    assert "was left running by process" in rerun.stdout and "queued again" in rerun.stdout
