"""exp000: metadata only, no images: one logistic regression on interaction features and fine-grained targets.

Hypothesis: age, sex, site, skin tone and the 14 MONET concept scores carry a real class signal, most of it
reachable by a linear model once it is given the nonlinearities it cannot make itself (splines of age and the MONET
logits, site x MONET, MONET x MONET) and the finer diagnoses as targets ('lrx', src/tabular.py). Unweighted and
calibrated, so the label-free expected-F1 cut on the submitted batch transfers (decision=auto picks it by honest
CV). Measured on the 4,192 real training lesions (5 folds, 8 fold seeds, `bash run.sh spread exp000 --fold-seeds
42,7,2026,11,23,99,5,13`; README, Results): honest macro F1 of the expected-F1 rule 0.3996 +- 0.0048, against
0.3790 +- 0.0082 for the earlier logistic regression + gradient boosting + MLP average (`tabular_models=logreg,hgb,mlp`)
on the same seeds; ensembles with an MLP or kernel model on the same targets were within noise of it. About 5 s on
a CPU.
"""
PARENT = None
OVERRIDES = dict(tabular_models="lrx")
