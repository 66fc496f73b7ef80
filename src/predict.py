"""Predict new lesions with a trained experiment, a blend, or an export of either.

    bash run.sh predict SOURCE --data DIR [--out FILE] [key=value ...]
    bash run.sh predict SOURCE --clinical A.jpg --dermoscopic B.jpg [--age 60 --sex female --site head_neck_face
                               --skin-tone 3]
    bash run.sh predict SOURCE --monet-cost [key=value ...]
    bash run.sh predict --speed          (lesions per second here; src/predict_speed.py)

SOURCE is what made a submission: an experiment (``<output_dir>/<name>/`` and its submission's sidecar
``<submission_dir>/<name>.json``), a blend (its sidecar names the experiments and their weights) or an export (a
folder or ``.tar.gz`` written by ``bash run.sh export``; src/export.py). Each experiment's folds predict with their
best weights, their own fitted metadata transform and the experiment's test-time augmentation; the folds are
averaged as the experiment's test.csv averages them, the experiments blended with the sidecar's weights, and the
submitted decision rule folded into the probabilities (src/decision.py). A stacker predicts from its inputs'
predictions, as it was trained. On the official test set this reproduces the submission.

The decision rule: 'threshold' applies the submission's stored thresholds. 'expected_f1' is label-free and takes its
thresholds from the submitted batch itself, so a new batch gets its own (``--thresholds stored`` applies the
submission's instead; a single lesion always does). Settings are the ones the folds were trained with; only settings
that do not change results (paths, device, eval_batch_size, ...) may be given as key=value.

Loading never executes code from the source: weights are safetensors (an export) or checkpoints read with
``torch.load(weights_only=True)``, fitted transforms and models are JSON (src/portable.py), and the network is
built by this checkout's code of the experiment it names.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .config import Config, ConfigError, config_from_dict, experiment_recipe
from .data import CLASSES, MONET, DataError, load_test
from .settings import KEYS

LOGIT_CLIP = 1e-6  # the stacker's (src/stacker.py)
# What leaving out the 14 MONET scores cost exp000 on the 4,192 real training lesions (README, Results): honest
# out-of-fold macro F1 of the expected-F1 rule with the MONET scores removed from the validation rows only (the models
# trained with them, as the deployed ones are), mean +- std over fold seeds 42, 7, 2026 (`bash run.sh predict exp000
# --monet-cost data_dir=<the CSVs>`, and the same with name=exp000_fs7 fold_seed=7, ...); ``trained_without``: exp000
# trained and scored with every MONET score blank (its best honest rule, threshold; fold seed 42).
MONET_COST_EXP000 = {"with": 0.3990, "with_std": 0.0029, "without": 0.1692, "without_std": 0.0035,
                     "cost": 0.2298, "cost_std": 0.0051, "seeds": "42, 7, 2026", "trained_without": 0.2424}


class PredictError(ValueError):
    """A source, an input or an output that predict cannot use; the message names what and where."""


# ----------------------------------------------------------------------------------------------------
# sources: what to predict with
# ----------------------------------------------------------------------------------------------------
@dataclass
class Member:
    """One experiment a source predicts with: its folder (an experiment's output folder or its copy in an export),
    the settings its folds were trained with, and how it predicts ('image', 'tabular' or 'stack' over ``inputs``)."""

    name: str
    folder: Path
    cfg: Config
    kind: str
    inputs: list[str] = field(default_factory=list)
    bundle: bool = False

    @property
    def n_folds(self) -> int:
        return self.cfg.n_folds

    def fold_dir(self, k: int) -> Path:
        return self.folder / f"fold{k}"


@dataclass
class Source:
    """What made a submission: its experiments with their blend weights, its decision rule and thresholds."""

    name: str
    kind: str                      # 'experiment', 'blend' or 'export'
    members: dict[str, Member]     # every experiment needed: the blended ones and a stacker's inputs
    weights: dict[str, float]      # the blended experiments, in the sidecar's order
    rule: str
    thresholds: np.ndarray         # the submission's
    thresholds_from: str
    info: dict                     # the sidecar, or the export's bundle.json
    where: Path

    def describe(self) -> str:
        blend = ", ".join(f"{k} {v:.4f}" for k, v in self.weights.items())
        return (f"{self.kind} {self.name} ({self.where}): {blend}; rule {self.rule}")


def member_kind(cfg: Config) -> tuple[str, list[str]]:
    """('image' | 'tabular' | 'stack', the stacker's inputs) of an experiment, from this checkout's recipe."""
    from .stacker import StackRecipe, input_names

    recipe = experiment_recipe(cfg.experiment)
    if isinstance(recipe, StackRecipe):
        return "stack", input_names(cfg)
    return ("image" if recipe.images else "tabular"), []


NOT_TAKEN = ("name", "decision")  # the folder is the source's; the rule is the submission's


def split_overrides(args: list[str]) -> dict[str, str]:
    """key=value arguments; only settings that do not change results are accepted (the folds' own settings are
    what predicts)."""
    from .config import parse_cli_overrides

    pairs = parse_cli_overrides(args)
    for name in pairs:
        spec = KEYS.get(name)
        if spec is None or name in NOT_TAKEN:
            takes = ", ".join(k for k, s in KEYS.items() if not s.results and k not in NOT_TAKEN)
            raise ConfigError(f"command line: {name}= is not a setting predict takes; it takes the settings that do "
                              f"not change results: {takes}")
        if spec.results:
            raise ConfigError(f"command line: {name}= changes results; predict uses the settings each fold was "
                              f"trained with (only settings that do not change results can be given)")
    return pairs


def saved_config(path: Path, overrides: dict[str, str]) -> Config:
    """The settings an experiment was trained with (its config.json), with ``overrides`` applied."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PredictError(f"{path}: missing (the experiment's settings)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PredictError(f"{path}: not a saved config ({exc})") from None
    try:
        cfg = config_from_dict(saved, source=str(path))
        return cfg.replace(**overrides) if overrides else cfg
    except ConfigError as exc:
        raise PredictError(f"{path}: {exc}") from None


def resolve_source(name: str, overrides: dict[str, str]) -> Source:
    """SOURCE as the command line names it: an export (a folder or archive path), else the sidecar of a submission
    ``<submission_dir>/<name>.json`` (an experiment or a blend)."""
    path = Path(name)
    if path.is_file() or (path / "MANIFEST.json").is_file():
        from .export import open_bundle

        return open_bundle(path, overrides)
    if path.is_dir() and len(path.parts) > 1:
        raise PredictError(f"{path}: a folder but not an export of this project (no MANIFEST.json in it)")
    base = Config().replace(**overrides) if overrides else Config()
    sidecar = Path(base.submission_dir) / f"{name}.json"
    if not sidecar.is_file():
        folder = Path(base.output_dir) / name
        if (folder / "config.json").is_file():
            raise PredictError(f"{name}: experiment {folder} has no submission ({sidecar} is missing): `bash run.sh "
                               f"blend {name}` writes it; predict applies the submission's weights and decision rule")
        raise PredictError(f"{name}: no experiment, blend or export of that name (looked for the submission sidecar "
                           f"{sidecar}, the experiment folder {folder}, and a folder or .tar.gz export at {path}); "
                           "give output_dir= / submission_dir= where it was trained")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        weights = {str(k): float(info["weights"][k]) for k in info["experiments"]}
        rule = str(info["decision"])
        thresholds = np.array([float(info["thresholds"][c]) for c in CLASSES])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PredictError(f"{sidecar}: not a submission sidecar of this project ({type(exc).__name__}: {exc})") \
            from None
    members: dict[str, Member] = {}
    todo = list(weights)
    while todo:
        exp_name = todo.pop(0)
        if exp_name in members:
            continue
        folder = Path(base.output_dir) / exp_name
        cfg = saved_config(folder / "config.json", {**overrides, "output_dir": str(base.output_dir)})
        from .experiment import ExperimentDir

        reason = ExperimentDir(cfg.replace(name=exp_name)).incomplete_reason()
        if reason:
            raise PredictError(reason)
        kind, inputs = member_kind(cfg)
        members[exp_name] = Member(exp_name, folder, cfg, kind, inputs)
        todo += inputs
    kind = "experiment" if list(weights) == [name] else "blend"
    return Source(name, kind, members, weights, rule, thresholds, str(info.get("thresholds_from", "")), info, sidecar)


# ----------------------------------------------------------------------------------------------------
# one fold of one experiment
# ----------------------------------------------------------------------------------------------------
def load_features(member: Member, k: int):
    """The fold's fitted metadata transform: features.json; for a fold trained before it was saved, its
    encoder.json ('base', 'extended') or, for 'interactions', the transform refitted on the fold's training rows
    and checked against the saved encoder."""
    from .features import MetadataEncoder, MetadataFeatures

    fdir = member.fold_dir(k)
    if (fdir / "features.json").is_file() or member.bundle:
        return MetadataFeatures.load(_need(fdir / "features.json"))
    encoder = MetadataEncoder.load(_need(fdir / "encoder.json"))
    expected = experiment_recipe(member.cfg.experiment).features(member.cfg)
    if expected.kind != "interactions":
        return MetadataFeatures.from_encoder(encoder)
    from .experiment import load_lesions

    lesions = load_lesions(member.cfg)
    refit = expected.fit(lesions.train[lesions.folds != k])
    if json.dumps(refit.encoder.to_dict(), sort_keys=True) != json.dumps(encoder.to_dict(), sort_keys=True):
        raise PredictError(f"{fdir}: trained before its fitted features were saved (no features.json), and refitting "
                           f"them on the training rows of {member.cfg.data_dir} does not give its encoder.json back; "
                           f"give data_dir= the data it was trained on, or retrain the experiment")
    return refit


def _need(path: Path) -> Path:
    if not path.is_file():
        raise PredictError(f"{path}: missing")
    return path


def read_weights(member: Member, k: int) -> dict:
    """The fold's best weights: weights.safetensors in an export, best.pt (read with weights_only=True) in an
    experiment folder."""
    fdir = member.fold_dir(k)
    if member.bundle:
        from .export import read_safetensors

        return read_safetensors(_need(fdir / "weights.safetensors"))
    from .train import CheckpointError, read_checkpoint

    try:
        return read_checkpoint(_need(fdir / "best.pt"))["model"]
    except CheckpointError as exc:
        raise PredictError(str(exc)) from None


class ImageFold:
    """A fold of an image experiment: its features, its network with the best weights, its TTA."""

    def __init__(self, member: Member, k: int, device):
        self.member, self.k, self.device = member, k, device
        self.features = load_features(member, k)
        self.aux = json.loads(_need(member.fold_dir(k) / "aux_vocab.json").read_text(encoding="utf-8"))
        self.state = read_weights(member, k)
        self.views = 8 if member.cfg.tta else 1
        self.model = self.augment = None

    def _build(self, n_meta: int) -> None:
        from .speed.apply import load_plain_state
        from .step import setup_model

        cfg = self.member.cfg
        net = experiment_recipe(cfg.experiment).network(cfg.replace(pretrained=False), n_meta, len(self.aux))
        self.model, self.augment = setup_model(cfg, net, self.device)
        try:
            load_plain_state(self.model, self.state)
        except RuntimeError as exc:
            where = self.member.fold_dir(self.k) / ("weights.safetensors" if self.member.bundle else "best.pt")
            raise PredictError(f"{where} holds the weights of another network than experiment "
                               f"{cfg.experiment}'s code builds (another version of the project?: "
                               f"{str(exc).splitlines()[0][:120]})") from None

    def predict(self, lesions: pd.DataFrame, images: np.ndarray, rows: np.ndarray, extra=None) -> np.ndarray:
        from .inference import predict

        meta = self.features.transform(lesions.iloc[rows])
        if self.model is None:
            self._build(meta.shape[1])
        return predict(self.model, self.member.cfg, images, rows, meta, self.augment, self.device, self.views,
                       f"{self.member.name} fold {self.k}").astype(np.float64)


class TabularFold:
    """A fold of a tabular experiment or a stacker: its features and its linear models (models.json)."""

    def __init__(self, member: Member, k: int):
        self.member, self.k = member, k
        self.features = load_features(member, k)
        path = _need(member.fold_dir(k) / "models.json") if member.bundle or (member.fold_dir(k) / "models.json"
                                                                              ).is_file() else None
        if path is None:
            raise PredictError(f"{member.fold_dir(k)}: trained before its models were saved (no models.json); "
                               f"delete {member.folder} and rerun `bash run.sh {member.name}` (a tabular experiment "
                               "takes seconds)")
        self.models = json.loads(path.read_text(encoding="utf-8"))
        bad = [m for m in self.models if m.get("model") is None]
        if bad:
            raise PredictError(f"{path}: model '{bad[0]['name']}' cannot be stored without a pickle "
                               f"({bad[0].get('why', '')}); predict supports the linear tabular models (lrx, logreg)")

    def predict(self, lesions: pd.DataFrame, images, rows: np.ndarray, extra=None) -> np.ndarray:
        from .portable import NotPortable
        from .tabular import predict_saved

        x = self.features.transform(lesions.iloc[rows])
        if extra is not None:
            x = np.hstack([extra[rows], x])
        try:
            return predict_saved(self.models, x)
        except NotPortable as exc:
            raise PredictError(f"{self.member.fold_dir(self.k) / 'models.json'}: {exc}") from None


def open_fold(member: Member, k: int, device):
    return ImageFold(member, k, device) if member.kind == "image" else TabularFold(member, k)


# ----------------------------------------------------------------------------------------------------
# images and lesions
# ----------------------------------------------------------------------------------------------------
def decode_images(lesions: pd.DataFrame, size: int, workers: int = 1) -> np.ndarray:
    """uint8 (n, 2, size, size, 3): each lesion's two JPEGs decoded exactly as the training cache decodes them
    (src/cache.py), in memory; a missing or broken image is a DataError naming it."""
    from .cache import _decode_lesion

    jobs = [(i, str(lid), str(c), str(d), size)
            for i, (lid, c, d) in enumerate(zip(lesions["lesion_id"], lesions["clin_path"], lesions["derm_path"]))]
    out = np.empty((len(jobs), 2, size, size, 3), dtype=np.uint8)
    if workers > 1 and len(jobs) >= 64:
        import multiprocessing

        with multiprocessing.Pool(workers) as pool:
            for i, pair in pool.imap_unordered(_decode_lesion, jobs, chunksize=16):
                out[i] = pair
    else:
        for job in jobs:
            i, pair = _decode_lesion(job)
            out[i] = pair
    return out


SEX_VALUES = ("male", "female")


def single_lesion(clinical: str, dermoscopic: str, age: float | None = None, sex: str | None = None,
                  site: str | None = None, skin_tone: int | None = None) -> pd.DataFrame:
    """One lesion as a row of the loader's lesion table: every field not given (and every MONET score) missing,
    as the loader reads an empty field."""
    for flag, path in (("--clinical", clinical), ("--dermoscopic", dermoscopic)):
        if not Path(path).is_file():
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
           "clin_isic_id": Path(clinical).stem, "derm_isic_id": Path(dermoscopic).stem,
           "clin_path": str(clinical), "derm_path": str(dermoscopic), "clin_manipulation": "",
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
    them (``rows_of`` None), or out of fold (``rows_of``: the fold of every lesion; fold k predicts its own rows)."""

    def __init__(self, source: Source, lesions: pd.DataFrame, images: dict[int, np.ndarray] | None = None,
                 rows_of: np.ndarray | None = None, device=None):
        from .batches import resolve_device

        self.source, self.lesions, self.rows_of = source, lesions, rows_of
        self.images = images if images is not None else {}
        first = next(iter(source.members.values())).cfg
        self.device = device or resolve_device(first)
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
        if self.rows_of is None:
            acc = 0
            for k in range(member.n_folds):
                acc = acc + self._fold(member, k).predict(self.lesions, images, np.arange(n), extra)
            out = acc / member.n_folds
        else:
            out = np.full((n, len(CLASSES)), np.nan)
            for k in range(member.n_folds):
                rows = np.flatnonzero(self.rows_of == k)
                out[rows] = self._fold(member, k).predict(self.lesions, images, rows, extra)
        self.memo[name] = out
        return out

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


def decide(source: Source, blended: np.ndarray, thresholds: str = "batch") -> tuple[np.ndarray, str]:
    """The thresholds this batch is decided with, and where they come from."""
    from .decision import RULES, expected_f1_thresholds

    rule = RULES.get(source.rule)
    if rule is None:
        raise PredictError(f"{source.where}: decision rule {source.rule!r} is not one this checkout knows "
                           f"({', '.join(RULES)})")
    if source.rule == "none":
        return np.full(len(CLASSES), 0.5), "the plain 0.5 cut"
    if rule.labelled or thresholds == "stored":
        return source.thresholds, (f"the submission's stored thresholds ({source.thresholds_from or 'as submitted'})"
                                   if not rule.labelled else "the thresholds tuned on the out-of-fold rows")
    return expected_f1_thresholds(blended), f"rule {source.rule} on this batch of {len(blended)} lesion(s)"


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
    from .experiment import probs_frame
    from .io_utils import atomic_write_many
    from .submission import _checked_csv

    readable = out.with_name(out.stem + "_diagnoses.csv")
    table = readable_frame(ids, blended, folded)
    atomic_write_many({out: _checked_csv(probs_frame(ids, folded), ids, out),
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


def predict_batch(source: Source, lesions: pd.DataFrame, workers: int = 1, thresholds: str = "batch",
                  device=None) -> dict:
    """Every lesion of ``lesions`` through the source: blended probabilities, thresholds, folded probabilities and
    timings."""
    t0 = time.time()
    predictor = Predictor(source, lesions, device=device)
    images = {s: decode_images(lesions, s, workers) for s in predictor.sizes()}
    predictor.images = images
    t_decode = time.time() - t0
    blended = predictor.blended()
    t_models = time.time() - t0 - t_decode
    t, why = decide(source, blended, thresholds)
    from .decision import fold_probabilities

    return {"blended": blended, "thresholds": t, "thresholds_why": why, "folded": fold_probabilities(blended, t),
            "decode_s": t_decode, "models_s": t_models, "fold_models": predictor.fold_models,
            "views": predictor.views}


# ----------------------------------------------------------------------------------------------------
# what leaving out the MONET scores costs
# ----------------------------------------------------------------------------------------------------
def monet_cost(source: Source) -> dict:
    """Honest out-of-fold macro F1 of the source with and without the MONET scores of the validation rows (the
    folds' models trained with them, as deployed): each fold predicts its own validation rows with every MONET score
    missing, the blend weights are the submission's, and every decision rule is scored honestly (a labelled rule
    tuned on the other folds, the label-free one per fold)."""
    from .decision import honest_scores
    from .experiment import load_lesions

    if source.kind == "export":
        raise PredictError("--monet-cost needs the training lesions and folds: run it on the experiment or blend, "
                           "not on an export")
    first = next(iter(source.members.values())).cfg
    lesions = load_lesions(first)
    train = lesions.train.reset_index(drop=True)
    blind = train.copy()
    for c in (f"{v}_{m}" for v in ("clin", "derm") for m in MONET):
        blind[c] = np.nan
    y = lesions.labels()
    out = {}
    for label, table in (("with", train), ("without", blind)):
        predictor = Predictor(source, table, rows_of=lesions.folds)
        if predictor.sizes():
            from .batches import cache_workers
            from .cache import build_cache

            predictor.images = {s: build_cache(train, s, first.resolved_cache_dir(), "train",
                                               num_workers=cache_workers(first)) for s in predictor.sizes()}
        out[label] = honest_scores(y, predictor.blended(), lesions.folds)
    return {"rule": source.rule, "n_lesions": len(train), "n_folds": int(len(np.unique(lesions.folds))),
            "fold_seed": first.fold_seed, "data_dir": str(first.data_dir), **out}


def format_monet_cost(result: dict) -> str:
    rule = result["rule"]
    lines = [f"honest out-of-fold macro F1 on {result['n_lesions']} training lesions ({result['n_folds']} folds, fold "
             f"seed {result['fold_seed']}), the models trained with the MONET scores:",
             f"{'rule':>12} {'with MONET':>11} {'without':>9} {'change':>8}"]
    for r in result["with"]:
        lines.append(f"{r:>12} {result['with'][r]:>11.4f} {result['without'][r]:>9.4f} "
                     f"{result['without'][r] - result['with'][r]:>+8.4f}" + ("  (submitted)" if r == rule else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------
def monet_note() -> str:
    c = MONET_COST_EXP000
    return (f"leaving them out cost the metadata-only exp000 {c['cost']:.2f} honest macro F1 on the 4,192 real "
            f"training lesions ({c['with']:.2f} -> {c['without']:.2f}; a model trained without them reaches "
            f"{c['trained_without']:.2f}); --monet-cost measures a source")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bash run.sh predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="A single lesion is given no MONET scores (they come from a model the release ran on its images); "
               "they and every field not given are treated as missing, as the loader treats an empty field: "
               + monet_note() + ". `bash run.sh predict --speed` measures lesions per second on this machine.")
    ap.add_argument("source", metavar="SOURCE", help="an experiment, a blend (submission name) or an export "
                    "(folder or .tar.gz)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="settings that do not change results: output_dir=, submission_dir=, data_dir=, device=, "
                    "eval_batch_size=, num_workers=")
    ap.add_argument("--data", metavar="DIR", help="lesions in the official test layout (MILK10k_Test_Metadata.csv "
                    "and MILK10k_Test_Input/, plain or nested)")
    ap.add_argument("--out", metavar="FILE", help="the submission-format CSV (default <output_dir>/predictions/"
                    "<SOURCE>.csv); the readable diagnoses go beside it as <FILE stem>_diagnoses.csv")
    ap.add_argument("--thresholds", choices=("batch", "stored"), default="batch",
                    help="a label-free rule (expected_f1): thresholds from this batch (default) or the submission's")
    one = ap.add_argument_group("one lesion (instead of --data)")
    one.add_argument("--clinical", metavar="JPG", help="the clinical close-up")
    one.add_argument("--dermoscopic", metavar="JPG", help="the dermoscopic image")
    one.add_argument("--age", type=float, help="age in years (missing when left out)")
    one.add_argument("--sex", help="male or female (missing when left out)")
    one.add_argument("--site", help="anatomical site as the metadata spells it, e.g. head_neck_face")
    one.add_argument("--skin-tone", type=int, help="skin tone class 0-5")
    ap.add_argument("--monet-cost", action="store_true",
                    help="measure the honest out-of-fold macro F1 with the MONET scores removed from the validation "
                    "rows (needs the training data: data_dir=)")
    return ap


def run(ns: argparse.Namespace) -> int:
    overrides = split_overrides(ns.overrides)
    single = ns.clinical is not None or ns.dermoscopic is not None
    modes = sum([single, ns.data is not None, ns.monet_cost])
    if modes != 1:
        raise PredictError("give exactly one of --data DIR, --clinical A.jpg --dermoscopic B.jpg, or --monet-cost")
    if single and (ns.clinical is None or ns.dermoscopic is None):
        raise PredictError("one lesion needs both --clinical and --dermoscopic")
    out = None
    if ns.data is not None:
        out = Path(ns.out) if ns.out else Path(overrides.get("output_dir", "output")) / "predictions" / \
            f"{Path(ns.source).name.removesuffix('.tar.gz')}.csv"
        check_out(out)
    source = resolve_source(ns.source, overrides)
    workers = _workers(source)
    print(f"[predict] {source.describe()}", flush=True)
    if ns.monet_cost:
        print(format_monet_cost(monet_cost(source)))
        return 0
    if single:
        lesions = single_lesion(ns.clinical, ns.dermoscopic, ns.age, ns.sex, ns.site, ns.skin_tone)
        if ns.site is not None:
            sites = known_sites(source)
            if lesions["site"].iat[0] not in sites:
                raise DataError(f"--site {ns.site!r}: not a site the models were trained on; use one of "
                                f"{', '.join(sites)} (leave it out when unknown)")
        result = predict_batch(source, lesions, 1, "stored")
        print(format_single(source, lesions, result))
        return 0
    lesions = load_test(ns.data, check_images=any(m.kind == "image" for m in source.members.values()))
    result = predict_batch(source, lesions, workers, ns.thresholds)
    ids = lesions["lesion_id"].tolist()
    paths = write_outputs(out, ids, result["blended"], result["folded"])
    n = len(lesions)
    total = result["decode_s"] + result["models_s"]
    print(f"[predict] {n} lesions in {total:.1f}s ({n / max(total, 1e-9):.1f} lesions/s): images decoded in "
          f"{result['decode_s']:.1f}s, {result['fold_models']} fold models ({result['views']} TTA views in all) in "
          f"{result['models_s']:.1f}s", flush=True)
    print(f"[predict] decided with {result['thresholds_why']}")
    for key, path in paths.items():
        print(f"[predict] {key:<10} {path}")
    return 0


def _workers(source: Source) -> int:
    from .batches import cache_workers

    return cache_workers(next(iter(source.members.values())).cfg)


def format_single(source: Source, lesions: pd.DataFrame, result: dict) -> str:
    p, t, f = result["blended"][0], result["thresholds"], result["folded"][0]
    given = [k for k, c in (("age", "age_approx"), ("sex", "sex"), ("site", "site"), ("skin tone", "skin_tone_class"))
             if not (pd.isna(lesions[c].iat[0]) or lesions[c].iat[0] == "")]
    lines = [f"{'class':<8} {'probability':>11} {'threshold':>9}  decision"]
    for j in np.argsort(-p, kind="stable"):
        lines.append(f"{CLASSES[j]:<8} {p[j]:>11.4f} {t[j]:>9.4f}  {'POSITIVE' if f[j] > 0.5 else '-'}")
    decided = [CLASSES[j] for j in np.argsort(-p, kind="stable") if f[j] > 0.5]
    missing = [k for k in ("age", "sex", "site", "skin tone") if k not in given] + ["the 14 MONET scores"]
    lines += ["", f"decisions: {', '.join(decided) if decided else 'none'} (rule {source.rule}, "
                  f"{result['thresholds_why']})",
              f"given: {', '.join(given) or 'no metadata'}; treated as missing: {', '.join(missing)} "
              f"({monet_note()}).",
              "Research use on the ISIC 2025 MILK10k benchmark only; not a medical device."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``bash run.sh predict ...`` (through src/cli.py, which turns the errors a user can fix into one line and
    exit status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--speed" in argv:
        from .predict_speed import main as speed

        return speed(argv)
    return run(parser().parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
