"""Running an experiment, whatever its kind and wherever its folds train: the one path from a config to complete,
scored folds.

``run_experiment(cfg)``: the experiment's recipe (``RECIPE`` of exp/<experiment>/train.py), its lesions, the
folder's lock and fingerprint checks (``ExperimentDir.session``), the recipe's checks, its data (image caches or
metadata), the missing folds through an executor (src/executors.py: this process, one fold per GPU, torchrun),
then the collection of the folds and the honest out-of-fold score of every decision rule. ``bash run.sh EXP``,
the demo, ``spread`` and ``tune`` all run experiments through it.
"""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np

from .config import Config, experiment_recipe, parse_folds
from .decision import choose_rule, honest_scores
from .executors import InProcess, executor_from_env
from .experiment import ExperimentDir, Lesions, fingerprint, load_lesions
from .preflight import check_outputs


def run_experiment(cfg: Config, folds: str = "", retrain: bool = False, executor: InProcess | None = None,
                   data=None) -> dict:
    """Train every missing fold of ``folds`` (comma list; empty = all) of ``cfg``, then collect and score.

    Complete folds are skipped; folds made under other settings or data are refused, or with ``retrain`` retrained
    (damaged checkpoints too); outputs, device and weights are checked before any data is prepared. ``data``: the
    recipe's prepared data when the caller holds it already (tuning trials share it). Returns collect()'s metrics,
    with the honest out-of-fold macro F1 of every rule once the experiment is complete."""
    recipe = experiment_recipe(cfg.experiment)
    wanted = parse_folds("folds", folds, cfg.n_folds)
    with (executor or executor_from_env()).context(cfg) as ex:
        if not ex.is_main:
            ex.follow(cfg, recipe, wanted)
            return {}
        exp = ExperimentDir(cfg)
        failed: dict[int, str] = {}
        with ExitStack() as stack:
            with ex.starting():
                check_outputs(cfg)  # before anything is written, the image digests too
                lesions = data.lesions if data is not None else load_lesions(cfg, check_images=recipe.images)
                current = fingerprint(cfg, recipe.data_print(cfg, lesions))
                todo = stack.enter_context(exp.session(current, wanted, retrain))
                if todo:
                    recipe.check(cfg)
                    recipe.check_resume(cfg, todo, retrain)
                    data = data if data is not None else recipe.prepare(cfg, lesions)
                    print(f"[{cfg.name}] folds to train: {todo} (complete: "
                          f"{[k for k in wanted if k not in todo]})", flush=True)
            if todo:
                failed = ex.train(cfg, recipe, data, todo)
            result = exp.collect(lesions.train)
    return finish(cfg, exp, lesions, result, failed)


def finish(cfg: Config, exp: ExperimentDir, lesions: Lesions, result: dict, failed: dict[int, str]) -> dict:
    """collect()'s metrics, the folds that failed, and once complete the honest out-of-fold macro F1 of every
    decision rule with the one ``cfg.decision`` picks."""
    if failed:
        result["failed_folds"] = failed
    if not result.get("complete"):
        return result
    oof = exp.read_probs("oof.csv", lesions.train["lesion_id"].tolist()).to_numpy(np.float64)
    honest = honest_scores(lesions.labels(), oof, lesions.folds)
    rule, reason = choose_rule(cfg.decision, honest)
    result.update({f"macro_f1_{r}_honest": float(v) for r, v in honest.items()}, decision=rule)
    print(f"[{cfg.name}] oof macro F1 {result['macro_f1']:.4f} at 0.5, {honest[rule]:.4f} honest with {rule}; "
          f"{reason}", flush=True)
    return result

