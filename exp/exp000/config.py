"""exp000: metadata-only baseline (logistic regression + gradient boosting + MLP), no images.

Hypothesis: age, sex, site, skin tone and the 14 MONET concept scores carry a real class signal; a tuned
metadata-only model reached about 0.41 macro F1 after per-class thresholds in honest cross-validation on
the full data.  It is the quickest route to a first leaderboard submission and a floor for the image
models: it needs no images and runs in under a minute on CPU.  Its calibrated, unweighted probabilities
also make it a useful blending and stacking input.
"""
PARENT = None
OVERRIDES = dict(model="tabular", tabular_models="logreg,hgb,mlp")
