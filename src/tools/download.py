"""Fetch, unpack and verify the official ISIC 2025 MILK10k release.

    python -m src.tools.download [--dest input] [--only NAME ...] [--verify-only] [--keep-zip] [--force]

Every file streams to ``<dest>/.partial/<name>`` and is renamed into place only once complete, so an
interrupted run leaves nothing half-written in ``dest``; rerunning resumes it (HTTP Range where the
server allows). Files already present and verified are skipped. Each zip is extracted to a temporary
folder and renamed into place as ``<dest>/<zip top folder>/<lesion_id>/<isic_id>.jpg``; into an image folder
already there only its missing images are moved. Nothing in ``dest`` that is not the release is ever deleted or
overwritten, and a file of the release's that fails verification only with ``--force``.

Dataset: ISIC 2025 MILK10k, "MILK study team", CC-BY-NC 4.0, DOI 10.34970/648456.
"""
from __future__ import annotations

import argparse
import csv
import filecmp
import http.client
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from ..io_utils import worker_pool

DEFAULT_URL = "https://isic-archive.s3.amazonaws.com/challenges/milk10k/"
MANUAL_HINT = "download the files by hand as input/README.md explains"
RETRY_DELAY = 2.0  # seconds before the first retry; doubles on each further one
CHUNK = 1 << 20

METADATA_COLUMNS = (
    "lesion_id", "image_type", "isic_id", "attribution", "copyright_license", "image_manipulation",
    "age_approx", "sex", "skin_tone_class", "site", "MONET_ulceration_crust", "MONET_hair",
    "MONET_vasculature_vessels", "MONET_erythema", "MONET_pigmented",
    "MONET_gel_water_drop_fluid_dermoscopy_liquid", "MONET_skin_markings_pen_ink_purple_pen",
)
GROUND_TRUTH_COLUMNS = (
    "lesion_id", "AKIEC", "BCC", "BEN_OTH", "BKL", "DF", "INF", "MAL_OTH", "MEL", "NV", "SCCKA", "VASC",
)
SUPPLEMENT_COLUMNS = ("isic_id", "diagnosis_full", "diagnosis_confirm_type", "invasion_thickness_interval")

METADATA_OF = {"MILK10k_Training_Input": "MILK10k_Training_Metadata.csv",
               "MILK10k_Test_Input": "MILK10k_Test_Metadata.csv"}
# name -> what verification expects: CSVs by header and data-row count, zips by extracted image count.
FILES: dict[str, dict] = {
    "MILK10k_Training_Metadata.csv": {"kind": "csv", "rows": 10480, "columns": METADATA_COLUMNS},
    "MILK10k_Training_Supplement.csv": {"kind": "csv", "rows": 10480, "columns": SUPPLEMENT_COLUMNS},
    "MILK10k_Training_GroundTruth.csv": {"kind": "csv", "rows": 5240, "columns": GROUND_TRUTH_COLUMNS},
    "MILK10k_Test_Metadata.csv": {"kind": "csv", "rows": 958, "columns": METADATA_COLUMNS},
    "MILK10k_Test_Input.zip": {"kind": "zip", "folder": "MILK10k_Test_Input", "images": 958, "size": "30 MB"},
    "MILK10k_Training_Input.zip": {"kind": "zip", "folder": "MILK10k_Training_Input", "images": 10480,
                                   "size": "314 MB"},
}


class DownloadError(RuntimeError):
    """A file could not be fetched or unpacked; the message says what to do."""


class _NetworkError(Exception):
    """A failure worth retrying: refused connection, timeout, connection closed mid-file, 5xx."""


def expected_count(name: str, expect: dict[str, int] | None = None) -> int:
    """Data rows (CSV) or images (zip) that ``name`` must hold; ``expect`` overrides the official count."""
    spec = FILES[name]
    return (expect or {}).get(name, spec["rows"] if spec["kind"] == "csv" else spec["images"])


def image_root(dest: str | Path, folder: str) -> Path:
    """``dest/folder``, or ``dest/folder/folder`` when the zip was unzipped into a same-named folder."""
    nested = Path(dest) / folder / folder
    return nested if nested.is_dir() else Path(dest) / folder


def _check_names(names) -> list[str]:
    unknown = [n for n in names if n not in FILES]
    if unknown:
        raise DownloadError(f"unknown file name(s) {unknown}; known: {', '.join(FILES)}")
    return list(names)


