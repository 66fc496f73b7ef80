"""Predict new lesions with a trained experiment, a blend, or an export of either.

    bash run.sh predict SOURCE --data DIR [--out FILE] [key=value ...]
    bash run.sh predict SOURCE --clinical A.jpg --dermoscopic B.jpg [--age 60 --sex female --site head_neck_face
                               --skin-tone 3]
    bash run.sh predict SOURCE --monet-cost [key=value ...]
    bash run.sh predict --speed          (lesions per second here; src/deliver/speed.py)

SOURCE is what made a submission: an experiment, a blend or an export (src/deliver/source.py finds it). Its folds
predict as they were trained, are blended with the submission's weights, and the submitted decision rule is folded
into the probabilities (src/deliver/predict.py); on the official test set this reproduces the submission. ``--data`` writes
the submission-format CSV and a readable one beside it; one lesion prints its diagnoses; ``--monet-cost`` prints
what a lesion without MONET scores gets from the source, as recorded with its submission and (an experiment or a
blend, with its training data) measured again through this path.

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
from .bundle import MANIFEST, BundleError, archive_names
from .monet import format_monet_cost, monet_cost
from .predict import check_out, known_sites, predict_batch, resolve_source, single_lesion, write_outputs
from .source import PredictError, Source, split_overrides

NOTE = ("A lesion without all 14 MONET scores (every single lesion: the release computed them from its images with the "
        "MONET model) takes the path without MONET that every experiment learns, decided with thresholds fitted for "
        "it; what that costs is printed with each prediction and by --monet-cost. Fields not given are missing, as "
        "the loader treats an empty field.")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bash run.sh predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog=NOTE)
    ap.add_argument("source", metavar="SOURCE", help="an experiment, a blend (submission name) or an export "
                    "(folder or .tar.gz)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="settings that do not change results: output_dir=, submission_dir=, data_dir=, device=, "
                    "eval_batch_size=, num_workers=")
    ap.add_argument("--data", metavar="DIR", help="lesions in the official test layout (MILK10k_Test_Metadata.csv "
                    "and MILK10k_Test_Input/, plain or nested)")
    ap.add_argument("--out", metavar="FILE", help="the submission-format CSV (default <output_dir>/predictions/"
                    "<SOURCE>.csv, <name>_export.csv for an export); the readable diagnoses go beside it as "
                    "<FILE stem>_diagnoses.csv")
    ap.add_argument("--thresholds", choices=("batch", "stored"), default="batch",
                    help="a label-free rule (expected_f1): thresholds from this batch (default) or the submission's")
    one = ap.add_argument_group("one lesion (instead of --data)")
    one.add_argument("--clinical", metavar="JPG", help="the clinical close-up (not needed by a metadata-only source)")
    one.add_argument("--dermoscopic", metavar="JPG", help="the dermoscopic image (not needed by a metadata-only "
                     "source)")
    one.add_argument("--age", type=float, help="age in years (missing when left out)")
    one.add_argument("--sex", help="male or female (missing when left out)")
    one.add_argument("--site", help="anatomical site as the metadata spells it, e.g. head_neck_face")
    one.add_argument("--skin-tone", type=int, help="skin tone class 0-5")
    ap.add_argument("--monet-cost", action="store_true",
                    help="what a lesion without MONET scores gets: honest out-of-fold macro F1 as recorded, and for "
                    "an experiment or blend measured again through this path (needs its training data: data_dir=)")
    ap.add_argument("--speed", action="store_true", help="lesions per second on this machine with random weights "
                    "(no SOURCE; `bash run.sh predict --speed --help` lists its options)")
    return ap


def default_out(name: str, overrides: dict[str, str]) -> Path:
    """<output_dir>/predictions/<SOURCE>.csv, or <name>_export.csv for an export (a folder or archive), so an
    experiment and its export never write the same file."""
    path = Path(name)
    export = path.is_file() or (path / MANIFEST).is_file()
    stem = path.name.removesuffix(".tar.gz") + ("_export" if export else "")
    return Path(overrides.get("output_dir", "output")) / "predictions" / f"{stem}.csv"


def run(ns: argparse.Namespace) -> int:
    from ..nomonet import cost_line

    overrides = split_overrides(ns.overrides)
    single = any(v is not None for v in (ns.clinical, ns.dermoscopic, ns.age, ns.sex, ns.site, ns.skin_tone))
    modes = sum([single, ns.data is not None, ns.monet_cost])
    if modes != 1:
        raise PredictError("give exactly one of --data DIR, one lesion (--clinical A.jpg --dermoscopic B.jpg and its "
                           "metadata), or --monet-cost")
    out = None
    if ns.data is not None:
        out = Path(ns.out) if ns.out else default_out(ns.source, overrides)
        check_out(out)
    source = resolve_source(ns.source, overrides)
    images = any(m.kind == "image" for m in source.members.values())
    if single and images and (ns.clinical is None or ns.dermoscopic is None):
        raise PredictError(f"{source.name} reads both images: one lesion needs --clinical and --dermoscopic")
    print(f"[predict] {source.describe()}", flush=True)
    if ns.monet_cost:
        print(format_monet_cost(monet_cost(source)))
        return 0
    if single:
        lesions = single_lesion(ns.clinical if images else None, ns.dermoscopic if images else None, ns.age, ns.sex,
                                ns.site, ns.skin_tone)
        if ns.site is not None:
            sites = known_sites(source)
            if lesions["site"].iat[0] not in sites:
                raise DataError(f"--site {ns.site!r}: not a site the models were trained on; use one of "
                                f"{', '.join(sites)} (leave it out when unknown)")
        print(format_single(source, lesions, predict_batch(source, lesions, 1, "stored")))
        return 0
    lesions = load_test(ns.data, check_images=images)
    result = predict_batch(source, lesions, _workers(source), ns.thresholds)
    ids = lesions["lesion_id"].tolist()
    paths = write_outputs(out, ids, result["blended"], result["folded"])
    n = len(lesions)
    total = result["decode_s"] + result["models_s"]
    print(f"[predict] {n} lesions in {total:.1f}s ({n / max(total, 1e-9):.1f} lesions/s): images decoded in "
          f"{result['decode_s']:.1f}s, {result['fold_models']} fold models ({result['views']} TTA views in all) in "
          f"{result['models_s']:.1f}s", flush=True)
    print(f"[predict] decided with {result['thresholds_why']}")
    lacking = int((~result["monet"]).sum())
    if lacking:
        from ..decision import RULES

        stored = ns.thresholds == "stored" or source.rule not in RULES or RULES[source.rule].labelled
        print(f"[predict] {cost_line(source.info.get('monet'), lacking, n, stored)}")
    for key, path in paths.items():
        print(f"[predict] {key:<10} {path}")
    return 0


def _workers(source: Source) -> int:
    from ..batches import cache_workers

    image = source.image_config()
    return cache_workers(image) if image is not None else 1


def format_single(source: Source, lesions: pd.DataFrame, result: dict) -> str:
    """One lesion's answer: the model and its revision, how good it is for a lesion like this one, what the lesion
    had and lacked, the rule, all 11 probabilities with their thresholds and decisions, and the most likely class."""
    from ..nomonet import cost_line

    p, t, f = result["blended"][0], result["thresholds"][0], result["folded"][0]
    fields = (("age", "age_approx"), ("sex", "sex"), ("site", "site"), ("skin tone", "skin_tone_class"))
    given = [k for k, c in fields if not (pd.isna(lesions[c].iat[0]) or lesions[c].iat[0] == "")]
    missing = [k for k, _ in fields if k not in given] + ([] if result["monet"][0] else ["the 14 MONET scores"])
    monet = source.info.get("monet")
    revision = source.info.get("commit") or "unknown"
    lines = [f"model: {source.kind} {source.name} ({', '.join(source.weights)}), code revision {revision[:12]}",
             f"this lesion: given {', '.join(given) or 'no metadata'}; missing {', '.join(missing) or 'nothing'}"]
    if result["monet"][0]:
        w = (monet or {}).get("with")
        lines.append(f"quality: honest out-of-fold macro F1 {w['honest']:.3f} (95% CI {w['interval'][0]:.3f}-"
                     f"{w['interval'][1]:.3f})" if w else "quality: not recorded with this source")
    else:
        lines.append(cost_line(monet, 1, 1, stored=True))
    lines += [f"rule {source.rule}, {result['thresholds_why']}", "",
              f"{'class':<8} {'probability':>11} {'threshold':>9}  decision"]
    order = np.argsort(-p, kind="stable")
    for j in order:
        lines.append(f"{CLASSES[j]:<8} {p[j]:>11.4f} {t[j]:>9.4f}  {'POSITIVE' if f[j] > 0.5 else '-'}")
    decided = [CLASSES[j] for j in order if f[j] > 0.5]
    lines += ["", f"most likely: {CLASSES[order[0]]} ({p[order[0]]:.4f}); decided positive: "
                  f"{', '.join(decided) if decided else 'none (no class passes its threshold)'}",
              f"Each class's probability is read on its own, as the leaderboard cuts each class: the 11 need not "
              f"sum to 1 (here {p.sum():.2f}), and more than one class, or none, may pass its threshold.",
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
