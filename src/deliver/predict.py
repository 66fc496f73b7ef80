"""The prediction itself: a source's fold models (src/deliver/source.py says what a source is) on a table of
lesions, and the decision. The command is src/deliver/cli.py (``bash run.sh predict``).

Each experiment's folds predict with their best weights, their own fitted metadata transform and the experiment's
test-time augmentation; the folds are averaged as the experiment's test.csv averages them (or, for ``rows_of``,
each fold predicts its own validation rows), the experiments blended with the sidecar's weights, and the submitted
decision rule folded into the probabilities (src/decision.py). A stacker predicts from its inputs' predictions, as
it was trained. On the official test set this reproduces the submission.

A lesion with all 14 MONET scores takes the models' path with them; any other lesion (every single lesion: its
scores come from a model the release ran on its images) takes the path without MONET, which every experiment learns
(src/nomonet.py), and is decided with the thresholds fitted for it.

The decision rule: 'threshold' applies the submission's stored thresholds. 'expected_f1' is label-free and takes its
thresholds from the submitted batch itself, so a new batch gets its own (``thresholds='stored'`` applies the
submission's instead; a single lesion always does).

Loading never executes code from the source: weights are safetensors (an export) or checkpoints read with
``torch.load(weights_only=True)``, fitted transforms are JSON (src/portable.py), the tabular models skops files read
with an explicit list of trusted types (src/sklearn_io.py), and the network is built by this checkout's code of the
experiment it names.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import experiment_recipe
from ..data import CLASSES, MONET, DataError
from .bundle import MANIFEST, open_bundle, read_safetensors
from .source import Member, PredictError, Source, sidecar_source

def resolve_source(name: str, overrides: dict[str, str]) -> Source:
    """SOURCE as the command line names it: an export (a folder or archive path), else the sidecar of a submission
    ``<submission_dir>/<name>.json`` (an experiment or a blend)."""
    path = Path(name)
    if path.is_file() or (path / MANIFEST).is_file():
        return open_bundle(path, overrides)
    if path.is_dir() and len(path.parts) > 1:
        raise PredictError(f"{path}: a folder but not an export of this project (no {MANIFEST} in it)")
    return sidecar_source(name, overrides)


LOGIT_CLIP = 1e-6  # the stacker's (src/stacker.py)


# ----------------------------------------------------------------------------------------------------
# one fold of one experiment
# ----------------------------------------------------------------------------------------------------
def load_features(member: Member, k: int):
    """The fold's fitted metadata transform (features.json)."""
    from ..features import MetadataFeatures

    return MetadataFeatures.load(_need(member.fold_dir(k) / "features.json"))


def _need(path: Path) -> Path:
    if not path.is_file():
        raise PredictError(f"{path}: missing")
    return path


def read_weights(member: Member, k: int) -> dict:
    """The fold's best weights: weights.safetensors in an export, best.pt (read with weights_only=True) in an
    experiment folder."""
    fdir = member.fold_dir(k)
    if member.bundle:

        return read_safetensors(_need(fdir / "weights.safetensors"))
    from ..train import CheckpointError, read_checkpoint

    try:
        return read_checkpoint(_need(fdir / "best.pt"))["model"]
    except CheckpointError as exc:
        raise PredictError(str(exc)) from None


