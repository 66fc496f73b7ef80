"""Image experiments: the parts they are built from (``ImageRecipe``) and the per-fold training of the dual-image
network: frozen backbones first, then everything, with early stopping.

``train_fold`` reads top-down: the fold's inputs, the model, the batches, the resume point; then per epoch the
stage, one pass over the batches, validation and a checkpoint; then the final predictions. Every epoch ends with an
atomic checkpoint (``last.pt``); a run killed at any moment restarts from the last finished epoch and, because
every epoch's randomness is derived from (seed, fold, epoch), ends with the same predictions as an uninterrupted
run. A fold is complete when its ``metrics.json`` exists. Checkpoints hold plain tensors and JSON-like state only,
in the plain two-backbone layout, and are read back with ``weights_only=True``.

Per fold, under <output_dir>/<exp>/fold<k>/: best.pt, last.pt, features.json (the whole fitted metadata
transform, src/portable.py), config.json, aux_vocab.json, oof.csv, models.json and models.skops (the path a lesion
without MONET scores takes: a linear model on the metadata without MONET and, where they help, the trained network's
image embeddings: ``without_monet``), oof_nomonet.csv (that path's predictions of the validation lesions, their MONET scores removed),
test.csv, history.csv, metrics.json.
"""
from __future__ import annotations

import dataclasses
import pickle
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import faults
from .augment import DeviceAugment, device_augment
from .batches import (LoaderBatches, Prepared, epoch_order, epoch_seed, prepare, resolve_device, resolve_workers,
                      steps_per_epoch, training_batches)
from .cache import HASHES
from .config import Config
from .data import CLASSES
from .dist import DistContext
from .experiment import (ExperimentDir, Lesions, StaleOutputs, data_fingerprint, fingerprint, fingerprint_differences,
                         probs_frame)
from .features import MetadataFeatures, blank_monet
from .inference import embeddings, predict, selection_score
from .io_utils import atomic_write, atomic_write_json
from .loss import Loss, WeightedLoss
from .model import BACKBONE_KEYS, DualNet, LinearHead, backbones, count_parameters
from .preflight import check_image_run
from .scoring import f1_per_class, fold_metrics, log_loss
from .settings import key, keys_of, reads
from .speed.apply import FusedDualNet, load_plain_state, plain_state
from .speed.device_cache import DeviceBatches
from .step import MixupCutmix, Stage, build_stage, setup_model, stage_optimizer, train_step
from .tracking import Tracker, fold_scores


# ----------------------------------------------------------------------------------------------------
# the parts an image experiment is built from, and the keys the fold loop itself reads
# ----------------------------------------------------------------------------------------------------
def base_features(cfg: Config) -> MetadataFeatures:
    """The default features part: the base metadata features."""
    return MetadataFeatures("base")


@reads(BACKBONE_KEYS)
def reference_network(cfg: Config, n_meta: int, n_aux: int) -> DualNet:
    """The default network part: the two backbones of ``cfg`` and ``LinearHead`` over their embeddings and the
    metadata features."""
    clin, derm = backbones(cfg)
    return DualNet(clin, derm, LinearHead(2 * clin.num_features, n_meta, len(CLASSES), n_aux))


