"""What a command may write over, and what a bundle may make predict do.

No command deletes or overwrites what it did not write (export --out, predict --out, blend --name, tune
--write-best, spread); every name a bundle gives is a plain name inside it, every file predict reads is one its
manifest lists, and every file of a real export (the manifest too) is covered: changed, deleted or joined by an
unlisted file, it is refused by name before anything is written; an archive is bounded from its tar headers before
anything is unpacked; an interrupted command says what it left."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from src.cli import main as cli
from src.deliver.export import write_manifest

from .conftest import tiny
from .test_predict import _one_thread, refused  # noqa: F401 (_one_thread: the fixture test_predict uses too)

REPO = Path(__file__).resolve().parent.parent


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(("error: ", "config error: ")), err
    for needle in needles:
        assert needle in err, err
    return err


def copy_bundle(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest, symlinks=True)
    return dest


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


# ----------------------------------------------------------------------------------------------------
# nothing is deleted or overwritten that the command did not write
# ----------------------------------------------------------------------------------------------------
def test_export_refuses_an_out_it_did_not_write(trained, bundle, tmp_path, capsys):
    out = trained["out"]
    export = ["export", "both", *trained["where"]]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    checkpoints = sorted(out.glob("exp001/fold*/best.pt"))
    cases = [
        (mine, "a folder that is not an export of this project"),
        (out / "exp001", "the output folder of an experiment"),
        (out / "exp001" / "fold0" / "bundle", "the output folder of an experiment"),
        (out, "holds the output folder"),
        (out.parent, "holds the output folder"),
        (mine / "thesis.txt", "a file stands there"),
    ]
    for where, needle in cases:
        one_line_error(capsys, cli([*export, "--out", str(where)]), f"--out {where}", needle)
    assert (mine / "thesis.txt").read_text() == "years of work" and len(list(mine.iterdir())) == 1
    assert checkpoints and all(p.is_file() for p in checkpoints) and (out / "exp001" / "oof.csv").is_file()
    assert not (out / "exp001" / "fold0" / "bundle").exists() and not list(out.parent.glob("*.tar.gz"))
    # an earlier export holding a file its manifest does not list; an archive name taken by another file
    earlier = copy_bundle(bundle, tmp_path / "earlier")
    (earlier / "experiments" / "notes.md").write_text("mine")
    one_line_error(capsys, cli([*export, "--out", str(earlier)]), "holds experiments/notes.md, which the earlier "
                   "export's manifest does not list")
    assert (earlier / "experiments" / "notes.md").read_text() == "mine"
    fresh = tmp_path / "fresh"
    fresh.with_name("fresh.tar.gz").write_bytes(b"my archive")
    one_line_error(capsys, cli([*export, "--out", str(fresh)]), "fresh.tar.gz is not an export archive of fresh")
    assert fresh.with_name("fresh.tar.gz").read_bytes() == b"my archive" and not fresh.exists()


def test_export_replaces_an_earlier_export_only_once_the_new_one_is_complete(trained, tmp_path, monkeypatch):
    import src.deliver.export as export

    out = tmp_path / "both"
    assert cli(["export", "both", *trained["where"], "--out", str(out)]) == 0
    folder = os.stat(out).st_ino
    assert cli(["export", "both", *trained["where"], "--out", str(out)]) == 0  # its own earlier export: replaced
    assert os.stat(out).st_ino != folder
    before = {p: p.read_bytes() for p in [*out.rglob("*"), out.with_name("both.tar.gz")] if p.is_file()}
    folder = os.stat(out).st_ino

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "atomic_write", full)  # the archive, the last file written
    assert cli(["export", "both", *trained["where"], "--out", str(out)]) == 2
    assert os.stat(out).st_ino == folder
    assert {p: p.read_bytes() for p in [*out.rglob("*"), out.with_name("both.tar.gz")] if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both", "both.tar.gz"]


def test_predict_overwrites_only_a_prediction(trained, tmp_path, capsys):
    args = ["predict", "exp000", "--data", str(trained["data"]), *trained["where"]]
    out = tmp_path / "mine.csv"
    out.write_text("patient,notes\n1,keep me\n")
    one_line_error(capsys, cli([*args, "--out", str(out)]), f"{out}: a file this project did not write",
                   "choose another --out")
    assert out.read_text() == "patient,notes\n1,keep me\n" and not (tmp_path / "mine_diagnoses.csv").exists()
    out.unlink()
    readable = tmp_path / "mine_diagnoses.csv"
    readable.write_text("my,own\n")
    one_line_error(capsys, cli([*args, "--out", str(out)]), f"{readable}: a file this project did not write")
    assert readable.read_text() == "my,own\n" and not out.exists()
    readable.unlink()
    for theirs, needle in [(trained["out"] / "exp000" / "oof.csv", "inside the output folder of an experiment"),
                           (trained["subs"] / "exp000.csv", "a submission stands there")]:
        before = theirs.read_bytes()
        one_line_error(capsys, cli([*args, "--out", str(theirs)]), needle)
        assert theirs.read_bytes() == before
    assert cli([*args, "--out", str(out)]) == 0
    assert cli([*args, "--out", str(out)]) == 0  # its own earlier prediction is replaced


def test_blend_overwrites_only_its_own_submission_files(trained, tmp_path, capsys):
    subs = tmp_path / "subs"
    subs.mkdir()
    args = ["blend", "exp000", "--name", "foo", f"data_dir={trained['data']}", f"output_dir={trained['out']}",
            f"submission_dir={subs}", "n_folds=2"]
    for name, text, needle in [("foo.csv", "id,score\n1,0.5\n", "line 1 is 'id,score'"),
                               ("foo.csv", "lesion_id,my_label\nIL_1,BCC\n", "line 1 is 'lesion_id,my_label'"),
                               ("foo_oof_honest.csv", "x\n", "line 1 is 'x'"),
                               ("foo.json", '{"mine": true}', "(no 'experiments')")]:
        (subs / name).write_text(text)
        one_line_error(capsys, cli(args), f"{subs / name}: a file this project did not write", needle,
                       "choose another --name")
        assert (subs / name).read_text() == text and sorted(p.name for p in subs.iterdir()) == [name]
        (subs / name).unlink()
    assert cli(args) == 0
    assert cli(args) == 0  # its own files are replaced


def test_tune_write_best_refuses_an_existing_experiment_before_the_study(mini_data, tmp_path, capsys):
    before = (REPO / "exp" / "exp001" / "config.py").read_bytes()
    code = cli(["tune", "exp001", "--write-best", "exp001", "--trials", "1", "--folds", "0", "--epochs", "0",
                *tiny(mini_data, tmp_path / "out")])
    one_line_error(capsys, code, "--write-best 'exp001'", "exp001 exists and is not replaced")
    assert (REPO / "exp" / "exp001" / "config.py").read_bytes() == before and not (tmp_path / "out").exists()


def test_spread_overwrites_only_a_spread_and_removes_nothing(mini_data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["spread", "exp000", "--fold-seeds", "7,8", f"data_dir={mini_data}", f"output_dir={out}", "n_folds=2",
            "wandb_mode=disabled"]
    result = out / "spread" / "exp000.json"
    result.parent.mkdir(parents=True)
    result.write_text('{"mine": true}')
    one_line_error(capsys, cli(args), f"{result}: a file this project did not write")
    assert result.read_text() == '{"mine": true}' and sorted(p.name for p in out.iterdir()) == ["spread"]
    result.unlink()
    (out / "exp000_fs7").mkdir()
    (out / "exp000_fs7" / "notes.txt").write_text("mine")
    assert cli(args) == 0
    assert cli(args) == 0  # its own earlier spread is replaced; the runs are complete and kept
    assert (out / "exp000_fs7" / "notes.txt").read_text() == "mine"
    assert json.loads(result.read_text())["fold_seeds"] == [7, 8]


@pytest.mark.parametrize("argv, target, says", [
    (["predict", "exp001", "--data", "x"], "src.deliver.cli.run", "nothing half-written was kept"),
    (["export", "exp001"], "src.deliver.export.main", "nothing half-written was kept"),
    (["blend", "exp001"], "src.submission.main", "nothing half-written was kept"),
    (["demo", "blend", "exp001"], "src.submission.main", "nothing half-written was kept"),
    (["spread", "exp001"], "src.spread.main", "nothing half-written was kept; rerun the same command: finished runs"),
    (["tune", "exp001"], "src.tune.main", "resume from the last finished epoch"),
    (["run", "exp001"], "src.cli.cmd_run", "resume from the last finished epoch"),
])
def test_an_interrupt_says_what_the_command_left(monkeypatch, capsys, argv, target, says):
    import importlib

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    module, name = target.rsplit(".", 1)
    importlib.import_module(module)
    monkeypatch.setattr(f"{module}.{name}", stop)
    assert cli(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted: ") and says in err and len(err.splitlines()) == 1, err
    assert ("epoch" in err) == (argv[0] in ("tune", "run", "spread")), err


# ----------------------------------------------------------------------------------------------------
# a bundle's names stay inside it and under its manifest
# ----------------------------------------------------------------------------------------------------
def _member_outside(root: Path) -> None:
    """members '../../outside/exp000': exp000's folder copied to where that name leads, outside the bundle."""
    bad = "../../outside/exp000"
    shutil.copytree(root / "experiments" / "exp000", (root / "experiments" / bad).resolve())

    def edit(info):
        info["members"][bad] = info["members"].pop("exp000")
        info["weights"] = {("exp001" if k == "exp001" else bad): v for k, v in info["weights"].items()}
        info["experiments"] = list(info["weights"])

    edit_json(root / "bundle.json", edit)