def _csv_problems(path: Path, columns: tuple[str, ...], rows: int) -> list[str]:
    if not path.is_file():
        return [f"{path}: missing"]
    problems: list[str] = []
    n = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            if tuple(header) != columns:
                missing = [c for c in columns if c not in header]
                extra = [c for c in header if c not in columns]
                what = (f"missing column(s) {missing}, unexpected column(s) {extra}" if missing or extra
                        else "columns out of order")
                problems.append(f"{path}: line 1: header differs from the official one ({what})")
            for record in reader:
                if not record:
                    continue
                n += 1
                if len(record) != len(header) and len(problems) < 5:
                    problems.append(f"{path}: line {reader.line_num}: {len(record)} fields, header has {len(header)}")
    except (UnicodeDecodeError, csv.Error) as exc:
        return problems + [f"{path}: not a readable UTF-8 CSV ({exc})"]
    if n != rows:
        problems.append(f"{path}: {n} data rows, expected {rows}")
    return problems


def _listed_images(dest: Path, folder: str) -> dict[str, int] | None:
    """``<lesion_id>/<isic_id>.jpg`` -> CSV line, for every image the split's metadata lists (None without it)."""
    meta = dest / METADATA_OF[folder]
    try:
        with open(meta, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            if "lesion_id" not in header or "isic_id" not in header:
                return None
            lid, iid = header.index("lesion_id"), header.index("isic_id")
            return {f"{row[lid]}/{row[iid]}.jpg": reader.line_num for row in reader if len(row) > max(lid, iid)}
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _decode_problem(path: str) -> str | None:
    """Why ``path`` is not a JPEG that decodes completely and intact, as every image is decoded (src/jpeg.py
    ``decode``: within the size limits, strictly, turned upright), or None."""
    from ..jpeg import ImageTooLarge, decode

    try:
        decode(path).close()
    except ImageTooLarge as exc:
        return f"refused before decoding: {exc}"
    except Exception as exc:  # noqa: BLE001 - PIL raises several kinds for broken files
        return f"not a decodable JPEG ({type(exc).__name__}: {exc})"
    return None


def _path_problem(path: str) -> tuple[str, str | None]:
    return path, _decode_problem(path)


def _show(paths: list, limit: int = 5) -> str:
    return ", ".join(map(str, paths[:limit])) + (f" ... ({len(paths)} in all)" if len(paths) > limit else "")


def _image_problems(dest: Path, folder: str, images: int, decode: bool = False, workers: int = 1) -> list[str]:
    """The unzipped images against the metadata's list (missing and unexpected files named) and their count;
    with ``decode`` every JPEG is decoded in full (``workers`` processes)."""
    root = image_root(dest, folder)
    fix = f"re-download it: `bash run.sh download --dest {dest} --only {folder}.zip --force`"
    if not root.is_dir():
        return [f"{Path(dest) / folder}: missing (the unzipped {folder}.zip)"]
    found = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.jpg"))
    problems = []
    listed = _listed_images(Path(dest), folder)
    if listed is not None:
        missing = [f"{root / name} ({METADATA_OF[folder]} line {line})" for name, line in listed.items()
                   if name not in set(found)]
        extra = [str(root / name) for name in found if name not in listed]
        if missing:
            problems.append(f"{root}: {len(missing)} image(s) listed in {METADATA_OF[folder]} are missing: "
                            f"{_show(missing)}; {fix}")
        if extra:
            problems.append(f"{root}: {len(extra)} image(s) not listed in {METADATA_OF[folder]}: {_show(extra)}")
    if len(found) != images:
        problems.append(f"{root}: {len(found)} images as <lesion_id>/<isic_id>.jpg, expected {images}")
    if decode and found:
        paths = [str(root / name) for name in found]
        print(f"{folder}: decoding {len(paths)} images ({workers} process(es))", flush=True)
        if workers > 1:
            with worker_pool(workers) as imap:
                why = dict(imap(_path_problem, paths, 64))
            why = [why[p] for p in paths]
        else:
            why = [_decode_problem(p) for p in paths]
        broken = [f"{p}: {w}" for p, w in zip(paths, why) if w]
        if broken:
            problems.append(f"{root}: {len(broken)} image(s) do not decode: {_show(broken, 10)}; delete them and "
                            f"{fix}")
    return problems


def _problems(dest: Path, name: str, expect: dict[str, int] | None, decode: bool = False,
              workers: int = 1) -> list[str]:
    spec = FILES[name]
    count = expected_count(name, expect)
    if spec["kind"] == "csv":
        return _csv_problems(dest / name, spec["columns"], count)
    return _image_problems(dest, spec["folder"], count, decode, workers)


def verify(dest: str | Path = "input", files=None, expect: dict[str, int] | None = None, decode: bool = True,
           workers: int = 1) -> list[str]:
    """Problems with the release in ``dest`` ([] = ok): each file present, CSV header exact, row and image counts,
    every image the metadata lists present and (``decode``) every JPEG decodable."""
    dest = Path(dest)
    return [p for name in _check_names(files or FILES) for p in _problems(dest, name, expect, decode, workers)]


def _open(url: str, offset: int, timeout: float):
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code in (408, 429):
            raise _NetworkError(f"HTTP {exc.code} {exc.reason}") from None
        if exc.code == 416 and offset:  # the partial file is already as long as the file, or longer
            return None
        raise DownloadError(f"cannot reach {url}: HTTP {exc.code} {exc.reason}; {MANUAL_HINT}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _NetworkError(str(getattr(exc, "reason", exc))) from None


def _fetch_once(url: str, part: Path, timeout: float) -> None:
    """Bring ``part`` up to the full file: resume with Range when the server answers 206, else restart."""
    offset = part.stat().st_size if part.exists() else 0
    response = _open(url, offset, timeout)
    if response is None:
        part.unlink()
        offset, response = 0, _open(url, 0, timeout)
    with response:
        total = response.headers.get("Content-Length")
        total = int(total) if total is not None else None
        mode = "wb"
        if response.status == 206:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                part.unlink()  # start over on the next attempt
                raise _NetworkError(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
            mode, total = "ab", int(match.group(2))
        else:
            offset = 0
        with open(part, mode) as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                           unit_divisor=1024, desc=part.name, disable=None) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (http.client.HTTPException, OSError) as exc:  # disk errors from write() are not retried
                    raise _NetworkError(f"connection lost ({exc})") from None
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise _NetworkError(f"connection closed after {size} of {total} bytes")


def _fetch(url: str, target: Path, partial_dir: Path, timeout: float, retries: int) -> None:
    """Download ``url`` to ``target`` through ``partial_dir``; ``target`` appears only when complete."""
    part = partial_dir / target.name
    partial_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, max(1, retries) + 1):
        try:
            _fetch_once(url, part, timeout)
            part.replace(target)
            return
        except _NetworkError as exc:
            if attempt >= retries:
                raise DownloadError(f"cannot reach {url}: {exc}; {MANUAL_HINT}") from None
            delay = RETRY_DELAY * 2 ** (attempt - 1)
            print(f"{target.name}: {exc}; retry {attempt}/{retries - 1} in {delay:g}s", file=sys.stderr, flush=True)
            time.sleep(delay)


def _merge(top: Path, root: Path, force: bool) -> None:
    """Move the files under ``top`` into ``root``: one already there with the same bytes is kept, one with other
    bytes is replaced only with ``force`` (else DownloadError, before anything moves); whatever else ``root`` holds
    is left as it is."""
    moves = [(p, root / p.relative_to(top)) for p in sorted(top.rglob("*")) if p.is_file()]
    differ = {dst for src, dst in moves if dst.exists() and not (dst.is_file() and filecmp.cmp(src, dst, False))}
    if differ and not force:
        raise DownloadError(f"{root}: {len(differ)} file(s) differ from the zip's: {_show(sorted(differ))}; they are "
                            "left as they are: move them away and rerun, or rerun with --force to replace them")
    for src, dst in moves:
        if dst in differ or not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)


