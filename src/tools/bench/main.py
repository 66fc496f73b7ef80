"""Training and inference throughput of exp001 on one device, side by side with a reference and a naive pipeline.

    python -m src.tools.bench [--device auto|cpu|cuda] [--batch 64] [--img-size 256] [--steps 20] [--warmup 5]
                        [--backbone NAME] [--n-lesions 256] [--workers -1] [--compile] [--out bench.json]
                        [--only a,b,c,d,e] [--epochs-for-projection N] [--profile] [--fuse]
                        [--variants fuse,compile,fuse+compile:reduce-overhead,streams]
                        [--cache-on-device auto|yes|no]

Rows (pairs/s over the timed steps after the warm-up steps, and peak memory):
  a   exp001's stage-2 training step (DeviceAugment train path, real loss, AdamW) on uint8 pairs already on the device
  a2  the same step with the two backbones fused into one network of twice the width (fuse_backbones=true);
      skipped where row a already fuses them (--fuse) or the backbone cannot be fused
  b   reference: one backbone of the same kind over both images batched together (shared_backbone=True)
  c1  stage 1 (backbones frozen), end to end as in c
  c   end to end: generated 600x450 JPEGs -> prepared image cache -> the training loop's batches (a DataLoader
      over the memory-mapped cache, or gathered from the cache in device memory, as cache_on_device resolves)
      -> DeviceAugment -> step
  d   naive: PIL decode + torchvision transforms every step in a default DataLoader, fp32, same model and optimiser
  e1  inference on the cache with src.inference.predict, 1 view (the per-epoch validation)
  e   the same with 8-view TTA (out-of-fold and test predictions)
``--variants`` adds row a under other speed switches (each also against row b), to pick the switches for a GPU;
then the ratios c/a, a/b, c/d against their targets and the projected wall time of a full exp001 at the real data
sizes. Timings synchronise CUDA before reading the clock. Weights are never downloaded (pretrained=False).
Results: a printed table and ``<output_dir>/bench/bench_<device>.json``; ``--profile`` adds a torch.profiler table
of rows a and a2 (``profile_a_<device>.txt``, ``profile_a2_<device>.txt`` beside the JSON), with the device kernels
(CUDA) or aten ops (CPU) each step launches.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
from pathlib import Path

import torch

from ...batches import resolve_device, resolve_workers
from ...config import Config, load_config
from ...io_utils import atomic_write_json
from ...speed.fuse import FusionUnsupported
from .rows import (ROWS, BenchData, Settings, bench_device_tensors, bench_loader, bench_naive, bench_predict,
                         device_name, prepare_data)
from ...speed.device_cache import resolve_cache_on_device

EXPERIMENT = "exp001"
FULL_TRAIN, FULL_TEST = 5240, 479          # lesions of the official release
RATIO_TARGETS = {"c/a": 0.9, "a/b": 0.9, "a2/b": 0.9, "c/d": 2.0}
MEMORY_TARGET_GIB = 16.0
PROJECTION_TARGET_MIN = 20.0
GROUPS = {"a": ("a", "a2"), "b": ("b",), "c": ("c1", "c"), "d": ("d",), "e": ("e1", "e")}


# ----------------------------------------------------------------------------------------------------
# ratios, projection, report
# ----------------------------------------------------------------------------------------------------
def ratios(rows: dict) -> dict:
    out = {}
    for name, target in RATIO_TARGETS.items():
        num, den = name.split("/")
        if num in rows and den in rows:
            value = rows[num]["pairs_per_s"] / rows[den]["pairs_per_s"]
            out[name] = {"value": value, "target": target, "ok": value >= target}
    return out


def project(cfg: Config, rows: dict, data: BenchData, epochs: int) -> dict | None:
    """Wall time of a full exp001 at the real sizes: n_folds x (stage-1 epochs at rate c1 + stage-2 epochs at rate
    c + per-epoch validation at rate e1 + out-of-fold and test predictions at rate e), no early stopping."""
    if not {"c1", "c", "e1", "e"} <= rows.keys():
        return None
    b, k = cfg.batch_size, cfg.n_folds
    n_val = FULL_TRAIN // k
    n_tr = FULL_TRAIN - n_val
    pairs = (n_tr // b) * b if n_tr >= b else n_tr  # epoch_order drops the last partial batch
    rate = {key: rows[key]["pairs_per_s"] for key in ("c1", "c", "e1", "e")}
    per_fold = {
        "stage1_s": cfg.stage1_epochs * pairs / rate["c1"],
        "stage2_s": epochs * pairs / rate["c"],
        "validation_s": (cfg.stage1_epochs + epochs) * n_val / rate["e1"],
        "oof_test_s": (n_val + FULL_TEST) / rate["e" if cfg.tta else "e1"],
    }
    total = k * sum(per_fold.values())
    return {"total_s": total, "minutes": total / 60, "target_min": PROJECTION_TARGET_MIN,
            "ok": total / 60 < PROJECTION_TARGET_MIN, "per_fold": per_fold,
            "cache_build_s": (FULL_TRAIN + FULL_TEST) * data.cache_seconds / data.n,
            "assumptions": {"n_folds": k, "train_lesions": FULL_TRAIN, "test_lesions": FULL_TEST,
                            "train_pairs_per_epoch": pairs, "val_pairs": n_val, "stage1_epochs": cfg.stage1_epochs,
                            "stage2_epochs": epochs, "tta_views": 8 if cfg.tta else 1, "early_stopping": False}}


def host_cpu() -> str:
    """The host processor's model and core count: a launch-bound step runs at the host's single-thread speed."""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def _mem(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def format_table(result: dict) -> str:
    st, rows = result["settings"], result["rows"]
    cuda = result["device"] == "cuda"
    lines = [
        f"MILK10k throughput on {result['device_name']} ({result['device']}, torch {result['torch']}; host "
        f"{result['host_cpu']})",
        f"{st['backbone']}, {st['img_size']} px, batch {st['batch']}, {st['steps']} timed steps after {st['warmup']} "
        f"warm-up, {st['workers']} loader workers, {st['n_lesions']} generated lesions, "
        f"{'bf16 autocast' if st['amp'] else 'fp32'}, {'channels_last' if st['channels_last'] else 'NCHW'}, "
        f"compile {'on' if st['compile'] else 'off'}, fused backbones {'on' if st.get('fuse') else 'off'}, image "
        f"cache in {'device' if st.get('cache_on_device') else 'host'} memory",
        "",
        f"{'row':<4}{'path':<46}{'pairs/s':>10}  {'peak ' + ('device mem' if cuda else 'RSS growth'):>16}  data wait",
    ]
    for key, row in rows.items():
        wait = f"{row['data_wait_frac']:>8.0%}" if "data_wait_frac" in row else ""
        lines.append(f"{key:<4}{ROWS[key]:<46}{row['pairs_per_s']:>10.1f}  {_mem(row['peak_mem_bytes']):>16}  {wait}")
    if result.get("variants"):
        lines += ["", f"row a under other switches {'pairs/s':>29}  {'peak mem':>16}  vs row b"]
        for name, row in result["variants"].items():
            vs = f"{row['vs_b']:>8.3f}" if "vs_b" in row else ""
            lines.append(f"  {name:<48}{row['pairs_per_s']:>10.1f}  {_mem(row['peak_mem_bytes']):>16}  {vs}")
        best = max(result["variants"], key=lambda k: result["variants"][k]["pairs_per_s"])
        sw = result["variants"][best]["switches"]
        keys = ["fuse_backbones", "compile", "branch_streams"] + (["compile_mode"] if sw.get("compile") else [])
        lines.append(f"  fastest: {best}, i.e. " + " ".join(f"{k}={str(sw[k]).lower()}" for k in keys))
    lines += ["", f"{'check':<28}{'value':>10}  {'target':<22}"]
    for name, r in result["ratios"].items():
        target = f">= {r['target']:g}"
        lines.append(f"{name:<28}{r['value']:>10.3f}  {target:<22}{'ok' if r['ok'] else 'MISSED'}")
    mem = result["memory"]
    if mem is not None:
        note = "" if st["batch"] == 64 else f" (measured at batch {st['batch']})"
        label = "peak memory of a + cache" if mem.get("cache_bytes") else "peak memory of a"
        lines.append(f"{label:<28}{_mem(mem['bytes']):>10}  {'<= 16 GiB at batch 64':<22}"
                     f"{'ok' if mem['ok'] else 'MISSED'}{note}")
    p = result["projection"]
    if p is not None:
        a = p["assumptions"]
        note = "" if st["as_exp001"] else " (not exp001's model, size or batch)"
        lines.append(f"{'projected full exp001':<28}{p['minutes']:>6.1f} min  {'< 20 min on one H100':<22}"
                     f"{'ok' if p['ok'] else 'MISSED'}{note}")
        f = p["per_fold"]
        lines.append(f"  {a['n_folds']} folds x ({a['stage1_epochs']} stage-1 + {a['stage2_epochs']} stage-2 epochs of "
                     f"{a['train_pairs_per_epoch']} pairs, {a['val_pairs']} val / {a['test_lesions']} test lesions); "
                     f"per fold: stage 1 {f['stage1_s']:.0f} s, stage 2 {f['stage2_s']:.0f} s, validation "
                     f"{f['validation_s']:.0f} s, oof+test TTA {f['oof_test_s']:.0f} s")
        lines.append(f"  plus a one-time image cache build of {a['train_lesions'] + a['test_lesions']} lesions: "
                     f"~{p['cache_build_s']:.0f} s ({st['cache_workers']} decode processes)")
    if any(not r["ok"] for r in result["ratios"].values()) and not st["profile"]:
        lines.append("a target is missed: rerun with --profile for the ops behind row a")
    for key in ("a", "a2"):
        prof = rows.get(key, {}).get("profile")
        if prof:
            lines.append(f"profile of row {key}: {prof['path']} ({'device' if cuda else 'CPU'} self time "
                         f"{prof['self_ms_per_step']:.1f} ms of a {prof['timed_ms_per_step']:.1f} ms step: "
                         f"busy {prof['busy_frac']:.0%}; {prof['launches_per_step']:.0f} {prof['launch_unit']} "
                         "per step)")
    lines.append(f"written: {result['out']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m src.tools.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=None, help=f"pairs per step (default: {EXPERIMENT}'s batch_size, 64)")
    p.add_argument("--img-size", type=int, default=None, help=f"image size (default: {EXPERIMENT}'s img_size, 256)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    p.add_argument("--backbone", default="tf_efficientnetv2_s", help="timm model (random weights, never downloaded)")
    p.add_argument("--n-lesions", type=int, default=256, help="generated 600x450 JPEG pairs for rows c, d, e")
    p.add_argument("--workers", type=int, default=-1, help="loader workers of rows c and d (-1: as training does)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model of rows a, b, c (as compile=true)")
    p.add_argument("--out", default=None, help="JSON path (default: <output_dir>/bench/bench_<device>.json)")
    p.add_argument("--only", default="a,b,c,d,e", help="comma list of rows to run (c includes c1, e includes e1)")
    p.add_argument("--epochs-for-projection", type=int, default=None,
                   help=f"stage-2 epochs of the projection (default: {EXPERIMENT}'s epochs)")
    p.add_argument("--profile", action="store_true", help="write torch.profiler tables of rows a, a2 beside the JSON")
    p.add_argument("--fuse", action="store_true",
                   help="fuse the two backbones in every row but b (as fuse_backbones=true); row a2 is then skipped")
    p.add_argument("--cache-on-device", default="auto", choices=["auto", "yes", "no"],
                   help="rows c1, c, e1, e: image cache in device memory, as cache_on_device (auto: as training "
                        "decides for the full release's caches)")
    p.add_argument("--variants", default="",
                   help="comma list of extra row-a measurements, each a '+'-joined set of switches: fuse "
                        "(fuse_backbones), compile or compile:MODE (torch.compile, e.g. compile:reduce-overhead), "
                        "streams (branch_streams), eager (none)")
    args = p.parse_args(argv)
    try:
        args.variants = parse_variants(args.variants)
    except ValueError as exc:
        p.error(str(exc))
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in GROUPS]
    if bad or not only:
        p.error(f"--only {args.only!r}: rows are {', '.join(GROUPS)}")
    for name in ("steps", "warmup", "n_lesions", "batch", "img_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    args.only = only
    return args


def parse_variants(text: str) -> dict[str, dict]:
    """``"fuse,fuse+compile:reduce-overhead"`` -> {name: config overrides}."""
    out = {}
    for name in (x.strip() for x in text.split(",")):
        if not name:
            continue
        over: dict = {"fuse_backbones": False, "compile": False, "branch_streams": False}
        for part in name.split("+"):
            key, _, mode = part.partition(":")
            if key == "fuse" and not mode:
                over["fuse_backbones"] = True
            elif key == "compile":
                over["compile"] = True
                over["compile_mode"] = mode or "default"
            elif key == "streams" and not mode:
                over["branch_streams"] = True
            elif key != "eager" or mode:
                raise ValueError(f"--variants: {part!r} in {name!r} is not one of fuse, compile, compile:MODE, "
                                 "streams, eager")
        out[name] = over
    return out


def bench_config(args: argparse.Namespace) -> Config:
    """exp001's config with the benchmark's switches (random weights, never downloaded)."""
    overrides: dict = {"backbone": args.backbone, "pretrained": False, "device": args.device,
                       "num_workers": args.workers, "compile": args.compile,
                       "cache_on_device": args.cache_on_device}
    if args.fuse:
        overrides["fuse_backbones"] = True
    if args.batch is not None:
        overrides["batch_size"] = args.batch
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    return load_config(EXPERIMENT, overrides)


def measure_rows(s: Settings, data: BenchData, only: list[str]) -> dict:
    """The rows of the groups in ``only``, in table order; a backbone that cannot be fused skips row a2."""
    jobs = {"a": lambda: bench_device_tensors(s, data, "a"),
            "a2": lambda: bench_device_tensors(s, data, "a2", fuse_backbones=True),
            "b": lambda: bench_device_tensors(s, data, "b", shared_backbone=True),
            "c1": lambda: bench_loader(s, data, stage=1), "c": lambda: bench_loader(s, data, stage=2),
            "d": lambda: bench_naive(s, data),
            "e1": lambda: bench_predict(s, data, views=1), "e": lambda: bench_predict(s, data, views=8)}
    rows: dict = {}
    for key in ROWS:
        if not any(key in GROUPS[g] for g in only) or (key == "a2" and s.cfg.fuse_backbones):
            continue
        try:
            rows[key] = jobs[key]()
        except FusionUnsupported as exc:
            print(f"[bench] {key:<3}skipped: {exc}", flush=True)
            continue
        print(f"[bench] {key:<3}{ROWS[key]:<46}{rows[key]['pairs_per_s']:>10.1f} pairs/s", flush=True)
        gc.collect()
    return rows


def measure_variants(s: Settings, data: BenchData, variants: dict[str, dict], rows: dict) -> dict:
    """Row a under each set of switches, each also as a ratio to row b."""
    out: dict = {}
    for name, over in variants.items():
        try:
            out[name] = bench_device_tensors(s, data, "variant", **over)
        except FusionUnsupported as exc:
            print(f"[bench] variant {name}: skipped: {exc}", flush=True)
            continue
        out[name]["switches"] = over
        if "b" in rows:
            out[name]["vs_b"] = out[name]["pairs_per_s"] / rows["b"]["pairs_per_s"]
        print(f"[bench] variant {name:<38}{out[name]['pairs_per_s']:>10.1f} pairs/s", flush=True)
        gc.collect()
    return out


def memory_check(cfg: Config, rows: dict, cache_bytes: int) -> dict | None:
    """Peak memory of row a (else c), plus the full release's image cache when training holds it on the device."""
    mem_row = rows.get("a") or rows.get("c")
    if mem_row is None or mem_row["peak_mem_bytes"] is None:
        return None
    peak = mem_row["peak_mem_bytes"] + cache_bytes
    return {"bytes": peak, "gib": peak / 2**30, "target_gib": MEMORY_TARGET_GIB,
            "ok": peak / 2**30 <= MEMORY_TARGET_GIB, "batch": cfg.batch_size, "cache_bytes": cache_bytes}


