"""Reading an export back: what a bundle is (its format, manifest and the versions of what it stores), and the
checks ``predict`` makes before it reads anything in one (``extract``: an archive's bounds from its tar headers,
before anything is unpacked; ``verify``: the manifest unchanged, every listed file present and unchanged, no
unlisted file, no link; ``open_bundle``: the format and versions, plain names, then each experiment's settings and
the files predict will read, all listed). Weights are read from safetensors; nothing in a bundle is ever executed.
The manifest detects damage and accidental change, not a forger (who rewrites a file and the manifest together):
what a bundle's own data can make predict do is bounded instead. Writing one is src/deliver/export.py.
"""
from __future__ import annotations

import atexit
import bz2
import errno
import gzip
import hashlib
import json
import lzma
import math
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np

from ..config import REPO_ROOT, Config
from ..data import CLASSES
from ..io_utils import atomic_write, sha256_file
from ..settings import PLAIN_NAME
from .source import Member, PredictError, Source, member_kind, saved_config

BUNDLE_FORMAT = 2  # 2: the manifest records the SHA-256 of its own content


MANIFEST = "MANIFEST.json"


PACKAGES = ("torch", "timm", "numpy", "scipy", "scikit-learn", "pandas", "pillow", "safetensors")


SUFFIXES = (".json", ".safetensors", ".skops", ".md", ".png")  # everything a bundle may hold


# settings naming folders or files of the machine that trained: an export stores their defaults, and predict takes
# them from its own command line, never from a bundle
PATH_KEYS = ("data_dir", "output_dir", "submission_dir", "folds_csv", "cache_dir", "pretrained_path")


# Bounds on an export archive, checked from its tar headers before anything is unpacked; for an archive that is
# trusted, the environment variable MILK10K_<NAME> (read at each call) raises one.
MAX_BUNDLE_BYTES = 16 << 30  # unpacked size: the largest real export (3 two-backbone experiments x 5 folds) is ~2.5 GiB
MAX_BUNDLE_FILES = 10_000    # files and folders: a blend of 10 experiments x 10 folds holds about 500
MAX_BUNDLE_RATIO = 20        # unpacked / packed: weights barely compress (real exports 1.1-1.3), JSON 4x, zeros 1000x
RATIO_FLOOR = 64 << 20       # the ratio is checked above this unpacked size only (a small JSON-only export is ~4x)
MAX_TAR_HEADER = 1 << 20     # a long name's extended header is read into memory whole; an export's is under 1 KiB


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

    import torch

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise BundleError(f"{path}: cannot be read as safetensors weights ({first})") from None
    bad = next((k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise BundleError(f"{path}: tensor {bad!r} holds NaN or infinite values, which no trained fold saves; copy "
                          "the export again")
    return state


_EXTRACTED: dict[str, Path] = {}  # temporary folder -> the archive unpacked there by this process; removed at exit


def _cleanup() -> None:
    for d in _EXTRACTED:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup)


def archive_names(text: str) -> str:
    """``text`` with every path inside an unpacked archive written as ``<archive>: <path inside it>`` (the temporary
    folder is gone by the time the message is read)."""
    for tmp, archive in _EXTRACTED.items():
        text = text.replace(tmp + os.sep, f"{archive}: ")
    return text


def limit(name: str) -> int:
    """The bound ``name`` of this module, or MILK10K_<name> from the environment (an archive that is trusted)."""
    default, text = globals()[name], os.environ.get(f"MILK10K_{name}", "").strip()
    if text and not text.isdigit():
        raise BundleError(f"MILK10K_{name}={text!r}: give a whole number (default {default})")
    return int(text) if text else default


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


_OPENERS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ": lzma.open}
_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)


