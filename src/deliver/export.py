"""A trained experiment or blend as a self-contained folder, and one .tar.gz of it, that ``bash run.sh predict`` runs
from on a machine with no output/ folder and no internet.

    bash run.sh export SOURCE [--out DIR] [--monet-cost] [key=value ...]

SOURCE is an experiment or a blend with a submission (``<submission_dir>/<SOURCE>.json``). The folder holds::

    bundle.json                        what it is: the bundle format and the versions of what it stores, the
                                       experiments and their blend weights, the decision rule and its thresholds,
                                       each experiment's settings and data fingerprints, package versions, commit
    MODEL_CARD.md, reliability.png     the model card (src/deliver/card.py)
    experiments/<name>/config.json     the settings its folds were trained with
    experiments/<name>/fold<k>/        features.json, models.json, models.skops (a tabular experiment or a
                                       stacker: its models with and without MONET; an image experiment: its model
                                       without MONET), and for an image experiment weights.safetensors and
                                       aux_vocab.json
    MANIFEST.json                      the SHA-256 of every other file, written last

No pickle anywhere: weights are safetensors, fitted transforms JSON (src/portable.py), tabular models skops files read
back with an explicit list of trusted types (src/sklearn_io.py), and no folder of the exporting machine (the path
settings are stored at their defaults). ``predict`` checks the manifest before it reads anything (a changed, missing
or unlisted file is refused by name), refuses a bundle of another format, and builds each network with this
checkout's code of the experiment the bundle names; nothing in a bundle is ever executed. The manifest detects
damage and accidental change; it is no signature. ``--out DIR`` replaces only an earlier export (``check_out``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tarfile
import zlib
from datetime import datetime, timezone
from pathlib import Path

from .bundle import (MANIFEST, BundleError, commit, manifest_text, neutral_paths, packages, versions,
                     write_safetensors)
from ..data import CLASSES
from ..io_utils import atomic_write, atomic_write_json, atomic_write_text, pid_alive, sha256_file
from ..owned import experiment_folder
from ..tracking import track_export
from .predict import load_features, read_weights, resolve_source
from .source import Member, Source, split_overrides


# ----------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------
def _copy_member(member: Member, dest: Path) -> dict:
    """One experiment's settings and folds into ``dest``; what bundle.json records of it."""
    from ..experiment import ExperimentDir
    from .predict import copy_fold_models

    atomic_write_json(dest / "config.json", {**member.cfg.to_dict(), **neutral_paths(member.cfg)})
    for k in range(member.n_folds):
        fdir, out = member.fold_dir(k), dest / f"fold{k}"
        atomic_write_json(out / "features.json", load_features(member, k).to_dict())
        if member.kind == "image":
            state = read_weights(member, k)
            write_safetensors(out / "weights.safetensors", state,
                              {"experiment": member.cfg.experiment, "name": member.name, "fold": str(k)})
            shutil.copyfile(fdir / "aux_vocab.json", out / "aux_vocab.json")
        copy_fold_models(member, k, out)
    folder = ExperimentDir(member.cfg)
    fingerprint = json.loads((member.fold_dir(0) / "fingerprint.json").read_text(encoding="utf-8")) \
        if (member.fold_dir(0) / "fingerprint.json").is_file() else None
    return {"experiment": member.cfg.experiment, "kind": member.kind, "inputs": member.inputs,
            "n_folds": member.n_folds, "img_size": member.cfg.img_size if member.kind == "image" else None,
            "tta_views": (8 if member.cfg.tta else 1) if member.kind == "image" else None,
            "data_fingerprint": folder.recorded_data(), "fingerprint": fingerprint}


def _stage_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in [*out.parent.glob(f".{out.name}.*.staging"), *out.parent.glob(f".{out.name}.*.old")]:
        pid = old.name.rsplit(".", 2)[-2]  # left by a killed export: its staging removed, the earlier export restored
        if pid.isdigit() and not pid_alive(int(pid)):
            if old.suffix == ".old" and not out.exists():
                os.replace(old, out)
            shutil.rmtree(old, ignore_errors=True)
    stage = out.parent / f".{out.name}.{os.getpid()}.staging"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def write_manifest(root: Path) -> dict[str, str]:
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
             if p.is_file() and p.as_posix() != (root / MANIFEST).as_posix()}
    atomic_write_text(root / MANIFEST, manifest_text(files))
    return files


