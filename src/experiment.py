"""An experiment's output folder, and the lesions every kind of experiment reads.

``ExperimentDir`` owns ``<output_dir>/<name>/``. ``ExperimentDir.session(fingerprint)`` begins a run: it takes the
folder's lock (a second run on the same folder is refused while the first lives), refuses folds made under other
settings or data (``StaleOutputs``: the keys that differ and the ways out) or, with ``retrain=true``, removes
them, saves the resolved config, and yields the folds still to do. A fold's files carry the fingerprint of the
settings and data that made them (``fingerprint.json``); ``metrics.json`` is written last and marks the fold
complete. ``collect`` joins the folds into the experiment's ``oof.csv`` (training order) and ``test.csv`` (fold
mean). Image, tabular and stacking experiments all leave the same files, so blending treats them alike. No torch
here, so tabular experiments, blending and scoring stay fast to start.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from .config import Config, experiment_code, experiment_keys
from .data import CLASSES, load_test, load_train
from .folds import load_or_make_folds
from .io_utils import atomic_write_csv, atomic_write_json, file_digests
from .scoring import fold_metrics, read_prediction_csv
from .settings import KEYS

FINGERPRINT_VERSION = 4  # 3: the experiment's code is part of it; 4: MONET-missing features, oof_nomonet.csv
NOMONET = "oof_nomonet.csv"  # out-of-fold predictions of the path without MONET (src/features.py: has_monet)
PATH_COLUMNS = ("clin_path", "derm_path")


class StaleOutputs(ValueError):
    """Folds on disk were made under other result settings or other data than this run's."""


class ExperimentBusy(RuntimeError):
    """Another live run holds the experiment's folder."""


def probs_frame(ids, probs: np.ndarray) -> pd.DataFrame:
    """lesion_id + the 11 class columns: the submission's CSV format."""
    df = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=CLASSES)
    df.insert(0, "lesion_id", list(ids))
    return df


@dataclass(frozen=True)
class Lesions:
    """Training lesions (with labels), test lesions, and the shared fold of every training lesion."""

    train: pd.DataFrame
    test: pd.DataFrame
    folds: np.ndarray

    def labels(self) -> np.ndarray:
        return self.train[CLASSES].to_numpy(np.float64)


def load_lesions(cfg: Config, check_images: bool = False) -> Lesions:
    """The lesions of ``cfg.data_dir`` and the fold file every experiment shares (made on first use)."""
    train = load_train(cfg.data_dir, check_images=check_images)
    test = load_test(cfg.data_dir, check_images=check_images)
    folds = load_or_make_folds(train, cfg.resolved_folds_csv(), cfg.n_folds, cfg.fold_seed)["fold"]
    return Lesions(train, test, folds.to_numpy().astype(int))


# ----------------------------------------------------------------------------------------------------
# fingerprints: the settings and data that made a result
# ----------------------------------------------------------------------------------------------------
def result_settings(cfg: Config) -> dict:
    """The settings that change what ``cfg``'s folds compute, as each key's declaration says (``results``): the
    shared ones and its experiment's (its recipe's parts' and its own code's), and which experiment made them."""
    own = {k: cfg.own[k] for k, spec in experiment_keys(cfg.experiment).items() if spec.results}
    return {**{k: getattr(cfg, k) for k, spec in KEYS.items() if spec.results}, **own, "experiment": cfg.experiment}


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _table_bytes(frame: pd.DataFrame) -> Iterator[bytes]:
    frame = frame.drop(columns=[c for c in PATH_COLUMNS if c in frame.columns])
    yield ",".join(frame.columns).encode()
    yield pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()


