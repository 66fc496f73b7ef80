"""What a command may overwrite at a path the user chose: nothing, or a file of the same kind this project writes.

A command that writes a CSV or JSON file to a user-given path (predict ``--out``, blend ``--name``, spread) first
looks at what stands there: a file of that kind (a CSV with the project's header on line 1, a JSON object with the
project's fields) is replaced, anything else is refused with one line naming it, so a user's own file is never
overwritten. Nothing is written into an experiment's output folder (``experiment_folder``) by predict or export.
Export's folders are checked by src/deliver/export.py (``check_out``, against the manifest).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

READ_AT_MOST = 1 << 16   # line 1 of a CSV is read up to this many bytes (the project's headers are under 200)
JSON_AT_MOST = 64 << 20   # a JSON file is read whole up to this size (a sidecar or a spread is under 1 MiB)


class NotOurs(ValueError):
    """A file stands where a command would write, and this project did not write it."""


def replaceable_csv(path: Path, header: Sequence[str], fix: str) -> None:
    """Refuse ``path`` unless nothing stands there or a CSV whose line 1 is ``header`` (a byte-order mark and CRLF
    allowed). ``fix`` ends the message (e.g. 'choose another --out')."""
    if not _exists(path, fix):
        return
    with open(path, "rb") as fh:
        first = fh.read(READ_AT_MOST).split(b"\n", 1)[0].rstrip(b"\r").removeprefix(b"\xef\xbb\xbf")
    if first.decode("utf-8", "replace") != ",".join(header):
        shown = first[:60].decode("utf-8", "replace")
        raise NotOurs(f"{path}: a file this project did not write stands there (line 1 is {shown!r}, not the header "
                      f"{','.join(header[:3])},... that it writes); it is not overwritten: {fix}")


def replaceable_json(path: Path, fields: Sequence[str], fix: str) -> None:
    """Refuse ``path`` unless nothing stands there or a JSON object holding every one of ``fields``."""
    if not _exists(path, fix):
        return
    try:
        if path.stat().st_size > JSON_AT_MOST:
            raise ValueError("too large")
        obj = json.loads(path.read_text(encoding="utf-8"))
        missing = [f for f in fields if f not in obj] if isinstance(obj, dict) else list(fields)
    except (ValueError, UnicodeDecodeError) as exc:
        missing = [f"readable JSON: {type(exc).__name__}"]
    if missing:
        raise NotOurs(f"{path}: a file this project did not write stands there (no {missing[0]!r}); it is not "
                      f"overwritten: {fix}")


def experiment_folder(path: Path) -> Path | None:
    """The experiment output folder (one holding config.json and fold0/) that ``path`` is or lies inside, if any."""
    where = Path(path).resolve()
    return next((p for p in [where, *where.parents] if (p / "config.json").is_file() and (p / "fold0").is_dir()),
                None)


def _exists(path: Path, fix: str) -> bool:
    if path.is_symlink() or path.is_dir():
        kind = "symbolic link" if path.is_symlink() else "folder"
        raise NotOurs(f"{path}: a {kind} stands where a file would be written; it is not replaced: {fix}")
    return path.exists()
