"""Bad inputs a real user meets, each with what the project does (docs/bad_inputs.md lists them all).
Real rows from tests/fixtures/milk10k_sample: "MILK study team", CC-BY-NC."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.cache import build_cache
from src.data import (CLASSES, TEST_IMAGES, TEST_METADATA, TRAIN_GROUND_TRUTH, TRAIN_IMAGES, TRAIN_METADATA,
                      DataError, load_test, load_train)
from src.tools.download import verify
from src.features import MetadataEncoder
from src.scoring import read_prediction_csv
from src.tools.synth import generate

from .conftest import REPO, get_field, read_rows, set_field, write_rows

N_TRAIN, N_TEST = 12, 3


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("bad") / "data", n_train=N_TRAIN, n_test=N_TEST, seed=4,
                    image_size=(64, 48))


@pytest.fixture
def data(pristine: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(pristine, out)
    return out


def _verify(data: Path) -> list[str]:
    counts = {"MILK10k_Training_Input.zip": 2 * N_TRAIN, "MILK10k_Test_Input.zip": 2 * N_TEST}
    return verify(data, list(counts), counts)


def _image(data: Path, line: int = 4) -> Path:
    lesion, isic = get_field(data / TRAIN_METADATA, line, "lesion_id"), get_field(data / TRAIN_METADATA, line, "isic_id")
    return data / TRAIN_IMAGES / lesion / f"{isic}.jpg"


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "zero-byte", "png"])
def test_a_broken_jpeg_is_named_by_the_cache_build_and_by_verification(data, tmp_path, damage):
    image = _image(data)
    raw = image.read_bytes()
    if damage == "corrupt":
        image.write_bytes(raw[:200] + bytes(len(raw) - 200))
    elif damage == "truncated":
        image.write_bytes(raw[: len(raw) // 2])
    elif damage == "zero-byte":
        image.write_bytes(b"")
    else:
        from PIL import Image

        with Image.open(image) as im:
            im.save(image, format="PNG")
    train = load_train(data)                              # every file is there
    with pytest.raises(DataError, match=rf"{image.name}.*(not a decodable JPEG|not JPEG)"):
        build_cache(train, 32, tmp_path / "cache", "train")
    assert not list((tmp_path / "cache").glob("*.npy"))   # nothing half-built is left to be reused
    problems = _verify(data)
    assert any(str(image) in p and "do not decode" in p and "--force" in p for p in problems), problems


def test_a_missing_image_is_named_with_its_metadata_line(data):
    image = _image(data, line=6)
    image.unlink()
    with pytest.raises(DataError, match=rf"line 6 .*'isic_id'.*image file not found: {image}"):
        load_train(data)
    problems = _verify(data)
    assert any(f"{image} ({TRAIN_METADATA} line 6)" in p and "are missing" in p for p in problems), problems
    (data / TRAIN_IMAGES / "IL_0000000").mkdir()
    (data / TRAIN_IMAGES / "IL_0000000" / "ISIC_0000000.jpg").write_bytes(_image(data).read_bytes())
    assert any("not listed in" in p and "ISIC_0000000.jpg" in p for p in _verify(data))


def test_zips_not_unzipped_say_how_to_unzip(data):
    for folder in (TRAIN_IMAGES, TEST_IMAGES):
        with zipfile.ZipFile(data / f"{folder}.zip", "w") as zf:
            for p in (data / folder).rglob("*.jpg"):
                zf.write(p, p.relative_to(data).as_posix())
        shutil.rmtree(data / folder)
    with pytest.raises(DataError, match=rf"{TRAIN_IMAGES}.zip is there, not unzipped: unzip it with `unzip -q "
                                        rf".*{TRAIN_IMAGES}.zip -d .*`.*bash run.sh download --dest"):
        load_train(data)
    with zipfile.ZipFile(data / f"{TRAIN_IMAGES}.zip") as zf:    # what `unzip -q ... -d DIR` does
        zf.extractall(data)
    assert len(load_train(data)) == N_TRAIN


def test_a_misnamed_csv_is_pointed_at(data):
    (data / TRAIN_GROUND_TRUTH).rename(data / TRAIN_GROUND_TRUTH.lower())
    with pytest.raises(DataError, match=rf"{TRAIN_GROUND_TRUTH.lower()} is there: rename or unpack it"):
        load_train(data, check_images=False)


def test_missing_values_read_the_same_whether_empty_or_written_as_nan(data):
    rows = read_rows(data / TRAIN_METADATA)
    header = rows[0]
    lines = [i for i, r in enumerate(rows[1:], 2) if r[header.index("age_approx")]][:4]
    for line, marker in zip(lines, ["", "NaN", "nan", "NA"]):
        set_field(data / TRAIN_METADATA, line, "age_approx", marker)
    set_field(data / TRAIN_METADATA, lines[0], "site", "null")
    set_field(data / TRAIN_METADATA, lines[1], "MONET_hair", "N/A")
    train = load_train(data, check_images=False)
    assert train["age_approx"].isna().sum() >= 2
    x = MetadataEncoder(extended=True).fit(train).transform(train)
    assert np.isfinite(x).all()
    set_field(data / TRAIN_METADATA, lines[2], "age_approx", "seventy")
    with pytest.raises(DataError, match=rf"line {lines[2]} .*'age_approx'.*'seventy' is not a number"):
        load_train(data, check_images=False)


def test_a_site_seen_only_in_the_test_set_becomes_site_unknown(data):
    rows = read_rows(data / TEST_METADATA)
    rows[1][rows[0].index("site")] = rows[2][rows[0].index("site")] = "palms_soles"
    write_rows(data / TEST_METADATA, rows)
    train, test = load_train(data, check_images=False), load_test(data, check_images=False)
    enc = MetadataEncoder().fit(train)
    x = enc.transform(test)
    unknown = enc.feature_names.index("site_unknown")
    assert x[0, unknown] == 1 and x.shape[1] == enc.n_features


def _bom_crlf(path: Path) -> None:
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


def test_bom_and_crlf_files_read_as_the_plain_ones(data, tmp_path):
    before = load_train(data, check_images=False), load_test(data, check_images=False)
    for name in (TRAIN_METADATA, TRAIN_GROUND_TRUTH, TEST_METADATA):
        _bom_crlf(data / name)
    after = load_train(data, check_images=False), load_test(data, check_images=False)
    for a, b in zip(before, after):
        pd.testing.assert_frame_equal(a, b)
    pred = tmp_path / "pred.csv"
    test = after[1]
    pd.DataFrame({"lesion_id": test.lesion_id, **{c: [0.25] * len(test) for c in CLASSES}}).to_csv(pred, index=False)
    plain = read_prediction_csv(pred)
    _bom_crlf(pred)
    pd.testing.assert_frame_equal(read_prediction_csv(pred), plain)
    out = subprocess.run([sys.executable, "-m", "src.scoring", str(pred), str(pred)], cwd=REPO, capture_output=True,
                         text=True)
    assert "not 0 or 1" in out.stderr                  # read fine; scored as truth it is refused for its values


def test_an_empty_test_set_is_refused_naming_the_file(data):
    rows = read_rows(data / TEST_METADATA)
    write_rows(data / TEST_METADATA, rows[:1])
    with pytest.raises(DataError, match=rf"{TEST_METADATA}: line 2: no data rows"):
        load_test(data, check_images=False)
    (data / TEST_METADATA).write_text("")
    with pytest.raises(DataError, match=rf"{TEST_METADATA}: cannot be read as CSV"):
        load_test(data, check_images=False)
