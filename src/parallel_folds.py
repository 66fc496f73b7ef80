"""Folds in parallel: the folds of one experiment on several devices, or one fold over several processes.

- ``GPUS=0,1,2,3 bash run.sh exp001``: one process per listed device, each training one fold at a time
  (CUDA_VISIBLE_DEVICES set to its device), the remaining folds queued; each fold's log goes to
  <exp>/fold<k>.log; a failed fold is reported by name while the others finish; complete folds are skipped,
  so a rerun trains only what is missing.
- ``torchrun ... -m src.cli run exp001 folds=0``: one fold over several processes with DistributedDataParallel
  (see README). Rank 0 prepares the data and writes every file; the others wait for it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from .config import Config
from .experiment import ExperimentDir, data_fingerprint, fingerprint, load_lesions


def run_parallel(cfg: Config, gpus: str, poll_s: float = 0.5) -> dict:
    """Every missing fold of ``cfg``, one worker process per device slot in ``gpus`` (comma list), then collect.
    The parent holds the experiment's folder (lock, fingerprint checks) and builds the caches once."""
    from .batches import prepare
    from .preflight import check_image_run

    slots = [g.strip() for g in gpus.split(",") if g.strip()]
    exp = ExperimentDir(cfg)
    lesions = load_lesions(cfg, check_images=True)
    failed: dict[int, str] = {}
    with exp.session(fingerprint(cfg, data_fingerprint(lesions, images=True))) as todo:
        if todo:
            check_image_run(cfg)
            prepare(cfg, lesions=lesions)  # folds CSV and image caches are built once, before the workers start
            print(f"[{cfg.name}] {len(todo)} folds on devices {slots}: {todo}", flush=True)
            failed = _run_workers(cfg, exp, slots, todo, poll_s)
        result = exp.collect(lesions.train)
    if failed:
        result["failed_folds"] = failed
    return result


def _run_workers(cfg: Config, exp: ExperimentDir, slots: list[str], todo: list[int], poll_s: float) -> dict[int, str]:
    """Run ``src.cli fold`` for each fold of ``todo``, at most one per slot at a time; fold -> why it failed."""
    cfg_path = exp.path / "config.json"
    running: dict[str, tuple[int, subprocess.Popen, object]] = {}
    failed: dict[int, str] = {}
    queue = list(todo)
    while queue or running:
        for slot in slots:
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
                failed[k] = f"exit code {rc}, log {exp.path / f'fold{k}.log'}"
                print(f"[{cfg.name}] fold {k} FAILED on device {slot}: {failed[k]}", flush=True)
    return failed


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
    """Inside torchrun: every listed fold over all processes, one after the other. Rank 0 holds the experiment's
    folder (lock, fingerprint checks) and builds the caches; if it cannot start, every rank stops."""
    from .batches import prepare
    from .dist import DistContext
    from .preflight import check_image_run
    from .train import train_fold

    dist = DistContext.from_env(cfg.device)
    exp = ExperimentDir(cfg)
    try:
        with ExitStack() as stack:
            started = 0.0
            if dist.is_main:
                try:
                    lesions = load_lesions(cfg, check_images=True)
                    stack.enter_context(exp.session(fingerprint(cfg, data_fingerprint(lesions, images=True))))
                    check_image_run(cfg)
                    data = prepare(cfg, lesions=lesions)
                    started = 1.0
                finally:
                    dist.sum(started)  # the other ranks learn whether rank 0 could start
            elif dist.sum(started)[0] < 1:
                return {}
            else:
                data = prepare(cfg)
            for k in cfg.fold_list():
                if not exp.fold_done(k):
                    train_fold(cfg, k, data, dist)
                dist.barrier()
            return exp.collect(data.train) if dist.is_main else {}
    finally:
        dist.close()
