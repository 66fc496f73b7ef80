"""Reading an export back: what a bundle is (its format, manifest and the versions of what it stores), and the
checks ``predict`` makes before it reads anything in one (``verify``: every listed file present and unchanged, no
unlisted file; ``open_bundle``: the format and versions, then each experiment's settings). Weights are read from
safetensors; nothing in a bundle is ever executed. Writing one is src/deliver/export.py.
"""
from __future__ import annotations

import atexit
import json
import platform
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np

from ..config import REPO_ROOT
from ..data import CLASSES
from ..io_utils import atomic_write, sha256_file
from .source import Member, PredictError, Source, member_kind, saved_config

BUNDLE_FORMAT = 1


MANIFEST = "MANIFEST.json"


PACKAGES = ("torch", "timm", "numpy", "scipy", "scikit-learn", "pandas", "pillow", "safetensors")


SUFFIXES = (".json", ".safetensors", ".skops", ".md", ".png")  # everything a bundle may hold


class BundleError(ValueError):
    """An export that predict cannot use: not one, changed, incomplete, or written by another version."""


def versions() -> dict[str, object]:
    """The versions of everything a bundle's files mean: its layout, the stored transforms and models, and the
    decoding of images (a bundle stores none, but its weights were trained on images decoded so)."""
    from ..cache import CACHE_VERSION
    from ..features import ENCODER_VERSION, FEATURES_VERSION
    from ..portable import PORTABLE_VERSION

    return {"bundle": BUNDLE_FORMAT, "features": FEATURES_VERSION, "encoder": ENCODER_VERSION,
            "portable": PORTABLE_VERSION, "image_decoding": CACHE_VERSION}


def packages() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def commit() -> str:
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_safetensors(path: Path, state: dict, meta: dict[str, str]) -> None:
    """A plain state dict as safetensors (each tensor its own contiguous copy: a shared backbone's two names)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_safetensors(path: Path) -> dict:
    """A safetensors file as a state dict (safetensors stores only tensors: nothing in it can run code); a damaged
    or truncated file is a BundleError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise BundleError(f"{path}: cannot be read as safetensors weights ({first})") from None


_EXTRACTED: list[str] = []  # archives unpacked by this process, removed at exit


def _cleanup() -> None:
    for d in _EXTRACTED:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup)


def extract(archive: Path) -> Path:
    """An export archive unpacked into a private temporary folder (removed at exit): plain files and folders
    only, every path inside it; the bundle folder it holds."""
    tmp = tempfile.mkdtemp(prefix="milk10k-bundle-")
    _EXTRACTED.append(tmp)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in parts:
                    raise BundleError(f"{archive}: {m.name!r} is not a plain file inside the archive; not an "
                                      "export of this project")
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BundleError(f"{archive}: cannot be read as an export archive ({type(exc).__name__}: {exc}); it may "
                          "be truncated: copy it again") from None
    tops = [p for p in Path(tmp).iterdir()]
    if len(tops) != 1 or not (tops[0] / MANIFEST).is_file():
        raise BundleError(f"{archive}: not an export of this project (no folder with a {MANIFEST} in it)")
    return tops[0]


def verify(root: Path) -> dict:
    """Check the bundle against its manifest before anything in it is read: every listed file present and
    unchanged, no file it does not list. Returns the manifest."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except FileNotFoundError:
        raise BundleError(f"{root}: not an export of this project (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: not a manifest of this project ({type(exc).__name__}: {exc})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{root}: written by another version of the project (bundle format "
                          f"{manifest.get('format')!r}; this checkout reads format {BUNDLE_FORMAT}); predict it with "
                          "the version that exported it")
    for rel, digest in files.items():
        p = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or Path(rel).suffix not in SUFFIXES:
            raise BundleError(f"{path}: lists {rel!r}, which no export of this project holds")
        if not p.is_file():
            raise BundleError(f"{p}: missing from the export (its manifest lists it); copy the export again")
        if sha256_file(p) != digest:
            raise BundleError(f"{p}: changed since the export (its SHA-256 differs from the manifest's); copy the "
                              "export again")
    unlisted = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                      if p.is_file() and p.name != MANIFEST and p.relative_to(root).as_posix() not in files)
    if unlisted:
        raise BundleError(f"{root / unlisted[0]}: not in the export's manifest ({len(unlisted)} unlisted file(s)); "
                          "remove it or copy the export again")
    return manifest


def open_bundle(path: Path, overrides: dict[str, str]) -> Source:
    """An export (folder or archive) as a predict source, checked first (``verify``), then its format and the
    versions of what it stores; package versions that differ are printed, not refused."""
    root = extract(path) if path.is_file() else path
    verify(root)
    try:
        info = json.loads((root / "bundle.json").read_text(encoding="utf-8"))
        ours = versions()
        theirs = dict(info["versions"])
        weights = {str(k): float(info["weights"][k]) for k in info["experiments"]}
        records = dict(info["members"])
        thresholds = np.array([float(info["thresholds"][c]) for c in CLASSES])
        rule = str(info["decision"])
    except FileNotFoundError:
        raise BundleError(f"{root}: not an export of this project (no bundle.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{root / 'bundle.json'}: not the bundle.json of an export of this project "
                          f"({type(exc).__name__}: {exc})") from None
    differ = [f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in ours.items() if theirs.get(k) != v]
    if differ:
        raise BundleError(f"{path}: written by another version of the project ({'; '.join(differ)}; commit "
                          f"{info.get('commit', 'unknown')}); predict it with the version that exported it")
    changed = [f"{k} {v} there, {packages().get(k)} here" for k, v in (info.get("packages") or {}).items()
               if packages().get(k) != v]
    if changed:
        print(f"[predict] note: the export was made with other package versions ({'; '.join(changed)}); "
              "predictions may differ in the last digits", flush=True)
    members = {}
    for name, rec in records.items():
        folder = root / "experiments" / name
        try:
            cfg = saved_config(folder / "config.json", overrides)
        except PredictError as exc:
            raise BundleError(f"{exc} (the export names experiment {rec.get('experiment')!r}, whose code this "
                              "checkout must have)") from None
        kind, inputs = member_kind(cfg)
        if kind != rec.get("kind") or inputs != list(rec.get("inputs", [])):
            raise BundleError(f"{folder}: exported as a {rec.get('kind')} experiment, but this checkout's "
                              f"{cfg.experiment} is a {kind} one; predict it with the version that exported it")
        members[name] = Member(name, folder, cfg, kind, inputs, bundle=True)
    return Source(str(info.get("name", root.name)), "export", members, weights, rule, thresholds,
                  str(info.get("thresholds_from", "")), info, path)
