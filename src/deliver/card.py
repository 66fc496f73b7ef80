"""The model card of an export (MODEL_CARD.md and reliability.png beside it), written by ``bash run.sh export``, laid
out as model cards are (Mitchell et al. 2019): model details, intended use, factors, training data, metrics,
quantitative analyses, caveats and ethical considerations; it opens with the YAML block a model card on the Hugging
Face Hub carries (licence, data, metrics with their values), so it can be published as it is.

Every figure is computed at export time from the experiments' out-of-fold predictions and the training labels, as the
blend report computes them (src/blend.py): the honest decisions of the submitted rule (no fold decided with its own
labels, a blend's weights fitted on the other folds), per class and per group of lesions, each with a 95% bootstrap
interval over lesions (src/stats.py); a group under ``stats.MIN_GROUP`` lesions is listed as too few, not scored, and a
group's macro F1 is taken over the classes it holds. The path a lesion without MONET scores takes (every single
lesion) is scored the same way (src/nomonet.py). Paths are written as names only: the card travels.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import CLASSES, load_test, load_train
from ..io_utils import atomic_write_text
from ..report import group_label, markdown_table, save_png
from ..stats import (MIN_GROUP, REPS, class_rates, confusion, f1_from, macro, macro_f1_interval, percentile_interval,
                     present_macro_f1, resample_counts, weighted_auc)

N_BINS = 10
FEW = 100  # a class with fewer training lesions than this has a noisy threshold and a noisy F1
SHIFT = "0.04-0.05"  # validation minus leaderboard, as published MILK10k solutions report it
AGE_BANDS = ((0, 40, "under 40"), (40, 60, "40-59"), (60, 75, "60-74"), (75, 200, "75 and over"))
DATA_CREDIT = "MILK10k (ISIC 2025), by the \"MILK study team\", CC-BY-NC 4.0, DOI 10.34970/648456"


# ----------------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------------
def with_interval(value: float, lo: float, hi: float) -> str:
    if not np.isfinite(value):
        return "-"
    return f"{value:.3f} ({lo:.3f}-{hi:.3f})" if np.isfinite(lo) else f"{value:.3f}"


def class_table(y: np.ndarray, decided: np.ndarray, p: np.ndarray | None, weights: np.ndarray) -> pd.DataFrame:
    """Per class: lesions, F1, sensitivity and specificity of the decisions and (``p`` given) AUC of the
    probabilities, each with its 95% bootstrap interval (``weights``: the resamples)."""
    point, boot = confusion(y, decided), confusion(y, decided, weights)
    f1, f1_b = f1_from(point, present_only=True), f1_from(boot, present_only=True)
    rates, rates_b = class_rates(point), class_rates(boot)
    rows = []
    for j, c in enumerate(CLASSES):
        row = {"class": c, "lesions": int(y[:, j].sum()),
               "F1": with_interval(f1[j], *percentile_interval(f1_b[:, j])),
               **{k: with_interval(rates[k][j], *percentile_interval(rates_b[k][:, j]))
                  for k in ("sensitivity", "specificity")}}
        if p is not None:
            auc = weighted_auc(y[:, j], p[:, j], np.ones((1, len(y))))[0]
            row["AUC"] = with_interval(auc, *percentile_interval(weighted_auc(y[:, j], p[:, j], weights)))
        rows.append(row)
    return pd.DataFrame(rows)


def age_band(age) -> str:
    a = pd.to_numeric(age, errors="coerce")
    if not np.isfinite(a):
        return "missing"
    return next(label for lo, hi, label in AGE_BANDS if lo <= a < hi)


def factors(train: pd.DataFrame) -> dict[str, np.ndarray]:
    """The groups lesions are reported by: skin tone, sex, age band, anatomical site (missing values a group)."""
    return {"skin tone": np.array([group_label(v) for v in train["skin_tone_class"]]),
            "sex": np.array([group_label(v) for v in train["sex"]]),
            "age": np.array([age_band(v) for v in train["age_approx"]]),
            "site": np.array([group_label(v) for v in train["site"]])}


def group_order(labels: np.ndarray, factor: str) -> list[str]:
    if factor == "age":
        return [b for _, _, b in AGE_BANDS if b in set(labels)] + (["missing"] if "missing" in set(labels) else [])
    return sorted(set(labels), key=lambda g: (g == "missing", g))


def group_table(labels: np.ndarray, y: np.ndarray, decided: np.ndarray, factor: str) -> pd.DataFrame:
    """Per group: lesions, classes present, and the macro F1 over the classes present in it with its 95% bootstrap
    interval (resampling the group's lesions); a group under ``MIN_GROUP`` lesions is 'too few', not scored."""
    rows = []
    for g in group_order(labels, factor):
        m = labels == g
        present = int((y[m].sum(0) > 0).sum())
        if m.sum() < MIN_GROUP:
            score = f"too few (under {MIN_GROUP} lesions)"
        else:
            yg, dg = y[m], decided[m]
            boot = macro(f1_from(confusion(yg, dg, resample_counts(int(m.sum()))), present_only=True))
            score = with_interval(present_macro_f1(yg, dg), *percentile_interval(boot))
        rows.append({factor: g, "lesions": int(m.sum()), "classes present": present,
                     "macro F1 over the classes present (95% CI)": score})
    return pd.DataFrame(rows)


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> pd.DataFrame:
    """Equal-width bins of the predicted probability: predictions, mean prediction, observed frequency."""
    y, p = np.asarray(y, np.float64).ravel(), np.asarray(p, np.float64).ravel()
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = bins == b
        rows.append({"bin": f"{b / n_bins:.1f}-{(b + 1) / n_bins:.1f}", "n": int(m.sum()),
                     "mean_predicted": float(p[m].mean()) if m.any() else float("nan"),
                     "observed": float(y[m].mean()) if m.any() else float("nan")})
    return pd.DataFrame(rows)


def calibration_reading(table: pd.DataFrame, what: str) -> str:
    """What a reliability table shows, in words: the bins whose observed frequency lies more than two binomial
    standard errors below the mean prediction (overconfident) or above it (underconfident)."""
    over, under = [], []
    for _, r in table[table["n"] >= 20].iterrows():
        pred, obs = r["mean_predicted"], r["observed"]
        se = np.sqrt(max(pred * (1 - pred), 1e-6) / r["n"])
        text = f"{r['bin']} ({pred:.3f} predicted, {obs:.3f} observed, {int(r['n'])} predictions)"
        if obs < pred - 2 * se:
            over.append(text)
        elif obs > pred + 2 * se:
            under.append(text)
    parts = []
    if over:
        parts.append("overconfident (the class is less frequent than predicted) in " + "; ".join(over))
    if under:
        parts.append("underconfident (more frequent than predicted) in " + "; ".join(under))
    if not parts:
        return f"{what}: every bin with 20 or more predictions is within two standard errors of the diagonal."
    return f"{what}: " + "; ".join(parts) + ". Other bins with 20 or more predictions lie within two standard errors."


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
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"{title}: calibration of the out-of-fold probabilities (numbers: predictions per bin)")
    fig.tight_layout()
    return save_png(fig, path)


