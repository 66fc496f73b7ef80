"""The MILK10k data layer: find the official files, validate them, and return one row per lesion.

The metadata has one row per image and two images per lesion (a clinical close-up and a dermoscopic
image); ``load_train`` and ``load_test`` pair them into one row per lesion.  Every problem found in an
input file raises :class:`DataError` naming the file, the CSV line (the header is line 1) and the column.

One rule for every CSV the project reads (this module and the scorer, src/scoring.py): a UTF-8 byte-order
mark at the start is accepted, and so are CRLF line ends. In the metadata's optional fields (OPTIONAL:
age, sex, skin tone, site and the MONET scores) an empty field and the usual missing-value markers
(MISSING_MARKERS: NaN, NA, N/A, null, None, ... in any case) all mean "missing" and are imputed the same way
(src/features.py); anything else that is not a number where one is needed ('seventy', 'inf') is an error.
In the ground truth and in predictions a missing value is always an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

CLASSES = ["AKIEC", "BCC", "BEN_OTH", "BKL", "DF", "INF", "MAL_OTH", "MEL", "NV", "SCCKA", "VASC"]
MONET = [
    "MONET_ulceration_crust",
    "MONET_hair",
    "MONET_vasculature_vessels",
    "MONET_erythema",
    "MONET_pigmented",
    "MONET_gel_water_drop_fluid_dermoscopy_liquid",
    "MONET_skin_markings_pen_ink_purple_pen",
]
METADATA_COLUMNS = [
    "lesion_id", "image_type", "isic_id", "attribution", "copyright_license", "image_manipulation",
    "age_approx", "sex", "skin_tone_class", "site", *MONET,
]
GT_COLUMNS = ["lesion_id", *CLASSES]
SUPPLEMENT_COLUMNS = ["isic_id", "diagnosis_full", "diagnosis_confirm_type", "invasion_thickness_interval"]
IMAGE_TYPES = {"clinical": "clinical: close-up", "dermoscopic": "dermoscopic"}

TRAIN_METADATA = "MILK10k_Training_Metadata.csv"
TRAIN_GROUND_TRUTH = "MILK10k_Training_GroundTruth.csv"
TRAIN_SUPPLEMENT = "MILK10k_Training_Supplement.csv"
TEST_METADATA = "MILK10k_Test_Metadata.csv"
SAMPLE_SUBMIT = "MILK10k_Sample_Submit.csv"
TRAIN_IMAGES = "MILK10k_Training_Input"
TEST_IMAGES = "MILK10k_Test_Input"

_LESION_FIELDS = ["age_approx", "sex", "skin_tone_class", "site"]
OPTIONAL = [*_LESION_FIELDS, *MONET]
MISSING_MARKERS = {"", "nan", "-nan", "na", "n/a", "#n/a", "null", "none", "<na>"}  # what pandas reads as NaN
_HELP = "see input/README.md for where the MILK10k files go"


class DataError(ValueError):
    """An input file that cannot be used; the message names the file, line and column."""


@dataclass(frozen=True)
class DataFiles:
    """Resolved locations of the official files; a piece that is not there is ``None``."""

    root: Path
    train_metadata: Path | None
    train_ground_truth: Path | None
    train_supplement: Path | None
    train_images: Path | None
    test_metadata: Path | None
    test_images: Path | None


def locate(data_dir: str | os.PathLike) -> DataFiles:
    """Find the files at the top of ``data_dir`` (sub-folders such as ``hidden/`` are never searched).

    An image folder may be plain (``MILK10k_Training_Input/<lesion>/``) or nested twice, as unzipping makes it.
    """
    root = Path(data_dir).expanduser().resolve()

    def file(name: str) -> Path | None:
        return root / name if (root / name).is_file() else None

    def images(name: str) -> Path | None:
        return next((p for p in (root / name / name, root / name) if p.is_dir()), None)

    return DataFiles(
        root=root,
        train_metadata=file(TRAIN_METADATA),
        train_ground_truth=file(TRAIN_GROUND_TRUTH),
        train_supplement=file(TRAIN_SUPPLEMENT),
        train_images=images(TRAIN_IMAGES),
        test_metadata=file(TEST_METADATA),
        test_images=images(TEST_IMAGES),
    )


def load_train(data_dir: str | os.PathLike, check_images: bool = True) -> pd.DataFrame:
    """One row per training lesion with paired image fields, the 11 labels, ``target`` and ``diagnosis_full``.

    ``check_images`` also requires every JPEG to exist (decoding is checked later, by :func:`check_jpeg`).
    """
    files = locate(data_dir)
    meta_path = _require(files.train_metadata, files.root, TRAIN_METADATA)
    gt_path = _require(files.train_ground_truth, files.root, TRAIN_GROUND_TRUTH)
    meta = _read_metadata(meta_path)
    lesions = _lesions(meta, meta_path, files.root, files.train_images, TRAIN_IMAGES, check_images)

    gt = _read_ground_truth(gt_path)
    _check_same_lesions(gt, gt_path, meta, meta_path)
    labels = gt.set_index("lesion_id").loc[lesions.lesion_id, CLASSES].to_numpy()
    lesions[CLASSES] = labels
    lesions["target"] = labels.argmax(axis=1).astype(int)

    lesions["diagnosis_full"] = ""
    if files.train_supplement is not None:
        sup = _read_csv(files.train_supplement, SUPPLEMENT_COLUMNS)
        _check_unique(sup, "isic_id", files.train_supplement)
        diagnosis = lesions.derm_isic_id.map(sup.set_index("isic_id").diagnosis_full)
        lesions["diagnosis_full"] = diagnosis.fillna("").astype(str)
    return lesions


def load_test(data_dir: str | os.PathLike, check_images: bool = True) -> pd.DataFrame:
    """One row per test lesion with the paired image fields (no labels)."""
    files = locate(data_dir)
    meta_path = _require(files.test_metadata, files.root, TEST_METADATA)
    return _lesions(_read_metadata(meta_path), meta_path, files.root, files.test_images, TEST_IMAGES, check_images)


def check_jpeg(path: str | os.PathLike) -> None:
    """Raise :class:`DataError` unless ``path`` is a JPEG that decodes completely."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            found = im.format
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a decodable JPEG: {e}") from None
    if found != "JPEG":
        raise DataError(f"{path}: not a JPEG (the file holds {found} data)")


