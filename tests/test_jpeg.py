"""JPEGs whose compressed data was overwritten: Pillow decodes them to wrong pixels without an error (libjpeg only
warns); the cache build and `download --verify-only` refuse them (src/jpeg.py), and intact JPEGs of every common
kind decode exactly as Pillow decodes them."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.cache import build_cache, decode_image
from src.data import TRAIN_IMAGES, TRAIN_METADATA, DataError, load_train
from src.tools.download import verify
from src.jpeg import CorruptJPEG, load, open_image
from src.tools.synth import generate

from .conftest import get_field

N_TRAIN, N_TEST = 4, 2
DAMAGE = 2000


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few lesions with 600x450 JPEGs, the size of the rehearsal images (about 60 KB each)."""
    return generate(tmp_path_factory.mktemp("jpeg") / "data", n_train=N_TRAIN, n_test=N_TEST, seed=3,
                    image_size=(600, 450))


def overwrite_middle(raw: bytes, fill: str, size: int = DAMAGE) -> bytes:
    start = len(raw) // 2 - size // 2
    blob = {"zeros": bytes(size), "ones": b"\xff\x00" * (size // 2),
            "random": np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes()}[fill]
    return raw[:start] + blob + raw[start + size:]


def pillow_pixels(data: bytes, draft=None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        if draft:
            img.draft("RGB", draft)
        img.load()
        return np.asarray(img)


def strict_pixels(data: bytes, draft=None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        if draft:
            img.draft("RGB", draft)
        load(img, data)
        return np.asarray(img)


@pytest.mark.parametrize("fill", ["zeros", "ones", "random"])
def test_overwritten_scan_data_is_named_by_the_cache_build_and_by_verification(full_size, tmp_path, fill):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(full_size, data)
    lesion, isic = get_field(data / TRAIN_METADATA, 3, "lesion_id"), get_field(data / TRAIN_METADATA, 3, "isic_id")
    image = data / TRAIN_IMAGES / lesion / f"{isic}.jpg"
    raw = image.read_bytes()
    assert len(raw) > 4 * DAMAGE
    image.write_bytes(overwrite_middle(raw, fill))
    damaged = pillow_pixels(image.read_bytes())                   # Pillow alone: no error, wrong pixels
    assert np.abs(damaged.astype(int) - pillow_pixels(raw)).mean() > 1

    with pytest.raises(CorruptJPEG, match="corrupt JPEG data"):
        decode_image(str(image), 32)
    train = load_train(data)
    with pytest.raises(DataError, match=rf"{image.name}: not a decodable JPEG \(lesion_id {lesion}, .*corrupt JPEG "
                                        r"data.*download --verify-only"):
        build_cache(train, 32, tmp_path / "cache", "train")
    assert not list((tmp_path / "cache").glob("*.npy"))

    counts = {"MILK10k_Training_Input.zip": 2 * N_TRAIN, "MILK10k_Test_Input.zip": 2 * N_TEST}
    problems = verify(data, list(counts), counts)
    assert len(problems) == 1, problems
    assert str(image) in problems[0] and "do not decode" in problems[0] and "CorruptJPEG" in problems[0]
    assert "--force" in problems[0]


def test_damage_anywhere_in_the_scan_is_found(full_size):
    raw = next((full_size / TRAIN_IMAGES).glob("*/*.jpg")).read_bytes()
    sos = raw.index(b"\xff\xda")
    for start in np.linspace(sos + 400, len(raw) - DAMAGE - 10, 12).astype(int):
        for blob in (bytes(DAMAGE), b"\xff\x00" * (DAMAGE // 2)):
            with pytest.raises(CorruptJPEG):
                strict_pixels(raw[:start] + blob + raw[start + DAMAGE:], (32, 32))


def _encodings(img: Image.Image):
    for name, kw in {"baseline": {}, "progressive": {"progressive": True}, "optimized": {"optimize": True},
                     "4:4:4": {"subsampling": 0}, "quality 100": {"quality": 100},
                     "restart markers": {"restart_marker_blocks": 3}, "comment": {"comment": b"x" * 40}}.items():
        buf = io.BytesIO()
        img.save(buf, "JPEG", **kw)
        yield name, buf.getvalue()
    for mode in ("L", "CMYK"):
        for progressive in (False, True):
            buf = io.BytesIO()
            img.convert(mode).save(buf, "JPEG", progressive=progressive)
            yield f"{mode} progressive={progressive}", buf.getvalue()


def test_intact_jpegs_of_every_common_kind_decode_as_pillow_decodes_them(full_size):
    img = Image.open(next((full_size / TRAIN_IMAGES).glob("*/*.jpg"))).convert("RGB")
    for name, data in _encodings(img):
        variants = {"": data, "+ data after the end": data + b"\x00trailer" * 20,
                    "+ fill bytes before the end": data[:-2] + b"\xff\xff\xff\xd9"}
        for what, d in variants.items():
            for draft in (None, (32, 32), (150, 150)):
                np.testing.assert_array_equal(strict_pixels(d, draft), pillow_pixels(d, draft),
                                              err_msg=f"{name} {what} draft={draft}")


def test_a_restart_marker_out_of_sequence_is_refused(full_size):
    img = Image.open(next((full_size / TRAIN_IMAGES).glob("*/*.jpg"))).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", restart_marker_rows=1)
    raw = buf.getvalue()
    at = raw.index(b"\xff\xd2")                                  # RST2 lost, as an overwrite would lose it
    with pytest.raises(CorruptJPEG, match="restart marker RST3 .* where RST2 was due"):
        strict_pixels(raw[:at] + b"\x00\x00" + raw[at + 2:])


def test_a_truncated_or_unreadable_file_fails_as_pillow_fails(full_size, tmp_path):
    raw = next((full_size / TRAIN_IMAGES).glob("*/*.jpg")).read_bytes()
    with pytest.raises(OSError, match="image file is truncated"):
        strict_pixels(raw[: len(raw) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(OSError, match=r"cannot identify image file '.*empty\.jpg'"):
        open_image(tmp_path / "empty.jpg")