# ----------------------------------------------------------------------------------------------------
# words
# ----------------------------------------------------------------------------------------------------
def provenance(data_dir: str) -> tuple[str, dict | None]:
    """Where the training data comes from, in a sentence, and what of it was generated (None: nothing)."""
    from ..tools.synth import generated

    made = generated(data_dir)
    if made is None:
        return DATA_CREDIT, None
    if made.get("generated") == "images":
        return (f"the metadata and labels of {DATA_CREDIT}; the images are generated by src/tools/synth.py (class "
                f"signal: {made.get('signal', 'unknown')}), not the release's"), made
    return ("a miniature MILK10k generated by src/tools/synth.py: no real patient or lesion is behind it, and no "
            "figure below says anything about real lesions"), made


def reads_images(source) -> bool:
    return any(m.kind == "image" for m in source.members.values())


def what_it_is(source) -> str:
    kind = {"experiment": "An experiment", "blend": "A blend"}.get(source.kind, "A model")
    n = len(source.weights)
    inputs = ("a lesion's clinical close-up, its dermoscopic image and its metadata (age, sex, skin tone, anatomical "
              "site and the 14 MONET concept scores of the two images)" if reads_images(source) else
              "a lesion's metadata alone (age, sex, skin tone, anatomical site and the 14 MONET concept scores of its "
              "two images)")
    blend = f" of {n} experiments, their probabilities averaged with the weights below," if n > 1 else ""
    return (f"{kind}{blend} for the ISIC 2025 MILK10k benchmark: from {inputs} it gives the probabilities of 11 "
            f"diagnoses ({', '.join(CLASSES)}) and the classes it decides positive."
            + ("" if reads_images(source) else " It never looks at the images themselves."))


