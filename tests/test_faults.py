"""Fault injection: a run killed (SIGKILL) at each phase, or out of disk space, resumes to bit-identical outputs
and leaves no temporary or half-written file behind (src/faults.py names the points)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, run_cli, tiny

SETTINGS = {"epochs": 2, "n_folds": 2}
PHASES = {
    "cache build": "kill@cache.lesion#40",
    "mid-epoch": "kill@step#7",
    "during the last.pt write": "kill@write:last.pt#2",
    "just after the last.pt write": "kill@written:last.pt#2",
    "after a fold's oof.csv": "kill@written:oof.csv",
    "during the blend report": "kill@write:report.md",
    "during the submission write": "kill@write:exp001.csv",
}
COMPARED = ["exp001/oof.csv", "exp001/test.csv", "exp001/fold0/oof.csv", "exp001/fold0/test.csv",
            "exp001/fold1/oof.csv", "exp001/fold1/test.csv", "subs/exp001.csv", "subs/exp001_oof_honest.csv"]
pytestmark = pytest.mark.slow


def _run(mini_data, out, fault=None):
    proc = run_cli("run", "exp001", *tiny(mini_data, out, **SETTINGS),
                   env={"MILK10K_FAULT": fault} if fault else {})
    text, _ = proc.communicate(timeout=600)
    return proc.returncode, text


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _sidecar(out: Path) -> dict:
    side = json.loads((out / "subs" / "exp001.json").read_text())
    return {k: side[k] for k in ("weights", "thresholds", "cv_scores", "honest_per_fold_thresholds", "decision")}


@pytest.fixture(scope="module")
def reference(mini_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    rc, text = _run(mini_data, out)
    assert rc == 0, text
    return out


@pytest.mark.parametrize("phase", list(PHASES))
def test_killed_at_each_phase_then_resumed_gives_bit_identical_outputs(mini_data, reference, tmp_path, phase):
    rc, text = _run(mini_data, tmp_path, PHASES[phase])
    assert rc == -9, f"the run was not killed at {phase}:\n{text}"
    rc, text = _run(mini_data, tmp_path)
    assert rc == 0, text
    for f in COMPARED:
        assert (tmp_path / f).read_bytes() == (reference / f).read_bytes(), f
    assert _sidecar(tmp_path) == _sidecar(reference)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("where, expect_left", [
    ("enospc@write:last.pt#2", "exp001/fold0/last.pt"),      # the first epoch's checkpoint stays
    ("enospc@cache.lesion#10", None),
    ("enospc@write:exp001.csv", "exp001/oof.csv"),          # all folds done, only the submission failed
])
def test_a_full_disk_is_a_clear_error_and_the_rerun_completes(mini_data, reference, tmp_path, where, expect_left):
    rc, text = _run(mini_data, tmp_path, where)
    assert rc == 2 and "the disk is full" in text and "Traceback" not in text, text
    assert _leftovers(tmp_path) == []
    if expect_left:
        assert (tmp_path / expect_left).is_file()
    assert not (tmp_path / "subs" / "exp001.csv").exists()
    rc, text = _run(mini_data, tmp_path)
    assert rc == 0, text
    for f in COMPARED:
        assert (tmp_path / f).read_bytes() == (reference / f).read_bytes(), f


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a private tmpfs (unshare -rm)")
def test_a_really_full_disk_during_the_cache_build(mini_data, tmp_path):
    """A 400 KB tmpfs holds the folds file but not the 0.9 MB image cache: a clear error, no SIGBUS, nothing left."""
    mount = tmp_path / "small"
    mount.mkdir()
    args = " ".join(tiny(mini_data, mount, **SETTINGS))
    script = (f"mount -t tmpfs -o size=400k tmpfs {mount} && cd {REPO} && "
              f"python -m src.cli run exp001 {args}; echo rc=$?; find {mount} -name '*.tmp' | wc -l")
    env = {**os.environ, "WANDB_MODE": "disabled", "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=600)
    out = done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == "rc=2" and lines[-1].strip() == "0", out
    assert "not enough free disk space for the cache train 32px" in out and "Traceback" not in out