def _extract(zip_path: Path, folder: str, dest: Path, partial_dir: Path, force: bool = False) -> None:
    """Unpack ``zip_path`` to a temporary folder, then rename its top folder to ``dest/folder``. Into an image
    folder already there (either layout, or a link to one elsewhere) only the zip's files are moved (``_merge``):
    nothing else in it is deleted or overwritten."""
    partial_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder}.", dir=partial_dir))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)
        except (zipfile.BadZipFile, EOFError) as exc:
            raise DownloadError(f"{zip_path}: broken zip ({exc}); delete it and rerun, or rerun with --force") from None
        except OSError as exc:
            raise DownloadError(f"{zip_path}: cannot unzip ({exc})") from None
        top = tmp / folder if (tmp / folder).is_dir() else tmp
        root = image_root(dest, folder)
        if root.is_dir():
            try:
                _merge(top, root, force)
            except OSError as exc:
                raise DownloadError(f"{root}: cannot move the images of {zip_path.name} in ({exc})") from None
        elif os.path.lexists(root):
            raise DownloadError(f"{root}: a file stands where {zip_path.name} unzips to; it is left as it is: move "
                                "it away and rerun")
        else:
            top.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(dest: str | Path = "input", base_url: str = DEFAULT_URL, files=None, force: bool = False,
             timeout: float = 60, retries: int = 3, keep_zip: bool = False,
             expect: dict[str, int] | None = None) -> Path:
    """Fetch the release into ``dest``, unzip the images, and return ``dest``.

    Files already present and verified are skipped unless ``force``. A zip is deleted after successful
    extraction and verification unless ``keep_zip``. Nothing in ``dest`` that is not the release is deleted or
    overwritten, and a file of the release's that fails verification (a CSV, an image) is replaced only with
    ``force`` (else DownloadError). Raises DownloadError when a file cannot be fetched or unpacked; verification
    problems are left to ``verify``.
    """
    dest = Path(dest)
    partial_dir = dest / ".partial"
    base = base_url.rstrip("/") + "/"
    dest.mkdir(parents=True, exist_ok=True)
    for name in _check_names(files or FILES):
        spec = FILES[name]
        problems = [] if force else _problems(dest, name, expect)
        if not force and not problems:
            print(f"{name}: present and verified, skipped", flush=True)
            continue
        target = dest / name
        if spec["kind"] == "csv" and os.path.lexists(target) and not force:
            raise DownloadError(f"{problems[0]}; it is left as it is: move it away and rerun to download the "
                                "official file, or rerun with --force to replace it")
        if force or not target.is_file():
            print(f"{name}: downloading{' (' + spec['size'] + ')' if 'size' in spec else ''}", flush=True)
            _fetch(base + name, target, partial_dir, timeout, retries)
        if spec["kind"] == "zip":
            print(f"{name}: extracting to {dest / spec['folder']}", flush=True)
            _extract(target, spec["folder"], dest, partial_dir, force)
            if not keep_zip and not _problems(dest, name, expect):
                target.unlink()
    if partial_dir.is_dir() and not any(partial_dir.iterdir()):
        partial_dir.rmdir()
    return dest