def describe_members(source) -> list[str]:
    """One line per experiment of the source: what it is built from."""
    described = []
    for name, m in source.members.items():
        c = m.cfg
        weight = f" (blend weight {source.weights[name]:.4f})" if name in source.weights and len(source.weights) > 1 \
            else ""
        if m.kind == "image":
            described.append(f"- **{name}**{weight}: experiment {c.experiment}, images and metadata: two "
                             f"`{c.backbone}` backbones at {c.img_size} px and the metadata features "
                             f"({c.own.get('meta_features', 'base')}), {c.n_folds} folds averaged, "
                             f"{'8-view' if c.tta else 'no'} test-time augmentation; without MONET, a logistic regression "
                             "per fold on the metadata without MONET and, where a cross-validation on the fold's "
                             "training lesions finds they help, the network's image embeddings")
        elif m.kind == "stack":
            described.append(f"- **{name}**{weight}: experiment {c.experiment}, a stacker: `{c.tabular_models}` over "
                             f"the predictions of {', '.join(m.inputs)} and the base metadata, {c.n_folds} folds "
                             "averaged; without MONET, the same models fitted on its inputs' paths without MONET")
        else:
            described.append(f"- **{name}**{weight}: experiment {c.experiment}, metadata only: `{c.tabular_models}`, "
                             f"{c.n_folds} folds averaged; without MONET, the same models fitted with every MONET "
                             "score removed")
    return described


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
                     f"{summary['chosen_score']['std']:.4f} over fold seeds {', '.join(map(str, s['fold_seeds']))}; "
                     + ", ".join(f"{r} {v['mean']:.4f} +- {v['std']:.4f}" for r, v in summary.items()
                                 if r != "chosen_score"))
    return lines


def yaml_block(source, headline: float, auc: float, without: float | None, made: dict | None) -> list[str]:
    """The metadata block of a model card on the Hugging Face Hub."""
    import yaml

    images = reads_images(source)
    task = "image-classification" if images else "tabular-classification"
    metrics = [{"type": "f1", "value": round(headline, 4),
                "name": f"honest out-of-fold macro F1, rule {source.rule} (each class cut at 0.5)"},
               {"type": "roc_auc", "value": round(auc, 4), "name": "mean per-class ROC AUC, out of fold"}]
    if without is not None:
        metrics.append({"type": "f1", "value": round(without, 4),
                        "name": "honest out-of-fold macro F1 without the MONET scores (one lesion's path)"})
    meta = {"license": "cc-by-nc-4.0", "library_name": "pytorch" if images else "scikit-learn",
            "pipeline_tag": task,
            "tags": ["dermatology", "skin-lesion", "isic-2025", "milk10k", "not-for-clinical-use",
                     *(["generated-data"] if made else [])],
            "datasets": ["generated by src/tools/synth.py" if made and made.get("generated") != "images"
                         else "MILK10k (ISIC 2025, doi:10.34970/648456)"],
            "metrics": ["f1", "roc_auc"],
            "model-index": [{"name": source.name, "results": [{
                "task": {"type": task, "name": "skin lesion diagnosis, 11 classes"},
                "dataset": {"name": "training lesions, 5-fold out of fold" if not made else "generated lesions, out "
                            "of fold", "type": "milk10k", "split": "train"},
                "metrics": metrics}]}]}
    return ["---", yaml.safe_dump(meta, sort_keys=False, width=120).strip(), "---", ""]


