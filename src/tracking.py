"""Weights & Biases, used so that it can never stop a training run.

One group per experiment, one run per fold. Mode: the config's ``wandb_mode``, else env WANDB_MODE, else
'online' when the user has logged in (`wandb login` or WANDB_API_KEY), else 'offline' (runs land in
<output_dir>/<exp>/wandb/ and `wandb sync` uploads them later). An online run waits at most INIT_TIMEOUT seconds for
the server; the first online run that cannot start (server unreachable, timeout, refused key) switches the whole
process to offline at once, with one line saying so: that run and every later one log offline, nothing is lost.
Any other exception from wandb is reported once and the tracker turns itself off.
"""
from __future__ import annotations

import os
import sys
from typing import Any


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


class Tracker:
    def __init__(self, cfg, job: str, run_id: str | None = None, job_type: str = "train"):
        self.run = None
        self.mode = resolve_mode(cfg)
        if self.mode == "disabled":
            return
        global _offline_since
        if self.mode == "online" and _offline_since is not None:
            self.mode = "offline"
        try:
            import wandb

            wdir = cfg.exp_dir()
            wdir.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            args = dict(project=cfg.wandb_project, group=cfg.name, name=f"{cfg.name}/{job}", job_type=job_type,
                        config=cfg.to_dict(), dir=str(wdir), id=run_id, resume="allow" if run_id else None,
                        reinit="create_new")
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
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def summary(self, data: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
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

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
        self.run = None


def read_offline_run(run_file) -> dict[str, Any]:
    """Read an offline run's ``run-<id>.wandb`` log without uploading it: run id, group, name, the history rows
    and the last summary values. The file is a sequence of 32 KiB blocks holding length-prefixed protobuf records
    (7-byte file header, 7-byte record headers: crc32, length, type; types 1 full, 2 first, 3 middle, 4 last)."""
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
    out: dict[str, Any] = {"history": [], "summary": {}, "run_id": None, "group": None, "name": None}

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    for data in records:
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(run_id=rec.run.run_id, group=rec.run.run_group, name=rec.run.display_name)
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in rec.summary.update})
    return out
