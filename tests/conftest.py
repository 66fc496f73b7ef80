"""Shared fixtures and helpers: the real sample rows, a generated miniature MILK10k, and tiny training settings
derived from the demo's (exp/demo/config.py)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.config import experiment_module
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
