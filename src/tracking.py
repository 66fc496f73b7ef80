"""Weights & Biases, used so that it can never stop a training run.

Layout: one group per experiment (a run per fold, job type 'train', and the run of the experiment's own submission,
job type 'blend'), one group per blend of several experiments (``blend/<name>``, job type 'blend'); tuning trials
('tune') and exports ('export') join the group of what they tune or export. Every run is tagged with where its data
comes from (``data:generated`` | ``data:rehearsal`` | ``data:real``, see :func:`data_origin`) and its kind
(``kind:image`` | ``kind:tabular`` | ``kind:stack`` | ``kind:blend``), both also config fields (``data_origin``,
``kind``); runs on data that is not real carry the origin in their group and run names too (``exp001@generated``),
so a demo never shares a group with a real run. Metric names are the same for every kind: ``val/...`` for a fold's
validation rows (``val/macro_f1``, ``val/f1/<class>``, ``val/loss``, ``val/auc``), ``oof/...`` for a submission's
out-of-fold scores (``oof/macro_f1_honest``, ``oof/f1/<class>`` of its honest decisions).

Mode: the config's ``wandb_mode``, else env WANDB_MODE, else 'online' when the user has logged in (`wandb login` or
WANDB_API_KEY), else 'offline' (runs land in <output_dir>/<exp>/wandb/ and `wandb sync` uploads them later, artifacts
included). An online run waits at most INIT_TIMEOUT seconds for the server; the first online run that cannot start
(server unreachable, timeout, refused key) switches the whole process to offline at once, with one line saying so:
that run and every later one log offline, nothing is lost. Any other exception from wandb is reported once and the
tracker turns itself off.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable


def logged_in() -> bool:
    """An API key in the environment, or the entry `wandb login` writes to ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


INIT_TIMEOUT = 15.0  # seconds an online run waits for the server before this process logs offline
_offline_since: str | None = None  # why this process logs offline although online was asked for


def resolve_mode(cfg) -> str:
    return cfg.wandb_mode or os.environ.get("WANDB_MODE", "") or ("online" if logged_in() else "offline")


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line; where wandb gives no message, what caused it or what the type means."""
    text = str(exc).strip()
    if not text and (exc.__cause__ or exc.__context__) is not None:
        inner = exc.__cause__ or exc.__context__
        text = f"{type(inner).__name__}: {str(inner).strip() or 'no message'}"
    if not text:
        doc = (type(exc).__doc__ or "").strip().splitlines()
        text = f"no message ({doc[0].rstrip('.')})" if doc else "no message"
    first = text.splitlines()[0].strip()
    return f"{type(exc).__name__}: {first[:300]}"


SYNTH_RATIO = 0.6  # drawn_by_synth: pixel differences inside 2x2 blocks below this share of those across blocks


def drawn_by_synth(path) -> bool:
    """Whether a JPEG looks drawn by src/tools/synth.py: it draws at half resolution and doubles every pixel, so
    neighbouring pixels inside a 2x2 block differ far less (about 0.35x after JPEG) than neighbours across two
    blocks, where a photograph's differ alike (about 1.0x)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            x = np.asarray(im.convert("L"), np.float32)
    except Exception:  # noqa: BLE001 - an unreadable image is not evidence either way
        return False
    x = x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2]
    if min(x.shape) < 8:
        return False
    inside = np.abs(x[:, 0::2] - x[:, 1::2]).mean() + np.abs(x[0::2] - x[1::2]).mean()
    across = np.abs(x[:, 1:-1:2] - x[:, 2::2]).mean() + np.abs(x[1:-1:2] - x[2::2]).mean()
    return bool(across > 0 and inside < SYNTH_RATIO * across)


@functools.lru_cache(maxsize=8)
def data_origin(data_dir) -> str:
    """Where the data in ``data_dir`` comes from: 'generated' (a miniature MILK10k made by src/tools/synth.py's
    ``generate``, as the demo's: only it writes test labels, to ``hidden/``; the official release has none),
    'rehearsal' (CSVs with images drawn by synth: the first two training lesions' images all pass
    :func:`drawn_by_synth`), else 'real'. Read from the data itself, so a copied or renamed folder keeps its label."""
    from .data import locate
    from .tools.synth import HIDDEN_TEST_TRUTH

    root = Path(data_dir).expanduser()
    if (root / HIDDEN_TEST_TRUTH).is_file():
        return "generated"
    images = locate(root).train_images
    try:
        lesions = sorted(os.listdir(images))[:2] if images is not None else []
        jpegs = [p for lesion in lesions for p in sorted((images / lesion).glob("*.jpg"))]
    except OSError:
        jpegs = []
    return "rehearsal" if jpegs and all(drawn_by_synth(p) for p in jpegs) else "real"


def labelled(name: str, origin: str) -> str:
    """A group or run name carrying the data's origin unless the data is real: ``exp001@generated``."""
    return name if origin == "real" else f"{name}@{origin}"


def submission_group(name: str, experiments: list[str]) -> str:
    """The group of a submission's run: its experiment's own group when it is one experiment, else ``blend/<name>``."""
    return experiments[0] if len(experiments) == 1 else f"blend/{name}"


def fold_scores(metrics: dict) -> dict[str, float]:
    """A fold's validation scores (scoring.fold_metrics) under the names every kind of experiment logs."""
    out = {"val/macro_f1": metrics["macro_f1"], "val/loss": metrics["loss"], "val/accuracy": metrics["accuracy"],
           **{f"val/f1/{c}": v for c, v in metrics["f1"].items()}}
    if metrics.get("auc_macro") is not None:
        out["val/auc"] = metrics["auc_macro"]
    return out