IMAGE_KEYS = {
    "img_size": key(256, "square input size of both images", results=True, low=16),
    "cache_dir": key("", "prepared-image cache; empty = <output_dir>/cache", results=False, text=True),
}
TRAINING_KEYS = {
    "batch_size": key(64, "lesion pairs per step", results=True, low=1),
    "stage1_epochs": key(2, "epochs training the head with frozen backbones", results=True, low=0),
    "epochs": key(15, "maximum epochs of stage 2 (everything unfrozen)", results=True, low=0),
    "patience": key(4, "early stopping: stage-2 epochs without a better validation score", results=True, low=1),
    "early_stop_metric": key("f1", "validation score that picks the best epoch: 'f1' (leaderboard macro F1 at > 0.5), "
                             "'f1_tuned' (macro F1 after per-class thresholds), 'auc' (mean per-class AUC)",
                             results=True, choices=("f1", "f1_tuned", "auc")),
    "sampler_power": key(0.0, "class-balanced sampling: weight per lesion = count(class) ** -power; 0 = plain shuffle",
                         results=True, low=0),
    "grad_clip": key(1.0, "gradient norm clip (0 = off)", results=True, low=0),
    "ema_decay": key(0.0, "exponential moving average of weights in stage 2 (0 = off); the EMA is validated and "
                     "saved", results=True, low=0, high=1, high_open=True),
    "tta": key(True, "8-view flip/transpose test-time augmentation for out-of-fold and test predictions",
               results=True),
}
SPEED_KEYS = {
    "device": key("auto", "'auto', 'cpu', 'cuda', 'cuda:1', 'mps'", results=False, text=True,
                  pattern=r"auto|cpu|cuda(:\d+)?|mps"),
    "num_workers": key(-1, "data loader workers and image-cache decode processes; -1 = up to 8 loader workers on "
                       "CUDA (none on the CPU) and one decode process per core", results=False, low=-1),
    "cache_on_device": key("auto", "hold the prepared image cache in device memory and gather batches there: 'yes', "
                           "'no', or 'auto' = yes on CUDA when train + test caches take at most 10% of the GPU's "
                           "memory and half its free memory", results=False, choices=("auto", "yes", "no")),
    "amp": key(True, "bf16 autocast on CUDA", results=True),
    "channels_last": key(True, "channels_last memory format on CUDA", results=False),
    "fuse_backbones": key(False, "run the two backbones as one network of twice the width (grouped convolutions): "
                          "same results, half the kernel launches; convolution + BatchNorm backbones only",
                          results=False),
    "branch_streams": key(False, "on CUDA, run the two backbones on two CUDA streams so their kernels overlap "
                          "(single-process, uncompiled runs only)", results=False),
    "compile": key(False, "torch.compile the model", results=False),
    "compile_mode": key("default", "torch.compile mode, e.g. 'max-autotune-no-cudagraphs', 'reduce-overhead'",
                        results=False, text=True),
    "eval_batch_size": key(128, "pairs per inference step", results=False, low=1),
}


class CheckpointError(ValueError):
    """A fold's checkpoint cannot be read back: damaged, truncated, or not plain tensors and JSON-like state."""


