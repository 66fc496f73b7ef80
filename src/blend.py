"""Blend complete experiments, apply the decision rule and write a validated submission.

Blend weights (non-negative, summing to 1) minimise the mean binary log-loss of the out-of-fold
probabilities over the 11 classes; the test probabilities are blended with the same weights.  Every
input and the blend are scored side by side on the out-of-fold rows; the decision rule of the first
experiment is folded into the blended test probabilities, and the submission is validated with the
scorer's own reader before anything is moved into place.

    python -m src.blend EXP [EXP ...] [--name NAME] [key=value ...]

Writes <submission_dir>/<name>.csv (upload this), <name>.json (weights, rule, thresholds, CV scores)
and <name>_oof_honest.csv (training lesions, decided without their own labels; score it with
``python -m src.scoring``), plus a report in <output_dir>/blends/<name>/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import softmax
from sklearn.metrics import roc_auc_score

from .config import Config, ConfigError, apply_overrides, load_config, parse_cli_overrides
from .data import CLASSES, DataError, load_test, load_train
from .decision import expected_f1_thresholds, fold_probabilities, honest_oof, tune_thresholds
from .folds import load_or_make_folds
from .io_utils import new_file_mode
from .outputs import log_loss, missing_outputs, probs_frame
from .report import markdown_table, write_report
from .scoring import SubmissionError, macro_f1, read_prediction_csv
from .tracking import Tracker

EPS = 1e-7
HEADER = ["lesion_id", *CLASSES]
# Out-of-fold scores reported for every input and the blend: key -> (short label, meaning).
SCORES = {
    "log_loss": ("logloss", "mean binary log-loss over the 11 classes"),
    "auc": ("auc", "mean per-class ROC AUC"),
    "f1_raw": ("f1@0.5", "macro F1 of the raw probabilities cut at 0.5"),
    "f1_argmax": ("argmax", "macro F1 with only the top class positive"),
    "f1_threshold_optimistic": ("thr_opt", "per-class thresholds tuned on all OOF rows, scored on the same rows"),
    "f1_threshold_honest": ("thr_hon", "per-class thresholds tuned on the other folds"),
    "f1_expected_f1_honest": ("ef1_hon", "expected-F1 thresholds of each held-out fold as its own batch"),
}
HONEST_KEY = {"threshold": "f1_threshold_honest", "expected_f1": "f1_expected_f1_honest", "none": "f1_raw"}
BLEND = "blend"  # the blend's row in the score tables


class BlendError(ValueError):
    """Experiments that cannot be blended: incomplete, or made on different lesions or folds."""


@dataclass(frozen=True)
class Member:
    cfg: Config
    oof: np.ndarray  # (training lesions, 11) in training order
    test: np.ndarray  # (test lesions, 11) in the order of the first experiment's test.csv


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------
def resolve_configs(experiments: Sequence[str | Config], overrides: list[str] | None = None) -> list[Config]:
    """Configs of the experiments: names are loaded with ``overrides``; Config objects get them applied."""
    if not experiments:
        raise BlendError("no experiments to blend")
    cli = parse_cli_overrides(overrides or [])
    cfgs = [load_config(e, overrides) if isinstance(e, str) else apply_overrides(e, cli, "command line")
            for e in experiments]
    names = [c.name for c in cfgs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BlendError(f"experiment(s) {dup} listed more than once")
    if BLEND in names:
        raise BlendError(f"an experiment named {BLEND!r} would clash with the blend's own row; rename it")
    return cfgs


def _require_complete(cfg: Config) -> None:
    """Every fold has its metrics.json (written last) and the folds are joined into oof.csv and test.csv."""
    exp, fix = cfg.exp_dir(), f"run `bash run.sh {cfg.name}` to finish it"
    if not exp.is_dir():
        raise BlendError(f"experiment {cfg.name} is not complete: no outputs at {exp}; {fix}")
    lacking = missing_outputs(cfg)
    folds = [int(f[4:f.index("/")]) for f in lacking if f.startswith("fold")]
    if folds:
        raise BlendError(f"experiment {cfg.name} is not complete: fold(s) {folds} of {cfg.n_folds} have no "
                         f"metrics.json under {exp}; {fix}")
    if lacking:
        raise BlendError(f"experiment {cfg.name} is not complete: every fold is done but {exp} has no "
                         f"{' or '.join(lacking)}; {fix} (it joins the folds)")


def _read_probs(cfg: Config, file: str, expected_ids: Sequence[str] | None) -> pd.DataFrame:
    try:
        frame = read_prediction_csv(cfg.exp_dir() / file, expected_ids=expected_ids)
    except SubmissionError as e:
        raise BlendError(f"experiment {cfg.name}: {e}; rerun `bash run.sh {cfg.name}`") from None
    return frame if expected_ids is None else frame.loc[list(expected_ids)]


def shared_folds(cfgs: list[Config], train: pd.DataFrame) -> np.ndarray:
    """The fold of each training lesion, from the one fold file every experiment was trained with."""
    first = cfgs[0]
    if any((c.resolved_folds_csv().resolve(), c.n_folds) != (first.resolved_folds_csv().resolve(), first.n_folds)
           for c in cfgs):
        listing = "; ".join(f"{c.name}: {c.resolved_folds_csv()} (n_folds={c.n_folds})" for c in cfgs)
        raise BlendError(f"the experiments were not made with the same folds ({listing}); "
                         "out-of-fold predictions blend only on one shared fold file")
    path = first.resolved_folds_csv()
    if not path.is_file():
        raise BlendError(f"{path}: fold file not found; the out-of-fold predictions of {[c.name for c in cfgs]} "
                         "can only be scored with the folds they were made with (check output_dir / folds_csv)")
    return load_or_make_folds(train, path, first.n_folds, first.fold_seed)["fold"].to_numpy()


def load_members(cfgs: list[Config], train: pd.DataFrame) -> tuple[list[Member], list[str]]:
    """Each experiment's OOF (training order) and test probabilities; all must cover the same lesions."""
    train_ids = train["lesion_id"].tolist()
    members: list[Member] = []
    test_ids: list[str] | None = None
    for cfg in cfgs:
        _require_complete(cfg)
        oof = _read_probs(cfg, "oof.csv", train_ids)
        test = _read_probs(cfg, "test.csv", test_ids)
        test_ids = test_ids or test.index.tolist()
        members.append(Member(cfg, oof.to_numpy(np.float64), test.to_numpy(np.float64)))
    assert test_ids is not None
    return members, test_ids


