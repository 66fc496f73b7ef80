"""Generated MILK10k images in the official layout: a whole miniature dataset, or images for real CSVs.

``generate``: a miniature MILK10k from scratch. Each class has its own lesion colour, size, border
irregularity and dermoscopic pattern, drawn on skin-toned noise in both images (the dermoscopic view
larger and with a dermoscope vignette); the metadata carries a weaker signal (age, site and some MONET
scores shift per class).  The test labels are written only to ``hidden/MILK10k_Test_GroundTruth.csv``,
which :func:`src.data.locate` never reads.

Either writes ``GENERATED.json`` at the top of its folder, saying what in it is generated (``generated`` reads it), so
no report credits generated data to the MILK study team.

``images_for_csvs``: the official CSVs (or any in their format) copied byte for byte, plus a 600x450 JPEG
for every image they list, so the whole pipeline can be rehearsed at the real scale before the 347 MB
download. ``signal`` says what the images carry:
- ``none``: every lesion is drawn with the look of a class chosen at random and a random skin shade,
  independent of its label and of all its metadata: any learnable signal comes from the metadata alone.
- ``weak``: a training lesion is drawn with its own class's look with probability WEAK_SHARE (0.4) and
  with a random class's look otherwise; a test lesion (no label) with a class drawn from the training
  class frequencies. Its skin shade follows its skin_tone_class.
Every lesion's drawing comes from its own random stream (seed, lesion_id), so the output does not depend
on the order or the number of worker processes.

    python -m src.tools.synth OUT_DIR [--n-train N] [--n-test N] [--seed S] [--layout plain|nested]
    python -m src.tools.synth OUT_DIR --from-csvs DIR [--test-metadata CSV] [--signal weak|none]
                        [--layout plain|nested|zip] [--workers N] [--seed S]
"""
from __future__ import annotations

import argparse
import hashlib
import math
from contextlib import contextmanager, nullcontext
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image

from ..data import (
    CLASSES, GT_COLUMNS, IMAGE_TYPES, METADATA_COLUMNS, MONET, SAMPLE_SUBMIT, SUPPLEMENT_COLUMNS,
    TEST_IMAGES, TEST_METADATA, TRAIN_GROUND_TRUTH, TRAIN_IMAGES, TRAIN_METADATA, TRAIN_SUPPLEMENT, DataError,
)
from ..io_utils import atomic_write_csv, worker_pool

WEAK_SHARE = 0.4  # signal=weak: the share of training lesions drawn with their own class's look
SIGNALS = ("weak", "none")
LAYOUTS = ("plain", "nested", "zip")
HIDDEN_TEST_TRUTH = Path("hidden") / "MILK10k_Test_GroundTruth.csv"
MARKER = "GENERATED.json"  # written at the top of every folder this module makes: what in it is generated

# Approximate class counts of the 5,240 training lesions of the full release.
FULL_COUNTS = dict(
    AKIEC=302, BCC=2522, BEN_OTH=44, BKL=542, DF=52, INF=50, MAL_OTH=9, MEL=450, NV=746, SCCKA=473, VASC=50,
)

