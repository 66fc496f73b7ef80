"""JPEGs whose compressed data was overwritten: Pillow decodes them to wrong pixels without an error (libjpeg only
warns); the cache build and `download --verify-only` refuse them (src/jpeg.py), and intact JPEGs of every common
kind decode exactly as Pillow decodes them. Every decode turns the image upright by its EXIF orientation, and refuses
a file over the byte limit unread and one whose header declares too many pixels undecoded."""
from __future__ import annotations

import io
import re
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from src import jpeg as jpeg_mod
from src.cache import build_cache, decode_image, decode_lesion
from src.data import TRAIN_IMAGES, TRAIN_METADATA, DataError, load_train
from src.tools.download import _decode_problem, verify
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


# --- every image is decoded upright, and only within the size limits ---------------------------------------------
# How a camera stores an upright picture under each EXIF orientation (a viewer undoes it to show it upright).
STORED = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}


def upright_picture(size=(60, 40)) -> Image.Image:
    """Landscape, with a colour ramp each way and one bright quadrant: every turn and flip moves its pixels."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, np.where((xx < w // 2) & (yy < h // 2), 255, 40)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def save_turned(picture: Image.Image, path: Path, orientation: int) -> Path:
    """``picture`` stored as a camera stores it under ``orientation``, and tagged so."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    picture.transpose(STORED[orientation]).save(path, "JPEG", quality=100, exif=exif)
    return path


def mad(a, b) -> float:
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean())


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_an_image_is_decoded_upright_as_a_viewer_shows_it(tmp_path, orientation):
    picture = upright_picture()
    picture.save(tmp_path / "upright.jpg", "JPEG", quality=100)
    turned = save_turned(picture, tmp_path / "turned.jpg", orientation)
    with Image.open(turned) as im:
        assert mad(ImageOps.exif_transpose(im), picture) < 3                 # what a viewer shows
        as_stored = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.LANCZOS))
    upright = decode_image(str(tmp_path / "upright.jpg"), 32)
    assert mad(as_stored, upright) > 25                                      # the pixels as stored are not it
    assert mad(decode_image(str(turned), 32), upright) < 3                   # the cache's and predict's decode
    with jpeg_mod.decode(turned) as full:                                    # verification's decode, in full
        assert full.size == (60, 40) and mad(full, picture) < 3


def test_a_draft_asks_for_the_upright_size(tmp_path):
    picture = upright_picture((600, 450))
    picture.save(tmp_path / "upright.jpg", "JPEG", quality=95)
    turned = save_turned(picture, tmp_path / "turned.jpg", 6)               # stored 450x600
    with jpeg_mod.decode(tmp_path / "upright.jpg", (300, 100)) as up, jpeg_mod.decode(turned, (300, 100)) as im:
        assert up.size == im.size == (300, 225) and mad(im, up) < 3          # not (600, 450): no 1/2 scale


def test_every_decode_goes_through_the_one_function(full_size, monkeypatch):
    image = next((full_size / TRAIN_IMAGES).glob("*/*.jpg"))
    seen = []
    real = jpeg_mod.decode
    monkeypatch.setattr(jpeg_mod, "decode", lambda path, draft=None: seen.append(str(path)) or real(path, draft))
    decode_image(str(image), 32)
    decode_lesion((0, "IL_1", str(image), str(image), 32))
    assert _decode_problem(str(image)) is None
    assert seen == [str(image)] * 4