# ----------------------------------------------------------------------------------------------------
# weights and scores
# ----------------------------------------------------------------------------------------------------
def fit_weights(y: np.ndarray, probs: list[np.ndarray]) -> np.ndarray:
    """Non-negative weights summing to 1 minimising ``log_loss(y, sum_k w_k probs_k)``.

    L-BFGS over softmax logits from equal weights (deterministic); each single input is also a
    candidate, so the blend is never worse than the best input on this loss.
    """
    stack = np.stack(probs)
    if len(stack) == 1:
        return np.ones(1)
    y = np.asarray(y, np.float64)

    def loss_and_grad(z: np.ndarray) -> tuple[float, np.ndarray]:
        w = softmax(z)
        q = np.clip(np.tensordot(w, stack, axes=1), EPS, 1 - EPS)
        dq = (q - y) / (q * (1 - q)) / q.size
        dw = np.tensordot(stack, dq, axes=([1, 2], [0, 1]))
        return log_loss(y, q), w * (dw - w @ dw)

    fitted = softmax(minimize(loss_and_grad, np.zeros(len(stack)), jac=True, method="L-BFGS-B").x)
    candidates = [fitted, *np.eye(len(stack))]
    return min(candidates, key=lambda w: log_loss(y, np.tensordot(w, stack, axes=1)))


def rule_kwargs(cfg: Config) -> dict:
    return {"method": cfg.threshold_method, "n_trials": cfg.threshold_trials, "seed": cfg.seed}


@dataclass(frozen=True)
class Evaluation:
    scores: dict[str, float]
    thresholds: np.ndarray  # 'threshold' rule tuned on all OOF rows
    honest: dict[str, tuple[np.ndarray, dict]]  # rule -> (folded OOF probabilities, per-fold info)


def evaluate(y: np.ndarray, p: np.ndarray, folds: np.ndarray, kw: dict) -> Evaluation:
    """Every score of :data:`SCORES` for the OOF probabilities ``p``."""
    thresholds = tune_thresholds(y, p, **kw)
    honest = {"threshold": honest_oof("threshold", y, p, folds, **kw),
              "expected_f1": honest_oof("expected_f1", y, p, folds),
              "none": honest_oof("none", y, p, folds)}
    aucs = [roc_auc_score(y[:, j], p[:, j]) for j in range(p.shape[1]) if 0 < y[:, j].sum() < len(y)]
    scores = {
        "log_loss": log_loss(y, p),
        "auc": float(np.mean(aucs)) if aucs else float("nan"),
        "f1_raw": macro_f1(y, p),
        "f1_argmax": macro_f1(y, np.eye(p.shape[1])[p.argmax(1)]),
        "f1_threshold_optimistic": macro_f1(y, fold_probabilities(p, thresholds)),
        "f1_threshold_honest": macro_f1(y, honest["threshold"][0]),
        "f1_expected_f1_honest": macro_f1(y, honest["expected_f1"][0]),
    }
    return Evaluation(scores, thresholds, honest)


