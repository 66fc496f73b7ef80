"""The settings every experiment shares, each declared once, by concern.

A setting is declared with ``key``: its default, its help, its allowed values (choices, or a range, or free text)
and whether it changes what a fold computes (``results``). The checks of every value, the fingerprint of a result
(src/experiment.py), the ``--help`` text and the saved config are all derived from these declarations; an
experiment's own code declares its own keys the same way (``KEYS`` in exp/<name>/train.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Key:
    """One setting: default, meaning, allowed values (``choices``, or ``low``/``high`` bounds, or free ``text``
    with an optional ``pattern``) and whether it changes what a fold computes (``results``)."""

    default: Any
    help: str
    results: bool
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False     # the bound itself is excluded
    high_open: bool = False
    text: bool = False         # a free string (a path, a name, a list parsed by the code that reads it)
    pattern: str | None = None

    @property
    def type(self) -> str:
        return type(self.default).__name__

    def allowed(self) -> str:
        """The allowed values in words ('' for a bool)."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = ([f"{'>' if self.low_open else '>='} {self.low:g}"] if self.low is not None else []) + \
            ([f"{'<' if self.high_open else '<='} {self.high:g}"] if self.high is not None else [])
        if parts:
            return " and ".join(parts)
        return "text" if self.text else ""


def key(default: Any, help: str, *, results: bool, choices=None, low=None, high=None, low_open=False,
        high_open=False, text=False, pattern=None) -> Key:
    """Declare a setting (see ``Key``); a declaration that could not be checked is refused at once."""
    k = Key(default, help, results, tuple(choices) if choices is not None else None, low, high, low_open, high_open,
            text, pattern)
    if k.type not in ("int", "float", "str", "bool"):
        raise TypeError(f"a setting's default must be an int, float, str or bool, got {default!r}")
    if k.type == "str" and k.choices is None and not k.text:
        raise TypeError(f"string setting with default {default!r} needs choices=... or text=True")
    if k.type in ("int", "float") and k.low is None and k.high is None:
        raise TypeError(f"numeric setting with default {default!r} needs a range (low= and/or high=)")
    return k


