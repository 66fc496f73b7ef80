"""W&B against a server it cannot reach: the first online run that cannot start switches the whole process to
offline at once (one line), so no later run waits for the server and no metric is lost."""
from __future__ import annotations

import glob
import time
from pathlib import Path

import pytest
import sklearn.datasets

import src.tracking as tracking
from src.config import load_config
from src.tracking import Tracker, read_offline_run


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


def offline_runs(folder, *expect: str) -> list[dict]:
    """The offline runs under ``folder``/wandb, read back once each holds one of ``expect`` in its summary (wandb-core
    may still be writing a log after finish() returns)."""
    files = sorted(glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb")))
    deadline = time.time() + 30
    while True:
        runs = [read_offline_run(f) for f in files]
        if all(any(k in r["summary"] for k in expect) for r in runs) or time.time() > deadline:
            return runs
        time.sleep(0.2)


@pytest.mark.slow
def test_offline_records_of_a_demo_experiment_and_a_blend_line_up(mini_data, tmp_path, monkeypatch):
    """Fold runs and submission runs of every kind carry the data's origin and their kind as tags and config, the
    same metric names, and the predictions, submission and report as artifacts; a blend has a group of its own."""
    from src.runner import run_experiment
    from src.submission import finalize

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # where offline artifacts are staged
    out = tmp_path / "out"
    ov = [f"data_dir={mini_data}", f"output_dir={out}", f"submission_dir={tmp_path / 'subs'}", "wandb_mode=offline",
          "n_folds=2", "tabular_models=logreg"]
    a = load_config("exp000", ov)
    b = load_config("exp000", [*ov, "name=exp000b", "tabular_models=lrx"])
    for cfg in (a, b):
        assert run_experiment(cfg)["complete"]
    finalize(a, [a])
    both = finalize(a, [a, b], name="both")

    folds_and_own = offline_runs(out / "exp000", "val/macro_f1", "oof/macro_f1_honest")
    by_job = {r["job_type"]: [x for x in folds_and_own if x["job_type"] == r["job_type"]] for r in folds_and_own}
    assert sorted(r["name"] for r in by_job["train"]) == ["exp000@generated/fold0", "exp000@generated/fold1"]
    for run in folds_and_own:
        assert run["group"] == "exp000@generated"
        assert set(run["tags"]) == {"data:generated", "kind:tabular"}
        assert run["config"]["data_origin"] == "generated" and run["config"]["kind"] == "tabular"
    for run in by_job["train"]:
        assert {"val/macro_f1", "val/loss", "val/f1/MAL_OTH"} <= set(run["summary"])
    own, = by_job["blend"]
    assert own["name"] == "exp000@generated/blend/exp000"
    assert {"oof/macro_f1_honest", "oof/f1/BCC", "oof/auc", "weight/exp000"} <= set(own["summary"])
    assert {(x["type"], x["name"]) for x in own["artifacts"]} == {
        ("predictions", "exp000-generated-predictions"), ("submission", "exp000-generated-submission"),
        ("blend-report", "exp000-generated-report")}

    blend, = offline_runs(out / "blends" / "both", "oof/macro_f1_honest")
    assert (blend["group"], blend["name"], blend["job_type"]) == ("blend/both@generated", "blend/both@generated",
                                                                  "blend")
    assert set(blend["tags"]) == {"data:generated", "kind:blend"}
    assert blend["summary"]["oof/macro_f1_honest"] == pytest.approx(both["cv_macro_f1_honest"])
    assert {f"candidate/{c}/macro_f1_honest" for c in both["candidates"]} <= set(blend["summary"])
    assert {"input/exp000/f1_threshold_honest", "input/exp000b/auc", "oof/f1/MAL_OTH"} <= set(blend["summary"])
    artifacts = {x["name"]: x for x in blend["artifacts"]}
    assert set(artifacts) == {"exp000-generated-predictions", "exp000b-generated-predictions",
                              "both-generated-submission", "both-generated-report"}
    assert artifacts["exp000b-generated-predictions"]["files"] == ["oof.csv", "oof_metrics.json", "test.csv"]
    assert artifacts["both-generated-submission"]["files"] == ["both.csv", "both.json", "both_oof_honest.csv"]
    assert artifacts["both-generated-submission"]["metadata"]["candidate"] == both["candidate"]
    assert {"report.md", "per_class.csv", "confusion.png"} <= set(artifacts["both-generated-report"]["files"])


def test_the_origin_of_the_data_is_read_from_the_data(mini_data, sample_dir, tmp_path):
    """The demo's generated data has hidden test labels; images drawn by synth for real CSVs are recognised by their
    doubled pixels; a photograph (or no images at all) is real."""
    from PIL import Image

    from src.tools.synth import images_for_csvs

    assert tracking.data_origin(str(mini_data)) == "generated"
    assert tracking.data_origin(str(sample_dir)) == "real"
    rehearsal = images_for_csvs(tmp_path / "rehearsal", mini_data, signal="none", image_size=(96, 72))
    assert tracking.data_origin(str(rehearsal)) == "rehearsal"
    photo = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
    assert not tracking.drawn_by_synth(photo)
    first = sorted((rehearsal / "MILK10k_Training_Input").iterdir())[0]
    jpeg = sorted(first.glob("*.jpg"))[0]
    Image.open(photo).convert("RGB").resize(Image.open(jpeg).size).save(jpeg, quality=88)
    tracking.data_origin.cache_clear()
    assert tracking.data_origin(str(rehearsal)) == "real"
