"""How a setting is declared, and the settings every kind of experiment reads.

A setting is declared with ``key``: its default, its help, its allowed values (choices, or a range, or free text, or
a ``check``) and whether it changes what a fold computes (``results``). The checks of every value, the fingerprint
of a result (src/experiment.py), the ``--help`` text and the saved config are all derived from these declarations.

``SHARED`` holds only what every kind of run reads: data and paths, folds and seed, the decision rule, tracking.
Every other setting is declared by the part of a recipe that reads it (``reads``: the network, the loss, the
optimiser, mixing, augmentation, the image fold loop, the tabular and stacking recipes), so an experiment's
settings are exactly its parts' keys plus the keys its own code declares (``KEYS`` in exp/<name>/train.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

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
    check: Callable[[Any], Any] | None = None  # raises ValueError with the reason for a value it refuses

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
        high_open=False, text=False, pattern=None, check=None) -> Key:
    """Declare a setting (see ``Key``); a declaration that could not be checked is refused at once."""
    k = Key(default, help, results, tuple(choices) if choices is not None else None, low, high, low_open, high_open,
            text, pattern, check)
    if k.type not in ("int", "float", "str", "bool"):
        raise TypeError(f"a setting's default must be an int, float, str or bool, got {default!r}")
    if k.type == "str" and k.choices is None and not k.text:
        raise TypeError(f"string setting with default {default!r} needs choices=... or text=True")
    if k.type in ("int", "float") and k.low is None and k.high is None:
        raise TypeError(f"numeric setting with default {default!r} needs a range (low= and/or high=)")
    return k


# --------------------------------------------------------------------------------------------------------------
# parts declare the keys they read
# --------------------------------------------------------------------------------------------------------------
def merge_keys(*groups: Mapping[str, Key], where: str = "") -> dict[str, Key]:
    """One dict of several parts' keys; a name declared twice must be the same declaration."""
    out: dict[str, Key] = {}
    for group in groups:
        for name, spec in group.items():
            if not isinstance(spec, Key):
                raise TypeError(f"{where or 'keys'}: {name!r} is not declared with key(...)")
            if name in out and out[name] is not spec:
                raise TypeError(f"{where or 'keys'}: {name!r} is declared twice, differently")
            out[name] = spec
    return out


def reads(*groups: Mapping[str, Key], **more: Key):
    """Mark a recipe part with the settings it reads (``part.keys``): ``@reads(NETWORK_KEYS, meta_hidden=key(...))``.
    A part without ``keys`` reads none."""
    keys = merge_keys(*groups, more)

    def mark(part):
        part.keys = keys
        return part

    return mark


def keys_of(part) -> dict[str, Key]:
    return dict(getattr(part, "keys", None) or {})


# --------------------------------------------------------------------------------------------------------------
# the shared settings: what every kind of run reads
# --------------------------------------------------------------------------------------------------------------
def _decision_rule(value: str) -> None:
    from .decision import RULES

    if value != "auto" and value not in RULES:
        raise ValueError(f"is not one of {['auto', *RULES]}")


SHARED: dict[str, dict[str, Key]] = {
    "data": {
        "name": key("exp001", "output folder name under output_dir (default: the experiment's folder name); letters, "
                    "digits, '.', '_', '-'", results=False, text=True, pattern=PLAIN_NAME.pattern),
        "data_dir": key("input", "folder holding the official MILK10k files (plain or twice-nested unzip)",
                        results=False, text=True),
        "output_dir": key("output", "root of all run outputs", results=False, text=True),
        "submission_dir": key("submissions", "where validated submission CSVs are written", results=False, text=True),
        "folds_csv": key("", "fold assignment CSV shared by experiments; empty = "
                         "<output_dir>/folds_k<n>_s<seed>.csv", results=False, text=True),
        "n_folds": key(5, "number of cross-validation folds", results=True, low=2),
        "fold_seed": key(42, "seed of the fold split (keep it fixed so experiments blend)", results=True, low=0),
        "seed": key(42, "training seed", results=True, low=0),
    },
    "decision": {
        "decision": key("auto", "decision rule folded into the submission: 'auto' (the rule with the best honest "
                        "out-of-fold macro F1) or a rule of the registry in src/decision.py (RULES: 'threshold', "
                        "'expected_f1', 'none', ...)", results=False, text=True, check=_decision_rule),
    },
    "tracking": {
        "wandb_project": key("milk10k", "Weights & Biases project", results=False, text=True),
        "wandb_mode": key("", "'offline', 'online', 'disabled'; empty = env WANDB_MODE, else offline",
                          results=False, choices=("", "offline", "online", "disabled")),
        "wandb_checkpoints": key(False, "also log each image fold's best.pt to W&B as a 'model' artifact (tens to "
                                 "hundreds of MB per fold; predictions, submissions and reports are always logged)",
                                 results=False),
    },
}
KEYS: dict[str, Key] = {k: v for group in SHARED.values() for k, v in group.items()}
