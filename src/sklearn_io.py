"""Fitted scikit-learn models in a skops file (``skops.io``): a zip of a JSON schema and numpy arrays saved with
``allow_pickle=False``; no pickle anywhere.

Reading one (``load``) first lists every type the file names and refuses the file if any is neither trusted by
skops by default (scikit-learn's estimators and their loss and binning internals, numpy arrays and ufuncs,
builtin containers) nor listed in ``TRUSTED``; only then are the objects built, each by its class's ``__new__`` and
``__setstate__`` with the stored values, so nothing in the file can name code to run. Writing one (``dump``)
applies the same list, so a model that would need any other type is refused when it is stored, not when it is read.

One type needs a check beyond its name: the trees of gradient boosting (``TreePredictor``) are walked by compiled
code that does not bound their node and feature indices, so ``check_trees`` bounds every index of a loaded model
before it can predict (and refuses cycles); a crafted file cannot make it read outside its arrays.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .io_utils import atomic_write

TRUSTED = [
    "src.interactions.InteractionFeatures",                             # 'lrx': its splines and products
    "scipy.interpolate._bsplines.BSpline",                              # the splines' fitted knots
    "scipy._lib.array_api_compat.numpy._aliases.asarray",               # a function a BSpline refers to
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",  # 'hgb': its trees (check_trees)
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",      # 'mlp': its optimiser's state
]


class StoreError(ValueError):
    """A model that cannot be stored without a type outside ``TRUSTED``, or a file that is not one of ours."""


def dump(obj: Any, path: str | os.PathLike) -> Path:
    """``obj`` (fitted models, in lists and dicts) as a skops file, written atomically; refused when reading it
    back would need a type this module does not trust."""
    import skops.io as sio

    data = sio.dumps(obj)
    untrusted = sorted(set(sio.get_untrusted_types(data=data)) - set(TRUSTED))
    if untrusted:
        raise StoreError(f"{path}: the models need types no reader here trusts ({', '.join(untrusted)})")
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def load(path: str | os.PathLike) -> Any:
    """What ``dump`` wrote; a file naming an untrusted type, damaged, or holding malformed trees is a StoreError
    naming it."""
    import zipfile

    import skops.io as sio
    from skops.io.exceptions import UntrustedTypesFoundException

    try:
        obj = sio.load(path, trusted=TRUSTED)
    except UntrustedTypesFoundException as exc:
        raise StoreError(f"{path}: names types this project does not trust ({exc}); not one of its model files") \
            from None
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise StoreError(f"{path}: cannot be read as a skops model file ({type(exc).__name__}: {exc})") from None
    for model in _models(obj):
        check_trees(model, path)
    return obj


def _models(obj: Any):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _models(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _models(v)
    else:
        yield obj


def check_trees(model: Any, where: str | os.PathLike = "model") -> None:
    """Refuse gradient-boosted trees whose node or feature indices point outside their arrays, that loop, or that
    use categorical splits (none of this project's models has categorical features)."""
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor

    for trees in getattr(model, "_predictors", None) or []:
        for tree in trees:
            nodes = getattr(tree, "nodes", None)
            if not isinstance(tree, TreePredictor) or not isinstance(nodes, np.ndarray) or \
                    nodes.dtype != PREDICTOR_RECORD_DTYPE or nodes.ndim != 1 or not len(nodes):
                raise StoreError(f"{where}: a gradient-boosted tree that is not one")
            inner = np.flatnonzero(nodes["is_leaf"] == 0)
            node = nodes[inner]
            bounded = ((node["left"] > inner) & (node["right"] > inner) & (node["left"] < len(nodes))
                       & (node["right"] < len(nodes)) & (node["feature_idx"] < model.n_features_in_)
                       & (node["is_categorical"] == 0))
            if not bounded.all():
                raise StoreError(f"{where}: a gradient-boosted tree whose node indices point outside it")