class Tracker:
    """One W&B run: ``job`` names it within its group (``<group>/<job>``; the group alone when empty); ``group``
    defaults to the experiment's name; ``kind`` is the experiment's kind or 'blend' (tags and config); ``where``:
    the folder whose wandb/ holds the run's files (default the experiment's folder)."""

    def __init__(self, cfg, job: str, run_id: str | None = None, job_type: str = "train", kind: str = "",
                 group: str | None = None, where: Path | None = None):
        self.run = None
        self.origin, self.group, self._pending = "real", "", False
        self.mode = resolve_mode(cfg)
        if self.mode == "disabled":
            return
        global _offline_since
        if self.mode == "online" and _offline_since is not None:
            self.mode = "offline"
        try:
            import wandb

            wdir = Path(where) if where is not None else cfg.exp_dir()
            wdir.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            origin = data_origin(str(cfg.data_dir))
            self.origin, self.group = origin, labelled(group or cfg.name, origin)
            args = dict(project=cfg.wandb_project, group=self.group, name=f"{self.group}/{job}" if job else self.group,
                        job_type=job_type, tags=[f"data:{origin}", *([f"kind:{kind}"] if kind else [])],
                        config={**cfg.to_dict(), "data_origin": origin, "kind": kind}, dir=str(wdir), id=run_id,
                        resume="allow" if run_id else None, reinit="create_new")
            if self.mode == "online":
                bounded = None if os.environ.get("WANDB_INIT_TIMEOUT") else wandb.Settings(init_timeout=INIT_TIMEOUT)
                try:
                    self.run = wandb.init(**args, mode="online", settings=bounded)
                    return
                except Exception as exc:  # noqa: BLE001 - unreachable server, timeout, refused key: go offline
                    _offline_since = describe(exc)
                    self.mode = "offline"
                    print(f"[wandb] cannot reach the server ({_offline_since}); logging offline for the rest of this "
                          f"process: `wandb sync {wdir / 'wandb'}/offline-run-*` uploads later", file=sys.stderr,
                          flush=True)
            self.run = wandb.init(**args, mode=self.mode)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._fail(exc)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    @property
    def run_dir(self) -> str | None:
        return self.run.dir if self.run is not None else None

    def _fail(self, exc: BaseException) -> None:
        print(f"[wandb] disabled after an error: {describe(exc)}", file=sys.stderr)
        self.run = None

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data, step=step)
            self._pending = step is not None  # a row of a given step is written only when the next one begins
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def summary(self, data: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            if self._pending:  # write the last row first: finish() would write it after these values, over them
                self.run.log({}, commit=True)
                self._pending = False
            for k, v in data.items():
                self.run.summary[k] = v
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def log_images(self, images: dict[str, str]) -> None:
        if self.run is None:
            return
        try:
            import wandb

            self.run.log({k: wandb.Image(v) for k, v in images.items()})
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def log_artifact(self, owner: str, kind: str, files: Iterable, metadata: dict | None = None,
                     what: str | None = None) -> None:
        """The existing ``files`` as one artifact of type ``kind``, named ``<owner>-<what>`` (``what`` defaults to
        ``kind``; the owner carries the data's origin unless it is real: ``exp001-generated-predictions``). Offline,
        wandb stages a copy (under WANDB_DATA_DIR) and records it in the run's log; `wandb sync` uploads it. Each file
        keeps its own name."""
        if self.run is None:
            return
        try:
            import wandb

            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", labelled(owner, self.origin)) + f"-{what or kind}"
            art = wandb.Artifact(name, type=kind, metadata=metadata or {})
            for path in files:
                if Path(path).is_file():
                    art.add_file(str(path), name=Path(path).name)
            self.run.log_artifact(art)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
        self.run = None


def track_export(source, paths: dict) -> None:
    """An export's W&B run in the group of the submission it exports (job type 'export'): its model card, reliability
    plot and bundle.json as a 'model-card' artifact. Its files go beside the export folder, never into it."""
    names = list(source.weights)
    first = source.members[names[0]]
    folder = Path(paths["folder"])
    tracker = Tracker(first.cfg, "export", job_type="export", kind=first.kind if len(names) == 1 else "blend",
                      group=submission_group(source.name, names), where=folder.parent)
    tracker.log_artifact(source.name, "model-card",
                         [paths["model_card"], folder / "reliability.png", folder / "bundle.json"],
                         {"cv_macro_f1_honest": source.info.get("cv_macro_f1_honest"), "weights": source.weights})
    tracker.finish()


def read_offline_run(run_file) -> dict[str, Any]:
    """Read an offline run's ``run-<id>.wandb`` log without uploading it: run id, group, name, job type, tags,
    config, the history rows, the last summary values and the artifacts logged (name, type, metadata, the files'
    names). The file is a sequence of 32 KiB blocks holding length-prefixed protobuf records (7-byte file header,
    7-byte record headers: crc32, length, type; types 1 full, 2 first, 3 middle, 4 last)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw = open(run_file, "rb").read()
    if raw[:4] != b":W&B":
        raise ValueError(f"{run_file}: not a W&B run log")
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        buf += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(buf)
            buf = b""
    out: dict[str, Any] = {"history": [], "summary": {}, "run_id": None, "group": None, "name": None,
                           "job_type": None, "tags": [], "config": {}, "artifacts": []}

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    for data in records:
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(run_id=rec.run.run_id, group=rec.run.run_group, name=rec.run.display_name,
                       job_type=rec.run.job_type, tags=list(rec.run.tags))
            out["config"].update({key(i): json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "artifact":
            a = rec.artifact
            out["artifacts"].append({"name": a.name, "type": a.type, "metadata": json.loads(a.metadata or "{}"),
                                     "files": sorted(c.path for c in a.manifest.contents)})
    return out