# Per class: lesion RGB, radius (fraction of the shorter side), border irregularity, dermoscopic pattern
# (0 solid, 1 dark ring, 2 speckled), mean age, preferred site.
_LOOK = {
    "AKIEC":   ((196, 112, 100), 0.16, 0.10, 2, 72, "head_neck_face"),
    "BCC":     ((214, 150, 160), 0.19, 0.08, 1, 67, "head_neck_face"),
    "BEN_OTH": ((200, 176, 120), 0.14, 0.05, 0, 50, "trunk"),
    "BKL":     ((138, 100, 62), 0.21, 0.12, 2, 66, "trunk"),
    "DF":      ((158, 112, 92), 0.10, 0.04, 1, 48, "lower_extremity"),
    "INF":     ((208, 84, 84), 0.27, 0.20, 0, 55, "lower_extremity"),
    "MAL_OTH": ((104, 64, 96), 0.20, 0.18, 2, 64, "trunk"),
    "MEL":     ((62, 42, 34), 0.23, 0.30, 2, 62, "trunk"),
    "NV":      ((118, 80, 52), 0.13, 0.04, 0, 38, "trunk"),
    "SCCKA":   ((226, 200, 172), 0.20, 0.12, 1, 72, "upper_extremity"),
    "VASC":    ((168, 34, 62), 0.12, 0.06, 0, 50, "lower_extremity"),
}
# Fine-grained diagnoses per class with relative frequencies (as in the official supplement).
_DIAGNOSES = {
    "AKIEC": {"Solar or actinic keratosis": 1, "Squamous cell carcinoma in situ, Bowens disease": 2},
    "BCC": {"Basal cell carcinoma": 1},
    "BEN_OTH": {"Exogenous": 2, "Infundibular or epidermal cyst": 1, "Juvenile xanthogranuloma": 1},
    "BKL": {"Seborrheic keratosis": 6, "Lichen planus like keratosis": 2, "Solar lentigo": 1},
    "DF": {"Dermatofibroma": 1},
    "INF": {"Inflammatory or infectious diseases": 1},
    "MAL_OTH": {"Collision - At least one malignant proliferation": 1},
    "MEL": {"Melanoma Invasive": 6, "Melanoma in situ": 3, "Melanoma metastasis": 1},
    "NV": {"Nevus": 8, "Nevus, NOS, Compound": 6, "Nevus, Congenital": 4, "Nevus, NOS, Junctional": 2,
           "Nevus, NOS, Dermal": 1, "Nevus, Acral": 1, "Blue nevus": 1, "Nevus, Spitz": 1},
    "SCCKA": {"Squamous cell carcinoma, Invasive": 2, "Keratoacanthoma": 1},
    "VASC": {"Hemangioma": 1},
}
_CLINICAL_ASSESSMENT = {"NV": 0.3, "BEN_OTH": 0.5, "BKL": 0.1, "INF": 0.2, "VASC": 0.25, "AKIEC": 0.05}
_THICKNESS = ["<0.8", ">0.8-1.0", ">1.0-2.0", ">2.0-3.0", ">3.0-4.0", ">4.0-Inf"]
_SITES = ["head_neck_face", "trunk", "lower_extremity", "upper_extremity", "hand", "foot"]
_SITE_P = np.array([0.3, 0.36, 0.2, 0.1, 0.025, 0.015])
_SKIN = np.array([(238, 206, 186), (226, 186, 160), (204, 160, 128), (160, 116, 86), (112, 78, 58)], float)
_TONE_P = np.array([0.03, 0.1, 0.58, 0.19, 0.1])
# MONET logit offsets per image type, and per-class shifts of (ulceration, vessels, erythema, pigmented).
_MONET_BASE = {"clin": np.array([-0.8, -1.7, -4.0, -0.8, -1.3, -1.8, -1.6]),
               "derm": np.array([-0.7, -0.5, -1.5, -0.7, -0.8, -0.7, -1.0])}
_MONET_SHIFT = {"AKIEC": (0.8, 0.0, 0.8, -0.5), "BCC": (0.6, 1.0, 0.3, -0.6), "INF": (0.5, 0.3, 1.2, -0.5),
                "MEL": (0.0, 0.0, -0.5, 1.6), "NV": (-0.6, -0.3, -0.6, 1.3), "BKL": (0.2, -0.3, -0.4, 1.0),
                "SCCKA": (1.2, 0.4, 0.4, -0.6), "VASC": (0.0, 1.4, 1.0, -0.4)}


