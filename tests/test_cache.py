"""Prepared-image cache: layout, reuse, rebuilds, failures, worker parity."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import src.cache as cache_mod
from src.cache import HASHES, build_cache, decode_image
from src.data import DataError

SIZE = 16


def colour(i: int, view: int) -> tuple[int, int, int]:
    return (40 + 50 * view, 30 + 40 * i, 200 - 40 * i)


def write_jpeg(path: Path, rgb: tuple[int, int, int], size=(80, 60)) -> str:
    """A 4:3 JPEG: solid ``rgb`` on the left half, white on the right half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (255, 255, 255))
    img.paste(rgb, (0, 0, size[0] // 2, size[1]))
    img.save(path, format="JPEG", quality=95)
    return str(path)


@pytest.fixture
def lesions(tmp_path) -> pd.DataFrame:
    rows = []
    for i in range(4):
        lid = f"IL_{i:07d}"
        rows.append({"lesion_id": lid,
                     "clin_path": write_jpeg(tmp_path / "img" / lid / f"ISIC_{2 * i}.jpg", colour(i, 0)),
                     "derm_path": write_jpeg(tmp_path / "img" / lid / f"ISIC_{2 * i + 1}.jpg", colour(i, 1))})
    return pd.DataFrame(rows)


def cache_files(d: Path) -> list[str]:
    """The caches and their sidecars (not the image digests kept beside them, cache.HASHES)."""
    return sorted(p.name for p in d.iterdir() if p.name != HASHES) if d.exists() else []


def test_shape_order_views_and_squash(lesions, tmp_path):
    arr = build_cache(lesions, SIZE, tmp_path / "cache", "train", progress=False)
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint8 and arr.shape == (4, 2, SIZE, SIZE, 3)
    assert not arr.flags.writeable
    for i in range(4):
        for v in range(2):
            left, right = arr[i, v, :, : SIZE // 2 - 2], arr[i, v, :, SIZE // 2 + 2:]
            np.testing.assert_allclose(left.reshape(-1, 3).mean(0), colour(i, v), atol=6)
            assert right.min() > 240  # the 4:3 image fills the whole square: squashed, not cropped
    names = cache_files(tmp_path / "cache")
    assert len(names) == 2 and names[0].startswith(f"train_{SIZE}_") and names[0].endswith(".json")
    assert names[1] == names[0][:-5] + ".npy"
    assert (tmp_path / "cache" / HASHES).is_file()                # the JPEGs' digests, beside the caches


def test_reuse_does_not_decode(lesions, tmp_path, monkeypatch):
    first = np.array(build_cache(lesions, SIZE, tmp_path / "c", "train", progress=False))
    files = cache_files(tmp_path / "c")

    def fail(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "decode_image", fail)
    np.testing.assert_array_equal(build_cache(lesions, SIZE, tmp_path / "c", "train", progress=False), first)
    assert cache_files(tmp_path / "c") == files
    with pytest.raises(AssertionError, match="decoded again"):  # the patch is live: a new key would decode
        build_cache(lesions.iloc[::-1], SIZE, tmp_path / "c", "train", progress=False)


def test_rebuild_on_size_and_source_change(lesions, tmp_path):
    d = tmp_path / "c"
    build_cache(lesions, SIZE, d, "train", progress=False)
    old = cache_files(d)
    other = build_cache(lesions, 24, d, "train", progress=False)
    assert other.shape[2:4] == (24, 24) and set(old) < set(cache_files(d))  # other sizes are kept

    st = os.stat(lesions.clin_path[1])
    os.utime(lesions.clin_path[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    build_cache(lesions, SIZE, d, "train", progress=False)
    assert [n for n in cache_files(d) if n.startswith(f"train_{SIZE}_")] == old  # touched, same content: same key
    Image.new("RGB", (80, 60), (9, 9, 9)).save(lesions.clin_path[1], format="JPEG")
    build_cache(lesions, SIZE, d, "train", progress=False)
    after_change = [n for n in cache_files(d) if n.startswith(f"train_{SIZE}_")]
    assert len(after_change) == 2 and not set(after_change) & set(old)  # new key, stale pair removed

    write_jpeg(Path(lesions.derm_path[2]), (0, 0, 0))
    arr = build_cache(lesions, SIZE, d, "train", progress=False)
    assert arr[2, 1, :, :4].max() < 10 and len([n for n in cache_files(d) if n.startswith(f"train_{SIZE}_")]) == 2
    build_cache(lesions, SIZE, d, "test", progress=False)
    assert len(cache_files(d)) == 6  # train@16, train@24, test@16: npy + json each


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_or_missing_jpeg_names_file_and_lesion(lesions, tmp_path, workers):
    bad = Path(lesions.derm_path[2])
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(DataError, match=rf"{bad.name}.*IL_0000002.*derm_path"):
        build_cache(lesions, SIZE, tmp_path / "c", "train", num_workers=workers, progress=False)
    assert cache_files(tmp_path / "c") == []  # no partial or temporary file left behind

    bad.write_bytes(b"\x89PNG not a jpeg at all")
    with pytest.raises(DataError, match=rf"{bad.name}.*IL_0000002"):
        build_cache(lesions, SIZE, tmp_path / "c", "train", num_workers=workers, progress=False)
    bad.unlink()
    with pytest.raises(DataError, match=rf"{bad.name}.*IL_0000002"):
        build_cache(lesions, SIZE, tmp_path / "c", "train", num_workers=workers, progress=False)
    assert cache_files(tmp_path / "c") == []


def test_png_under_jpg_name_is_refused(lesions, tmp_path):
    Image.new("RGB", (8, 6)).save(lesions.clin_path[0], format="PNG")
    with pytest.raises(DataError, match="IL_0000000.*clin_path.*not JPEG"):
        build_cache(lesions, SIZE, tmp_path / "c", "train", progress=False)


def test_workers_give_the_same_bytes(lesions, tmp_path):
    serial = build_cache(lesions, SIZE, tmp_path / "a", "train", num_workers=0, progress=False)
    pooled = build_cache(lesions, SIZE, tmp_path / "b", "train", num_workers=2, progress=False)
    np.testing.assert_array_equal(serial, pooled)
    assert cache_files(tmp_path / "a") == cache_files(tmp_path / "b")


def test_decode_image_downscales_a_full_size_frame(tmp_path):
    path = write_jpeg(tmp_path / "big.jpg", (10, 120, 200), size=(600, 450))
    out = decode_image(path, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out[:, :28].reshape(-1, 3).mean(0), (10, 120, 200), atol=4)


def test_temp_files_of_killed_builds_are_removed_by_the_next_build(tmp_path, mini_data):
    import subprocess

    from src.data import load_train
    from src.io_utils import HOST

    gone = subprocess.Popen(["true"])
    gone.wait()                                              # a process that no longer exists
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    dead = cache_dir / f".train_32_0123456789abcdef.npy.{HOST}.{gone.pid}.abc123_x.tmp"
    live = cache_dir / f".train_32_0123456789abcdef.npy.{HOST}.{os.getpid()}.def456_y.tmp"
    elsewhere = cache_dir / f".train_32_0123456789abcdef.npy.otherhost.{gone.pid}.ghi789_z.tmp"
    for f in (dead, live, elsewhere):
        f.write_bytes(b"partial")
    build_cache(load_train(mini_data).iloc[:4], 32, cache_dir, "train")
    assert not dead.exists()                                 # its writer is gone
    assert live.exists() and elsewhere.exists()              # a live writer's, or another host's: left alone


def test_a_full_disk_is_a_clear_error_before_any_pixel_is_written(tmp_path, mini_data, monkeypatch):
    import errno

    from src.data import load_train
    from src.preflight import SetupError

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(SetupError, match=r"not enough free disk space .* free space there or point cache_dir="):
        build_cache(load_train(mini_data).iloc[:4], 32, tmp_path, "train")
    assert cache_files(tmp_path) == []                       # no temporary or partial cache left


@pytest.mark.parametrize("damage", ["truncated", "grown", "header"])
def test_a_damaged_cache_file_is_rebuilt_with_a_line_saying_so(lesions, tmp_path, capsys, damage):
    d = tmp_path / "c"
    first = np.array(build_cache(lesions, SIZE, d, "train", progress=False))
    (npy,) = d.glob("*.npy")
    raw = npy.read_bytes()
    npy.write_bytes({"truncated": raw[: len(raw) // 2], "grown": raw + bytes(100),
                     "header": b"\x93NUMPY garbage" + raw[14:]}[damage])
    capsys.readouterr()
    again = build_cache(lesions, SIZE, d, "train", progress=False)
    np.testing.assert_array_equal(again, first)
    assert npy.read_bytes() == raw and cache_files(d) == [npy.name[:-4] + ".json", npy.name]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"[cache] {npy}: ") and out[0].endswith("; rebuilding it"), out


def _mark_or_fail(item):
    """A pool task: item 0 fails at once, every other leaves a file after a short wait."""
    import time

    folder, i = item
    if i == 0:
        raise ValueError("lesion 0 is damaged")
    time.sleep(0.05)
    (folder / f"{i}.done").touch()


def test_after_one_task_fails_the_pools_remaining_tasks_do_not_run(tmp_path):
    from src.io_utils import worker_pool

    with pytest.raises(ValueError, match="lesion 0 is damaged"):
        with worker_pool(2) as imap:
            for _ in imap(_mark_or_fail, [(tmp_path, i) for i in range(200)]):
                pass
    ran = len(list(tmp_path.glob("*.done")))       # all 199 would take 5 s on two workers
    assert ran < 40, ran
