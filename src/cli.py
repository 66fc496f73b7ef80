"""Command dispatch for run.sh: run an experiment, the demo, blending, tuning, predicting and exporting."""
from __future__ import annotations

import errno
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from .config import ConfigError, describe, load_config

DEMO = "demo"  # exp/demo/config.py: the demo's settings, applied on top of any experiment


RUN_ARGS = ("folds", "retrain")  # arguments of running an experiment, given as key=value like the settings


def split_run_args(args: list[str]) -> tuple[list[str], str, bool]:
    """(settings, folds, retrain): ``folds=`` and ``retrain=`` are the run's own arguments, not settings."""
    from .config import parse_bool

    settings, folds, retrain = [], "", False
    for arg in args:
        name, sep, value = arg.partition("=")
        if sep and name.strip() == "folds":
            folds = value
        elif sep and name.strip() == "retrain":
            retrain = parse_bool("retrain", value, "command line")
        else:
            settings.append(arg)
    return settings, folds, retrain


def cmd_run(name: str, args: list[str], demo: bool = False) -> int:
    """Run experiment ``name`` (train its missing folds, collect, score), then write its submission."""
    from .runner import run_experiment
    from .submission import finalize

    settings, folds, retrain = split_run_args(args)
    if "--help" in settings or "-h" in settings:
        print(describe(load_config(name, [a for a in settings if a not in ("--help", "-h")],
                                   preset=DEMO if demo else None)))
        return 0
    cfg = load_config(name, settings, preset=DEMO if demo else None)
    if demo:
        make_demo_data(cfg)
    t0 = time.time()
    result = run_experiment(cfg, folds=folds, retrain=retrain)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    for k, why in result.get("failed_folds", {}).items():
        print(f"[{cfg.name}] fold {k} failed: {why}", flush=True)
    if not result.get("complete"):
        command = ["bash", "run.sh", *(["demo"] if demo else []), cfg.experiment, *settings]
        print(f"[{cfg.name}] not complete: missing folds {result.get('missing_folds')}; "
              f"`{shlex.join(command)}` finishes them", flush=True)
        return 0 if folds else 1
    print(f"[{cfg.name}] out-of-fold macro F1 (raw, > 0.5): {result['macro_f1']:.4f}  "
          f"({time.time() - t0:.0f}s)", flush=True)
    if demo:
        summary = finalize(cfg, [cfg], name=f"demo_{cfg.name}")
        print_demo_summary(cfg, summary)
        print(f"demo wall time: {time.time() - t0:.0f}s")
    else:
        finalize(cfg, [cfg])
    return 0


def make_demo_data(cfg) -> None:
    """The generated miniature MILK10k the demo trains on, made on first use."""
    from .config import experiment_module
    from .tools.synth import generate

    data_dir = Path(cfg.data_dir)
    if not (data_dir / "MILK10k_Training_Metadata.csv").is_file():
        print(f"[demo] generating a miniature MILK10k in {data_dir}", flush=True)
        generate(data_dir, **experiment_module(DEMO).SYNTH)


def best_constant_macro_f1(y) -> float:
    """The best leaderboard score of any constant prediction: per class either always or never positive."""
    import numpy as np

    pos = y.sum(0)
    n = len(y)
    always = 2 * pos / (pos + n)          # F1 of predicting every row positive
    never = (pos == 0).astype(float)      # F1 of predicting none (1 only when the class is absent)
    return float(np.maximum(always, never).mean())


def cmd_demo(args: list[str]) -> int:
    """``demo [EXP] [key=value ...]``: EXP (default exp001) with the demo's settings on the generated data;
    ``demo blend EXP ... [--name N]`` blends demo experiments."""
    from .config import experiment_module

    if args and args[0] == "blend":
        from .submission import main as blend_main

        demo, given = experiment_module(DEMO).OVERRIDES, {a.split("=", 1)[0] for a in args if "=" in a}
        return blend_main(args[1:] + [f"{k}={demo[k]}" for k in ("data_dir", "output_dir", "submission_dir")
                                      if k not in given])
    name = args.pop(0) if args and "=" not in args[0] and not args[0].startswith("-") else "exp001"
    return cmd_run(name, args, demo=True)


