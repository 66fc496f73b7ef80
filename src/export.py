"""A trained experiment or blend as a self-contained folder, and one .tar.gz of it, that ``bash run.sh predict`` runs
from on a machine with no output/ folder and no internet.

    bash run.sh export SOURCE [--out DIR] [--monet-cost] [key=value ...]

SOURCE is an experiment or a blend with a submission (``<submission_dir>/<SOURCE>.json``). The folder holds::

    bundle.json                        what it is: the bundle format and the versions of what it stores, the
                                       experiments and their blend weights, the decision rule and its thresholds,
                                       each experiment's settings and data fingerprints, package versions, commit
    MODEL_CARD.md, reliability.png     the model card (src/model_card.py)
    experiments/<name>/config.json     the settings its folds were trained with
    experiments/<name>/fold<k>/        weights.safetensors, features.json, aux_vocab.json (an image experiment);
                                       features.json, models.json (a tabular experiment or a stacker)
    MANIFEST.json                      the SHA-256 of every other file, written last

No pickle anywhere: weights are safetensors, fitted transforms and models JSON (src/portable.py). ``predict`` checks
the manifest before it reads anything (a changed, missing or unlisted file is refused by name), refuses a bundle
of another format, and builds each network with this checkout's code of the experiment the bundle names; nothing
in a bundle is ever executed.
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from .config import REPO_ROOT
from .data import CLASSES
from .io_utils import atomic_write, atomic_write_json
from .predict import (Member, PredictError, Source, load_features, member_kind, read_weights, resolve_source,
                      saved_config, split_overrides)

BUNDLE_FORMAT = 1
MANIFEST = "MANIFEST.json"
PACKAGES = ("torch", "timm", "numpy", "scipy", "scikit-learn", "pandas", "pillow", "safetensors")
SUFFIXES = (".json", ".safetensors", ".md", ".png")  # everything a bundle may hold


class BundleError(ValueError):
    """An export that predict cannot use: not one, changed, incomplete, or written by another version."""


def versions() -> dict[str, object]:
    """The versions of everything a bundle's files mean: its layout, the stored transforms and models, and the
    decoding of images (a bundle stores none, but its weights were trained on images decoded so)."""
    from .cache import CACHE_VERSION
    from .features import ENCODER_VERSION, FEATURES_VERSION
    from .portable import PORTABLE_VERSION

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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------
def _copy_member(member: Member, dest: Path) -> dict:
    """One experiment's settings and folds into ``dest``; what bundle.json records of it."""
    from .experiment import ExperimentDir
    from .predict import TabularFold

    atomic_write_json(dest / "config.json", member.cfg.to_dict())
    for k in range(member.n_folds):
        fdir, out = member.fold_dir(k), dest / f"fold{k}"
        atomic_write_json(out / "features.json", load_features(member, k).to_dict())
        if member.kind == "image":
            state = read_weights(member, k)
            write_safetensors(out / "weights.safetensors", state,
                              {"experiment": member.cfg.experiment, "name": member.name, "fold": str(k)})
            shutil.copyfile(fdir / "aux_vocab.json", out / "aux_vocab.json")
        else:
            atomic_write_json(out / "models.json", TabularFold(member, k).models)
    folder = ExperimentDir(member.cfg)
    fingerprint = json.loads((member.fold_dir(0) / "fingerprint.json").read_text(encoding="utf-8")) \
        if (member.fold_dir(0) / "fingerprint.json").is_file() else None
    return {"experiment": member.cfg.experiment, "kind": member.kind, "inputs": member.inputs,
            "n_folds": member.n_folds, "img_size": member.cfg.img_size if member.kind == "image" else None,
            "tta_views": (8 if member.cfg.tta else 1) if member.kind == "image" else None,
            "data_fingerprint": folder.recorded_data(), "fingerprint": fingerprint}


def _stage_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f".{out.name}.*.staging"):  # left by a killed export
        pid = old.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    stage = out.parent / f".{out.name}.{os.getpid()}.staging"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_manifest(root: Path) -> dict[str, str]:
    files = {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    atomic_write_json(root / MANIFEST, {"format": BUNDLE_FORMAT, "algorithm": "sha256", "files": files})
    return files


def export(source: Source, out: Path, measure_monet: bool = False) -> dict[str, Path]:
    """Write the bundle of ``source`` to ``out`` (a folder, replaced whole) and ``out``.tar.gz; nothing half-written
    is left in either place."""
    from .model_card import write_card

    if source.kind == "export":
        raise BundleError(f"{source.where} is an export already; export an experiment or a blend")
    stage = _stage_dir(out)
    try:
        records = {name: _copy_member(m, stage / "experiments" / name) for name, m in source.members.items()}
        card = write_card(stage, source, measure_monet=measure_monet)
        info = {
            "project": "milk10k", "versions": versions(), "name": source.name, "source_kind": source.kind,
            "experiments": list(source.weights), "weights": source.weights, "members": records,
            "decision": source.rule, "thresholds": dict(zip(CLASSES, map(float, source.thresholds))),
            "thresholds_from": source.thresholds_from, "decision_reason": source.info.get("decision_reason", ""),
            "cv_macro_f1_honest": source.info.get("cv_macro_f1_honest"), "model_card": card,
            "packages": packages(), "commit": commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(stage / "bundle.json", info)
        write_manifest(stage)
        old = out.parent / f".{out.name}.{os.getpid()}.old"
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    archive = out.parent / f"{out.name}.tar.gz"

    def pack(tmp: str) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(out, arcname=out.name)

    atomic_write(archive, pack)
    return {"folder": out, "archive": archive, "model_card": out / "MODEL_CARD.md"}


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------
_EXTRACTED: list[str] = []


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
        if sha256(p) != digest:
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


# ----------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bash run.sh export", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", metavar="SOURCE", help="an experiment or a blend with a submission")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="settings that do not change results: output_dir=, submission_dir=, data_dir=, ...")
    ap.add_argument("--out", metavar="DIR", help="the bundle folder (default <output_dir>/exports/<SOURCE>); the "
                    "archive is DIR.tar.gz beside it")
    ap.add_argument("--monet-cost", action="store_true", help="measure for the model card what leaving out the "
                    "MONET scores costs this source (predicts every training lesion again; always done for "
                    "metadata-only sources)")
    ns = ap.parse_intermixed_args(argv)
    overrides = split_overrides(ns.overrides)
    if Path(ns.source).is_file() or (Path(ns.source) / MANIFEST).is_file():
        raise BundleError(f"{ns.source} is an export already; export an experiment or a blend")
    source = resolve_source(ns.source, overrides)
    out = Path(ns.out) if ns.out else Path(overrides.get("output_dir", "output")) / "exports" / source.name
    paths = export(source, out, measure_monet=ns.monet_cost)
    for key, p in paths.items():
        print(f"[export] {key:<11} {p}")
    return 0

