"""stack001: logistic-regression stacker over the metadata model (exp000) and the image model (exp001).

Hypothesis: a regularised multinomial logistic regression on both inputs' out-of-fold logits plus the
plain metadata features learns per-class weights of the two models (the image model is far stronger on
most classes, the metadata model on a few rare, age- or site-driven ones) and beats a fixed-weight blend.
A linear stacker on ~60 features keeps calibrated, unweighted probabilities for the per-class thresholds
and is much harder to overfit on the rare classes (9 MAL_OTH lesions) than a boosted-tree stacker.
"""
PARENT = None
OVERRIDES = dict(stack_inputs="exp000,exp001", tabular_models="logreg")