class ImageFold:
    """A fold of an image experiment: its features, its network with the best weights, its TTA, and its path without
    MONET (a linear model on the metadata without MONET and, where they helped, the network's image embeddings:
    models.json and models.skops, src/train.py)."""

    def __init__(self, member: Member, k: int, device):
        from ..tabular import load_models

        self.member, self.k, self.device = member, k, device
        self.features = load_features(member, k)
        self.aux = json.loads(_need(member.fold_dir(k) / "aux_vocab.json").read_text(encoding="utf-8"))
        self.state = read_weights(member, k)
        try:
            self.blind = load_models(member.fold_dir(k), ("without_monet",))["without_monet"]
        except ValueError as exc:
            raise PredictError(str(exc)) from None
        self.views = 8 if member.cfg.tta else 1
        self.model = self.augment = None

    def _build(self, n_meta: int) -> None:
        from ..speed.apply import load_plain_state

        cfg = self.member.cfg
        recipe = experiment_recipe(cfg.experiment)
        fresh = cfg.replace(pretrained=False) if "pretrained" in cfg.own else cfg  # the fold's weights replace them
        self.model, self.augment = recipe.build(fresh, n_meta, len(self.aux), self.device)
        self.link = recipe.loss.link(cfg)
        try:
            load_plain_state(self.model, self.state)
        except RuntimeError as exc:
            where = self.member.fold_dir(self.k) / ("weights.safetensors" if self.member.bundle else "best.pt")
            raise PredictError(f"{where} holds the weights of another network than experiment "
                               f"{cfg.experiment}'s code builds (another version of the project?: "
                               f"{str(exc).splitlines()[0][:120]})") from None

    def predict(self, lesions: pd.DataFrame, images: np.ndarray, rows: np.ndarray, extra=None,
                blind: bool = False) -> np.ndarray:
        """Probabilities of ``rows``: the network's, or for ``blind`` rows (``lesions`` given with their MONET
        scores removed) the fold's model without MONET on the metadata (and the network's embeddings)."""
        from ..inference import embeddings, predict
        from ..tabular import predict_saved
        from ..train import PROBES

        meta = self.features.transform(lesions.iloc[rows])
        if self.model is None:
            self._build(meta.shape[1])
        where = f"{self.member.name} fold {self.k}"
        if blind:
            x = meta.astype(np.float64)
            if PROBES.get(self.blind[0][0], True):
                emb = embeddings(self.model, self.member.cfg, images, rows, self.augment, self.device, self.views, where)
                x = np.hstack([emb, x])
            return predict_saved(self.blind, x)
        return predict(self.model, self.link, self.member.cfg, images, rows, meta, self.augment, self.device,
                       self.views, where).astype(np.float64)


class TabularFold:
    """A fold of a tabular experiment or a stacker: its features and its models of both paths (models.json and
    models.skops, src/tabular.py)."""

    def __init__(self, member: Member, k: int):
        from ..tabular import load_models

        self.member, self.k = member, k
        self.features = load_features(member, k)
        try:
            self.models = load_models(member.fold_dir(k))
        except ValueError as exc:
            raise PredictError(str(exc)) from None

    def predict(self, lesions: pd.DataFrame, images, rows: np.ndarray, extra=None, blind: bool = False) -> np.ndarray:
        from ..tabular import predict_saved

        x = self.features.transform(lesions.iloc[rows])
        if extra is not None:
            x = np.hstack([extra[rows], x])
        return predict_saved(self.models["without_monet" if blind else "with_monet"], x)


def copy_fold_models(member: Member, k: int, dest: Path) -> None:
    """A fold's stored scikit-learn models (models.json, models.skops: a tabular fold's, or an image fold's path
    without MONET) into ``dest`` byte for byte, once they read back."""
    import shutil

    from ..tabular import MODELS_FILE, load_models

    try:
        load_models(member.fold_dir(k), PATHS_OF[member.kind])
    except ValueError as exc:
        raise PredictError(str(exc)) from None
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("models.json", MODELS_FILE):
        shutil.copyfile(member.fold_dir(k) / name, dest / name)


PATHS_OF = {"image": ("without_monet",), "tabular": ("with_monet", "without_monet"),
            "stack": ("with_monet", "without_monet")}


def open_fold(member: Member, k: int, device):
    return ImageFold(member, k, device) if member.kind == "image" else TabularFold(member, k)


