"""From complete experiments to a validated submission: blend -> decide -> write -> report.

    bash run.sh blend EXP [EXP ...] [--name NAME] [key=value ...]      (python -m src.submission)

The blend (src/blend.py) is the candidate (an input alone, log-loss, equal or greedy weights) with the best honest
out-of-fold macro F1; the decision rule of the first experiment is folded into the blended test probabilities
(src/decision.py); the submission is validated with the scorer's own reader before anything is moved into place.
Writes <submission_dir>/<name>.csv (upload this), <name>.json (weights, rule, thresholds, CV scores, every
candidate's honest score) and <name>_oof_honest.csv (training lesions, decided without their own labels; score it
with ``bash run.sh score``), plus a report in <output_dir>/blends/<name>/ and a W&B run with all of them as artifacts.
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

from .blend import (BLEND, Blend, BlendError, blend_experiments, candidate_frame, candidate_legend,
                    format_scores, resolve_configs, score_frame, score_legend, score_meanings, text_table)
from .config import Config, ConfigError, experiment_recipe, load_named
from .data import CLASSES, DataError, load_test, load_train
from .decision import RULES, choose_rule, fold_probabilities, submitted_thresholds
from .experiment import probs_frame
from .io_utils import atomic_write_many
from .preflight import check_outputs
from .report import markdown_table, write_report
from .scoring import SubmissionError, f1_per_class, read_prediction_csv
from .tracking import Tracker, submission_group

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
    cv = {r: blend.scores[BLEND][RULES[r].score_key] for r in RULES}
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
        "blend_candidate": blend.chosen, "blend_choice_reason": blend.reason,
        "blend_candidates": {c.name: {"weights": dict(zip(blend.weights, map(float, c.weights))), "decision": c.rule,
                                      "cv_macro_f1_honest": c.honest, "honest_by_rule": c.honest_by_rule,
                                      "in_sample_honest": c.evaluation.in_sample_honest}
                             for c in blend.candidates},
        "decision_setting": first.decision, "decision_reason": decision.reason,
        "blend_in_sample_honest": blend.evals[BLEND].in_sample_honest,
        "thresholds": dict(zip(CLASSES, map(float, decision.thresholds))), "thresholds_from": RULES[rule].thresholds_from,
        "cv_macro_f1_honest": decision.honest_cv, "cv_scores": blend.scores,
        "score_meanings": {k: v[1] for k, v in score_meanings().items()},
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
    """The blend report (candidates, per-class table, confusion matrix, threshold curves, subgroups) and its W&B run."""
    rule = decision.rule
    preamble = [
        f"Experiments {', '.join(blend.weights)}; decision rule **{rule}** (thresholds from {RULES[rule].thresholds_from}); "
        f"honest CV macro F1 of the blend **{decision.honest_cv:.4f}**. Submission: `{paths['submission']}`.",
        decision.reason + ".",
        "## Out-of-fold scores", markdown_table(score_frame(blend.scores, blend.weights, rule)), score_legend(rule)]
    if len(blend.candidates) > 1:
        preamble += ["## Blend candidates", markdown_table(candidate_frame(blend.candidates, list(blend.weights),
                                                                           blend.chosen)),
                     candidate_legend(), f"Submitted: {blend.reason}."]
    files = write_report(Path(cfg.output_dir) / "blends" / name, name=name, train=train, blend_oof=blend.oof,
                         honest=decision.honest_oof, thresholds=decision.thresholds, preamble="\n\n".join(preamble))
    track(cfg, name, blend, decision, train, {**paths, **files})
    return files


def check_replaceable(cfg: Config, name: str) -> None:
    """Refuse a submission name whose files in submission_dir would overwrite files this project did not write
    (src/owned.py): the two CSVs must carry the submission header, the sidecar its fields."""
    from .owned import replaceable_csv, replaceable_json

    out, fix = Path(cfg.submission_dir), "move it away or choose another --name"
    replaceable_csv(out / f"{name}.csv", HEADER, fix)
    replaceable_csv(out / f"{name}_oof_honest.csv", HEADER, fix)
    replaceable_json(out / f"{name}.json", ("experiments", "weights", "decision", "thresholds"), fix)


def track(cfg: Config, name: str, blend: Blend, decision: Decision, train: pd.DataFrame, paths: dict) -> None:
    """The submission's W&B run (job type 'blend'; an experiment alone in its own group, a blend of several in
    ``blend/<name>``): its out-of-fold scores under ``oof/``, each input's under ``input/<name>/``, each candidate's
    honest score, the weights and thresholds, the report's images, and as artifacts each input's predictions, the
    submission with its sidecar and honest OOF decisions, and the report."""
    names = [c.name for c in blend.cfgs]
    alone = len(names) == 1
    kind = getattr(experiment_recipe(blend.cfgs[0].experiment), "kind", "") if alone else "blend"
    tracker = Tracker(cfg, f"blend/{name}" if alone else "", job_type="blend", kind=kind,
                      group=submission_group(name, names), where=None if alone else Path(paths["report_md"]).parent)
    per_class = f1_per_class(train[CLASSES].to_numpy(np.float64), decision.honest_oof)
    flat = {"oof/macro_f1_honest": decision.honest_cv, **{f"oof/{k}": v for k, v in blend.scores[BLEND].items()},
            **{f"oof/f1/{c}": float(v) for c, v in zip(CLASSES, per_class)},
            **{f"weight/{k}": v for k, v in blend.weights.items()},
            **{f"threshold/{c}": float(t) for c, t in zip(CLASSES, decision.thresholds)}}
    if not alone:
        flat.update({f"input/{m}/{k}": v for m in names for k, v in blend.scores[m].items()})
        flat.update({f"candidate/{c.name}/macro_f1_honest": c.honest for c in blend.candidates})
    tracker.log(flat)
    tracker.log_images({"confusion": str(paths["confusion_png"]), "threshold_curves": str(paths["thresholds_png"])})
    tracker.summary({**flat, "oof/decision": decision.rule, "blend/candidate": blend.chosen})
    for c in blend.cfgs:
        tracker.log_artifact(c.name, "predictions",
                             [c.exp_dir() / f for f in ("oof.csv", "test.csv", "oof_metrics.json")],
                             {"experiment": c.experiment})
    tracker.log_artifact(name, "submission",
                         [paths["submission"], paths["sidecar"], paths["oof_honest"]],
                         {"decision": decision.rule, "cv_macro_f1_honest": decision.honest_cv,
                          "candidate": blend.chosen, "weights": blend.weights})
    tracker.log_artifact(name, "blend-report", [paths[k] for k in ("report_md", "per_class_csv", "groups_json",
                                                                   "confusion_png", "thresholds_png")], what="report")
    tracker.finish()


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
    check_replaceable(cfg, name)
    blend = blend_experiments(cfgs, train, test)
    decision = choose_decision(blend, cfgs[0].decision, train[CLASSES].to_numpy(np.float64))
    rule = decision.rule
    print(f"[blend] out-of-fold scores on {len(train)} training lesions, {len(np.unique(blend.folds))} folds:")
    print(format_scores(blend.scores, blend.weights, rule), flush=True)
    in_sample = blend.evals[BLEND].in_sample_honest
    if in_sample:
        print(f"[blend] the blend row is honest: each fold is blended with weights fitted on the other folds; with "
              f"weights fitted on all rows its {score_meanings()[RULES[rule].score_key][0]} would read "
              f"{in_sample[RULES[rule].score_key]:.4f} (optimism {in_sample[RULES[rule].score_key] - decision.honest_cv:+.4f})")
    print(f"[blend] {decision.reason}", flush=True)
    monet = monet_record(blend, decision, train)
    paths = write_submission(cfg, name, blend, decision, train, test, monet)
    paths.update(report(cfg, name, blend, decision, train, paths))
    for key, path in paths.items():
        print(f"[blend] {key:<14} {path}")
    if len(blend.candidates) > 1:
        print("[blend] candidates, each scored honestly (weights and thresholds fitted without the fold they decide):")
        print(text_table(candidate_frame(blend.candidates, list(blend.weights), blend.chosen)))
        print(candidate_legend())
        print(f"[blend] submitted {blend.chosen}: {blend.reason}")
    print(f"[blend] weights: {', '.join(f'{k}={v:.4f}' for k, v in blend.weights.items())}; rule '{rule}'; "
          f"honest CV macro F1 {decision.honest_cv:.4f}", flush=True)
    return {"name": name, "experiments": [c.name for c in cfgs], "weights": blend.weights, "decision": rule,
            "candidate": blend.chosen, "candidates": {c.name: c.honest for c in blend.candidates},
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
