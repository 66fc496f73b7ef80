"""Inference: probabilities of a set of lesions, averaged over flip/transpose views (test-time augmentation), and
the validation score that picks a fold's best epoch. Logits become probabilities through the experiment's loss part
(its ``link``, src/loss.py), in every view before the views are averaged."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .augment import DeviceAugment
from .config import Config
from .data import CLASSES
from .scoring import f1_per_class, fold_metrics
from .step import autocast


@torch.no_grad()
def predict(model: nn.Module, link: Callable, cfg: Config, cache: np.ndarray | torch.Tensor, rows: np.ndarray,
            meta: np.ndarray, augment: DeviceAugment, device: torch.device, views: int = 1,
            desc: str = "predict") -> np.ndarray:
    """Probabilities (n, 11): ``link`` (the loss part's) of the logits, averaged over the first ``views`` of the 8
    flip/transpose views. ``cache`` is the memory-mapped image cache or its copy in device memory
    (``Prepared.images``)."""
    model.eval()
    out = []
    amp = autocast(cfg, device)
    on_device = isinstance(cache, torch.Tensor)
    if on_device:
        rows_t = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=cache.device)
    for start in tqdm(range(0, len(rows), cfg.eval_batch_size), desc=desc, leave=False, disable=None):
        sl = slice(start, start + cfg.eval_batch_size)
        if on_device:
            pairs = cache[rows_t[sl]].to(device)
        else:
            pairs = torch.from_numpy(np.ascontiguousarray(cache[rows[sl]])).to(device, non_blocking=True)
        m = torch.from_numpy(meta[sl]).to(device)
        acc = 0
        for v in range(views):
            clin, derm = augment.eval(pairs, v)
            with amp:
                logits, _ = model(clin, derm, m)
            acc = acc + link(logits.float())
        out.append((acc / views).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


@torch.no_grad()
def embeddings(model: nn.Module, cfg: Config, cache: np.ndarray | torch.Tensor, rows: np.ndarray,
               augment: DeviceAugment, device: torch.device, views: int = 1, desc: str = "embed") -> np.ndarray:
    """The backbones' joint embedding of each lesion (``model.embed``: clinical and dermoscopic, side by side), float64,
    averaged over the first ``views`` of the 8 flip/transpose views: what a fold's model without MONET reads beside
    the metadata (src/train.py)."""
    model.eval()
    out = []
    amp = autocast(cfg, device)
    on_device = isinstance(cache, torch.Tensor)
    for start in tqdm(range(0, len(rows), cfg.eval_batch_size), desc=desc, leave=False, disable=None):
        sl = np.asarray(rows)[start:start + cfg.eval_batch_size]
        pairs = (cache[torch.as_tensor(sl, device=cache.device)] if on_device
                 else torch.from_numpy(np.ascontiguousarray(cache[sl]))).to(device)
        acc = 0
        for v in range(views):
            clin, derm = augment.eval(pairs, v)
            with amp:
                acc = acc + model.embed(clin, derm).float()
        out.append((acc / views).cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, 0))


def selection_score(metric: str, y: np.ndarray, probs: np.ndarray, per_class: np.ndarray) -> float:
    """The validation score that picks the best epoch (see Config.early_stop_metric)."""
    if metric == "f1":
        return float(per_class.mean())
    if metric == "f1_tuned":
        from .decision import tune_thresholds

        t = tune_thresholds(y, probs)
        return float(f1_per_class(y, probs > t[None, :]).mean())
    auc = fold_metrics(y, probs)["auc_macro"]
    return float(auc) if auc is not None else 0.0