@contextmanager
def staged(out_dir: str | os.PathLike) -> Iterator[tuple[Path, Path]]:
    """(a temporary sibling folder to fill, ``out_dir``): renamed into place when the block ends without error,
    removed otherwise. synth never deletes or overwrites a file it did not write: ``out_dir`` must be new or an
    empty folder, and one that holds anything (an earlier output of synth included) or is a file is refused with
    a DataError, before anything is written; so is one that files appeared in meanwhile."""
    out = Path(out_dir).expanduser().resolve()
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held or out.exists() and not out.is_dir():
        shown = ", ".join(held[:3]) + (f", ... ({len(held)} in all)" if len(held) > 3 else "")
        what = f"it holds {shown}" if held else "a file"
        raise DataError(f"{out} already exists and is not an empty folder ({what}); synth writes only "
                        "into a new or empty folder and never deletes or overwrites what is there: choose another "
                        "folder, or delete this one yourself if nothing in it is needed")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage, out
        try:
            if out.is_dir():
                out.rmdir()
            os.replace(stage, out)
        except OSError as err:
            raise DataError(f"{out}: something was put there while synth ran ({err.strerror}); it is left as it "
                            "is and nothing was written: choose another folder") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def mark(folder: Path, generated: str, **details) -> None:
    """The folder's ``MARKER``: which of its contents this module generated (no real patient behind them)."""
    from ..io_utils import atomic_write_json

    atomic_write_json(folder / MARKER, {"generator": "src/tools/synth.py", "generated": generated, **details})


def generated(data_dir: str | os.PathLike) -> dict | None:
    """What in ``data_dir`` this module generated (its ``MARKER``; a miniature made before the marker existed is
    known by its hidden test labels), or None for data it did not make."""
    import json

    root = Path(data_dir)
    if (root / MARKER).is_file():
        return json.loads((root / MARKER).read_text(encoding="utf-8"))
    if (root / HIDDEN_TEST_TRUTH).is_file():
        return {"generator": "src/tools/synth.py", "generated": "metadata, labels and images"}
    return None


def generate(
    out_dir: str | os.PathLike, n_train: int = 300, n_test: int = 60, seed: int = 0, layout: str = "plain",
    image_size: tuple[int, int] = (600, 450),
) -> Path:
    """Write a miniature MILK10k into ``out_dir`` (new or empty) and return its path.

    ``image_size`` is (width, height).  ``layout='nested'`` nests each image folder twice, as unzipping does.
    The folder appears complete or not at all: it is built next to ``out_dir`` and renamed into place.
    """
    if layout not in ("plain", "nested"):
        raise ValueError(f"layout must be 'plain' or 'nested', got {layout!r}")
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    lesion_ids = np.sort(rng.choice(10_000_000, n, replace=False))
    lesion_ids = np.array([f"IL_{i:07d}" for i in lesion_ids])
    isic_ids = np.array([f"ISIC_{i:07d}" for i in rng.choice(10_000_000, 2 * n, replace=False)]).reshape(n, 2)
    split = np.zeros(n, bool)
    split[rng.choice(n, n_test, replace=False)] = True
    labels = np.empty(n, int)
    labels[~split] = _draw_classes(n_train, rng)
    labels[split] = _draw_classes(n_test, rng)

    with staged(out_dir) as (stage, out):
        for is_test, meta_name, folder in [(False, TRAIN_METADATA, TRAIN_IMAGES), (True, TEST_METADATA, TEST_IMAGES)]:
            idx = np.flatnonzero(split == is_test)
            meta = _metadata(lesion_ids[idx], isic_ids[idx], labels[idx], is_test, rng)
            atomic_write_csv(stage / meta_name, meta)
            images = stage / folder / folder if layout == "nested" else stage / folder
            _draw_images(meta, labels[idx], images, image_size, rng)
            truth = _one_hot(lesion_ids[idx], labels[idx])
            if is_test:
                atomic_write_csv(stage / HIDDEN_TEST_TRUTH, truth)
                atomic_write_csv(stage / SAMPLE_SUBMIT, truth.assign(**{c: "0.0" for c in CLASSES}))
            else:
                atomic_write_csv(stage / TRAIN_GROUND_TRUTH, truth)
                atomic_write_csv(stage / TRAIN_SUPPLEMENT, _supplement(isic_ids[idx], labels[idx], rng))
        mark(stage, "metadata, labels and images", seed=seed)
    return out


