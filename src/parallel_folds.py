"""Folds in parallel: the folds of one experiment on several devices, or one fold over several processes.

- ``GPUS=0,1,2,3 bash run.sh exp001``: one process per listed device, each training one fold at a time
  (CUDA_VISIBLE_DEVICES set to its device), the remaining folds queued; each fold's log goes to
  <exp>/fold<k>/train.log; a failed fold is reported by name while the others finish; complete folds are skipped,
  so a rerun trains only what is missing.
- ``torchrun ... -m src.cli run exp001 folds=0``: one fold over several processes with DistributedDataParallel
  (see README). Rank 0 prepares the data and writes every file; the others wait for it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .config import Config
from .experiment import ExperimentDir


def run_parallel(cfg: Config, gpus: str, poll_s: float = 0.5) -> dict:
    from .batches import prepare

    slots = [g.strip() for g in gpus.split(",") if g.strip()]
    exp = ExperimentDir(cfg)
    todo = exp.begin()
    cfg_path = exp.path / "config.json"
    data = prepare(cfg)  # folds CSV and image caches are built once, before the workers start
    print(f"[{cfg.name}] {len(todo)} folds on devices {slots}: {todo}", flush=True)
    running: dict[str, tuple[int, subprocess.Popen, object]] = {}
    failed: dict[int, str] = {}
    queue = list(todo)
    while queue or running:
        for slot in slots:
            if slot not in running and queue:
                k = queue.pop(0)
                log = cfg.fold_dir(k).parent / f"fold{k}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                fh = open(log, "a")
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot, "GPUS": "", "PYTHONUNBUFFERED": "1"}
                cmd = [sys.executable, "-m", "src.cli", "fold", str(cfg_path), str(k)]
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                        cwd=Path(__file__).resolve().parent.parent)
                running[slot] = (k, proc, fh)
                print(f"[{cfg.name}] fold {k} started on device {slot} (log {log})", flush=True)
        time.sleep(poll_s)
        for slot, (k, proc, fh) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            fh.close()
            del running[slot]
            if rc == 0 and exp.fold_done(k):
                print(f"[{cfg.name}] fold {k} finished on device {slot}", flush=True)
            else:
                failed[k] = f"exit code {rc}, log {cfg.fold_dir(k).parent / f'fold{k}.log'}"
                print(f"[{cfg.name}] fold {k} FAILED on device {slot}: {failed[k]}", flush=True)
    result = exp.collect(data.train)
    if failed:
        result["failed_folds"] = failed
    return result


def run_one_fold(config_json: str, fold: int) -> int:
    """Worker of run_parallel: train one fold of the saved config on whatever device this process sees."""
    import json

    from .batches import prepare
    from .train import train_fold

    cfg = Config(**json.loads(Path(config_json).read_text()))
    print(f"[{cfg.name}] fold {fold} on CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}",
          flush=True)
    if not ExperimentDir(cfg).fold_done(fold):
        train_fold(cfg, fold, prepare(cfg))
    return 0


def run_distributed(cfg: Config) -> dict:
    """Inside torchrun: every listed fold over all processes, one after the other."""
    from .batches import prepare
    from .dist import DistContext
    from .train import train_fold

    dist = DistContext.from_env(cfg.device)
    exp = ExperimentDir(cfg)
    try:
        if dist.is_main:
            exp.begin()
            data = prepare(cfg)
            dist.barrier()
        else:
            dist.barrier()
            data = prepare(cfg)
        for k in cfg.fold_list():
            if not exp.fold_done(k):
                train_fold(cfg, k, data, dist)
            dist.barrier()
        return exp.collect(data.train) if dist.is_main else {}
    finally:
        dist.close()
