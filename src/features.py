"""Metadata features of a lesion: a fitted, serialisable encoder to a dense float32 matrix.

Statistics (medians, means, standard deviations, the list of sites) come from the training rows
only; ``transform`` is row-wise, so a lesion encodes the same alone as inside any batch.  Missing
values and categories unseen in training never raise and never shift columns: they fall into the
imputed value plus a ``*_missing`` flag, or into ``sex_unknown`` / ``site_unknown``. Predict gives a lesion
without all 14 MONET scores to the models fitted without them instead (``has_monet``, ``blank_monet``;
src/nomonet.py).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pandas as pd

from .data import MONET, DataError
from .interactions import InteractionFeatures
from .io_utils import atomic_write_json
from .portable import NotPortable, from_dict, to_dict

ENCODER_VERSION = 1
FEATURES_VERSION = 1  # features.json: the whole fitted transform (MetadataFeatures.to_dict)
SEXES = ("male", "female", "unknown")
AGE_HINGES = (40.0, 60.0, 75.0)
LOGIT_EPS = 1e-3  # MONET scores are clipped to [eps, 1 - eps] before the logit (|logit| <= 6.9)
_VIEWS = ("clin", "derm")
MONET_COLUMNS = [f"{v}_{m}" for v in _VIEWS for m in MONET]


def _text(col: pd.Series) -> np.ndarray:
    """Lower-cased, stripped strings; NaN/None become ''."""
    return col.astype(object).where(col.notna(), "").astype(str).str.strip().str.lower().to_numpy()


def _num(col: pd.Series) -> np.ndarray:
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)


def _stats(values: np.ndarray) -> dict[str, float]:
    """Median for imputation, mean/std (of the observed values) for standardisation."""
    seen = values[np.isfinite(values)]
    if seen.size == 0:
        return {"median": 0.0, "mean": 0.0, "std": 1.0}
    std = float(seen.std())
    return {"median": float(np.median(seen)), "mean": float(seen.mean()), "std": std if std > 1e-12 else 1.0}


def has_monet(lesions: pd.DataFrame) -> np.ndarray:
    """Per lesion: whether all 14 MONET scores are present. A lesion missing any of them takes the path without
    MONET (``blank_monet``), the one its models and thresholds were fitted for."""
    return np.isfinite(np.stack([_num(lesions[c]) for c in MONET_COLUMNS], axis=1)).all(axis=1)


def blank_monet(lesions: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``lesions`` with every MONET score missing: what the path without MONET sees."""
    return lesions.assign(**{c: np.nan for c in MONET_COLUMNS})