def _draw_classes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Class indices in a random order: roughly the full-release frequencies, each class at least a few times."""
    floor = min(5, max(1, n // 40)) if n >= len(CLASSES) else 0
    p = np.array([FULL_COUNTS[c] for c in CLASSES], float)
    share = (n - floor * len(CLASSES)) * p / p.sum()
    counts = floor + np.floor(share).astype(int)
    counts[np.argsort(np.floor(share) - share)[: n - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(CLASSES)), counts))


def _one_hot(lesion_ids: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    onehot = np.where(np.arange(len(CLASSES)) == labels[:, None], "1.0", "0.0")
    return pd.DataFrame(onehot, columns=CLASSES).assign(lesion_id=lesion_ids)[GT_COLUMNS]


def _metadata(lesion_ids, isic_ids, labels, is_test: bool, rng: np.random.Generator) -> pd.DataFrame:
    """Two rows per lesion (clinical first), formatted as the official files write them."""
    n = len(lesion_ids)
    looks = [_LOOK[CLASSES[k]] for k in labels]
    age = np.clip(np.round((np.array([lk[4] for lk in looks]) + rng.normal(0, 13, n)) / 5) * 5, 5, 85)
    sex = np.where(rng.random(n) < 0.56, "male", "female")
    tone = rng.choice(5, n, p=_TONE_P) + 1
    site_p = np.tile(_SITE_P, (n, 1))
    for i, lk in enumerate(looks):
        site_p[i, _SITES.index(lk[5])] += 0.5
    cumulative = np.cumsum(site_p / site_p.sum(1, keepdims=True), axis=1)
    site = np.array(_SITES, object)[(rng.random((n, 1)) > cumulative).sum(axis=1)]
    # Quirks of the real files: a few missing sites (and ages in training), a site seen only in test.
    site[rng.random(n) < 0.015] = ""
    if n >= 30:
        site[rng.integers(n)] = ""
    if is_test and n >= 20:
        site[rng.choice(np.flatnonzero(site != ""), 1)] = "genital"
    age_text = np.array([f"{a:.0f}" if is_test else f"{a:.1f}" for a in age], object)  # the files differ so
    if not is_test:
        age_text[rng.random(n) < 0.01] = ""
        if n >= 30:
            age_text[rng.integers(n)] = ""

    rows = []
    shift = np.zeros((n, len(MONET)))
    for i, k in enumerate(labels):
        shift[i, [0, 2, 3, 4]] = _MONET_SHIFT.get(CLASSES[k], (0, 0, 0, 0))
    for j, tag in enumerate(("clin", "derm")):
        monet = 1 / (1 + np.exp(-(_MONET_BASE[tag] + shift + rng.normal(0, 1.1, (n, len(MONET))))))
        altered = rng.random(n) < 0.03
        frame = pd.DataFrame({
            "lesion_id": lesion_ids, "image_type": IMAGE_TYPES["clinical" if j == 0 else "dermoscopic"],
            "isic_id": isic_ids[:, j],
            "attribution": "MILK study team", "copyright_license": "CC-BY-NC",
            "image_manipulation": np.where(altered, "altered", "instrument only"),
            "age_approx": age_text, "sex": sex, "skin_tone_class": tone.astype(str), "site": site,
            **{name: [f"{v:.15g}" for v in monet[:, m]] for m, name in enumerate(MONET)},
        })
        rows.append(frame)
    meta = pd.concat(rows).sort_index(kind="stable").reset_index(drop=True)  # clinical row, then dermoscopic
    if n >= 30 and not (meta.image_manipulation == "altered").any():
        meta.loc[rng.integers(2 * n), "image_manipulation"] = "altered"
    return meta[METADATA_COLUMNS]


def _supplement(isic_ids: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """One row per image, sorted by isic_id; both images of a lesion share its diagnosis."""
    rows = []
    invasive_seen = False
    for ids, k in zip(isic_ids, labels):
        cls = CLASSES[k]
        names, weights = zip(*_DIAGNOSES[cls].items())
        diagnosis = names[rng.choice(len(names), p=np.array(weights) / sum(weights))]
        if cls == "MEL" and not invasive_seen:
            diagnosis = "Melanoma Invasive"
        invasive_seen |= diagnosis == "Melanoma Invasive"
        clinical = rng.random() < _CLINICAL_ASSESSMENT.get(cls, 0)
        confirm = "single contributor clinical assessment" if clinical else "histopathology"
        thickness = ""
        if diagnosis == "Melanoma Invasive":
            thickness = _THICKNESS[min(int(rng.exponential(1.2)), len(_THICKNESS) - 1)]
        rows += [(isic, diagnosis, confirm, thickness) for isic in ids]
    return pd.DataFrame(rows, columns=SUPPLEMENT_COLUMNS).sort_values("isic_id", ignore_index=True)


class Canvas:
    """The shared pieces of every drawing at one image size: the half-resolution pixel grid, the dermoscope
    vignette and a bank of noise that each image crops from at random offsets."""

    def __init__(self, size: tuple[int, int], bank_rng: np.random.Generator):
        self.width, self.height = size
        self.w, self.h = self.width // 2, self.height // 2
        self.yy, self.xx = np.mgrid[0:self.h, 0:self.w].astype(np.float32)
        self.vignette = np.clip(1.6 - np.hypot((self.xx - self.w / 2) / (self.w / 2),
                                               (self.yy - self.h / 2) / (self.h / 2)), 0, 1)[..., None]
        self.bank = bank_rng.standard_normal((2 * self.h, 2 * self.w, 3), dtype=np.float32)

    def noise(self, rng: np.random.Generator) -> np.ndarray:
        y, x = rng.integers(self.h), rng.integers(self.w)
        return self.bank[y:y + self.h, x:x + self.w]


def _skin(tone: float) -> np.ndarray:
    """Skin RGB of a skin_tone_class (1..5 as generated here; 0 and missing values take the nearest shade)."""
    t = 3 if not np.isfinite(tone) else int(min(max(tone, 1), 5))
    return _SKIN[t - 1]


def draw_pair(canvas: Canvas, k: int, tone: float, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The clinical and dermoscopic image of one lesion drawn with class ``k``'s look: lesion colour, size,
    border irregularity and dermoscopic pattern on skin-toned noise, at half resolution, then doubled."""
    c, w, h = canvas, canvas.w, canvas.h
    colour, radius, rough, pattern = _LOOK[CLASSES[k]][:4]
    lesion_colour = (np.array(colour) * rng.lognormal(0, 0.18) + rng.normal(0, 6, 3)).astype(np.float32)
    # Distance from the centre in units of the (irregular, tilted, elliptic) border: 1 on the border.
    cx, cy = float(rng.normal(w / 2, 0.08 * w)), float(rng.normal(h / 2, 0.08 * h))
    phase1, phase2, tilt = map(float, rng.uniform(0, 2 * np.pi, 3))
    aspect, r0 = float(rng.uniform(0.7, 1.0)), float(radius * min(w, h) * rng.lognormal(0, 0.3))
    u = ((c.xx - cx) * math.cos(tilt) + (c.yy - cy) * math.sin(tilt)) / aspect
    v = (c.yy - cy) * math.cos(tilt) - (c.xx - cx) * math.sin(tilt)
    theta = np.arctan2(v, u)
    radial = np.hypot(u, v) / (r0 * (1 + rough * (np.sin(3 * theta + phase1) + 0.6 * np.sin(5 * theta + phase2))))
    images = []
    for derm in (False, True):
        skin = (_skin(tone) * rng.lognormal(0, 0.06) + rng.normal(0, 3, 3)).astype(np.float32)
        dist = radial / 1.6 if derm else radial  # the dermoscopic view is magnified
        alpha = np.clip((1 - dist) * (8 if derm else 5), 0, 1)[..., None]
        shade = lesion_colour * (0.9 if derm else 1.0)
        if derm and pattern == 1:  # dark ring along the border
            shade = shade * (1 - 0.45 * np.exp(-100 * (dist - 0.85) ** 2))[..., None]
        elif derm and pattern == 2:  # dark speckles
            shade = shade * (1 - 0.4 * (c.noise(rng)[..., :1] < -0.67))
        img = skin + 7 * c.noise(rng)[..., :1]
        img += (shade - img) * alpha + 6 * c.noise(rng)
        if derm:
            img *= c.vignette
        images.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((c.width, c.height),
                                                                                     Image.NEAREST))
    return images[0], images[1]