def data_fingerprint(lesions: Lesions, images: bool = False, inputs: Sequence[Path] = (),
                     hash_store: Path | None = None) -> dict:
    """Short hashes of what a result was made from: ``tables`` (every lesion's metadata and labels), ``folds``,
    and where used ``image contents`` (each JPEG's SHA-256, in lesion order) and ``inputs`` (a stacker's input
    files). The JPEGs' digests are kept in ``hash_store`` (default: io_utils.hash_store_path()) and a JPEG is read
    again only when its size, times or inode changed, so a start costs a stat per image."""
    out = {"tables": _digest([*_table_bytes(lesions.train), *_table_bytes(lesions.test)]),
           "folds": _digest([np.asarray(lesions.folds, np.int64).tobytes()])}
    if images:
        paths = [p for t in (lesions.train, lesions.test) for c in PATH_COLUMNS for p in t[c]]
        out["image contents"] = _digest(d.encode() for d in file_digests(paths, hash_store))
    if inputs:
        out["inputs"] = _digest(Path(p).read_bytes() for p in inputs)
    return out


def fingerprint(cfg: Config, data: dict) -> dict:
    """What made a result: the settings that change it, the experiment's code (``config.experiment_code``: its
    train.py and the experiment files it imports, byte for byte) and the data."""
    return {"version": FINGERPRINT_VERSION, "settings": result_settings(cfg), "code": experiment_code(cfg.experiment),
            "data": data}


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, as 'key=saved -> current' lines, the files of code that changed and
    the parts of the data that differ; one line when the saved one was made by another version of the project."""
    if saved.get("version") != current.get("version"):
        return [f"made by another version of the project (fingerprint version {saved.get('version', 'none')}, "
                f"this one {current.get('version')})"]
    old, new = saved.get("settings", {}), current.get("settings", {})
    out = [f"{k}={old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in sorted(set(old) | set(new))
           if old.get(k) != new.get(k)]
    old_code, new_code = saved.get("code", {}), current.get("code", {})
    out += [f"{f} {'changed' if f in old_code and f in new_code else 'added' if f in new_code else 'no longer used'}"
            for f in sorted(set(old_code) | set(new_code)) if old_code.get(f) != new_code.get(f)]
    saved_data = saved.get("data") or {}
    out += [f"the {part} differ" + (" (labels or metadata changed)" if part == "tables" else "")
            for part in current["data"] if part in saved_data and saved_data[part] != current["data"][part]]
    return out


# ----------------------------------------------------------------------------------------------------
# the lock
# ----------------------------------------------------------------------------------------------------
@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` for this process's lifetime in the block (released by the kernel when the
    process dies, even by SIGKILL); a second holder is refused with who holds it."""
    path = folder / ".lock"
    fh = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise ExperimentBusy(f"{folder} is in use by another run ({holder}); wait for it to finish, or give "
                                 "this run its own folder with name=<another name>") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{shlex.join(sys.argv)}\n")
        fh.flush()
        yield
    finally:
        fh.close()


