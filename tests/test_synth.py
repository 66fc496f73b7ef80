"""The generated miniature MILK10k against the real fixture rows (attribution: "MILK study team", CC-BY-NC)."""
from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from src.data import (
    CLASSES, MONET, SAMPLE_SUBMIT, TEST_IMAGES, TEST_METADATA, TRAIN_GROUND_TRUTH, TRAIN_IMAGES, TRAIN_METADATA,
    TRAIN_SUPPLEMENT, load_test, load_train,
)
from src.data import DataError
from src.tools.synth import MARKER, generate, generated, images_for_csvs, main, staged

CSVS = [TRAIN_METADATA, TRAIN_GROUND_TRUTH, TRAIN_SUPPLEMENT, TEST_METADATA, SAMPLE_SUBMIT]
HIDDEN = Path("hidden") / "MILK10k_Test_GroundTruth.csv"
TINY = dict(image_size=(64, 48))


def _raw(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.mark.parametrize("name", CSVS)
def test_schema_matches_real_files(mini_data: Path, sample_dir: Path, name: str) -> None:
    synth, real = pd.read_csv(mini_data / name), pd.read_csv(sample_dir / name)
    assert list(synth.columns) == list(real.columns)
    assert synth.dtypes.to_dict() == real.dtypes.to_dict()
    for column in ["image_type", "attribution", "copyright_license", "image_manipulation", "sex",
                   "diagnosis_confirm_type", "invasion_thickness_interval", "diagnosis_full"]:
        if column in real:
            assert set(synth[column].dropna()) <= set(real[column].dropna()), column
    if "site" in real:
        assert set(synth.site.dropna()) <= set(real.site.dropna()) | {"genital"}
    if "MONET_hair" in real:  # floats written as the official files write them ('%.15g'), ages as there
        for frame in (_raw(mini_data / name), _raw(sample_dir / name)):
            assert all(f"{float(v):.15g}" == v for m in MONET for v in frame[m])
        synth_ages, real_ages = _raw(mini_data / name).age_approx, _raw(sample_dir / name).age_approx
        assert {v[-2:] == ".0" for v in synth_ages if v} == {v[-2:] == ".0" for v in real_ages if v}
        assert synth.age_approx.dropna().mod(5).eq(0).all() and synth.skin_tone_class.between(1, 5).all()
        pairs = synth.groupby("lesion_id").image_type.agg(tuple)
        assert (pairs == ("clinical: close-up", "dermoscopic")).all()
    if name in (TRAIN_GROUND_TRUTH, SAMPLE_SUBMIT):
        assert _raw(mini_data / name).iloc[:, 1:].isin(["0.0", "1.0"]).all().all()


def test_ids_layout_and_no_reachable_test_labels(mini_data: Path) -> None:
    train, test = pd.read_csv(mini_data / TRAIN_METADATA), pd.read_csv(mini_data / TEST_METADATA)
    ids = pd.concat([train, test])
    assert ids.lesion_id.str.fullmatch(r"IL_\d{7}").all() and ids.isic_id.str.fullmatch(r"ISIC_\d{7}").all()
    assert ids.isic_id.is_unique and not set(train.lesion_id) & set(test.lesion_id)
    assert train.lesion_id.is_monotonic_increasing and test.lesion_id.is_monotonic_increasing
    assert sorted(p.name for p in mini_data.iterdir()) == sorted([*CSVS, TRAIN_IMAGES, TEST_IMAGES, "hidden", MARKER])
    assert generated(mini_data)["generated"] == "metadata, labels and images"
    hidden = pd.read_csv(mini_data / HIDDEN)
    assert list(hidden.lesion_id) == list(pd.read_csv(mini_data / SAMPLE_SUBMIT).lesion_id)
    assert list(hidden.lesion_id) == sorted(set(test.lesion_id)) and (hidden[CLASSES].sum(axis=1) == 1).all()
    assert (pd.read_csv(mini_data / SAMPLE_SUBMIT)[CLASSES] == 0).all().all()
    supplement = pd.read_csv(mini_data / TRAIN_SUPPLEMENT)
    assert supplement.isic_id.is_monotonic_increasing and set(supplement.isic_id) == set(train.isic_id)


def test_data_layer_reads_it_with_images(mini_data: Path) -> None:
    train, test = load_train(mini_data), load_test(mini_data)
    assert len(train) == 120 and len(test) == 30
    assert (train.diagnosis_full != "").all()
    truth = pd.read_csv(mini_data / TRAIN_GROUND_TRUTH).set_index("lesion_id")[CLASSES].to_numpy().argmax(1)
    np.testing.assert_array_equal(train.target.to_numpy(), truth)


def test_images_are_600x450_rgb_jpegs(mini_data: Path) -> None:
    files = sorted((mini_data / TRAIN_IMAGES).glob("*/*.jpg")) + sorted((mini_data / TEST_IMAGES).glob("*/*.jpg"))
    assert len(files) == 2 * (120 + 30)
    for path in files:
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (600, 450)), path


