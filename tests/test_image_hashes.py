"""The images' part of a result's fingerprint is their content (SHA-256), kept between runs so that a start costs a
stat per image: a same-size replacement is noticed, a `touch` is neither a refusal nor a new image cache."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import src.cache as cache_mod
import src.io_utils as io_utils
from src.cache import build_cache
from src.config import load_config
from src.experiment import data_fingerprint, load_lesions

from .conftest import tiny


@pytest.fixture
def data(mini_data, tmp_path, monkeypatch) -> Path:
    """A private copy of the mini data, and a private digest store (MILK10K_HASH_STORE)."""
    monkeypatch.setenv("MILK10K_HASH_STORE", str(tmp_path / "store" / "file_hashes.json"))
    out = tmp_path / "data"
    shutil.copytree(mini_data, out)
    return out


def _lesions(data, tmp_path):
    return load_lesions(load_config("exp001", tiny(data, tmp_path / "out")), check_images=True)


def _count_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    real = io_utils.sha256_file
    monkeypatch.setattr(io_utils, "sha256_file", lambda path: reads.append(path) or real(path))
    return reads


def test_an_image_replaced_by_another_of_the_same_size_changes_the_fingerprint(data, tmp_path):
    lesions = _lesions(data, tmp_path)
    before = data_fingerprint(lesions, images=True)
    image = Path(lesions.train["derm_path"].iloc[5])
    st = image.stat()
    raw = bytearray(image.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                       # another picture of exactly the same size ...
    image.write_bytes(bytes(raw))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))   # ... with the old time, as `cp -p` or `rsync -t` leave it
    assert image.stat().st_size == st.st_size
    after = data_fingerprint(lesions, images=True)
    assert after != before
    assert [k for k in after if after[k] != before.get(k)] == ["image contents"]


def test_a_touched_image_keeps_the_fingerprint_and_the_cache_and_is_read_once(data, tmp_path, monkeypatch):
    lesions = _lesions(data, tmp_path)
    before = data_fingerprint(lesions, images=True)
    cache = build_cache(lesions.train, 32, tmp_path / "cache", "train", progress=False)
    (npy,) = (tmp_path / "cache").glob("*.npy")
    built = npy.stat()

    reads = _count_reads(monkeypatch)

    def no_decode(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "decode_image", no_decode)
    assert data_fingerprint(lesions, images=True) == before and reads == []   # a start: a stat per image
    image = Path(lesions.train["clin_path"].iloc[3])
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 5 * 10**9))   # touch
    assert data_fingerprint(lesions, images=True) == before
    again = build_cache(lesions.train, 32, tmp_path / "cache", "train", progress=False)
    np.testing.assert_array_equal(again, cache)
    assert reads == [os.path.abspath(image)]          # re-hashed once (kept for the cache build), never re-decoded
    assert [p.name for p in (tmp_path / "cache").glob("*.npy")] == [npy.name]
    assert (npy.stat().st_ino, npy.stat().st_mtime_ns) == (built.st_ino, built.st_mtime_ns)


def test_the_store_keeps_only_files_that_exist_and_an_unusable_store_is_no_error(data, tmp_path, monkeypatch):
    lesions = _lesions(data, tmp_path)
    paths = [str(p) for p in lesions.train["clin_path"].iloc[:3]]
    store = io_utils.hash_store_path()
    first = io_utils.file_digests(paths)
    saved = json.loads(store.read_text())
    assert sorted(saved) == sorted(os.path.abspath(p) for p in paths)
    import hashlib

    assert first == [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
    os.unlink(paths[0])
    io_utils.file_digests(paths[1:] + [str(lesions.train["derm_path"].iloc[0])])
    assert os.path.abspath(paths[0]) not in json.loads(store.read_text())

    store.unlink()
    store.mkdir()                                   # a folder where the store should be: digests still come
    monkeypatch.setattr(io_utils, "_digest_memo", {})
    assert io_utils.file_digests(paths[1:]) == first[1:]
    store.rmdir()
    store.write_text("{not json")                   # a damaged store is read as empty and rewritten
    assert io_utils.file_digests(paths[1:]) == first[1:]
    assert len(json.loads(store.read_text())) == 2


def test_folds_saved_with_the_older_size_fingerprint_are_not_refused(data, tmp_path):
    from src.experiment import fingerprint_differences

    current = {"settings": {"lr": 1e-3}, "data": data_fingerprint(_lesions(data, tmp_path), images=True)}
    older = {"settings": {"lr": 1e-3}, "data": {k: v for k, v in current["data"].items() if k != "image contents"}}
    older["data"]["images"] = "0123456789abcdef"          # what fingerprints held before: a digest of the sizes
    assert fingerprint_differences(older, current) == []
    changed = {"settings": current["settings"], "data": {**current["data"], "image contents": "0" * 16}}
    assert fingerprint_differences(changed, current) == ["the image contents differ"]