def run(args: argparse.Namespace) -> dict:
    reference, cfg = load_config(EXPERIMENT), bench_config(args)
    device = resolve_device(cfg)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "bench" / f"bench_{device.type}.json"
    n_tr = FULL_TRAIN - FULL_TRAIN // cfg.n_folds
    full_cache_bytes = (FULL_TRAIN + FULL_TEST) * 2 * cfg.img_size ** 2 * 3  # as training would hold it
    s = Settings(cfg, device, args.steps, args.warmup, resolve_workers(cfg, device),
                 max(1, n_tr // cfg.batch_size), out.parent, args.profile,
                 resolve_cache_on_device(cfg.cache_on_device, device, full_cache_bytes))
    epochs = cfg.epochs if args.epochs_for_projection is None else args.epochs_for_projection

    with tempfile.TemporaryDirectory(prefix="milk10k-bench-") as tmp:
        print(f"[bench] generating {args.n_lesions} lesion pairs (600x450 JPEGs) and their {cfg.img_size} px cache "
              f"on {device_name(device)}", flush=True)
        data = prepare_data(cfg, args.n_lesions, Path(tmp))
        rows = measure_rows(s, data, args.only)
        variants = measure_variants(s, data, args.variants, rows)
        projection = project(cfg, rows, data, epochs)
        cache = {"seconds": data.cache_seconds, "lesions": data.n, "workers": data.cache_workers}

    result = {
        "device": device.type, "device_name": device_name(device), "host_cpu": host_cpu(), "torch": torch.__version__,
        "settings": {"experiment": EXPERIMENT, "backbone": cfg.backbone, "img_size": cfg.img_size,
                     "batch": cfg.batch_size, "steps": args.steps, "warmup": args.warmup, "workers": s.workers,
                     "n_lesions": args.n_lesions, "amp": device.type == "cuda" and cfg.amp,
                     "channels_last": device.type == "cuda" and cfg.channels_last, "compile": cfg.compile,
                     "fuse": cfg.fuse_backbones, "cache_on_device": s.on_device, "only": args.only,
                     "profile": args.profile, "cache_workers": data.cache_workers,
                     "as_exp001": (cfg.backbone.split(".")[0], cfg.img_size, cfg.batch_size)
                     == (reference.backbone.split(".")[0], reference.img_size, reference.batch_size)},
        "rows": rows, "variants": variants, "ratios": ratios(rows),
        "memory": memory_check(cfg, rows, full_cache_bytes if s.on_device else 0), "projection": projection,
        "cache_build": cache, "out": str(out),
    }
    atomic_write_json(out, result)
    print("\n" + format_table(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))
