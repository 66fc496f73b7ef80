"""The data layer on the real fixture rows (attribution: "MILK study team", CC-BY-NC) and on generated data."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from src.data import (
    CLASSES, GT_COLUMNS, IMAGE_TYPES, METADATA_COLUMNS, MONET, SUPPLEMENT_COLUMNS, TEST_IMAGES, TEST_METADATA,
    TRAIN_GROUND_TRUTH, TRAIN_IMAGES, TRAIN_METADATA, TRAIN_SUPPLEMENT, DataError, check_jpeg, load_test,
    load_train, locate,
)
from src.tools.synth import generate

from .conftest import add_column, drop_column, get_field, read_rows, set_field, write_rows

LESION_COLUMNS = [
    "lesion_id", "age_approx", "sex", "skin_tone_class", "site", "clin_isic_id", "derm_isic_id", "clin_path",
    "derm_path", "clin_manipulation", "derm_manipulation", *[f"clin_{m}" for m in MONET], *[f"derm_{m}" for m in MONET],
]
TRAIN_COLUMNS = [*LESION_COLUMNS, *CLASSES, "target", "diagnosis_full"]


@pytest.fixture
def sample_copy(sample_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "input"
    shutil.copytree(sample_dir, out)
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("small") / "data", n_train=15, n_test=4, seed=3, image_size=(64, 48))


# --- reading the real fixture rows -----------------------------------------------------------------

def test_fixture_train_schema_and_content(sample_dir: Path) -> None:
    df = load_train(sample_dir, check_images=False)
    raw_gt = pd.read_csv(sample_dir / TRAIN_GROUND_TRUTH)
    assert len(df) == 328 and list(df.columns) == TRAIN_COLUMNS
    assert isinstance(df.index, pd.RangeIndex) and df.lesion_id.is_monotonic_increasing and df.lesion_id.is_unique
    assert {c: str(df[c].dtype) for c in ["age_approx", "skin_tone_class", *CLASSES]} == dict.fromkeys(
        ["age_approx", "skin_tone_class", *CLASSES], "float64")
    assert df.target.dtype.kind == "i"
    assert df.age_approx.isna().sum() == 2 and (df.site == "").sum() == 3
    assert not df[["sex", "site", "diagnosis_full"]].isna().any().any()
    truth = raw_gt.set_index("lesion_id").loc[df.lesion_id, CLASSES].to_numpy()
    np.testing.assert_array_equal(df[CLASSES].to_numpy(), truth)
    np.testing.assert_array_equal(df.target.to_numpy(), truth.argmax(1))
    assert (df.diagnosis_full != "").all()
    expected_path = str(sample_dir.resolve() / TRAIN_IMAGES / df.lesion_id[0] / f"{df.clin_isic_id[0]}.jpg")
    assert df.clin_path[0] == expected_path


def test_fixture_test_schema(sample_dir: Path) -> None:
    df = load_test(sample_dir, check_images=False)
    assert len(df) == 479 and list(df.columns) == LESION_COLUMNS
    assert df.lesion_id.is_monotonic_increasing and isinstance(df.index, pd.RangeIndex)
    assert "genital" in set(df.site)
    assert all(p.startswith(str(sample_dir.resolve() / TEST_IMAGES)) for p in df.derm_path)


def test_pairing_matches_raw_rows(sample_dir: Path) -> None:
    df = load_train(sample_dir, check_images=False)
    raw = pd.read_csv(sample_dir / TRAIN_METADATA)
    for tag, image_type in (("clin", IMAGE_TYPES["clinical"]), ("derm", IMAGE_TYPES["dermoscopic"])):
        part = raw[raw.image_type == image_type].set_index("lesion_id").loc[df.lesion_id]
        assert (part.isic_id.to_numpy() == df[f"{tag}_isic_id"].to_numpy()).all()
        assert (part.image_manipulation.to_numpy() == df[f"{tag}_manipulation"].to_numpy()).all()
        np.testing.assert_array_equal(part[MONET].to_numpy(), df[[f"{tag}_{m}" for m in MONET]].to_numpy())
        names = [Path(p) for p in df[f"{tag}_path"]]
        assert [(p.parent.name, p.stem) for p in names] == list(zip(df.lesion_id, part.isic_id))
    supplement = pd.read_csv(sample_dir / TRAIN_SUPPLEMENT).set_index("isic_id")
    assert (supplement.diagnosis_full.loc[df.derm_isic_id].to_numpy() == df.diagnosis_full.to_numpy()).all()


def test_row_order_is_irrelevant_and_lesion_fields_come_from_dermoscopic_row(sample_copy: Path) -> None:
    before = load_train(sample_copy, check_images=False)
    meta = sample_copy / TRAIN_METADATA
    rows = read_rows(meta)
    rows = [rows[0], *reversed(rows[1:])]
    write_rows(meta, rows)
    clinical_line = next(i + 1 for i, r in enumerate(rows) if r[1] == IMAGE_TYPES["clinical"])
    set_field(meta, clinical_line, "age_approx", "5.0")
    set_field(meta, clinical_line, "site", "foot")
    pd.testing.assert_frame_equal(load_train(sample_copy, check_images=False), before)


def test_blank_lines_at_the_end_are_ignored(sample_copy: Path) -> None:
    gt = sample_copy / TRAIN_GROUND_TRUTH
    gt.write_text(gt.read_text() + "\n\n")
    assert len(load_train(sample_copy, check_images=False)) == 328


def test_supplement_is_optional(sample_copy: Path) -> None:
    (sample_copy / TRAIN_SUPPLEMENT).unlink()
    df = load_train(sample_copy, check_images=False)
    assert (df.diagnosis_full == "").all() and len(df) == 328


# --- layouts and images ----------------------------------------------------------------------------

def test_plain_and_nested_layouts_load_identically(tmp_path: Path) -> None:
    kw = dict(n_train=12, n_test=4, seed=5, image_size=(64, 48))
    plain = generate(tmp_path / "plain", **kw)
    nested = generate(tmp_path / "nested", layout="nested", **kw)
    assert locate(nested).train_images == nested / TRAIN_IMAGES / TRAIN_IMAGES
    assert locate(plain).test_images == plain / TEST_IMAGES
    for load in (load_train, load_test):
        a, b = load(plain), load(nested)
        for col in ("clin_path", "derm_path"):
            assert all(Path(p).is_file() for p in b[col])
            assert all(Path(p).read_bytes() == Path(q).read_bytes() for p, q in zip(a[col], b[col]))
            a[col] = [Path(p).relative_to(plain).parts[1:] for p in a[col]]
            b[col] = [Path(p).relative_to(nested).parts[2:] for p in b[col]]
        pd.testing.assert_frame_equal(a, b)


def test_locate_ignores_hidden_truth_and_reports_missing_pieces(small_data: Path, tmp_path: Path) -> None:
    files = locate(small_data)
    assert (small_data / "hidden" / "MILK10k_Test_GroundTruth.csv").is_file()
    assert small_data / "hidden" not in {p.parent for p in vars(files).values() if isinstance(p, Path)}
    empty = locate(tmp_path)
    assert empty.root == tmp_path.resolve() and empty.train_metadata is None and empty.test_images is None
    with pytest.raises(DataError, match="does not exist.*input/README.md"):
        load_test(tmp_path / "absent")


def test_missing_jpeg_names_path_line_and_column(small_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    meta = data / TRAIN_METADATA
    lesion, isic = get_field(meta, 6, "lesion_id"), get_field(meta, 6, "isic_id")
    image = locate(data).train_images / lesion / f"{isic}.jpg"
    image.unlink()
    with pytest.raises(DataError) as err:
        load_train(data)
    msg = str(err.value)
    assert TRAIN_METADATA in msg and "line 6" in msg and "'isic_id'" in msg and str(image) in msg
    assert len(load_train(data, check_images=False)) == 15


def test_missing_image_folder(small_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    shutil.rmtree(data / TEST_IMAGES)
    with pytest.raises(DataError, match=f"{TEST_IMAGES}.*README"):
        load_test(data)
    assert len(load_test(data, check_images=False)) == 4


def test_check_jpeg(small_data: Path, tmp_path: Path) -> None:
    good = Path(load_train(small_data).derm_path[0])
    check_jpeg(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all" * 50)
    png = tmp_path / "image.jpg"
    Image.new("RGB", (8, 8)).save(png, "PNG")
    for bad in (truncated, garbage, png, tmp_path / "absent.jpg"):
        with pytest.raises(DataError, match=bad.name):
            check_jpeg(bad)


# --- every bad input names the file, the line and the column ---------------------------------------

def _missing_column(d: Path):
    drop_column(d / TRAIN_METADATA, "MONET_hair")
    return TRAIN_METADATA, ["line 1", "'MONET_hair'", "missing"]


def _extra_column(d: Path):
    add_column(d / TRAIN_GROUND_TRUTH, "EXTRA")
    return TRAIN_GROUND_TRUTH, ["line 1", "'EXTRA'", "unexpected"]


def _supplement_columns(d: Path):
    drop_column(d / TRAIN_SUPPLEMENT, "diagnosis_full")
    return TRAIN_SUPPLEMENT, ["line 1", "'diagnosis_full'"]


def _two_dermoscopic(d: Path):
    set_field(d / TRAIN_METADATA, 2, "image_type", "dermoscopic")
    return TRAIN_METADATA, ["line 2", "'image_type'", "0 'clinical: close-up' and 2 'dermoscopic'"]


def _one_image(d: Path):
    rows = read_rows(d / TRAIN_METADATA)
    write_rows(d / TRAIN_METADATA, rows[:4] + rows[5:])  # drops line 5, the dermoscopic image of the 2nd lesion
    return TRAIN_METADATA, ["line 4", "'image_type'", "1 'clinical: close-up' and 0 'dermoscopic'"]


def _unknown_image_type(d: Path):
    set_field(d / TRAIN_METADATA, 7, "image_type", "overview")
    return TRAIN_METADATA, ["line 7", "'image_type'", "'overview'"]


def _duplicate_isic_id(d: Path):
    set_field(d / TRAIN_METADATA, 9, "isic_id", get_field(d / TRAIN_METADATA, 4, "isic_id"))
    return TRAIN_METADATA, ["line 9", "'isic_id'", "first on line 4"]


def _duplicate_lesion_id(d: Path):
    set_field(d / TRAIN_GROUND_TRUTH, 5, "lesion_id", get_field(d / TRAIN_GROUND_TRUTH, 3, "lesion_id"))
    return TRAIN_GROUND_TRUTH, ["line 5", "'lesion_id'", "first on line 3"]


def _two_labels(d: Path):
    gt = d / TRAIN_GROUND_TRUTH
    hot = next(c for c in CLASSES if get_field(gt, 6, c) == "1.0")
    other = "AKIEC" if hot != "AKIEC" else "BCC"
    set_field(gt, 6, other, "1.0")
    return TRAIN_GROUND_TRUTH, ["line 6", f"'{hot}'", f"'{other}'", "one-hot"]


def _no_label(d: Path):
    for c in CLASSES:
        set_field(d / TRAIN_GROUND_TRUTH, 8, c, "0.0")
    return TRAIN_GROUND_TRUTH, ["line 8", "'AKIEC'", "one-hot"]


def _fractional_label(d: Path):
    set_field(d / TRAIN_GROUND_TRUTH, 11, "MEL", "0.5")
    return TRAIN_GROUND_TRUTH, ["line 11", "'MEL'", "0.5"]


def _text_label(d: Path):
    set_field(d / TRAIN_GROUND_TRUTH, 12, "VASC", "yes")
    return TRAIN_GROUND_TRUTH, ["line 12", "'VASC'", "'yes'"]


def _lesion_sets_disagree(d: Path):
    gt, meta = d / TRAIN_GROUND_TRUTH, d / TRAIN_METADATA
    original = get_field(gt, 10, "lesion_id")
    set_field(gt, 10, "lesion_id", "IL_9999999")
    meta_line = next(i + 1 for i, r in enumerate(read_rows(meta)) if r[0] == original)
    return TRAIN_GROUND_TRUTH, [TRAIN_METADATA, "'lesion_id'", "IL_9999999", "line 10", original, f"line {meta_line}"]


def _text_monet(d: Path):
    set_field(d / TRAIN_METADATA, 13, "MONET_erythema", "high")
    return TRAIN_METADATA, ["line 13", "'MONET_erythema'", "'high'"]


def _text_age(d: Path):
    set_field(d / TRAIN_METADATA, 15, "age_approx", "seventy")
    return TRAIN_METADATA, ["line 15", "'age_approx'", "'seventy'"]


def _text_skin_tone(d: Path):
    set_field(d / TEST_METADATA, 20, "skin_tone_class", "III")
    return TEST_METADATA, ["line 20", "'skin_tone_class'", "'III'"]


def _infinite_monet(d: Path):
    set_field(d / TRAIN_METADATA, 14, "MONET_hair", "inf")
    return TRAIN_METADATA, ["line 14", "'MONET_hair'", "'inf'"]


def _blank_line(d: Path):
    rows = read_rows(d / TRAIN_METADATA)
    write_rows(d / TRAIN_METADATA, rows[:5] + [[]] + rows[5:])
    return TRAIN_METADATA, ["line 6", "'lesion_id'", "missing value"]


def _ragged_row(d: Path):
    rows = read_rows(d / TRAIN_METADATA)
    rows[3].append("surplus")
    write_rows(d / TRAIN_METADATA, rows)
    return TRAIN_METADATA, ["line 4"]


def _duplicate_supplement(d: Path):
    set_field(d / TRAIN_SUPPLEMENT, 3, "isic_id", get_field(d / TRAIN_SUPPLEMENT, 2, "isic_id"))
    return TRAIN_SUPPLEMENT, ["line 3", "'isic_id'"]


def _missing_file(d: Path):
    (d / TRAIN_GROUND_TRUTH).unlink()
    return TRAIN_GROUND_TRUTH, [str(d.resolve()), "input/README.md"]


BAD_INPUTS: list[Callable[[Path], tuple[str, list[str]]]] = [
    _missing_column, _extra_column, _supplement_columns, _two_dermoscopic, _one_image, _unknown_image_type,
    _duplicate_isic_id, _duplicate_lesion_id, _two_labels, _no_label, _fractional_label, _text_label,
    _lesion_sets_disagree, _text_monet, _text_age, _text_skin_tone, _infinite_monet, _blank_line, _ragged_row,
    _duplicate_supplement, _missing_file,
]


@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_raises_clear_error(sample_copy: Path, corrupt) -> None:
    load_train(sample_copy, check_images=False)
    load_test(sample_copy, check_images=False)
    file_name, fragments = corrupt(sample_copy)
    load = load_test if file_name == TEST_METADATA else load_train
    with pytest.raises(DataError) as err:
        load(sample_copy, check_images=False)
    msg = str(err.value)
    assert file_name in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_constants_match_fixture_headers(sample_dir: Path) -> None:
    assert read_rows(sample_dir / TRAIN_METADATA)[0] == METADATA_COLUMNS
    assert read_rows(sample_dir / TEST_METADATA)[0] == METADATA_COLUMNS
    assert read_rows(sample_dir / TRAIN_GROUND_TRUTH)[0] == GT_COLUMNS
    assert read_rows(sample_dir / TRAIN_SUPPLEMENT)[0] == SUPPLEMENT_COLUMNS
