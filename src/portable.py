"""The fitted metadata transform as plain numbers: a JSON-able dict out, the same fitted object back, nothing in
between that can run code.

A fold folder and an export (src/deliver/export.py) keep the fitted metadata transform (features.json) in this form,
readable and diffable beside the encoder's own numbers. Supported: ``Pipeline`` of ``StandardScaler``,
``SplineTransformer`` and the project's ``InteractionFeatures``; the rebuilt object is the same class with the same
fitted attributes, so it computes exactly what the fitted one computed (floats round-trip through JSON exactly).
Anything else raises ``NotPortable``. The tabular models are stored by skops (src/sklearn_io.py).
"""
from __future__ import annotations

import numpy as np
from scipy.interpolate import BSpline
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import SplineTransformer, StandardScaler

from .interactions import InteractionFeatures

PORTABLE_VERSION = 1


class NotPortable(ValueError):
    """A fitted object that cannot be written as plain numbers, or a dict that does not rebuild one."""


_DTYPES = ("float64", "float32", "int64", "int32")


def _plain(a) -> dict | None:
    """An array as {"dtype", "order", "values"}: float32 values are exact as JSON floats, and the memory order is
    kept because a matrix product's rounding depends on it, so the array comes back bit for bit and computes alike."""
    if a is None:
        return None
    a = np.asarray(a)
    if str(a.dtype) not in _DTYPES:
        raise NotPortable(f"an array of dtype {a.dtype} is not plain numbers")
    order = "F" if a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous else "C"
    return {"dtype": str(a.dtype), "order": order, "values": a.tolist()}


def _array(d: dict | None) -> np.ndarray | None:
    if d is None:
        return None
    if d["dtype"] not in _DTYPES:
        raise ValueError(f"dtype {d['dtype']!r} is not one of {_DTYPES}")
    if d.get("order", "C") not in ("C", "F"):
        raise ValueError(f"order {d['order']!r} is not 'C' or 'F'")
    return np.asarray(d["values"], dtype=d["dtype"], order=d.get("order", "C"))


def _params(obj) -> dict:
    """The constructor parameters, JSON-able (an array becomes a list)."""
    out = {}
    for k, v in obj.get_params(deep=False).items():
        out[k] = v.tolist() if isinstance(v, np.ndarray) else v
        if not isinstance(out[k], (str, int, float, bool, list, type(None))):
            raise NotPortable(f"{type(obj).__name__}: parameter {k}={v!r} is not plain data")
    return out


def to_dict(obj) -> dict:
    """``obj`` (fitted) as a JSON-able dict; NotPortable names what cannot be written so."""
    if isinstance(obj, Pipeline):
        return {"type": "pipeline", "steps": [to_dict(step) for _, step in obj.steps]}
    if isinstance(obj, InteractionFeatures):
        return {"type": "interaction_features", "names": list(obj.names), "spline": to_dict(obj.spline_),
                "tone_spline": to_dict(obj.tone_spline_)}
    if isinstance(obj, StandardScaler):
        return {"type": "standard_scaler", "params": _params(obj),
                **{k: _plain(getattr(obj, k)) for k in ("mean_", "scale_", "var_", "n_samples_seen_")},
                "n_features_in_": int(obj.n_features_in_)}
    if isinstance(obj, SplineTransformer):
        return {"type": "spline", "params": _params(obj), "knots": [_plain(s.t) for s in obj.bsplines_],
                "n_splines": int(obj.bsplines_[0].c.shape[1]), "n_features_out_": int(obj.n_features_out_),
                "n_features_in_": int(obj.n_features_in_)}
    raise NotPortable(f"{type(obj).__name__} is not a part of the metadata transform")


def from_dict(d: dict):
    """The fitted object ``to_dict`` wrote; NotPortable when the dict is not one."""
    try:
        return _build(d)
    except NotPortable:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise NotPortable(f"a stored {d.get('type', 'object') if isinstance(d, dict) else 'object'} does not "
                          f"rebuild ({type(exc).__name__}: {exc})") from None


def _build(d: dict):
    kind = d["type"]
    if kind == "pipeline":
        return make_pipeline(*(_build(step) for step in d["steps"]))
    if kind == "interaction_features":
        obj = InteractionFeatures(list(d["names"]))
        n = obj.names
        obj.age_, obj.tone_ = n.index("age"), n.index("skin_tone")
        obj.logits_ = [i for i, c in enumerate(n) if c.startswith("logit_")]
        obj.sites_ = [i for i, c in enumerate(n) if c.startswith("site_")]
        obj.spline_, obj.tone_spline_ = _build(d["spline"]), _build(d["tone_spline"])
        return obj
    if kind == "standard_scaler":
        obj = StandardScaler(**d["params"])
        for k in ("mean_", "scale_", "var_", "n_samples_seen_"):
            setattr(obj, k, _array(d[k]))
        obj.n_features_in_ = int(d["n_features_in_"])
        return obj
    if kind == "spline":
        obj = SplineTransformer(**d["params"])
        n_splines = int(d["n_splines"])
        coef = np.eye(n_splines, dtype=np.float64)
        if obj.extrapolation == "periodic":
            coef = np.concatenate((coef, coef[:obj.degree, :]))
        extrapolate = obj.extrapolation in ("periodic", "continue")
        obj.bsplines_ = [BSpline.construct_fast(_array(t), coef, obj.degree, extrapolate=extrapolate)
                         for t in d["knots"]]
        obj.n_features_out_ = int(d["n_features_out_"])
        obj.n_features_in_ = int(d["n_features_in_"])
        if len(obj.bsplines_) != obj.n_features_in_:
            raise ValueError(f"{len(obj.bsplines_)} knot vectors for {obj.n_features_in_} features")
        return obj
    raise NotPortable(f"unknown stored object type {kind!r}")
