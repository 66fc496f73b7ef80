"""Metadata-only experiment exp000: complete folds, coverage, a learned signal, determinism, rare classes.

One test reads the real rows of tests/fixtures/milk10k_sample (MILK10k, "MILK study team", CC-BY-NC).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.config import ConfigError, load_config
from src.data import CLASSES, MONET, load_test, load_train
from src.experiment import NOMONET, ExperimentDir
from src.features import MetadataFeatures
from src.runner import run_experiment
from src.tabular import MODELS, fit_predict, parse_models

FOLD_FILES = ("oof.csv", "oof_nomonet.csv", "test.csv", "features.json", "models.json", "models.skops", "config.json",
              "metrics.json")


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def exp000(data_dir: Path, output_dir: Path, *extra: str):
    return load_config("exp000", [f"data_dir={data_dir}", f"output_dir={output_dir}", "wandb_mode=disabled", *extra])


def check_outputs(cfg, data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    train, test = load_train(data_dir, check_images=False), load_test(data_dir, check_images=False)
    for k in range(cfg.n_folds):
        assert ExperimentDir(cfg).fold_done(k)
        assert all((cfg.fold_dir(k) / f).is_file() for f in FOLD_FILES)
    oof, tst = pd.read_csv(cfg.exp_dir() / "oof.csv"), pd.read_csv(cfg.exp_dir() / "test.csv")
    assert oof["lesion_id"].tolist() == train["lesion_id"].tolist()
    assert sorted(tst["lesion_id"]) == sorted(test["lesion_id"])
    for frame in (oof, tst):
        p = frame[CLASSES].to_numpy()
        assert list(frame.columns) == ["lesion_id", *CLASSES]
        assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    return train, oof


def best_constant_f1(y: np.ndarray) -> float:
    """Macro F1 of the best prediction that ignores the lesion: per class, always or never positive."""
    pos, n = y.sum(0), len(y)
    return float(np.mean(np.maximum(2 * pos / (n + pos), pos == 0)))


@pytest.fixture(scope="module")
def mini_run(mini_data, tmp_path_factory):
    """exp000 run once on the miniature data: (config, run_experiment's result)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        cfg = exp000(mini_data, tmp_path_factory.mktemp("exp000"))
        return cfg, run_experiment(cfg)


def test_exp000_learns_the_metadata_signal(mini_data, mini_run):
    cfg, result = mini_run
    assert result["complete"] and cfg.experiment == "exp000" and cfg.decision == "auto"
    train, oof = check_outputs(cfg, mini_data)
    y = train[CLASSES].to_numpy(np.float64)
    assert result[f"macro_f1_{result['decision']}_honest"] > best_constant_f1(y) + 0.08
    assert result["auc_macro"] > 0.65


def test_deterministic(mini_data, mini_run, tmp_path):
    cfg, _ = mini_run
    again = exp000(mini_data, tmp_path)
    assert not run_experiment(again, folds="3")["complete"]
    for name in ("oof.csv", "test.csv", "features.json"):
        assert (again.fold_dir(3) / name).read_bytes() == (cfg.fold_dir(3) / name).read_bytes()


def test_resume_refits_only_unfinished_folds(mini_data, mini_run, tmp_path):
    cfg, _ = mini_run
    shutil.copytree(cfg.output_dir, tmp_path, dirs_exist_ok=True)
    copy = cfg.replace(output_dir=str(tmp_path))
    (copy.fold_dir(2) / "metrics.json").unlink()
    (copy.fold_dir(2) / "oof.csv").write_text("garbage\n")
    kept = (copy.fold_dir(0) / "metrics.json").stat().st_mtime_ns
    assert run_experiment(copy)["complete"]
    assert (copy.fold_dir(0) / "metrics.json").stat().st_mtime_ns == kept
    assert (copy.exp_dir() / "oof.csv").read_bytes() == (cfg.exp_dir() / "oof.csv").read_bytes()


def test_the_path_without_monet_is_fitted_and_scored_without_any_monet_score(mini_data, mini_run, tmp_path):
    """Each fold fits its models a second time with every MONET score removed: its oof_nomonet.csv is what those
    stored models give the fold's lesions with their scores removed, and it does not move when the MONET scores of the
    data change (the out-of-fold predictions with MONET do)."""
    from src.features import blank_monet
    from src.tabular import load_models, predict_saved

    cfg, result = mini_run
    train = load_train(mini_data, check_images=False)
    folds = pd.read_csv(cfg.resolved_folds_csv())["fold"].to_numpy()
    fdir = cfg.fold_dir(1)
    models = load_models(fdir)
    assert [m[0] for m in models["with_monet"]] == [m[0] for m in models["without_monet"]] == ["lrx"]
    held = blank_monet(train[folds == 1])
    x = MetadataFeatures.load(fdir / "features.json").transform(held)
    np.testing.assert_allclose(predict_saved(models["without_monet"], x),
                               pd.read_csv(fdir / NOMONET)[CLASSES].to_numpy(), rtol=0, atol=1e-12)
    assert 0 < result["macro_f1_without_monet"] < 1
    data = tmp_path / "data"
    data.mkdir()
    for csv in mini_data.glob("*.csv"):
        shutil.copy(csv, data / csv.name)
    meta = pd.read_csv(data / "MILK10k_Training_Metadata.csv", dtype=str, keep_default_na=False)
    meta[MONET] = meta[MONET].astype(float).pow(2).astype(str)
    meta.to_csv(data / "MILK10k_Training_Metadata.csv", index=False)
    other = exp000(data, tmp_path / "out", f"folds_csv={cfg.resolved_folds_csv()}")
    run_experiment(other, folds="1")
    moved = {file: np.abs(pd.read_csv(cfg.fold_dir(1) / file)[CLASSES].to_numpy()
                          - pd.read_csv(other.fold_dir(1) / file)[CLASSES].to_numpy()).max() for file in ("oof.csv", NOMONET)}
    # the imputed constants differ (the training median), which moves the solver's path by its tolerance only
    assert moved["oof.csv"] > 0.05 and moved[NOMONET] < 1e-3, moved


def test_real_sample_rows_complete(sample_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for csv in sample_dir.glob("*.csv"):
        shutil.copy(csv, data / csv.name)
    cfg = exp000(data, tmp_path / "out")
    result = run_experiment(cfg)
    assert result["complete"] and result["n"] == 328
    check_outputs(cfg, data)
    assert len(pd.read_csv(cfg.exp_dir() / "test.csv")) == 479


@pytest.mark.parametrize("model", MODELS)
def test_rare_and_absent_classes(model):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 3, 7], [40, 30, 1, 25])  # class 3 seen once; every other class absent
    x = rng.normal(size=(len(y), 6)) + y[:, None] * 0.3
    columns = ["age", "skin_tone", "logit_a", "logit_b", "site_x", "site_unknown"]
    out, = fit_predict([model], 0, x, y, rng.normal(size=(20, 6)), columns=columns)
    assert out.shape == (20, len(CLASSES))
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-9)
    absent = np.setdiff1d(np.arange(len(CLASSES)), y)
    assert (out[:, absent] == 0).all() and (out[:, [0, 1, 7]] > 0).all()


