"""A trained experiment leaves the repo: predict reproduces the submissions of an experiment, a blend and their export
(with no output folder), one lesion prints its diagnoses, the export holds a manifest, a model card and no pickle,
and every bad input is one line, exit 2, nothing written."""
from __future__ import annotations

import hashlib
import io
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


@pytest.mark.slow
def test_hgb_and_mlp_export_and_predict_like_the_experiment_with_no_pickle(mini_data, tmp_path):
    """The tabular models that would need a pickle elsewhere are skops files read with an explicit trusted list: an
    experiment of lrx, hgb and mlp predicts its submission back from its export to 1e-6."""
    where = [f"output_dir={tmp_path}", f"submission_dir={tmp_path}/s"]
    cfg = load_config("exp000", [f"data_dir={mini_data}", *where, "n_folds=2", "tabular_models=lrx,hgb,mlp",
                                 "wandb_mode=disabled"])
    run_experiment(cfg)
    finalize(cfg, [cfg])
    folder = tmp_path / "export"
    assert cli(["export", "exp000", *where, "--out", str(folder)]) == 0
    assert_no_pickle(folder)
    assert {m["name"] for m in json.loads((folder / "experiments/exp000/fold0/models.json").read_text())[
        "without_monet"]} == {"lrx", "hgb", "mlp"}
    for source in ("exp000", str(folder)):
        out = tmp_path / f"{Path(source).name}.csv"
        assert cli(["predict", source, "--data", str(mini_data), *where, "--out", str(out)]) == 0
        assert_same(out, tmp_path / "s" / "exp000.csv")


def test_a_model_file_naming_an_untrusted_type_or_a_malformed_tree_is_refused(tmp_path):
    import skops.io as sio
    from sklearn.ensemble import HistGradientBoostingClassifier

    from src import sklearn_io

    sio.dump({"with_monet": [Untrusted()]}, tmp_path / "evil.skops")
    with pytest.raises(sklearn_io.StoreError, match="names types this project does not trust"):
        sklearn_io.load(tmp_path / "evil.skops")
    with pytest.raises(sklearn_io.StoreError, match="need types no reader here trusts"):
        sklearn_io.dump([Untrusted()], tmp_path / "refused.skops")
    assert not (tmp_path / "refused.skops").exists()
    x, y = np.random.default_rng(0).normal(size=(60, 3)), np.arange(60) % 3
    model = HistGradientBoostingClassifier(max_iter=2).fit(x, y)
    sklearn_io.dump([model], tmp_path / "hgb.skops")
    assert sklearn_io.load(tmp_path / "hgb.skops")[0].predict_proba(x).shape == (60, 3)
    model._predictors[0][0].nodes["left"][0] = 10 ** 6
    with pytest.raises(sklearn_io.StoreError, match="point outside it"):
        sklearn_io.check_trees(model)


class Untrusted:
    """A type no skops file of this project may name."""


def assert_no_pickle(folder: Path) -> None:
    """Every file of an export is JSON, safetensors, Markdown, PNG, or a skops zip holding only its JSON schema and
    numpy arrays that load without pickle."""
    import zipfile

    for f in (p for p in folder.rglob("*") if p.is_file()):
        assert f.suffix in {".json", ".safetensors", ".md", ".png", ".skops"}, f
        if f.suffix != ".skops":
            assert f.read_bytes()[:2] not in (b"\x80\x04", b"PK"), f"{f} looks like a pickle or a torch archive"
            continue
        with zipfile.ZipFile(f) as zf:
            names = zf.namelist()
            assert "schema.json" in names and all(n == "schema.json" or n.endswith(".npy") for n in names), names
            for n in names[1:] if names[0] == "schema.json" else names:
                if n.endswith(".npy"):
                    np.load(io.BytesIO(zf.read(n)), allow_pickle=False)


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
    for needle in ("model: blend both (exp001, exp000), code revision", "given age, sex, site, skin tone; missing the "
                   "14 MONET scores", "path without MONET", "95% CI",
                   "against", "most likely: ", "need not sum to 1", "not a medical device"):
        assert needle in text, needle
    assert cli(["predict", "both", *trained["where"], "--clinical", str(clin), "--dermoscopic", str(derm)]) == 0
    assert "given no metadata; missing age, sex, site, skin tone, the 14 MONET scores" in capsys.readouterr().out


@pytest.mark.parametrize("source", ["exp000", "exp001"])
def test_monet_cost_measures_the_recorded_paths_again(trained, capsys, source):
    assert cli(["predict", source, "--monet-cost", f"data_dir={trained['data']}", *trained["where"]]) == 0
    rows = {line[:46].strip(): line[46:].split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("with MONET", "without MONET"))}
    assert len(rows) == 3
    for measured, _, recorded, _ in rows.values():   # predict's own path gives back what the submission recorded
        assert measured == recorded


def lesion_without_monet(data: Path, dest: Path) -> tuple[pd.Series, Path, Path]:
    """A copy of the test set with every MONET score emptied; its first lesion with unaltered images, an age and a
    skin tone, and the lesion's two JPEGs."""
    copy_test_set(data, dest)
    meta = pd.read_csv(dest / "MILK10k_Test_Metadata.csv", dtype=str, keep_default_na=False)
    meta[MONET] = ""
    meta.to_csv(dest / "MILK10k_Test_Metadata.csv", index=False)
    test = load_test(dest)
    usable = (test["clin_manipulation"] != "altered") & (test["derm_manipulation"] != "altered") & \
        test["age_approx"].notna() & test["skin_tone_class"].notna()
    row = test[usable].iloc[0]
    return row, Path(row["clin_path"]), Path(row["derm_path"])


