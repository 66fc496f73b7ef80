"""Predict new lesions with a trained experiment, a blend, or an export of either.

    bash run.sh predict SOURCE --data DIR [--out FILE] [key=value ...]
    bash run.sh predict SOURCE --clinical A.jpg --dermoscopic B.jpg [--age 60 --sex female --site head_neck_face
                               --skin-tone 3]
    bash run.sh predict SOURCE --monet-cost [key=value ...]
    bash run.sh predict --speed          (lesions per second here; src/deliver/speed.py)

SOURCE is what made a submission: an experiment, a blend or an export (src/deliver/source.py finds it). Its folds
predict as they were trained, are blended with the submission's weights, and the submitted decision rule is folded
into the probabilities (src/deliver/predict.py); on the official test set this reproduces the submission. ``--data`` writes
the submission-format CSV and a readable one beside it; one lesion prints its diagnoses; ``--monet-cost`` measures
what leaving out the MONET scores costs the source (honest out-of-fold macro F1 on the training lesions).

The decision rule: 'threshold' applies the submission's stored thresholds. 'expected_f1' is label-free and takes its
thresholds from the submitted batch itself, so a new batch gets its own (``--thresholds stored`` applies the
submission's instead; a single lesion always does). Settings are the ones the folds were trained with; only settings
that do not change results (paths, device, eval_batch_size, ...) may be given as key=value.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import CLASSES, DataError, load_test
from .bundle import BundleError, archive_names
from .monet import format_monet_cost, monet_cost, monet_note
from .predict import check_out, known_sites, predict_batch, resolve_source, single_lesion, write_outputs
from .source import PredictError, Source, split_overrides


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
    from ..batches import cache_workers

    image = source.image_config()
    return cache_workers(image) if image is not None else 1


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
        from .speed import main as speed

        return speed(argv)
    try:
        return run(parser().parse_intermixed_args(argv))
    except (PredictError, BundleError) as exc:  # a path inside an unpacked archive: named by the archive
        exc.args = (archive_names(str(exc)),)
        raise


if __name__ == "__main__":
    sys.exit(main())
