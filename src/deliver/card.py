"""The model card of an export (MODEL_CARD.md and reliability.png beside it), written by ``bash run.sh export``.

Every figure in it is computed from the experiments' out-of-fold predictions and the training labels at export
time, the way the blend report computes them (src/blend.py, src/report.py): the honest out-of-fold macro F1 of the
submitted rule (no fold decided with its own labels, a blend's weights fitted on the other folds), per class, by skin
tone and by sex; the spread over fold seeds where ``bash run.sh spread`` measured it; the calibration of the blended
out-of-fold probabilities; what leaving out the MONET scores costs (measured here for a metadata-only source, or with
``export --monet-cost``, else the figure measured for exp000).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import CLASSES, load_test, load_train
from ..io_utils import atomic_write_text
from ..report import save_png, group_scores, markdown_table, per_class_table

N_BINS = 10
FEW = 100  # a class with fewer training lesions than this has a noisy threshold and a noisy F1
SHIFT = "0.04-0.05"  # validation minus leaderboard, as published MILK10k solutions report it


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> pd.DataFrame:
    """Equal-width bins of the predicted probability: lesions, mean prediction, observed frequency."""
    y, p = np.asarray(y, np.float64).ravel(), np.asarray(p, np.float64).ravel()
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = bins == b
        rows.append({"bin": f"{b / n_bins:.1f}-{(b + 1) / n_bins:.1f}", "n": int(m.sum()),
                     "mean_predicted": float(p[m].mean()) if m.any() else float("nan"),
                     "observed": float(y[m].mean()) if m.any() else float("nan")})
    return pd.DataFrame(rows)


def ece(table: pd.DataFrame) -> float:
    """Expected calibration error: the lesion-weighted mean |observed - predicted| over the bins."""
    t = table[table["n"] > 0]
    return float((t["n"] * (t["observed"] - t["mean_predicted"]).abs()).sum() / max(t["n"].sum(), 1))


def reliability_png(path: Path, pooled: pd.DataFrame, top: pd.DataFrame, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, table, label in ((axes[0], pooled, "every class, one vs rest"), (axes[1], top, "the most likely class")):
        t = table[table["n"] > 0]
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        ax.plot(t["mean_predicted"], t["observed"], marker="o", lw=1.5)
        for _, r in t.iterrows():
            ax.annotate(str(int(r["n"])), (r["mean_predicted"], r["observed"]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed frequency")
        ax.set_title(f"{label}: ECE {ece(table):.3f}", fontsize=10)
    fig.suptitle(f"{title}: calibration of the out-of-fold probabilities (numbers: predictions per bin)")
    fig.tight_layout()
    return save_png(fig, path)


def spreads(source) -> list[str]:
    """What ``bash run.sh spread`` measured for the source's experiments, as lines."""
    lines = []
    for name, member in source.members.items():
        path = Path(member.cfg.output_dir) / "spread" / f"{member.cfg.experiment}.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text(encoding="utf-8"))
        summary = s["summary"]
        lines.append(f"- {name}: the rule each run submits {summary['chosen_score']['mean']:.4f} +- "
                     f"{summary['chosen_score']['std']:.4f} over fold seeds {', '.join(map(str, s['fold_seeds']))} "
                     f"(`{path}`); " + ", ".join(f"{r} {v['mean']:.4f} +- {v['std']:.4f}" for r, v in summary.items()
                                                  if r not in ("chosen_score",)))
    return lines