def test_every_class_present_with_realistic_frequencies(mini_data: Path, tmp_path: Path) -> None:
    counts = pd.read_csv(mini_data / TRAIN_GROUND_TRUTH)[CLASSES].sum()
    assert (counts >= 3).all() and counts.idxmax() == "BCC" and counts["BCC"] > 3 * counts["MEL"]
    assert counts["MAL_OTH"] <= counts["NV"] / 3
    bigger = generate(tmp_path / "big", n_train=300, n_test=12, seed=1, **TINY)
    big_counts = pd.read_csv(bigger / TRAIN_GROUND_TRUTH)[CLASSES].sum()
    assert (big_counts >= 5).all() and big_counts.sum() == 300 and big_counts.idxmax() == "BCC"


def test_quirks_of_the_real_files_are_present(mini_data: Path) -> None:
    train, test = load_train(mini_data), load_test(mini_data)
    assert train.age_approx.isna().any() and not test.age_approx.isna().any()
    assert (train.site == "").any() and (test.site == "").any()
    assert "genital" in set(test.site) and "genital" not in set(train.site)
    manipulation = pd.concat([frame[["clin_manipulation", "derm_manipulation"]] for frame in (train, test)])
    assert (manipulation == "altered").any().any()
    assert (train.clin_MONET_hair != train.derm_MONET_hair).all()
    assert train.diagnosis_full.nunique() > len(CLASSES)
    supplement = pd.read_csv(mini_data / TRAIN_SUPPLEMENT)
    invasive = supplement.diagnosis_full == "Melanoma Invasive"
    assert invasive.any() and supplement.invasion_thickness_interval[invasive].notna().all()
    assert supplement.invasion_thickness_interval[~invasive].isna().all()


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = snapshot(generate(tmp_path / "a", n_train=20, n_test=5, seed=7, **TINY))
    b = snapshot(generate(tmp_path / "b", n_train=20, n_test=5, seed=7, **TINY))
    c = snapshot(generate(tmp_path / "c", n_train=20, n_test=5, seed=8, **TINY))
    assert a == b and len(a) == 5 + 1 + 1 + 2 * 25                  # the CSVs, hidden labels, GENERATED.json, JPEGs
    assert a[TRAIN_METADATA] != c[TRAIN_METADATA]


def test_class_signal_is_learnable(mini_data: Path, tmp_path: Path) -> None:
    data = generate(tmp_path / "signal", n_train=400, n_test=0, seed=1, **TINY)  # same drawing, smaller pixels
    train = load_train(data)
    y = train.target.to_numpy()

    def thumbnail(path: str) -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((8, 6)), float).ravel() / 255

    x = np.stack([thumbnail(p) for p in train.derm_path])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, tol=1e-3, max_iter=500))
    accuracy = cross_val_score(model, x, y, cv=StratifiedKFold(4, shuffle=True, random_state=0)).mean()
    majority = np.bincount(y).max() / len(y)
    assert accuracy > majority + 0.2, (accuracy, majority)

    mini = load_train(mini_data)  # the metadata carries a weaker signal
    ages = mini.groupby("target").age_approx.mean()
    assert ages[CLASSES.index("NV")] < ages[CLASSES.index("BCC")] - 10
    pigment = mini.groupby("target").derm_MONET_pigmented.mean()
    assert pigment[CLASSES.index("MEL")] > pigment[CLASSES.index("BCC")]


