"""The prepared image cache held in device memory (``cache_on_device``), and training batches gathered there.

``DeviceBatches`` yields exactly the batches that ``PairDataset`` + ``EpochSampler`` + a DataLoader give (same
items, order, sharding over ranks and batch size), with one index copy per epoch and no loader processes or host
copies of images.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def resolve_cache_on_device(setting: str, device: torch.device, nbytes: int) -> bool:
    """Config.cache_on_device: 'yes', 'no', or 'auto' (CUDA, and the caches take <= 10% of the GPU's memory and
    <= half its free memory, leaving training its room on a 24 GB card)."""
    if setting != "auto":
        return setting == "yes"
    if device.type != "cuda":
        return False
    free, total = torch.cuda.mem_get_info(device)
    return nbytes <= 0.1 * total and nbytes <= 0.5 * free


def cache_to_device(cache: np.ndarray, device: torch.device, chunk: int = 256) -> torch.Tensor:
    """A copy of a (memory-mapped) uint8 cache in device memory, read in chunks so the host never holds it whole."""
    out = torch.empty(cache.shape, dtype=torch.uint8, device=device)
    for start in range(0, len(cache), chunk):
        out[start:start + chunk].copy_(torch.from_numpy(np.array(cache[start:start + chunk])))
    return out


class DeviceBatches:
    """(images, metadata, labels, aux) batches of ``rows`` gathered from ``images`` in device memory, in the order
    set by ``set_order`` for each epoch; a rank of a distributed run takes every world-th index."""

    def __init__(self, images: torch.Tensor, rows: np.ndarray, meta: np.ndarray, y: np.ndarray, aux: np.ndarray,
                 batch_size: int, rank: int = 0, world: int = 1):
        dev = images.device
        self.images, self.batch_size, self.rank, self.world = images, batch_size, rank, world
        self.rows = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=dev)
        self.meta, self.y = torch.as_tensor(meta, device=dev), torch.as_tensor(y, device=dev)
        self.aux = torch.as_tensor(aux, device=dev)
        self.order = np.arange(len(rows))

    def set_order(self, order: np.ndarray) -> None:
        self.order = order

    def __len__(self) -> int:
        return math.ceil(len(self.order[self.rank::self.world]) / self.batch_size)

    def __iter__(self):
        idx = torch.from_numpy(np.ascontiguousarray(self.order[self.rank::self.world], dtype=np.int64))
        dev = self.images.device
        idx = idx.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else idx
        for start in range(0, len(idx), self.batch_size):
            i = idx[start:start + self.batch_size]
            yield self.images[self.rows[i]], self.meta[i], self.y[i], self.aux[i]
