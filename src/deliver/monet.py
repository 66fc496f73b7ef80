"""What leaving out the MONET concept scores costs a source: honest out-of-fold macro F1 of its folds with the
scores of the validation rows removed (``bash run.sh predict SOURCE --monet-cost``), and the figure measured for
exp000 that the one-lesion help and the model card quote.
"""
from __future__ import annotations

import numpy as np

from ..data import MONET
from .predict import Predictor
from .source import PredictError, Source

# What leaving out the 14 MONET scores cost exp000 on the 4,192 real training lesions (README, Results): honest
# out-of-fold macro F1 of the expected-F1 rule with the MONET scores removed from the validation rows only (the models
# trained with them, as the deployed ones are), mean +- std over fold seeds 42, 7, 2026 (`bash run.sh predict exp000
# --monet-cost data_dir=<the CSVs>`, and the same with name=exp000_fs7 fold_seed=7, ...); ``trained_without``: exp000
# trained and scored with every MONET score blank (its best honest rule, threshold; fold seed 42).
MONET_COST_EXP000 = {"with": 0.3990, "with_std": 0.0029, "without": 0.1692, "without_std": 0.0035,
                     "cost": 0.2298, "cost_std": 0.0051, "seeds": "42, 7, 2026", "trained_without": 0.2424}


def monet_cost(source: Source) -> dict:
    """Honest out-of-fold macro F1 of the source with and without the MONET scores of the validation rows (the
    folds' models trained with them, as deployed): each fold predicts its own validation rows with every MONET score
    missing, the blend weights are the submission's, and every decision rule is scored honestly (a labelled rule
    tuned on the other folds, the label-free one per fold)."""
    from ..decision import honest_scores
    from ..experiment import load_lesions

    if source.kind == "export":
        raise PredictError("--monet-cost needs the training lesions and folds: run it on the experiment or blend, "
                           "not on an export")
    first = next(iter(source.members.values())).cfg
    lesions = load_lesions(first)
    train = lesions.train.reset_index(drop=True)
    blind = train.copy()
    for c in (f"{v}_{m}" for v in ("clin", "derm") for m in MONET):
        blind[c] = np.nan
    y = lesions.labels()
    out = {}
    for label, table in (("with", train), ("without", blind)):
        predictor = Predictor(source, table, rows_of=lesions.folds)
        if predictor.sizes():
            from ..batches import cache_workers
            from ..cache import build_cache

            image = source.image_config()
            predictor.images = {s: build_cache(train, s, image.resolved_cache_dir(), "train",
                                               num_workers=cache_workers(image)) for s in predictor.sizes()}
        out[label] = honest_scores(y, predictor.blended(), lesions.folds)
    return {"rule": source.rule, "n_lesions": len(train), "n_folds": int(len(np.unique(lesions.folds))),
            "fold_seed": first.fold_seed, "data_dir": str(first.data_dir), **out}



def format_monet_cost(result: dict) -> str:
    rule = result["rule"]
    lines = [f"honest out-of-fold macro F1 on {result['n_lesions']} training lesions ({result['n_folds']} folds, fold "
             f"seed {result['fold_seed']}), the models trained with the MONET scores:",
             f"{'rule':>12} {'with MONET':>11} {'without':>9} {'change':>8}"]
    for r in result["with"]:
        lines.append(f"{r:>12} {result['with'][r]:>11.4f} {result['without'][r]:>9.4f} "
                     f"{result['without'][r] - result['with'][r]:>+8.4f}" + ("  (submitted)" if r == rule else ""))
    return "\n".join(lines)



def monet_note() -> str:
    c = MONET_COST_EXP000
    return (f"leaving them out cost the metadata-only exp000 {c['cost']:.2f} honest macro F1 on the 4,192 real "
            f"training lesions ({c['with']:.2f} -> {c['without']:.2f}; a model trained without them reaches "
            f"{c['trained_without']:.2f}); --monet-cost measures a source")
