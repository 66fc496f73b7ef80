"""W&B against a server it cannot reach: the first online run that cannot start switches the whole process to
offline at once (one line), so no later run waits for the server and no metric is lost."""
from __future__ import annotations

import pytest

import src.tracking as tracking
from src.config import load_config
from src.tracking import Tracker


class FakeRun:
    id, dir = "abc123", "/tmp"

    def __init__(self):
        self.logged = []

    def log(self, data, step=None):
        self.logged.append(data)

    def finish(self):
        pass


@pytest.fixture
def calls(monkeypatch):
    """wandb.init replaced: online calls fail as an unreachable server makes them fail (a CommError without a
    message, as wandb raises after its timeout), offline calls start a run."""
    import wandb

    seen = []

    def init(**kw):
        seen.append(kw)
        if kw["mode"] == "online":
            raise wandb.errors.CommError("")
        return FakeRun()

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(tracking, "_offline_since", None, raising=False)
    return seen


def test_an_unreachable_server_switches_the_process_to_offline_once(calls, tmp_path, capsys):
    cfg = load_config("exp001", [f"output_dir={tmp_path}", "wandb_mode=online"])
    first = Tracker(cfg, "fold0")
    assert [c["mode"] for c in calls] == ["online", "offline"]   # the same run, offline at once: nothing lost
    assert calls[0]["settings"].init_timeout <= 15                # a bounded wait, not wandb's 90 s
    assert first.run is not None and first.mode == "offline"
    first.log({"loss": 1.0})
    assert first.run.logged == [{"loss": 1.0}]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[wandb] cannot reach the server (CommError: no message")
    assert "logging offline for the rest of this process" in err[0] and "wandb sync" in err[0]
    assert str(tmp_path / "exp001" / "wandb") in err[0]

    later = [Tracker(cfg, f"fold{k}") for k in (1, 2)]
    assert [c["mode"] for c in calls[2:]] == ["offline", "offline"]   # never online again: no wait
    assert all(t.run is not None for t in later) and capsys.readouterr().err == ""


def test_a_reachable_server_stays_online(monkeypatch, tmp_path):
    import wandb

    seen = []
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.append(kw["mode"]) or FakeRun())
    monkeypatch.setattr(tracking, "_offline_since", None, raising=False)
    cfg = load_config("exp001", [f"output_dir={tmp_path}", "wandb_mode=online"])
    Tracker(cfg, "fold0")
    Tracker(cfg, "fold1")
    assert seen == ["online", "online"]


def test_errors_are_described_by_type_and_a_useful_text():
    import wandb

    assert tracking.describe(wandb.errors.CommError("")).startswith("CommError: no message")
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as inner:
            raise wandb.errors.CommError("") from inner
    except wandb.errors.CommError as exc:
        assert tracking.describe(exc) == "CommError: ConnectionRefusedError: [Errno 111] Connection refused"
    assert tracking.describe(RuntimeError("first line\nsecond line")) == "RuntimeError: first line"