# ----------------------------------------------------------------------------------------------------
# the card
# ----------------------------------------------------------------------------------------------------
def write_card(folder: Path, source, measure_monet: bool = False) -> dict:
    """MODEL_CARD.md and reliability.png of ``source`` into ``folder``; returns the card's headline figures."""
    from ..blend import BLEND, blend_experiments, score_frame
    from ..decision import RULES
    from ..nomonet import paths_without
    from .bundle import commit

    members = [source.members[n] for n in source.weights]
    first = members[0].cfg
    train = load_train(first.data_dir, check_images=False)
    test = load_test(first.data_dir, check_images=False)
    blend = blend_experiments([m.cfg for m in members], train, test)
    y = train[CLASSES].to_numpy(np.float64)
    rule = source.rule
    decided = blend.evals[BLEND].honest[rule][0] > 0.5
    scores = blend.scores[BLEND]
    headline = float(scores[RULES[rule].score_key])
    lo, hi = macro_f1_interval(y, decided)
    paths = paths_without([m.cfg for m in members], blend.folds, train, rule)
    without = None if paths is None else paths["stored"] > 0.5
    pooled = reliability(y, blend.oof)
    top = reliability((y.argmax(1) == blend.oof.argmax(1)).astype(float), blend.oof.max(1))
    reliability_png(folder / "reliability.png", pooled, top, source.name)
    credit, made = provenance(first.data_dir)
    without_f1 = None if without is None else float(macro(f1_from(confusion(y, without))))
    card = [
        *yaml_block(source, headline, float(scores["auc"]), without_f1, made),
        f"# Model card: {source.name}",
        "",
        *details(source, commit()),
        *intended_use(source),
        *factors_section(),
        *data_section(train, y, first, credit, made),
        *metrics_section(source, y, decided, blend, headline, (lo, hi), rule, scores, score_frame),
        *groups_section(train, y, decided),
        *monet_section(source, y, without, measure_monet),
        *decision_section(source),
        *calibration_section(pooled, top, len(y)),
        *caveats(source, y, decided, without, train),
    ]
    atomic_write_text(folder / "MODEL_CARD.md", "\n".join(card))
    return {"honest_macro_f1": headline, "interval": [lo, hi], "rule": rule, "without_monet": without_f1}


def chosen_candidate(info: dict) -> str:
    """Which of the blend's candidates these weights are and why it was chosen (src/blend.py), as the submission
    recorded it; nothing for a single experiment."""
    candidates, chosen = info.get("blend_candidates") or {}, info.get("blend_candidate")
    if len(candidates) < 2 or chosen is None:
        return ""
    return (f": the candidate `{chosen}` among {len(candidates)} ({', '.join(f'`{c}`' for c in candidates)}), "
            f"chosen because {info.get('blend_choice_reason', 'it had the best honest macro F1')}")


