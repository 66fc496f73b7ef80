"""A trained experiment leaves the repo: predict reproduces the submissions of an experiment, a blend and their export
(with no output folder), one lesion prints its diagnoses, the export holds a manifest, a model card and no pickle,
and every bad input is one line, exit 2, nothing written."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from src.cli import main as cli
from src.config import load_config
from src.data import CLASSES, MONET, load_test, load_train
from src.features import MetadataFeatures
from src.runner import run_experiment
from src.submission import finalize

from .conftest import add_column, tiny

TEST_IMAGES = "MILK10k_Test_Input"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the fold models are tiny, and on a shared CPU more threads only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(mini_data, tmp_path_factory):
    """exp001 (tiny backbone, exp001's interaction features, 8-view TTA) and exp000, 2 folds each, their submissions
    and the blend 'both'."""
    out = tmp_path_factory.mktemp("trained") / "out"
    cfg = load_config("exp001", tiny(mini_data, out, n_folds=2, epochs=1, meta_features="interactions",
                                     meta_standardize=True))
    run_experiment(cfg)
    finalize(cfg, [cfg])
    where = [f"data_dir={mini_data}", f"output_dir={out}", f"submission_dir={out / 'subs'}", "n_folds=2"]
    c0 = load_config("exp000", [*where, "wandb_mode=disabled"])
    run_experiment(c0)
    finalize(c0, [c0])
    finalize(cfg, ["exp001", "exp000"], name="both", overrides=where)
    return {"out": out, "subs": out / "subs", "where": [f"output_dir={out}", f"submission_dir={out / 'subs'}"],
            "data": mini_data}


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "both"
    assert cli(["export", "both", *trained["where"], "--out", str(folder)]) == 0
    return folder


def frame(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).set_index("lesion_id")


def assert_same(a: Path, b: Path) -> None:
    fa, fb = frame(a), frame(b)
    assert fa.index.tolist() == fb.index.tolist() and fa.columns.tolist() == CLASSES
    np.testing.assert_allclose(fa.to_numpy(), fb.to_numpy(), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# the stored parts
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, standardize", [("base", False), ("extended", True), ("interactions", True),
                                               ("interactions", False)])
def test_the_fitted_features_round_trip_through_json_exactly(mini_data, kind, standardize):
    train, test = load_train(mini_data, check_images=False), load_test(mini_data, check_images=False)
    fitted = MetadataFeatures(kind, standardize).fit(train.iloc[:60])
    back = MetadataFeatures.from_dict(json.loads(json.dumps(fitted.to_dict())))
    blind = test.copy()
    blind[[f"{v}_{m}" for v in ("clin", "derm") for m in MONET]] = np.nan
    for rows in (test, blind):
        assert np.array_equal(fitted.transform(rows), back.transform(rows))


def test_what_needs_a_pickle_is_recorded_and_refused(mini_data, tmp_path, capsys):
    from sklearn.ensemble import HistGradientBoostingClassifier

    from src.portable import NotPortable, to_dict
    from src.tabular import saved_models

    with pytest.raises(NotPortable, match="HistGradientBoostingClassifier cannot be stored"):
        to_dict(HistGradientBoostingClassifier())
    assert saved_models([("hgb", HistGradientBoostingClassifier(), np.arange(3))])[0]["model"] is None
    cfg = load_config("exp000", [f"data_dir={mini_data}", f"output_dir={tmp_path}", f"submission_dir={tmp_path}/s",
                                 "n_folds=2", "tabular_models=lrx,hgb", "wandb_mode=disabled"])
    run_experiment(cfg)
    finalize(cfg, [cfg])
    code = cli(["predict", "exp000", "--data", str(mini_data), f"output_dir={tmp_path}", f"submission_dir={tmp_path}/s",
                "--out", str(tmp_path / "p.csv")])
    assert code == 2 and not (tmp_path / "p.csv").exists()
    assert "model 'hgb' cannot be stored without a pickle" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# predict reproduces the submissions
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["exp001", "exp000", "both"])
def test_predict_reproduces_the_submission(trained, tmp_path, source, capsys):
    out = tmp_path / f"{source}.csv"
    assert cli(["predict", source, "--data", str(trained["data"]), *trained["where"], "--out", str(out)]) == 0
    assert_same(out, trained["subs"] / f"{source}.csv")
    readable = pd.read_csv(tmp_path / f"{source}_diagnoses.csv")
    assert readable.columns.tolist() == ["lesion_id", "top1", "p1", "top2", "p2", "top3", "p3", "decided"]
    sub = frame(out)
    for _, row in readable.iterrows():
        passed = [c for c in CLASSES if sub.loc[row["lesion_id"], c] > 0.5]
        assert sorted(row["decided"].split(";")) == sorted(passed or ["none"])
        assert row["p1"] >= row["p2"] >= row["p3"]
    assert "lesions/s" in capsys.readouterr().out


def test_a_metadata_only_source_needs_no_images(trained, tmp_path):
    data = tmp_path / "csv_only"
    data.mkdir()
    shutil.copy(trained["data"] / "MILK10k_Test_Metadata.csv", data)
    out = tmp_path / "p.csv"
    assert cli(["predict", "exp000", "--data", str(data), *trained["where"], "--out", str(out)]) == 0
    assert_same(out, trained["subs"] / "exp000.csv")


def test_a_stacker_predicts_from_its_inputs(trained, tmp_path):
    where = trained["where"]
    cfg = load_config("stack001", [f"data_dir={trained['data']}", *where, "n_folds=2", "stack_inputs=exp000,exp001",
                                   "wandb_mode=disabled"])
    run_experiment(cfg)
    finalize(cfg, [cfg])
    out = tmp_path / "stack.csv"
    assert cli(["predict", "stack001", "--data", str(trained["data"]), *where, "--out", str(out)]) == 0
    assert_same(out, trained["subs"] / "stack001.csv")


def test_one_lesion_prints_its_probabilities_and_decisions(trained, capsys):
    lesion = sorted((trained["data"] / TEST_IMAGES).iterdir())[0]
    clin, derm = sorted(lesion.glob("*.jpg"))
    assert cli(["predict", "both", *trained["where"], "--clinical", str(clin), "--dermoscopic", str(derm),
                "--age", "60", "--sex", "female", "--site", "head_neck_face", "--skin-tone", "3"]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.split()[:1] and line.split()[0] in CLASSES]
    assert sorted(r[0] for r in rows) == sorted(CLASSES)
    p = np.array([float(r[1]) for r in rows])
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert "decisions:" in text and "the 14 MONET scores" in text and "not a medical device" in text
    assert cli(["predict", "both", *trained["where"], "--clinical", str(clin), "--dermoscopic", str(derm)]) == 0
    assert "treated as missing: age, sex, site, skin tone, the 14 MONET scores" in capsys.readouterr().out


def test_monet_cost_scores_every_rule_with_and_without(trained, capsys):
    assert cli(["predict", "exp000", "--monet-cost", f"data_dir={trained['data']}", *trained["where"]]) == 0
    text = capsys.readouterr().out
    assert "with MONET" in text and "(submitted)" in text and "expected_f1" in text


# ----------------------------------------------------------------------------------------------------
# the export
# ----------------------------------------------------------------------------------------------------
def test_the_export_has_a_manifest_a_model_card_and_no_pickle(bundle):
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "MANIFEST.json"]
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((bundle / rel).read_bytes()).hexdigest() == digest
    assert {Path(f).suffix for f in files} <= {".json", ".safetensors", ".md", ".png"}
    for f in files:
        head = (bundle / f).read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{f} looks like a pickle or a torch archive"
    assert len([f for f in files if f.endswith("weights.safetensors")]) == 2
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["experiments"] == ["exp001", "exp000"] and info["versions"]["bundle"] == 2
    assert info["members"]["exp001"]["data_fingerprint"]["tables"] and info["packages"]["torch"]
    card = (bundle / "MODEL_CARD.md").read_text()
    for needle in ("MILK study team", "CC-BY-NC", "honest out-of-fold macro F1", "Spread over fold seeds",
                   "### Per class", "### By skin tone class", "### By sex", "## Decision rule", "## Calibration",
                   "reliability.png", "## Intended use", "Not a medical device", "## Known limits", "0.04-0.05",
                   "MAL_OTH", "MONET"):
        assert needle in card, needle
    assert (bundle / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert bundle.with_name("both.tar.gz").is_file()


def test_predict_from_the_export_with_no_output_folder(trained, bundle, tmp_path):
    """The export alone: the experiments' output folder is moved away while it predicts, folder and archive."""
    expected = tmp_path / "both.csv"
    shutil.copy(trained["subs"] / "both.csv", expected)
    away = trained["out"].with_name("away")
    trained["out"].rename(away)
    try:
        for source in (bundle, bundle.with_name("both.tar.gz")):
            out = tmp_path / f"from_{source.name}.csv"
            assert cli(["predict", str(source), "--data", str(trained["data"]), "--out", str(out)]) == 0
            assert_same(out, expected)
    finally:
        away.rename(trained["out"])


# ----------------------------------------------------------------------------------------------------
# bad inputs: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------------
def refused(capsys, tmp_path, args: list[str], *needles: str) -> str:
    out = tmp_path / "pred.csv"
    code = cli([*args, "--out", str(out)] if "--data" in args else args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(("error: ", "config error: ")), err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() and not (tmp_path / "pred_diagnoses.csv").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]
    return err


def test_a_wrong_source_name_is_refused(trained, tmp_path, capsys):
    refused(capsys, tmp_path, ["predict", "exp0001", "--data", str(trained["data"]), *trained["where"]],
            "exp0001: no experiment, blend or export of that name")


def copy_test_set(src: Path, dest: Path) -> Path:
    dest.mkdir()
    shutil.copy(src / "MILK10k_Test_Metadata.csv", dest)
    shutil.copytree(src / TEST_IMAGES, dest / TEST_IMAGES)
    return dest


def test_a_missing_or_unreadable_image_is_named(trained, tmp_path, capsys):
    data = copy_test_set(trained["data"], tmp_path / "data")
    victim = sorted((data / TEST_IMAGES).glob("*/*.jpg"))[3]
    victim.write_bytes(b"not a jpeg at all")
    refused(capsys, tmp_path, ["predict", "both", "--data", str(data), *trained["where"]], str(victim),
            "not a decodable JPEG")
    victim.unlink()
    refused(capsys, tmp_path, ["predict", "both", "--data", str(data), *trained["where"]], "image file not found",
            victim.name, "MILK10k_Test_Metadata.csv: line")
    refused(capsys, tmp_path, ["predict", "both", *trained["where"], "--clinical", str(victim), "--dermoscopic",
                               str(victim)], f"--clinical {victim}: image file not found")


def test_a_metadata_csv_with_other_columns_is_refused(trained, tmp_path, capsys):
    data = copy_test_set(trained["data"], tmp_path / "data")
    add_column(data / "MILK10k_Test_Metadata.csv", "diagnosis")
    refused(capsys, tmp_path, ["predict", "both", "--data", str(data), *trained["where"]],
            "MILK10k_Test_Metadata.csv: line 1 (header): unexpected column(s) 'diagnosis'")


def rewrite_manifest(folder: Path) -> None:
    from src.deliver.export import write_manifest

    write_manifest(folder)


def test_a_changed_missing_or_foreign_export_is_refused_by_name(trained, bundle, tmp_path, capsys):
    args = ["--data", str(trained["data"])]
    copy = tmp_path / "both"
    shutil.copytree(bundle, copy)
    weights = copy / "experiments" / "exp001" / "fold1" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])                   # truncated
    refused(capsys, tmp_path, ["predict", str(copy), *args], str(weights), "changed since the export")
    rewrite_manifest(copy)                                              # truncated, but listed as it is now
    refused(capsys, tmp_path, ["predict", str(copy), *args], str(weights), "cannot be read as safetensors")
    weights.unlink()
    refused(capsys, tmp_path, ["predict", str(copy), *args], str(weights), "missing from the export")
    shutil.rmtree(copy)
    shutil.copytree(bundle, copy)
    (copy / "experiments" / "exp000" / "fold0" / "model.pkl").write_bytes(b"\x80\x04")
    refused(capsys, tmp_path, ["predict", str(copy), *args], "model.pkl: not in the export's manifest")
    (copy / "experiments" / "exp000" / "fold0" / "model.pkl").unlink()
    info = json.loads((copy / "bundle.json").read_text())
    info["versions"]["features"] = 99
    (copy / "bundle.json").write_text(json.dumps(info))
    rewrite_manifest(copy)
    refused(capsys, tmp_path, ["predict", str(copy), *args], "written by another version of the project",
            "features 99 there, 1 here")
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    (copy / "MANIFEST.json").write_text(json.dumps({**manifest, "format": 99}))
    refused(capsys, tmp_path, ["predict", str(copy), *args], "written by another version of the project",
            "bundle format 99")
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(bundle.with_name("both.tar.gz").read_bytes()[:3000])
    refused(capsys, tmp_path, ["predict", str(archive), *args], str(archive), "cannot be read as an export archive")