@dataclass(frozen=True)
class ImageRecipe:
    """What an image experiment builds, part by part; its script (exp/<name>/train.py) replaces the parts its idea
    changes and the runner (src/runner.py) does the rest. Each part declares the settings it reads (``keys``).

    features(cfg) -> MetadataFeatures (unfitted); network(cfg, n_meta, n_aux) -> DualNet; loss: a ``Loss``
    (src/loss.py: criterion, link, auxiliary weight); optimizer(cfg, model, stage, steps_per_epoch, fused) ->
    (optimizer, scheduler); mixing: ``active(cfg, stage, epoch, total_epochs)`` and ``mixing(cfg, clin, derm, meta,
    y, gen)``; augment(cfg, mean, std, channels_last) -> DeviceAugment. The fold loop's own settings are
    ``IMAGE_KEYS``, ``TRAINING_KEYS`` and ``SPEED_KEYS``."""

    features: Callable = base_features
    network: Callable = reference_network
    loss: Loss = WeightedLoss()
    optimizer: Callable = stage_optimizer
    mixing: MixupCutmix = MixupCutmix()
    augment: Callable = device_augment

    images = True
    kind = "image"

    def key_groups(self) -> dict[str, dict]:
        """The settings of an experiment of this recipe, by the part that reads them."""
        return {"images": IMAGE_KEYS, "features": keys_of(self.features), "network": keys_of(self.network),
                "augmentation": keys_of(self.augment), "loss": keys_of(self.loss), "mixing": keys_of(self.mixing),
                "optimizer": keys_of(self.optimizer), "training": TRAINING_KEYS, "speed": SPEED_KEYS}

    def validate(self, cfg: Config) -> str | None:
        """Why these settings cannot train, or None."""
        if cfg.stage1_epochs + cfg.epochs < 1:
            return (f"stage1_epochs={cfg.stage1_epochs} and epochs={cfg.epochs} train nothing; at least one epoch is "
                    "needed")
        return None

    def build(self, cfg: Config, n_meta: int, n_aux: int, device: torch.device,
              world: int = 1) -> tuple[torch.nn.Module, DeviceAugment]:
        """The network on its device with its speed machinery, and its augmentation."""
        return setup_model(cfg, self.network(cfg, n_meta, n_aux), device, world, self.augment)

    def data_print(self, cfg: Config, lesions: Lesions) -> dict:
        return data_fingerprint(lesions, images=True, hash_store=cfg.resolved_cache_dir() / HASHES)

    def check(self, cfg: Config) -> None:
        check_image_run(cfg)

    def check_resume(self, cfg: Config, todo: list[int], retrain: bool) -> None:
        check_checkpoints(cfg, todo, retrain)

    def prepare(self, cfg: Config, lesions: Lesions | None = None) -> Prepared:
        return prepare(cfg, lesions=lesions)

    def train_fold(self, cfg: Config, fold: int, data: Prepared, dist: DistContext | None = None) -> dict:
        return train_fold(self, cfg, fold, data, dist)


@dataclass
class FoldInputs:
    """One fold's rows, metadata features (encoder fitted on its training rows only), labels and aux labels."""

    fold: int
    tr_rows: np.ndarray
    va_rows: np.ndarray
    va_ids: list[str]
    test_ids: list[str]
    features: MetadataFeatures
    meta_tr: np.ndarray
    meta_va: np.ndarray
    meta_tr_blind: np.ndarray  # the training and validation rows with every MONET score removed: the path without
    meta_va_blind: np.ndarray  # MONET (``without_monet``)
    meta_te: np.ndarray
    y_tr: np.ndarray
    y_va: np.ndarray
    targets_tr: np.ndarray
    aux_vocab: list[str]
    aux_tr: np.ndarray


def fold_inputs(recipe: ImageRecipe, cfg: Config, fold: int, data: Prepared) -> FoldInputs:
    """The fold's rows, its metadata features (the recipe's features fitted on the training rows only; a copy of
    the training and validation rows' with every MONET score removed), labels and auxiliary labels."""
    tr_rows = np.flatnonzero(data.folds != fold)
    va_rows = np.flatnonzero(data.folds == fold)
    train_df, val_df = data.train.iloc[tr_rows], data.train.iloc[va_rows]
    features = recipe.features(cfg).fit(train_df)
    y_all = data.train[CLASSES].to_numpy(np.float32)
    wants_aux = recipe.loss.aux_weight(cfg) > 0
    aux_vocab = sorted(v for v in train_df["diagnosis_full"].unique() if v) if wants_aux else []
    aux_index = {v: i for i, v in enumerate(aux_vocab)}
    aux_all = np.array([aux_index.get(v, -100) for v in data.train["diagnosis_full"]], dtype=np.int64)
    return FoldInputs(fold, tr_rows, va_rows, val_df["lesion_id"].tolist(), data.test["lesion_id"].tolist(),
                      features, features.transform(train_df), features.transform(val_df),
                      features.transform(blank_monet(train_df)), features.transform(blank_monet(val_df)),
                      features.transform(data.test), y_all[tr_rows], y_all[va_rows],
                      data.train["target"].to_numpy()[tr_rows], aux_vocab, aux_all[tr_rows])