def test_cli_nested_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main([str(tmp_path / "cli"), "--n-train", "12", "--n-test", "3", "--seed", "2", "--layout", "nested"])
    assert "12 training and 3 test lesions" in capsys.readouterr().out
    assert (tmp_path / "cli" / TRAIN_IMAGES / TRAIN_IMAGES).is_dir()
    assert len(load_train(tmp_path / "cli")) == 12 and len(load_test(tmp_path / "cli")) == 3


def test_refuses_a_non_empty_folder_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=re.escape(str(target))):
        generate(target, n_train=12, n_test=3, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="layout"):
        generate(tmp_path / "new", layout="zipped")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate(empty, n_train=12, n_test=3, **TINY) == empty.resolve()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("how", ["generate", "from-csvs", "a file in its place"])
def test_a_taken_out_folder_is_one_line_and_nothing_is_written_or_deleted(sample_dir: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture, how: str):
    out = tmp_path / "out"
    if how == "a file in its place":
        out.write_text("mine")
    else:
        (out / "MILK10k_Training_Input").mkdir(parents=True)              # a user's files, some in synth's names
        (out / "notes.txt").write_text("keep me")
        (out / "MILK10k_Training_Input" / "mine.jpg").write_bytes(b"not synth's")
    before = _snapshot(tmp_path)
    args = [str(out), "--n-train", "12", "--n-test", "3"] if how != "from-csvs" else \
        [str(out), "--from-csvs", str(sample_dir), "--workers", "1"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith(f"error: {out.resolve()} already exists and is not an empty folder (")
    assert ("a file" if how == "a file in its place" else "it holds MILK10k_Training_Input, notes.txt") in captured.err
    assert _snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_demo_reports_a_taken_data_folder_in_one_line(tmp_path: Path) -> None:
    from src.cli import user_message                                       # what `bash run.sh demo` prints

    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(Exception) as err:
        generate(tmp_path, n_train=12, n_test=3, **TINY)
    assert user_message(err.value) == str(err.value) and "notes.txt" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_files_put_in_the_folder_while_synth_runs_are_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError, match="something was put there while synth ran"):
        with staged(out) as (stage, _):
            (stage / "made.csv").write_text("synth's")
            out.mkdir()
            (out / "theirs.txt").write_text("keep me")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in out.iterdir()] == ["theirs.txt"]


# --- images for real CSVs (the fixture's real rows: "MILK study team", CC-BY-NC) --------------------------------
SMALL = dict(image_size=(48, 36))