def write_card(folder: Path, source, measure_monet: bool = False) -> dict:
    """MODEL_CARD.md and reliability.png of ``source`` into ``folder``; returns the card's headline figures."""
    from ..blend import BLEND, blend_experiments, score_frame
    from ..decision import RULES
    from .monet import monet_cost

    members = [source.members[n] for n in source.weights]
    first = members[0].cfg
    train = load_train(first.data_dir, check_images=False)
    test = load_test(first.data_dir, check_images=False)
    blend = blend_experiments([m.cfg for m in members], train, test)
    y = train[CLASSES].to_numpy(np.float64)
    rule = source.rule
    honest = blend.evals[BLEND].honest[rule][0]
    scores = blend.scores[BLEND]
    honest_f1 = float(scores[RULES[rule].score_key])
    table = per_class_table(y, honest)
    groups = group_scores(train, y, honest)
    pooled = reliability(y, blend.oof)
    top_p = blend.oof.max(1)
    top = reliability((y.argmax(1) == blend.oof.argmax(1)).astype(float), top_p)
    reliability_png(folder / "reliability.png", pooled, top, source.name)

    all_tabular = all(m.kind != "image" for m in source.members.values())
    cost = monet_cost(source) if (measure_monet or all_tabular) else None
    counts = y.sum(0).astype(int)
    weights = ", ".join(f"{k} {v:.4f}" for k, v in source.weights.items())
    spread = spreads(source) or ["- not measured for these experiments: `bash run.sh spread EXP --fold-seeds "
                                 "42,7,2026` measures it (a difference under about 0.01 is within one CV run's "
                                 "noise)"]
    rules = score_frame({BLEND: scores}, {BLEND: 1.0}, rule).drop(columns=["input", "weight"])
    card = [
        f"# Model card: {source.name}",
        "",
        f"Written by `bash run.sh export {source.name}` on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}. Predict with `bash run.sh predict <this folder or its "
        f".tar.gz> --data DIR` (a folder in the official test layout) or `--clinical A.jpg --dermoscopic B.jpg`.",
        "",
        "## What it is",
        "",
        f"A {source.kind} for the ISIC 2025 MILK10k benchmark: from a skin lesion's clinical close-up, its "
        f"dermoscopic image and its metadata (age, sex, skin tone, anatomical site and the 14 MONET concept scores "
        f"of the two images) it gives the probabilities of 11 diagnoses ({', '.join(CLASSES)}) and the classes it "
        f"decides positive. Blend weights: {weights}.",
        "",
        *describe_members(source),
        "",
        "## Data",
        "",
        f"MILK10k (ISIC 2025), by the \"MILK study team\", CC-BY-NC 4.0, DOI 10.34970/648456: {len(train)} "
        f"training lesions in `{Path(first.data_dir).name}` (data fingerprint in bundle.json), {first.n_folds} folds "
        f"(fold seed {first.fold_seed}). Lesions per class:",
        "",
        markdown_table(pd.DataFrame([dict(zip(CLASSES, map(int, counts)))])),
        "",
        "## Performance: honest out-of-fold macro F1",
        "",
        f"**{honest_f1:.4f}** with the submitted rule ({rule}), scored as the leaderboard scores (each class cut at "
        f"0.5) on the training lesions, each fold decided without its own labels"
        f"{' and blended with weights fitted on the other folds' if len(members) > 1 else ''}. Every rule:",
        "",
        markdown_table(rules),
        "",
        "Spread over fold seeds:",
        "",
        *spread,
        "",
        "### Per class (honest decisions)",
        "",
        markdown_table(table),
        "",
        *group_sections(groups),
        *decision_section(source),
        *calibration_section(pooled, top, len(y)),
        *missing_metadata(source, cost),
        *use_and_limits(counts),
    ]
    atomic_write_text(folder / "MODEL_CARD.md", "\n".join(card))
    return {"honest_macro_f1": honest_f1, "rule": rule, "ece": ece(pooled), "ece_top_class": ece(top),
            "monet_cost": None if cost is None else {k: cost[k] for k in ("with", "without")}}


def describe_members(source) -> list[str]:
    """One line per experiment of the source: what it is built from."""
    described = []
    for name, m in source.members.items():
        c = m.cfg
        if m.kind == "image":
            described.append(f"- **{name}** (experiment {c.experiment}, image): two `{c.backbone}` backbones "
                             f"({'one shared' if c.shared_backbone else 'one per image'}) at {c.img_size} px and the "
                             f"metadata features ({c.own.get('meta_features', 'base')}), {c.n_folds} folds averaged, "
                             f"{'8-view' if c.tta else 'no'} test-time augmentation")
        elif m.kind == "stack":
            described.append(f"- **{name}** (experiment {c.experiment}, stacker): `{c.tabular_models}` over the "
                             f"logits of {', '.join(m.inputs)} and the base metadata, {c.n_folds} folds averaged")
        else:
            described.append(f"- **{name}** (experiment {c.experiment}, metadata only): `{c.tabular_models}`, "
                             f"{c.n_folds} folds averaged")
    return described


def group_sections(groups: dict) -> list[str]:
    """Honest macro F1 by skin tone and by sex, one table each."""
    out = []
    for column, by_group in groups.items():
        rows = pd.DataFrame([{column: g, "lesions": v["n"], "macro F1 (honest)": v["macro_f1"]}
                             for g, v in by_group.items()])
        out += [f"### By {column.replace('_', ' ')}", "", markdown_table(rows), ""]
    return out