def details(source, revision: str) -> list[str]:
    weights = ", ".join(f"{k} {v:.4f}" for k, v in source.weights.items())
    trained = source.info.get("commit")
    return [
        "## Model details", "",
        what_it_is(source), "",
        *describe_members(source), "",
        f"- Blend weights: {weights}{chosen_candidate(source.info)}; decision rule **{source.rule}** (below).",
        f"- Code: this repository at revision `{revision}` (export)"
        + (f", submission made at `{trained}`" if trained and trained != revision else "") + "; MIT licence.",
        "- Model licence: CC-BY-NC 4.0 (no commercial use), the licence of the MILK10k data this project's models are "
        "trained on.",
        f"- Written by `bash run.sh export {source.name}` on {datetime.now(timezone.utc).strftime('%Y-%m-%d')}. "
        "Predict with `bash run.sh predict <this folder or its .tar.gz> --data DIR` (lesions in the official test "
        "layout) or, for one lesion, " + ("`--clinical A.jpg --dermoscopic B.jpg` and its metadata"
                                          if reads_images(source) else "its metadata (`--age 60 --sex female --site "
                                          "trunk --skin-tone 3`; no images)") + ".",
        "- Contact and issues: the repository's issue tracker.", "",
    ]


def intended_use(source) -> list[str]:
    images = reads_images(source)
    return [
        "## Intended use", "",
        "- **Primary use**: research on skin-lesion classification and the ISIC 2025 MILK10k benchmark; comparing "
        "methods under the benchmark's metric (macro F1, each class cut at 0.5).",
        "- **Primary users**: machine-learning and dermatology researchers.",
        "- **Out of scope**: any clinical use. It is **not a medical device**: not validated for diagnosis, "
        "screening or triage, and it must not be used to make or delay a clinical decision. Not for commercial use "
        "(CC-BY-NC data). "
        + ("Not for a lesion without both a clinical close-up and a dermoscopic image: it was trained on pairs and "
           "reads both. " if images else
           "It does not look at the lesion: its answer rests on age, sex, skin tone, site and the MONET scores only. ")
        + "Not for populations, cameras or dermatoscopes unlike the training release's (untested).", "",
    ]


def factors_section() -> list[str]:
    return [
        "## Factors", "",
        "Reported by skin tone (the release's skin_tone_class, 0 the darkest to 5 the lightest), sex, age band and "
        "anatomical site, the factors the "
        "metadata records. Camera, dermatoscope, clinic and country are not recorded, so differences between them "
        "cannot be measured here. Whether a lesion has its 14 MONET scores changes which path predicts it (below).",
        "",
    ]


def counts_table(labels: np.ndarray, name: str, order: list[str]) -> str:
    return markdown_table(pd.DataFrame([{name: g, "lesions": int((labels == g).sum()),
                                         "share": f"{(labels == g).mean():.1%}"} for g in order]))


def data_section(train: pd.DataFrame, y: np.ndarray, cfg, credit: str, made: dict | None) -> list[str]:
    groups = factors(train)
    ages = pd.to_numeric(train["age_approx"], errors="coerce")
    q1, med, q3 = np.nanpercentile(ages, [25, 50, 75])
    out = [
        "## Training data", "",
        f"{len(train)} training lesions (the folder `{Path(cfg.data_dir).name}`, its fingerprint in bundle.json; "
        f"{cfg.n_folds} folds, fold seed {cfg.fold_seed}). Source: {credit}. Every figure below is out of fold on "
        "these lesions: no separate test set was scored.", "",
        "Lesions per class:", "",
        markdown_table(pd.DataFrame([dict(zip(CLASSES, map(int, y.sum(0))))])), "",
        f"Age: median {med:.0f} years (quartiles {q1:.0f}-{q3:.0f}), {int(ages.isna().sum())} missing.", "",
    ]
    for factor in ("age", "sex", "skin tone", "site"):
        out += [f"By {factor}:", "", counts_table(groups[factor], factor, group_order(groups[factor], factor)), ""]
    return out


