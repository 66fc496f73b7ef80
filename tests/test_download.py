"""Download, resume, unzip and verify against a tiny fake release served from 127.0.0.1.

The fake CSVs hold real rows from tests/fixtures/milk10k_sample (ISIC 2025 MILK10k, "MILK study team",
CC-BY-NC 4.0); the JPEGs are tiny generated images. Nothing here touches the internet.
"""
from __future__ import annotations

import csv
import io
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from src.tools import download as dl

FIXTURES = Path(__file__).parent / "fixtures" / "milk10k_sample"
N_ROWS = {"MILK10k_Training_Metadata.csv": 6, "MILK10k_Training_Supplement.csv": 6,
          "MILK10k_Training_GroundTruth.csv": 3, "MILK10k_Test_Metadata.csv": 4}
EXPECT = {**N_ROWS, "MILK10k_Training_Input.zip": 6, "MILK10k_Test_Input.zip": 4}
EXPECT_ARGS = ["--expect-rows", *(f"{k}={v}" for k, v in EXPECT.items())]


class Handler(BaseHTTPRequestHandler):
    """Serves ``root``; honours Range when ``ranges``; cuts ``truncate[name]`` responses off halfway."""

    root: Path
    ranges = True
    truncate: dict[str, int] = {}
    log: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        self.log.append((name, self.headers.get("Range")))
        path = self.root / name
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        start = int(self.headers["Range"][6:-1]) if self.ranges and self.headers.get("Range") else 0
        if start >= len(data) > 0:
            self.send_error(416, "Range Not Satisfiable")
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.truncate.get(name, 0) > 0:
            self.truncate[name] -= 1
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 120, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def _make_release(root: Path) -> None:
    root.mkdir()
    for name, n in N_ROWS.items():
        with open(FIXTURES / name, newline="") as fh:
            rows = list(csv.reader(fh))[: n + 1]
        with open(root / name, "w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows(rows)
    for zip_name, meta in (("MILK10k_Training_Input.zip", "MILK10k_Training_Metadata.csv"),
                           ("MILK10k_Test_Input.zip", "MILK10k_Test_Metadata.csv")):
        folder = zip_name[:-4]
        with open(root / meta, newline="") as fh:
            rows = list(csv.DictReader(fh))
        with zipfile.ZipFile(root / zip_name, "w") as zf:
            zf.writestr(f"{folder}/", b"")
            for row in rows:
                zf.writestr(f"{folder}/{row['lesion_id']}/{row['isic_id']}.jpg", _jpeg())


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "RETRY_DELAY", 0.0)
    root = tmp_path / "release"
    _make_release(root)
    handler = type("H", (Handler,), {"root": root, "ranges": True, "truncate": {}, "log": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/milk10k/"
    httpd.handler = handler
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _snapshot(dest: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}


def test_expected_headers_are_the_real_ones():
    for name, spec in dl.FILES.items():
        if spec["kind"] == "csv":
            with open(FIXTURES / name, newline="") as fh:
                assert spec["columns"] == tuple(next(csv.reader(fh))), name


def test_download_unzips_verifies_and_second_run_skips(server, tmp_path, capsys):
    dest = tmp_path / "input"
    assert dl.download(dest, server.url, timeout=5, expect=EXPECT) == dest
    assert dl.verify(dest, expect=EXPECT) == []
    release = server.handler.root
    for name in N_ROWS:
        assert (dest / name).read_bytes() == (release / name).read_bytes()
    with zipfile.ZipFile(release / "MILK10k_Training_Input.zip") as zf:
        jpgs = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*.jpg") if "Training" in str(p)) == jpgs
    assert not list(dest.glob("*.zip")) and not (dest / ".partial").exists()

    before, server.handler.log[:] = _snapshot(dest), []
    assert dl.main(["--dest", str(dest), "--base-url", server.url, *EXPECT_ARGS]) == 0
    assert server.handler.log == [] and _snapshot(dest) == before
    assert "skipped" in capsys.readouterr().out


def test_keep_zip_and_reextract_from_kept_zip(server, tmp_path):
    dest = tmp_path / "input"
    only = ["MILK10k_Test_Input.zip"]
    dl.download(dest, server.url, files=only, keep_zip=True, expect=EXPECT)
    assert (dest / "MILK10k_Test_Input.zip").is_file()
    victim = next((dest / "MILK10k_Test_Input").glob("*/*.jpg"))
    victim.unlink()
    problem = f"{dest / 'MILK10k_Test_Input'}: 3 images as <lesion_id>/<isic_id>.jpg, expected 4"
    assert dl.verify(dest, only, EXPECT) == [problem]
    server.handler.log[:] = []
    dl.download(dest, server.url, files=only, expect=EXPECT)  # repairs from the kept zip, then deletes it
    assert server.handler.log == [] and victim.is_file() and dl.verify(dest, only, EXPECT) == []
    assert not (dest / "MILK10k_Test_Input.zip").exists()


@pytest.mark.parametrize("ranges", [True, False])
def test_truncated_download_leaves_nothing_in_place_and_rerun_completes(server, tmp_path, capsys, ranges):
    dest, name = tmp_path / "input", "MILK10k_Training_Input.zip"
    server.handler.ranges = ranges
    server.handler.truncate[name] = 1
    args = ["--dest", str(dest), "--base-url", server.url, "--only", name, "--retries", "1", *EXPECT_ARGS]
    assert dl.main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot reach {server.url}{name}: connection closed after" in err and "input/README.md" in err
    assert "Traceback" not in err
    size = (server.handler.root / name).stat().st_size
    assert not (dest / name).exists() and not (dest / "MILK10k_Training_Input").exists()
    assert (dest / ".partial" / name).stat().st_size == size // 2

    server.handler.log[:] = []
    assert dl.main(args) == 0
    assert server.handler.log == [(name, f"bytes={size // 2}-")]
    assert dl.verify(dest, [name], EXPECT) == [] and not (dest / ".partial").exists()


def test_retry_within_one_run_resumes(server, tmp_path):
    dest, name = tmp_path / "input", "MILK10k_Test_Metadata.csv"
    server.handler.truncate[name] = 2
    dl.download(dest, server.url, files=[name], retries=3, expect=EXPECT)
    assert [r is None for _, r in server.handler.log] == [True, False, False]
    assert (dest / name).read_bytes() == (server.handler.root / name).read_bytes()


def test_partial_as_long_as_the_file_restarts(server, tmp_path):
    dest, name = tmp_path / "input", "MILK10k_Test_Metadata.csv"
    (dest / ".partial").mkdir(parents=True)
    (dest / ".partial" / name).write_bytes(b"x" * 10**5)  # longer than the file: server answers 416
    dl.download(dest, server.url, files=[name], expect=EXPECT)
    assert (dest / name).read_bytes() == (server.handler.root / name).read_bytes()


def test_http_404_is_a_clear_error(server, tmp_path, capsys):
    (server.handler.root / "MILK10k_Training_Supplement.csv").unlink()
    dest = tmp_path / "input"
    assert dl.main(["--dest", str(dest), "--base-url", server.url, *EXPECT_ARGS]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach {server.url}MILK10k_Training_Supplement.csv: HTTP 404" in err
    assert "input/README.md" in err and "Traceback" not in err
    assert len(server.handler.log) == 2  # no retry on a 404
    assert not (dest / "MILK10k_Training_Supplement.csv").exists()


def test_unreachable_server_is_a_clear_error(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    assert dl.main(["--dest", str(tmp_path / "input"), "--base-url", url, "--retries", "1", "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach {url}MILK10k_Training_Metadata.csv: ")
    assert "input/README.md" in err and "Traceback" not in err


def test_verify_lists_wrong_header_rows_and_missing_files(server, tmp_path, capsys):
    dest = tmp_path / "input"
    dl.download(dest, server.url, expect=EXPECT)
    gt = dest / "MILK10k_Training_GroundTruth.csv"
    gt.write_text(gt.read_text().replace(",MAL_OTH,", ",MALOTH,", 1))
    (dest / "MILK10k_Test_Metadata.csv").unlink()
    problems = dl.verify(dest, expect=EXPECT)
    assert problems == [
        f"{gt}: line 1: header differs from the official one "
        "(missing column(s) ['MAL_OTH'], unexpected column(s) ['MALOTH'])",
        f"{dest / 'MILK10k_Test_Metadata.csv'}: missing",
    ]
    before = _snapshot(dest)
    assert dl.main(["--dest", str(dest), "--verify-only", *EXPECT_ARGS]) == 2
    err = capsys.readouterr().err
    assert "nothing was deleted" in err and all(p in err for p in problems)
    assert _snapshot(dest) == before
    # the official counts are the default expectation
    assert f"{dest / 'MILK10k_Training_Metadata.csv'}: 6 data rows, expected 10480" in dl.verify(dest)


def test_verify_reports_ragged_rows_with_line_number(tmp_path):
    name = "MILK10k_Training_Supplement.csv"
    (tmp_path / name).write_text("isic_id,diagnosis_full,diagnosis_confirm_type,invasion_thickness_interval\n"
                                 "ISIC_1,Basal cell carcinoma,histopathology,\nISIC_2,Nevus\n")
    assert dl.verify(tmp_path, [name], {name: 2}) == [f"{tmp_path / name}: line 3: 2 fields, header has 4"]


def test_verify_accepts_the_twice_nested_layout(server, tmp_path):
    dest, folder = tmp_path / "input", "MILK10k_Test_Input"
    dl.download(dest, server.url, files=["MILK10k_Test_Input.zip"], expect=EXPECT)
    (dest / folder).rename(tmp_path / folder)
    (dest / folder).mkdir()
    (tmp_path / folder).rename(dest / folder / folder)
    assert dl.image_root(dest, folder) == dest / folder / folder
    assert dl.verify(dest, ["MILK10k_Test_Input.zip"], EXPECT) == []


def test_bad_zip_leaves_no_half_folder_and_keeps_the_zip(server, tmp_path, capsys):
    name = "MILK10k_Test_Input.zip"
    data = (server.handler.root / name).read_bytes()
    (server.handler.root / name).write_bytes(data[: len(data) // 2])  # complete download, broken archive
    dest = tmp_path / "input"
    assert dl.main(["--dest", str(dest), "--base-url", server.url, "--only", name, *EXPECT_ARGS]) == 2
    assert f"{dest / name}: broken zip" in capsys.readouterr().err
    assert (dest / name).is_file() and not (dest / "MILK10k_Test_Input").exists()
    assert not any((dest / ".partial").iterdir())


def test_wrong_image_count_keeps_the_zip(server, tmp_path, capsys):
    name = "MILK10k_Test_Input.zip"
    dest = tmp_path / "input"
    args = ["--dest", str(dest), "--base-url", server.url, "--only", name, "--expect-rows", f"{name}=5"]
    assert dl.main(args) == 2
    assert "4 images as <lesion_id>/<isic_id>.jpg, expected 5" in capsys.readouterr().err
    assert (dest / name).is_file()


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert dl.main(["--dest", str(tmp_path), "--verify-only", "--only", "train.csv"]) == 2
    assert "unknown file name(s) ['train.csv']" in capsys.readouterr().err
    assert dl.main(["--dest", str(tmp_path), "--verify-only", "--expect-rows", "MILK10k_Test_Metadata.csv=x"]) == 2
    assert "expected NAME=N" in capsys.readouterr().err


def test_a_users_files_in_dest_are_never_deleted_or_overwritten(server, tmp_path, capsys):
    dest, folder = tmp_path / "input", tmp_path / "input" / "MILK10k_Test_Input"
    dl.download(dest, server.url, expect=EXPECT)
    lesion = next(folder.iterdir())
    users = [dest / "notes.txt", folder / "README.txt", lesion / "sketch.png", dest / ".partial" / "mine"]
    for path in users:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"the user's")
    victim = next(folder.glob("*/*.jpg"))
    victim.unlink()                                                         # a repair: the zip is unzipped again
    before = _snapshot(dest)
    args = ["--dest", str(dest), "--base-url", server.url, *EXPECT_ARGS]
    assert dl.main(args) == 0
    assert _snapshot(dest) == {**before, str(victim.relative_to(dest)): _jpeg()}

    edited = next(p for p in folder.glob("*/*.jpg") if p != victim)         # an official name, other bytes
    edited.write_bytes(b"the user's edit")
    victim.unlink()
    before = _snapshot(dest)
    assert dl.main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {folder}: 1 file(s) differ from the zip's: {edited}; " in err and "--force" in err
    assert _snapshot(dest) == {**before, "MILK10k_Test_Input.zip": (server.handler.root / "MILK10k_Test_Input.zip")
                               .read_bytes()}                               # refused before anything moved
    metadata = dest / "MILK10k_Test_Metadata.csv"                           # a CSV that fails verification
    metadata.write_bytes(b"".join(metadata.read_bytes().splitlines(keepends=True)[:-1]))
    before = _snapshot(dest)
    assert dl.main([*args, "--only", metadata.name]) == 2
    err = capsys.readouterr().err
    assert f"error: {metadata}: 3 data rows, expected 4; it is left as it is" in err and "--force" in err
    assert _snapshot(dest) == before

    assert dl.main([*args, "--force"]) == 0                                 # asked for: the official files replace
    assert metadata.read_bytes() == (server.handler.root / metadata.name).read_bytes()
    assert edited.read_bytes() == victim.read_bytes() == _jpeg()
    assert all(path.read_bytes() == b"the user's" for path in users)       # and nothing else is touched


def test_an_image_folder_linked_from_elsewhere_is_repaired_in_place(server, tmp_path):
    dest, name = tmp_path / "input", "MILK10k_Test_Input"
    dl.download(dest, server.url, files=[f"{name}.zip"], expect=EXPECT)
    (dest / name).rename(tmp_path / "elsewhere")
    (dest / name).symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "notes.txt").write_text("the user's")
    next((tmp_path / "elsewhere").glob("*/*.jpg")).unlink()
    dl.download(dest, server.url, files=[f"{name}.zip"], expect=EXPECT)
    assert (dest / name).is_symlink() and (tmp_path / "elsewhere" / "notes.txt").read_text() == "the user's"
    assert dl.verify(dest, [f"{name}.zip"], EXPECT) == []
