"""Decode every JPEG once: a uint8 array ``(n_lesions, 2, size, size, 3)`` on disk, memory-mapped.

Index 0 of axis 1 is the clinical close-up, 1 the dermoscopic image; rows follow the lesion table.
The file name carries a short hash of everything the pixels depend on (lesion ids, image paths, each file's
content digest (io_utils.file_digests: a file is re-read only when its size, times or inode change), the size, the
decoder version CACHE_VERSION), so a changed source or size builds a new file and an unchanged one, touched or not,
is reused without decoding. CACHE_VERSION changes whenever the decoded pixels do: version 2 turns each image upright
by its EXIF orientation, so every cache built before it is rebuilt once after upgrading. A build writes a temporary
file and renames it at the end: an interrupted build never leaves a usable-looking cache; a cache file whose size or
header does not match its shape (truncated, overwritten) is rebuilt, with a line saying so.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from . import faults, jpeg
from .data import DataError
from .io_utils import atomic_write, atomic_write_json, file_digests, worker_pool

CACHE_VERSION = "2:exif-upright,draft+lanczos,squash"
VIEWS = ("clin", "derm")


def decode_image(path: str, size: int) -> np.ndarray:
    """One JPEG as uint8 ``(size, size, 3)``: upright as a viewer shows it (EXIF orientation), DCT-domain
    downscale, RGB, squashed to a square (``jpeg.decode``). Damaged compressed data (which Pillow alone decodes to
    wrong pixels without an error) raises ``jpeg.CorruptJPEG``; a file or a declared size over the limits,
    ``jpeg.ImageTooLarge``."""
    with jpeg.decode(path, (size, size)) as rgb:
        return np.asarray(rgb.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def decode_lesion(job: tuple[int, str, str, str, int]) -> tuple[int, np.ndarray]:
    i, lesion_id, clin, derm, size = job
    out = np.empty((2, size, size, 3), dtype=np.uint8)
    for v, path in enumerate((clin, derm)):
        try:
            out[v] = decode_image(path, size)
        except jpeg.ImageTooLarge as err:
            raise DataError(f"{path}: refused before decoding (lesion_id {lesion_id}, {VIEWS[v]}_path): "
                            f"{err}") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: not a decodable JPEG (lesion_id {lesion_id}, {VIEWS[v]}_path): {err}; "
                            "`bash run.sh download --verify-only --dest <data_dir>` lists every broken image, "
                            "then replace them (re-download with --force)") from None
    return i, out


HASHES = "image_hashes.json"  # beside the caches: each JPEG's content digest, re-read only when the file changes


def _cache_key(lesions: pd.DataFrame, size: int, cache_dir: Path) -> str:
    rows = list(zip(lesions["lesion_id"], lesions["clin_path"], lesions["derm_path"]))
    try:
        digests = iter(file_digests([p for _, clin, derm in rows for p in (clin, derm)], cache_dir / HASHES))
    except OSError as err:
        where = next(((path, lid, v) for lid, clin, derm in rows for v, path in zip(VIEWS, (clin, derm))
                      if os.path.abspath(path) == os.path.abspath(err.filename or "")), (err.filename, "?", "?"))
        raise DataError(f"{where[0]}: image file not found or unreadable (lesion_id {where[1]}, {where[2]}_path): "
                        f"{err.strerror or err}") from None
    h = hashlib.sha256(f"{CACHE_VERSION}|{size}".encode())
    for lesion_id, clin, derm in rows:
        h.update(f"|{lesion_id}|{clin}|{next(digests)}|{derm}|{next(digests)}".encode())
    return h.hexdigest()[:16]


def _damage(path: Path, shape: tuple[int, ...]) -> str | None:
    """Why the cache file at ``path`` cannot be used as a uint8 array of ``shape`` (None: it can): an unreadable
    header, another shape or dtype, or a size other than its header's (a truncated or overwritten file)."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version not in readers:
                return f"unknown .npy format version {version}"
            stored, fortran, dtype = readers[version](fh)
            expected = fh.tell() + int(np.prod(stored, dtype=np.int64)) * dtype.itemsize
        size = os.path.getsize(path)
    except (OSError, ValueError, EOFError) as err:
        return f"unreadable header ({err})"
    if tuple(stored) != shape or dtype != np.uint8 or fortran:
        return f"holds {dtype} {tuple(stored)}, expected uint8 {shape}"
    if size != expected:
        return f"{size} bytes where its header needs {expected}"
    return None


