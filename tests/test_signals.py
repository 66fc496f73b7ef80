"""SIGTERM during a multi-worker image-cache build ends the run as Ctrl-C does: one line, status 130, no worker
tracebacks, no temporary cache file and no worker left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.cache import HASHES
from src.tools.synth import generate

from .conftest import ENV, REPO, tiny


@pytest.fixture(scope="module")
def sizeable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough 600x450 lesions for a two-worker cache build to take a couple of seconds."""
    return generate(tmp_path_factory.mktemp("sig") / "data", n_train=400, n_test=20, seed=5)


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child: Ctrl-C's default action, whatever the test runner inherited (a shell's background job starts
    with SIGINT ignored, and Python then installs no KeyboardInterrupt for it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _alive_with(marker: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("target", ["the run", "its process group"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_multi_worker_cache_build_is_one_line_and_leaves_nothing(sizeable, tmp_path, target, sig):
    out = tmp_path / "out"
    args = tiny(sizeable, out, num_workers=2, img_size=96)
    proc = subprocess.Popen([sys.executable, "-m", "src.cli", "run", "exp001", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)
    deadline = time.time() + 300
    while not list((out / "cache").glob(".train_*.tmp")):         # the build has begun
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.01)
    time.sleep(0.3)                                                # workers busy decoding
    if target == "the run":
        proc.send_signal(sig)
    else:
        os.killpg(proc.pid, sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert output.strip().splitlines() == ["interrupted: rerun the same command to resume from the last finished "
                                           "epoch"], output
    assert [p.name for p in (out / "cache").iterdir()] in ([], [HASHES])  # no temporary or half-built cache
    time.sleep(0.5)
    assert _alive_with(str(out)) == []                             # no orphaned decode worker


@pytest.mark.slow
def test_sigterm_during_training_ends_the_run_as_ctrl_c_does_and_the_rerun_resumes(mini_data, tmp_path):
    out = tmp_path / "out"
    args = tiny(mini_data, out, n_folds=2, epochs=3)
    cmd = [sys.executable, "-m", "src.cli", "run", "exp001", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:                                       # stop it once an epoch is checkpointed
        lines.append(line)
        if "epoch  2/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted: rerun the same command to resume" in rest and "Traceback" not in rest
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    rerun = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "resuming after epoch" in rerun.stdout, rerun.stdout + rerun.stderr
