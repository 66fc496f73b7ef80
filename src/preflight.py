"""Checks made before anything expensive starts: every folder a run writes to is writable, the device exists, and
the backbone's weights can be had. Each failure is one ``SetupError`` line saying what to do."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .config import Config


class SetupError(RuntimeError):
    """The environment cannot run this: a folder that cannot be written, a device that is not there."""


def os_error_text(exc: OSError) -> str:
    """'<path>: <reason>' with what to do for the errors a user can fix (disk full, read-only, permissions)."""
    what = {errno.ENOSPC: "the disk is full: free space there or point the folder elsewhere",
            errno.EDQUOT: "the disk quota is exhausted: free space or point the folder elsewhere",
            errno.EROFS: "the file system is read-only: point the folder elsewhere",
            errno.EACCES: "permission denied: fix its permissions or point the folder elsewhere",
            errno.EPERM: "operation not permitted: fix its permissions or point the folder elsewhere",
            errno.ENOTDIR: "a file stands where a folder is needed: move it or point the folder elsewhere",
            errno.EEXIST: "a file stands where a folder is needed: move it or point the folder elsewhere"}
    reason = what.get(exc.errno, exc.strerror or str(exc))
    where = exc.filename if exc.filename is not None else "a file"
    return f"{where}: {reason}"


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """Create ``folder`` if needed and write (then remove) a small file in it."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check.", delete=True) as fh:
            fh.write(b"ok")
            fh.flush()
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise SetupError(f"cannot write to {key}={str(folder)!r}: {os_error_text(exc)} (e.g. {key}=/other/folder)"
                         ) from None


def check_outputs(cfg: Config) -> None:
    """The output and submission folders can be written, and the image cache's where the experiment has one."""
    check_writable(cfg.output_dir, "output_dir")
    check_writable(cfg.submission_dir, "submission_dir")
    if "cache_dir" in cfg.own:
        check_writable(cfg.resolved_cache_dir(), "cache_dir" if cfg.cache_dir else "output_dir")


def check_device(cfg: Config) -> None:
    import torch

    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SetupError(f"device={cfg.device!r} but this machine has no usable CUDA GPU (torch "
                             f"{torch.__version__}); use device=auto or device=cpu")
        index = int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
        if index >= torch.cuda.device_count():
            raise SetupError(f"device={cfg.device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise SetupError("device='mps' but MPS is not available here; use device=auto or device=cpu")


def check_image_run(cfg: Config) -> None:
    """Everything an image experiment needs before its image cache is built: folders, device, weights."""
    from .model import ensure_weights

    check_outputs(cfg)
    check_device(cfg)
    ensure_weights(cfg.backbone, cfg.pretrained, cfg.pretrained_path)