def score_frame(scores: dict[str, dict[str, float]], weights: dict[str, float], rule: str) -> pd.DataFrame:
    """One row per input and the blend, one column per score; '*' marks the chosen rule's honest score."""
    labels = {k: SCORES[k][0] + ("*" if k == HONEST_KEY[rule] else "") for k in SCORES}
    return pd.DataFrame([{"input": name, "weight": weights.get(name, float("nan")),
                          **{labels[k]: row[k] for k in SCORES}} for name, row in scores.items()])


def score_legend(rule: str) -> str:
    return (f"* = the honest CV of decision rule '{rule}'. " +
            "; ".join(f"{label}: {meaning}" for label, meaning in SCORES.values()) + ".")


def format_scores(scores: dict[str, dict[str, float]], weights: dict[str, float], rule: str) -> str:
    """Side-by-side text table of :func:`score_frame` and its legend."""
    table = score_frame(scores, weights, rule).to_string(index=False, float_format=lambda v: f"{v:.4f}",
                                                         na_rep="")
    return f"{table}\n{score_legend(rule)}"


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------
def safe_name(name: str) -> str:
    """A file-name stem: characters outside [A-Za-z0-9._+-] become '_'; very long names are hashed."""
    stem = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    if not stem.strip("_"):
        raise BlendError(f"submission name {name!r} has no usable characters")
    if len(stem) > 120:
        stem = f"{stem[:80]}_{hashlib.sha1(stem.encode()).hexdigest()[:10]}"
    return stem


def _checked_csv(df: pd.DataFrame, expected_ids: Sequence[str], final: Path) -> Callable[[str], None]:
    """Writer of ``df`` that re-reads the written bytes with the scorer's reader and refuses any difference.

    Every float is written with ``repr`` (shortest exact form, always with '.' or an exponent), so the
    values round-trip and no column reads as integers.
    """
    def write(tmp: str) -> None:
        df.to_csv(tmp, index=False, float_format=lambda v: repr(float(v)))
        try:
            with open(tmp, encoding="utf-8") as fh:
                header = fh.readline().rstrip("\r\n").split(",")
            if header != HEADER:
                raise SubmissionError(f"{tmp}: line 1: columns must be {HEADER} in this order, got {header}")
            back = read_prediction_csv(tmp, expected_ids=expected_ids)
            if not np.array_equal(back.to_numpy(), df[CLASSES].to_numpy(np.float64)):
                raise SubmissionError(f"{tmp}: the values read back differ from the values written")
        except SubmissionError as e:
            raise SubmissionError(f"{final} not written: {str(e).replace(tmp, str(final))}") from None

    return write