@dataclass
class FoldState:
    """Where a fold stands after its last finished epoch; saved in every ``last.pt``."""

    epoch: int = -1            # last finished epoch (0-based), -1 before the first
    best_score: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0        # stage-2 epochs since the best one
    history: list = field(default_factory=list)
    wandb_id: str | None = None
    stopped: bool = False      # early stopping has ended the fold

    @classmethod
    def from_dict(cls, d: dict) -> "FoldState":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class Resume:
    """A fold's ``last.pt``: its state, and the stage it was saved in with that stage's optimiser state."""

    state: FoldState
    stage: int
    stage_state: dict


class NonFiniteLoss(RuntimeError):
    """Training diverged: the loss or the validation probabilities are not finite numbers."""


def _save_torch(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint written by this project, read as plain tensors and JSON-like state only (nothing in the file
    can run code); a damaged or foreign file is a CheckpointError naming it."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"{path} cannot be read back as a checkpoint of this project ({type(exc).__name__}: "
                              f"{first})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} is not a checkpoint of this project (no model weights in it)")
    return ckpt


def _damaged(cfg: Config, fold: int, why: str) -> CheckpointError:
    return CheckpointError(f"{why}; fold {fold} cannot resume from it. Add retrain=true to restart fold {fold} from "
                           f"its first epoch (complete folds are kept), or delete {cfg.fold_dir(fold)}")


def check_checkpoints(cfg: Config, todo: list[int], retrain: bool) -> None:
    """Before anything trains: every unfinished fold's last.pt and best.pt read back (best.pt must exist once an
    epoch has finished). A damaged fold is refused with what to do, or with ``retrain`` restarted afresh."""
    for fold in todo:
        fdir = cfg.fold_dir(fold)
        last, best = fdir / "last.pt", fdir / "best.pt"
        if not last.is_file():
            continue
        try:
            state = FoldState.from_dict(read_checkpoint(last)["state"])
            if state.best_epoch >= 0:
                if not best.is_file():
                    raise CheckpointError(f"{best} is missing though {last} records a best epoch "
                                          f"({state.best_epoch + 1})")
                read_checkpoint(best)
        except CheckpointError as exc:
            if not retrain:
                raise _damaged(cfg, fold, str(exc)) from None
            for f in (last, best):
                f.unlink(missing_ok=True)
            print(f"[{cfg.name}] fold {fold}: {exc}; restarting the fold (retrain=true)", flush=True)


def load_resume(cfg: Config, fold: int, model, device: torch.device, dist: DistContext,
                current: dict) -> Resume | None:
    """Load ``last.pt`` of the fold into ``model``; None when the fold starts afresh. Its fingerprint is checked
    before anything else in it is used: a checkpoint made under other result settings or data (``current`` is this
    run's fingerprint) is refused, never continued."""
    path = cfg.fold_dir(fold) / "last.pt"
    if not path.is_file():
        return None
    ckpt = read_checkpoint(path, device)
    saved = ckpt.get("fingerprint")
    diff = fingerprint_differences(saved, current) if saved is not None else []
    if diff:
        raise StaleOutputs(f"{path} was made under other settings or data ({'; '.join(diff)}); rerun with its "
                           "settings, give this run its own folder with name=<another name>, or add retrain=true")
    try:
        load_plain_state(model, ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} holds the weights of another network ({str(exc).splitlines()[0][:120]}); fold "
                              f"{fold} cannot resume from it: delete {cfg.fold_dir(fold)} to restart it") from None
    fused = isinstance(model, FusedDualNet)
    if ckpt.get("fused") != fused:
        was = str(not fused).lower()
        raise CheckpointError(f"{path} was saved with fuse_backbones={was} and its optimiser state is laid out "
                              f"for that: resume fold {fold} with fuse_backbones={was} "
                              f"(the switch does not change results), or delete {cfg.fold_dir(fold)} to restart it")
    state = FoldState.from_dict(ckpt["state"])
    if dist.is_main:
        print(f"[{cfg.name} fold {fold}] resuming after epoch {state.epoch + 1}/{cfg.stage1_epochs + cfg.epochs}",
              flush=True)
    return Resume(state, ckpt.get("stage"), ckpt)