# --------------------------------------------------------------------------------------------------------------
# the shared settings, by concern
# --------------------------------------------------------------------------------------------------------------
SHARED: dict[str, dict[str, Key]] = {
    "data": {
        "name": key("exp001", "output folder name under output_dir (default: the experiment's folder name); letters, "
                    "digits, '.', '_', '-'", results=False, text=True, pattern=PLAIN_NAME.pattern),
        "data_dir": key("input", "folder holding the official MILK10k files (plain or twice-nested unzip)",
                        results=False, text=True),
        "output_dir": key("output", "root of all run outputs", results=False, text=True),
        "submission_dir": key("submissions", "where validated submission CSVs are written", results=False, text=True),
        "cache_dir": key("", "prepared-image cache; empty = <output_dir>/cache", results=False, text=True),
        "folds_csv": key("", "fold assignment CSV shared by experiments; empty = "
                         "<output_dir>/folds_k<n>_s<seed>.csv", results=False, text=True),
        "n_folds": key(5, "number of cross-validation folds", results=True, low=2),
        "fold_seed": key(42, "seed of the fold split (keep it fixed so experiments blend)", results=True, low=0),
        "seed": key(42, "training seed", results=True, low=0),
    },
    "network": {
        "backbone": key("tf_efficientnetv2_s", "timm model name of each image branch", results=True, text=True),
        "pretrained": key(True, "start from ImageNet weights", results=True),
        "pretrained_path": key("", "local weights file for the backbone (also env MILK10K_WEIGHTS); used instead "
                               "of downloading", results=False, text=True),
        "shared_backbone": key(False, "one backbone for both images instead of one per image", results=True),
        "img_size": key(256, "square input size of both images", results=True, low=16),
    },
    "augmentation": {
        "aug_flip": key(True, "random horizontal and vertical flips", results=True),
        "aug_rotate": key(30.0, "max rotation in degrees", results=True, low=0, high=180),
        "aug_scale": key(0.0, "max relative zoom in/out (0 = none)", results=True, low=0, high=1, high_open=True),
        "aug_color": key(0.2, "colour jitter strength (brightness, contrast, saturation)", results=True, low=0,
                         high=1),
    },
    "loss": {
        "loss": key("bce", "'bce' (per-class sigmoid) or 'ce' (softmax cross-entropy)", results=True,
                    choices=("bce", "ce")),
        "pos_weight_power": key(1.0, "BCE pos_weight = (neg/pos) ** power; 0 = unweighted", results=True, low=0),
        "class_mult": key("", "extra per-class loss multipliers, e.g. 'MAL_OTH=2,DF=1.5'", results=True, text=True),
        "label_smoothing": key(0.0, "label smoothing of the 'ce' loss", results=True, low=0, high=1, high_open=True),
        "aux_weight": key(0.0, "weight of the auxiliary diagnosis_full head (0 = off)", results=True, low=0),
        "sampler_power": key(0.0, "class-balanced sampling: weight per lesion = count(class) ** -power; 0 = plain "
                             "shuffle", results=True, low=0),
        "mixup_alpha": key(0.0, "mixup Beta(alpha, alpha); 0 = off", results=True, low=0),
        "cutmix_alpha": key(0.0, "cutmix Beta(alpha, alpha); 0 = off", results=True, low=0),
        "mix_off_epochs": key(0, "switch mixup/cutmix off for the last N epochs of stage 2", results=True, low=0),
    },
    "training": {
        "batch_size": key(64, "lesion pairs per step", results=True, low=1),
        "stage1_epochs": key(2, "epochs training the head with frozen backbones", results=True, low=0),
        "stage1_lr": key(1e-3, "learning rate of stage 1", results=True, low=0, low_open=True),
        "epochs": key(15, "maximum epochs of stage 2 (everything unfrozen)", results=True, low=0),
        "lr": key(3e-4, "stage-2 learning rate of the head", results=True, low=0, low_open=True),
        "backbone_lr": key(5e-5, "stage-2 learning rate of the backbones", results=True, low=0),
        "weight_decay": key(1e-2, "AdamW weight decay", results=True, low=0),
        "warmup_epochs": key(1.0, "linear warmup of stage 2, in epochs", results=True, low=0),
        "schedule": key("cosine", "stage-2 schedule: 'cosine' or 'constant'", results=True,
                        choices=("cosine", "constant")),
        "patience": key(4, "early stopping: stage-2 epochs without a better validation score", results=True, low=1),
        "early_stop_metric": key("f1", "validation score that picks the best epoch: 'f1' (leaderboard macro F1 at "
                                 "> 0.5), 'f1_tuned' (macro F1 after per-class thresholds), 'auc' (mean per-class "
                                 "AUC)", results=True, choices=("f1", "f1_tuned", "auc")),
        "grad_clip": key(1.0, "gradient norm clip (0 = off)", results=True, low=0),
        "ema_decay": key(0.0, "exponential moving average of weights (0 = off); the EMA is validated and saved",
                         results=True, low=0, high=1, high_open=True),
        "tta": key(True, "8-view flip/transpose test-time augmentation for out-of-fold and test predictions",
                   results=True),
    },
    "speed": {
        "device": key("auto", "'auto', 'cpu', 'cuda', 'cuda:1', 'mps'", results=False, text=True,
                      pattern=r"auto|cpu|cuda(:\d+)?|mps"),
        "num_workers": key(-1, "data loader workers and image-cache decode processes; -1 = up to 8 loader workers "
                           "on CUDA (none on the CPU) and one decode process per core", results=False, low=-1),
        "cache_on_device": key("auto", "hold the prepared image cache in device memory and gather batches there: "
                               "'yes', 'no', or 'auto' = yes on CUDA when train + test caches take at most 10% of "
                               "the GPU's memory and half its free memory", results=False,
                               choices=("auto", "yes", "no")),
        "amp": key(True, "bf16 autocast on CUDA", results=True),
        "channels_last": key(True, "channels_last memory format on CUDA", results=False),
        "fuse_backbones": key(False, "run the two backbones as one network of twice the width (grouped "
                              "convolutions): same results, half the kernel launches; convolution + BatchNorm "
                              "backbones only", results=False),
        "branch_streams": key(False, "on CUDA, run the two backbones on two CUDA streams so their kernels overlap "
                              "(single-process, uncompiled runs only)", results=False),
        "compile": key(False, "torch.compile the model", results=False),
        "compile_mode": key("default", "torch.compile mode, e.g. 'max-autotune-no-cudagraphs', 'reduce-overhead'",
                            results=False, text=True),
        "eval_batch_size": key(128, "pairs per inference step", results=False, low=1),
    },
    "decision": {
        "decision": key("auto", "decision rule folded into the submission: 'auto' (the rule with the best honest "
                        "out-of-fold macro F1), 'threshold' (per-class thresholds tuned on OOF), 'expected_f1' "
                        "(label-free, from the submitted batch itself), 'none' (raw 0.5)", results=False,
                        choices=("auto", "threshold", "expected_f1", "none")),
    },
    "tracking": {
        "wandb_project": key("milk10k", "Weights & Biases project", results=False, text=True),
        "wandb_mode": key("", "'offline', 'online', 'disabled'; empty = env WANDB_MODE, else offline",
                          results=False, choices=("", "offline", "online", "disabled")),
    },
}
KEYS: dict[str, Key] = {k: v for group in SHARED.values() for k, v in group.items()}
GROUP_OF = {k: g for g, group in SHARED.items() for k in group}
# Keys of earlier versions that a fold made under them may carry, with the value today's code is equivalent to
# (see experiment.fingerprint_differences); any other key a fold carries and today's settings lack is gone.
RETIRED = {"head_dropout": 0.0, "embed_norm": False, "max_steps_per_epoch": 0}
