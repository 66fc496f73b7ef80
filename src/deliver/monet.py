"""What a lesion without its MONET scores gets from a source (``bash run.sh predict SOURCE --monet-cost``): what the
source recorded when its submission was made (src/nomonet.py), and for an experiment or a blend the same measured
again through predict's own path: every training lesion predicted by its own fold's models (out of fold), once as it
is and once with its 14 MONET scores removed, blended with the submission's weights and decided honestly (stored
thresholds tuned on the other folds, as one lesion is decided; the submitted rule on each fold as a batch).
"""
from __future__ import annotations

import numpy as np

from .predict import Predictor
from .source import Source

ROWS = (("with", "with MONET, the submitted rule"),
        ("stored", "without MONET, stored thresholds (one lesion)"),
        ("batch", "without MONET, the submitted rule on a batch"))


def flat(monet: dict | None) -> dict:
    """{'with' | 'stored' | 'batch': {'honest', 'interval'}} of a recorded ``monet`` block."""
    if not monet:
        return {}
    out = {"with": monet["with"]}
    if "without" in monet:
        out.update(stored=monet["without"]["stored"], batch=monet["without"]["batch"])
    return out


def monet_cost(source: Source) -> dict:
    """The source's recorded figures and, for an experiment or a blend (an export holds no training lesions), the
    same measured again through ``Predictor`` (module docstring)."""
    out = {"rule": source.rule, "recorded": flat(source.info.get("monet")), "measured": {}}
    if source.kind == "export":
        return out
    from ..decision import RULES, honest_oof
    from ..experiment import load_lesions
    from ..features import blank_monet
    from ..nomonet import scored

    first = next(iter(source.members.values())).cfg
    lesions = load_lesions(first)
    train, y = lesions.train.reset_index(drop=True), lesions.labels()
    probs = {}
    for label, table in (("with", train), ("without", blank_monet(train))):
        predictor = Predictor(source, table, rows_of=lesions.folds)
        if predictor.sizes():
            from ..batches import cache_workers
            from ..cache import build_cache

            image = source.image_config()
            predictor.images = {s: build_cache(train, s, image.resolved_cache_dir(), "train",
                                               num_workers=cache_workers(image)) for s in predictor.sizes()}
        probs[label] = predictor.blended()
    stored = honest_oof("threshold", y, probs["without"], lesions.folds)[0]
    batch = stored if RULES[source.rule].labelled else honest_oof(source.rule, y, probs["without"], lesions.folds)[0]
    out["measured"] = {"with": scored(y, honest_oof(source.rule, y, probs["with"], lesions.folds)[0]),
                       "stored": scored(y, stored), "batch": scored(y, batch)}
    out.update(n_lesions=len(train), n_folds=int(len(np.unique(lesions.folds))), fold_seed=first.fold_seed)
    return out


def format_monet_cost(result: dict) -> str:
    def cell(v: dict | None) -> str:
        if not v:
            return f"{'-':>26}"
        lo, hi = v["interval"]
        return f"{v['honest']:.4f} ({lo:.4f}-{hi:.4f})".rjust(26)

    where = (f" on {result['n_lesions']} training lesions ({result['n_folds']} folds, fold seed {result['fold_seed']})"
             if result.get("n_lesions") else "")
    lines = [f"honest out-of-fold macro F1 with its 95% bootstrap interval{where}, rule {result['rule']}:",
             f"{'':<46}{'measured now':>26}{'recorded at submission':>26}"]
    for key, label in ROWS:
        lines.append(f"{label:<46}{cell(result['measured'].get(key))}{cell(result['recorded'].get(key))}")
    if not result["recorded"].get("stored"):
        lines.append("(the source records no path without MONET: it was made by an earlier version; rerun it)")
    return "\n".join(lines)