@dataclass
class FoldRun:
    """Everything one fold's epochs share."""

    recipe: ImageRecipe
    cfg: Config
    inputs: FoldInputs
    model: torch.nn.Module
    augment: DeviceAugment
    objective: Callable                       # the loss part's training loss (src/loss.py)
    link: Callable                            # the loss part's logits -> probabilities
    batches: LoaderBatches | DeviceBatches
    train_images: np.ndarray | torch.Tensor   # the cache, or its copy in device memory
    test_images: np.ndarray | torch.Tensor
    steps: int                                # optimiser steps per epoch
    device: torch.device
    dist: DistContext
    current: dict                             # the fingerprint of this run's settings and data

    @property
    def total_epochs(self) -> int:
        return self.cfg.stage1_epochs + self.cfg.epochs


def train_fold(recipe: ImageRecipe, cfg: Config, fold: int, data: Prepared, dist: DistContext | None = None) -> dict:
    """Train fold ``fold`` of ``cfg`` with the parts of ``recipe`` (resuming from its last checkpoint), then predict
    its validation lesions and the test lesions with the best epoch's weights. Returns the fold's metrics (main
    process)."""
    dist = dist or DistContext.single()
    run = start_fold(recipe, cfg, fold, data, dist)
    resume = load_resume(cfg, fold, run.model, run.device, dist, run.current)
    state = resume.state if resume is not None else FoldState()
    tracker = open_tracker(cfg, fold, state, run.model, dist)
    stage: Stage | None = None
    for epoch in range(state.epoch + 1, run.total_epochs):
        if state.stopped:
            break
        number = 1 if epoch < cfg.stage1_epochs else 2
        if stage is None or stage.number != number:
            stage = build_stage(cfg, run.model, number, run.steps, run.device, dist, recipe.optimizer)
            if resume is not None and resume.stage == number:
                stage.load_state(resume.stage_state)
        resume = None
        end_epoch(run, stage, state, epoch, train_epoch(run, stage, epoch), tracker)
    metrics = finish_fold(run, state, tracker) if dist.is_main else {}
    dist.barrier()
    return metrics


def start_fold(recipe: ImageRecipe, cfg: Config, fold: int, data: Prepared, dist: DistContext) -> FoldRun:
    """The fold's inputs (saved beside its config), its model, loss and training batches."""
    device = dist.device if dist.world > 1 else resolve_device(cfg)
    inputs = fold_inputs(recipe, cfg, fold, data)
    current = fingerprint(cfg, data.data_print)
    if dist.is_main:
        fdir = ExperimentDir(cfg).begin_fold(fold, current)
        inputs.features.save_fitted(fdir / "features.json")
        atomic_write_json(fdir / "aux_vocab.json", inputs.aux_vocab)

    torch.manual_seed(cfg.seed * 1000 + fold)
    model, augment = recipe.build(cfg, inputs.meta_tr.shape[1], len(inputs.aux_vocab), device, dist.world)
    objective = recipe.loss.objective(cfg, inputs.y_tr)

    local_batch = cfg.batch_size // dist.world
    if local_batch * dist.world != cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {dist.world} processes")
    train_images, test_images, on_device = data.images(cfg, device)
    batches = training_batches(train_images, inputs.tr_rows, inputs.meta_tr, inputs.y_tr, inputs.aux_tr,
                               local_batch, resolve_workers(cfg, device), device, dist.rank, dist.world)
    if dist.is_main and on_device:
        print(f"[{cfg.name} fold {fold}] image cache held in {device} memory "
              f"({(train_images.nbytes + test_images.nbytes) / 2**30:.2f} GiB)", flush=True)
    return FoldRun(recipe, cfg, inputs, model, augment, objective, recipe.loss.link(cfg), batches, train_images,
                   test_images,
                   steps_per_epoch(cfg, len(inputs.tr_rows)), device, dist, current)


