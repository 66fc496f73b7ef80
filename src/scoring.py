"""Leaderboard-exact scoring of MILK10k submissions (isic-challenge-scoring, metric 'dice').

Per class a lesion is predicted positive iff its probability is > 0.5 (strictly); the class score is
F1 = 2TP / (2TP + FP + FN), 1.0 when TP + FP + FN == 0; the leaderboard value is the plain mean over
the 11 classes.  The readers refuse every file the leaderboard refuses, naming file, line and column.
A UTF-8 byte-order mark and CRLF line ends are accepted (the official scorer reads with pandas, which
accepts both); a missing value (empty, NaN, NA, ...) is always refused (see src/data.py for the one rule).

    python -m src.scoring TRUTH.csv PRED.csv [--json]
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from .data import CLASSES, MISSING_MARKERS

ID_COLUMN = "lesion_id"
_ID_ALIASES = ("lesion_id", "image")
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")
_MISSING = MISSING_MARKERS


class SubmissionError(ValueError):
    """A CSV the leaderboard would refuse, or truth and predictions that do not match."""


def _show(items: list, limit: int = 5) -> str:
    more = f" ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(map(str, items[:limit])) + more


def _read_table(path: str | Path, what: str) -> tuple[pd.DataFrame, dict[str, int], list[str]]:
    """Parse ``lesion_id`` + CLASSES into floats: the frame, each id's CSV line, the integer-only columns."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # a byte-order mark is accepted, as pandas does
            rows = list(_numbered(csv.reader(fh)))
    except UnicodeDecodeError as e:
        raise SubmissionError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise SubmissionError(f"{path}: unreadable CSV ({e})") from None
    if not rows:
        raise SubmissionError(f"{path}: empty file, expected header {ID_COLUMN},{','.join(CLASSES)}")
    (header_line, header), body = rows[0], rows[1:]
    ids = [c for c in header if c in _ID_ALIASES]
    if len(ids) != 1:
        found = "none" if not ids else " and ".join(ids)
        raise SubmissionError(f"{path}: line {header_line}: need exactly one id column '{ID_COLUMN}' "
                              f"(or 'image'); found {found} in header {header}")
    id_col = header.index(ids[0])
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise SubmissionError(f"{path}: line {header_line}: duplicate column(s) {dup}")
    names = [c for i, c in enumerate(header) if i != id_col]
    missing, extra = [c for c in CLASSES if c not in names], [c for c in names if c not in CLASSES]
    if missing or extra:
        raise SubmissionError(f"{path}: line {header_line}: class columns must be exactly {CLASSES}; "
                              f"missing {missing}, unexpected {extra}")
    if not body:
        raise SubmissionError(f"{path}: no data rows")

    lines: dict[str, int] = {}
    values = np.empty((len(body), len(CLASSES)), dtype=np.float64)
    integer_only = dict.fromkeys(CLASSES, True)
    col_of = {c: header.index(c) for c in CLASSES}
    for r, (line, row) in enumerate(body):
        if len(row) > len(header) and any(cell.strip() for cell in row[len(header):]):
            raise SubmissionError(f"{path}: line {line}: {len(row)} fields, header has {len(header)}")
        row = row + [""] * (len(header) - len(row))
        lid = row[id_col]
        if not lid.strip():
            raise SubmissionError(f"{path}: line {line}, column {header[id_col]}: empty id")
        if lid in lines:
            raise SubmissionError(f"{path}: line {line}, column {header[id_col]}: duplicate id {lid!r} "
                                  f"(first at line {lines[lid]})")
        lines[lid] = line
        for j, c in enumerate(CLASSES):
            cell = row[col_of[c]]
            where = f"{path}: line {line}, column {c}"
            if not _NUMBER.fullmatch(cell):
                raise SubmissionError(f"{where}: missing value {cell.strip()!r}" if cell.strip().lower() in _MISSING
                                      else f"{where}: not a number: {cell!r}")
            v = float(cell)
            if not 0.0 <= v <= 1.0:
                raise SubmissionError(f"{where}: {what} {cell.strip()!r} outside [0, 1]")
            values[r, j] = v
            integer_only[c] &= bool(_INTEGER.fullmatch(cell))
    frame = pd.DataFrame(values, index=pd.Index(list(lines), name=ID_COLUMN), columns=list(CLASSES))
    return frame, lines, [c for c, flag in integer_only.items() if flag]