def write_all(files: dict[Path, Callable[[str], None]]) -> None:
    """Write every file to a temporary sibling, then rename them all; any failure leaves the old files."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
            os.chmod(tmp, new_file_mode())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _json_writer(obj: dict) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")

    return write


# ----------------------------------------------------------------------------------------------------
# the whole step
# ----------------------------------------------------------------------------------------------------
def finalize(cfg: Config, experiments: Sequence[str | Config], name: str | None = None,
             overrides: list[str] | None = None) -> dict:
    """Blend ``experiments`` (names or Configs), score them, write the submission, sidecar, honest OOF and report.

    ``cfg`` supplies the data, submission and output locations and the W&B settings; the decision rule
    and threshold search come from the first experiment.  Returns scores, weights, thresholds and paths.
    """
    cfgs = resolve_configs(experiments, overrides)
    first = cfgs[0]
    rule, kw = first.decision, rule_kwargs(first)
    name = safe_name(name or "+".join(c.name for c in cfgs))

    train = load_train(cfg.data_dir, check_images=False)
    y = train[CLASSES].to_numpy(np.float64)
    members, test_ids = load_members(cfgs, train)
    folds = shared_folds(cfgs, train)

    weights = fit_weights(y, [m.oof for m in members])
    blend_oof = np.tensordot(weights, np.stack([m.oof for m in members]), axes=1)
    blend_test = np.tensordot(weights, np.stack([m.test for m in members]), axes=1)
    weight_of = {c.name: float(w) for c, w in zip(cfgs, weights)}

    evals = {m.cfg.name: evaluate(y, m.oof, folds, kw) for m in members}
    evals[BLEND] = blended = evaluate(y, blend_oof, folds, kw)
    scores = {k: e.scores for k, e in evals.items()}
    print(f"[blend] out-of-fold scores on {len(y)} training lesions, {len(np.unique(folds))} folds:")
    print(format_scores(scores, weight_of, rule), flush=True)

    if rule == "threshold":
        thresholds = blended.thresholds
    elif rule == "expected_f1":
        thresholds = expected_f1_thresholds(blend_test)
    else:
        thresholds = np.full(len(CLASSES), 0.5)
    submission = probs_frame(test_ids, fold_probabilities(blend_test, thresholds))
    honest, honest_info = blended.honest[rule]
    honest_cv = scores[BLEND][HONEST_KEY[rule]]

    expected_test = load_test(cfg.data_dir, check_images=False)["lesion_id"].tolist()
    out = Path(cfg.submission_dir)
    paths = {"submission": out / f"{name}.csv", "sidecar": out / f"{name}.json",
             "oof_honest": out / f"{name}_oof_honest.csv"}
    sidecar = {
        "name": name, "experiments": [c.name for c in cfgs], "weights": weight_of, "decision": rule,
        "threshold_method": kw["method"] if rule == "threshold" else None,
        "thresholds": dict(zip(CLASSES, map(float, thresholds))),
        "thresholds_from": {"threshold": "all blended out-of-fold rows", "expected_f1": "the blended test batch",
                            "none": "the plain 0.5 cut"}[rule],
        "cv_macro_f1_honest": honest_cv, "cv_scores": scores, "score_meanings": {k: v[1] for k, v in SCORES.items()},
        "honest_per_fold_thresholds": honest_info["per_fold_thresholds"],
        "n_train": len(y), "n_test": len(test_ids), "data_dir": str(cfg.data_dir),
        "folds_csv": str(first.resolved_folds_csv()), "files": {k: str(p) for k, p in paths.items()},
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_all({
        paths["submission"]: _checked_csv(submission, expected_test, paths["submission"]),
        paths["oof_honest"]: _checked_csv(probs_frame(train["lesion_id"], honest), train["lesion_id"].tolist(),
                                          paths["oof_honest"]),
        paths["sidecar"]: _json_writer(sidecar),
    })

    preamble = "\n\n".join([
        f"Experiments {', '.join(weight_of)}; decision rule **{rule}** (thresholds from {sidecar['thresholds_from']}); "
        f"honest CV macro F1 of the blend **{honest_cv:.4f}**. Submission: `{paths['submission']}`.",
        "## Out-of-fold scores", markdown_table(score_frame(scores, weight_of, rule)), score_legend(rule)])
    report = write_report(Path(cfg.output_dir) / "blends" / name, name=name, train=train, blend_oof=blend_oof,
                          honest=honest, thresholds=thresholds, preamble=preamble)
    paths.update(report)

    tracker = Tracker(cfg, job=f"blend/{name}", job_type="blend")
    flat = {f"cv/{member}/{k}": v for member, row in scores.items() for k, v in row.items()}
    flat.update({f"weight/{k}": v for k, v in weight_of.items()})
    flat.update({f"threshold/{c}": float(t) for c, t in zip(CLASSES, thresholds)})
    tracker.log(flat)
    tracker.log_images({"confusion": str(report["confusion_png"]), "threshold_curves": str(report["thresholds_png"])})
    tracker.summary({"cv_macro_f1_honest": honest_cv, "decision": rule, **flat})
    tracker.finish()

    print(f"[blend] weights: {', '.join(f'{k}={v:.4f}' for k, v in weight_of.items())}; rule '{rule}'; "
          f"honest CV macro F1 {honest_cv:.4f}")
    for key, path in paths.items():
        print(f"[blend] {key:<14} {path}")
    return {"name": name, "experiments": [c.name for c in cfgs], "weights": weight_of, "decision": rule,
            "thresholds": dict(zip(CLASSES, map(float, thresholds))), "scores": scores,
            "cv_macro_f1_honest": honest_cv, "paths": paths}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.blend", description=__doc__.split("\n\n")[0])
    ap.add_argument("args", nargs="+", metavar="EXP|key=value",
                    help="experiments to blend (names under exp/), then config overrides such as data_dir=...")
    ap.add_argument("--name", default=None, help="submission name (default: the experiment names joined by '+')")
    ns = ap.parse_intermixed_args(argv)
    experiments = [a for a in ns.args if "=" not in a]
    overrides = [a for a in ns.args if "=" in a]
    try:
        if not experiments:
            raise BlendError("name at least one experiment to blend")
        cfg = load_config(experiments[0], overrides)
        finalize(cfg, experiments, name=ns.name, overrides=overrides)
    except (BlendError, SubmissionError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
