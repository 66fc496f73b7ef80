"""One training step and the library's parts for it: the model on its device, mixing, each stage's optimiser.

Stage 1 trains the head with the backbones frozen (their BatchNorm statistics too); stage 2 trains everything, the
backbones at a lower learning rate, with warmup + cosine and an optional EMA of the weights. ``build_stage`` makes
a stage's optimiser (an experiment's ``optimizer`` part; ``stage_optimizer`` by default), EMA and runner once;
``train_step`` is the step itself, shared by training and the benchmark. ``stage_optimizer`` (``OPTIMIZER_KEYS``)
and ``MixupCutmix`` (``MIXING_KEYS``) are the default optimiser and mixing parts an experiment's recipe may replace;
the loss part is src/loss.py's.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .augment import DeviceAugment, device_augment
from .config import Config
from .dist import DistContext
from .model import DualNet
from .settings import key, reads
from .speed.apply import accelerate, load_plain_state, plain_state, runner as speed_runner


def setup_model(cfg: Config, net: DualNet, device: torch.device, world: int = 1,
                augment: Callable = device_augment) -> tuple[nn.Module, DeviceAugment]:
    """The network with its speed machinery (src/speed/apply.py) on its device (channels_last and cuDNN autotuning
    on CUDA), and its augmentation (``augment``: the recipe's augmentation part)."""
    model = accelerate(net, cfg, world).to(device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, augment(cfg, model.mean, model.std, channels_last)


def autocast(cfg: Config, device: torch.device):
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------------------------------
# mixing
# ----------------------------------------------------------------------------------------------------
MIXING_KEYS = {
    "mixup_alpha": key(0.0, "mixup Beta(alpha, alpha); 0 = off", results=True, low=0),
    "cutmix_alpha": key(0.0, "cutmix Beta(alpha, alpha); 0 = off", results=True, low=0),
    "mix_off_epochs": key(0, "switch mixup/cutmix off for the last N epochs of stage 2", results=True, low=0),
}


class MixupCutmix:
    """The mixing part: ``active(cfg, stage, epoch, total_epochs)`` says whether an epoch mixes (with mixup or cutmix
    on: stage 2 up to its last ``mix_off_epochs`` epochs); calling it mixes a batch (``mix``)."""

    keys = MIXING_KEYS

    def active(self, cfg: Config, stage: int, epoch: int, total_epochs: int) -> bool:
        on, last = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0, total_epochs - cfg.mix_off_epochs
        return on and stage == 2 and epoch < last

    def __call__(self, cfg: Config, clin, derm, meta, y, gen: torch.Generator):
        return mix(cfg, clin, derm, meta, y, gen)


def mix(cfg: Config, clin, derm, meta, y, gen: torch.Generator):
    """Mixup or CutMix of both images, the metadata and the targets with one partner permutation."""
    use_mix = cfg.mixup_alpha > 0
    use_cut = cfg.cutmix_alpha > 0
    if not (use_mix or use_cut):
        return clin, derm, meta, y
    cut = use_cut and (not use_mix or torch.rand(1, generator=gen).item() < 0.5)
    alpha = cfg.cutmix_alpha if cut else cfg.mixup_alpha
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen))).beta(alpha, alpha))
    perm = torch.randperm(y.shape[0], generator=gen)
    perm = perm.pin_memory().to(y.device, non_blocking=True) if y.is_cuda else perm
    if cut:
        s = clin.shape[-1]
        cut_w = int(s * math.sqrt(1 - lam))
        cx, cy = (int(v) for v in torch.randint(0, s, (2,), generator=gen))
        x0, x1, y0, y1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, s), max(cy - cut_w // 2, 0), min(cy + cut_w // 2, s)
        clin, derm = clin.clone(), derm.clone()
        clin[..., y0:y1, x0:x1] = clin[perm][..., y0:y1, x0:x1]
        derm[..., y0:y1, x0:x1] = derm[perm][..., y0:y1, x0:x1]
        lam = 1 - (x1 - x0) * (y1 - y0) / (s * s)
    else:
        clin = lam * clin + (1 - lam) * clin[perm]
        derm = lam * derm + (1 - lam) * derm[perm]
    meta = lam * meta + (1 - lam) * meta[perm]
    return clin, derm, meta, lam * y + (1 - lam) * y[perm]


# ----------------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------------
def cosine_factor(t: float) -> float:
    """The cosine schedule's factor at fraction ``t`` of its steps: from 1 down to 0.01."""
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


def lr_lambda(cfg: Config, steps_per_epoch: int) -> Callable[[int], float]:
    """Stage 2's learning-rate factor per step: linear warmup over ``warmup_epochs``, then cosine from 1 to 0.01
    over the remaining steps of ``epochs`` (or constant)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return cosine_factor(min(1.0, (step - warm) / max(1, total - warm)))

    return f


OPTIMIZER_KEYS = {
    "stage1_lr": key(1e-3, "learning rate of stage 1", results=True, low=0, low_open=True),
    "lr": key(3e-4, "stage-2 learning rate of the head", results=True, low=0, low_open=True),
    "backbone_lr": key(5e-5, "stage-2 learning rate of the backbones", results=True, low=0),
    "weight_decay": key(1e-2, "AdamW weight decay", results=True, low=0),
    "warmup_epochs": key(1.0, "linear warmup of stage 2, in epochs", results=True, low=0),
    "schedule": key("cosine", "stage-2 schedule: 'cosine' or 'constant'", results=True,
                    choices=("cosine", "constant")),
}


@reads(OPTIMIZER_KEYS)
def stage_optimizer(cfg: Config, model: nn.Module, stage: int, steps_per_epoch: int, fused: bool):
    """The default optimiser part: (AdamW, LambdaLR) of a stage. Stage 1: the head at ``stage1_lr``, constant;
    stage 2: the backbones at ``backbone_lr`` and the head at ``lr``, warmup + ``schedule``."""
    if stage == 1:
        opt = torch.optim.AdamW(model.head_parameters(), lr=cfg.stage1_lr, weight_decay=cfg.weight_decay, fused=fused)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    groups = [{"params": list(model.backbone_parameters()), "lr": cfg.backbone_lr},
              {"params": model.head_parameters(), "lr": cfg.lr}]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=fused)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps_per_epoch))


@dataclass
class Stage:
    """What one stage trains with: the optimiser and its schedule, the EMA (stage 2, ``ema_decay``), the runner
    (the model, wrapped for DDP and torch.compile as configured) and the parameters it updates."""

    number: int
    model: nn.Module
    runner: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ema: nn.Module | None
    params: list

    def train_mode(self) -> None:
        self.model.train()
        if self.number == 1:  # frozen backbones keep their BatchNorm statistics
            for b in self.model.backbones():
                b.eval()

    def eval_model(self) -> nn.Module:
        """The weights that are validated and saved: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "ema": plain_state(self.ema.module) if self.ema is not None else None}

    def load_state(self, saved: dict) -> None:
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        if self.ema is not None and saved.get("ema") is not None:
            load_plain_state(self.ema.module, saved["ema"])