@pytest.fixture(scope="module")
def rehearsal(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rehearsal")
    return {layout: images_for_csvs(root / layout, sample_dir, signal="weak", layout=layout, seed=3, **SMALL)
            for layout in ("plain", "nested", "zip")}


def test_every_image_of_the_real_csvs_is_written_in_each_layout(rehearsal, sample_dir: Path, tmp_path: Path) -> None:
    train, test = load_train(rehearsal["plain"]), load_test(rehearsal["plain"])  # check_images: every JPEG exists
    assert len(train) == len(load_train(sample_dir, check_images=False)) and len(test) == 479
    for name in (TRAIN_METADATA, TRAIN_GROUND_TRUTH, TRAIN_SUPPLEMENT, TEST_METADATA):
        assert (rehearsal["plain"] / name).read_bytes() == (sample_dir / name).read_bytes()
    assert generated(rehearsal["plain"])["generated"] == "images" and generated(sample_dir) is None
    with Image.open(train.clin_path.iat[0]) as im:
        assert im.format == "JPEG" and im.size == (48, 36)
    nested = load_train(rehearsal["nested"])
    assert (rehearsal["nested"] / TRAIN_IMAGES / TRAIN_IMAGES).is_dir()
    assert [Path(p).read_bytes() for p in nested.derm_path[:5]] == [Path(p).read_bytes() for p in train.derm_path[:5]]
    zipped = rehearsal["zip"]
    assert sorted(p.name for p in zipped.iterdir() if p.suffix == ".zip") == [f"{TEST_IMAGES}.zip", f"{TRAIN_IMAGES}.zip"]
    assert not (zipped / TRAIN_IMAGES).exists()
    with zipfile.ZipFile(zipped / f"{TRAIN_IMAGES}.zip") as zf:
        zf.extractall(tmp_path)                                     # as unzip -d <folder> would
    names = {f"{TRAIN_IMAGES}/{lid}/{i}.jpg" for lid, i in zip(train.lesion_id, train.clin_isic_id)}
    assert names <= {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg")}


@pytest.mark.slow
def test_the_same_bytes_for_a_seed_whatever_the_workers(sample_dir: Path, tmp_path: Path) -> None:
    one = images_for_csvs(tmp_path / "one", sample_dir, signal="none", seed=5, workers=1, **SMALL)
    two = images_for_csvs(tmp_path / "two", sample_dir, signal="none", seed=5, workers=2, **SMALL)
    files = sorted(p.relative_to(one) for p in one.rglob("*.jpg"))
    assert len(files) == 2 * (328 + 479)
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)


def _bcc_auc(data: Path) -> float:
    """Cross-validated AUC of a logistic regression telling BCC (the largest class) from the rest by the mean
    colour at the centre of both images."""
    train = load_train(data)

    def centre(path: str) -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), float)[12:24, 16:32].reshape(-1, 3).mean(0) / 255

    x = np.stack([np.concatenate([centre(c), centre(d)]) for c, d in zip(train.clin_path, train.derm_path)])
    y = (train.target == CLASSES.index("BCC")).to_numpy()
    p = cross_val_predict(LogisticRegression(max_iter=1000), x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                          method="predict_proba")[:, 1]
    return roc_auc_score(y, p)


def test_weak_images_carry_a_learnable_signal_and_none_carry_none(rehearsal, sample_dir: Path, tmp_path: Path) -> None:
    # over seeds 0-4 this probe read 0.60-0.68 on weak images and 0.45-0.56 on signal-free ones (328 lesions)
    weak = _bcc_auc(rehearsal["plain"])
    none = _bcc_auc(images_for_csvs(tmp_path / "none", sample_dir, signal="none", seed=3, **SMALL))
    assert weak > 0.6 and none < 0.57 and weak - none > 0.05, (weak, none)


def test_a_taken_folder_or_a_missing_test_metadata_is_refused(sample_dir: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not an empty folder"):
        images_for_csvs(taken, sample_dir, **SMALL)
    only_train = tmp_path / "csvs"
    only_train.mkdir()
    for name in (TRAIN_METADATA, TRAIN_GROUND_TRUTH):
        (only_train / name).write_bytes((sample_dir / name).read_bytes())
    with pytest.raises(DataError, match="--test-metadata"):
        images_for_csvs(tmp_path / "new", only_train, **SMALL)
    out = images_for_csvs(tmp_path / "new", only_train, sample_dir / TEST_METADATA, signal="none", **SMALL)
    assert len(load_test(out)) == 479 and not (out / TRAIN_SUPPLEMENT).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["csvs", "new", "taken"]    # no temporary folder left


def test_a_bad_csv_is_named_by_its_own_path_not_its_copy(sample_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "csvs"
    shutil.copytree(sample_dir, src)
    rows = (src / TRAIN_GROUND_TRUTH).read_text().splitlines()
    rows[4] = rows[4].replace("1.0", "0.5", 1)
    (src / TRAIN_GROUND_TRUTH).write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(src.resolve() / TRAIN_GROUND_TRUTH))}: line 5"):
        images_for_csvs(tmp_path / "out", src, signal="none", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["csvs"]