def test_a_truncated_checkpoint_is_refused_by_name(trained, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained["out"], out, ignore=shutil.ignore_patterns("cache", "last.pt"))
    best = out / "exp001" / "fold0" / "best.pt"
    best.write_bytes(best.read_bytes()[:500])
    refused(capsys, tmp_path, ["predict", "exp001", "--data", str(trained["data"]), f"output_dir={out}",
                               f"submission_dir={out / 'subs'}"], str(best), "cannot be read back as a checkpoint")


def test_settings_that_change_results_are_refused(trained, tmp_path, capsys):
    refused(capsys, tmp_path, ["predict", "exp001", "--data", str(trained["data"]), *trained["where"],
                               "img_size=64"], "img_size= changes results")


@pytest.mark.parametrize("extra, needle", [
    (["--site", "head-neck"], "--site 'head-neck': not a site the models were trained on; use one of"),
    (["--sex", "f"], "--sex 'f': use one of male, female"),
    (["--age", "300"], "--age 300.0: an age in years, 0 to 120"),
    (["--skin-tone", "9"], "--skin-tone 9: the skin tone class, 0 to 5"),
])
def test_one_lesion_with_metadata_the_models_never_saw_is_refused(trained, tmp_path, capsys, extra, needle):
    lesion = sorted((trained["data"] / TEST_IMAGES).iterdir())[0]
    clin, derm = sorted(lesion.glob("*.jpg"))
    refused(capsys, tmp_path, ["predict", "both", *trained["where"], "--clinical", str(clin), "--dermoscopic",
                               str(derm), *extra], needle)