def _numbered(reader) -> Iterable[tuple[int, list[str]]]:
    """Non-blank rows with the line each starts on (header = line 1); blank lines are skipped as pandas does."""
    start = 1
    for row in reader:
        if row:
            yield start, row
        start = reader.line_num + 1


def read_prediction_csv(path: str | Path, expected_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Read a submission; refuse what the leaderboard refuses.  Index lesion_id, columns CLASSES, float64.

    A column written only as integers ('0', '1') is refused: the leaderboard reads it as an integer
    column and rejects it as non-floating-point; write 0.0 instead.
    """
    frame, lines, ints = _read_table(path, "probability")
    if ints:
        raise SubmissionError(f"{path}: line {min(lines.values())}, column {ints[0]}: every value of column(s) {ints} is written as "
                              "an integer; the leaderboard refuses non-floating-point columns (write e.g. 0.0)")
    if expected_ids is not None:
        expected = list(expected_ids)
        want = set(expected)
        extra = [i for i in frame.index if i not in want]
        if extra:
            raise SubmissionError(f"{path}: line {lines[extra[0]]}, column {ID_COLUMN}: id(s) not expected: "
                                  f"{_show(extra)}")
        missing = [i for i in expected if i not in lines]
        if missing:
            raise SubmissionError(f"{path}: column {ID_COLUMN}: {len(missing)} expected id(s) missing: "
                                  f"{_show(missing)}")
    return frame


def read_truth_csv(path: str | Path) -> pd.DataFrame:
    """Read a ground-truth CSV (same layout; values 0 or 1, any number of positives per row)."""
    frame, lines, _ = _read_table(path, "label")
    bad = np.argwhere((frame.to_numpy() != 0.0) & (frame.to_numpy() != 1.0))
    if len(bad):
        r, c = bad[0]
        raise SubmissionError(f"{path}: line {lines[frame.index[r]]}, column {CLASSES[c]}: label "
                              f"{float(frame.iat[r, c])!r} is not 0 or 1")
    return frame


def decisions(probs) -> np.ndarray:
    """The leaderboard's decision: positive iff probability > 0.5 (exactly 0.5 is negative)."""
    return np.asarray(probs, dtype=np.float64) > 0.5


def _confusion(y_true, probs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64) > 0.5
    d = decisions(probs)
    if y.shape != d.shape or y.ndim != 2:
        raise ValueError(f"labels {y.shape} and probabilities {d.shape} must be equal (rows, classes) arrays")
    tp = (y & d).sum(0)
    fp = (~y & d).sum(0)
    fn = (y & ~d).sum(0)
    return tp, fp, fn, len(y) - tp - fp - fn


def f1_per_class(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-class F1 of the > 0.5 decision, 1.0 where a class has no positives and none predicted."""
    tp, fp, fn, _ = _confusion(y_true, probs)
    den = 2 * tp + fp + fn
    return np.where(den == 0, 1.0, 2 * tp / np.maximum(den, 1))


def macro_f1(y_true, probs) -> float:
    """The leaderboard value: plain mean of the per-class F1."""
    return float(f1_per_class(y_true, probs).mean())


def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary log-loss over every row and class."""
    q = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def fold_metrics(y: np.ndarray, probs: np.ndarray) -> dict:
    """What a fold or an experiment records of its out-of-fold probabilities: leaderboard macro F1 at 0.5,
    per-class F1 and AUC, accuracy of the argmax, log-loss."""
    per_class = f1_per_class(y, probs)
    aucs = {}
    for i, c in enumerate(CLASSES):
        if 0 < y[:, i].sum() < len(y):
            aucs[c] = float(roc_auc_score(y[:, i], probs[:, i]))
    return {"macro_f1": float(per_class.mean()), "f1": dict(zip(CLASSES, map(float, per_class))),
            "auc": aucs, "auc_macro": float(np.mean(list(aucs.values()))) if aucs else None,
            "accuracy": float((probs.argmax(1) == y.argmax(1)).mean()), "loss": log_loss(y, probs),
            "n": int(len(y))}


def _check_frame(df: pd.DataFrame, what: str) -> None:
    if list(df.columns) != list(CLASSES):
        raise SubmissionError(f"{what}: columns must be {CLASSES}, got {list(df.columns)}")
    if not df.index.is_unique:
        raise SubmissionError(f"{what}: duplicate ids {_show(df.index[df.index.duplicated()].unique().tolist())}")


def score(truth: pd.DataFrame, pred: pd.DataFrame) -> dict:
    """Leaderboard macro F1 plus AUC, average precision and balanced accuracy, per class and macro."""
    _check_frame(truth, "truth")
    _check_frame(pred, "predictions")
    missing = truth.index.difference(pred.index).tolist()
    extra = pred.index.difference(truth.index).tolist()
    if missing or extra:
        raise SubmissionError(f"ids differ: {len(missing)} missing from predictions ({_show(missing)}), "
                              f"{len(extra)} not in truth ({_show(extra)})")
    y = truth.to_numpy(np.float64) > 0.5
    p = pred.loc[truth.index].to_numpy(np.float64)
    tp, fp, fn, tn = _confusion(y, p)
    f1 = f1_per_class(y, p)
    sens = np.where(tp + fn == 0, 1.0, tp / np.maximum(tp + fn, 1))
    spec = np.where(tn + fp == 0, 1.0, tn / np.maximum(tn + fp, 1))
    per_class = {}
    for j, c in enumerate(CLASSES):
        pos = int(y[:, j].sum())
        per_class[c] = {
            "f1": float(f1[j]),
            "auc": float(roc_auc_score(y[:, j], p[:, j])) if 0 < pos < len(y) else None,
            "average_precision": float(average_precision_score(y[:, j], p[:, j])) if pos else None,
            "balanced_accuracy": float((sens[j] + spec[j]) / 2),
            "tp": int(tp[j]), "fp": int(fp[j]), "fn": int(fn[j]), "tn": int(tn[j]),
            "support": pos, "predicted_positive": int(tp[j] + fp[j]),
        }

    def mean(key: str) -> float | None:
        vals = [m[key] for m in per_class.values() if m[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {"macro_f1": float(f1.mean()), "auc": mean("auc"), "average_precision": mean("average_precision"),
            "balanced_accuracy": mean("balanced_accuracy"), "per_class": per_class, "n": int(len(y))}


def format_table(result: dict) -> str:
    """Per-class table (F1 first, the leaderboard metric) and the macro line."""
    def num(v: float | None) -> str:
        return "     -" if v is None else f"{v:6.4f}"

    head = f"{'class':<8} {'f1':>6} {'auc':>6} {'ap':>6} {'bacc':>6} {'support':>7} {'pred+':>6} " \
           f"{'tp':>5} {'fp':>5} {'fn':>5}"
    lines = [head, "-" * len(head)]
    for c, m in result["per_class"].items():
        lines.append(f"{c:<8} {num(m['f1'])} {num(m['auc'])} {num(m['average_precision'])} "
                     f"{num(m['balanced_accuracy'])} {m['support']:>7} {m['predicted_positive']:>6} "
                     f"{m['tp']:>5} {m['fp']:>5} {m['fn']:>5}")
    lines.append("-" * len(head))
    lines.append(f"{'macro':<8} {num(result['macro_f1'])} {num(result['auc'])} "
                 f"{num(result['average_precision'])} {num(result['balanced_accuracy'])} {result['n']:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.scoring", description=__doc__.split("\n\n")[0])
    ap.add_argument("truth", help="ground-truth CSV (lesion_id + 11 one-hot class columns)")
    ap.add_argument("pred", help="submission CSV (lesion_id + 11 probability columns)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    try:
        truth = read_truth_csv(args.truth)
        result = score(truth, read_prediction_csv(args.pred, expected_ids=truth.index))
    except (SubmissionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
