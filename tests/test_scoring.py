"""Leaderboard scorer: CSV refusals, the > 0.5 F1 rule, agreement with scikit-learn, and the CLI.

Real rows from tests/fixtures/milk10k_sample — dataset attribution: "MILK study team" (CC-BY-NC).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

from src.data import CLASSES
from src.io_utils import atomic_write_csv
from src.scoring import (SubmissionError, decisions, f1_per_class, format_table, macro_f1, main,
                         read_prediction_csv, read_truth_csv, score)

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures" / "milk10k_sample"
HEADER = "lesion_id," + ",".join(CLASSES)


def write(tmp_path: Path, text: str, name: str = "f.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def row(lid: str, values) -> str:
    return lid + "," + ",".join(f"{float(v)!r}" for v in values)


def onehot(*positives: str) -> list[float]:
    return [1.0 if c in positives else 0.0 for c in CLASSES]


def frame(rows: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame.from_dict(rows, orient="index", columns=CLASSES).rename_axis("lesion_id")


def random_case(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(CLASSES))) < np.linspace(0.01, 0.4, len(CLASSES))).astype(float)
    y[:, 4] = 0  # a class absent from truth
    p = np.clip(0.35 * y + rng.random(y.shape) * 0.7, 0, 1)
    p[:, 4] = rng.random(n) * 0.5  # ... and never predicted
    p[:, 6] = np.round(p[:, 6], 1)  # coarse values: many exactly 0.5
    return y, p


# --- reading ------------------------------------------------------------------------------------

def test_reads_the_real_files():
    truth = read_truth_csv(FIX / "MILK10k_Training_GroundTruth.csv")
    assert list(truth.columns) == CLASSES and truth.index.name == "lesion_id"
    assert len(truth) == 328 and (truth.sum(axis=1) == 1).all() and (truth.sum() > 0).all()
    test_ids = pd.read_csv(FIX / "MILK10k_Test_Metadata.csv")["lesion_id"].unique()
    sub = read_prediction_csv(FIX / "MILK10k_Sample_Submit.csv", expected_ids=test_ids)
    assert sub.shape == (479, 11) and (sub.dtypes == np.float64).all() and set(sub.index) == set(test_ids)


def test_written_predictions_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    df = frame({f"IL_{i:07d}": list(rng.random(11)) for i in range(50)})
    atomic_write_csv(tmp_path / "p.csv", df.reset_index())
    back = read_prediction_csv(tmp_path / "p.csv", expected_ids=df.index)
    assert back.index.tolist() == df.index.tolist()
    assert np.array_equal(back.to_numpy(), df.to_numpy())


def test_image_id_column_is_accepted_and_renamed(tmp_path):
    path = write(tmp_path, "image," + ",".join(CLASSES) + "\n" + row("IL_1", [0.25] * 11) + "\n")
    df = read_prediction_csv(path)
    assert df.index.name == "lesion_id" and df.index.tolist() == ["IL_1"]


def test_columns_may_come_in_any_order(tmp_path):
    cols = list(reversed(CLASSES))
    vals = np.linspace(0.05, 0.95, 11)
    path = write(tmp_path, ",".join(cols) + ",lesion_id\n" + ",".join(repr(float(v)) for v in vals) + ",IL_1\n")
    df = read_prediction_csv(path)
    assert list(df.columns) == CLASSES
    assert df.loc["IL_1", cols[0]] == vals[0]


@pytest.mark.parametrize("header, needle", [
    ("id," + ",".join(CLASSES), "lesion_id"),
    ("lesion_id,image," + ",".join(CLASSES), "exactly one id column"),
    (HEADER.replace("MEL", "MELANOMA"), "MELANOMA"),
    (HEADER.replace(",VASC", ""), "missing ['VASC']"),
    (HEADER + ",EXTRA", "unexpected ['EXTRA']"),
    (HEADER + ",NV", "duplicate column"),
])
def test_wrong_header_is_refused_naming_line_1(tmp_path, header, needle):
    n = header.count(",") + 1
    path = write(tmp_path, header + "\nIL_1" + ",0.1" * (n - 1) + "\n")
    with pytest.raises(SubmissionError) as e:
        read_prediction_csv(path)
    assert needle in str(e.value) and "line 1" in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("cell, needle", [
    ("", "missing value"), ("nan", "missing value"), ("NaN", "missing value"), ("abc", "not a number"),
    ("True", "not a number"), ("1.5", "outside [0, 1]"), ("-0.1", "outside [0, 1]"), ("1e3", "outside [0, 1]"),
    ("inf", "not a number"), ("0.1_5", "not a number"), ("0.5.1", "not a number"),
])
def test_bad_values_are_refused_naming_line_and_column(tmp_path, cell, needle):
    vals = ["0.1"] * 11
    vals[CLASSES.index("DF")] = cell
    path = write(tmp_path, HEADER + "\n" + row("IL_1", [0.2] * 11) + "\n\nIL_2," + ",".join(vals) + "\n")
    with pytest.raises(SubmissionError) as e:
        read_prediction_csv(path)
    assert needle in str(e.value) and "line 4, column DF" in str(e.value)  # blank line 3 still counted


def test_short_and_long_rows(tmp_path):
    short = write(tmp_path, HEADER + "\nIL_1" + ",0.1" * 10 + "\n", "short.csv")
    with pytest.raises(SubmissionError, match="line 2, column VASC: missing value"):
        read_prediction_csv(short)
    trailing = write(tmp_path, HEADER + "\nIL_1" + ",0.1" * 11 + ",\n", "trailing.csv")
    assert read_prediction_csv(trailing).shape == (1, 11)  # a trailing delimiter is tolerated
    long = write(tmp_path, HEADER + "\nIL_1" + ",0.1" * 12 + "\n", "long.csv")
    with pytest.raises(SubmissionError, match="line 2: 13 fields, header has 12"):
        read_prediction_csv(long)


def test_integer_only_column_is_refused_for_predictions_but_fine_for_truth(tmp_path):
    text = HEADER + "\n" + "IL_1," + ",".join(["0"] + ["0.5"] * 10) + "\nIL_2," + ",".join(["1"] + ["0.5"] * 10)
    path = write(tmp_path, text + "\n")
    with pytest.raises(SubmissionError, match="column AKIEC.*integer"):
        read_prediction_csv(path)
    truth = write(tmp_path, HEADER + "\nIL_1," + ",".join(["1"] + ["0"] * 10) + "\n", "t.csv")
    assert read_truth_csv(truth).loc["IL_1", "AKIEC"] == 1.0


def test_duplicate_missing_and_extra_ids(tmp_path):
    dup = write(tmp_path, "\n".join([HEADER, row("IL_1", [0.1] * 11), row("IL_1", [0.2] * 11)]) + "\n", "d.csv")
    with pytest.raises(SubmissionError, match=r"line 3, column lesion_id: duplicate id 'IL_1' \(first at line 2\)"):
        read_prediction_csv(dup)
    ok = write(tmp_path, "\n".join([HEADER, row("IL_1", [0.1] * 11), row("IL_2", [0.2] * 11)]) + "\n", "o.csv")
    with pytest.raises(SubmissionError, match="expected id.*missing: IL_3"):
        read_prediction_csv(ok, expected_ids=["IL_1", "IL_2", "IL_3"])
    with pytest.raises(SubmissionError, match="line 3, column lesion_id: id.*not expected: IL_2"):
        read_prediction_csv(ok, expected_ids=["IL_1"])
    assert read_prediction_csv(ok, expected_ids=["IL_2", "IL_1"]).shape == (2, 11)


def test_truth_labels_must_be_0_or_1(tmp_path):
    path = write(tmp_path, HEADER + "\n" + row("IL_1", onehot("NV")) + "\n" + row("IL_2", [0.5] * 11) + "\n")
    with pytest.raises(SubmissionError, match="line 3, column AKIEC: label 0.5 is not 0 or 1"):
        read_truth_csv(path)


def test_empty_file_and_header_only(tmp_path):
    with pytest.raises(SubmissionError, match="empty file"):
        read_prediction_csv(write(tmp_path, "", "e.csv"))
    with pytest.raises(SubmissionError, match="no data rows"):
        read_prediction_csv(write(tmp_path, HEADER + "\n", "h.csv"))


# --- the metric ---------------------------------------------------------------------------------

def test_exactly_half_is_negative():
    assert decisions([0.5, np.nextafter(0.5, 1.0), np.nextafter(0.5, 0.0)]).tolist() == [False, True, False]
    y = np.array([onehot("MEL")])
    at_half = np.where(np.array(onehot("MEL")) > 0, 0.5, 0.0)[None]
    f1 = f1_per_class(y, at_half)
    assert f1[CLASSES.index("MEL")] == 0.0 and f1.sum() == 10.0
    assert f1_per_class(y, np.nextafter(at_half, 1.0))[CLASSES.index("MEL")] == 1.0


def test_absent_class_scores_one_unless_predicted():
    truth = frame({"a": onehot("NV"), "b": onehot("BCC")})
    pred = frame({"a": onehot("NV"), "b": onehot("BCC")})
    res = score(truth, pred)
    assert res["macro_f1"] == 1.0 and res["per_class"]["DF"]["f1"] == 1.0
    assert res["per_class"]["DF"]["auc"] is None and res["per_class"]["DF"]["average_precision"] is None
    pred.loc["a", "DF"] = 0.9  # a false positive on a class absent from truth: F1 0
    res = score(truth, pred)
    assert res["per_class"]["DF"]["f1"] == 0.0 and res["macro_f1"] == pytest.approx(10 / 11)
    assert res["per_class"]["DF"]["fp"] == 1 and res["per_class"]["DF"]["balanced_accuracy"] == 0.75


def test_rows_with_zero_and_several_positives(tmp_path):
    path = write(tmp_path, "\n".join([HEADER, row("a", onehot()), row("b", onehot("BCC", "SCCKA")),
                                      row("c", onehot("BCC"))]) + "\n")
    truth = read_truth_csv(path)
    pred = frame({"a": [0.0] * 11, "b": np.where(np.array(onehot("BCC")) > 0, 0.8, 0.1).tolist(),
                  "c": np.where(np.array(onehot("NV")) > 0, 0.7, 0.2).tolist()})
    res = score(truth, pred)
    bcc, scc, nv = (res["per_class"][c] for c in ("BCC", "SCCKA", "NV"))
    assert (bcc["tp"], bcc["fn"], bcc["fp"], bcc["support"]) == (1, 1, 0, 2) and bcc["f1"] == 2 / 3
    assert (scc["tp"], scc["fn"], scc["f1"]) == (0, 1, 0.0)
    assert (nv["fp"], nv["tn"], nv["f1"], nv["predicted_positive"]) == (1, 2, 0.0, 1)
    assert res["macro_f1"] == pytest.approx((2 / 3 + 0 + 0 + 8) / 11) and res["n"] == 3


@pytest.mark.parametrize("seed", range(5))
def test_f1_agrees_with_sklearn(seed):
    y, p = random_case(seed)
    assert (p == 0.5).any()
    ours = f1_per_class(y, p)
    ref = [f1_score(y[:, j], p[:, j] > 0.5, zero_division=1.0) for j in range(len(CLASSES))]
    assert np.allclose(ours, ref, rtol=0, atol=1e-15)
    assert macro_f1(y, p) == pytest.approx(np.mean(ref), abs=1e-15)


def test_score_metrics_agree_with_sklearn_and_ignore_row_order():
    y, p = random_case(7)
    ids = [f"IL_{i:07d}" for i in range(len(y))]
    truth = pd.DataFrame(y, index=ids, columns=CLASSES)
    pred = pd.DataFrame(p, index=ids, columns=CLASSES).sample(frac=1.0, random_state=0)
    res = score(truth, pred)
    for j, c in enumerate(CLASSES):
        m = res["per_class"][c]
        if y[:, j].any():
            assert m["auc"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
            assert m["average_precision"] == pytest.approx(average_precision_score(y[:, j], p[:, j]))
            assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y[:, j], p[:, j] > 0.5))
        assert m["support"] == y[:, j].sum() and m["tp"] + m["fp"] + m["fn"] + m["tn"] == len(y)
    present = [res["per_class"][c]["auc"] for c in CLASSES if res["per_class"][c]["auc"] is not None]
    assert len(present) == 10 and res["auc"] == pytest.approx(np.mean(present))
    assert res["macro_f1"] == macro_f1(y, p)
    json.dumps(res)  # JSON-able as returned


def test_score_refuses_mismatched_ids():
    truth = frame({"a": onehot("NV"), "b": onehot("BCC")})
    with pytest.raises(SubmissionError, match="1 missing from predictions.*1 not in truth"):
        score(truth, frame({"a": onehot("NV"), "z": onehot("BCC")}))


def test_format_table_lists_every_class_and_the_macro():
    res = score(frame({"a": onehot("NV")}), frame({"a": onehot("NV")}))
    text = format_table(res)
    assert all(c in text for c in CLASSES)
    assert text.splitlines()[-1].startswith("macro    1.0000")


# --- command line -------------------------------------------------------------------------------

def test_cli_json(tmp_path):
    truth = FIX / "MILK10k_Training_GroundTruth.csv"
    t = read_truth_csv(truth)
    pred = (0.2 + 0.6 * t).rename_axis("lesion_id").reset_index()
    atomic_write_csv(tmp_path / "p.csv", pred)
    out = subprocess.run([sys.executable, "-m", "src.scoring", str(truth), str(tmp_path / "p.csv"), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["macro_f1"] == 1.0 and res["n"] == 328 and set(res["per_class"]) == set(CLASSES)


def test_cli_bad_file_exits_2_with_reason(tmp_path, capsys):
    truth = FIX / "MILK10k_Training_GroundTruth.csv"
    bad = write(tmp_path, "id," + ",".join(CLASSES) + "\nIL_1" + ",0.1" * 11 + "\n")
    assert main([str(truth), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "lesion_id" in err
    assert main([str(truth), str(tmp_path / "absent.csv")]) == 2
    assert "absent.csv" in capsys.readouterr().err
