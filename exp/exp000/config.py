"""exp000: metadata only, no images: one logistic regression on interaction features and fine-grained targets.

Hypothesis: age, sex, site, skin tone and the 14 MONET concept scores carry a real class signal, most of it
reachable by a linear model once it is given the nonlinearities it cannot make itself (splines of age and the MONET
logits, site x MONET, MONET x MONET) and the finer diagnoses as targets ('lrx', src/tabular.py). Unweighted and
calibrated, so the label-free expected-F1 cut on the submitted batch transfers (decision=auto picks it by honest
CV). Measured on the 4,192 real training lesions (5 folds; README, Results): honest macro F1 0.400 +- 0.006 over
five fresh fold seeds, against 0.385 +- 0.006 for the earlier logistic regression + gradient boosting + MLP
average; ensembles with an MLP or kernel model on the same targets were within noise of it. About 5 s on a CPU.
"""
PARENT = None
OVERRIDES = dict(model="tabular", tabular_models="lrx")
