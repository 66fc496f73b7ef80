"""One frozen configuration for every experiment.

An experiment lives in ``exp/<name>/config.py`` and says only what differs from its parent::

    PARENT = "exp001"          # or None for the base defaults below
    OVERRIDES = dict(img_size=384, ema_decay=0.999)

``load_config(name, ["key=value", ...])`` resolves the chain, applies command-line overrides last,
and refuses unknown keys and values of the wrong type.  ``Config.to_json`` is what every run saves.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
EXP_ROOT = REPO_ROOT / "exp"


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, wrong type, bad value."""


def _f(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    # --- identity and locations -------------------------------------------------------------
    name: str = _f("exp001", "experiment name; outputs go to <output_dir>/<name>")
    data_dir: str = _f("input", "folder holding the official MILK10k files (plain or twice-nested unzip)")
    output_dir: str = _f("output", "root of all run outputs")
    submission_dir: str = _f("submissions", "where validated submission CSVs are written")
    cache_dir: str = _f("", "prepared-image cache; empty = <output_dir>/cache")
    folds_csv: str = _f("", "fold assignment CSV shared by experiments; empty = <output_dir>/folds_k<n>_s<seed>.csv")
    n_folds: int = _f(5, "number of cross-validation folds")
    fold_seed: int = _f(42, "seed of the fold split (keep it fixed so experiments blend)")
    folds: str = _f("", "comma list of folds to run (e.g. '0,2'); empty = all")
    seed: int = _f(42, "training seed")
    retrain: bool = _f(False, "retrain folds made under other result settings or data instead of refusing to mix "
                       "them in (their files are removed)")

    # --- model --------------------------------------------------------------------------------
    model: str = _f("image", "'image' (dual-backbone network), 'tabular' (metadata-only scikit-learn models) or "
                    "'stack' (a stacker over other experiments' out-of-fold predictions)")
    backbone: str = _f("tf_efficientnetv2_s", "timm model name of each image branch")
    pretrained: bool = _f(True, "start from ImageNet weights")
    pretrained_path: str = _f("", "local weights file for the backbone (also env MILK10K_WEIGHTS); used instead of downloading")
    shared_backbone: bool = _f(False, "one backbone for both images instead of one per image")
    fuse_backbones: bool = _f(False, "run the two backbones as one network of twice the width (grouped "
                              "convolutions): same results, half the kernel launches; convolution + BatchNorm "
                              "backbones only")
    meta_mode: str = _f("concat", "metadata fusion: 'concat' (raw features), 'mlp' (small MLP), 'none'")
    meta_features: str = _f("base", "metadata features of the image models: 'base' (age, sex, skin tone, site, "
                            "MONET scores, manipulation), 'extended' (plus MONET logits, clinical-minus-dermoscopic "
                            "differences, age hinges and interactions) or 'interactions' (extended plus splines of age "
                            "and the MONET logits, site x MONET and MONET x MONET, as exp000's model uses)")
    meta_standardize: bool = _f(False, "z-score every metadata feature with the training fold's mean and std")
    meta_hidden: int = _f(128, "hidden width of the metadata MLP")
    meta_dropout: float = _f(0.3, "dropout inside the metadata MLP")
    head_dropout: float = _f(0.0, "dropout before the classifier")
    embed_norm: bool = _f(False, "scale each image-embedding dimension to zero mean and unit variance before the "
                          "classifier (batch statistics in training, running ones in evaluation; no parameters)")
    img_size: int = _f(256, "square input size of both images")

    # --- augmentation (applied on the device, per sample) -------------------------------------
    aug_flip: bool = _f(True, "random horizontal and vertical flips")
    aug_rotate: float = _f(30.0, "max rotation in degrees")
    aug_scale: float = _f(0.0, "max relative zoom in/out (0 = none)")
    aug_color: float = _f(0.2, "colour jitter strength (brightness, contrast, saturation)")

    # --- loss and sampling ---------------------------------------------------------------------
    loss: str = _f("bce", "'bce' (per-class sigmoid) or 'ce' (softmax cross-entropy)")
    pos_weight_power: float = _f(1.0, "BCE pos_weight = (neg/pos) ** power; 0 = unweighted")
    class_mult: str = _f("", "extra per-class loss multipliers, e.g. 'MAL_OTH=2,DF=1.5'")
    label_smoothing: float = _f(0.0, "label smoothing of the 'ce' loss")
    aux_weight: float = _f(0.0, "weight of the auxiliary diagnosis_full head (0 = off)")
    sampler_power: float = _f(0.0, "class-balanced sampling: weight per lesion = count(class) ** -power; 0 = plain shuffle")
    mixup_alpha: float = _f(0.0, "mixup Beta(alpha, alpha); 0 = off")
    cutmix_alpha: float = _f(0.0, "cutmix Beta(alpha, alpha); 0 = off")
    mix_off_epochs: int = _f(0, "switch mixup/cutmix off for the last N epochs of stage 2")

    # --- optimisation --------------------------------------------------------------------------
    batch_size: int = _f(64, "lesion pairs per step")
    stage1_epochs: int = _f(2, "epochs training the head with frozen backbones")
    stage1_lr: float = _f(1e-3, "learning rate of stage 1")
    stage1_schedule: str = _f("constant", "stage-1 schedule: 'constant' or 'cosine' (down to 1% by its last step)")
    epochs: int = _f(15, "maximum epochs of stage 2 (everything unfrozen)")
    lr: float = _f(3e-4, "stage-2 learning rate of the head")
    backbone_lr: float = _f(5e-5, "stage-2 learning rate of the backbones")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    stage1_weight_decay: float = _f(1e-2, "AdamW weight decay of the classifier in stage 1 (backbones frozen)")
    warmup_epochs: float = _f(1.0, "linear warmup of stage 2, in epochs")
    schedule: str = _f("cosine", "stage-2 schedule: 'cosine' or 'constant'")
    patience: int = _f(4, "early stopping: stage-2 epochs without a better validation score")
    early_stop_metric: str = _f("f1", "validation score that picks the best epoch: 'f1' (leaderboard macro F1 at "
                                "> 0.5), 'f1_tuned' (macro F1 after per-class thresholds), 'auc' (mean per-class AUC)")
    grad_clip: float = _f(1.0, "gradient norm clip (0 = off)")
    ema_decay: float = _f(0.0, "exponential moving average of weights (0 = off); the EMA is validated and saved")
    max_steps_per_epoch: int = _f(0, "cap on steps per epoch for smoke runs (0 = no cap)")

    # --- runtime -------------------------------------------------------------------------------
    device: str = _f("auto", "'auto', 'cpu', 'cuda', 'cuda:1'")
    num_workers: int = _f(-1, "data loader workers and image-cache decode processes; -1 = up to 8 loader workers "
                          "on CUDA (none on the CPU) and one decode process per core")
    cache_on_device: str = _f("auto", "hold the prepared image cache in device memory and gather batches there (no "
                              "loader processes, no host copies of images): 'yes', 'no', or 'auto' = yes on CUDA "
                              "when train + test caches take at most 10% of the GPU's memory and half its free memory")
    amp: bool = _f(True, "bf16 autocast on CUDA")
    channels_last: bool = _f(True, "channels_last memory format on CUDA")
    branch_streams: bool = _f(False, "on CUDA, run the two backbones on two CUDA streams so their kernels overlap "
                              "(single-process, uncompiled runs only)")
    compile: bool = _f(False, "torch.compile the model")
    compile_mode: str = _f("default", "torch.compile mode, e.g. 'max-autotune-no-cudagraphs', 'reduce-overhead'")
    tta: bool = _f(True, "8-view flip/transpose test-time augmentation for out-of-fold and test predictions")
    eval_batch_size: int = _f(128, "pairs per inference step")

    # --- decision rule and submission ----------------------------------------------------------
    decision: str = _f("auto", "decision rule folded into the submission: 'auto' (the rule with the best honest "
                       "out-of-fold macro F1), 'threshold' (per-class thresholds tuned on OOF), 'expected_f1' "
                       "(label-free, from the submitted batch itself), 'none' (raw 0.5)")
    threshold_method: str = _f("exact", "'exact' (exhaustive per-class search) or 'optuna'")
    threshold_trials: int = _f(300, "Optuna trials when threshold_method=optuna")

    # --- tuning (Optuna) -----------------------------------------------------------------------
    tune_trials: int = _f(20, "total trials of the study (shared by all processes)")
    tune_folds: str = _f("0,1", "folds each trial trains")
    tune_epochs: int = _f(3, "stage-2 epochs of each trial")
    tune_storage: str = _f("", "Optuna storage URL; empty = sqlite:///<output_dir>/<name>/tune/optuna.db")

    # --- tabular (metadata-only) and stacking models ------------------------------------------
    tabular_models: str = _f("logreg,hgb,mlp", "scikit-learn models averaged by model=tabular and model=stack")
    stack_inputs: str = _f("", "comma list of experiments whose OOF/test probabilities a stacker uses")

    # --- tracking ------------------------------------------------------------------------------
    wandb_project: str = _f("milk10k", "Weights & Biases project")
    wandb_mode: str = _f("", "'offline', 'online', 'disabled'; empty = env WANDB_MODE, else offline")

    # ---------------------------------------------------------------------------------------------
    def exp_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def fold_dir(self, fold: int) -> Path:
        return self.exp_dir() / f"fold{fold}"

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"

    def resolved_folds_csv(self) -> Path:
        if self.folds_csv:
            return Path(self.folds_csv)
        return Path(self.output_dir) / f"folds_k{self.n_folds}_s{self.fold_seed}.csv"

    def fold_list(self) -> list[int]:
        """The folds to run: ``folds`` as a list, or all of them."""
        return _parse_folds("folds", self.folds, self.n_folds)

    def tune_fold_list(self) -> list[int]:
        return _parse_folds("tune_folds", self.tune_folds, self.n_folds)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | os.PathLike) -> None:
        from .io_utils import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    def replace(self, **changes: Any) -> "Config":
        return apply_overrides(self, changes, source="replace()")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _parse_folds(key: str, text: str, n_folds: int) -> list[int]:
    if not text.strip():
        return list(range(n_folds))
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected a comma list of fold numbers, e.g. '0,2'") from None
    bad = [k for k in out if not 0 <= k < n_folds]
    if bad:
        raise ConfigError(f"{key}={text!r}: fold {bad[0]} is outside 0..{n_folds - 1}")
    if len(set(out)) < len(out):
        raise ConfigError(f"{key}={text!r}: a fold is listed twice")
    return out