def build_stage(cfg: Config, model: nn.Module, number: int, steps_per_epoch: int, device: torch.device,
                dist: DistContext | None = None, optimizer: Callable = stage_optimizer) -> Stage:
    """Freeze or unfreeze the backbones and make stage ``number``'s optimiser and schedule (``optimizer``, an
    experiment's part), EMA and runner."""
    for p in model.backbone_parameters():
        p.requires_grad_(number == 2)
    opt, sched = optimizer(cfg, model, number, steps_per_epoch, device.type == "cuda")
    ema = None
    if number == 2 and cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    run = speed_runner(model, cfg, dist or DistContext.single())
    return Stage(number, model, run, opt, sched, ema, [p for p in model.parameters() if p.requires_grad])


def train_step(cfg: Config, stage: Stage, objective: Callable, clin, derm, meta, y,
               aux: torch.Tensor | None = None) -> torch.Tensor:
    """Forward, loss (``objective``: the loss part's, src/loss.py), backward, clip, optimiser and schedule step.
    Returns the loss as a device tensor: reading it here would make the host wait for the GPU every step."""
    with autocast(cfg, clin.device):
        logits, aux_logits = stage.runner(clin, derm, meta)
        loss = objective(logits.float(), y, aux_logits, aux)  # soft (mixed) targets work for both losses
    stage.opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(stage.params, cfg.grad_clip)
    stage.opt.step()
    stage.sched.step()
    return loss.detach()
