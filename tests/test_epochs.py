"""What happens epoch by epoch and step by step, pinned against values computed here by hand: which epochs mix
(history.csv and the calls the mixing part gets), the learning rate of every optimiser step of both stages, also
after a resume inside stage 2, and the eight TTA views against the eight symmetries of the square."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

import src.train as train_module
from src.batches import prepare
from src.config import load_config
from src.step import MixupCutmix

from .conftest import tiny
from .test_fold_loop import FOLD, history, stop_after, train


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("epochs_cache")


def test_mixing_is_on_exactly_in_the_stage_2_epochs_before_the_last_mix_off_epochs(mini_data, tmp_path, cache_dir,
                                                                                   monkeypatch):
    """exp002's mixing (mixup 0.4, cutmix 1.0) with 2 stage-1 epochs, 4 stage-2 epochs and mix_off_epochs=1: epochs
    3, 4, 5 mix and 1, 2, 6 do not; history.csv says so and the mixing part is called on every batch of exactly
    those epochs."""
    calls: Counter = Counter()
    real = MixupCutmix.__call__
    epoch_now = {}

    def counting(self, cfg, *args):
        calls[epoch_now["e"]] += 1
        return real(self, cfg, *args)

    real_epoch = train_module.train_epoch

    def tracking(run, stage, epoch):
        epoch_now["e"] = epoch + 1
        return real_epoch(run, stage, epoch)

    monkeypatch.setattr(MixupCutmix, "__call__", counting)
    monkeypatch.setattr(train_module, "train_epoch", tracking)
    cfg = load_config("exp002", tiny(mini_data, tmp_path, cache_dir=cache_dir, device="cpu", tta=False,
                                     stage1_epochs=2, epochs=4, mix_off_epochs=1, patience=20, ema_decay=0.0))
    assert (cfg.mixup_alpha, cfg.cutmix_alpha) == (0.4, 1.0)
    train(cfg, FOLD, prepare(cfg))
    steps = 96 // cfg.batch_size                                    # 120 lesions, 5 folds, the last batch dropped
    assert history(cfg)["mixing"].tolist() == [0, 0, 1, 1, 1, 0]
    assert dict(calls) == {3: steps, 4: steps, 5: steps}


def test_no_epoch_mixes_without_mixup_or_cutmix(mini_data, tmp_path, cache_dir):
    cfg = load_config("exp001", tiny(mini_data, tmp_path, cache_dir=cache_dir, device="cpu", tta=False,
                                     stage1_epochs=1, epochs=2, patience=20))
    train(cfg, FOLD, prepare(cfg))
    assert history(cfg)["mixing"].tolist() == [0, 0, 0]


def expected_lrs(cfg, steps: int) -> list[tuple[float, ...]]:
    """The learning rates of every optimiser step, from the schedules' definitions: stage 1 (exp001) the classifier
    at stage1_lr x cosine from 1 to 0.01 over the stage; stage 2 the backbones and the head at backbone_lr and lr x
    (linear warmup over warmup_epochs, then cosine from 1 to 0.01 over the rest of stage 2)."""
    def cosine(t):
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    out = [(cfg.stage1_lr * cosine(min(1.0, k / (cfg.stage1_epochs * steps))),)
           for k in range(cfg.stage1_epochs * steps)]
    warm, total = int(cfg.warmup_epochs * steps), cfg.epochs * steps
    for k in range(total):
        f = (k + 1) / warm if k < warm else cosine(min(1.0, (k - warm) / max(1, total - warm)))
        out.append((cfg.backbone_lr * f, cfg.lr * f))
    return out


def record_step_lrs(monkeypatch) -> list[tuple[float, ...]]:
    """The learning rate of every parameter group at every optimiser step, as the step uses it."""
    seen = []
    real = train_module.train_step

    def recording(cfg, stage, *args, **kwargs):
        seen.append(tuple(g["lr"] for g in stage.opt.param_groups))
        return real(cfg, stage, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", recording)
    return seen


@pytest.mark.parametrize("resume_after", [None, 2], ids=["uninterrupted", "resumed-mid-stage-2"])
def test_every_steps_learning_rate_follows_the_schedule_also_after_a_resume(mini_data, tmp_path, cache_dir,
                                                                           monkeypatch, resume_after):
    """Catches a resume that restarts stage 2's schedule (or its warmup) instead of continuing it: the steps trained
    after the resume use exactly the rates the schedule gives those steps."""
    cfg = load_config("exp001", tiny(mini_data, tmp_path, cache_dir=cache_dir, device="cpu", tta=False,
                                     stage1_epochs=2, epochs=3, warmup_epochs=0.5, patience=20))
    assert cfg.stage1_schedule == "cosine"
    data = prepare(cfg)
    steps = 96 // cfg.batch_size
    expected = expected_lrs(cfg, steps)
    if resume_after is not None:
        stop_after(monkeypatch, cfg, data, resume_after)
        expected = expected[(resume_after + 1) * steps:]
    seen = record_step_lrs(monkeypatch)
    train(cfg, FOLD, data)
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected):
        assert got == pytest.approx(want, rel=1e-9)
    lr_head = history(cfg)["lr_head"].tolist()                      # history: the head's rate after each epoch's
    assert lr_head[-1] == pytest.approx(cfg.lr * 0.01, rel=1e-9)    # last step; stage 2 ends at 1% of lr


def test_the_eight_tta_views_are_the_eight_symmetries_of_the_square():
    """Each view of an asymmetric picture against numpy's flips and transposes: all eight distinct, none missing."""
    from src.augment import DeviceAugment

    rng = np.random.default_rng(0)
    pairs = torch.from_numpy(rng.integers(0, 256, (1, 2, 5, 5, 3), dtype=np.uint8))
    aug = DeviceAugment((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    clin = pairs[0, 0].numpy().astype(np.float32) / 255.0               # (H, W, C)
    expected = {(h, v, t): np.transpose(clin[::-1 if v else 1, ::-1 if h else 1], (1, 0, 2) if t else (0, 1, 2))
                for h in (0, 1) for v in (0, 1) for t in (0, 1)}
    seen = []
    for view in range(8):
        got = aug.eval(pairs, view)[0][0].permute(1, 2, 0).numpy()
        want = expected[(view & 1, (view >> 1) & 1, (view >> 2) & 1)]
        np.testing.assert_allclose(got, want, atol=1e-6)
        seen.append(got.tobytes())
    assert len(set(seen)) == 8
