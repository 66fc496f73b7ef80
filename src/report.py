"""The blend report: per-class table, confusion matrix, threshold curves and subgroup scores.

Everything is computed from the honest out-of-fold decisions (the decision rule applied without the
held-out fold's labels), except the threshold curves, which show F1 against the cut on the blended
out-of-fold probabilities with the chosen threshold marked.  Files go to <output_dir>/blends/<name>/.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .data import CLASSES  # noqa: E402
from .io_utils import atomic_write, atomic_write_csv, atomic_write_json, atomic_write_text  # noqa: E402
from .scoring import decisions, macro_f1  # noqa: E402

GROUPS = ("skin_tone_class", "sex")


def per_class_table(y: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """Precision, recall, F1 (leaderboard convention: 1.0 when a class has no TP, FP or FN) and support."""
    truth, pred = np.asarray(y) > 0.5, decisions(probs)
    tp, fp, fn = (truth & pred).sum(0), (~truth & pred).sum(0), (truth & ~pred).sum(0)
    empty = tp + fp + fn == 0

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.where(empty, 1.0, num / np.maximum(den, 1))

    table = pd.DataFrame({"class": CLASSES, "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
                          "f1": ratio(2 * tp, 2 * tp + fp + fn), "support": truth.sum(0),
                          "predicted": pred.sum(0), "tp": tp, "fp": fp, "fn": fn})
    macro = {"class": "macro", **{k: table[k].mean() for k in ("precision", "recall", "f1")},
             **{k: table[k].sum() for k in ("support", "predicted", "tp", "fp", "fn")}}
    return pd.concat([table, pd.DataFrame([macro])], ignore_index=True)


def group_label(value) -> str:
    """A metadata value as a group's name: "missing" for an empty one, whole floats without their ".0"."""
    if pd.isna(value) or str(value).strip() == "":
        return "missing"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def group_scores(train: pd.DataFrame, y: np.ndarray, probs: np.ndarray) -> dict[str, dict[str, dict]]:
    """Macro F1 and lesion count per skin tone and per sex (missing values form their own group)."""
    out: dict[str, dict[str, dict]] = {}
    for column in GROUPS:
        labels = np.array([group_label(v) for v in train[column]])
        out[column] = {g: {"n": int((labels == g).sum()), "macro_f1": macro_f1(y[labels == g], probs[labels == g])}
                       for g in sorted(set(labels))}
    return out


def f1_curve(y: np.ndarray, p: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """F1 of the decision p > t for every t of ``grid`` (one class)."""
    truth = np.asarray(y) > 0.5
    pred = p[:, None] > grid[None, :]
    tp = (pred & truth[:, None]).sum(0)
    den = pred.sum(0) + truth.sum()
    return np.where(den == 0, 1.0, 2 * tp / np.maximum(den, 1))


def save_png(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def confusion_png(path: Path, y: np.ndarray, probs: np.ndarray, title: str) -> Path:
    """Truth class (rows) against the top class of ``probs`` (columns), each row normalised to 1."""
    k = len(CLASSES)
    counts = np.zeros((k, k))
    np.add.at(counts, (np.asarray(y).argmax(1), np.asarray(probs).argmax(1)), 1)
    rows = counts.sum(1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, f"{norm[i, j]:.2f}\n({int(counts[i, j])})", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"{c} ({int(n)})" for c, n in zip(CLASSES, rows[:, 0])])
    ax.set_xlabel("predicted (argmax of the folded honest probabilities)")
    ax.set_ylabel("truth (lesions)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the truth row")
    return save_png(fig, path)


def threshold_curves_png(path: Path, y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, title: str) -> Path:
    """Per class, F1 against the threshold on the blended OOF probabilities; the chosen threshold marked."""
    grid = np.linspace(0.0, 1.0, 201)
    fig, axes = plt.subplots(3, 4, figsize=(14, 9), sharex=True, sharey=True)
    for j, (c, ax) in enumerate(zip(CLASSES, axes.flat)):
        t = float(thresholds[j])
        cuts = np.union1d(grid, [min(max(t, 0.0), 1.0)])
        curve = f1_curve(y[:, j], probs[:, j], cuts)
        chosen = float(f1_curve(y[:, j], probs[:, j], np.array([t]))[0])
        ax.plot(cuts, curve, lw=1.5)
        ax.axvline(0.5, color="grey", ls=":", lw=1)
        ax.axvline(min(max(t, 0.0), 1.0), color="crimson", ls="--", lw=1.2)
        ax.set_title(f"{c} (n+={int(y[:, j].sum())}): t={t:.3f}, F1={chosen:.3f}", fontsize=9)
        ax.set_ylim(0, 1.02)
    axes.flat[-1].axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("threshold")
    for ax in axes[:, 0]:
        ax.set_ylabel("F1 (OOF)")
    fig.suptitle(f"{title}: dashed red = chosen threshold, dotted grey = 0.5")
    fig.tight_layout()
    return save_png(fig, path)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table; floats with 4 decimals, NaN as '-'."""
    def cell(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "-" if np.isnan(v) else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_report(out_dir: Path, *, name: str, train: pd.DataFrame, blend_oof: np.ndarray, honest: np.ndarray,
                 thresholds: np.ndarray, preamble: str = "") -> dict[str, Path]:
    """Write the report files of one blend (``preamble``: Markdown placed under the title); returns their paths."""
    out_dir = Path(out_dir)
    y = train[CLASSES].to_numpy(np.float64)
    table = per_class_table(y, honest)
    groups = group_scores(train, y, honest)
    paths = {
        "per_class_csv": atomic_write_csv(out_dir / "per_class.csv", table, float_format="%.6f"),
        "groups_json": atomic_write_json(out_dir / "groups.json", groups),
        "confusion_png": confusion_png(out_dir / "confusion.png", y, honest, f"{name}: honest OOF, row-normalised"),
        "thresholds_png": threshold_curves_png(out_dir / "thresholds.png", y, blend_oof, thresholds, name),
    }
    md = [f"# Blend {name}", "", preamble, "",
          "## Thresholds", "", markdown_table(pd.DataFrame([dict(zip(CLASSES, map(float, thresholds)))])), "",
          "## Per class (honest decisions)", "", markdown_table(table), ""]
    for column, by_group in groups.items():
        rows = pd.DataFrame([{column: g, "n": v["n"], "macro_f1": v["macro_f1"]} for g, v in by_group.items()])
        md += [f"## Macro F1 by {column} (honest decisions)", "", markdown_table(rows), ""]
    md += ["![confusion](confusion.png)", "", "![threshold curves](thresholds.png)", ""]
    paths["report_md"] = atomic_write_text(out_dir / "report.md", "\n".join(md))
    return paths
