"""Optuna study over an experiment's search space, scored AFTER the decision rule.

Each trial trains a few folds briefly (``--folds``, ``--epochs``) and returns the honest out-of-fold macro
F1 of the configured decision rule on those folds: loss weights and thresholds interact, so the weights are
judged the way the submission will be. The search space is the experiment's own ``search(trial) -> {key: value}``
in its train.py where it declares one (its own keys, e.g. a focal loss's gamma, beside or instead of the library's),
else the library's ``suggest``: the loss weighting (including ``pos_weight_power = 0``, no weighting) and the
learning rates. ``--write-best NAME`` writes the best trial's values as a child experiment.

The study lives in a storage URL (default: a SQLite file under <output_dir>/<exp>/tune/), so it resumes after an
interruption, can be inspected with optuna's own tools, and is shared: ``bash run.sh tune exp001`` started N
times (on one machine with SQLite or a journal file, on many with PostgreSQL/MySQL) joins the same study and the
processes together run ``--trials`` trials. A trial's folds are stored under a folder named by its parameters,
so a trial interrupted mid-way and retried continues from its checkpoints. Each trial records the process that runs
it (user attribute ``owner``: pid, host, trial number); a trial left RUNNING by a process of this host that no
longer exists (``kill -9``, a crash) is marked FAIL and queued again with its parameters whenever a tune process of
the study starts or ends a trial, so a rerun at once still ends with exactly ``--trials`` complete trials. The
storage's heartbeat (RDB storages: FAIL after 120 s without one, then retried) covers processes on other hosts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config, ConfigError, experiment_script, load_config, parse_folds
from .data import CLASSES
from .io_utils import HOST, atomic_write_text, pid_alive

RARE = ("MAL_OTH", "BEN_OTH", "DF", "INF", "VASC")
MAX_RETRY = 2  # retries of one trial whose process died (as the heartbeat's RetryHeartbeatStaleTrialCallback)


def storage_url(cfg: Config, storage: str = "") -> str:
    if storage:
        return storage
    path = (cfg.exp_dir() / "tune" / "optuna.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_storage(url: str):
    """SQLite / PostgreSQL / MySQL URLs go to RDBStorage with heartbeats (a crashed trial is retried);
    ``journal:/path/file.log`` is a journal file that several processes can append to."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = url[len("journal:"):]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=120,
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))


def join_study(url: str, name: str, sampler, attempts: int = 8):
    """Create or load the study. Processes started together race to create the storage's tables; the loser
    of that race gets a database error and simply tries again once the tables exist."""
    import random
    import time

    import optuna

    for attempt in range(attempts):
        try:
            return optuna.create_study(storage=open_storage(url), study_name=name, direction="maximize",
                                       load_if_exists=True, sampler=sampler)
        except Exception:  # noqa: BLE001 - sqlalchemy/optuna errors of several kinds during the race
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


SUGGESTED = ("pos_weight_power", "class_mult", "lr", "backbone_lr")  # the keys the library's search sets


def suggest(trial) -> dict:
    """The library's search space, as config overrides: the loss weighting and the stage-2 learning rates."""
    power = trial.suggest_float("pos_weight_power", 0.0, 1.0)
    rare = trial.suggest_float("rare_mult", 0.5, 4.0, log=True)
    return {
        "pos_weight_power": power,
        "class_mult": ",".join(f"{c}={rare:.4g}" for c in RARE),
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "backbone_lr": trial.suggest_float("backbone_lr", 1e-5, 3e-4, log=True),
    }


def search_space(cfg: Config):
    """``search(trial) -> overrides``: the experiment's own (``search`` in its train.py), else the library's
    ``suggest``, which needs the keys it sets."""
    own = getattr(experiment_script(cfg.experiment), "search", None)
    if own is not None:
        return own
    missing = [k for k in SUGGESTED if k not in cfg.own]
    if missing:
        raise ConfigError(f"{cfg.name}: tune's default search sets {missing}, which experiment {cfg.experiment} does "
                          f"not have; declare its own search(trial) -> {{key: value}} in exp/{cfg.experiment}/train.py")
    return suggest


def trial_config(cfg: Config, params: dict, epochs: int) -> Config:
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return cfg.replace(
        name=f"trial_{key}", output_dir=str(cfg.exp_dir() / "tune"), epochs=epochs,
        folds_csv=str(cfg.resolved_folds_csv()), cache_dir=str(cfg.resolved_cache_dir()), wandb_mode="disabled",
        **params,
    )