class ExperimentDir:
    """The output folder of one experiment: ``<output_dir>/<name>/`` with ``fold<k>/`` below it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.path = cfg.exp_dir()

    def fold_path(self, fold: int) -> Path:
        return self.cfg.fold_dir(fold)

    # --- starting ---------------------------------------------------------------------------------
    @contextmanager
    def session(self, current: dict, folds: Sequence[int] | None = None, retrain: bool = False) -> Iterator[list[int]]:
        """Lock the folder, refuse (or with ``retrain`` remove) folds whose fingerprint differs from ``current``,
        save the resolved config and yield the folds of ``folds`` (default: all) that are not complete."""
        self.path.mkdir(parents=True, exist_ok=True)
        with folder_lock(self.path):
            stale = self.stale_folds(current)
            if stale and not retrain:
                raise StaleOutputs(self._stale_message(stale))
            for k in stale:
                shutil.rmtree(self.fold_path(k))
                print(f"[{self.cfg.name}] fold {k}: removed, it was made under other settings or data "
                      "(retrain=true)", flush=True)
            self.cfg.save(self.path / "config.json")
            yield self.folds_to_do(folds)

    def stale_folds(self, current: dict) -> dict[int, list[str]]:
        """Fold -> what differs, for every fold folder (complete or in progress) made under other settings or
        other data than ``current``."""
        out = {}
        for k in range(self.cfg.n_folds):
            saved = self.saved_fingerprint(k)
            if saved is not None:
                diff = fingerprint_differences(saved, current)
                if diff:
                    out[k] = diff
        return out

    def saved_fingerprint(self, fold: int) -> dict | None:
        """The fingerprint a fold folder was made under ({} for a fold made before fingerprints); None where the
        folder holds no fold."""
        path = self.fold_path(fold)
        if (path / "fingerprint.json").is_file():
            return json.loads((path / "fingerprint.json").read_text(encoding="utf-8"))
        return {} if (path / "config.json").is_file() else None

    def _stale_message(self, stale: dict[int, list[str]]) -> str:
        if all(d[0].startswith("made by another version") for d in stale.values()):
            return (f"{self.path}: fold(s) {sorted(stale)} were "
                    f"{next(iter(stale.values()))[0]}: add "
                    "retrain=true to retrain them (their files are removed), or give this run its own folder with "
                    "name=<another name>")
        lines = [f"fold {k} ({'complete' if self.fold_done(k) else 'in progress'}): {'; '.join(diff)}"
                 for k, diff in stale.items()]
        return (f"{self.path} holds folds made under other settings or data than this run's, which would be mixed "
                "into one result:\n  " + "\n  ".join(lines) + "\nEither rerun with the settings they were made "
                "under, give this run its own folder with name=<another name>, or add retrain=true to retrain "
                "those folds (their files are removed).")

    def begin_fold(self, fold: int, current: dict) -> Path:
        """The fold's folder with the config and the fingerprint that train it."""
        path = self.fold_path(fold)
        path.mkdir(parents=True, exist_ok=True)
        self.cfg.save(path / "config.json")
        atomic_write_json(path / "fingerprint.json", current)
        return path

    # --- state --------------------------------------------------------------------------------------
    def fold_done(self, fold: int) -> bool:
        """A fold is complete once its metrics.json (always written last) exists."""
        return (self.fold_path(fold) / "metrics.json").is_file()

    def folds_to_do(self, folds: Sequence[int] | None = None) -> list[int]:
        return [k for k in (range(self.cfg.n_folds) if folds is None else folds) if not self.fold_done(k)]

    def missing(self) -> list[str]:
        """What the experiment still lacks to be blended or stacked: each fold's metrics.json, then the joined
        oof.csv and test.csv (paths relative to its folder); empty when complete."""
        lacking = [f"fold{k}/metrics.json" for k in range(self.cfg.n_folds) if not self.fold_done(k)]
        return lacking + [f for f in ("oof.csv", "test.csv") if not (self.path / f).is_file()]

    def incomplete_reason(self) -> str | None:
        """Why the experiment cannot be used yet, with the command that finishes it; None when complete."""
        fix = f"run `bash run.sh {self.cfg.name}` to finish it"
        if not self.path.is_dir():
            return f"experiment {self.cfg.name} is not complete: no outputs at {self.path}; {fix}"
        lacking = self.missing()
        folds = [int(f[4:f.index("/")]) for f in lacking if f.startswith("fold")]
        if folds:
            return (f"experiment {self.cfg.name} is not complete: fold(s) {folds} of {self.cfg.n_folds} have no "
                    f"metrics.json under {self.path}; {fix}")
        if lacking:
            return (f"experiment {self.cfg.name} is not complete: every fold is done but {self.path} has no "
                    f"{' or '.join(lacking)}; {fix} (it joins the folds)")
        return None

    # --- writing and reading ------------------------------------------------------------------------
    def write_fold(self, fold: int, oof: pd.DataFrame, test: pd.DataFrame, metrics: dict,
                   history: pd.DataFrame | None = None, oof_nomonet: pd.DataFrame | None = None) -> None:
        """A fold's out-of-fold and test predictions (and history, and the out-of-fold predictions of its path
        without MONET), then its metrics.json, which completes it."""
        path = self.fold_path(fold)
        atomic_write_csv(path / "oof.csv", oof)
        if oof_nomonet is not None:
            atomic_write_csv(path / NOMONET, oof_nomonet)
        atomic_write_csv(path / "test.csv", test)
        if history is not None:
            atomic_write_csv(path / "history.csv", history)
        atomic_write_json(path / "metrics.json", metrics)

    def recorded_data(self) -> dict | None:
        """The data fingerprint the joined oof.csv and test.csv were made from (None before fingerprints)."""
        path = self.path / "oof_metrics.json"
        if not path.is_file():
            return None
        return (json.loads(path.read_text(encoding="utf-8")).get("fingerprint") or {}).get("data")

    def fold_oof(self, fold: int) -> pd.DataFrame:
        """A complete fold's out-of-fold probabilities, indexed by lesion_id."""
        return pd.read_csv(self.fold_path(fold) / "oof.csv").set_index("lesion_id")[CLASSES]

    def read_probs(self, file: str, expected_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """``oof.csv`` or ``test.csv`` of the experiment through the scorer's reader (header, duplicates, values in
        [0, 1], missing or extra ids), in the order of ``expected_ids`` when given."""
        frame = read_prediction_csv(self.path / file, expected_ids=expected_ids)
        return frame if expected_ids is None else frame.loc[list(expected_ids)]

    def _join(self, folds: list[int], file: str, train: pd.DataFrame) -> pd.DataFrame:
        """The folds' ``file`` joined in training order; every training lesion must be there."""
        frame = pd.concat([pd.read_csv(self.fold_path(k) / file) for k in folds])
        frame = frame.set_index("lesion_id").reindex(train["lesion_id"]).reset_index()
        if frame[CLASSES].isna().any().any():
            raise ValueError(f"{self.path}: the folds' {file} files do not cover every training lesion")
        return frame

    def collect(self, train: pd.DataFrame) -> dict:
        """Join the folds' predictions into oof.csv (train order), oof_nomonet.csv (the same, of the path without
        MONET, where every fold has one) and test.csv (mean over folds), and score them. Folds made under different
        fingerprints are refused, never joined."""
        n = self.cfg.n_folds
        folds = [k for k in range(n) if self.fold_done(k)]
        if len(folds) < n:
            return {"complete": False, "missing_folds": sorted(set(range(n)) - set(folds))}
        prints = {k: self.saved_fingerprint(k) for k in folds}
        known = {k: p for k, p in prints.items() if p is not None and "data" in p}
        first = next(iter(known.values()), None)
        ref = min(known) if known else None
        mixed = {k: fingerprint_differences(p, first) for k, p in known.items() if fingerprint_differences(p, first)}
        if mixed:
            lines = "\n  ".join(f"fold {k} ({'; '.join(d)})" for k, d in mixed.items())
            raise StaleOutputs(f"{self.path}: its folds were made under different settings or data and cannot be "
                               f"joined (each fold's value -> fold {ref}'s):\n  {lines}\nRerun the experiment with "
                               "retrain=true to retrain the folds that differ from this run's settings.")
        oof = self._join(folds, "oof.csv", train)
        tests = [pd.read_csv(self.fold_path(k) / "test.csv").set_index("lesion_id") for k in folds]
        test = sum(t[CLASSES] for t in tests) / len(tests)
        blind = self._join(folds, NOMONET, train) if all((self.fold_path(k) / NOMONET).is_file() for k in folds) \
            else None
        if blind is not None:
            atomic_write_csv(self.path / NOMONET, blind)
        else:
            (self.path / NOMONET).unlink(missing_ok=True)
        atomic_write_csv(self.path / "oof.csv", oof)
        atomic_write_csv(self.path / "test.csv", test.reset_index())
        metrics = fold_metrics(train[CLASSES].to_numpy(np.float32), oof[CLASSES].to_numpy(np.float32))
        metrics["complete"] = True
        if blind is not None:
            metrics["macro_f1_without_monet"] = fold_metrics(train[CLASSES].to_numpy(np.float32),
                                                             blind[CLASSES].to_numpy(np.float32))["macro_f1"]
        if first is not None:
            metrics["fingerprint"] = first
        atomic_write_json(self.path / "oof_metrics.json", metrics)
        return metrics