# ----------------------------------------------------------------------------------------------------
# images and lesions
# ----------------------------------------------------------------------------------------------------
def decode_images(lesions: pd.DataFrame, size: int, workers: int = 1) -> np.ndarray:
    """uint8 (n, 2, size, size, 3): each lesion's two JPEGs decoded exactly as the training cache decodes them
    (src/cache.py), in memory; a missing or broken image is a DataError naming it."""
    from ..cache import decode_lesion

    jobs = [(i, str(lid), str(c), str(d), size)
            for i, (lid, c, d) in enumerate(zip(lesions["lesion_id"], lesions["clin_path"], lesions["derm_path"]))]
    out = np.empty((len(jobs), 2, size, size, 3), dtype=np.uint8)
    if workers > 1 and len(jobs) >= 64:
        from ..io_utils import worker_pool

        with worker_pool(workers) as imap:
            for i, pair in imap(decode_lesion, jobs, 16):
                out[i] = pair
    else:
        for job in jobs:
            i, pair = decode_lesion(job)
            out[i] = pair
    return out


SEX_VALUES = ("male", "female")


def single_lesion(clinical: str | None, dermoscopic: str | None, age: float | None = None, sex: str | None = None,
                  site: str | None = None, skin_tone: int | None = None) -> pd.DataFrame:
    """One lesion as a row of the loader's lesion table: every field not given (and every MONET score) missing,
    as the loader reads an empty field. The images may be left out (None) for a source that reads none."""
    for flag, path in (("--clinical", clinical), ("--dermoscopic", dermoscopic)):
        if path is not None and not Path(path).is_file():
            raise DataError(f"{flag} {path}: image file not found")
    if sex is not None and sex.strip().lower() not in SEX_VALUES:
        raise DataError(f"--sex {sex!r}: use one of {', '.join(SEX_VALUES)} (leave it out when unknown)")
    if age is not None and not (math.isfinite(age) and 0 <= age <= 120):
        raise DataError(f"--age {age!r}: an age in years, 0 to 120 (leave it out when unknown)")
    if skin_tone is not None and not 0 <= skin_tone <= 5:
        raise DataError(f"--skin-tone {skin_tone!r}: the skin tone class, 0 to 5 (leave it out when unknown)")
    row = {"lesion_id": "lesion", "age_approx": np.nan if age is None else float(age),
           "sex": "" if sex is None else sex.strip().lower(),
           "skin_tone_class": np.nan if skin_tone is None else float(skin_tone),
           "site": "" if site is None else site.strip().lower(),
           "clin_isic_id": Path(clinical or "").stem, "derm_isic_id": Path(dermoscopic or "").stem,
           "clin_path": str(clinical or ""), "derm_path": str(dermoscopic or ""), "clin_manipulation": "",
           "derm_manipulation": "", **{f"{v}_{m}": np.nan for v in ("clin", "derm") for m in MONET}}
    return pd.DataFrame([row])


def known_sites(source: Source) -> list[str]:
    """The sites the source's first fold saw in training."""
    member = next(iter(source.members.values()))
    return list(load_features(member, 0).encoder.sites)


