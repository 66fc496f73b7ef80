"""The measurements behind ``bench``: exp001's training step on the device, the training loop's batches, a naive
loader and TTA inference, each row timed after warm-up steps with its peak memory."""
from __future__ import annotations

import ctypes
import itertools
import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from ...augment import DeviceAugment
from ...batches import epoch_order, training_batches
from ...cache import build_cache
from ...config import Config, experiment_recipe
from ...data import CLASSES, load_train
from ...inference import predict
from ...io_utils import atomic_write_text
from ...model import count_parameters
from ...speed.apply import FusedDualNet
from ...step import Stage, build_stage, train_step
from ..synth import generate
from ...speed.device_cache import cache_to_device

ROWS = {
    "a": "exp001 step (stage 2), uint8 pairs on device",
    "a2": "the same, backbones fused (grouped convs)",
    "b": "reference: one backbone over 2B images",
    "c1": "end to end, stage 1 (backbones frozen)",
    "c": "end to end: JPEG > cache > loader > step",
    "d": "naive: PIL + torchvision per step, fp32",
    "e1": "inference on the cache, 1 view",
    "e": "inference on the cache, 8-view TTA",
}


# ----------------------------------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so a later block's resident-set growth is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak allocated device memory (CUDA) or, on CPU, the growth of this process's peak resident set over the
    block (Linux: the peak is reset through /proc/self/clear_refs); ``peak`` stays None where neither works."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._base = device, None, None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _malloc_trim()
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # resets VmHWM to the current resident set
                self._base = _proc_status_bytes("VmRSS")
            except (OSError, StopIteration):
                self._base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self._base is not None:
            self.peak = max(0, _proc_status_bytes("VmHWM") - self._base)


def timed_steps(batches: Iterator, step: Callable, warmup: int, steps: int,
                device: torch.device) -> tuple[float, float]:
    """Seconds taken by ``steps`` steps after ``warmup`` untimed ones, and the share spent waiting for batches."""
    for _ in range(warmup):
        step(next(batches))
    _sync(device)
    wait, start = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        step(batch)
    _sync(device)
    total = time.perf_counter() - start
    return total, wait / total


def _row(pairs: int, seconds: float, mem: PeakMemory, **extra) -> dict:
    return {"pairs_per_s": pairs / seconds, "pairs": pairs, "seconds": seconds, "peak_mem_bytes": mem.peak, **extra}