def _draw_images(
    meta: pd.DataFrame, labels: np.ndarray, folder: Path, size: tuple[int, int], rng: np.random.Generator
) -> None:
    """Draw both images of each lesion (one random stream for the whole set) and save them as JPEGs."""
    canvas = Canvas(size, rng)
    tones = meta.skin_tone_class.to_numpy(int)[::2]
    for i, k in enumerate(labels):
        for j, pixels in enumerate(draw_pair(canvas, k, tones[i], rng)):
            row = meta.iloc[2 * i + j]
            path = folder / row.lesion_id / f"{row.isic_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels.save(path, "JPEG", quality=88)


# ----------------------------------------------------------------------------------------------------
# images for real CSVs
# ----------------------------------------------------------------------------------------------------
def _lesion_rng(seed: int, lesion_id: str) -> np.random.Generator:
    words = np.frombuffer(hashlib.sha256(lesion_id.encode()).digest(), dtype=np.uint32)
    return np.random.default_rng(np.random.SeedSequence([seed, *words.tolist()]))


def _looks(lesions: pd.DataFrame, signal: str, seed: int, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class whose look each lesion is drawn with, skin tone) under ``signal``; ``prior`` = class frequencies."""
    looks, tones = np.empty(len(lesions), int), np.empty(len(lesions))
    labelled = "target" in lesions.columns
    for i, (lesion_id, tone) in enumerate(zip(lesions["lesion_id"], lesions["skin_tone_class"])):
        rng = _lesion_rng(seed + 1, lesion_id)
        random_class = int(rng.integers(len(CLASSES)))
        if signal == "none":
            looks[i], tones[i] = random_class, float(rng.integers(1, 6))
            continue
        own = int(lesions["target"].iat[i]) if labelled else int(rng.choice(len(CLASSES), p=prior))
        looks[i] = own if rng.random() < WEAK_SHARE or not labelled else random_class
        # the files' skin_tone_class runs from 0 (very dark) to 5 (very light); the shades here from 1 (light)
        tones[i] = 1 + np.clip(np.round((5 - float(tone)) * 4 / 5), 0, 4) if np.isfinite(float(tone)) else np.nan
    return looks, tones


_CANVAS: dict = {}


def _draw_job(job: tuple) -> None:
    """Worker: draw and save one lesion's two JPEGs."""
    lesion_id, look, tone, clin_path, derm_path, size, seed = job
    key = (size, seed)
    if key not in _CANVAS:
        _CANVAS.clear()
        _CANVAS[key] = Canvas(size, np.random.default_rng(seed))
    pair = draw_pair(_CANVAS[key], look, tone, _lesion_rng(seed, lesion_id))
    for path, pixels in zip((clin_path, derm_path), pair):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pixels.save(path, "JPEG", quality=88)