def open_tracker(cfg: Config, fold: int, state: FoldState, model, dist: DistContext) -> Tracker | None:
    """The fold's W&B run (main process), resumed under the same id after an interruption."""
    if not dist.is_main:
        return None
    tracker = Tracker(cfg, f"fold{fold}", run_id=state.wandb_id, kind=ImageRecipe.kind)
    state.wandb_id = tracker.run_id
    if state.epoch < 0:
        tracker.summary({"params_" + k: v for k, v in count_parameters(model).items()})
    return tracker


@dataclass(frozen=True)
class Trained:
    """What one pass over an epoch's batches did."""

    loss: float       # mean training loss over all processes
    pairs: int        # lesion pairs seen
    start: float      # time.time() at its start
    seconds: float
    mixed: bool       # the batches went through the recipe's mixing part


def train_epoch(run: FoldRun, stage: Stage, epoch: int) -> Trained:
    """One pass over the epoch's batches."""
    cfg, inputs, device = run.cfg, run.inputs, run.device
    seed = epoch_seed(cfg, inputs.fold, epoch)
    gen = torch.Generator().manual_seed(seed)
    run.batches.set_order(epoch_order(cfg, len(inputs.tr_rows), inputs.targets_tr, inputs.fold, epoch,
                                      cfg.batch_size))
    mixing = run.recipe.mixing.active(cfg, stage.number, epoch, run.total_epochs)
    stage.train_mode()
    t0, n_seen = time.time(), 0
    loss_acc = torch.zeros((), device=device)
    epoch_batches = iter(run.batches)  # a DataLoader draws its workers' base seed from the global generator here,
    torch.manual_seed(seed)            # so seeding after it gives dropout the same masks whichever way batches come
    bar = tqdm(epoch_batches, total=min(len(run.batches), run.steps), desc=f"epoch {epoch + 1}", leave=False,
               disable=None if run.dist.is_main else True)
    for step, (pairs, meta, y, aux) in enumerate(bar):
        if step >= run.steps:
            break
        faults.point("step")
        pairs = pairs.to(device, non_blocking=True)
        meta, y, aux = (t.to(device, non_blocking=True) for t in (meta, y, aux))
        clin, derm = run.augment.train(pairs, gen)
        if mixing:
            clin, derm, meta, y = run.recipe.mixing(cfg, clin, derm, meta, y, gen)
        loss = train_step(cfg, stage, run.objective, clin, derm, meta, y, aux)
        if stage.ema is not None:
            stage.ema.update(run.model, step=(epoch - cfg.stage1_epochs) * run.steps + step)
        loss_acc += loss * y.shape[0]
        n_seen += y.shape[0]
    loss_sum, n_seen = run.dist.sum(float(loss_acc), n_seen)
    return Trained(loss_sum / max(1, n_seen), n_seen, t0, time.time() - t0, mixing)


