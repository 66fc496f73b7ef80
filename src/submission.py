"""From complete experiments to a validated submission: blend -> decide -> write -> report.

    bash run.sh blend EXP [EXP ...] [--name NAME] [key=value ...]      (python -m src.submission)

The blend (src/blend.py) fits weights on the out-of-fold rows; the decision rule of the first experiment is folded
into the blended test probabilities (src/decision.py); the submission is validated with the scorer's own reader
before anything is moved into place. Writes <submission_dir>/<name>.csv (upload this), <name>.json (weights, rule,
thresholds, CV scores) and <name>_oof_honest.csv (training lesions, decided without their own labels; score it
with ``bash run.sh score``), plus a report in <output_dir>/blends/<name>/ and a W&B run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .blend import (BLEND, HONEST_KEY, SCORES, Blend, BlendError, blend_experiments, format_scores, resolve_configs,
                    score_frame, score_legend)
from .config import Config, ConfigError, load_named
from .data import CLASSES, DataError, load_test, load_train
from .decision import RULES, choose_rule, fold_probabilities, submitted_thresholds
from .experiment import probs_frame
from .io_utils import atomic_write_many
from .preflight import check_outputs
from .report import markdown_table, write_report
from .scoring import SubmissionError, read_prediction_csv
from .tracking import Tracker

HEADER = ["lesion_id", *CLASSES]


@dataclass(frozen=True)
class Decision:
    """The rule's thresholds, the submitted (folded) test probabilities, and the honest out-of-fold decisions."""

    rule: str
    reason: str
    thresholds: np.ndarray
    submission: pd.DataFrame
    honest_oof: np.ndarray
    honest_info: dict
    honest_cv: float


def choose_decision(blend: Blend, setting: str, y: np.ndarray) -> Decision:
    """The rule ``setting`` names ('auto': the one with the best honest CV of the blend) applied to the blended
    test probabilities (a labelled rule tuned on every blended out-of-fold row, ``y`` their labels); its honest
    out-of-fold decisions and score come along."""
    cv = {r: blend.scores[BLEND][HONEST_KEY[r]] for r in RULES}
    rule, reason = choose_rule(setting, cv)
    thresholds = submitted_thresholds(rule, y, blend.oof, blend.test)
    honest, info = blend.evals[BLEND].honest[rule]
    return Decision(rule, reason, thresholds,
                    probs_frame(blend.test_ids, fold_probabilities(blend.test, thresholds)), honest, info, cv[rule])


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


def checked_csv(df: pd.DataFrame, expected_ids: Sequence[str], final: Path) -> Callable[[str], None]:
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


def _json_writer(obj: dict) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")

    return write


def write_submission(cfg: Config, name: str, blend: Blend, decision: Decision, train: pd.DataFrame,
                     test: pd.DataFrame, more: dict | None = None) -> dict:
    """The submission, its sidecar (with ``more`` added) and the honest out-of-fold decisions, validated, all or
    nothing."""
    expected_test = test["lesion_id"].tolist()
    out = Path(cfg.submission_dir)
    paths = {"submission": out / f"{name}.csv", "sidecar": out / f"{name}.json",
             "oof_honest": out / f"{name}_oof_honest.csv"}
    first, rule = blend.cfgs[0], decision.rule
    sidecar = {
        "name": name, "experiments": [c.name for c in blend.cfgs], "weights": blend.weights, "decision": rule,
        "decision_setting": first.decision, "decision_reason": decision.reason,
        "blend_in_sample_honest": blend.evals[BLEND].in_sample_honest,
        "thresholds": dict(zip(CLASSES, map(float, decision.thresholds))), "thresholds_from": RULES[rule].thresholds_from,
        "cv_macro_f1_honest": decision.honest_cv, "cv_scores": blend.scores,
        "score_meanings": {k: v[1] for k, v in SCORES.items()},
        "honest_per_fold_thresholds": decision.honest_info["per_fold_thresholds"],
        "n_train": len(train), "n_test": len(blend.test_ids), "data_dir": str(cfg.data_dir),
        "folds_csv": str(first.resolved_folds_csv()), "files": {k: str(p) for k, p in paths.items()},
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(more or {}),
    }
    atomic_write_many({
        paths["submission"]: checked_csv(decision.submission, expected_test, paths["submission"]),
        paths["oof_honest"]: checked_csv(probs_frame(train["lesion_id"], decision.honest_oof),
                                          train["lesion_id"].tolist(), paths["oof_honest"]),
        paths["sidecar"]: _json_writer(sidecar),
    })
    return paths