def test_unknown_model_is_refused():
    assert parse_models(" hgb , logreg") == ["hgb", "logreg"]
    with pytest.raises(ConfigError, match="xgb"):
        parse_models("logreg,xgb")


def test_spread_runs_the_experiment_under_each_fold_seed_and_reports_mean_and_std(mini_data, tmp_path, capsys):
    from src.spread import main as spread_main

    ov = [f"data_dir={mini_data}", f"output_dir={tmp_path}", f"submission_dir={tmp_path / 'subs'}",
          "wandb_mode=disabled", "tabular_models=logreg"]
    assert spread_main(["exp000", "--fold-seeds", "1,2", *ov]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "spread" / "exp000.json").read_text())
    rows = saved["per_seed"]
    assert set(rows) == {"1", "2"} and (tmp_path / "exp000_fs1" / "oof.csv").is_file()
    assert (tmp_path / "folds_k5_s1.csv").read_text() != (tmp_path / "folds_k5_s2.csv").read_text()
    values = [rows[s]["expected_f1"] for s in ("1", "2")]
    assert saved["summary"]["expected_f1"]["mean"] == pytest.approx(np.mean(values))
    assert saved["summary"]["expected_f1"]["std"] == pytest.approx(np.std(values))
    assert "mean +- std" in out and not list((tmp_path / "subs").glob("*.csv"))   # no submission is written