def _impute(values: np.ndarray, stats: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(imputed values, standardised values, missing flag)."""
    missing = ~np.isfinite(values)
    filled = np.where(missing, stats["median"], values)
    return filled, (filled - stats["mean"]) / stats["std"], missing


class MetadataEncoder:
    """``fit`` on training lesions, then ``transform`` any lesions (one row per lesion)."""

    def __init__(self, extended: bool = False, standardize: bool = False):
        self.extended = extended
        self.standardize = standardize  # every output column z-scored with the training rows' mean and std
        self.center: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.age: dict[str, float] | None = None
        self.skin_tone: dict[str, float] | None = None
        self.sites: list[str] = []
        self.monet_median: dict[str, float] = {}
        self.feature_names: list[str] = []

    # ------------------------------------------------------------------------------------------
    @property
    def monet_columns(self) -> list[str]:
        return list(MONET_COLUMNS)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def _check(self, lesions: pd.DataFrame) -> None:
        needed = ["age_approx", "sex", "skin_tone_class", "site", "clin_manipulation", "derm_manipulation"]
        missing = [c for c in needed + self.monet_columns if c not in lesions.columns]
        if missing:
            raise DataError(f"metadata features: lesion table lacks column(s) {missing}")

    def fit(self, lesions: pd.DataFrame) -> "MetadataEncoder":
        self._check(lesions)
        self.age = _stats(_num(lesions["age_approx"]))
        self.skin_tone = _stats(_num(lesions["skin_tone_class"]))
        self.sites = sorted({s for s in _text(lesions["site"]) if s and s != "unknown"})
        self.monet_median = {c: _stats(_num(lesions[c]))["median"] for c in self.monet_columns}
        self.feature_names = self._names()
        if self.standardize:
            raw = self._raw(lesions)
            std = raw.std(0)
            self.center, self.scale = raw.mean(0), np.where(std > 1e-12, std, 1.0)
        return self

    def _names(self) -> list[str]:
        site_cols = [f"site_{s}" for s in self.sites] + ["site_unknown"]
        names = ["age", "age_missing", *[f"sex_{s}" for s in SEXES], "skin_tone", "skin_tone_missing", *site_cols,
                 *self.monet_columns, "clin_altered", "derm_altered"]
        if self.extended:
            names += [f"logit_{c}" for c in self.monet_columns]
            names += [f"diff_{m}" for m in MONET]
            names += ["age_sq", *[f"age_over_{int(h)}" for h in AGE_HINGES]]
            names += [f"age_x_{c}" for c in site_cols]
            names += ["age_x_sex_male", "age_x_sex_female", "age_missing_x_site_unknown", "n_missing"]
        return names

    def transform(self, lesions: pd.DataFrame) -> np.ndarray:
        out = self._raw(lesions)
        if self.standardize:
            out = (out - self.center) / self.scale
        return out.astype(np.float32)

    def _raw(self, lesions: pd.DataFrame) -> np.ndarray:
        if self.age is None or self.skin_tone is None:
            raise RuntimeError("MetadataEncoder.transform called before fit (or load)")
        self._check(lesions)
        n = len(lesions)

        age, age_z, age_missing = _impute(_num(lesions["age_approx"]), self.age)

        sex = _text(lesions["sex"])
        sex_oh = np.stack([sex == "male", sex == "female", ~np.isin(sex, ["male", "female"])], axis=1)

        _, tone_z, tone_missing = _impute(_num(lesions["skin_tone_class"]), self.skin_tone)

        site = _text(lesions["site"])
        site_oh = np.zeros((n, len(self.sites) + 1))
        index = {s: i for i, s in enumerate(self.sites)}
        site_oh[np.arange(n), [index.get(s, len(self.sites)) for s in site]] = 1.0

        monet = np.stack([_num(lesions[c]) for c in self.monet_columns], axis=1)
        monet = np.where(np.isfinite(monet), monet, np.array([self.monet_median[c] for c in self.monet_columns]))
        altered = np.stack([_text(lesions[f"{v}_manipulation"]) == "altered" for v in _VIEWS], axis=1)

        parts = [age_z, age_missing, sex_oh, tone_z, tone_missing, site_oh, monet, altered]
        if self.extended:
            p = np.clip(monet, LOGIT_EPS, 1.0 - LOGIT_EPS)
            k = len(MONET)
            hinges = np.stack([np.maximum(age - h, 0.0) / 10.0 for h in AGE_HINGES], axis=1)
            n_missing = age_missing.astype(float) + sex_oh[:, 2] + tone_missing + site_oh[:, -1]
            parts += [np.log(p / (1.0 - p)), monet[:, :k] - monet[:, k:], age_z ** 2, hinges,
                      age_z[:, None] * site_oh, age_z[:, None] * sex_oh[:, :2], age_missing * site_oh[:, -1],
                      n_missing]
        out = np.column_stack([np.asarray(x, dtype=np.float64) for x in parts])
        assert out.shape[1] == self.n_features and np.isfinite(out).all()
        return out

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if self.age is None:
            raise RuntimeError("MetadataEncoder.to_dict called before fit")
        return {"version": ENCODER_VERSION, "extended": self.extended, "monet": list(MONET), "age": self.age,
                "skin_tone": self.skin_tone, "sites": self.sites, "monet_median": self.monet_median,
                "feature_names": self.feature_names, "standardize": self.standardize,
                "center": None if self.center is None else self.center.tolist(),
                "scale": None if self.scale is None else self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetadataEncoder":
        if d.get("version") != ENCODER_VERSION or list(d.get("monet", [])) != list(MONET):
            raise DataError(f"metadata encoder: saved version {d.get('version')} / MONET columns do not match "
                            f"this code (version {ENCODER_VERSION}); refit it")
        enc = cls(extended=bool(d["extended"]), standardize=bool(d.get("standardize", False)))
        if enc.standardize:
            enc.center, enc.scale = np.asarray(d["center"], np.float64), np.asarray(d["scale"], np.float64)
        enc.age, enc.skin_tone = dict(d["age"]), dict(d["skin_tone"])
        enc.sites, enc.monet_median = list(d["sites"]), dict(d["monet_median"])
        enc.feature_names = enc._names()
        if enc.feature_names != list(d["feature_names"]):
            raise DataError("metadata encoder: saved feature names do not match the rebuilt ones; refit it")
        return enc

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MetadataEncoder":
        with open(path, encoding="utf-8") as fh:
            try:
                d = json.load(fh)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not a metadata-encoder JSON file ({err})") from None
        try:
            return cls.from_dict(d)
        except DataError as err:
            raise DataError(f"{path}: {err}") from None


# ----------------------------------------------------------------------------------------------------
# the one builder of metadata features, for image, tabular and stacked models alike
# ----------------------------------------------------------------------------------------------------
FEATURE_KINDS = ("base", "extended", "interactions")


class MetadataFeatures:
    """A lesion table -> the feature matrix a model sees, every statistic fitted on the training rows only.

    ``kind``: 'base' (age, sex, skin tone, site, MONET scores, manipulation), 'extended' (plus MONET logits,
    clinical-minus-dermoscopic differences, age hinges and interactions) or 'interactions' (extended plus
    ``InteractionFeatures``: splines of age and the MONET logits, site x MONET, MONET x MONET). ``standardize``:
    every output column z-scored with the training rows' mean and standard deviation. ``encoder`` is the fitted
    ``MetadataEncoder`` (part of a fold's features.json)."""

    def __init__(self, kind: str = "base", standardize: bool = False):
        if kind not in FEATURE_KINDS:
            raise ValueError(f"metadata features {kind!r}: use one of {FEATURE_KINDS}")
        self.kind, self.standardize = kind, standardize
        self.encoder: MetadataEncoder | None = None
        self._pipe = None

    def fit(self, lesions: pd.DataFrame) -> "MetadataFeatures":
        interactions = self.kind == "interactions"
        self.encoder = MetadataEncoder(extended=self.kind != "base",
                                       standardize=self.standardize and not interactions).fit(lesions)
        self._pipe = None
        if interactions:
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            steps = [InteractionFeatures(self.encoder.feature_names)] + ([StandardScaler()] if self.standardize else [])
            self._pipe = make_pipeline(*steps).fit(self.encoder.transform(lesions).astype(np.float64))
        return self

    def transform(self, lesions: pd.DataFrame) -> np.ndarray:
        if self.encoder is None:
            raise RuntimeError("MetadataFeatures.transform called before fit")
        x = self.encoder.transform(lesions)
        if self._pipe is None:
            return x
        return self._pipe.transform(x.astype(np.float64)).astype(np.float32)

    @property
    def feature_names(self) -> list[str]:
        """The encoder's column names (the columns of ``transform`` for 'base' and 'extended')."""
        return list(self.encoder.feature_names) if self.encoder is not None else []

    # the whole fitted transform as plain numbers (features.json): what predicting a new lesion needs
    def to_dict(self) -> dict[str, Any]:
        """The fitted transform, encoder and (for 'interactions') its spline knots and scaler, as plain numbers
        (src/portable.py); ``from_dict`` rebuilds a transform that computes exactly the same features."""
        if self.encoder is None:
            raise RuntimeError("MetadataFeatures.to_dict called before fit")
        return {"version": FEATURES_VERSION, "kind": self.kind, "standardize": self.standardize,
                "encoder": self.encoder.to_dict(), "pipeline": None if self._pipe is None else to_dict(self._pipe)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetadataFeatures":
        if not isinstance(d, dict) or d.get("version") != FEATURES_VERSION:
            raise DataError(f"metadata features: saved version {d.get('version') if isinstance(d, dict) else None} "
                            f"does not match this code (version {FEATURES_VERSION})")
        out = cls(d["kind"], bool(d["standardize"]))
        out.encoder = MetadataEncoder.from_dict(d["encoder"])
        if (d["pipeline"] is None) != (out.kind != "interactions"):
            raise DataError(f"metadata features: kind {out.kind!r} with{'out' if d['pipeline'] is None else ''} a "
                            "fitted pipeline")
        try:
            out._pipe = None if d["pipeline"] is None else from_dict(d["pipeline"])
        except NotPortable as err:
            raise DataError(f"metadata features: {err}") from None
        return out

    def save_fitted(self, path: str | os.PathLike) -> None:
        """The whole fitted transform (features.json)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MetadataFeatures":
        """A transform saved by ``save_fitted``; a file that is not one is a DataError naming it."""
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
            return cls.from_dict(d)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a metadata-features JSON file ({err})") from None
        except (DataError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}: {err}") from None
