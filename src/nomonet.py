"""What a lesion without its MONET scores gets, measured honestly on the out-of-fold rows of the training lesions.

Every experiment has a path without MONET (src/features.py: ``has_monet``): a tabular fold's second set of models
fitted with every MONET score removed, an image network that saw a share of its training lesions so, a stacker's
models fitted on its inputs' paths without MONET. Each writes the predictions of that path for its validation lesions,
their MONET scores removed (oof_nomonet.csv). From those, ``record`` makes what a submission stores about it:

- ``thresholds_without_monet``: per-class thresholds tuned on the blended out-of-fold rows without MONET (the
  submission's blend weights). A lesion without MONET scores is decided with them wherever stored thresholds apply
  (a single lesion always; a batch under a labelled rule or ``--thresholds stored``).
- ``monet``: honest out-of-fold macro F1 with a bootstrap interval of (``with``) the submitted rule with MONET,
  (``stored``) lesions without MONET decided with stored thresholds, each fold's tuned on the other folds' rows, and
  (``batch``) lesions without MONET decided by the submitted rule fitted on each fold as its own batch (label-free
  rules only; under a labelled rule a batch uses the stored thresholds too). Each held-out fold is blended with
  weights fitted on the other folds' rows, as the blend's own honest scores are.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .data import CLASSES
from .stats import REPS, macro_f1_interval


def member_probs(cfgs, train: pd.DataFrame, file: str) -> np.ndarray | None:
    """(members, lesions, 11): every experiment's ``file`` in training order; None when one of them lacks it."""
    from .experiment import ExperimentDir

    ids = train["lesion_id"].tolist()
    if any(not (ExperimentDir(c).path / file).is_file() for c in cfgs):
        return None
    return np.stack([ExperimentDir(c).read_probs(file, ids).to_numpy(np.float64) for c in cfgs])


def scored(y: np.ndarray, decided: np.ndarray) -> dict:
    """Honest macro F1 of folded decisions with its bootstrap interval."""
    from .scoring import macro_f1

    lo, hi = macro_f1_interval(y, decided > 0.5)
    return {"honest": macro_f1(y, decided), "interval": [lo, hi]}


def paths_without(cfgs, folds: np.ndarray, train: pd.DataFrame, rule: str) -> dict | None:
    """The path without MONET of the blend of ``cfgs``: its stored thresholds and its honest out-of-fold decisions by
    stored thresholds and by ``rule`` on each fold as a batch (module docstring); None when a member has no such
    path (made by an earlier version)."""
    from .blend import fit_weights, honest_rule, nested_weights
    from .decision import RULES, tune_thresholds
    from .experiment import NOMONET

    y = train[CLASSES].to_numpy(np.float64)
    stack, blind = member_probs(cfgs, train, "oof.csv"), member_probs(cfgs, train, NOMONET)
    if blind is None:
        return None
    weights = nested_weights(y, stack, folds)
    blended = np.tensordot(fit_weights(y, list(stack)), blind, axes=1)
    stored = honest_rule("threshold", y, blind, folds, weights)[0]
    batch = stored if RULES[rule].labelled else honest_rule(rule, y, blind, folds, weights)[0]
    return {"thresholds": tune_thresholds(y, blended), "stored": stored, "batch": batch}


def record(blend, rule: str, honest_oof: np.ndarray, train: pd.DataFrame) -> dict:
    """The sidecar's ``thresholds_without_monet`` and ``monet`` (module docstring) for ``blend`` (src/blend.py) under
    ``rule`` with its honest out-of-fold decisions ``honest_oof``; without ``monet`` figures when a member has no
    path without MONET (made by an earlier version)."""
    y = train[CLASSES].to_numpy(np.float64)
    out = {"monet": {"with": {"rule": rule, **scored(y, honest_oof)}, "n_lesions": len(y),
                     "n_folds": int(len(np.unique(blend.folds))), "bootstrap_resamples": REPS}}
    paths = paths_without(blend.cfgs, blend.folds, train, rule)
    if paths is not None:
        out["thresholds_without_monet"] = dict(zip(CLASSES, map(float, paths["thresholds"])))
        out["monet"]["without"] = {"stored": scored(y, paths["stored"]),
                                   "batch": {"rule": rule, **scored(y, paths["batch"])}}
    return out


def cost_line(monet: dict | None, n_lacking: int, n: int, stored: bool) -> str:
    """One line for lesions without (some of) their MONET scores: how many, the path they take, and what it costs as
    the source measured it."""
    who = "the lesion lacks" if n == 1 else f"{n_lacking} of {n} lesions lack"
    head = f"{who} (some of) the 14 MONET scores: predicted by the models' path without MONET"
    if not monet or "without" not in monet:
        return head + "; the source records no measure of that path"
    without = monet["without"]["stored" if stored else "batch"]
    lo, hi = without["interval"]
    w = monet["with"]
    return (f"{head}, decided with {'the stored thresholds fitted for it' if stored else 'rule ' + w['rule'] + ' on them'}"
            f": honest out-of-fold macro F1 {without['honest']:.3f} (95% CI {lo:.3f}-{hi:.3f}) against "
            f"{w['honest']:.3f} with MONET ({monet['n_lesions']} training lesions)")