def _draw_all(jobs: list[tuple], workers: int, what: str) -> None:
    start, every = time.time(), max(1, len(jobs) // 10)
    with worker_pool(workers) if workers > 1 else nullcontext(lambda fn, items, chunksize: map(fn, items)) as imap:
        for n, _ in enumerate(imap(_draw_job, jobs, 16), 1):
            if n % every == 0 or n == len(jobs):
                print(f"[synth] {what}: {n}/{len(jobs)} lesions ({time.time() - start:.0f}s)", flush=True)


def _zip_folder(folder: Path, zip_path: Path) -> None:
    """``folder`` as the official zips hold it: one top folder of the same name."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*.jpg")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    shutil.rmtree(folder)


def images_for_csvs(out_dir: str | os.PathLike, train_dir: str | os.PathLike,
                    test_metadata: str | os.PathLike | None = None, signal: str = "weak", layout: str = "plain",
                    seed: int = 0, workers: int = 1, image_size: tuple[int, int] = (600, 450)) -> Path:
    """Copy the MILK10k CSVs of ``train_dir`` (and ``test_metadata``, else ``train_dir``'s test metadata) into
    ``out_dir`` (new or empty) byte for byte, and write a JPEG for every image they list (see the module
    docstring for ``signal``). ``layout``: 'plain' folders, 'nested' (as unzipping makes them) or 'zip' (the
    official zips, not unzipped). The folder appears complete or not at all."""
    from ..data import load_test, load_train, locate

    if signal not in SIGNALS or layout not in LAYOUTS:
        raise ValueError(f"signal must be one of {SIGNALS} and layout one of {LAYOUTS}")
    src = locate(train_dir)
    test_csv = Path(test_metadata) if test_metadata else src.test_metadata
    if test_csv is None or not Path(test_csv).is_file():
        raise DataError(f"{src.root}: no {TEST_METADATA} there; pass the official test metadata with "
                        "--test-metadata PATH")
    with staged(out_dir) as (stage, out):
        copied = {stage / name: Path(path) for name, path in
                  [(TRAIN_METADATA, src.train_metadata), (TRAIN_GROUND_TRUTH, src.train_ground_truth),
                   (TRAIN_SUPPLEMENT, src.train_supplement), (TEST_METADATA, test_csv)] if path is not None}
        for copy, original in copied.items():
            shutil.copyfile(original, copy)
        try:
            train, test = load_train(stage, check_images=False), load_test(stage, check_images=False)
        except DataError as err:  # name the user's files, not their copies
            message = str(err)
            for copy, original in copied.items():
                message = message.replace(str(copy), str(original))
            raise DataError(message.replace(str(stage), str(src.root))) from None
        atomic_write_csv(stage / SAMPLE_SUBMIT, pd.DataFrame({"lesion_id": test["lesion_id"],
                                                              **{c: "0.0" for c in CLASSES}}))
        prior = np.bincount(train["target"], minlength=len(CLASSES)) / len(train)
        for lesions, folder, what in [(train, TRAIN_IMAGES, "training"), (test, TEST_IMAGES, "test")]:
            images = stage / folder / folder if layout == "nested" else stage / folder
            looks, tones = _looks(lesions, signal, seed, prior)
            jobs = [(lid, k, t, str(images / lid / f"{c}.jpg"), str(images / lid / f"{d}.jpg"), tuple(image_size),
                     seed) for lid, k, t, c, d in zip(lesions["lesion_id"], looks, tones, lesions["clin_isic_id"],
                                                      lesions["derm_isic_id"])]
            _draw_all(jobs, workers, f"{what} images")
            if layout == "zip":
                _zip_folder(images, stage / f"{folder}.zip")
        mark(stage, "images", signal=signal, seed=seed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.tools.synth", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("out_dir", help="new or empty folder to write into")
    parser.add_argument("--n-train", type=int, default=300, help="lesions of a generated miniature dataset")
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=LAYOUTS, default="plain",
                        help="image folders plain, twice nested (as unzipping makes them), or the official zips")
    parser.add_argument("--from-csvs", metavar="DIR", help="draw images for the MILK10k CSVs in DIR instead")
    parser.add_argument("--test-metadata", metavar="CSV", help="with --from-csvs: the test metadata, if not in DIR")
    parser.add_argument("--signal", choices=SIGNALS, default="weak",
                        help="with --from-csvs: a weak class signal in the images, or none (see above)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                        help="with --from-csvs: drawing processes")
    args = parser.parse_args(argv)
    if args.layout == "zip" and not args.from_csvs:
        parser.error("--layout zip needs --from-csvs")
    try:
        if args.from_csvs:
            out = images_for_csvs(args.out_dir, args.from_csvs, args.test_metadata, args.signal, args.layout,
                                  args.seed, args.workers)
            print(f"wrote the CSVs of {args.from_csvs} and their images ({args.signal} signal, {args.layout}) to "
                  f"{out}")
            return 0
        out = generate(args.out_dir, n_train=args.n_train, n_test=args.n_test, seed=args.seed, layout=args.layout)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.n_train} training and {args.n_test} test lesions to {out}")
    print(f"test labels (never read by the pipeline): {out / HIDDEN_TEST_TRUTH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