def _link_outside(rel: str):
    def make(root: Path) -> None:
        target = root.parent / "outside" / Path(rel).name
        target.parent.mkdir(exist_ok=True)
        shutil.move(root / rel, target)
        (root / rel).symlink_to(target, target_is_directory=target.is_dir())
    return make


CRAFTED = {
    "member_named_with_a_path": (_member_outside, "bundle.json: experiment '../../outside/exp000' is not a plain name"),
    "config_name_holds_a_path": (lambda r: edit_json(r / "experiments/exp000/config.json",
                                                     lambda c: c.update(name="../../elsewhere")),
                                 "config.json: name '../../elsewhere' is not a plain name"),
    "config_experiment_holds_a_path": (lambda r: edit_json(r / "experiments/exp000/config.json",
                                                           lambda c: c.update(experiment="/tmp/exp000")),
                                       "config.json: experiment '/tmp/exp000' is not a plain name"),
    "file_linked_outside": (_link_outside("experiments/exp000/fold0/models.json"),
                            "models.json: a symbolic link inside the export"),
    "folder_linked_outside": (_link_outside("experiments/exp000"), "exp000: a symbolic link inside the export"),
    "a_read_the_manifest_does_not_list": (lambda r: edit_json(r / "experiments/exp000/config.json",
                                                              lambda c: c.update(n_folds=3)),
                                          "fold2/features.json: needed to predict but not in the export's manifest"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_bundle_reads_nothing_outside_it_or_its_manifest(trained, bundle, tmp_path, capsys, case):
    craft, needle = CRAFTED[case]
    root = copy_bundle(bundle, tmp_path / "crafted" / "both")
    craft(root)
    write_manifest(root)  # as a forger would: the manifest matches what is there
    refused(capsys, tmp_path, ["predict", str(root), "--data", str(trained["data"])], needle)


def test_a_file_named_like_the_manifest_deeper_down_is_no_exception(trained, bundle, tmp_path, capsys):
    root = copy_bundle(bundle, tmp_path / "both")
    (root / "experiments" / "MANIFEST.json").write_text("{}")
    refused(capsys, tmp_path, ["predict", str(root), "--data", str(trained["data"])],
            "experiments/MANIFEST.json: not in the export's manifest")


@pytest.mark.parametrize("case, edit, needle", [
    ("blend_weight", lambda info: info["weights"].update(exp000=float("nan")), "blend weight of exp000 nan"),
    ("threshold", lambda info: info["thresholds"].update(MEL=float("inf")), "threshold of MEL inf"),
    ("weights", None, "tensor 'clin"),
])
def test_non_finite_numbers_in_a_bundle_are_named(trained, bundle, tmp_path, capsys, case, edit, needle):
    root = copy_bundle(bundle, tmp_path / "both")
    if edit is not None:
        edit_json(root / "bundle.json", edit)
    else:
        from safetensors.torch import load_file, save_file

        path = root / "experiments" / "exp001" / "fold0" / "weights.safetensors"
        state = load_file(str(path))
        name = next(k for k, t in state.items() if k.startswith("clin") and t.is_floating_point())
        state[name][0] = float("nan")
        save_file(state, str(path))
    write_manifest(root)
    refused(capsys, tmp_path, ["predict", str(root), "--data", str(trained["data"])], needle)


def test_exported_files_carry_no_path_of_the_exporting_machine(trained, bundle, tmp_path_factory):
    base = str(tmp_path_factory.getbasetemp().resolve())

    def strings(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield k
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)
        elif isinstance(obj, str):
            yield obj

    for path in [*bundle.rglob("*.json"), *bundle.rglob("*.md")]:
        text = path.read_text()
        assert base not in text, path
        if path.suffix == ".json":
            assert not [s for s in strings(json.loads(text)) if s.startswith(base)], path
    config = json.loads((bundle / "experiments" / "exp001" / "config.json").read_text())
    assert (config["data_dir"], config["output_dir"], config["submission_dir"], config["cache_dir"]) == \
        ("input", "output", "submissions", "")


def test_an_error_inside_an_archive_names_the_archive(trained, bundle, tmp_path, capsys):
    root = copy_bundle(bundle, tmp_path / "copy" / "both")
    weights = root / "experiments" / "exp001" / "fold1" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    archive = tmp_path / "both.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="both")
    err = refused(capsys, tmp_path, ["predict", str(archive), "--data", str(trained["data"])])
    assert f"{archive}: both/experiments/exp001/fold1/weights.safetensors: changed since the export" in err, err
    assert "milk10k-bundle-" not in err and tempfile.gettempdir() + os.sep not in err.replace(str(tmp_path), "")


def test_decode_workers_never_exceed_the_machine(trained, bundle, tmp_path):
    from src.deliver.cli import _workers
    from src.deliver.predict import resolve_source

    root = copy_bundle(bundle, tmp_path / "both")
    edit_json(root / "experiments" / "exp001" / "config.json", lambda c: c.update(num_workers=100_000))
    write_manifest(root)
    assert 1 <= _workers(resolve_source(str(root), {})) <= (os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------------
# every file of a real export, and the manifest itself
# ----------------------------------------------------------------------------------------------------
EXPORT_FILES = ["MANIFEST.json", "MODEL_CARD.md", "bundle.json", "reliability.png",
                *(f"experiments/exp000/{f}" for f in ("config.json", *(f"fold{k}/{n}" for k in (0, 1) for n in
                                                      ("features.json", "models.json", "models.skops")))),
                *(f"experiments/exp001/{f}" for f in ("config.json", *(f"fold{k}/{n}" for k in (0, 1) for n in
                                                      ("aux_vocab.json", "features.json", "models.json",
                                                       "models.skops", "weights.safetensors"))))]


def test_the_integrity_cases_are_every_file_of_the_export(bundle):
    listed = json.loads((bundle / "MANIFEST.json").read_text())["files"]
    assert sorted(EXPORT_FILES) == sorted([*listed, "MANIFEST.json"])
    assert sorted(EXPORT_FILES) == sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())


@pytest.mark.parametrize("damage", ["changed", "deleted", "added"])
@pytest.mark.parametrize("rel", EXPORT_FILES)
def test_every_file_of_an_export_is_checked_before_anything_is_written(trained, bundle, tmp_path, capsys, rel,
                                                                        damage):
    root = copy_bundle(bundle, tmp_path / "both")
    path = root / rel
    if damage == "changed":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        needle = f"{path}: changed since the export" if rel != "MANIFEST.json" else f"{path}:"
    elif damage == "deleted":
        path.unlink()
        needle = f"{path}: missing from the export" if rel != "MANIFEST.json" else "no MANIFEST.json"
    else:
        path = path.with_name(f"{path.stem}_2{path.suffix}")
        path.write_bytes(b"{}")
        needle = f"{path}: not in the export's manifest"
    refused(capsys, tmp_path, ["predict", str(root), "--data", str(trained["data"])], needle)


# ----------------------------------------------------------------------------------------------------
# bounds on an archive, from its tar headers, before anything is unpacked
# ----------------------------------------------------------------------------------------------------
CHUNK = 16 << 20


def zeros_archive(path: Path, sizes: list[int]) -> Path:
    """A .tar.gz of files of zeros (sizes in multiples of CHUNK) written without holding more than one chunk: gzip
    members of each tar header and of one chunk compressed once, concatenated (a gzip reader reads them as one)."""
    chunk = gzip.compress(bytes(CHUNK), compresslevel=9)
    with open(path, "wb") as fh:
        top = tarfile.TarInfo("bomb")
        top.type = tarfile.DIRTYPE
        fh.write(gzip.compress(top.tobuf(tarfile.GNU_FORMAT)))
        for i, size in enumerate(sizes):
            info = tarfile.TarInfo(f"bomb/f{i}.json")
            info.size = size
            fh.write(gzip.compress(info.tobuf(tarfile.GNU_FORMAT)))
            fh.write(chunk * (size // CHUNK))
        fh.write(gzip.compress(bytes(2 * tarfile.BLOCKSIZE)))
    return path


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The temporary folder predict unpacks into, to see that nothing was written there."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.mark.parametrize("sizes, needle", [
    ([256 << 20], "MAX_BUNDLE_RATIO"),              # one file declaring 256 MiB: refused at its header
    ([CHUNK] * 8, "MAX_BUNDLE_RATIO"),              # many: refused once the running total passes the bound
    ([0] * 10_001, "MAX_BUNDLE_FILES"),
])
def test_an_archive_over_a_bound_is_refused_before_anything_is_unpacked(trained, private_tmp, tmp_path, capsys,
                                                                        sizes, needle):
    archive = zeros_archive(tmp_path / "bomb.tar.gz", sizes)
    err = refused(capsys, tmp_path, ["predict", str(archive), "--data", str(trained["data"])], str(archive), needle,
                  "refused before anything was unpacked", f"If the archive is trusted, raise it: MILK10K_{needle}=")
    assert not list(private_tmp.iterdir()), err


def test_a_bound_is_named_and_raised_by_its_environment_variable(trained, bundle, private_tmp, tmp_path, capsys,
                                                                 monkeypatch):
    archive = bundle.with_name("both.tar.gz")
    monkeypatch.setenv("MILK10K_MAX_BUNDLE_FILES", "5")
    refused(capsys, tmp_path, ["predict", str(archive), "--data", str(trained["data"])], "more than 5 entries",
            "MILK10K_MAX_BUNDLE_FILES=10")
    monkeypatch.setenv("MILK10K_MAX_BUNDLE_FILES", "many")
    refused(capsys, tmp_path, ["predict", str(archive), "--data", str(trained["data"])],
            "MILK10K_MAX_BUNDLE_FILES='many': give a whole number")
    monkeypatch.delenv("MILK10K_MAX_BUNDLE_FILES")
    pax = tmp_path / "pax.tar.gz"
    with tarfile.open(pax, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("both")
        info.type = tarfile.DIRTYPE
        info.pax_headers = {"comment": "x" * (2 << 20)}
        tar.addfile(info)
    refused(capsys, tmp_path, ["predict", str(pax), "--data", str(trained["data"])], "MAX_TAR_HEADER")
    monkeypatch.setattr("shutil.disk_usage", lambda p: SimpleNamespace(total=10 << 30, used=10 << 30, free=1 << 20))
    refused(capsys, tmp_path, ["predict", str(archive), "--data", str(trained["data"])], "unpacks to",
            "1.0 MiB free; point TMPDIR at a folder with more room")
    assert not list(private_tmp.iterdir())