def end_epoch(run: FoldRun, stage: Stage, state: FoldState, epoch: int, trained: Trained,
              tracker: Tracker | None) -> None:
    """Validate, keep the best weights, decide early stopping, log, and checkpoint the epoch."""
    cfg, inputs, fold = run.cfg, run.inputs, run.inputs.fold
    train_loss, n_seen, t0, train_time = trained.loss, trained.pairs, trained.start, trained.seconds
    fdir = cfg.fold_dir(fold)
    eval_model = stage.eval_model()
    val_probs = predict(eval_model, run.link, cfg, run.train_images, inputs.va_rows, inputs.meta_va, run.augment, run.device,
                        1, "validate")
    if not (np.isfinite(train_loss) and np.isfinite(val_probs).all()):
        raise NonFiniteLoss(
            f"{cfg.name} fold {fold}, epoch {epoch + 1} (stage {stage.number}): the "
            f"{'training loss is ' + str(train_loss) if not np.isfinite(train_loss) else 'validation probabilities are not finite'}"
            f"; training has diverged, so the fold stops here and this epoch is not saved (last.pt keeps the last "
            f"finite epoch). Lower the learning rates (stage1_lr={cfg.stage1_lr:g}, lr={cfg.lr:g}, "
            f"backbone_lr={cfg.backbone_lr:g}) and rerun with retrain=true.")
    per_class = f1_per_class(inputs.y_va, val_probs)
    score = selection_score(cfg.early_stop_metric, inputs.y_va, val_probs, per_class)
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.bad_epochs = score, epoch, 0
        if run.dist.is_main:
            _save_torch(fdir / "best.pt", {"model": plain_state(eval_model), "epoch": epoch, "score": score})
    elif stage.number == 2:
        state.bad_epochs += 1
    row = {"epoch": epoch + 1, "stage": stage.number, "train_loss": train_loss,
           "val_loss": log_loss(inputs.y_va, val_probs), "val_macro_f1": float(per_class.mean()), "val_score": score,
           "lr_head": stage.opt.param_groups[-1]["lr"],
           "lr_backbone": stage.opt.param_groups[0]["lr"] if stage.number == 2 else 0.0, "mixing": int(trained.mixed),
           "pairs_per_s": n_seen / max(train_time, 1e-9), "epoch_time_s": time.time() - t0}
    state.history.append(row)
    state.epoch = epoch
    if stage.number == 2 and state.bad_epochs >= cfg.patience:
        state.stopped = True
    if run.dist.is_main:
        print(f"[{cfg.name} fold {fold}] epoch {epoch + 1:>2}/{run.total_epochs} stage {stage.number} "
              f"train_loss {train_loss:.4f} val_loss {row['val_loss']:.4f} val_macro_f1 {row['val_macro_f1']:.4f}"
              f"{'' if cfg.early_stop_metric == 'f1' else f' val_{cfg.early_stop_metric} {score:.4f}'}"
              f"{' *' if improved else '  '} {row['pairs_per_s']:.0f} pairs/s {row['epoch_time_s']:.1f}s",
              flush=True)
        if tracker is not None:
            tracker.log({"epoch": row["epoch"], "stage": row["stage"], "train/loss": train_loss,
                         "val/loss": row["val_loss"], "val/macro_f1": row["val_macro_f1"], "val/score": score,
                         "lr/head": row["lr_head"], "lr/backbone": row["lr_backbone"],
                         "speed/pairs_per_s": row["pairs_per_s"], "time/epoch_s": row["epoch_time_s"],
                         **{f"val/f1/{c}": float(v) for c, v in zip(CLASSES, per_class)}}, step=epoch + 1)
        _save_torch(fdir / "last.pt", {"state": dataclasses.asdict(state), "stage": stage.number,
                                       "model": plain_state(run.model), "fused": isinstance(run.model, FusedDualNet),
                                       "fingerprint": run.current, **stage.state()})
    run.dist.barrier()


PROBES = {"probe": True, "probe_metadata": False}  # a fold's model without MONET, and whether it reads the embeddings


