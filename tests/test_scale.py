"""Scale-out: folds in parallel over device slots, one fold over 2 processes (gloo), the epoch sharding."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pandas as pd

from src.config import load_config
from src.batches import EpochSampler
from .conftest import tiny

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def test_rank_shards_make_up_the_global_batches():
    order = np.random.default_rng(0).permutation(96)
    single = list(EpochSampler(96))
    base = EpochSampler(96)
    base.set_order(order)
    single = list(base)
    shards = []
    for rank in range(2):
        s = EpochSampler(96, rank, 2)
        s.set_order(order)
        shards.append(list(s))
    batch, local = 16, 8
    for step in range(96 // batch):
        union = shards[0][step * local:(step + 1) * local] + shards[1][step * local:(step + 1) * local]
        assert sorted(union) == sorted(single[step * batch:(step + 1) * batch])


@pytest.mark.slow
def test_fold_scheduler_two_slots_one_failing_fold(mini_data, tmp_path):
    args = tiny(mini_data, tmp_path, n_folds=3, epochs=1, tta="false")
    cfg = load_config("exp001", args)
    cfg.exp_dir().mkdir(parents=True)
    cfg.fold_dir(1).write_text("a file where fold 1's folder should be: that fold cannot start")
    run = subprocess.run([sys.executable, "-m", "src.cli", "run", "exp001", *args], cwd=REPO,
                         env={**ENV, "GPUS": "slotA,slotB"}, capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "fold 1 FAILED" in out and "fold 1 failed" in out
    for k in (0, 2):
        assert (cfg.fold_dir(k) / "metrics.json").is_file(), out
    logs = {k: (cfg.exp_dir() / f"fold{k}.log").read_text() for k in range(3)}
    used = {line.split("CUDA_VISIBLE_DEVICES=")[1].strip() for log in logs.values()
            for line in log.splitlines() if "CUDA_VISIBLE_DEVICES=" in line}
    assert used == {"slotA", "slotB"}
    assert "Error" in logs[1]

    # the rerun resumes only the missing fold, then completes the experiment and blends
    cfg.fold_dir(1).unlink()
    again = subprocess.run([sys.executable, "-m", "src.cli", "run", "exp001", *args], cwd=REPO,
                           env={**ENV, "GPUS": "slotA,slotB"}, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 folds on devices" in again.stdout
    assert (cfg.exp_dir() / "oof.csv").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ddp(args, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "src.cli", "run", "exp001", *args]
    run = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_one_fold_on_two_processes_matches_single_process(mini_data, tmp_path):
    # no augmentation and frozen backbones (stage 1 only): the 2-process run sees the same global batches and
    # averages the same gradients, so it must reproduce the single-process run up to float reduction order
    common = dict(folds=0, stage1_epochs=3, epochs=0, aug_flip="false", aug_rotate=0, aug_color=0, tta="false",
                  batch_size=16)
    single = subprocess.run([sys.executable, "-m", "src.cli", "run", "exp001",
                             *tiny(mini_data, tmp_path / "one", **common)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stdout + single.stderr
    _run_ddp(tiny(mini_data, tmp_path / "two", **common), 2)
    a = pd.read_csv(tmp_path / "one" / "exp001" / "fold0" / "oof.csv")
    b = pd.read_csv(tmp_path / "two" / "exp001" / "fold0" / "oof.csv")
    assert list(a.lesion_id) == list(b.lesion_id)
    np.testing.assert_allclose(a.iloc[:, 1:].to_numpy(), b.iloc[:, 1:].to_numpy(), atol=1e-4)
    ha = pd.read_csv(tmp_path / "one" / "exp001" / "fold0" / "history.csv")
    hb = pd.read_csv(tmp_path / "two" / "exp001" / "fold0" / "history.csv")
    np.testing.assert_allclose(ha.train_loss, hb.train_loss, rtol=1e-4)

    # the same with batches gathered from the image cache in memory and the backbones fused: each rank gathers
    # exactly its shard of the global batch
    _run_ddp(tiny(mini_data, tmp_path / "two_mem", cache_on_device="yes", fuse_backbones="true", **common), 2)
    c = pd.read_csv(tmp_path / "two_mem" / "exp001" / "fold0" / "oof.csv")
    np.testing.assert_allclose(a.iloc[:, 1:].to_numpy(), c.iloc[:, 1:].to_numpy(), atol=1e-4)
    hc = pd.read_csv(tmp_path / "two_mem" / "exp001" / "fold0" / "history.csv")
    np.testing.assert_allclose(ha.train_loss, hc.train_loss, rtol=1e-4)

    # fine-tuning everything: BatchNorm statistics are per process, so the runs agree within a tolerance
    full = dict(common, epochs=2, stage1_epochs=1)
    _run_ddp(tiny(mini_data, tmp_path / "ddp2", **full), 2)
    s2 = subprocess.run([sys.executable, "-m", "src.cli", "run", "exp001", *tiny(mini_data, tmp_path / "sp2", **full)],
                        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert s2.returncode == 0
    la = pd.read_csv(tmp_path / "sp2" / "exp001" / "fold0" / "history.csv")
    lb = pd.read_csv(tmp_path / "ddp2" / "exp001" / "fold0" / "history.csv")
    assert len(la) == len(lb) == 3
    np.testing.assert_allclose(la.train_loss, lb.train_loss, rtol=0.1)
    assert abs(la.val_macro_f1.iloc[-1] - lb.val_macro_f1.iloc[-1]) < 0.15


def test_the_fold_scheduler_never_puts_two_running_folds_on_one_device(tmp_path, monkeypatch):
    """Five folds over two device slots with fake worker processes that record the device each fold got and finish
    after a few polls: never two folds on one slot at once, both slots used, each fold started once, a fold that
    fails is named while the others finish."""
    import src.executors as executors

    cfg = load_config("exp001", [f"output_dir={tmp_path}", "wandb_mode=disabled"])
    cfg.exp_dir().mkdir(parents=True)
    running: dict[str, int] = {}
    started: list[tuple[int, str]] = []
    clash: list[str] = []

    class FakeWorker:
        def __init__(self, cmd, env, **kwargs):
            self.fold, self.slot, self.polls = int(cmd[-1]), env["CUDA_VISIBLE_DEVICES"], 0
            if self.slot in running:
                clash.append(f"fold {self.fold} on {self.slot} while fold {running[self.slot]} runs there")
            running[self.slot] = self.fold
            started.append((self.fold, self.slot))

        def poll(self):
            self.polls += 1
            if self.polls < 2 + self.fold % 3:
                return None
            del running[self.slot]
            if self.fold == 3:
                return 1
            (cfg.fold_dir(self.fold)).mkdir(parents=True, exist_ok=True)
            (cfg.fold_dir(self.fold) / "metrics.json").write_text("{}")
            return 0

    monkeypatch.setattr(executors.subprocess, "Popen", FakeWorker)
    failed = executors.OnePerDevice("slotA,slotB", poll_s=0.0).train(cfg, None, None, [0, 1, 2, 3, 4])
    assert clash == []
    assert sorted(f for f, _ in started) == [0, 1, 2, 3, 4]
    assert {s for _, s in started} == {"slotA", "slotB"}
    assert started[:2] == [(0, "slotA"), (1, "slotB")]                  # both slots busy from the start
    assert list(failed) == [3] and "exit code 1" in failed[3]
    assert all((cfg.fold_dir(k) / "metrics.json").is_file() for k in (0, 1, 2, 4))
