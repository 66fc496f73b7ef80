"""Shared fixtures and helpers: the real sample rows, a generated miniature MILK10k, and tiny training settings
derived from the demo's (exp/demo/config.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.config import experiment_module
from src.synth import generate

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


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """Real MILK10k CSV rows (no images); attribution: "MILK study team", CC-BY-NC."""
    return Path(__file__).parent / "fixtures" / "milk10k_sample"


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated miniature MILK10k (120 training and 30 test lesions, with JPEGs); treat it as read-only."""
    return generate(tmp_path_factory.mktemp("mini") / "milk10k", n_train=120, n_test=30, seed=0)