_CHOICES = {
    "model": {"image", "tabular", "stack"},
    "meta_mode": {"concat", "mlp", "none"},
    "loss": {"bce", "ce"},
    "early_stop_metric": {"f1", "f1_tuned", "auc"},
    "schedule": {"cosine", "constant"},
    "stage1_schedule": {"cosine", "constant"},
    "meta_features": {"base", "extended", "interactions"},
    "decision": {"auto", "threshold", "expected_f1", "none"},
    "threshold_method": {"exact", "optuna"},
    "wandb_mode": {"", "offline", "online", "disabled"},
    "cache_on_device": {"auto", "yes", "no"},
}


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Return ``value`` as the declared type of ``key``; strings from the command line are parsed. Floats must
    be finite (no nan or inf anywhere in the config)."""
    ftype = FIELDS[key].type
    where = f"{source}: {key}={value!r}"
    if ftype == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string")
    if ftype == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected a bool (true/false)")
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected {'an int' if ftype == 'int' else 'a float'}, got a bool")
    parse = int if ftype == "int" else float
    try:
        out = parse(value) if isinstance(value, str) or ftype == "float" else value
    except (TypeError, ValueError):
        out = None
    if ftype == "int" and not isinstance(out, int) or ftype == "float" and not isinstance(out, float):
        raise ConfigError(f"{where}: expected {'an int' if ftype == 'int' else 'a float'}")
    if ftype == "float" and not math.isfinite(out):
        raise ConfigError(f"{where}: must be a finite number")
    return out


def _check_unknown(keys, source: str) -> None:
    for key in keys:
        if key not in FIELDS:
            import difflib

            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {key!r}{hint}; `bash run.sh <exp> --help` lists the keys")


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> Config:
    _check_unknown(overrides, source)
    values = {k: _coerce(k, v, source) for k, v in overrides.items()}
    for key, value in values.items():
        allowed = _CHOICES.get(key)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{source}: {key}={value!r} is not one of {sorted(allowed)}")
    new = dataclasses.replace(cfg, **values)
    _validate(new, source)
    return new


# Allowed ranges: key -> (lowest, highest, lowest included, highest included); None = unbounded.
_RANGES = {
    "n_folds": (2, None, True, True), "img_size": (16, None, True, True), "batch_size": (1, None, True, True),
    "eval_batch_size": (1, None, True, True), "seed": (0, None, True, True), "fold_seed": (0, None, True, True),
    "stage1_epochs": (0, None, True, True), "epochs": (0, None, True, True), "patience": (1, None, True, True),
    "stage1_lr": (0, None, False, True), "lr": (0, None, False, True), "backbone_lr": (0, None, True, True),
    "weight_decay": (0, None, True, True), "stage1_weight_decay": (0, None, True, True), "warmup_epochs": (0, None, True, True), "grad_clip": (0, None, True, True),
    "ema_decay": (0, 1, True, False), "max_steps_per_epoch": (0, None, True, True),
    "num_workers": (-1, None, True, True), "meta_hidden": (1, None, True, True),
    "meta_dropout": (0, 1, True, False), "head_dropout": (0, 1, True, False), "label_smoothing": (0, 1, True, False),
    "pos_weight_power": (0, None, True, True), "aux_weight": (0, None, True, True),
    "sampler_power": (0, None, True, True), "mixup_alpha": (0, None, True, True), "cutmix_alpha": (0, None, True, True),
    "mix_off_epochs": (0, None, True, True), "aug_rotate": (0, 180, True, True), "aug_scale": (0, 1, True, False),
    "aug_color": (0, 1, True, True), "threshold_trials": (1, None, True, True), "tune_trials": (1, None, True, True),
    "tune_epochs": (0, None, True, True),
}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _in_range(key: str, value: float) -> bool:
    lo, hi, lo_in, hi_in = _RANGES[key]
    return ((lo is None or value > lo or (lo_in and value == lo))
            and (hi is None or value < hi or (hi_in and value == hi)))


def _range_text(key: str) -> str:
    lo, hi, lo_in, hi_in = _RANGES[key]
    parts = ([f"{'>=' if lo_in else '>'} {lo}"] if lo is not None else []) + \
        ([f"{'<=' if hi_in else '<'} {hi}"] if hi is not None else [])
    return " and ".join(parts)


def _validate(cfg: Config, source: str) -> None:
    """Every value in its range and every combination usable, before anything runs."""
    for key in _RANGES:
        if not _in_range(key, getattr(cfg, key)):
            raise ConfigError(f"{source}: {key}={getattr(cfg, key)!r}: must be {_range_text(key)}")
    if cfg.stage1_epochs + cfg.epochs < 1:
        raise ConfigError(f"{source}: stage1_epochs={cfg.stage1_epochs} and epochs={cfg.epochs} train nothing; "
                          "at least one epoch is needed")
    if not _DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"{source}: device={cfg.device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    try:
        cfg.fold_list()
        cfg.tune_fold_list()
        parse_class_mult(cfg.class_mult)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def parse_class_mult(text: str) -> dict[str, float]:
    from .data import CLASSES

    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, val = part.partition("=")
        if name not in CLASSES:
            raise ConfigError(f"class_mult: unknown class {name!r}; classes are {CLASSES}")
        try:
            out[name] = float(val)
        except ValueError:
            raise ConfigError(f"class_mult: {part!r} is not CLASS=number") from None
    return out


def parse_cli_overrides(args: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: {arg!r} is not key=value")
        out[key.strip()] = value
    return out


def experiment_names() -> list[str]:
    """Every experiment under exp/ (a folder holding a config.py)."""
    return sorted(p.name for p in EXP_ROOT.iterdir() if (p / "config.py").is_file()) if EXP_ROOT.is_dir() else []


def experiment_module(name: str):
    """The module ``exp/<name>/config.py``, executed."""
    path = EXP_ROOT / name / "config.py"
    if not path.is_file():
        raise ConfigError(f"no experiment {name!r}: {path} does not exist "
                          f"(known: {', '.join(experiment_names()) or 'none'})")
    spec = importlib.util.spec_from_file_location(f"exp_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _load_exp_module(name: str) -> tuple[str | None, dict[str, Any], str]:
    module = experiment_module(name)
    overrides = dict(getattr(module, "OVERRIDES", {}))
    parent = getattr(module, "PARENT", None)
    return parent, overrides, (module.__doc__ or "").strip()


def experiment_chain(name: str) -> list[tuple[str, dict[str, Any], str]]:
    chain: list[tuple[str, dict[str, Any], str]] = []
    seen: set[str] = set()
    current: str | None = name
    while current is not None:
        if current in seen:
            raise ConfigError(f"experiment {name!r}: PARENT cycle through {current!r}")
        seen.add(current)
        parent, overrides, doc = _load_exp_module(current)
        chain.append((current, overrides, doc))
        current = parent
    return list(reversed(chain))


def load_config(name: str, cli: list[str] | dict[str, Any] | None = None, preset: str | None = None) -> Config:
    """The config of experiment ``name``: its chain of parents from the base, then (``preset``) the OVERRIDES of
    another experiment's own file (not its parents': e.g. the demo's small settings on top of exp002), then the
    command-line overrides ``cli``."""
    cfg = Config(name=name)
    chain = experiment_chain(name)
    if preset is not None:
        chain.append((preset, _load_exp_module(preset)[1], ""))
    for exp_name, overrides, _ in chain:
        if "name" in overrides:
            raise ConfigError(f"exp/{exp_name}/config.py: 'name' comes from the folder name; remove it")
        cfg = apply_overrides(cfg, overrides, f"exp/{exp_name}/config.py")
    cfg = dataclasses.replace(cfg, name=name)
    if cli:
        pairs = parse_cli_overrides(cli) if isinstance(cli, list) else dict(cli)
        cfg = apply_overrides(cfg, pairs, "command line")
    return cfg


def describe(cfg: Config) -> str:
    """The ``--help`` text: every key with its type, resolved value and meaning."""
    lines = [f"Keys of {cfg.name} (override any with key=value):", ""]
    width = max(len(k) for k in FIELDS)
    for key, f in FIELDS.items():
        value = getattr(cfg, key)
        lines.append(f"  {key:<{width}}  {f.type:<5} = {value!r:<24} {f.metadata.get('help', '')}")
    return "\n".join(lines)
