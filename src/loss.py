"""The loss part of an image experiment: what training minimises, and the link from logits to probabilities that
every prediction goes through (validation, out-of-fold, test, each TTA view, ``bash run.sh predict``).

A loss part is an object with

- ``keys``: the settings it reads (declared with ``key``, like every setting);
- ``criterion(cfg, y_train)`` -> ``fn(logits, targets)``: a scalar tensor from float32 logits (batch, 11) and float32
  targets (batch, 11: one-hot, or soft under mixup/cutmix); ``y_train`` are the fold's training labels (lesions, 11),
  for class weights;
- ``link(cfg)`` -> ``fn(logits)``: probabilities (batch, 11) from float32 logits, the inverse of what the criterion
  assumes (a sigmoid per class for a one-vs-rest loss, a softmax for a softmax loss);
- ``aux_weight(cfg)``: the weight of the auxiliary term, cross-entropy of the network's second output over the
  fine-grained ``diagnosis_full`` labels (0: none, and the network gets no auxiliary output).

``Loss`` is the base an experiment's own loss subclasses; ``objective`` adds the auxiliary term. ``WeightedLoss`` is
the library's: BCE or softmax cross-entropy with class weights.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .data import CLASSES
from .settings import Key, key


class Loss:
    """The base of a loss part (see the module's docstring)."""

    keys: dict[str, Key] = {}

    def criterion(self, cfg, y_train: np.ndarray) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def link(self, cfg) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def aux_weight(self, cfg) -> float:
        return 0.0

    def objective(self, cfg, y_train: np.ndarray) -> Callable:
        """``fn(logits, targets, aux_logits=None, aux=None)``: the criterion plus, where the network has an auxiliary
        output, ``aux_weight`` x its cross-entropy over the lesions whose fine-grained label is known (``aux`` >= 0)."""
        criterion, weight = self.criterion(cfg, y_train), self.aux_weight(cfg)

        def total(logits, y, aux_logits=None, aux=None):
            loss = criterion(logits, y)
            if aux_logits is not None and aux is not None:
                valid = aux >= 0
                aux_loss = F.cross_entropy(aux_logits.float(), aux.clamp(min=0), reduction="none")
                loss = loss + weight * (aux_loss * valid).sum() / valid.sum().clamp(min=1)
            return loss

        return total


def parse_class_mult(text: str) -> dict[str, float]:
    """'MAL_OTH=2,DF=1.5' -> {'MAL_OTH': 2.0, 'DF': 1.5}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, val = part.partition("=")
        if name not in CLASSES:
            raise ValueError(f"unknown class {name!r}; classes are {CLASSES}")
        try:
            out[name] = float(val)
        except ValueError:
            raise ValueError(f"{part!r} is not CLASS=number") from None
    return out


LOSS_KEYS = {
    "loss": key("bce", "'bce' (per-class sigmoid) or 'ce' (softmax cross-entropy); the link from logits to "
                "probabilities follows it", results=True, choices=("bce", "ce")),
    "pos_weight_power": key(1.0, "BCE pos_weight = (neg/pos) ** power, CE class weight = (n / (K * count)) ** "
                            "power; 0 = unweighted", results=True, low=0),
    "class_mult": key("", "extra per-class loss multipliers, e.g. 'MAL_OTH=2,DF=1.5'", results=True, text=True,
                      check=parse_class_mult),
    "label_smoothing": key(0.0, "label smoothing of the 'ce' loss", results=True, low=0, high=1, high_open=True),
    "aux_weight": key(0.0, "weight of the auxiliary diagnosis_full head (0 = off)", results=True, low=0),
}


def class_weights(cfg, y: np.ndarray) -> torch.Tensor:
    """BCE pos_weight (neg/pos) ** power, or CE class weight (n / (K * count)) ** power, times class_mult."""
    pos = y.sum(0).clip(min=1)
    if cfg.loss == "bce":
        w = ((len(y) - pos) / pos) ** cfg.pos_weight_power
    else:
        w = (len(y) / (len(CLASSES) * pos)) ** cfg.pos_weight_power
    for name, mult in parse_class_mult(cfg.class_mult).items():
        w[CLASSES.index(name)] *= mult
    return torch.tensor(w, dtype=torch.float32)


class WeightedLoss(Loss):
    """The library's loss: ``loss`` 'bce' (sigmoid per class) or 'ce' (softmax, with ``label_smoothing``), weighted
    per class by the training rows' counts (``pos_weight_power``, ``class_mult``), with the auxiliary term."""

    keys = LOSS_KEYS

    def criterion(self, cfg, y_train):
        weights, smoothing = class_weights(cfg, y_train), cfg.label_smoothing
        if cfg.loss == "bce":
            return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y,
                                                                        pos_weight=weights.to(logits.device))
        return lambda logits, y: F.cross_entropy(logits, y, weight=weights.to(logits.device),
                                                 label_smoothing=smoothing)

    def link(self, cfg):
        return torch.sigmoid if cfg.loss == "bce" else softmax

    def aux_weight(self, cfg) -> float:
        return cfg.aux_weight


def softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=1)