def report(cfg: Config, name: str, blend: Blend, decision: Decision, train: pd.DataFrame, paths: dict) -> dict:
    """The blend report (per-class table, confusion matrix, threshold curves, subgroups) and its W&B run."""
    rule = decision.rule
    preamble = "\n\n".join([
        f"Experiments {', '.join(blend.weights)}; decision rule **{rule}** (thresholds from {RULES[rule].thresholds_from}); "
        f"honest CV macro F1 of the blend **{decision.honest_cv:.4f}**. Submission: `{paths['submission']}`.",
        decision.reason + ".",
        "## Out-of-fold scores", markdown_table(score_frame(blend.scores, blend.weights, rule)), score_legend(rule)])
    files = write_report(Path(cfg.output_dir) / "blends" / name, name=name, train=train, blend_oof=blend.oof,
                         honest=decision.honest_oof, thresholds=decision.thresholds, preamble=preamble)
    tracker = Tracker(cfg, job=f"blend/{name}", job_type="blend")
    flat = {f"cv/{member}/{k}": v for member, row in blend.scores.items() for k, v in row.items()}
    flat.update({f"weight/{k}": v for k, v in blend.weights.items()})
    flat.update({f"threshold/{c}": float(t) for c, t in zip(CLASSES, decision.thresholds)})
    tracker.log(flat)
    tracker.log_images({"confusion": str(files["confusion_png"]), "threshold_curves": str(files["thresholds_png"])})
    tracker.summary({"cv_macro_f1_honest": decision.honest_cv, "decision": rule, **flat})
    tracker.finish()
    return files


def finalize(cfg: Config, experiments: Sequence[str | Config], name: str | None = None,
             overrides: list[str] | None = None) -> dict:
    """Blend ``experiments`` (names or Configs), score them, write the submission, sidecar, honest OOF and report.

    ``cfg`` supplies the data, submission and output locations and the W&B settings; the decision rule
    and threshold search come from the first experiment.  Returns scores, weights, thresholds and paths.
    """
    cfgs = resolve_configs(experiments, overrides)
    name = safe_name(name or "+".join(c.name for c in cfgs))
    train = load_train(cfg.data_dir, check_images=False)
    test = load_test(cfg.data_dir, check_images=False)
    check_outputs(cfg)
    blend = blend_experiments(cfgs, train, test)
    decision = choose_decision(blend, cfgs[0].decision, train[CLASSES].to_numpy(np.float64))
    rule = decision.rule
    print(f"[blend] out-of-fold scores on {len(train)} training lesions, {len(np.unique(blend.folds))} folds:")
    print(format_scores(blend.scores, blend.weights, rule), flush=True)
    in_sample = blend.evals[BLEND].in_sample_honest
    if in_sample:
        print(f"[blend] the blend row is honest: each fold is blended with weights fitted on the other folds; with "
              f"weights fitted on all rows its {SCORES[HONEST_KEY[rule]][0]} would read "
              f"{in_sample[HONEST_KEY[rule]]:.4f} (optimism {in_sample[HONEST_KEY[rule]] - decision.honest_cv:+.4f})")
    print(f"[blend] {decision.reason}", flush=True)
    monet = monet_record(blend, decision, train)
    paths = write_submission(cfg, name, blend, decision, train, test, monet)
    paths.update(report(cfg, name, blend, decision, train, paths))
    print(f"[blend] weights: {', '.join(f'{k}={v:.4f}' for k, v in blend.weights.items())}; rule '{rule}'; "
          f"honest CV macro F1 {decision.honest_cv:.4f}")
    for key, path in paths.items():
        print(f"[blend] {key:<14} {path}")
    return {"name": name, "experiments": [c.name for c in cfgs], "weights": blend.weights, "decision": rule,
            "thresholds": dict(zip(CLASSES, map(float, decision.thresholds))), "scores": blend.scores,
            "cv_macro_f1_honest": decision.honest_cv, "paths": paths}


def monet_record(blend: Blend, decision: Decision, train: pd.DataFrame) -> dict:
    """What the sidecar records of the path without MONET (src/nomonet.py) and the code revision, printed in one
    line."""
    from .deliver.bundle import commit
    from .nomonet import record

    out = {**record(blend, decision.rule, decision.honest_oof, train), "commit": commit()}
    without = out["monet"].get("without")
    if without:
        (lo, hi), w = without["stored"]["interval"], out["monet"]["with"]
        print(f"[blend] without MONET scores (stored thresholds, as one lesion is decided): honest CV macro F1 "
              f"{without['stored']['honest']:.4f} (95% CI {lo:.4f}-{hi:.4f}) against {w['honest']:.4f} with them",
              flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bash run.sh blend", description=__doc__.split("\n\n")[0])
    ap.add_argument("args", nargs="+", metavar="EXP|key=value",
                    help="experiments to blend (names under exp/), then config overrides such as data_dir=...")
    ap.add_argument("--name", default=None, help="submission name (default: the experiment names joined by '+')")
    ns = ap.parse_intermixed_args(argv)
    experiments = [a for a in ns.args if "=" not in a]
    overrides = [a for a in ns.args if "=" in a]
    try:
        if not experiments:
            raise BlendError("name at least one experiment to blend")
        cfg = load_named(experiments[0], overrides)
        finalize(cfg, experiments, name=ns.name, overrides=overrides)
    except (BlendError, SubmissionError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
