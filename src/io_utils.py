"""Atomic file writes: a reader never sees a half-written file, and a failure leaves the old one.

A write goes to a temporary sibling named ``.<name>.<host>.<pid>.<random>.tmp`` and is renamed into place once
complete. A failed write removes its temporary file; one left by a killed process (SIGKILL, power loss) is removed
by the next write into the same folder once its process, on this host, is gone.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from . import faults

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp")


def new_file_mode() -> int:
    """The permissions an ordinary new file gets under the current umask (temp files start at 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename."""
    path = Path(path)
    atomic_write_many({path: write})
    return path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files in ``folder`` whose writing process (on this host) no longer exists."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if m and m["host"] == HOST and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:
                pass
    return removed


def temp_path(path: Path) -> str:
    """A new, empty temporary sibling of ``path`` named for this host and process."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def atomic_write_many(files: dict[Path, Callable[[str], None]]) -> None:
    """Write every file to a temporary sibling (``write(tmp_path)``, then fsync), and only when all are written
    rename them into place; any failure leaves every old file as it was and no temporary file behind."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_abandoned_temps(path.parent)
            tmp = temp_path(path)
            staged.append((tmp, path))
            write(tmp)
            faults.point(f"write:{path.name}", path)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, new_file_mode())
        for tmp, path in staged:
            os.replace(tmp, path)
            faults.point(f"written:{path.name}", path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, _w)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_write_csv(path: str | os.PathLike, df, **kwargs) -> Path:
    """Write a DataFrame so floats round-trip exactly: shortest ``repr``, which always keeps a '.' or an
    exponent, so a column of exact zeros still reads back as floats (the leaderboard refuses integer columns)."""
    kwargs.setdefault("index", False)
    kwargs.setdefault("float_format", _float_repr)
    return atomic_write(path, lambda tmp: df.to_csv(tmp, **kwargs))


def _float_repr(x) -> str:
    return repr(float(x))


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------------------------------
# content digests of files, kept between runs
# ----------------------------------------------------------------------------------------------------
HASH_STORE_ENV = "MILK10K_HASH_STORE"
_digest_memo: dict[str, tuple[list[int], str]] = {}


def hash_store_path() -> Path:
    """Where ``file_digests`` keeps what it has read: $MILK10K_HASH_STORE, else
    ``$XDG_CACHE_HOME/milk10k/file_hashes.json`` (``~/.cache/milk10k/...``)."""
    if os.environ.get(HASH_STORE_ENV):
        return Path(os.environ[HASH_STORE_ENV])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "milk10k" / "file_hashes.json"


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime and inode too: a replacement that keeps size and mtime (cp -p, rsync -t) still changes them
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_digests(paths, store: str | os.PathLike | None = None) -> list[str]:
    """The SHA-256 (hex) of each file's content, in order. Each digest is kept in ``store`` (default
    ``hash_store_path()``; JSON: absolute path -> size, mtime, ctime, inode and digest) and the file is read again only
    when one of those changed: a touched file is re-hashed (same digest), a replaced one gets its new digest. A store
    that cannot be read or written is ignored (the digests are then computed, and kept for this process only).
    Missing files raise OSError."""
    store = Path(store) if store is not None else hash_store_path()
    try:
        saved = json.loads(store.read_text(encoding="utf-8"))
        saved = saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        saved = {}
    out, changed = [], False
    for p in paths:
        key = os.path.abspath(p)
        stat = _stat_key(os.stat(key))
        entry = saved.get(key)
        if isinstance(entry, dict) and entry.get("stat") == stat and isinstance(entry.get("sha256"), str):
            digest = entry["sha256"]
        else:
            memo = _digest_memo.get(key)
            digest = memo[1] if memo is not None and memo[0] == stat else sha256_file(key)
            saved[key] = {"stat": stat, "sha256": digest}
            changed = True
        _digest_memo[key] = (stat, digest)
        out.append(digest)
    if changed:
        saved = {k: v for k, v in saved.items() if os.path.exists(k)}  # forget files that are gone
        try:
            atomic_write_text(store, json.dumps(saved, separators=(",", ":")) + "\n")
        except OSError:
            pass
    return out


# ----------------------------------------------------------------------------------------------------
# worker processes
# ----------------------------------------------------------------------------------------------------
_STOP = None  # in a pool worker: the event that turns its remaining tasks into no-ops


def _pool_worker(stop) -> None:
    """A pool worker leaves SIGINT and SIGTERM to its parent, which stops the pool, and skips its remaining tasks
    once ``stop`` is set."""
    global _STOP
    import signal

    _STOP = stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _unless_stopped(task):
    fn, item = task
    return None if _STOP.is_set() else fn(item)


@contextmanager
def worker_pool(workers: int) -> Iterator[Callable]:
    """``imap(fn, items, chunksize)`` over ``workers`` processes: ``fn(item)`` of every item, results as they come.
    Leaving the block, however it is left (an error from a task, Ctrl-C, SIGTERM as Ctrl-C), turns the remaining
    tasks into no-ops and waits for the workers to end: the pool is never terminated by signals, which can kill a
    worker holding one of the pool's queue locks and leave the parent waiting for it forever."""
    import multiprocessing

    stop = multiprocessing.Event()
    pool = multiprocessing.Pool(workers, initializer=_pool_worker, initargs=(stop,))
    try:
        yield lambda fn, items, chunksize=1: pool.imap_unordered(_unless_stopped, ((fn, x) for x in items),
                                                                 chunksize=chunksize)
    finally:
        stop.set()
        pool.close()
        pool.join()
