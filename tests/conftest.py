"""Shared fixtures and helpers: the real sample rows, a generated miniature MILK10k, and tiny training settings
derived from the demo's (exp/demo/config.py)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.config import experiment_module, load_config as experiment_config
from src.tools.synth import generate

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
LOCATIONS = ("data_dir", "output_dir", "submission_dir")
# Faster than the demo: smaller images and batches, fewer epochs, no early stop within them.
FASTER = {"img_size": 32, "batch_size": 16, "epochs": 3, "patience": 10, "backbone_lr": 1e-3}


def tiny(mini_data, out, **extra) -> list[str]:
    """key=value overrides: the demo's settings made faster (FASTER), on ``mini_data``, writing under ``out``,
    W&B off; ``extra`` last."""
    demo = {k: v for k, v in experiment_module("demo").OVERRIDES.items() if k not in LOCATIONS}
    o = {**demo, **FASTER, "data_dir": mini_data, "output_dir": out, "submission_dir": Path(out) / "subs",
         "wandb_mode": "disabled", **extra}
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in o.items()]


def run_cli(*args, env: dict | None = None, **kw) -> subprocess.Popen:
    """``python -m src.cli ARGS`` in the repo, output captured as text."""
    return subprocess.Popen([sys.executable, "-m", "src.cli", *args], cwd=REPO, env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


# CSV files edited by line number (header = line 1) and column name
def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def write_rows(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


def get_field(path: Path, line: int, column: str) -> str:
    rows = read_rows(path)
    return rows[line - 1][rows[0].index(column)]


def set_field(path: Path, line: int, column: str, value: str) -> None:
    rows = read_rows(path)
    rows[line - 1][rows[0].index(column)] = value
    write_rows(path, rows)


def drop_column(path: Path, column: str) -> None:
    rows = read_rows(path)
    j = rows[0].index(column)
    write_rows(path, [r[:j] + r[j + 1:] for r in rows])


def add_column(path: Path, column: str) -> None:
    write_rows(path, [r + ([column] if i == 0 else ["0"]) for i, r in enumerate(read_rows(path))])



@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """Real MILK10k CSV rows (no images); attribution: "MILK study team", CC-BY-NC."""
    return Path(__file__).parent / "fixtures" / "milk10k_sample"


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated miniature MILK10k (120 training and 30 test lesions, with JPEGs); treat it as read-only."""
    return generate(tmp_path_factory.mktemp("mini") / "milk10k", n_train=120, n_test=30, seed=0)


# ----------------------------------------------------------------------------------------------------
# a trained experiment, blend and export shared by the predict and delivery tests (treat them as read-only)
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained(mini_data, tmp_path_factory):
    """exp001 (tiny backbone, exp001's interaction features, 8-view TTA) and exp000, 2 folds each, their submissions
    and the blend 'both'."""
    from src.runner import run_experiment
    from src.submission import finalize

    out = tmp_path_factory.mktemp("trained") / "out"
    cfg = experiment_config("exp001", tiny(mini_data, out, n_folds=2, epochs=1, meta_features="interactions",
                                     meta_standardize=True))
    run_experiment(cfg)
    finalize(cfg, [cfg])
    where = [f"data_dir={mini_data}", f"output_dir={out}", f"submission_dir={out / 'subs'}", "n_folds=2"]
    c0 = experiment_config("exp000", [*where, "wandb_mode=disabled"])
    run_experiment(c0)
    finalize(c0, [c0])
    finalize(cfg, ["exp001", "exp000"], name="both", overrides=where)
    return {"out": out, "subs": out / "subs", "where": [f"output_dir={out}", f"submission_dir={out / 'subs'}"],
            "data": mini_data}


@pytest.fixture(scope="session")
def bundle(trained, tmp_path_factory):
    from src.cli import main as cli

    folder = tmp_path_factory.mktemp("export") / "both"
    assert cli(["export", "both", *trained["where"], "--out", str(folder)]) == 0
    return folder