# ----------------------------------------------------------------------------------------------------
# the real training step
# ----------------------------------------------------------------------------------------------------
@dataclass
class Trainer:
    cfg: Config
    device: torch.device
    model: nn.Module
    augment: DeviceAugment
    stage: Stage
    objective: Callable
    gen: torch.Generator

    def step(self, clin: torch.Tensor, derm: torch.Tensor, meta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """src.step.train_step, as training calls it for exp001 (no mixing, EMA or aux head)."""
        return train_step(self.cfg, self.stage, self.objective, clin, derm, meta, y)

    def pair_step(self, batch) -> float:
        """One step from a PairDataset batch: to the device, DeviceAugment's train path, then ``step``."""
        pairs, meta, y = batch[:3]
        pairs = pairs.to(self.device, non_blocking=True)
        meta, y = meta.to(self.device), y.to(self.device)
        clin, derm = self.augment.train(pairs, self.gen)
        return self.step(clin, derm, meta, y)


def build(cfg: Config, device: torch.device, n_meta: int) -> tuple[nn.Module, DeviceAugment]:
    """Model and augmentation exactly as training sets them up (the experiment's ``recipe.build``)."""
    torch.manual_seed(cfg.seed)
    return experiment_recipe(cfg.experiment).build(cfg, n_meta, 0, device)


def make_trainer(cfg: Config, device: torch.device, n_meta: int, y: np.ndarray, stage: int,
                 steps_per_epoch: int) -> Trainer:
    recipe = experiment_recipe(cfg.experiment)
    model, augment = build(cfg, device, n_meta)
    built = build_stage(cfg, model, stage, steps_per_epoch, device, optimizer=recipe.optimizer)
    built.train_mode()
    return Trainer(cfg, device, model, augment, built, recipe.loss.objective(cfg, y),
                   torch.Generator().manual_seed(cfg.seed))


# ----------------------------------------------------------------------------------------------------
# data: generated JPEGs in the official layout and their prepared cache
# ----------------------------------------------------------------------------------------------------
@dataclass
class BenchData:
    train: pd.DataFrame
    cache: np.ndarray        # uint8 (n, 2, S, S, 3)
    meta: np.ndarray         # float32 (n, n_meta)
    y: np.ndarray            # float32 (n, 11)
    targets: np.ndarray
    cache_seconds: float
    cache_workers: int

    @property
    def n(self) -> int:
        return len(self.train)


def prepare_data(cfg: Config, n_lesions: int, root: Path) -> BenchData:
    data_dir = generate(root / "milk10k", n_train=n_lesions, n_test=0, seed=cfg.seed)
    train = load_train(data_dir)
    workers = max(1, os.cpu_count() or 1)  # as src.batches.prepare builds the cache
    start = time.perf_counter()
    cache = build_cache(train, cfg.img_size, root / "cache", "train", num_workers=workers, progress=False)
    seconds = time.perf_counter() - start
    meta = experiment_recipe(cfg.experiment).features(cfg).fit(train).transform(train)
    return BenchData(train, cache, meta, train[CLASSES].to_numpy(np.float32), train["target"].to_numpy(),
                     seconds, workers)


def _order(cfg: Config, data: BenchData, batch: int, need: int) -> np.ndarray:
    """Consecutive epoch orders of the training loop, long enough for ``need`` samples in one pass."""
    parts, total, epoch = [], 0, 0
    while total < need:
        parts.append(epoch_order(cfg, data.n, data.targets, 0, epoch, batch))
        total, epoch = total + len(parts[-1]), epoch + 1
    return np.concatenate(parts)[:need]


class NaiveDataset(torch.utils.data.Dataset):
    """What a plain implementation does: decode both JPEGs with PIL and run torchvision transforms, every step."""

    def __init__(self, train: pd.DataFrame, meta: np.ndarray, y: np.ndarray, transform: Callable):
        self.clin, self.derm = train["clin_path"].tolist(), train["derm_path"].tolist()
        self.meta, self.y, self.transform = meta, y, transform

    def __len__(self) -> int:
        return len(self.clin)

    def _load(self, path: str) -> torch.Tensor:
        with Image.open(path) as img:
            return self.transform(img.convert("RGB"))

    def __getitem__(self, i: int):
        return self._load(self.clin[i]), self._load(self.derm[i]), self.meta[i], self.y[i]


def naive_transform(cfg: Config, mean, std):
    from torchvision import transforms as T

    c = cfg.aug_color
    return T.Compose([T.Resize((cfg.img_size, cfg.img_size)), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                      T.RandomRotation(cfg.aug_rotate), T.ColorJitter(brightness=c, contrast=c, saturation=c),
                      T.ToTensor(), T.Normalize(mean, std)])


# ----------------------------------------------------------------------------------------------------
# the rows
# ----------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    cfg: Config
    device: torch.device
    steps: int
    warmup: int
    workers: int
    steps_per_epoch: int     # of a real fold, for the learning-rate schedule
    out_dir: Path
    profile: bool
    on_device: bool = False  # rows c1, c, e1, e gather from the image cache in device memory


def bench_device_tensors(s: Settings, data: BenchData, tag: str, **overrides) -> dict:
    """Rows a, a2, b and the variants of a: the training step on uint8 pairs already on the device (no loader)."""
    cfg, dev, b = s.cfg.replace(**overrides), s.device, s.cfg.batch_size
    rows = np.resize(np.arange(data.n), b)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = (torch.randint(0, 256, (b, 2, cfg.img_size, cfg.img_size, 3), generator=gen, dtype=torch.uint8).to(dev),
             torch.from_numpy(data.meta[rows]).to(dev), torch.from_numpy(data.y[rows]).to(dev))
    with PeakMemory(dev) as mem:
        tr = make_trainer(cfg, dev, data.meta.shape[1], data.y, 2, s.steps_per_epoch)
        seconds, _ = timed_steps(itertools.repeat(batch), tr.pair_step, s.warmup, s.steps, dev)
    row = _row(s.steps * b, seconds, mem, params=count_parameters(tr.model), fused=isinstance(tr.model, FusedDualNet))
    if s.profile and tag in ("a", "a2"):
        row["profile"] = write_profile(s, tr, batch, seconds / s.steps, tag)
    return row


def bench_loader(s: Settings, data: BenchData, stage: int) -> dict:
    """Rows c1 and c: the training loop's batches (src.batches.training_batches: a DataLoader over the memory-mapped
    cache, or batches gathered from its copy in device memory) feeding the real step."""
    cfg, dev, b = s.cfg, s.device, s.cfg.batch_size
    order = _order(cfg, data, b, (s.warmup + s.steps) * b)
    aux = np.full(data.n, -100, np.int64)
    with PeakMemory(dev) as mem:
        images = cache_to_device(data.cache, dev) if s.on_device else data.cache
        loader = training_batches(images, np.arange(data.n), data.meta, data.y, aux, b, s.workers, dev)
        loader.set_order(order)
        tr = make_trainer(cfg, dev, data.meta.shape[1], data.y, stage, s.steps_per_epoch)
        seconds, wait = timed_steps(iter(loader), tr.pair_step, s.warmup, s.steps, dev)
    return _row(s.steps * b, seconds, mem, data_wait_frac=wait, cache_on_device=s.on_device)


def bench_naive(s: Settings, data: BenchData) -> dict:
    """Row d: PIL + torchvision in a default DataLoader, fp32 without channels_last, same model and optimiser.
    The sampler only draws enough samples for every step in one pass, so no worker restarts are timed."""
    cfg, dev, b = s.cfg.replace(amp=False, channels_last=False), s.device, s.cfg.batch_size
    with PeakMemory(dev) as mem:
        tr = make_trainer(cfg, dev, data.meta.shape[1], data.y, 2, s.steps_per_epoch)
        ds = NaiveDataset(data.train, data.meta, data.y, naive_transform(cfg, tr.model.mean, tr.model.std))
        sampler = torch.utils.data.RandomSampler(ds, num_samples=(s.warmup + s.steps) * b,
                                                 generator=torch.Generator().manual_seed(cfg.seed))
        loader = torch.utils.data.DataLoader(ds, batch_size=b, sampler=sampler, num_workers=s.workers)

        def step(batch) -> float:
            clin, derm, meta, y = (t.to(dev) for t in batch)
            return tr.step(clin, derm, meta, y)

        seconds, wait = timed_steps(iter(loader), step, s.warmup, s.steps, dev)
    return _row(s.steps * b, seconds, mem, data_wait_frac=wait)


def bench_predict(s: Settings, data: BenchData, views: int) -> dict:
    """Rows e1 and e: src.inference.predict on the cache, over at least ``steps`` training batches' worth of pairs."""
    cfg, dev = s.cfg, s.device
    rows = np.resize(np.arange(data.n), max(data.n, s.steps * cfg.batch_size))
    meta = data.meta[rows]
    with PeakMemory(dev) as mem:
        model, augment = build(cfg, dev, data.meta.shape[1])
        images = cache_to_device(data.cache, dev) if s.on_device else data.cache
        warm = min(len(rows), cfg.eval_batch_size * max(1, s.warmup))
        link = experiment_recipe(cfg.experiment).loss.link(cfg)
        predict(model, link, cfg, images, rows[:warm], meta[:warm], augment, dev, views, "warm-up")
        _sync(dev)
        start = time.perf_counter()
        predict(model, link, cfg, images, rows, meta, augment, dev, views, "bench")
        _sync(dev)
        seconds = time.perf_counter() - start
    return _row(len(rows), seconds, mem, views=views)


def write_profile(s: Settings, tr: Trainer, batch, step_seconds: float, tag: str = "a") -> dict:
    """torch.profiler over a few more steps of row ``tag``: the 15 ops with the most self device (CPU on CPU)
    time, how busy that time keeps the device during a timed step (well under 100% means the host cannot keep up),
    and how many device kernels (CUDA) or aten ops (CPU) one step launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = s.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    n = max(1, min(s.steps, 5))
    with profile(activities=activities) as prof:
        for _ in range(n):
            tr.pair_step(batch)
        _sync(s.device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    if cuda:  # kernels only: an op's self device time repeats its kernels' time
        kernels = [e for e in events
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        busy_us = sum(e.self_device_time_total for e in kernels)
        launches = sum(e.count for e in kernels)
    else:
        busy_us = sum(e.self_cpu_time_total for e in events)
        launches = sum(e.count for e in events if e.key.startswith("aten::"))
    busy_ms = busy_us / 1e3 / n
    unit = "device kernels" if cuda else "aten ops"
    info = {"path": str(s.out_dir / f"profile_{tag}_{s.device.type}.txt"), "steps": n, "sorted_by": key,
            "self_ms_per_step": busy_ms, "timed_ms_per_step": step_seconds * 1e3,
            "busy_frac": busy_ms / (step_seconds * 1e3), "launches_per_step": launches / n, "launch_unit": unit}
    text = (f"torch.profiler, row {tag} ({ROWS[tag]}), {n} steps of batch {s.cfg.batch_size}, {s.cfg.backbone}, "
            f"{s.cfg.img_size} px, on {device_name(s.device)}; sorted by {key}\n"
            f"{'device' if cuda else 'CPU'} self time {busy_ms:.1f} ms per step; a timed step (unprofiled) takes "
            f"{step_seconds * 1e3:.1f} ms: busy {info['busy_frac']:.0%}; {launches / n:.0f} {unit} per step\n\n"
            + events.table(sort_by=key, row_limit=15) + "\n")
    atomic_write_text(info["path"], text)
    return info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"
