"""How much an experiment's honest estimate moves with the fold split: the experiment run under several fold seeds,
each in its own folder, and the honest out-of-fold macro F1 of every decision rule reported as mean +- std.

    bash run.sh spread EXP [--fold-seeds 42,7,2026] [key=value ...]

A difference between two experiments smaller than these spreads is noise. The honest macro F1 of the path without
MONET (stored thresholds, as one lesion is decided; the chosen rule on a batch) is reported alongside. The runs are
ordinary experiments named ``<EXP>_fs<seed>`` (resumable, fingerprinted like any other); no submission is written. The table also goes to
``<output_dir>/spread/<EXP>.json`` (a file there that is not a spread of this project is refused before anything
runs); nothing is ever removed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .blend import BLEND, blend_experiments
from .config import Config, load_config
from .data import CLASSES, load_test, load_train
from .decision import RULES, choose_rule
from .io_utils import atomic_write_json
from .owned import replaceable_json


def seed_config(name: str, seed: int, overrides: list[str]) -> Config:
    return load_config(name, [*overrides, f"fold_seed={seed}", f"name={name}_fs{seed}"])


def honest_of(cfg: Config) -> dict:
    """Every rule's honest out-of-fold macro F1 of a complete experiment, the AUC, the rule ``decision`` picks, and
    the honest macro F1 of its path without MONET by stored thresholds (one lesion) and by that rule on a batch
    (src/nomonet.py)."""
    from .nomonet import paths_without
    from .scoring import macro_f1

    train, test = load_train(cfg.data_dir, check_images=False), load_test(cfg.data_dir, check_images=False)
    blend = blend_experiments([cfg], train, test)
    scores = blend.scores[BLEND]
    honest = {r: scores[RULES[r].score_key] for r in RULES}
    rule, _ = choose_rule(cfg.decision, honest)
    without = paths_without([cfg], blend.folds, train, rule) or {}
    y = train[CLASSES].to_numpy(np.float64)
    return {**honest, "auc": scores["auc"], "chosen": rule, "chosen_score": honest[rule],
            **{f"without_monet_{k}": macro_f1(y, without[k]) for k in ("stored", "batch") if k in without}}


def run(name: str, seeds: list[int], overrides: list[str]) -> dict:
    from .runner import run_experiment

    rows = {}
    for seed in seeds:
        cfg = seed_config(name, seed, overrides)
        result = run_experiment(cfg)
        if not result.get("complete"):
            raise RuntimeError(f"{cfg.name}: folds {result.get('missing_folds')} did not finish")
        rows[seed] = honest_of(cfg)
    keys = [*RULES, "chosen_score", "auc", *WITHOUT]
    summary = {k: {"mean": float(np.mean([r[k] for r in rows.values()])),
                   "std": float(np.std([r[k] for r in rows.values()]))} for k in keys
               if all(k in r for r in rows.values())}
    return {"experiment": name, "fold_seeds": seeds, "per_seed": rows, "summary": summary}


WITHOUT = ("without_monet_stored", "without_monet_batch")


def format_spread(result: dict) -> str:
    cols = [c for c in (*RULES, "auc", *WITHOUT) if c in result["summary"]]
    lines = [f"honest out-of-fold macro F1 of {result['experiment']} by decision rule",
             f"{'fold seed':>12} " + " ".join(f"{c:>20}" for c in cols) + "  chosen"]
    for seed, row in result["per_seed"].items():
        lines.append(f"{seed:>12} " + " ".join(f"{row[c]:>20.4f}" for c in cols) +
                     f"  {row['chosen']} {row['chosen_score']:.4f}")
    s = result["summary"]
    lines.append(f"{'mean +- std':>12} " + " ".join(f"{s[c]['mean']:.4f} +- {s[c]['std']:.4f}".rjust(20)
                                                     for c in cols))
    lines.append(f"the rule each run submits: {s['chosen_score']['mean']:.4f} +- {s['chosen_score']['std']:.4f} over "
                 f"{len(result['per_seed'])} fold seeds")
    return "\n".join(lines)


def fold_seeds(text: str) -> list[int]:
    """'42,7,2026' -> [42, 7, 2026]: distinct non-negative integers, at least two (a spread needs two runs)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of non-negative integers, e.g. 42,7,2026")
    seeds = list(dict.fromkeys(int(p) for p in parts))
    if len(seeds) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least two distinct fold seeds, e.g. 42,7,2026")
    return seeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bash run.sh spread", description=__doc__.split("\n\n")[0])
    ap.add_argument("exp")
    ap.add_argument("--fold-seeds", type=fold_seeds, default="42,7,2026", help="comma list of fold seeds")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_intermixed_args(argv)
    out = Path(load_config(args.exp, args.overrides).output_dir) / "spread" / f"{args.exp}.json"
    replaceable_json(out, ("experiment", "fold_seeds", "per_seed", "summary"), "move it away or give another "
                     "output_dir=")
    result = run(args.exp, args.fold_seeds, args.overrides)
    atomic_write_json(out, result)
    print(format_spread(result))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
