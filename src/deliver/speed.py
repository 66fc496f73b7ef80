"""How fast ``predict`` is on this machine: lesions per second of the whole path (decode both JPEGs, the metadata
features, every fold's network over every TTA view) with the tiny backbone, and the projected time of the 479 test
lesions with exp001 (two EfficientNetV2-S at 256 px, 5 folds x 8 views).

    bash run.sh predict --speed [--lesions 40] [--device cpu] [--threads N]

Randomly initialised networks (speed does not depend on the weights; nothing is downloaded), generated 600x450 JPEG
pairs. The projection times exp001's network on a few lesions over all 8 views and one fold, then scales: 479 x
(decode + 5 x one fold's 8 views). Every figure is printed with the thread count it was measured with.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from ..config import experiment_recipe, load_config
from ..data import load_test
from ..inference import predict
from .predict import decode_images
from ..tools.synth import generate

TEST_LESIONS = 479


def _fold_net(cfg, n_meta: int, device):
    return experiment_recipe(cfg.experiment).build(cfg, n_meta, 0, device)


def timed_predict(cfg, lesions, folds: int, views: int, device) -> dict:
    """Seconds to decode ``lesions`` at cfg.img_size and to run ``folds`` networks over ``views`` views each."""
    from ..features import MetadataFeatures

    t0 = time.perf_counter()
    images = decode_images(lesions, cfg.img_size)
    t_decode = time.perf_counter() - t0
    features = MetadataFeatures("base").fit(lesions)
    meta = features.transform(lesions)
    rows = np.arange(len(lesions))
    nets = [_fold_net(cfg, meta.shape[1], device) for _ in range(folds)]
    model, augment = nets[0]
    link = experiment_recipe(cfg.experiment).loss.link(cfg)
    predict(model, link, cfg, images, rows[:2], meta[:2], augment, device, 1, "warm-up")
    t1 = time.perf_counter()
    for model, augment in nets:
        predict(model, link, cfg, images, rows, meta, augment, device, views, "speed")
    return {"decode_s": t_decode, "models_s": time.perf_counter() - t1, "n": len(lesions)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bash run.sh predict --speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lesions", type=int, default=40, help="generated lesions for the tiny backbone (default 40)")
    ap.add_argument("--exp001-lesions", type=int, default=4, help="lesions timed with exp001's network (default 4)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    ns = ap.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    device = torch.device(ns.device)
    with tempfile.TemporaryDirectory(prefix="milk10k-speed-") as tmp:
        data = generate(f"{tmp}/data", n_train=12, n_test=max(ns.lesions, ns.exp001_lesions), seed=0)
        lesions = load_test(data, check_images=True)
        demo = load_config("exp001", preset="demo")
        tiny = demo.replace(device=ns.device, data_dir=str(data))
        r = timed_predict(tiny, lesions.iloc[:ns.lesions].reset_index(drop=True), 5, 8, device)
        total = r["decode_s"] + r["models_s"]
        print(f"tiny backbone ({tiny.backbone}, {tiny.img_size} px, 5 folds x 8 views), {r['n']} lesions on {device} "
              f"({torch.get_num_threads()} threads): {r['n'] / total:.1f} lesions/s (decode {r['decode_s']:.2f}s, "
              f"networks {r['models_s']:.2f}s)", flush=True)
        exp001 = load_config("exp001", ["pretrained=false", f"device={ns.device}", f"data_dir={data}"])
        sub = lesions.iloc[:ns.exp001_lesions].reset_index(drop=True)
        r = timed_predict(exp001, sub, 1, 8, device)
        per_lesion = r["decode_s"] / r["n"] + 5 * r["models_s"] / r["n"]
        print(f"exp001 ({exp001.backbone} x2, {exp001.img_size} px): one fold's 8 views "
              f"{r['models_s'] / r['n']:.2f}s per lesion, decode {r['decode_s'] / r['n'] * 1000:.0f} ms per lesion; "
              f"projected for the {TEST_LESIONS} test lesions with 5 folds x 8 views: "
              f"{TEST_LESIONS * per_lesion / 60:.1f} min on {device} ({torch.get_num_threads()} threads)")
    return 0