def evaluate(cfg: Config, data, folds: str) -> float:
    """Train ``cfg``'s ``folds`` (resuming; through the runner) and return the honest macro F1 after the decision
    rule on them."""
    from .decision import choose_rule, honest_scores
    from .experiment import ExperimentDir
    from .runner import run_experiment

    run_experiment(cfg, folds=folds, data=data)
    exp = ExperimentDir(cfg)
    rows, probs = [], []
    for k in parse_folds("--folds", folds, cfg.n_folds):
        idx = np.flatnonzero(data.folds == k)
        rows.append(idx)
        probs.append(exp.fold_oof(k).loc[data.train["lesion_id"].iloc[idx]].to_numpy())
    idx = np.concatenate(rows)
    y = data.train[CLASSES].to_numpy(np.float64)[idx]
    honest = honest_scores(y, np.concatenate(probs), data.folds[idx])
    return float(honest[choose_rule(cfg.decision, honest)[0]])


def _may_run(study, trial, limit: int) -> bool:
    """Exactly ``limit`` trials complete however many processes share the study: a trial runs only if the
    completed ones plus the running ones numbered before it leave room."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    ahead = sum(1 for t in trials if t.state == TrialState.COMPLETE
                or (t.state == TrialState.RUNNING and t.number < trial.number))
    return ahead < limit


def recover_dead_trials(study) -> list[str]:
    """FAIL every RUNNING trial whose owner (recorded when it started) is a process of this host that no longer
    exists, and queue its parameters again (at most MAX_RETRY times per trial); returns one line per trial.
    Trials of live processes, of other hosts or without an owner are left to run (or to the heartbeat)."""
    import optuna
    from optuna.trial import TrialState

    lines = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner")  # a retry copies its original's attributes: trust only the trial's own
        if (not isinstance(owner, dict) or owner.get("trial") != t.number or owner.get("host") != HOST
                or not isinstance(owner.get("pid"), int)):
            continue
        pid = owner["pid"]
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process recovered it first
        history = [*t.system_attrs.get("retry_history", []), t.number]
        what = f"trial {t.number} was left running by process {pid} on {HOST}, which no longer exists: marked failed"
        if len(history) > MAX_RETRY:
            lines.append(f"{what}; not retried, its process died {len(history)} times")
            continue
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=t.params, distributions=t.distributions,
            user_attrs={k: v for k, v in t.user_attrs.items() if k != "owner"},
            system_attrs={**t.system_attrs, "failed_trial": history[0], "retry_history": history}))
        lines.append(f"{what} and queued again with the same parameters (it resumes from its checkpoints)")
    return lines


def check_tune(cfg: Config, folds: str, epochs: int) -> None:
    """Refuse, before any trial trains, settings under which no trial could be scored."""
    from .config import experiment_recipe

    listed = parse_folds("--folds", folds, cfg.n_folds)
    if cfg.decision == "threshold" and len(listed) < 2:
        raise ConfigError(f"--folds {folds}: decision=threshold tunes each fold's thresholds on the other folds, so "
                          "a trial needs at least two folds (e.g. --folds 0,1), or use decision=expected_f1 "
                          "(label-free, one fold is enough)")
    if len(listed) < 2:
        print(f"[tune {cfg.name}] --folds {folds}: one fold, so trials are scored with the label-free rules only "
              "(thresholds need a second fold to be tuned honestly)", flush=True)
    if not experiment_recipe(cfg.experiment).images:
        raise ConfigError(f"{cfg.name}: tune searches the image models' loss weighting and learning rates; "
                          f"experiment {cfg.experiment} has none")
    if cfg.stage1_epochs + epochs < 1:
        raise ConfigError(f"stage1_epochs={cfg.stage1_epochs} and --epochs {epochs} train nothing")


@dataclass(frozen=True)
class TuneArgs:
    """The tune command's own arguments: the study's size and where it lives, and what each trial trains."""

    trials: int = 20          # total trials of the study (shared by all processes)
    folds: str = "0,1"        # folds each trial trains
    epochs: int = 3           # stage-2 epochs of each trial
    storage: str = ""         # Optuna storage URL; empty = sqlite:///<output_dir>/<name>/tune/optuna.db


def run_tune(cfg: Config, args: TuneArgs = TuneArgs(), data=None) -> "object":
    import optuna
    from optuna.trial import TrialState

    from .batches import prepare
    from .preflight import check_image_run
    from .tracking import Tracker

    check_tune(cfg, args.folds, args.epochs)
    space = search_space(cfg)
    check_image_run(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(cfg, args.storage)
    seed = int(np.random.SeedSequence([cfg.seed, os.getpid()]).generate_state(1)[0])
    study = join_study(url, f"{cfg.name}-tune", optuna.samplers.TPESampler(seed=seed))
    data = data if data is not None else prepare(cfg)

    blocked = False

    def objective(trial):
        nonlocal blocked
        trial.set_user_attr("owner", {"pid": os.getpid(), "host": HOST, "trial": trial.number})
        if not _may_run(study, trial, args.trials):
            blocked = True
            raise optuna.TrialPruned("the study already has its trials")
        params = space(trial)
        trial.set_user_attr("overrides", params)
        tcfg = trial_config(cfg, params, args.epochs)
        trial.set_user_attr("trial_dir", str(tcfg.exp_dir()))
        value = evaluate(tcfg, data, args.folds)
        tracker = Tracker(cfg, f"tune/{trial.number}", job_type="tune", kind="image")  # tune: image experiments only
        tracker.log({**{f"param/{k}": v for k, v in trial.params.items()}, "oof/macro_f1_honest": value})
        tracker.finish()
        print(f"[tune {cfg.name}] trial {trial.number}: honest macro F1 {value:.4f} {trial.params}", flush=True)
        return value

    while True:
        for line in recover_dead_trials(study):
            print(f"[tune {cfg.name}] {line}", flush=True)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if done >= args.trials:
            break
        blocked = False
        study.optimize(objective, n_trials=1, catch=())
        if blocked:  # every remaining slot is held by a running trial of another process
            break
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        print(f"[tune {cfg.name}] {len(complete)} trials in {url}; best honest macro F1 {study.best_value:.4f} "
              f"with {study.best_params}", flush=True)
    return study


def check_best_name(name: str) -> None:
    """Refuse a ``--write-best`` name that is not a plain name or whose exp/<name>/ already exists (checked before
    the study runs, and again before writing): an experiment folder is never overwritten."""
    from .config import EXP_ROOT, PLAIN_NAME, experiment_roots

    if not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"--write-best {name!r}: use a plain name (letters, digits, '.', '_', '-'; no '/' and no "
                          "'..'), e.g. --write-best exp004")
    taken = next((root / name for root in [*experiment_roots(), EXP_ROOT] if (root / name).exists()), None)
    if taken is not None:
        raise ConfigError(f"--write-best {name!r}: {taken} exists and is not replaced; choose another name")


def write_best(cfg: Config, study, name: str, args: TuneArgs = TuneArgs()) -> Path:
    """<name>/ beside ``cfg``'s experiment folder: the tuned experiment as its child, config.py with the best trial's
    values (the overrides its search gave) and a train.py that reuses its parent's code."""
    from .config import experiment_dir

    check_best_name(name)
    best = study.best_trial
    params = best.user_attrs["overrides"]
    lines = [f'"""{name}: {cfg.experiment} with the values of Optuna trial {best.number} ({", ".join(sorted(params))}).',
             "", f"Honest out-of-fold macro F1 after the '{cfg.decision}' rule on folds {args.folds} "
             f"({args.epochs} stage-2 epochs per trial): {best.value:.4f}.", '"""',
             f'PARENT = "{cfg.experiment}"', "OVERRIDES = dict("]
    lines += [f"    {k}={v!r}," for k, v in sorted(params.items())]
    lines.append(")")
    folder = experiment_dir(cfg.experiment).parent / name  # beside its parent
    atomic_write_text(folder / "train.py", f'"""{name}: the code of {cfg.experiment}; only values differ."""\n'
                      f"from exp.{cfg.experiment}.train import *  # noqa: F401,F403\n")
    atomic_write_text(folder / "config.py", "\n".join(lines) + "\n")
    load_config(name)  # refuses anything the config system would refuse
    return folder / "config.py"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bash run.sh tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("exp")
    ap.add_argument("--trials", type=int, default=TuneArgs.trials, help="total trials of the study (all processes)")
    ap.add_argument("--folds", default=TuneArgs.folds, help="comma list of the folds each trial trains")
    ap.add_argument("--epochs", type=int, default=TuneArgs.epochs, help="stage-2 epochs of each trial")
    ap.add_argument("--storage", default="", help="Optuna storage URL (default: a SQLite file under the "
                    "experiment's tune/ folder); postgresql://..., mysql://... or journal:/path/file.log to share")
    ap.add_argument("--write-best", metavar="NAME", help="write the best trial as experiment exp/NAME/")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ns = ap.parse_intermixed_args(argv)
    if ns.trials < 1 or ns.epochs < 0:
        raise ConfigError(f"--trials {ns.trials} --epochs {ns.epochs}: need at least one trial and epochs >= 0")
    args = TuneArgs(ns.trials, ns.folds, ns.epochs, ns.storage)
    if ns.write_best:
        check_best_name(ns.write_best)
    cfg = load_config(ns.exp, ns.overrides)
    study = run_tune(cfg, args)
    if ns.write_best:
        print(f"wrote {write_best(cfg, study, ns.write_best, args)}")
    return 0
