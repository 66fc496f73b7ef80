"""Where an experiment's folds train: the executors the runner (src/runner.py) hands its missing folds to.

- ``InProcess``: one fold after the other in this process (the default).
- ``OnePerDevice``: ``GPUS=0,1,2,3 bash run.sh exp001``: one worker process per listed device, each training one
  fold at a time (CUDA_VISIBLE_DEVICES set to its device), the remaining folds queued; each fold's log goes to
  <exp>/fold<k>.log; a failed fold is reported by name while the others finish.
- ``Torchrun``: ``torchrun ... -m src.cli run exp001 folds=0``: one fold over several processes with
  DistributedDataParallel (see README). Rank 0 holds the experiment's folder, prepares the data and writes every
  file; the others wait for it, then train the same folds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .config import Config, config_from_dict, experiment_recipe
from .experiment import ExperimentDir


class InProcess:
    """Every fold in this process, one after the other."""

    is_main = True

    @contextmanager
    def context(self, cfg: Config) -> Iterator["InProcess"]:
        yield self

    @contextmanager
    def starting(self) -> Iterator[None]:
        """Around rank 0's start (lesions, lock, checks, data); other processes learn how it went."""
        yield

    def follow(self, cfg: Config, recipe, folds: list[int]) -> None:
        """What a process other than rank 0 does instead of running the experiment."""

    def train(self, cfg: Config, recipe, data, todo: list[int]) -> dict[int, str]:
        """Train the folds of ``todo``; fold -> why it failed, for folds that failed without stopping the rest."""
        for k in todo:
            recipe.train_fold(cfg, k, data)
        return {}


class OnePerDevice(InProcess):
    """One worker process per device slot (``GPUS=0,1,...``), each training one fold at a time."""

    def __init__(self, gpus: str, poll_s: float = 0.5):
        self.slots = [g.strip() for g in gpus.split(",") if g.strip()]
        self.poll_s = poll_s

    def train(self, cfg: Config, recipe, data, todo: list[int]) -> dict[int, str]:
        exp = ExperimentDir(cfg)
        print(f"[{cfg.name}] {len(todo)} folds on devices {self.slots}: {todo}", flush=True)
        cfg_path = exp.path / "config.json"
        running: dict[str, tuple[int, subprocess.Popen, object]] = {}
        failed: dict[int, str] = {}
        queue = list(todo)
        while queue or running:
            for slot in self.slots:
                if slot not in running and queue:
                    k = queue.pop(0)
                    log = exp.path / f"fold{k}.log"
                    fh = open(log, "a")
                    env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot, "GPUS": "", "PYTHONUNBUFFERED": "1"}
                    cmd = [sys.executable, "-m", "src.cli", "fold", str(cfg_path), str(k)]
                    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                            cwd=Path(__file__).resolve().parent.parent)
                    running[slot] = (k, proc, fh)
                    print(f"[{cfg.name}] fold {k} started on device {slot} (log {log})", flush=True)
            time.sleep(self.poll_s)
            for slot, (k, proc, fh) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                fh.close()
                del running[slot]
                if rc == 0 and exp.fold_done(k):
                    print(f"[{cfg.name}] fold {k} finished on device {slot}", flush=True)
                else:
                    failed[k] = f"exit code {rc}, log {exp.path / f'fold{k}.log'}"
                    print(f"[{cfg.name}] fold {k} FAILED on device {slot}: {failed[k]}", flush=True)
        return failed


def run_worker(config_json: str, fold: int) -> int:
    """A OnePerDevice worker: train one fold of the saved config on whatever device this process sees."""
    cfg = config_from_dict(json.loads(Path(config_json).read_text()), source=config_json)
    print(f"[{cfg.name}] fold {fold} on CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}",
          flush=True)
    if not ExperimentDir(cfg).fold_done(fold):
        recipe = experiment_recipe(cfg.experiment)
        recipe.train_fold(cfg, fold, recipe.prepare(cfg))
    return 0


class Torchrun(InProcess):
    """Inside torchrun: every fold over all processes, one after the other."""

    dist = None

    @contextmanager
    def context(self, cfg: Config) -> Iterator["Torchrun"]:
        from .dist import DistContext

        self.dist = DistContext.from_env(cfg.device)
        self.is_main = self.dist.is_main
        try:
            yield self
        finally:
            self.dist.close()

    @contextmanager
    def starting(self) -> Iterator[None]:
        started = 0.0
        try:
            yield
            started = 1.0
        finally:
            self.dist.sum(started)  # the other ranks learn whether rank 0 could start

    def follow(self, cfg: Config, recipe, folds: list[int]) -> None:
        if self.dist.sum(0.0)[0] < 1:
            return
        todo = ExperimentDir(cfg).folds_to_do(folds)
        if todo:
            self.train(cfg, recipe, recipe.prepare(cfg), todo)

    def train(self, cfg: Config, recipe, data, todo: list[int]) -> dict[int, str]:
        for k in todo:
            recipe.train_fold(cfg, k, data, self.dist)
            self.dist.barrier()
        return {}


def executor_from_env() -> InProcess:
    """torchrun's environment (WORLD_SIZE > 1), GPUS=..., or this process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return Torchrun()
    if os.environ.get("GPUS", "").strip():
        return OnePerDevice(os.environ["GPUS"])
    return InProcess()
