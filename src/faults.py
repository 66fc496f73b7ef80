"""Named points where the crash tests inject faults (tests/test_faults.py); inert unless MILK10K_FAULT is set.

``MILK10K_FAULT="kill@POINT"`` sends this process SIGKILL the first time it reaches POINT (``kill@POINT#N``: the
N-th time); ``enospc@POINT`` raises OSError(ENOSPC) there instead, as a full disk would. POINT may hold shell-style
wildcards. The points: ``cache.lesion`` (each lesion decoded into the image cache), ``step`` (each training step),
``write:NAME`` (a file's bytes are in its temporary file, not yet renamed into place) and ``written:NAME`` (just
renamed into place), NAME being the file's name.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import signal

ENV = "MILK10K_FAULT"
_seen: dict[str, int] = {}


def point(name: str, path: str | os.PathLike | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, _, target = spec.partition("@")
    pattern, _, nth = target.partition("#")
    if not fnmatch.fnmatchcase(name, pattern):
        return
    _seen[spec] = _seen.get(spec, 0) + 1
    if _seen[spec] != int(nth or 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path is not None else name)