def _reserve(tmp: str, what: str) -> None:
    """Allocate the whole file on disk before it is memory-mapped: a full disk is then a clear error here, not a
    SIGBUS from a page written later."""
    size = os.path.getsize(tmp)
    with open(tmp, "rb+") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                from .preflight import SetupError

                raise SetupError(f"{Path(tmp).parent}: not enough free disk space for the {what} "
                                 f"({size / 2**30:.2f} GiB): free space there or point cache_dir= at another "
                                 "disk") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


@contextmanager
def _sigterm_as_interrupt():
    """While the block runs, SIGTERM in this process raises KeyboardInterrupt, as Ctrl-C does: the build stops with
    one line and its temporary file is removed (the default action would kill the process on the spot, leaving the
    file and orphaned workers printing tracebacks)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    parent = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != parent:  # a decode worker forked before its own handler is set
            raise SystemExit(0)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _fill(tmp: str, jobs: list[tuple[int, str, str, str, int]], shape: tuple[int, ...], num_workers: int,
          desc: str, progress: bool) -> None:
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    _reserve(tmp, desc)
    with _sigterm_as_interrupt(), tqdm(total=len(jobs), desc=desc, unit="lesion",
                                       disable=None if progress else True) as bar:
        if num_workers > 1:
            chunk = max(1, min(64, len(jobs) // (num_workers * 8)))
            with worker_pool(num_workers) as imap:
                for i, pair in imap(decode_lesion, jobs, chunk):
                    faults.point("cache.lesion", tmp)
                    arr[i] = pair
                    bar.update()
        else:
            for job in jobs:
                i, pair = decode_lesion(job)
                faults.point("cache.lesion", tmp)
                arr[i] = pair
                bar.update()
    arr.flush()
    del arr


def build_cache(lesions: pd.DataFrame, size: int, cache_dir: str | os.PathLike, split: str,
                num_workers: int = 0, progress: bool = True) -> np.memmap:
    """Return the read-only cache of ``lesions`` at ``size`` px, building it if needed.

    Files: ``<cache_dir>/<split>_<size>_<key>.npy`` plus a ``.json`` manifest.  Older files of the
    same split and size are removed after a build.  ``num_workers > 1`` decodes in a process pool.
    """
    missing = [c for c in ("lesion_id", "clin_path", "derm_path") if c not in lesions.columns]
    if missing:
        raise DataError(f"build_cache: lesion table lacks column(s) {missing}")
    if len(lesions) == 0:
        raise DataError(f"build_cache: no lesions to cache for split {split!r}")
    if not re.fullmatch(r"[A-Za-z0-9-]+", split):
        raise ValueError(f"build_cache: split {split!r} must be letters, digits or '-'")
    cache_dir = Path(cache_dir)
    key = _cache_key(lesions, size, Path(cache_dir))
    stem = f"{split}_{size}_{key}"
    path = cache_dir / f"{stem}.npy"
    shape = (len(lesions), 2, size, size, 3)
    if path.exists():
        damage = _damage(path, shape)
        if damage is None:
            return np.load(path, mmap_mode="r")
        print(f"[cache] {path}: {damage} (truncated or damaged); rebuilding it", flush=True)
        path.unlink(missing_ok=True)

    jobs = [(i, str(lid), str(c), str(d), size)
            for i, (lid, c, d) in enumerate(zip(lesions["lesion_id"], lesions["clin_path"], lesions["derm_path"]))]
    start = time.time()
    atomic_write(path, lambda tmp: _fill(tmp, jobs, shape, num_workers, f"cache {split} {size}px", progress))
    if progress:
        print(f"[cache] {split} {size}px: {len(jobs)} lesions decoded in {time.time() - start:.0f}s -> {path}",
              flush=True)
    atomic_write_json(cache_dir / f"{stem}.json", {
        "version": CACHE_VERSION, "key": key, "split": split, "size": size, "shape": list(shape),
        "dtype": "uint8", "views": list(VIEWS), "build_seconds": round(time.time() - start, 1),
        "lesion_ids": [j[1] for j in jobs],
    })
    stale = re.compile(rf"{re.escape(split)}_{size}_[0-9a-f]{{16}}\.(npy|json)")
    for old in cache_dir.iterdir():
        if stale.fullmatch(old.name) and not old.name.startswith(stem + "."):
            old.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")