def metrics_section(source, y, decided, blend, headline, interval, rule, scores, score_frame) -> list[str]:
    from ..blend import BLEND

    spread = spreads(source) or ["- not measured for these experiments: `bash run.sh spread EXP --fold-seeds "
                                 "42,7,2026` measures it."]
    rules = score_frame({BLEND: scores}, {BLEND: 1.0}, rule).drop(columns=["input", "weight"])
    return [
        "## Metrics", "",
        f"**Honest out-of-fold macro F1: {headline:.4f}** (95% CI {interval[0]:.4f}-{interval[1]:.4f}; "
        f"{REPS} bootstrap resamples of the {len(y)} lesions) with the submitted rule ({rule}), scored as the "
        "leaderboard scores (each class cut at 0.5), each fold decided without its own labels"
        + (" and blended with weights fitted on the other folds" if len(source.weights) > 1 else "") + ". The "
        "interval is the sampling noise of this many lesions; the spread over fold splits is below. Every rule:", "",
        markdown_table(rules), "",
        "Spread over fold seeds (the same experiment, other fold splits):", "", *spread, "",
        "### Per class", "",
        "F1, sensitivity and specificity of the honest decisions; AUC of the out-of-fold probabilities; 95% "
        "bootstrap intervals in brackets.", "",
        markdown_table(class_table(y, decided, blend.oof, resample_counts(len(y)))), "",
    ]


def groups_section(train: pd.DataFrame, y: np.ndarray, decided: np.ndarray) -> list[str]:
    out = ["## Quantitative analyses: groups of lesions", "",
           f"Macro F1 of the honest decisions over the classes present in each group (a class a group lacks is not "
           f"counted, where the leaderboard's rule would credit it F1 = 1), with a 95% bootstrap interval over the "
           f"group's lesions; groups of fewer than {MIN_GROUP} lesions are listed, not scored.", ""]
    for factor, labels in factors(train).items():
        out += [f"### By {factor}", "", markdown_table(group_table(labels, y, decided, factor)), ""]
    return out


def monet_section(source, y: np.ndarray, without: np.ndarray | None, measure: bool) -> list[str]:
    """The path a lesion without MONET scores takes and what it gets, as the submission recorded it."""
    from .monet import flat, format_monet_cost, monet_cost

    rec = flat(source.info.get("monet"))
    out = ["## One lesion, and lesions without MONET scores", "",
           "The 14 MONET concept scores came with the release, computed from its images by the MONET model; a user's "
           "own lesion has none, and neither has any lesion given to `predict` one at a time. A lesion without all 14 "
           "takes the path without MONET (every experiment learns one; see Model details) and is decided with "
           "thresholds fitted for it on the blended out-of-fold rows without MONET. Measured honestly out of fold, "
           "every training lesion's MONET scores removed:", ""]
    if without is None or "stored" not in rec:
        return out + ["Not recorded for this source (made by an earlier version: rerun it and its blend).", ""]
    from ..decision import RULES

    labelled = RULES[source.rule].labelled
    rows = [("with MONET, the submitted rule", rec["with"]),
            ("without MONET, stored thresholds: one lesion" + (f", and any batch (rule {source.rule} is labelled)"
                                                               if labelled else ""), rec["stored"]),
            *([] if labelled else [(f"without MONET, rule {source.rule} fitted on the batch", rec["batch"])])]
    out += [markdown_table(pd.DataFrame([{"path": k, "honest macro F1 (95% CI)": with_interval(v["honest"], *v["interval"])}
                                         for k, v in rows])), "",
            "Per class without MONET (stored thresholds, as one lesion is decided):", "",
            markdown_table(class_table(y, without, None, resample_counts(len(y)))), "",
            "`bash run.sh predict <experiment or blend> --monet-cost data_dir=...` measures the same through "
            "predict's own path.", ""]
    if measure:
        out += ["Measured again now through predict's path:", "", "```", format_monet_cost(monet_cost(source)), "```", ""]
    return out


