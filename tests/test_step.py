"""The training step's parts on their own: class weights, the learning-rate schedule, mixing, stage building."""
import math

import numpy as np
import pytest
import torch

from src.config import experiment_recipe, load_config
from src.data import CLASSES
from src.loss import class_weights
from src.step import build_stage, lr_lambda, mix, setup_model


def _labels(counts):
    return np.repeat(np.eye(len(CLASSES)), counts, axis=0).astype(np.float32)


def test_class_weights_bce_ce_power_and_multipliers():
    counts = [10, 100, 1, 20, 5, 5, 1, 30, 40, 20, 5]
    y = _labels(counts)
    n, pos = len(y), np.array(counts, float)
    bce = class_weights(load_config("exp001"), y).numpy()
    np.testing.assert_allclose(bce, (n - pos) / pos, rtol=1e-6)
    half = class_weights(load_config("exp001", ["pos_weight_power=0.5"]), y).numpy()
    np.testing.assert_allclose(half, np.sqrt((n - pos) / pos), rtol=1e-6)
    assert np.all(class_weights(load_config("exp001", ["pos_weight_power=0"]), y).numpy() == 1)
    ce = class_weights(load_config("exp001", ["loss=ce"]), y).numpy()
    np.testing.assert_allclose(ce, n / (len(CLASSES) * pos), rtol=1e-6)
    mult = class_weights(load_config("exp001", ["class_mult=MAL_OTH=2,DF=0.5"]), y).numpy()
    np.testing.assert_allclose(mult / bce, [2 if c == "MAL_OTH" else 0.5 if c == "DF" else 1 for c in CLASSES],
                               rtol=1e-6)
    absent = _labels([10, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])  # a class without positives counts as one
    assert np.isfinite(class_weights(load_config("exp001"), absent).numpy()).all()


