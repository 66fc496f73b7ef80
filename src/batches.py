"""Where training batches come from: the lesions with their prepared image caches, and each epoch's batches.

An epoch's order is derived from (seed, fold, epoch) alone (``epoch_order``), so a resumed run sees the batches an
uninterrupted one would. Batches are uint8 image pairs ``(B, 2, S, S, 3)`` plus metadata features, labels and the
auxiliary label, read from the memory-mapped cache by a DataLoader, or gathered from its copy in device memory
(src/speed/device_cache.py); both give the same batches item for item.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .cache import HASHES, build_cache
from .config import Config
from .data import CLASSES
from .experiment import Lesions, data_fingerprint, load_lesions
from .speed.device_cache import DeviceBatches, cache_to_device, resolve_cache_on_device


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_workers(cfg: Config, device: torch.device) -> int:
    """DataLoader worker processes: ``num_workers``, or with -1 up to 8 on CUDA and none on the CPU."""
    if cfg.num_workers >= 0:
        return cfg.num_workers
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


def cache_workers(cfg: Config) -> int:
    """Decode processes of the one-time image-cache build and of predict: ``num_workers`` (0 or 1 = this process),
    or with -1 one per CPU core; never more than this machine's cores (os.cpu_count())."""
    cores = max(1, os.cpu_count() or 1)
    return min(max(1, cfg.num_workers), cores) if cfg.num_workers >= 0 else cores


# ----------------------------------------------------------------------------------------------------
# the lesions and their image caches, shared by every fold of a process
# ----------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    train: pd.DataFrame
    test: pd.DataFrame
    folds: np.ndarray          # fold index per train lesion
    train_cache: np.ndarray    # uint8 (n, 2, S, S, 3)
    test_cache: np.ndarray
    data_print: dict = field(default_factory=dict)  # experiment.data_fingerprint of these lesions and images
    _on_device: dict = field(default_factory=dict, repr=False)

    @property
    def lesions(self) -> Lesions:
        return Lesions(self.train, self.test, self.folds)

    def images(self, cfg: Config, device: torch.device) -> tuple:
        """(train images, test images, on_device): the memory-mapped caches, or their copies in device memory as
        Config.cache_on_device decides. The copies are made once per process and device and every later fold
        reuses them (an 'auto' decision is not re-taken once the copies themselves fill part of the memory)."""
        key = str(device)
        if cfg.cache_on_device == "no":
            on = False
        else:
            on = key in self._on_device or resolve_cache_on_device(
                cfg.cache_on_device, device, self.train_cache.nbytes + self.test_cache.nbytes)
        if not on:
            return self.train_cache, self.test_cache, False
        if key not in self._on_device:
            self._on_device[key] = (cache_to_device(self.train_cache, device), cache_to_device(self.test_cache, device))
        return (*self._on_device[key], True)


def prepare(cfg: Config, lesions: Lesions | None = None) -> Prepared:
    """The lesions (``lesions`` when already loaded), their folds and the image caches at ``cfg.img_size``, built
    once."""
    lesions = lesions if lesions is not None else load_lesions(cfg, check_images=True)
    workers, cache_dir = cache_workers(cfg), cfg.resolved_cache_dir()
    train_cache = build_cache(lesions.train, cfg.img_size, cache_dir, "train", num_workers=workers)
    test_cache = build_cache(lesions.test, cfg.img_size, cache_dir, "test", num_workers=workers)
    return Prepared(lesions.train, lesions.test, lesions.folds, train_cache, test_cache,
                    data_fingerprint(lesions, images=True, hash_store=cache_dir / HASHES))


# ----------------------------------------------------------------------------------------------------
# one epoch's batches
# ----------------------------------------------------------------------------------------------------
class PairDataset(torch.utils.data.Dataset):
    """Item i -> (uint8 image pair (2, S, S, 3), metadata features, 11 labels, aux label) of lesion rows[i]."""

    def __init__(self, cache: np.ndarray, rows: np.ndarray, meta: np.ndarray, y: np.ndarray, aux: np.ndarray):
        self.cache, self.rows, self.meta, self.y, self.aux = cache, rows, meta, y, aux

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r = self.rows[i]
        return torch.from_numpy(np.array(self.cache[r])), self.meta[i], self.y[i], self.aux[i]


class EpochSampler(torch.utils.data.Sampler):
    """Order for one epoch, set from outside; a rank of a distributed run takes every world-th index, so the
    union of the ranks' k-th batches is exactly the k-th batch of a single-process run with the global batch."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.order, self.rank, self.world = np.arange(n), rank, world

    def set_order(self, order: np.ndarray) -> None:
        self.order = order

    def __iter__(self):
        return iter(self.order[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return len(self.order[self.rank::self.world])


class LoaderBatches:
    """A DataLoader over ``PairDataset`` with an ``EpochSampler``, behind the interface of ``DeviceBatches``:
    ``set_order`` per epoch, then iterate."""

    def __init__(self, cache: np.ndarray, rows: np.ndarray, meta: np.ndarray, y: np.ndarray, aux: np.ndarray,
                 batch_size: int, workers: int, pin_memory: bool, rank: int = 0, world: int = 1):
        self.sampler = EpochSampler(len(rows), rank, world)
        self.loader = torch.utils.data.DataLoader(PairDataset(cache, rows, meta, y, aux), batch_size=batch_size,
                                                  sampler=self.sampler, num_workers=workers, pin_memory=pin_memory,
                                                  drop_last=False, persistent_workers=workers > 0)

    def set_order(self, order: np.ndarray) -> None:
        self.sampler.set_order(order)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def training_batches(images: np.ndarray | torch.Tensor, rows: np.ndarray, meta: np.ndarray, y: np.ndarray,
                     aux: np.ndarray, batch_size: int, workers: int, device: torch.device, rank: int = 0,
                     world: int = 1) -> LoaderBatches | DeviceBatches:
    """The training batches of ``rows``: gathered in device memory when ``images`` already lives there
    (``Prepared.images``), otherwise read from the memory-mapped cache by a DataLoader."""
    if isinstance(images, torch.Tensor):
        return DeviceBatches(images, rows, meta, y, aux, batch_size, rank, world)
    return LoaderBatches(images, rows, meta, y, aux, batch_size, workers, device.type == "cuda", rank, world)


def epoch_seed(cfg: Config, fold: int, epoch: int) -> int:
    return int(np.random.SeedSequence([cfg.seed, fold, epoch]).generate_state(1)[0])


def epoch_order(cfg: Config, n: int, targets: np.ndarray, fold: int, epoch: int, global_batch: int) -> np.ndarray:
    """The epoch's sample order: a permutation, or class-balanced draws with replacement (``sampler_power``);
    the last partial global batch is dropped."""
    rng = np.random.default_rng(epoch_seed(cfg, fold, epoch))
    if cfg.sampler_power > 0:
        counts = np.bincount(targets, minlength=len(CLASSES)).astype(float)
        w = counts[targets] ** -cfg.sampler_power
        order = rng.choice(n, size=n, replace=True, p=w / w.sum())
    else:
        order = rng.permutation(n)
    usable = (n // global_batch) * global_batch if n >= global_batch else n
    return order[:usable]


def steps_per_epoch(cfg: Config, n_train: int) -> int:
    """Optimiser steps of one epoch over ``n_train`` lesions (the last partial global batch dropped)."""
    n_global = n_train if n_train < cfg.batch_size else (n_train // cfg.batch_size) * cfg.batch_size
    return math.ceil(n_global / cfg.batch_size)
