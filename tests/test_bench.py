"""Throughput benchmark: a tiny CPU run in-process, its JSON, the ratios and the projection."""
import json
import math
import tempfile
import types

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # the benchmark's rows on the CPU: tooling, seconds each

from src.tools.bench import main as bench, rows as bench_rows
from src.config import load_config

TINY = ["--device", "cpu", "--backbone", "test_efficientnet", "--img-size", "32", "--batch", "8", "--steps", "2",
        "--warmup", "1", "--n-lesions", "16", "--workers", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    saved, tempfile.tempdir = tempfile.tempdir, str(tmp)  # the generated JPEGs and cache stay under tmp
    try:
        result = bench.main([*TINY, "--profile", "--out", str(tmp / "out" / "bench.json")])
    finally:
        tempfile.tempdir = saved
    return result, tmp / "out"


def test_json_has_every_row_with_positive_rates(tiny_run):
    result, out = tiny_run
    saved = json.loads((out / "bench.json").read_text())
    assert saved["device"] == "cpu" and saved["settings"]["batch"] == 8 and saved["settings"]["img_size"] == 32
    assert saved["settings"]["cache_on_device"] is False  # auto: host memory without CUDA
    assert saved["settings"]["as_exp001"] is False  # a tiny model: the projection is not exp001's
    assert set("abcde") <= set(saved["rows"]) and {"c1", "e1"} <= set(saved["rows"])
    for key, row in saved["rows"].items():
        assert math.isfinite(row["pairs_per_s"]) and row["pairs_per_s"] > 0, key
        assert row["pairs_per_s"] == pytest.approx(row["pairs"] / row["seconds"]), key
    assert saved["rows"]["a"]["pairs"] == 2 * 8
    assert saved["rows"]["e"]["views"] == 8 and saved["rows"]["e1"]["views"] == 1
    assert 0 <= saved["rows"]["c"]["data_wait_frac"] <= 1
    assert saved["rows"]["b"]["params"]["backbones"] * 2 == saved["rows"]["a"]["params"]["backbones"]
    assert saved["rows"]["a2"]["params"] == saved["rows"]["a"]["params"]  # fused: the same weights, one network
    assert (saved["rows"]["a"]["fused"], saved["rows"]["a2"]["fused"]) == (False, True)


def test_ratios_are_computed_from_the_rows(tiny_run):
    saved = json.loads((tiny_run[1] / "bench.json").read_text())
    rows, ratios = saved["rows"], saved["ratios"]
    assert set(ratios) == {"c/a", "a/b", "a2/b", "c/d"}
    for name, r in ratios.items():
        num, den = name.split("/")
        assert r["value"] == pytest.approx(rows[num]["pairs_per_s"] / rows[den]["pairs_per_s"])
        assert r["ok"] == (r["value"] >= r["target"])
    assert ratios["c/d"]["target"] == 2.0


def test_projection_is_positive_and_follows_the_formula(tiny_run):
    saved = json.loads((tiny_run[1] / "bench.json").read_text())
    p, rate = saved["projection"], {k: v["pairs_per_s"] for k, v in saved["rows"].items()}
    assert p["total_s"] > 0 and p["minutes"] == pytest.approx(p["total_s"] / 60)
    a = p["assumptions"]
    exp001 = load_config("exp001")
    assert (a["n_folds"], a["stage1_epochs"], a["stage2_epochs"], a["val_pairs"]) == \
        (5, exp001.stage1_epochs, exp001.epochs, 1048)
    assert a["train_pairs_per_epoch"] == 4192  # 5240 - 1048 lesions, a multiple of batch 8
    s1, s2 = exp001.stage1_epochs, exp001.epochs
    expected = 5 * (s1 * 4192 / rate["c1"] + s2 * 4192 / rate["c"] + (s1 + s2) * 1048 / rate["e1"]
                    + (1048 + 479) / rate["e"])
    assert p["total_s"] == pytest.approx(expected)
    assert p["cache_build_s"] > 0


def test_table_and_profile_are_written(tiny_run):
    result, out = tiny_run
    text = bench.format_table(result)
    for key in ("a", "a2", "b", "c1", "c", "d", "e1", "e"):
        assert any(line.startswith(f"{key} ") for line in text.splitlines()), key
    assert "c/a" in text and "projected full exp001" in text
    prof = (out / "profile_a_cpu.txt").read_text()
    assert "Self CPU" in prof and prof.count("aten::") >= 5
    assert result["rows"]["a"]["profile"]["self_ms_per_step"] > 0
    # the fused step launches fewer ops: one per layer for both images instead of one per image
    ops = {k: result["rows"][k]["profile"]["launches_per_step"] for k in ("a", "a2")}
    assert (out / "profile_a2_cpu.txt").exists() and ops["a2"] < 0.75 * ops["a"], ops


def test_fuse_flag_fuses_row_a_and_skips_a2(tmp_path):
    saved, tempfile.tempdir = tempfile.tempdir, str(tmp_path)
    try:
        result = bench.main([*TINY, "--only", "a", "--steps", "1", "--fuse", "--out", str(tmp_path / "b.json")])
    finally:
        tempfile.tempdir = saved
    assert result["settings"]["fuse"] is True and set(result["rows"]) == {"a"} and result["rows"]["a"]["fused"]


def test_projection_uses_the_batch_and_epoch_override():
    cfg = load_config("exp001", {"batch_size": 64, "stage1_epochs": 2})
    rows = {k: {"pairs_per_s": r} for k, r in {"c1": 400.0, "c": 100.0, "e1": 800.0, "e": 100.0}.items()}
    data = types.SimpleNamespace(cache_seconds=2.0, n=100)
    p = bench.project(cfg, rows, data, epochs=3)
    pairs = (4192 // 64) * 64  # the last partial batch of an epoch is dropped
    assert p["assumptions"]["train_pairs_per_epoch"] == pairs == 4160
    f = p["per_fold"]
    assert f["stage1_s"] == pytest.approx(2 * pairs / 400) and f["stage2_s"] == pytest.approx(3 * pairs / 100)
    assert f["validation_s"] == pytest.approx(5 * 1048 / 800) and f["oof_test_s"] == pytest.approx(1527 / 100)
    assert p["cache_build_s"] == pytest.approx(5719 * 2.0 / 100)
    assert p["ok"] == (p["minutes"] < 20)
    assert bench.project(cfg, {k: v for k, v in rows.items() if k != "e"}, data, 3) is None


def test_ratios_skip_rows_not_run():
    rows = {"a": {"pairs_per_s": 90.0}, "b": {"pairs_per_s": 100.0}}
    r = bench.ratios(rows)
    assert set(r) == {"a/b"} and r["a/b"]["value"] == pytest.approx(0.9) and r["a/b"]["ok"]


def test_peak_memory_sees_an_allocation():
    import torch

    with bench_rows.PeakMemory(torch.device("cpu")) as mem:
        block = np.ones(64 * 2**20, np.uint8)  # 64 MiB, touched
        del block
    if mem.peak is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert mem.peak >= 48 * 2**20


def test_variants_measure_row_a_under_other_switches(tmp_path):
    saved, tempfile.tempdir = tempfile.tempdir, str(tmp_path)
    try:
        result = bench.main([*TINY, "--only", "a", "--steps", "1", "--variants", "eager, fuse", "--profile",
                             "--out", str(tmp_path / "b.json")])
    finally:
        tempfile.tempdir = saved
    v = result["variants"]
    assert list(v) == ["eager", "fuse"] and (v["eager"]["fused"], v["fuse"]["fused"]) == (False, True)
    assert all(row["pairs_per_s"] > 0 and "vs_b" not in row for row in v.values())  # row b was not run
    assert "profile" in result["rows"]["a2"] and not any("profile" in row for row in v.values())
    table = bench.format_table(result)
    assert "row a under other switches" in table
    best = max(v, key=lambda k: v[k]["pairs_per_s"])
    assert f"fastest: {best}, i.e. fuse_backbones={'true' if best == 'fuse' else 'false'} compile=false" in table


def test_rows_c_and_e_from_the_cache_in_device_memory(tmp_path):
    saved, tempfile.tempdir = tempfile.tempdir, str(tmp_path)
    try:
        result = bench.main([*TINY, "--only", "c,e", "--cache-on-device", "yes", "--out", str(tmp_path / "b.json")])
    finally:
        tempfile.tempdir = saved
    assert result["settings"]["cache_on_device"] is True and result["rows"]["c"]["cache_on_device"] is True
    assert all(result["rows"][k]["pairs_per_s"] > 0 for k in ("c1", "c", "e1", "e"))
    # the memory check adds the full release's 32 px caches: (5240 + 479) lesions x 2 images x 32 x 32 x 3 bytes
    assert result["memory"]["cache_bytes"] == 5719 * 2 * 32 * 32 * 3
    assert "image cache in device memory" in bench.format_table(result)


def test_variant_names_parse_into_config_switches():
    v = bench.parse_variants("fuse+compile:reduce-overhead,streams,eager")
    assert v["fuse+compile:reduce-overhead"] == {"fuse_backbones": True, "compile": True,
                                                 "compile_mode": "reduce-overhead", "branch_streams": False}
    assert v["streams"]["branch_streams"] and not any(v["eager"].values())
    with pytest.raises(ValueError, match="'fast'"):
        bench.parse_variants("fuse+fast")


@pytest.mark.parametrize("argv", [["--only", "a,x"], ["--only", ""], ["--steps", "0"], ["--batch", "-1"],
                                  ["--variants", "fuse:x"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error" in capsys.readouterr().err