def test_lr_schedule_warms_up_then_follows_the_cosine_down_to_one_percent():
    cfg = load_config("exp001", ["epochs=4", "warmup_epochs=1"])
    f = lr_lambda(cfg, steps_per_epoch=10)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    mid = 10 + 15  # half way through the 30 cosine steps
    assert f(mid) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(40) == pytest.approx(0.01) and f(400) == pytest.approx(0.01)
    values = [f(s) for s in range(10, 41)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    const = lr_lambda(load_config("exp001", ["schedule=constant", "warmup_epochs=0"]), 10)
    assert {const(s) for s in (0, 5, 100)} == {1.0}


def _batch(b=8, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    clin, derm = torch.rand(b, 3, s, s, generator=g), torch.rand(b, 3, s, s, generator=g)
    meta = torch.rand(b, 5, generator=g)
    y = torch.eye(len(CLASSES))[torch.randint(0, len(CLASSES), (b,), generator=g)]
    return clin, derm, meta, y


def test_mix_off_returns_the_batch_unchanged():
    batch = _batch()
    out = mix(load_config("exp001"), *batch, torch.Generator().manual_seed(0))
    assert all(a is b for a, b in zip(out, batch))


def test_mixup_mixes_images_metadata_and_targets_with_one_partner_and_weight():
    clin, derm, meta, y = _batch()
    cfg = load_config("exp001", ["mixup_alpha=0.4"])
    mc, md, mm, my = mix(cfg, clin, derm, meta, y, torch.Generator().manual_seed(3))
    assert torch.allclose(my.sum(1), torch.ones(len(y)))           # soft targets still sum to one
    # each mixed row is lam * own + (1 - lam) * partner's, the same lam and partner in every tensor
    lam = None
    for i in range(len(y)):
        for j in range(len(y)):
            if j == i:
                continue
            a = (mm[i] - meta[j]) / (meta[i] - meta[j])
            if torch.allclose(a, a[0].expand_as(a), atol=1e-4):
                lam = float(a[0])
                assert torch.allclose(mc[i], lam * clin[i] + (1 - lam) * clin[j], atol=1e-5)
                assert torch.allclose(md[i], lam * derm[i] + (1 - lam) * derm[j], atol=1e-5)
                assert torch.allclose(my[i], lam * y[i] + (1 - lam) * y[j], atol=1e-5)
                break
    assert lam is not None and 0 < lam < 1
    again = mix(cfg, clin, derm, meta, y, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(again, (mc, md, mm, my)))  # seeded


def test_cutmix_pastes_one_box_into_both_images_and_weights_targets_by_its_area():
    clin, derm, meta, y = _batch(s=32)
    cfg = load_config("exp001", ["cutmix_alpha=1.0"])
    for seed in range(10):
        mc, md, mm, my = mix(cfg, clin, derm, meta, y, torch.Generator().manual_seed(seed))
        changed = (mc != clin).any(1)                                 # (B, S, S): pixels taken from the partner
        area = changed.float().mean((1, 2))
        if float(area.max()) == 0:
            continue
        assert torch.equal(changed, (md != derm).any(1))              # the same box in both images
        box = area[area > 0]
        assert torch.allclose(box, box[0].expand_as(box))             # one box for the whole batch
        own = (my * y).sum(1)                                         # the weight left on each row's own class
        lam = 1 - float(box[0])
        moved = area > 0
        assert all(abs(float(o) - lam) < 1e-5 or abs(float(o) - 1) < 1e-5 for o in own[moved])
        assert torch.allclose(my.sum(1), torch.ones(len(y)))
        return
    pytest.fail("no seed produced a box")


TINY = ["backbone=test_efficientnet", "pretrained=false", "img_size=32"]


def _model(cfg):
    """exp001's network (its recipe's network part, 5 metadata features, no aux head) set up on the CPU."""
    model, _ = setup_model(cfg, experiment_recipe(cfg.experiment).network(cfg, 5, 0), torch.device("cpu"))
    return model


def test_build_stage_freezes_the_backbones_in_stage_1_only():
    cfg = load_config("exp001", TINY)
    model = _model(cfg)
    s1 = build_stage(cfg, model, 1, steps_per_epoch=4, device=torch.device("cpu"),
                     optimizer=experiment_recipe("exp001").optimizer)
    assert not any(p.requires_grad for p in model.backbone_parameters())
    assert {id(p) for p in s1.params} == {id(p) for p in model.head_parameters()}
    assert s1.opt.param_groups[0]["lr"] == cfg.stage1_lr
    s1.train_mode()
    assert model.training and not any(b.training for b in model.backbones())  # BatchNorm statistics frozen
    s2 = build_stage(cfg, model, 2, steps_per_epoch=4, device=torch.device("cpu"),
                     optimizer=experiment_recipe("exp001").optimizer)
    assert all(p.requires_grad for p in model.parameters())
    assert [g["initial_lr"] for g in s2.opt.param_groups] == [cfg.backbone_lr, cfg.lr]
    s2.train_mode()
    assert all(b.training for b in model.backbones())


def _stage1_factor(overrides, steps_per_epoch):
    """Stage 1's learning-rate factor per step under exp001's optimiser part (its schedule's lambda)."""
    cfg = load_config("exp001", TINY + overrides)
    opt, sched = experiment_recipe("exp001").optimizer(cfg, _model(cfg), 1, steps_per_epoch, False)
    assert opt.param_groups[0]["initial_lr"] == cfg.stage1_lr
    return sched.lr_lambdas[0]


def test_stage1_schedule_is_constant_or_a_cosine_down_to_one_percent():
    assert {_stage1_factor(["stage1_schedule=constant"], 10)(s) for s in (0, 7, 100)} == {1.0}
    f = _stage1_factor(["stage1_schedule=cosine", "stage1_epochs=2"], 10)
    assert f(0) == pytest.approx(1.0) and f(10) == pytest.approx(0.505) and f(20) == pytest.approx(0.01)
    values = [f(s) for s in range(21)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_stage1_has_its_own_weight_decay():
    cfg = load_config("exp001", TINY + ["stage1_weight_decay=0.7", "weight_decay=0.02"])
    model = _model(cfg)
    optimizer = experiment_recipe("exp001").optimizer
    stage1 = build_stage(cfg, model, 1, 4, torch.device("cpu"), optimizer=optimizer)
    assert stage1.opt.param_groups[0]["weight_decay"] == 0.7
    stage2 = build_stage(cfg, model, 2, 4, torch.device("cpu"), optimizer=optimizer)
    assert {g["weight_decay"] for g in stage2.opt.param_groups} == {0.02}