def decision_section(source) -> list[str]:
    """The submitted rule, what it does, why it was chosen, and its thresholds (src/decision.py's registry)."""
    from ..decision import RULES

    rule = RULES[source.rule]
    thresholds = pd.DataFrame([dict(zip(CLASSES, map(float, source.thresholds)))])
    others = "; ".join(f"'{r.name}': {r.explain}" for r in RULES.values() if r.name != rule.name)
    out = [
        "## Decision rule", "",
        f"Rule **{rule.name}**: {rule.explain}. {source.info.get('decision_reason', '')}. The other rules scored: "
        f"{others}. The thresholds are folded into the submitted probabilities, so the leaderboard's 0.5 cut makes "
        "exactly these decisions. " + ("" if rule.labelled else "For a new batch `predict` recomputes them on that "
                                       "batch (`--thresholds stored` and a single lesion use the stored ones). ")
        + f"The submission's thresholds (from {source.thresholds_from or rule.thresholds_from}):", "",
        markdown_table(thresholds), "",
    ]
    stored = source.info.get("thresholds_without_monet")
    if stored:
        out += ["The stored thresholds of the path without MONET:", "",
                markdown_table(pd.DataFrame([{c: float(stored[c]) for c in CLASSES}])), ""]
    return out


def calibration_section(pooled: pd.DataFrame, top: pd.DataFrame, n: int) -> list[str]:
    """The reliability plot and table of the blended out-of-fold probabilities, and what they show."""
    return [
        "## Calibration", "",
        "![reliability](reliability.png)", "",
        f"The blended out-of-fold probabilities before the decision rule ({n} x {len(CLASSES)} one-vs-rest "
        "predictions, and the most likely class of each lesion) against how often the class was there.", "",
        "- " + calibration_reading(pooled, "Every class, one vs rest"),
        "- " + calibration_reading(top, "The most likely class"), "",
        markdown_table(pooled), "",
    ]


def caveats(source, y: np.ndarray, decided: np.ndarray, without: np.ndarray | None, train: pd.DataFrame) -> list[str]:
    from ..decision import RULES

    counts = y.sum(0).astype(int)
    few = [f"{c} ({n})" for c, n in zip(CLASSES, counts) if n < FEW]
    mel = CLASSES.index("MEL")
    sens = class_rates(confusion(y, decided))["sensitivity"][mel]
    sens_without = class_rates(confusion(y, without))["sensitivity"][mel] if without is not None else None
    tones = factors(train)["skin tone"]
    small = [f"tone {g} ({int((tones == g).sum())} lesions)" for g in group_order(tones, "skin tone")
             if (tones == g).sum() < MIN_GROUP]
    dark = np.isin(tones, ["0", "1", "2"]).mean()
    return [
        "## Caveats and ethical considerations", "",
        f"- **A missed melanoma can cost a life**: a false negative may delay the excision of a cancer that spreads. "
        f"Honest melanoma sensitivity here is {sens:.2f} ({int(counts[mel])} melanomas)"
        + (f", and {sens_without:.2f} without the MONET scores (one lesion)" if sens_without is not None else "")
        + ": most decisions are tuned for macro F1, not for not missing a cancer. A false positive costs an "
        "unneeded biopsy and worry.",
        f"- **Skin tones are unevenly represented**: tones 0-2 (the darker) are {dark:.1%} of the training lesions"
        + (f"; {', '.join(small)} cannot be scored (fewer than {MIN_GROUP})" if small else "")
        + ". How well it serves darker skin is poorly known, and the out-of-fold figures per group above need not "
        "hold on other lesions.",
        f"- Classes with few training lesions: {', '.join(few) if few else 'none under ' + str(FEW)}. Their "
        "thresholds and F1 rest on a handful of lesions and move a lot between fold splits and batches.",
        f"- Published MILK10k solutions report validation scores {SHIFT} above their leaderboard scores (the benchmark's "
        "lesions and diagnoses differ from the training release's); expect less than the out-of-fold figures.",
        "- Each class's probability is read on its own (the leaderboard cuts each at 0.5): the 11 need not sum to 1, "
        "and more than one class or none may be decided positive.",
        *([] if RULES[source.rule].labelled else [
            f"- Rule {source.rule} decides relative to the batch it is given: a small or unusual batch gives unstable "
            "thresholds; a single lesion uses the stored ones."]),
        "- Trained on one release's lesions, cameras and dermatoscopes; other populations and devices are "
        "untested.", "",
    ]
