"""What a linear model cannot make itself from the extended metadata features: ``InteractionFeatures``, a
scikit-learn transformer fitted on the training rows only (used by exp000's 'lrx' model and by the image models'
'interactions' features, src/features.py), stored as plain numbers by src/portable.py."""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.preprocessing import SplineTransformer


class InteractionFeatures(BaseEstimator, TransformerMixin):
    """The extended metadata features (``MetadataEncoder(extended=True)``, columns named by ``names``) plus what a
    linear model cannot make itself: cubic B-splines (5 quantile knots) of age and the 14 MONET logits, quadratic
    B-splines (4 uniform knots) of skin tone, each site's indicator times each MONET logit, and the products of
    every pair of MONET logits (each logit / 3). Fitted on the training rows only; 381 columns on MILK10k."""

    def __init__(self, names: list[str]):
        self.names = names

    def fit(self, x: np.ndarray, y=None) -> "InteractionFeatures":
        n = list(self.names)
        self.age_, self.tone_ = n.index("age"), n.index("skin_tone")
        self.logits_ = [i for i, c in enumerate(n) if c.startswith("logit_")]
        self.sites_ = [i for i, c in enumerate(n) if c.startswith("site_")]
        self.spline_ = SplineTransformer(n_knots=5, degree=3, knots="quantile", extrapolation="constant").fit(
            x[:, [self.age_, *self.logits_]])
        self.tone_spline_ = SplineTransformer(n_knots=4, degree=2, knots="uniform", extrapolation="constant").fit(
            x[:, [self.tone_]])
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        logits, sites = x[:, self.logits_], x[:, self.sites_]
        i, j = np.triu_indices(len(self.logits_), 1)
        return np.column_stack([x, self.spline_.transform(x[:, [self.age_, *self.logits_]]),
                                self.tone_spline_.transform(x[:, [self.tone_]]),
                                (sites[:, :, None] * logits[:, None, :]).reshape(len(x), -1),
                                (logits[:, i] / 3) * (logits[:, j] / 3)])