def inner_log_loss(name: str, x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Mean binary log-loss of model ``name`` (src/tabular.py) over a seeded 3-fold split of the rows it is given."""
    from sklearn.model_selection import StratifiedKFold

    from .tabular import fit_predict

    onehot, total = np.eye(len(CLASSES))[y], 0.0
    with warnings.catch_warnings():  # a class with fewer than 3 lesions cannot be in every split; it is still scored
        warnings.simplefilter("ignore", UserWarning)
        splits = list(StratifiedKFold(3, shuffle=True, random_state=seed).split(x, y))
    for tr, va in splits:
        probs, = fit_predict([name], seed, x[tr], y[tr], x[va])
        total += log_loss(onehot[va], probs) * len(va)
    return total / len(y)


def without_monet(run: FoldRun, views: int) -> np.ndarray:
    """The fold's path without MONET: a linear model on the metadata features with every MONET score removed and,
    where a 3-fold cross-validation on the fold's training rows finds they lower its log-loss, the trained network's
    image embeddings (its best weights, the same test-time views) beside them (``PROBES``); fitted on the fold's
    training rows and stored with the fold (models.json, models.skops). Returns its predictions of the validation
    rows. The network itself is left as it was trained, so its path with MONET is unchanged."""
    from .tabular import fit_predict, save_models

    cfg, inputs = run.cfg, run.inputs
    seed = cfg.seed * 1000 + inputs.fold

    def x(name: str, rows: np.ndarray, meta: np.ndarray) -> np.ndarray:
        if not PROBES[name]:
            return meta.astype(np.float64)
        emb = embeddings(run.model, cfg, run.train_images, rows, run.augment, run.device, views, "embed")
        return np.hstack([emb, meta.astype(np.float64)])

    train_x = {name: x(name, inputs.tr_rows, inputs.meta_tr_blind) for name in PROBES}
    name = min(PROBES, key=lambda n: inner_log_loss(n, train_x[n], inputs.targets_tr, seed))
    fitted: list = []
    blind, = fit_predict([name], seed, train_x[name], inputs.targets_tr, x(name, inputs.va_rows, inputs.meta_va_blind),
                         fitted=fitted)
    save_models(cfg.fold_dir(inputs.fold), {"without_monet": fitted})
    return blind


def finish_fold(run: FoldRun, state: FoldState, tracker: Tracker | None) -> dict:
    """Out-of-fold and test predictions with the best epoch's weights (TTA), written with the fold's metrics."""
    cfg, inputs, fold = run.cfg, run.inputs, run.inputs.fold
    t_pred = time.time()
    best = read_checkpoint(cfg.fold_dir(fold) / "best.pt", run.device)
    load_plain_state(run.model, best["model"])
    views = 8 if cfg.tta else 1
    oof = predict(run.model, run.link, cfg, run.train_images, inputs.va_rows, inputs.meta_va, run.augment, run.device, views,
                  "oof")
    metrics = fold_metrics(inputs.y_va, oof)
    metrics.update(fold=fold, best_epoch=state.best_epoch + 1, epochs_run=len(state.history),
                   wall_time_s=sum(h["epoch_time_s"] for h in state.history) + time.time() - t_pred,
                   tta_views=views, params=count_parameters(run.model), fingerprint=run.current)
    blind = without_monet(run, views)
    metrics["macro_f1_without_monet"] = fold_metrics(inputs.y_va, blind)["macro_f1"]
    test = predict(run.model, run.link, cfg, run.test_images, np.arange(len(inputs.meta_te)), inputs.meta_te, run.augment,
                   run.device, views, "test")
    ExperimentDir(cfg).write_fold(fold, probs_frame(inputs.va_ids, oof), probs_frame(inputs.test_ids, test), metrics,
                                  pd.DataFrame(state.history), oof_nomonet=probs_frame(inputs.va_ids, blind))
    if tracker is not None:
        tracker.summary({**{f"fold/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                         **fold_scores(metrics)})
        if cfg.wandb_checkpoints:
            tracker.log_artifact(cfg.name, "model", [cfg.fold_dir(fold) / "best.pt"],
                                 {"fold": fold, "best_epoch": metrics["best_epoch"]}, what=f"fold{fold}-model")
        tracker.finish()
    print(f"[{cfg.name} fold {fold}] done: best epoch {metrics['best_epoch']}, oof macro F1 "
          f"{metrics['macro_f1']:.4f} (TTA x{views}), {metrics['wall_time_s']:.0f}s", flush=True)
    return metrics