# ----------------------------------------------------------------------------------------------------
# predicting
# ----------------------------------------------------------------------------------------------------
class Predictor:
    """The probabilities of a source's experiments for a table of lesions: each fold's, averaged as test.csv averages
    them (``rows_of`` None), or out of fold (``rows_of``: the fold of every lesion; fold k predicts its own rows).
    A lesion with all 14 MONET scores takes the path with them, any other lesion the path without MONET (its scores
    removed; src/features.py: ``has_monet``)."""

    def __init__(self, source: Source, lesions: pd.DataFrame, images: dict[int, np.ndarray] | None = None,
                 rows_of: np.ndarray | None = None, device=None):
        from ..features import blank_monet, has_monet

        self.source, self.lesions, self.rows_of = source, lesions, rows_of
        self.monet, self.blind = has_monet(lesions), blank_monet(lesions)
        self.images = images if images is not None else {}
        image = source.image_config()
        if device is None and image is not None:
            from ..batches import resolve_device

            device = resolve_device(image)
        self.device = device or "cpu"
        self.memo: dict[str, np.ndarray] = {}
        self.fold_models = 0
        self.views = 0

    def sizes(self) -> list[int]:
        return sorted({m.cfg.img_size for m in self.source.members.values() if m.kind == "image"})

    def probs(self, name: str) -> np.ndarray:
        """(lesions, 11) of experiment ``name``, float64."""
        if name in self.memo:
            return self.memo[name]
        member = self.source.members[name]
        extra = None
        if member.kind == "stack":
            parts = np.hstack([self.probs(i) for i in member.inputs])
            p = np.clip(parts, LOGIT_CLIP, 1 - LOGIT_CLIP)
            extra = np.log(p / (1 - p))
        n = len(self.lesions)
        images = self.images.get(member.cfg.img_size) if member.kind == "image" else None
        out = np.zeros((n, len(CLASSES)))
        for k in range(member.n_folds):
            fold = self._fold(member, k)
            mine = np.arange(n) if self.rows_of is None else np.flatnonzero(self.rows_of == k)
            for blind, table in ((False, self.lesions), (True, self.blind)):
                rows = mine[self.monet[mine] != blind]
                if len(rows):
                    out[rows] += fold.predict(table, images, rows, extra, blind)
        self.memo[name] = out / member.n_folds if self.rows_of is None else out
        return self.memo[name]

    def _fold(self, member: Member, k: int):
        fold = open_fold(member, k, self.device)
        self.fold_models += 1
        self.views += getattr(fold, "views", 0)
        return fold

    def blended(self) -> np.ndarray:
        """The source's blend: its experiments' probabilities with the sidecar's weights."""
        names = list(self.source.weights)
        weights = np.array([self.source.weights[n] for n in names])
        return np.tensordot(weights, np.stack([self.probs(n) for n in names]), axes=1)


def batch_thresholds(source: Source, blended: np.ndarray, thresholds: str = "batch",
                     without_monet: bool = False) -> tuple[np.ndarray, str]:
    """The thresholds this batch is decided with, and where they come from. For a labelled rule (or when
    ``thresholds`` is 'stored') the submission's stored ones: for lesions ``without_monet`` those tuned on the blended
    out-of-fold rows without MONET (src/nomonet.py), where the submission stored them; for a label-free rule its own
    fit on this batch."""
    from ..decision import RULES

    rule = RULES.get(source.rule)
    if rule is None:
        raise PredictError(f"{source.where}: decision rule {source.rule!r} is not one this checkout knows "
                           f"({', '.join(RULES)})")
    stored = source.info.get("thresholds_without_monet") if without_monet else None
    if rule.labelled or thresholds == "stored":
        if stored is not None:
            return (np.array([float(stored[c]) for c in CLASSES]),
                    "the stored thresholds fitted for lesions without MONET")
        return source.thresholds, f"the submission's stored thresholds (from {source.thresholds_from})"
    lacking = " without MONET" if without_monet else ""
    return rule.fit(None, None, blended), f"rule {source.rule} on this batch of {len(blended)} lesion(s){lacking}"


def decide(source: Source, blended: np.ndarray, monet: np.ndarray, thresholds: str = "batch") -> dict:
    """Each lesion's thresholds (rows, 11) and folded probabilities by ``batch_thresholds``: lesions with their
    MONET scores (``monet``) and those without, each group as its own batch."""
    from ..decision import fold_probabilities

    t, folded, why = np.empty_like(blended), np.empty_like(blended), []
    for mask, without in ((monet, False), (~monet, True)):
        if mask.any():
            tm, reason = batch_thresholds(source, blended[mask], thresholds, without_monet=without)
            t[mask], folded[mask] = tm, fold_probabilities(blended[mask], tm)
            why.append(reason)
    return {"thresholds": t, "folded": folded, "thresholds_why": "; ".join(why)}