def check_out(out: Path, source: Source) -> None:
    """Refuse an ``--out`` whose writing would delete or overwrite what export did not write: a file; a non-empty
    folder that is not an earlier export (no manifest, or a file its manifest does not list); a folder that is or
    holds an output root, or is or lies inside an experiment's output folder; a ``DIR.tar.gz`` beside it that is
    not an export archive of DIR."""
    fix = "move it away or choose another --out"
    where = out.resolve()
    for root in {Path(m.cfg.output_dir).resolve() for m in source.members.values()}:
        if where == root or where in root.parents:
            raise BundleError(f"--out {out}: holds the output folder {root} (experiments, caches, folds); {fix}, e.g. "
                              f"{root / 'exports' / source.name}")
    inside = experiment_folder(out)
    if inside is not None:
        raise BundleError(f"--out {out}: is or lies inside the output folder of an experiment ({inside}); {fix}")
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out}: a file stands there; {fix}")
    if out.is_dir() and any(out.iterdir()):
        try:
            listed = set(json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"--out {out}: a folder that is not an export of this project ({type(exc).__name__} "
                              f"reading its {MANIFEST}); export replaces only an earlier export: {fix}") from None
        for folder, dirs, names in os.walk(out):
            for name in [*names, *(d for d in dirs if (Path(folder) / d).is_symlink())]:
                rel = (Path(folder) / name).relative_to(out).as_posix()
                if rel != MANIFEST and rel not in listed:
                    raise BundleError(f"--out {out}: holds {rel}, which the earlier export's manifest does not "
                                      f"list; export replaces only what it wrote: {fix}")
    archive = out.parent / f"{out.name}.tar.gz"
    if archive.exists() and not _export_archive(archive, out.name):
        raise BundleError(f"--out {out}: {archive} is not an export archive of {out.name}; {fix}")


def _export_archive(path: Path, name: str) -> bool:
    """Whether ``path`` is a .tar.gz whose first entry is the folder ``name`` (as export packs it; only the first
    header is read)."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            first = tar.next()
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return False
    return first is not None and first.name == name and first.isdir()


def export(source: Source, out: Path, measure_monet: bool = False) -> dict[str, Path]:
    """Write the bundle of ``source`` to ``out`` (a folder) and ``out``.tar.gz. An earlier export there is replaced
    only once the new one is complete, and nothing export did not write is replaced (``check_out``); nothing
    half-written is left in either place."""
    from .card import write_card

    if source.kind == "export":
        raise BundleError(f"{source.where} is an export already; export an experiment or a blend")
    check_out(out, source)
    stage = _stage_dir(out)
    old = out.parent / f".{out.name}.{os.getpid()}.old"
    archive = out.parent / f"{out.name}.tar.gz"
    try:
        records = {name: _copy_member(m, stage / "experiments" / name) for name, m in source.members.items()}
        card = write_card(stage, source, measure_monet=measure_monet)
        info = {
            "project": "milk10k", "versions": versions(), "name": source.name, "source_kind": source.kind,
            "experiments": list(source.weights), "weights": source.weights, "members": records,
            "decision": source.rule, "thresholds": dict(zip(CLASSES, map(float, source.thresholds))),
            "thresholds_from": source.thresholds_from, "decision_reason": source.info.get("decision_reason", ""),
            "cv_macro_f1_honest": source.info.get("cv_macro_f1_honest"), "model_card": card,
            **{k: source.info[k] for k in ("monet", "thresholds_without_monet", "blend_candidate", "blend_choice_reason")
               if k in source.info},
            "packages": packages(), "commit": commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(stage / "bundle.json", info)
        write_manifest(stage)

        def pack(tmp: str) -> None:
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(stage, arcname=out.name)

        atomic_write(archive, pack)
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
    finally:
        if old.exists() and not out.exists():  # stopped between the two renames
            os.replace(old, out)
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return {"folder": out, "archive": archive, "model_card": out / "MODEL_CARD.md"}


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------


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
    ap.add_argument("--monet-cost", action="store_true", help="measure again, for the model card, what a lesion "
                    "without MONET scores gets through predict's own path (predicts every training lesion twice; the "
                    "card always shows what the submission recorded)")
    ns = ap.parse_intermixed_args(argv)
    overrides = split_overrides(ns.overrides)
    if Path(ns.source).is_file() or (Path(ns.source) / MANIFEST).is_file():
        raise BundleError(f"{ns.source} is an export already; export an experiment or a blend")
    source = resolve_source(ns.source, overrides)
    out = Path(ns.out) if ns.out else Path(overrides.get("output_dir", "output")) / "exports" / source.name
    paths = export(source, out, measure_monet=ns.monet_cost)
    track_export(source, paths)
    for key, p in paths.items():
        print(f"[export] {key:<11} {p}")
    return 0