def _parse_expect(pairs: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not value.strip().isdigit():
            raise DownloadError(f"--expect-rows {pair!r}: expected NAME=N with N a non-negative integer")
        out[_check_names([name])[0]] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.tools.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default="input", help="folder to fill (default: input)")
    parser.add_argument("--base-url", default=DEFAULT_URL, help=f"where the files live (default: {DEFAULT_URL})")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"only these files: {', '.join(FILES)}")
    parser.add_argument("--verify-only", action="store_true", help="check what is in --dest, download nothing")
    parser.add_argument("--expect-rows", nargs="+", default=[], metavar="NAME=N",
                        help="override the expected data rows (CSV) or images (zip) of a file")
    parser.add_argument("--force", action="store_true", help="download again even what is present and verified")
    parser.add_argument("--keep-zip", action="store_true", help="keep the zips after extraction")
    parser.add_argument("--timeout", type=float, default=60, help="seconds without data before a retry")
    parser.add_argument("--retries", type=int, default=3, help="attempts per file")
    parser.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                        help="processes that decode every image during verification")
    args = parser.parse_args(argv)
    try:
        files = _check_names(args.only) if args.only else None
        expect = _parse_expect(args.expect_rows)
        if not args.verify_only:
            download(args.dest, args.base_url, files, force=args.force, timeout=args.timeout,
                     retries=args.retries, keep_zip=args.keep_zip, expect=expect)
        problems = verify(args.dest, files, expect, workers=args.workers)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if problems:
        print(f"verification failed ({len(problems)} problem(s)); nothing was deleted "
              "(input/README.md lists the expected files):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"{len(files or FILES)} file(s) verified in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