def readable_frame(ids, blended: np.ndarray, folded: np.ndarray) -> pd.DataFrame:
    """Per lesion the three most likely diagnoses with their probabilities, and every class that passes its
    threshold (most likely first)."""
    rows = []
    for lid, p, f in zip(ids, blended, folded):
        order = np.argsort(-p, kind="stable")
        row = {"lesion_id": lid}
        for r in range(3):
            row[f"top{r + 1}"], row[f"p{r + 1}"] = CLASSES[order[r]], round(float(p[order[r]]), 4)
        row["decided"] = ";".join(CLASSES[j] for j in order if f[j] > 0.5) or "none"
        rows.append(row)
    return pd.DataFrame(rows)


def write_outputs(out: Path, ids: list[str], blended: np.ndarray, folded: np.ndarray) -> dict[str, Path]:
    """The submission-format file (checked by the scorer's reader before it is moved into place) and the readable
    one, both or neither."""
    from ..experiment import probs_frame
    from ..io_utils import atomic_write_many
    from ..submission import checked_csv

    readable = out.with_name(out.stem + "_diagnoses.csv")
    table = readable_frame(ids, blended, folded)
    atomic_write_many({out: checked_csv(probs_frame(ids, folded), ids, out),
                       readable: lambda tmp: table.to_csv(tmp, index=False)})
    return {"submission": out, "diagnoses": readable}


def check_out(out: Path) -> None:
    if out.is_dir():
        raise PredictError(f"--out {out}: a folder stands there; give a file name, e.g. {out / 'predictions.csv'}")
    if out.suffix.lower() != ".csv":
        raise PredictError(f"--out {out}: give a .csv file name (the submission format)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PredictError(f"--out {out}: {parent} is a file, not a folder")
            break
    check_replaceable(out)


DIAGNOSES_HEADER = ["lesion_id", "top1", "p1", "top2", "p2", "top3", "p3", "decided"]  # readable_frame's columns


def check_replaceable(out: Path) -> None:
    """Refuse to overwrite what predict did not write: ``out`` or its readable sibling must be absent or a CSV with
    predict's header on line 1 (src/owned.py), neither inside an experiment's output folder (its oof.csv and
    test.csv have that header) nor a submission (a CSV with its sidecar ``<stem>.json`` beside it)."""
    from ..owned import NotOurs, experiment_folder, replaceable_csv

    fix = "move it away or choose another --out"
    inside = experiment_folder(out)
    if inside is not None:
        raise NotOurs(f"--out {out}: lies inside the output folder of an experiment ({inside}); {fix}")
    if out.is_file() and out.with_suffix(".json").is_file():
        raise NotOurs(f"--out {out}: a submission stands there (its sidecar {out.with_suffix('.json')} is beside it) "
                      f"and is not replaced; {fix}")
    replaceable_csv(out, ["lesion_id", *CLASSES], fix)
    replaceable_csv(out.with_name(out.stem + "_diagnoses.csv"), DIAGNOSES_HEADER, fix)


def predict_batch(source: Source, lesions: pd.DataFrame, workers: int = 1, thresholds: str = "batch",
                  device=None) -> dict:
    """Every lesion of ``lesions`` through the source: blended probabilities, each lesion's thresholds and folded
    probabilities (``decide``), which lesions had their MONET scores, and timings."""
    t0 = time.time()
    predictor = Predictor(source, lesions, device=device)
    images = {s: decode_images(lesions, s, workers) for s in predictor.sizes()}
    predictor.images = images
    t_decode = time.time() - t0
    blended = predictor.blended()
    t_models = time.time() - t0 - t_decode
    return {"blended": blended, **decide(source, blended, predictor.monet, thresholds), "monet": predictor.monet,
            "decode_s": t_decode, "models_s": t_models, "fold_models": predictor.fold_models,
            "views": predictor.views}