def test_one_lesion_and_a_batch_without_monet_get_the_same_answer(trained, tmp_path):
    """Single-lesion mode is a batch of one lesion without MONET under the stored thresholds: the same
    probabilities and decisions as that lesion inside a batch whose MONET columns are empty (--thresholds stored)."""
    from src.deliver.predict import predict_batch, resolve_source, single_lesion

    row, clin, derm = lesion_without_monet(trained["data"], tmp_path / "data")
    source = resolve_source("both", dict(o.split("=", 1) for o in trained["where"]))
    batch = predict_batch(source, load_test(tmp_path / "data"), thresholds="stored")
    one = predict_batch(source, single_lesion(str(clin), str(derm), row["age_approx"], row["sex"] or None,
                                              row["site"] or None, int(row["skin_tone_class"])), thresholds="stored")
    i = load_test(tmp_path / "data")["lesion_id"].tolist().index(row["lesion_id"])
    assert not batch["monet"].any() and not one["monet"].any()
    np.testing.assert_allclose(one["blended"][0], batch["blended"][i], rtol=0, atol=1e-6)  # float32 batches
    np.testing.assert_array_equal(one["thresholds"][0], batch["thresholds"][i])
    np.testing.assert_array_equal(one["folded"][0] > 0.5, batch["folded"][i] > 0.5)
    assert one["thresholds_why"] == batch["thresholds_why"] == "the stored thresholds fitted for lesions without MONET"


def test_a_batch_without_monet_says_so_and_what_it_costs(trained, tmp_path, capsys):
    lesion_without_monet(trained["data"], tmp_path / "data")
    out = tmp_path / "p.csv"
    assert cli(["predict", "both", "--data", str(tmp_path / "data"), *trained["where"], "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "lack" in line]
    assert len(lines) == 1 and "30 of 30 lesions lack (some of) the 14 MONET scores" in lines[0], lines
    assert "path without MONET" in lines[0] and "95% CI" in lines[0] and "with MONET" in lines[0]


def test_a_metadata_only_source_reads_no_jpeg_for_one_lesion(trained, capsys):
    assert cli(["predict", "exp000", *trained["where"], "--age", "70", "--site", "head_neck_face"]) == 0
    text = capsys.readouterr().out
    assert "given age, site; missing sex, skin tone, the 14 MONET scores" in text and "most likely: " in text


def test_monet_cost_of_an_export_prints_what_its_submission_recorded(trained, bundle, capsys):
    assert cli(["predict", str(bundle), "--monet-cost"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("with MONET", "without MONET"))]
    info = json.loads((bundle / "bundle.json").read_text())["monet"]
    assert len(rows) == 3 and f"{info['without']['stored']['honest']:.4f}" in rows[1]
    assert all(row[46:72].strip() == "-" for row in rows)                 # nothing measured: no training lesions


def test_an_export_predicts_into_its_own_default_file(trained, bundle):
    from src.deliver.cli import default_out

    assert default_out("exp001", {}) == Path("output/predictions/exp001.csv")
    assert default_out(str(bundle), {"output_dir": "o"}) == Path("o/predictions/both_export.csv")
    assert default_out(f"{bundle}.tar.gz", {}) == Path("output/predictions/both_export.csv")


# ----------------------------------------------------------------------------------------------------
# the export
# ----------------------------------------------------------------------------------------------------
def test_the_export_has_a_manifest_a_model_card_and_no_pickle(bundle, trained):
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "MANIFEST.json"]
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((bundle / rel).read_bytes()).hexdigest() == digest
    assert_no_pickle(bundle)
    assert len([f for f in files if f.endswith("weights.safetensors")]) == 2
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["experiments"] == ["exp001", "exp000"] and info["versions"]["bundle"] == 2
    assert info["members"]["exp001"]["data_fingerprint"]["tables"] and info["packages"]["torch"]
    assert info["monet"]["without"]["stored"]["honest"] > 0 and set(info["thresholds_without_monet"]) == set(CLASSES)
    card = (bundle / "MODEL_CARD.md").read_text()
    sidecar = json.loads((trained["subs"] / "both.json").read_text())
    chosen = sidecar["blend_candidate"]
    assert info["blend_candidate"] == chosen and info["blend_choice_reason"] == sidecar["blend_choice_reason"]
    assert (f"the candidate `{chosen}` among {len(sidecar['blend_candidates'])}" in card
            and f"chosen because {sidecar['blend_choice_reason']}" in card)
    for needle in ("---\nlicense: cc-by-nc-4.0", "model-index:", "## Model details", "revision", "MIT licence",
                   "A blend of 2 experiments", "reads both", "## Intended use", "not a medical device",
                   "## Training data", "generated by src/tools/synth.py", "By age:", "By skin tone:",
                   "## Metrics", "95% CI", "Spread over fold seeds", "### Per class", "sensitivity", "specificity",
                   "AUC", "### By skin tone", "### By sex", "### By age", "### By site", "too few (under 50 lesions)",
                   "over the classes present", "## One lesion, and lesions without MONET scores",
                   "stored thresholds: one lesion", "## Decision rule", "## Calibration", "reliability.png",
                   "## Caveats and ethical considerations", "missed melanoma", "Skin tones", "0.04-0.05", "MAL_OTH"):
        assert needle in card, needle
    assert "MILK study team" not in card and str(trained["out"].parent) not in card
    assert "/" not in "".join(v for v in json.loads((bundle / "experiments/exp000/config.json").read_text()).values()
                              if isinstance(v, str))
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