# --- reading and validation ---------------------------------------------------------------------

def _near_names(root: Path, name: str) -> list[str]:
    """Files in ``root`` that are ``name`` but for letter case, or ``name`` compressed (``.zip``, ``.gz``)."""
    if not root.is_dir():
        return []
    want = name.lower()
    return sorted(p.name for p in root.iterdir()
                  if p.name != name and (p.name.lower() == want or p.name.lower().startswith(want + ".")))


def _require(path: Path | None, root: Path, name: str) -> Path:
    if path is not None:
        return path
    where = f"{root} does not exist" if not root.is_dir() else f"looked for {root / name}"
    near = _near_names(root, name)
    hint = (f"; {', '.join(near)} is there: rename or unpack it to {name}" if near else "")
    raise DataError(f"{root}: required file {name} not found ({where}){hint}; {_HELP}")


def _where(df: pd.DataFrame, i: int, path: Path, column: str) -> str:
    """``file: line N (lesion_id X), column 'C'`` for row position ``i`` of a frame read by ``_read_csv``."""
    key = "lesion_id" if "lesion_id" in df.columns else "isic_id"
    return f"{path}: line {i + 2} ({key} {df[key].iat[i]}), column '{column}'"


def _first(mask: pd.Series | np.ndarray) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """Read every field as text ('' when empty) and insist on exactly ``columns``."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False,
                         encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as CSV: {str(e).strip()}") from None
    filled = np.flatnonzero((df != "").any(axis=1).to_numpy())
    df = df.iloc[: filled[-1] + 1 if len(filled) else 0]  # blank lines inside stay, to be reported by line
    missing = [c for c in columns if c not in df.columns]
    extra = [c for c in df.columns if c not in columns]
    if missing or extra:
        problems = []
        if missing:
            problems.append("missing required column(s) " + ", ".join(f"'{c}'" for c in missing))
        if extra:
            problems.append("unexpected column(s) " + ", ".join(f"'{c}'" for c in extra))
        raise DataError(f"{path}: line 1 (header): {'; '.join(problems)}; expected exactly: {', '.join(columns)}")
    if df.empty:
        raise DataError(f"{path}: line 2: no data rows")
    df = df[columns].reset_index(drop=True)
    _check_present(df, columns[0], path)
    return df


def _check_present(df: pd.DataFrame, column: str, path: Path) -> None:
    empty = df[column].str.strip() == ""
    if empty.any():
        raise DataError(f"{path}: line {_first(empty) + 2}, column '{column}': missing value")


def _numeric(df: pd.DataFrame, column: str, path: Path, required: bool = False) -> np.ndarray:
    """The column as float64; empty fields become NaN unless ``required``; text or inf is an error."""
    raw = df[column]
    values = pd.to_numeric(raw.where(raw != ""), errors="coerce").astype(float).to_numpy()
    bad = (raw != "").to_numpy() & ~np.isfinite(values)
    if required:
        bad |= (raw == "").to_numpy()
    if bad.any():
        i = _first(bad)
        kind = "number" if np.isnan(values[i]) else "finite number"
        problem = f"'{raw.iat[i]}' is not a {kind}" if raw.iat[i] else "missing value"
        raise DataError(f"{_where(df, i, path, column)}: {problem}")
    return values


def _check_unique(df: pd.DataFrame, column: str, path: Path) -> None:
    dup = df[column].duplicated()
    if dup.any():
        i = _first(dup)
        first = _first(df[column] == df[column].iat[i])
        raise DataError(
            f"{_where(df, i, path, column)}: duplicate {column} {df[column].iat[i]} (first on line {first + 2})"
        )


def _read_metadata(path: Path) -> pd.DataFrame:
    """The per-image metadata, validated; numeric columns as float64 and a ``_line`` column."""
    df = _read_csv(path, METADATA_COLUMNS)
    df["_line"] = np.arange(len(df)) + 2
    _check_present(df, "isic_id", path)
    unknown = ~df.image_type.isin(IMAGE_TYPES.values())
    if unknown.any():
        i = _first(unknown)
        allowed = " or ".join(f"'{v}'" for v in IMAGE_TYPES.values())
        raise DataError(
            f"{_where(df, i, path, 'image_type')}: unknown image type '{df.image_type.iat[i]}' (expected {allowed})"
        )
    _check_unique(df, "isic_id", path)
    for column in OPTIONAL:  # every missing-value marker reads as an empty field
        marker = df[column].str.strip().str.lower().isin(MISSING_MARKERS)
        df[column] = df[column].where(~marker, "")

    counts = (
        df.groupby(["lesion_id", "image_type"]).size().unstack(fill_value=0)
        .reindex(columns=list(IMAGE_TYPES.values()), fill_value=0)
    )
    bad_lesions = counts.index[(counts != 1).any(axis=1)]
    if len(bad_lesions):
        rows = df[df.lesion_id.isin(bad_lesions)]
        lesion = rows.lesion_id.iat[0]
        lines = df.loc[df.lesion_id == lesion, "_line"].tolist()
        n_clin, n_derm = counts.loc[lesion].tolist()
        raise DataError(
            f"{_where(df, int(rows.index[0]), path, 'image_type')}: lesion has {n_clin} "
            f"'{IMAGE_TYPES['clinical']}' and {n_derm} '{IMAGE_TYPES['dermoscopic']}' image(s) "
            f"(line(s) {', '.join(map(str, lines))}); each lesion needs exactly one of each"
        )
    for column in ["age_approx", "skin_tone_class", *MONET]:
        df[column] = _numeric(df, column, path)
    return df


def _read_ground_truth(path: Path) -> pd.DataFrame:
    gt = _read_csv(path, GT_COLUMNS)
    _check_unique(gt, "lesion_id", path)
    labels = np.column_stack([_numeric(gt, c, path, required=True) for c in CLASSES])
    not_binary = ~np.isin(labels, (0.0, 1.0))
    if not_binary.any():
        i, j = np.argwhere(not_binary)[0]
        raise DataError(f"{_where(gt, i, path, CLASSES[j])}: label {gt[CLASSES[j]].iat[i]} is not 0 or 1")
    sums = labels.sum(axis=1)
    if (sums != 1).any():
        i = _first(sums != 1)
        ones = [c for c, v in zip(CLASSES, labels[i]) if v == 1]
        named = ", ".join(f"'{c}'" for c in ones) if ones else f"'{CLASSES[0]}'..'{CLASSES[-1]}'"
        problem = f"{len(ones)} classes are 1" if ones else "no class is 1"
        raise DataError(
            f"{path}: line {i + 2} (lesion_id {gt.lesion_id.iat[i]}), column(s) {named}: "
            f"labels are not one-hot ({problem}; exactly one must be 1)"
        )
    gt[CLASSES] = labels
    return gt


def _check_same_lesions(gt: pd.DataFrame, gt_path: Path, meta: pd.DataFrame, meta_path: Path) -> None:
    only_gt = gt[~gt.lesion_id.isin(meta.lesion_id)]
    only_meta = meta[~meta.lesion_id.isin(gt.lesion_id)]
    if only_gt.empty and only_meta.empty:
        return
    parts = []
    if not only_gt.empty:
        parts.append(
            f"{len(only_gt)} lesion(s) have labels but no metadata, e.g. {only_gt.lesion_id.iat[0]} "
            f"({gt_path.name} line {only_gt.index[0] + 2})"
        )
    if not only_meta.empty:
        parts.append(
            f"{only_meta.lesion_id.nunique()} lesion(s) have metadata but no labels, e.g. "
            f"{only_meta.lesion_id.iat[0]} ({meta_path.name} line {only_meta._line.iat[0]})"
        )
    raise DataError(f"{gt_path} and {meta_path}, column 'lesion_id': the lesions disagree: {'; '.join(parts)}")


def _lesions(
    meta: pd.DataFrame, meta_path: Path, root: Path, images: Path | None, folder: str, check_images: bool
) -> pd.DataFrame:
    """Pair the two images of each lesion into one row; optionally check that every JPEG exists."""
    if images is None:
        if check_images:
            zipped = root / f"{folder}.zip"
            if zipped.is_file():
                raise DataError(
                    f"{root}: image folder {folder} not found, but {zipped.name} is there, not unzipped: unzip it "
                    f"with `unzip -q {zipped} -d {root}` (the twice-nested or plain layout both work), or let "
                    f"`bash run.sh download --dest {root}` unpack and verify it"
                )
            raise DataError(
                f"{root}: image folder {folder} not found (looked for {root / folder / folder} and "
                f"{root / folder}); {_HELP}"
            )
        images = root / folder
    clin = meta[meta.image_type == IMAGE_TYPES["clinical"]].set_index("lesion_id")
    derm = meta[meta.image_type == IMAGE_TYPES["dermoscopic"]].set_index("lesion_id").sort_index()
    clin = clin.loc[derm.index]
    prefix = f"{images}{os.sep}"

    pairs = (("clin", clin), ("derm", derm))
    columns = {"lesion_id": derm.index.to_numpy(), **{f: derm[f].to_numpy() for f in _LESION_FIELDS}}
    columns.update({f"{tag}_isic_id": part.isic_id.to_numpy() for tag, part in pairs})
    columns.update({f"{tag}_path": (prefix + part.index + os.sep + part.isic_id + ".jpg").to_numpy()
                    for tag, part in pairs})
    columns.update({f"{tag}_manipulation": part.image_manipulation.to_numpy() for tag, part in pairs})
    columns.update({f"{tag}_{name}": part[name].to_numpy() for tag, part in pairs for name in MONET})
    out = pd.DataFrame(columns)

    if check_images:
        paths = np.concatenate([out.clin_path.to_numpy(), out.derm_path.to_numpy()])
        lines = np.concatenate([clin._line.to_numpy(), derm._line.to_numpy()])
        missing = np.array([not os.path.isfile(p) for p in paths])
        if missing.any():
            k = np.flatnonzero(missing)[np.argmin(lines[missing])]
            raise DataError(
                f"{_where(meta, int(lines[k]) - 2, meta_path, 'isic_id')}: image file not found: {paths[k]} "
                f"({int(missing.sum())} of {len(paths)} images missing; {_HELP})"
            )
    return out