def jpeg_declaring(width: int, height: int) -> bytes:
    """A tiny real JPEG whose frame header (SOF0) declares ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 120, 90)).save(buf, "JPEG")
    raw = bytearray(buf.getvalue())
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def refused_quickly(call, match: str) -> tuple[float, int]:
    """(seconds, peak bytes allocated) of ``call``, which must raise ImageTooLarge matching ``match``."""
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(jpeg_mod.ImageTooLarge, match=match):
        call()
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak


def test_a_file_over_the_byte_limit_is_refused_without_being_read(tmp_path, monkeypatch):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as fh:                                             # sparse: no disk used
        fh.write(jpeg_declaring(8, 6))
        fh.truncate(200 * 2**20)
    assert jpeg_mod.MAX_IMAGE_BYTES == 50 * 2**20
    why = r"209715200 bytes, over the limit of 52428800 for an image file .*set MILK10K_MAX_IMAGE_BYTES"
    seconds, peak = refused_quickly(lambda: decode_image(str(huge), 32), why)
    assert seconds < 0.5 and peak < 2**20, (seconds, peak)
    with pytest.raises(DataError, match=rf"^{huge}: refused before decoding \(lesion_id IL_1, clin_path\): {why}"):
        decode_lesion((0, "IL_1", str(huge), str(huge), 32))
    assert re.match(f"refused before decoding: {why}", _decode_problem(str(huge)))

    small = tmp_path / "small.jpg"                                           # the limit is read at each call
    small.write_bytes(jpeg_declaring(8, 6))
    monkeypatch.setenv("MILK10K_MAX_IMAGE_BYTES", str(small.stat().st_size - 1))
    refused_quickly(lambda: jpeg_mod.decode(small), f"{small.stat().st_size} bytes, over the limit of")
    monkeypatch.setenv("MILK10K_MAX_IMAGE_BYTES", str(small.stat().st_size))
    assert decode_image(str(small), 8).shape == (8, 8, 3)
    monkeypatch.setenv("MILK10K_MAX_IMAGE_BYTES", "50MB")
    refused_quickly(lambda: jpeg_mod.decode(small), "MILK10K_MAX_IMAGE_BYTES='50MB' is not a positive whole number")


@pytest.mark.parametrize("size", [(65535, 65535), (8000, 7000)])            # over Pillow's own limit, and under it
def test_a_header_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch, size):
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(jpeg_declaring(*size))

    def never(*args):
        raise AssertionError("decoding started")

    monkeypatch.setattr(jpeg_mod, "load", never)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    assert jpeg_mod.MAX_IMAGE_PIXELS == 50_000_000
    why = (rf"its header declares {size[0]}x{size[1]} pixels, over the limit of 50000000 for an image .*set "
           "MILK10K_MAX_IMAGE_PIXELS to a higher number")
    seconds, peak = refused_quickly(lambda: decode_image(str(bomb), 32), why)
    assert seconds < 0.5 and peak < 2**20, (seconds, peak)
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_declaring(8, 6))
    monkeypatch.setattr(jpeg_mod, "load", lambda img, data: img.load())   # the clinical image decodes
    with pytest.raises(DataError, match=rf"^{bomb}: refused before decoding \(lesion_id IL_1, derm_path\): {why}"):
        decode_lesion((0, "IL_1", str(good), str(bomb), 32))
    monkeypatch.setattr(jpeg_mod, "load", never)
    assert re.match(f"refused before decoding: {why}", _decode_problem(str(bomb)))
    monkeypatch.setenv("MILK10K_MAX_IMAGE_PIXELS", str(size[0] * size[1]))   # trusted: decoding starts
    with pytest.raises(AssertionError, match="decoding started"):
        jpeg_mod.decode(bomb)


def test_the_declared_size_is_read_from_every_common_kind(full_size):
    img = Image.open(next((full_size / TRAIN_IMAGES).glob("*/*.jpg"))).convert("RGB")
    for name, data in _encodings(img):
        assert jpeg_mod.frame_size(data) == (600, 450), name
    assert jpeg_mod.frame_size(b"\x89PNG\r\n") is None and jpeg_mod.frame_size(b"\xff\xd8\xff\xd9") is None


KINDS = {"baseline": {}, "optimized": {"optimize": True}, "restart markers": {"restart_marker_blocks": 4},
         "4:4:4": {"subsampling": 0},
         "progressive": {"progressive": True}}
PROGRESSIVE_GAP = pytest.mark.xfail(strict=True, reason="the last scan of a progressive JPEG refines coefficients "
                                    "already decoded; overwritten with zeros or filler it stays a valid bitstream that "
                                    "the decoder reads to its end, so where it stops shows nothing (README, Images)")


@pytest.mark.parametrize("kind", [pytest.param(k, marks=PROGRESSIVE_GAP) if k == "progressive" else k
                                  for k in KINDS])
@pytest.mark.parametrize("fill", ["zeros", "ones"])
def test_damage_in_the_last_scan_is_refused_in_every_kind_the_project_accepts(full_size, tmp_path, kind, fill):
    """Each kind of JPEG, its last scan (the only scan of a sequential JPEG) overwritten in the middle: the cache's
    decode refuses it (Pillow alone returns wrong pixels without an error), and the intact file decodes."""
    image = next((full_size / TRAIN_IMAGES).glob("*/*.jpg"))
    buf = io.BytesIO()
    with Image.open(image) as img:
        img.convert("RGB").save(buf, "JPEG", quality=90, **KINDS[kind])
    raw = buf.getvalue()
    last_scan = raw.rindex(b"\xff\xda")
    start = last_scan + (len(raw) - last_scan) // 2 - DAMAGE // 4
    blob = bytes(DAMAGE // 2) if fill == "zeros" else b"\xff\x00" * (DAMAGE // 4)
    damaged = raw[:start] + blob + raw[start + len(blob):]
    intact, broken = tmp_path / "intact.jpg", tmp_path / "broken.jpg"
    intact.write_bytes(raw)
    broken.write_bytes(damaged)
    assert decode_image(str(intact), 32).shape == (32, 32, 3)
    assert (pillow_pixels(damaged) != pillow_pixels(raw)).any()       # wrong pixels, no error
    with pytest.raises(CorruptJPEG):
        decode_image(str(broken), 32)