def test_interaction_features_add_splines_site_and_monet_products(sample_dir):
    from src.features import MetadataEncoder
    from src.tabular import InteractionFeatures

    train = load_train(sample_dir, check_images=False)
    enc = MetadataEncoder(extended=True).fit(train)
    x = enc.transform(train).astype(float)
    feats = InteractionFeatures(enc.feature_names).fit(x[:200])
    out = feats.transform(x)
    n_sites = sum(c.startswith("site_") for c in enc.feature_names)
    assert out.shape == (len(x), x.shape[1] + 15 * 7 + 5 + n_sites * 14 + 91)
    np.testing.assert_array_equal(out[:, :x.shape[1]], x)            # the encoder's columns come first, unchanged
    logits = x[:, [i for i, c in enumerate(enc.feature_names) if c.startswith("logit_")]]
    np.testing.assert_allclose(out[:, -91], logits[:, 0] * logits[:, 1] / 9)
    assert np.isfinite(out).all()


def test_fine_targets_are_summed_back_to_their_classes():
    from src.tabular import FINE_MIN, fine_targets

    y = np.array([1] * (FINE_MIN + 5) + [1] * 3 + [7] * (FINE_MIN) + [7] * 2)
    fine = np.array(["Basal cell carcinoma"] * (FINE_MIN + 5) + ["rare bcc"] * 3 + ["Melanoma Invasive"] * FINE_MIN
                    + [""] * 2)
    codes, code_class = fine_targets(y, fine)
    assert len(set(codes)) == 4                              # two common diagnoses, and each class's remainder
    assert (code_class[codes] == y).all()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(y), 4))
    (q,) = fit_predict(["lrx"], 0, x, y, x[:5], fine=fine, columns=["age", "skin_tone", "logit_a", "logit_b"])
    assert q.shape == (5, 11)
    np.testing.assert_allclose(q.sum(1), 1.0)
    assert set(np.flatnonzero(q.sum(0) > 0)) == {1, 7}      # only the classes seen get probability


@pytest.mark.parametrize("text", ["4,a", "42", "7,7", "-1,3", ""])
def test_spread_refuses_bad_fold_seeds_before_running_anything(text, tmp_path, capsys):
    from src.spread import main as spread_main

    with pytest.raises(SystemExit) as exc:
        spread_main(["exp000", "--fold-seeds", text, f"output_dir={tmp_path}"])
    assert exc.value.code == 2 and "--fold-seeds" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_spread_fold_seeds_parse_in_order_without_repeats():
    from src.spread import fold_seeds

    assert fold_seeds(" 42, 7,2026,7 ") == [42, 7, 2026]


@pytest.mark.parametrize("name", ["exp000", "stack001"])
def test_a_tabular_and_a_stacked_fold_fit_their_features_on_the_other_folds_only(name, mini_data, tmp_path,
                                                                                 monkeypatch):
    """Held-out lesions carry a planted marker (age 119, a site no other fold has): the fold's fitted transform
    (features.json) has the age statistics of the other folds' lesions, computed here by hand, and not the site;
    every fit of the metadata encoder saw exactly the other folds' lesions."""
    from src.config import experiment_recipe
    from src.features import MetadataEncoder
    from src.tabular import TabularData

    out = tmp_path / "out"
    if name == "stack001":
        run_experiment(exp000(mini_data, out, "n_folds=5"))
    cfg = load_config(name, [f"data_dir={mini_data}", f"output_dir={out}", "wandb_mode=disabled"]
                      + (["stack_inputs=exp000"] if name == "stack001" else []))
    recipe = experiment_recipe(name)
    data = recipe.prepare(cfg)
    train = data.lesions.train.copy()
    held = data.lesions.folds == 2
    train.loc[held, "age_approx"] = 119.0
    train.loc[held, "site"] = "held_out_only_site"
    data = TabularData(type(data.lesions)(train, data.lesions.test, data.lesions.folds), data.data_print,
                       data.extra_train, data.extra_test)
    seen = []
    real = MetadataEncoder.fit

    def spying(self, lesions):
        seen.append(lesions["lesion_id"].tolist())
        return real(self, lesions)

    monkeypatch.setattr(MetadataEncoder, "fit", spying)
    recipe.train_fold(cfg, 2, data)
    others = train[~held]
    assert seen == [others["lesion_id"].tolist()]
    saved = json.loads((cfg.fold_dir(2) / "features.json").read_text())["encoder"]
    ages = others["age_approx"].dropna().to_numpy(np.float64)
    assert saved["age"]["mean"] == pytest.approx(float(ages.mean())) and saved["age"]["mean"] < 100
    assert saved["age"]["median"] == pytest.approx(float(np.median(ages)))
    assert "held_out_only_site" not in saved["sites"]
    assert saved["sites"] == sorted({s for s in others["site"] if s and s != "unknown"})