def print_demo_summary(cfg, summary: dict) -> None:
    """The out-of-fold scores, the best constant prediction's, the submission against the hidden labels, and the
    commands that predict with it and export it (the demo's submission is demo_<EXP> under its own folders)."""
    import numpy as np

    from .data import CLASSES, load_train
    from .decision import RULES
    from .scoring import read_prediction_csv, read_truth_csv, score

    y = load_train(cfg.data_dir, check_images=False)[CLASSES].to_numpy(np.float32)
    blend = summary.get("scores", {}).get("blend", {})
    print("\n=== demo summary (out-of-fold macro F1, leaderboard rules) ===")
    rows = [("f1_argmax", "argmax (one positive per row)"),
            ("f1_threshold_optimistic", "folded thresholds, optimistic"),
            *((r.score_key, f"{r.name} rule, honest") for r in RULES.values())]
    for key, label in rows:
        if isinstance(blend.get(key), (int, float)):
            print(f"{label:<40}: {blend[key]:.4f}")
    print(f"{'best constant prediction, same labels':<40}: {best_constant_macro_f1(y):.4f}")
    hidden = Path(cfg.data_dir) / "hidden" / "MILK10k_Test_GroundTruth.csv"
    sub = summary.get("paths", {}).get("submission")
    if hidden.is_file() and sub:
        res = score(read_truth_csv(hidden), read_prediction_csv(sub))
        print(f"submission scored against the generator's hidden test labels: {res['macro_f1']:.4f}")
    print(f"outputs: {cfg.exp_dir()}  submission: {sub}")
    where = f"output_dir={cfg.output_dir} submission_dir={cfg.submission_dir}"
    print(f"predict with it: bash run.sh predict {summary.get('name')} {where} --data {cfg.data_dir}\n"
          f"export it:       bash run.sh export {summary.get('name')} {where}")


def cmd_blend(args: list[str]) -> int:
    from .submission import main

    return main(args)


def cmd_tune(args: list[str]) -> int:
    from .tune import main

    return main(args)


# Errors that describe a problem the user can fix (input, settings, environment), by the module defining them;
# a module that was never imported cannot have raised its errors.
USER_ERRORS = {
    "src.data": ("DataError",), "src.experiment": ("StaleOutputs", "ExperimentBusy"),
    "src.preflight": ("SetupError",), "src.blend": ("BlendError",), "src.scoring": ("SubmissionError",),
    "src.stacker": ("StackError",), "src.model": ("WeightsUnavailable",),
    "src.speed.fuse": ("FusionUnsupported",), "src.train": ("NonFiniteLoss", "CheckpointError"),
    "src.deliver.source": ("PredictError",), "src.deliver.bundle": ("BundleError",), "src.owned": ("NotOurs",),
}
FIXABLE_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def user_message(exc: BaseException) -> str | None:
    """The message to print for an error the user can act on; None for anything else (a bug: traceback)."""
    kinds = tuple(getattr(sys.modules[m], n) for m, names in USER_ERRORS.items() if m in sys.modules for n in names)
    if isinstance(exc, kinds):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in FIXABLE_OS_ERRORS:
        from .preflight import os_error_text

        return os_error_text(exc) + " (nothing half-written was kept; rerun to resume)"
    return None


_MAIN_PID = os.getpid()


# What Ctrl-C (or SIGTERM) leaves, by command: a command that trains resumes; the others start again
RESUMES = "interrupted: rerun the same command to resume from the last finished epoch"
REDO = "interrupted: nothing half-written was kept (every file is as it was, or complete); rerun the same command"
INTERRUPTED = {"predict": REDO, "export": REDO, "blend": REDO,
               "spread": "interrupted: nothing half-written was kept; rerun the same command: finished runs are kept "
                         "and the unfinished one resumes from its last finished epoch"}


def interrupted(cmd: str, rest: list[str]) -> str:
    """The line printed when command ``cmd`` (its arguments ``rest``) is interrupted."""
    if cmd == "demo" and rest[:1] == ["blend"]:
        cmd = "blend"
    return INTERRUPTED.get(cmd, RESUMES)


def _terminate(signum, frame) -> None:
    """SIGTERM ends a run as Ctrl-C does (one line, temporary files removed, resumable); a process forked from it
    (a decode or loader worker) that gets it before setting its own handler just ends, quietly."""
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if __name__ == "__main__":
        signal.signal(signal.SIGTERM, _terminate)
    if not argv:
        print("usage: python -m src.cli {run EXP|demo [EXP|blend ...]|blend|tune|predict|export} ...", file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "run":
            if not rest:
                raise ConfigError("run needs an experiment name")
            return cmd_run(rest[0], rest[1:])
        if cmd == "demo":
            return cmd_demo(rest)
        if cmd == "blend":
            return cmd_blend(rest)
        if cmd == "tune":
            return cmd_tune(rest)
        if cmd == "predict":
            from .deliver.cli import main as predict_main

            return predict_main(rest)
        if cmd == "export":
            from .deliver.export import main as export_main

            return export_main(rest)
        if cmd == "spread":
            from .spread import main as spread_main

            return spread_main(rest)
        if cmd == "fold":  # worker of GPUS=... parallel folds: CONFIG_JSON FOLD
            from .executors import run_worker

            return run_worker(rest[0], int(rest[1]))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted(cmd, rest), file=sys.stderr)
        return 130
    except Exception as exc:  # a user-facing error gets one message and no traceback
        message = user_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