def missing_metadata(source, cost: dict | None) -> list[str]:
    """What missing MONET scores cost: measured for this source when asked, and for exp000."""
    from .monet import MONET_COST_EXP000, format_monet_cost

    c = MONET_COST_EXP000
    lines = [
        "## Missing metadata",
        "",
        "A single lesion given to `predict` has no MONET scores (the release computed them from its images with the "
        "MONET model); they and every field not given are treated as missing, as the loader treats an empty "
        "field (imputed with the training median, with a missing flag). What that costs, as honest out-of-fold "
        "macro F1 with the MONET scores removed from the validation rows only (the models trained with them, as the "
        "deployed ones are):",
        "",
    ]
    if cost is None:
        lines.append("Not measured for this source (`bash run.sh export SOURCE --monet-cost` measures it).")
    else:
        lines += [f"Measured for this source (`bash run.sh predict {source.name} --monet-cost`):", "", "```",
                  format_monet_cost(cost), "```", ""]
    lines += [f"Measured for exp000 (metadata only) on the 4,192 real training lesions, fold seeds "
              f"{c['seeds']}: honest macro F1 of the expected-F1 rule {c['with']:.4f} +- {c['with_std']:.4f} "
              f"with the MONET scores, {c['without']:.4f} +- {c['without_std']:.4f} without them (cost "
              f"{c['cost']:.4f} +- {c['cost_std']:.4f}). The same model trained without any MONET score "
              f"reaches {c['trained_without']:.4f} (fold seed 42): a single lesion is better served by a "
              "model trained without them than by this one with them missing.", ""]
    return lines


def use_and_limits(counts: np.ndarray) -> list[str]:
    few = [f"{c} ({n})" for c, n in zip(CLASSES, counts) if n < FEW]
    return [
        "## Intended use",
        "",
        "The ISIC 2025 MILK10k benchmark and research on skin-lesion classification. **Not a medical device**: it "
        "is not validated for diagnosis, screening or triage and must not be used to make or delay clinical "
        "decisions. The data licence (CC-BY-NC) excludes commercial use.",
        "",
        "## Known limits",
        "",
        f"- Classes with few training lesions: {', '.join(few) if few else 'none under ' + str(FEW)}. Their "
        "thresholds and F1 rest on a handful of lesions and move a lot between fold splits and batches.",
        f"- Published MILK10k solutions report validation scores {SHIFT} above their leaderboard scores (a shift "
        "between the training release and the benchmark, whose diagnoses include new categories); expect the "
        "leaderboard below the honest out-of-fold figure above.",
        "- A single lesion has no MONET scores, and the models lean on them: see Missing metadata above; its "
        "probabilities are those of a model missing part of its input.",
        "- The expected-F1 rule decides relative to the batch it is given: a small or unusual batch gives unstable "
        "thresholds; a single lesion uses the submission's.",
        "- Trained on one release's lesions, cameras and dermatoscopes; other populations, devices and image "
        "qualities are untested. The skin-tone and sex breakdowns above are out-of-fold figures on few lesions "
        "per group.",
        "",
    ]


def decision_section(source) -> list[str]:
    """The submitted rule, what it does, why it was chosen, and its thresholds (src/decision.py's registry)."""
    from ..decision import RULES

    rule = RULES[source.rule]
    thresholds = pd.DataFrame([dict(zip(CLASSES, map(float, source.thresholds)))])
    others = "; ".join(f"'{r.name}': {r.explain}" for r in RULES.values() if r.name != rule.name)
    return [
        "## Decision rule",
        "",
        f"Rule **{rule.name}**: {rule.explain}. {source.info.get('decision_reason', '')}. The other rules scored: "
        f"{others}. The thresholds are folded into the submitted probabilities, so the leaderboard's 0.5 cut makes "
        "exactly these decisions. " + ("" if rule.labelled else "For a new batch `predict` recomputes them on that "
                                       "batch (`--thresholds stored` and a single lesion use the submission's, below). ")
        + f"The submission's thresholds (from {source.thresholds_from or rule.thresholds_from}):",
        "",
        markdown_table(thresholds),
        "",
    ]


def calibration_section(pooled: pd.DataFrame, top: pd.DataFrame, n: int) -> list[str]:
    """The reliability plot and table of the blended out-of-fold probabilities."""
    return [
        "## Calibration",
        "",
        "![reliability](reliability.png)",
        "",
        f"The blended out-of-fold probabilities before the decision rule (every class one vs rest, {n} x "
        f"{len(CLASSES)} predictions): expected calibration error **{ece(pooled):.4f}**; the most likely class: "
        f"**{ece(top):.4f}**.",
        "",
        markdown_table(pooled),
        "",
    ]
