"""Per-fold training of the dual-image network: frozen backbones first, then everything, with early stopping.

Every epoch ends with an atomic checkpoint (``last.pt``); a run killed at any moment restarts from the last
finished epoch and, because every epoch's randomness is derived from (seed, fold, epoch), ends with the same
predictions as an uninterrupted run. A fold is complete when its ``metrics.json`` exists.

Per fold, under <output_dir>/<exp>/fold<k>/: best.pt, last.pt, encoder.json, config.json, oof.csv, test.csv,
history.csv, metrics.json.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .augment import DeviceAugment
from .cache import build_cache
from .config import Config, parse_class_mult
from .data import CLASSES, load_test, load_train
from .dist import DistContext
from .features import MetadataEncoder
from .folds import load_or_make_folds
from .io_utils import atomic_write, atomic_write_csv, atomic_write_json
from .model import build_model, count_parameters
from .outputs import collect, fold_done, fold_metrics, log_loss, probs_frame
from .scoring import f1_per_class
from .tracking import Tracker


# ----------------------------------------------------------------------------------------------------
# data shared by every fold
# ----------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    train: pd.DataFrame
    test: pd.DataFrame
    folds: np.ndarray          # fold index per train lesion
    train_cache: np.ndarray    # uint8 (n, 2, S, S, 3)
    test_cache: np.ndarray
    _on_device: dict = field(default_factory=dict, repr=False)

    def images(self, cfg: Config, device: torch.device) -> tuple:
        """(train images, test images, on_device): the memory-mapped caches, or their copies in device memory as
        Config.cache_on_device decides. The copies are made once per process and device and every later fold
        reuses them (an 'auto' decision is not re-taken once the copies themselves fill part of the memory)."""
        key = str(device)
        if cfg.cache_on_device == "no":
            on = False
        else:
            on = key in self._on_device or resolve_cache_on_device(
                cfg, device, self.train_cache.nbytes + self.test_cache.nbytes)
        if not on:
            return self.train_cache, self.test_cache, False
        if key not in self._on_device:
            self._on_device[key] = (cache_to_device(self.train_cache, device), cache_to_device(self.test_cache, device))
        return (*self._on_device[key], True)


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_workers(cfg: Config, device: torch.device) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


def prepare(cfg: Config, with_images: bool = True) -> Prepared:
    train = load_train(cfg.data_dir, check_images=with_images)
    test = load_test(cfg.data_dir, check_images=with_images)
    folds = load_or_make_folds(train, cfg.resolved_folds_csv(), cfg.n_folds, cfg.fold_seed)
    fold_of = folds.set_index("lesion_id")["fold"].reindex(train["lesion_id"]).to_numpy()
    if with_images:
        workers = max(1, os.cpu_count() or 1)
        train_cache = build_cache(train, cfg.img_size, cfg.resolved_cache_dir(), "train", num_workers=workers)
        test_cache = build_cache(test, cfg.img_size, cfg.resolved_cache_dir(), "test", num_workers=workers)
    else:
        train_cache = test_cache = np.zeros((0,), np.uint8)
    return Prepared(train, test, fold_of.astype(int), train_cache, test_cache)


def resolve_cache_on_device(cfg: Config, device: torch.device, nbytes: int) -> bool:
    """Config.cache_on_device: 'yes', 'no', or 'auto' (CUDA, and the caches take <= 10% of the GPU's memory and
    <= half its free memory, leaving training its room on a 24 GB card)."""
    if cfg.cache_on_device != "auto":
        return cfg.cache_on_device == "yes"
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


class DeviceBatches:
    """The batches PairDataset + EpochSampler + DataLoader give (same items, order, sharding over ranks and batch
    size), gathered from an image cache held in device memory: one index copy per epoch, then per step a gather of
    the images, metadata and labels on the device. No loader processes, no host copies of images."""

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


def epoch_seed(cfg: Config, fold: int, epoch: int) -> int:
    return int(np.random.SeedSequence([cfg.seed, fold, epoch]).generate_state(1)[0])


def epoch_order(cfg: Config, n: int, targets: np.ndarray, fold: int, epoch: int, global_batch: int) -> np.ndarray:
    rng = np.random.default_rng(epoch_seed(cfg, fold, epoch))
    if cfg.sampler_power > 0:
        counts = np.bincount(targets, minlength=len(CLASSES)).astype(float)
        w = counts[targets] ** -cfg.sampler_power
        order = rng.choice(n, size=n, replace=True, p=w / w.sum())
    else:
        order = rng.permutation(n)
    usable = (n // global_batch) * global_batch if n >= global_batch else n
    return order[:usable]


# ----------------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------------
def class_weights(cfg: Config, y: np.ndarray) -> torch.Tensor:
    """BCE pos_weight (neg/pos) ** power, or CE class weight (n / (K * count)) ** power, times class_mult."""
    pos = y.sum(0).clip(min=1)
    if cfg.loss == "bce":
        w = ((len(y) - pos) / pos) ** cfg.pos_weight_power
    else:
        w = (len(y) / (len(CLASSES) * pos)) ** cfg.pos_weight_power
    for name, mult in parse_class_mult(cfg.class_mult).items():
        w[CLASSES.index(name)] *= mult
    return torch.tensor(w, dtype=torch.float32)


def make_criterion(cfg: Config, weights: torch.Tensor):
    if cfg.loss == "bce":
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y, pos_weight=weights.to(logits.device))
    return lambda logits, y: F.cross_entropy(logits, y, weight=weights.to(logits.device),
                                             label_smoothing=cfg.label_smoothing)


def to_probs(cfg: Config, logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if cfg.loss == "bce" else torch.softmax(logits, dim=1)


# ----------------------------------------------------------------------------------------------------
# inference
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, cfg: Config, cache: np.ndarray | torch.Tensor, rows: np.ndarray, meta: np.ndarray,
            augment: DeviceAugment, device: torch.device, views: int = 1, desc: str = "predict") -> np.ndarray:
    """Probabilities (n, 11), averaged over the first ``views`` of the 8 flip/transpose views. ``cache`` is the
    memory-mapped image cache or its copy in device memory (``Prepared.images``)."""
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
            acc = acc + to_probs(cfg, logits.float())
        out.append((acc / views).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


def autocast(cfg: Config, device: torch.device):
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------------------------------
# one fold
# ----------------------------------------------------------------------------------------------------
def setup_model(cfg: Config, n_meta: int, n_aux: int, device: torch.device) -> tuple[nn.Module, DeviceAugment]:
    """The network on its device (channels_last and cuDNN autotuning on CUDA) and its augmentation."""
    model = build_model(cfg, n_meta, n_aux=n_aux).to(device)
    channels_last = device.type == "cuda" and cfg.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    augment = DeviceAugment(model.mean, model.std, flip=cfg.aug_flip, rotate=cfg.aug_rotate, scale=cfg.aug_scale,
                            color=cfg.aug_color, channels_last=channels_last)
    return model, augment


def train_step(cfg: Config, runner: nn.Module, params: list, opt, sched, criterion, clin, derm, meta, y,
               aux: torch.Tensor | None = None) -> torch.Tensor:
    """Forward, loss, backward, clip, optimiser and schedule step. Returns the loss as a device tensor: reading
    it here would make the host wait for the GPU every step."""
    with autocast(cfg, clin.device):
        logits, aux_logits = runner(clin, derm, meta)
        loss = criterion(logits.float(), y)  # soft (mixed) targets work for both losses
        if aux_logits is not None and aux is not None:
            valid = aux >= 0
            aux_loss = F.cross_entropy(aux_logits.float(), aux.clamp(min=0), reduction="none")
            loss = loss + cfg.aux_weight * (aux_loss * valid).sum() / valid.sum().clamp(min=1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    sched.step()
    return loss.detach()


def _save_torch(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _lr_lambda(cfg: Config, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _make_optimizer(cfg: Config, model, stage: int, steps_per_epoch: int, device: torch.device):
    fused = device.type == "cuda"
    if stage == 1:
        opt = torch.optim.AdamW(model.head_parameters(), lr=cfg.stage1_lr, weight_decay=cfg.weight_decay, fused=fused)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    groups = [{"params": list(model.backbone_parameters()), "lr": cfg.backbone_lr},
              {"params": model.head_parameters(), "lr": cfg.lr}]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=fused)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps_per_epoch))


def _set_stage(model, stage: int) -> None:
    for p in model.backbone_parameters():
        p.requires_grad_(stage == 2)


def _train_mode(model, stage: int) -> None:
    model.train()
    if stage == 1:  # frozen backbones keep their BatchNorm statistics
        for b in model.backbones():
            b.eval()


def _mix(cfg: Config, clin, derm, meta, y, gen: torch.Generator):
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


def train_fold(cfg: Config, fold: int, data: Prepared, dist: DistContext | None = None) -> dict:
    dist = dist or DistContext.single()
    device = dist.device if dist.world > 1 else resolve_device(cfg)
    fdir = cfg.fold_dir(fold)
    fdir.mkdir(parents=True, exist_ok=True)

    tr_rows = np.flatnonzero(data.folds != fold)
    va_rows = np.flatnonzero(data.folds == fold)
    train_df, val_df = data.train.iloc[tr_rows], data.train.iloc[va_rows]

    encoder = MetadataEncoder().fit(train_df)
    meta_tr, meta_va = encoder.transform(train_df), encoder.transform(val_df)
    meta_te = encoder.transform(data.test)
    y_all = data.train[CLASSES].to_numpy(np.float32)
    targets = data.train["target"].to_numpy()
    y_tr, y_va = y_all[tr_rows], y_all[va_rows]
    aux_vocab = sorted(v for v in train_df["diagnosis_full"].unique() if v) if cfg.aux_weight > 0 else []
    aux_index = {v: i for i, v in enumerate(aux_vocab)}
    aux_all = np.array([aux_index.get(v, -100) for v in data.train["diagnosis_full"]], dtype=np.int64)
    if dist.is_main:
        encoder.save(fdir / "encoder.json")
        cfg.save(fdir / "config.json")
        atomic_write_json(fdir / "aux_vocab.json", aux_vocab)

    torch.manual_seed(cfg.seed * 1000 + fold)
    model, augment = setup_model(cfg, encoder.n_features, len(aux_vocab), device)
    model.branch_streams = model.branch_streams and dist.world == 1  # DDP's reducer expects one stream
    weights = class_weights(cfg, y_tr)
    criterion = make_criterion(cfg, weights)

    local_batch = cfg.batch_size // dist.world
    if local_batch * dist.world != cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {dist.world} processes")
    train_images, test_images, on_device = data.images(cfg, device)
    if on_device:  # batches gathered in device memory; the same batches as the loader below gives
        sampler = loader = DeviceBatches(train_images, tr_rows, meta_tr, y_tr, aux_all[tr_rows], local_batch,
                                         dist.rank, dist.world)
    else:
        sampler = EpochSampler(len(tr_rows), dist.rank, dist.world)
        ds = PairDataset(data.train_cache, tr_rows, meta_tr, y_tr, aux_all[tr_rows])
        workers = resolve_workers(cfg, device)
        loader = torch.utils.data.DataLoader(ds, batch_size=local_batch, sampler=sampler, num_workers=workers,
                                             pin_memory=device.type == "cuda", drop_last=False,
                                             persistent_workers=workers > 0)
    if dist.is_main and on_device:
        print(f"[{cfg.name} fold {fold}] image cache held in {device} memory "
              f"({(train_images.nbytes + test_images.nbytes) / 2**30:.2f} GiB)", flush=True)
    n_global = len(tr_rows) if len(tr_rows) < cfg.batch_size else (len(tr_rows) // cfg.batch_size) * cfg.batch_size
    steps_per_epoch = math.ceil(n_global / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    total_epochs = cfg.stage1_epochs + cfg.epochs
    state = {"epoch": -1, "best_score": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": [], "wandb_id": None}
    ckpt_path = fdir / "last.pt"
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=False) if ckpt_path.is_file() else None
    if ckpt is not None:
        state = ckpt["state"]
        model.load_state_dict(ckpt["model"])
        if dist.is_main:
            print(f"[{cfg.name} fold {fold}] resuming after epoch {state['epoch'] + 1}/{total_epochs}", flush=True)

    tracker = Tracker(cfg, f"fold{fold}", run_id=state["wandb_id"]) if dist.is_main else None
    if tracker is not None:
        state["wandb_id"] = tracker.run_id
        if state["epoch"] < 0:
            tracker.summary({"params_" + k: v for k, v in count_parameters(model).items()})

    stage_built, opt, sched, ema, runner = None, None, None, None, model
    start_epoch = state["epoch"] + 1
    stopped = state.get("stopped", False)
    epoch_bar = tqdm(range(start_epoch, total_epochs), desc=f"{cfg.name} fold {fold}", disable=None if dist.is_main else True)
    for epoch in epoch_bar:
        if stopped:
            break
        stage = 1 if epoch < cfg.stage1_epochs else 2
        if stage != stage_built:
            _set_stage(model, stage)
            opt, sched = _make_optimizer(cfg, model, stage, steps_per_epoch, device)
            ema = None
            if stage == 2 and cfg.ema_decay > 0:
                from timm.utils import ModelEmaV3

                ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
            if ckpt is not None and ckpt["state"]["epoch"] + 1 == epoch and ckpt.get("stage") == stage:
                opt.load_state_dict(ckpt["optimizer"])
                sched.load_state_dict(ckpt["scheduler"])
                if ema is not None and ckpt.get("ema") is not None:
                    ema.module.load_state_dict(ckpt["ema"])
            runner = dist.wrap(model)
            if cfg.compile:
                runner = torch.compile(runner, mode=cfg.compile_mode)
            stage_built = stage
        ckpt = None

        seed = epoch_seed(cfg, fold, epoch)
        gen = torch.Generator().manual_seed(seed)
        sampler.set_order(epoch_order(cfg, len(tr_rows), targets[tr_rows], fold, epoch, cfg.batch_size))
        mixing = stage == 2 and epoch < total_epochs - cfg.mix_off_epochs
        _train_mode(model, stage)
        t0, n_seen = time.time(), 0
        loss_acc = torch.zeros((), device=device)
        params = [p for p in model.parameters() if p.requires_grad]
        epoch_batches = iter(loader)  # a DataLoader draws its workers' base seed from the global generator here,
        torch.manual_seed(seed)       # so seeding after it gives dropout the same masks whichever way batches come
        batches = tqdm(epoch_batches, total=min(len(loader), steps_per_epoch), desc=f"epoch {epoch + 1}",
                       leave=False, disable=None if dist.is_main else True)
        for step, (pairs, meta, y, aux) in enumerate(batches):
            if step >= steps_per_epoch:
                break
            pairs = pairs.to(device, non_blocking=True)
            meta, y, aux = (t.to(device, non_blocking=True) for t in (meta, y, aux))
            clin, derm = augment.train(pairs, gen)
            if mixing:
                clin, derm, meta, y = _mix(cfg, clin, derm, meta, y, gen)
            loss = train_step(cfg, runner, params, opt, sched, criterion, clin, derm, meta, y, aux)
            if ema is not None:
                ema.update(model, step=(epoch - cfg.stage1_epochs) * steps_per_epoch + step)
            loss_acc += loss * y.shape[0]
            n_seen += y.shape[0]
        loss_sum = float(loss_acc)
        loss_sum, n_seen = dist.sum(loss_sum, n_seen)
        train_loss = loss_sum / max(1, n_seen)
        train_time = time.time() - t0

        eval_model = ema.module if ema is not None else model
        val_probs = predict(eval_model, cfg, train_images, va_rows, meta_va, augment, device, 1, "validate")
        val_loss = log_loss(y_va, val_probs)
        per_class = f1_per_class(y_va, val_probs)
        score = selection_score(cfg.early_stop_metric, y_va, val_probs, per_class)
        improved = score > state["best_score"]
        if improved:
            state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
            if dist.is_main:
                _save_torch(fdir / "best.pt", {"model": eval_model.state_dict(), "epoch": epoch, "score": score})
        elif stage == 2:
            state["bad_epochs"] += 1
        row = {"epoch": epoch + 1, "stage": stage, "train_loss": train_loss, "val_loss": val_loss,
               "val_macro_f1": float(per_class.mean()), "val_score": score, "lr_head": opt.param_groups[-1]["lr"],
               "lr_backbone": opt.param_groups[0]["lr"] if stage == 2 else 0.0,
               "pairs_per_s": n_seen / max(train_time, 1e-9), "epoch_time_s": time.time() - t0}
        state["history"].append(row)
        state["epoch"] = epoch
        if stage == 2 and state["bad_epochs"] >= cfg.patience:
            state["stopped"] = stopped = True
        if dist.is_main:
            print(f"[{cfg.name} fold {fold}] epoch {epoch + 1:>2}/{total_epochs} stage {stage} "
                  f"train_loss {train_loss:.4f} val_loss {val_loss:.4f} val_macro_f1 {row['val_macro_f1']:.4f}"
                  f"{'' if cfg.early_stop_metric == 'f1' else f' val_{cfg.early_stop_metric} {score:.4f}'}"
                  f"{' *' if improved else '  '} {row['pairs_per_s']:.0f} pairs/s {row['epoch_time_s']:.1f}s",
                  flush=True)
            if tracker is not None:
                tracker.log({**{f"{k}": v for k, v in row.items()},
                             **{f"val_f1/{c}": float(v) for c, v in zip(CLASSES, per_class)}}, step=epoch + 1)
            _save_torch(ckpt_path, {"state": state, "stage": stage, "model": model.state_dict(),
                                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                    "ema": ema.module.state_dict() if ema is not None else None})
        dist.barrier()

    # ---- final predictions with the best weights (main process) ------------------------------------
    metrics: dict = {}
    if dist.is_main:
        t_pred = time.time()
        best = torch.load(fdir / "best.pt", map_location=device, weights_only=False)
        model.load_state_dict(best["model"])
        views = 8 if cfg.tta else 1
        oof = predict(model, cfg, train_images, va_rows, meta_va, augment, device, views, "oof")
        metrics = fold_metrics(y_va, oof)
        metrics.update(fold=fold, best_epoch=state["best_epoch"] + 1, epochs_run=len(state["history"]),
                       wall_time_s=sum(h["epoch_time_s"] for h in state["history"]) + time.time() - t_pred,
                       tta_views=views, params=count_parameters(model))
        test = predict(model, cfg, test_images, np.arange(len(data.test)), meta_te, augment, device, views, "test")
        atomic_write_csv(fdir / "oof.csv", probs_frame(val_df["lesion_id"], oof))
        atomic_write_csv(fdir / "test.csv", probs_frame(data.test["lesion_id"], test))
        atomic_write_csv(fdir / "history.csv", pd.DataFrame(state["history"]))
        atomic_write_json(fdir / "metrics.json", metrics)  # written last: marks the fold complete
        if tracker is not None:
            tracker.summary({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            tracker.finish()
        print(f"[{cfg.name} fold {fold}] done: best epoch {metrics['best_epoch']}, oof macro F1 "
              f"{metrics['macro_f1']:.4f} (TTA x{views}), {metrics['wall_time_s']:.0f}s", flush=True)
    dist.barrier()
    return metrics


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


# ----------------------------------------------------------------------------------------------------
# all folds of an experiment
# ----------------------------------------------------------------------------------------------------
def run_folds(cfg: Config, data: Prepared | None = None) -> dict:
    """Train every missing fold of ``cfg`` in this process, then collect. Complete folds are skipped."""
    todo = [k for k in cfg.fold_list() if not fold_done(cfg, k)]
    cfg.exp_dir().mkdir(parents=True, exist_ok=True)
    cfg.save(cfg.exp_dir() / "config.json")
    if todo:
        data = data or prepare(cfg)
        print(f"[{cfg.name}] folds to train: {todo} (complete: "
              f"{[k for k in cfg.fold_list() if k not in todo]})", flush=True)
        for k in todo:
            train_fold(cfg, k, data)
    train = data.train if data is not None else load_train(cfg.data_dir, check_images=False)
    return collect(cfg, train)