def scan_archive(archive: Path) -> int:
    """The unpacked size of an export archive from its tar headers, read once in bounded memory (file data is
    decompressed in 1 MiB pieces and dropped). Refused as soon as a bound is passed: more than MAX_BUNDLE_FILES
    entries, more than MAX_BUNDLE_BYTES, more than MAX_BUNDLE_RATIO times its own size (above RATIO_FLOOR), an
    extended header over MAX_TAR_HEADER, or an entry that is not a plain file or folder."""
    most, files, ratio = limit("MAX_BUNDLE_BYTES"), limit("MAX_BUNDLE_FILES"), limit("MAX_BUNDLE_RATIO")
    header = limit("MAX_TAR_HEADER")
    packed = archive.stat().st_size

    def refuse(what: str, name: str, value: int) -> BundleError:
        return BundleError(f"{archive}: {what}, over the limit {name}={value}; refused before anything was "
                           f"unpacked. If the archive is trusted, raise it: MILK10K_{name}={2 * value}")

    with open(archive, "rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        opener = next((o for magic, o in _OPENERS.items() if head.startswith(magic)), None)
        fh = opener(raw, "rb") if opener else raw
        n = total = 0
        while True:
            block = fh.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                raise EOFError("the archive ends inside a tar header")
            if not block.strip(b"\0"):
                return total  # the end-of-archive marker
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            n, total = n + 1, total + info.size
            if n > files:
                raise refuse(f"more than {files} entries", "MAX_BUNDLE_FILES", files)
            if total > most:
                raise refuse(f"its tar headers declare more than {_size(most)} of files", "MAX_BUNDLE_BYTES", most)
            if total > max(RATIO_FLOOR, ratio * packed):
                raise refuse(f"its tar headers declare {_size(total)} or more of files for its {_size(packed)} "
                             f"({total / packed:.0f} times; a real export unpacks to about 1.3)", "MAX_BUNDLE_RATIO",
                             ratio)
            if info.type in _META_TYPES and info.size > header:
                raise refuse(f"an extended tar header of {_size(info.size)}", "MAX_TAR_HEADER", header)
            if info.type not in _META_TYPES and not (info.isfile() or info.isdir()):
                raise BundleError(f"{archive}: {info.name!r} is not a plain file inside the archive; not an export "
                                  "of this project")
            left = -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            while left:
                piece = fh.read(min(left, 1 << 20))
                if not piece:
                    raise EOFError("the archive ends inside a file")
                left -= len(piece)


UNREADABLE = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


def unreadable(archive: Path, exc: BaseException) -> BaseException:
    """What to raise for ``exc`` met reading ``archive``: a full disk as itself (the caller says so), else a
    BundleError saying the archive cannot be read."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return exc
    return BundleError(f"{archive}: cannot be read as an export archive ({type(exc).__name__}: {exc}); it may be "
                       "truncated: copy it again")


def extract(archive: Path) -> Path:
    """An export archive unpacked into a private temporary folder (removed at exit), once ``scan_archive`` found it
    within its bounds and the folder has room for it: plain files and folders only, every path inside it; the
    bundle folder it holds."""
    try:
        size = scan_archive(archive)
    except UNREADABLE as exc:
        raise unreadable(archive, exc) from None
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if size > free:
        raise BundleError(f"{archive}: unpacks to {_size(size)}, but the temporary folder {tempfile.gettempdir()} has "
                          f"{_size(free)} free; point TMPDIR at a folder with more room")
    tmp = tempfile.mkdtemp(prefix="milk10k-bundle-")
    _EXTRACTED[tmp] = archive
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar.getmembers():
                if not (m.isfile() or m.isdir()) or not plain_path(m.name.rstrip("/")):
                    raise BundleError(f"{archive}: {m.name!r} is not a plain file inside the archive; not an "
                                      "export of this project")
            tar.extractall(tmp, filter="data")
    except UNREADABLE as exc:
        raise unreadable(archive, exc) from None
    tops = [p for p in Path(tmp).iterdir()]
    if len(tops) != 1 or not (tops[0] / MANIFEST).is_file():
        raise BundleError(f"{archive}: not an export of this project (no folder with a {MANIFEST} in it)")
    return tops[0]


def _canonical(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def manifest_text(files: dict[str, str]) -> str:
    """MANIFEST.json: the SHA-256 of every other file (``files``), and of its own content without that line, so a
    change to the manifest itself is found too."""
    body = {"format": BUNDLE_FORMAT, "algorithm": "sha256", "files": files}
    return _canonical({**body, "manifest_sha256": hashlib.sha256(_canonical(body).encode()).hexdigest()})


def plain_path(rel: str) -> bool:
    """Whether ``rel`` is a relative path of plain names (src/settings.py PLAIN_NAME: no '..', no absolute path)."""
    return all(PLAIN_NAME.fullmatch(part) for part in rel.split("/"))


def verify(root: Path) -> dict:
    """Check the bundle against its manifest before anything in it is read: the manifest as it was written (its
    own SHA-256), plain files and folders only (no link, which could lead outside), every listed file present and
    unchanged, no file it does not list. Returns the manifest. It detects damage and accidental change; it is no
    signature (anyone can rewrite a file and the manifest together)."""
    path = root / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
        manifest = json.loads(text)
        files = dict(manifest["files"])
    except FileNotFoundError:
        raise BundleError(f"{root}: not an export of this project (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: not a manifest of this project ({type(exc).__name__}: {exc}); copy the export "
                          "again") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{root}: written by another version of the project (bundle format "
                          f"{manifest.get('format')!r}; this checkout reads format {BUNDLE_FORMAT}); predict it with "
                          "the version that exported it")
    if text != manifest_text(files):
        raise BundleError(f"{path}: changed since the export (its content differs from the SHA-256 it records); copy "
                          "the export again")
    found = set()
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            p = Path(folder) / name
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise BundleError(f"{p}: {'a symbolic link' if p.is_symlink() else 'not a plain file'} inside the "
                                  "export, which holds plain files and folders only; copy the export again")
        found.update((Path(folder) / name).relative_to(root).as_posix() for name in names)
    for rel, digest in files.items():
        p = root / rel
        if not plain_path(rel) or Path(rel).suffix not in SUFFIXES:
            raise BundleError(f"{path}: lists {rel!r}, which no export of this project holds")
        if rel not in found:
            raise BundleError(f"{p}: missing from the export (its manifest lists it); copy the export again")
        if sha256_file(p) != digest:
            raise BundleError(f"{p}: changed since the export (its SHA-256 differs from the manifest's); copy the "
                              "export again")
    unlisted = sorted(found - set(files) - {MANIFEST})
    if unlisted:
        raise BundleError(f"{root / unlisted[0]}: not in the export's manifest ({len(unlisted)} unlisted file(s)); "
                          "remove it or copy the export again")
    return manifest


def plain(where: Path, field: str, value) -> str:
    """``value`` when it is a plain name (src/settings.py PLAIN_NAME: no '/', no '..'), else a BundleError naming
    ``where`` and ``field``: a name a bundle gives is never a path."""
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value):
        raise BundleError(f"{where}: {field} {value!r} is not a plain name (letters, digits, '.', '_', '-'; no '/' and "
                          "no '..'); not an export of this project")
    return value


def neutral_paths(cfg: Config, keep=()) -> dict:
    """The settings of ``cfg`` that name folders or files of the machine that trained (PATH_KEYS) at their
    defaults, except those in ``keep``."""
    return {k: spec.default for k, spec in cfg.declared().items() if k in PATH_KEYS and k not in keep}


def fold_files(kind: str) -> tuple[str, ...]:
    """The files of one fold in an export: what predict reads of it."""
    models = ("models.json", "models.skops")  # a tabular fold's models, an image fold's path without MONET
    return ("features.json", "weights.safetensors", "aux_vocab.json", *models) if kind == "image" else \
        ("features.json", *models)


def open_bundle(path: Path, overrides: dict[str, str]) -> Source:
    """An export (folder or archive) as a predict source, checked first (``verify``), then its format and the
    versions of what it stores; package versions that differ are printed, not refused. Every name it gives is a
    plain name, every file predict will read lies inside it and is listed in its manifest (checked here, before any
    is read), its blend weights and thresholds are finite, and its settings that name folders or files are
    replaced by their defaults (or by ``overrides``)."""
    root = extract(path) if path.is_file() else path
    listed = set(verify(root)["files"])
    where = root / "bundle.json"
    try:
        if "bundle.json" not in listed:
            raise FileNotFoundError
        info = json.loads(where.read_text(encoding="utf-8"))
        ours = versions()
        theirs = dict(info["versions"])
        weights = {k: float(info["weights"][k]) for k in info["experiments"]}
        records = {k: dict(v) for k, v in dict(info["members"]).items()}
        thresholds = np.array([float(info["thresholds"][c]) for c in CLASSES])
        rule = str(info["decision"])
    except FileNotFoundError:
        raise BundleError(f"{root}: not an export of this project (no bundle.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{where}: not the bundle.json of an export of this project "
                          f"({type(exc).__name__}: {exc})") from None
    differ = [f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in ours.items() if theirs.get(k) != v]
    if differ:
        raise BundleError(f"{path}: written by another version of the project ({'; '.join(differ)}; commit "
                          f"{info.get('commit', 'unknown')}); predict it with the version that exported it")
    name = plain(where, "name", info["name"]) if "name" in info else root.name
    for k in [*weights, *records]:
        plain(where, "experiment", k)
    bad = [f"blend weight of {k} {v}" for k, v in weights.items() if not math.isfinite(v)] + \
        [f"threshold of {c} {t}" for c, t in zip(CLASSES, thresholds) if not 0 <= t <= 1]
    if bad:
        raise BundleError(f"{where}: {bad[0]}; a blend weight is a finite number and a threshold a probability in "
                          "[0, 1]: copy the export again")
    if any(k not in records for k in weights):
        raise BundleError(f"{where}: blends {next(k for k in weights if k not in records)!r}, which its members do "
                          "not include; not an export of this project")
    changed = [f"{k} {v} there, {packages().get(k)} here" for k, v in (info.get("packages") or {}).items()
               if packages().get(k) != v]
    if changed:
        print(f"[predict] note: the export was made with other package versions ({'; '.join(changed)}); "
              "predictions may differ in the last digits", flush=True)
    members = {n: _open_member(root, n, rec, listed, overrides) for n, rec in records.items()}
    for member in members.values():
        missing = [i for i in member.inputs if i not in members]
        if missing:
            raise BundleError(f"{member.folder / 'config.json'}: stacks {missing[0]!r}, which the export does not "
                              "hold; not an export of this project")
    return Source(name, "export", members, weights, rule, thresholds, str(info.get("thresholds_from", "")), info,
                  path)


def _open_member(root: Path, name: str, rec: dict, listed: set[str], overrides: dict[str, str]) -> Member:
    """Member ``name`` of the bundle at ``root``: its settings (plain names, its paths neutral) and the check that
    every file predict reads of it is inside the bundle and listed."""
    folder = root / "experiments" / name
    config = folder / "config.json"
    if not folder.resolve().is_relative_to(root.resolve()) or f"experiments/{name}/config.json" not in listed:
        raise BundleError(f"{config}: not in the export's manifest; not an export of this project")
    try:
        saved = json.loads(config.read_text(encoding="utf-8"))
        plain(config, "name", saved.get("name"))
        plain(config, "experiment", saved.get("experiment"))
        cfg = saved_config(config, overrides)
    except PredictError as exc:
        raise BundleError(f"{exc} (the export names experiment {rec.get('experiment')!r}, whose code this "
                          "checkout must have)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise BundleError(f"{config}: not a saved config ({type(exc).__name__}: {exc})") from None
    paths = neutral_paths(cfg, keep=overrides)
    cfg = cfg.replace(**paths) if paths else cfg
    kind, inputs = member_kind(cfg)
    if kind != rec.get("kind") or inputs != list(rec.get("inputs", [])):
        raise BundleError(f"{folder}: exported as a {rec.get('kind')} experiment, but this checkout's "
                          f"{cfg.experiment} is a {kind} one; predict it with the version that exported it")
    need = [f"experiments/{name}/fold{k}/{f}" for k in range(cfg.n_folds) for f in fold_files(kind)]
    unlisted = [rel for rel in need if rel not in listed]
    if unlisted:
        raise BundleError(f"{root / unlisted[0]}: needed to predict but not in the export's manifest "
                          f"({len(unlisted)} such file(s)); not a complete export: copy it again")
    return Member(name, folder, cfg, kind, inputs, bundle=True)
