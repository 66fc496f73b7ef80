"""MetadataEncoder: imputation, unseen categories, batch independence, serialisation.

The real-row test reads tests/fixtures/milk10k_sample (MILK10k, "MILK study team", CC-BY-NC).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.data import MONET, DataError, load_test, load_train
from src.features import MetadataEncoder

FIXTURES = Path(__file__).parent / "fixtures" / "milk10k_sample"


def lesions(rows: list[dict]) -> pd.DataFrame:
    """A lesion table with every column the encoder reads; ``rows`` override the defaults."""
    out = []
    for i, r in enumerate(rows):
        row = {"lesion_id": f"IL_{i:07d}", "age_approx": 50.0, "sex": "male", "skin_tone_class": 3.0,
               "site": "trunk", "clin_manipulation": "instrument only", "derm_manipulation": "instrument only"}
        for j, m in enumerate(MONET):
            row[f"clin_{m}"] = 0.1 + 0.1 * j
            row[f"derm_{m}"] = 0.05 * j
        row.update(r)
        out.append(row)
    return pd.DataFrame(out)


TRAIN = lesions([
    {"age_approx": 30.0, "sex": "female", "site": "trunk", "skin_tone_class": 2.0},
    {"age_approx": 50.0, "sex": "male", "site": "head_neck_face"},
    {"age_approx": 70.0, "sex": "male", "site": "lower_extremity", "skin_tone_class": 4.0},
    {"age_approx": np.nan, "sex": "", "site": "", "skin_tone_class": np.nan},
    {"age_approx": 85.0, "sex": "female", "site": "trunk", "derm_manipulation": "altered"},
])
NEW = lesions([
    {"age_approx": np.nan, "sex": "", "site": "genital", "skin_tone_class": np.nan},
    {"age_approx": 62.0, "sex": "other", "site": None, f"clin_{MONET[0]}": np.nan},
    {"age_approx": 20.0, "sex": "Female", "site": "Trunk ", f"clin_{MONET[1]}": 0.0, f"derm_{MONET[1]}": 1.0},
    {"age_approx": 75.0, "sex": "male", "site": "head_neck_face", "clin_manipulation": "altered"},
])


def col(enc: MetadataEncoder, x: np.ndarray, name: str) -> np.ndarray:
    return x[:, enc.feature_names.index(name)]


def test_base_features_and_missing_values():
    enc = MetadataEncoder().fit(TRAIN)
    x = enc.transform(NEW)
    assert x.dtype == np.float32 and x.shape == (4, enc.n_features) and np.isfinite(x).all()
    assert len(set(enc.feature_names)) == enc.n_features
    ages = np.array([30.0, 50.0, 70.0, 85.0])
    z = lambda a: (a - ages.mean()) / ages.std()  # noqa: E731
    np.testing.assert_allclose(col(enc, x, "age"), z(np.array([np.median(ages), 62.0, 20.0, 75.0])), rtol=1e-6)
    np.testing.assert_array_equal(col(enc, x, "age_missing"), [1, 0, 0, 0])
    np.testing.assert_array_equal(col(enc, x, "sex_unknown"), [1, 1, 0, 0])
    np.testing.assert_array_equal(col(enc, x, "sex_female"), [0, 0, 1, 0])
    np.testing.assert_array_equal(col(enc, x, "skin_tone_missing"), [1, 0, 0, 0])
    tones = np.array([2.0, 3.0, 4.0, 3.0])
    assert col(enc, x, "skin_tone")[0] == pytest.approx((np.median(tones) - tones.mean()) / tones.std(), rel=1e-6)
    # sites: training categories plus one explicit unknown; missing and unseen both go there
    assert [n for n in enc.feature_names if n.startswith("site_")] == [
        "site_head_neck_face", "site_lower_extremity", "site_trunk", "site_unknown"]
    np.testing.assert_array_equal(col(enc, x, "site_unknown"), [1, 1, 0, 0])
    np.testing.assert_array_equal(col(enc, x, "site_trunk"), [0, 0, 1, 0])
    site_block = x[:, [i for i, n in enumerate(enc.feature_names) if n.startswith("site_")]]
    np.testing.assert_array_equal(site_block.sum(1), 1)
    # MONET as is; a missing score takes the training median
    np.testing.assert_allclose(col(enc, x, f"derm_{MONET[1]}"), [0.05, 0.05, 1.0, 0.05], rtol=1e-6)
    assert col(enc, x, f"clin_{MONET[0]}")[1] == pytest.approx(0.1)
    np.testing.assert_array_equal(col(enc, x, "clin_altered"), [0, 0, 0, 1])
    np.testing.assert_array_equal(col(enc, enc.transform(TRAIN), "derm_altered"), [0, 0, 0, 0, 1])


def test_columns_do_not_depend_on_what_is_transformed():
    enc = MetadataEncoder(extended=True).fit(TRAIN)
    names = list(enc.feature_names)
    enc.transform(NEW)
    assert enc.feature_names == names and enc.transform(NEW.iloc[:0]).shape == (0, len(names))


@pytest.mark.parametrize("extended", [False, True])
def test_transform_is_batch_independent(extended):
    enc = MetadataEncoder(extended=extended).fit(TRAIN)
    full = enc.transform(pd.concat([NEW, TRAIN], ignore_index=True))
    for i in range(len(NEW)):
        np.testing.assert_array_equal(enc.transform(NEW.iloc[[i]]), full[[i]])
    np.testing.assert_array_equal(enc.transform(NEW.iloc[::-1]), full[:len(NEW)][::-1])


def test_extended_adds_columns_after_the_base_ones():
    base = MetadataEncoder().fit(TRAIN)
    ext = MetadataEncoder(extended=True).fit(TRAIN)
    xb, xe = base.transform(NEW), ext.transform(NEW)
    assert ext.feature_names[:base.n_features] == base.feature_names and ext.n_features > base.n_features
    np.testing.assert_array_equal(xe[:, :base.n_features], xb)
    assert np.isfinite(xe).all()
    m = MONET[1]
    logit = col(ext, xe, f"logit_clin_{m}")
    assert logit[2] < -5 and np.isfinite(logit[2]) and col(ext, xe, f"logit_derm_{m}")[2] > 5
    np.testing.assert_allclose(col(ext, xe, f"diff_{m}"), col(ext, xe, f"clin_{m}") - col(ext, xe, f"derm_{m}"),
                               atol=1e-6)
    np.testing.assert_allclose(col(ext, xe, "age_over_60"), [0.0, 0.2, 0.0, 1.5], atol=1e-6)
    np.testing.assert_allclose(col(ext, xe, "age_over_40"), [2.0, 2.2, 0.0, 3.5], atol=1e-6)  # missing age -> median 60
    np.testing.assert_allclose(col(ext, xe, "age_x_site_unknown"), col(ext, xe, "age") * [1, 1, 0, 0], atol=1e-6)
    np.testing.assert_array_equal(col(ext, xe, "n_missing"), [4, 2, 0, 0])
    np.testing.assert_array_equal(col(ext, xe, "age_missing_x_site_unknown"), [1, 0, 0, 0])


@pytest.mark.parametrize("extended", [False, True])
def test_save_load_round_trip(tmp_path, extended):
    enc = MetadataEncoder(extended=extended).fit(TRAIN)
    enc.save(tmp_path / "enc.json")
    loaded = MetadataEncoder.load(tmp_path / "enc.json")
    assert loaded.feature_names == enc.feature_names and loaded.extended == extended
    np.testing.assert_array_equal(loaded.transform(NEW), enc.transform(NEW))
    np.testing.assert_array_equal(MetadataEncoder.from_dict(enc.to_dict()).transform(NEW), enc.transform(NEW))
    assert [p.name for p in tmp_path.iterdir()] == ["enc.json"]


def test_unusable_inputs_raise_clearly(tmp_path):
    with pytest.raises(RuntimeError, match="before fit"):
        MetadataEncoder().transform(NEW)
    with pytest.raises(DataError, match="site"):
        MetadataEncoder().fit(TRAIN.drop(columns="site"))
    bad = tmp_path / "enc.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="enc.json"):
        MetadataEncoder.load(bad)
    d = MetadataEncoder().fit(TRAIN).to_dict()
    d["sites"] = d["sites"][:-1]
    with pytest.raises(DataError, match="feature names"):
        MetadataEncoder.from_dict(d)


def test_real_rows_train_to_test():
    train, test = load_train(FIXTURES, check_images=False), load_test(FIXTURES, check_images=False)
    assert len(test) == 479
    enc = MetadataEncoder(extended=True).fit(train)
    assert "site_genital" not in enc.feature_names
    x = enc.transform(test)
    assert x.shape == (479, enc.n_features) and np.isfinite(x).all()
    unknown = col(enc, x, "site_unknown") == 1
    np.testing.assert_array_equal(unknown, test.site.isin(["", "genital"]))
    assert unknown.sum() == 8
    xt = enc.transform(train)
    np.testing.assert_array_equal(col(enc, xt, "age_missing"), train.age_approx.isna())
    assert col(enc, xt, "age_missing").sum() == 2 and col(enc, xt, "site_unknown").sum() == 3


def test_standardized_features_are_z_scores_of_the_training_rows_and_survive_save_load(sample_dir, tmp_path):
    train = load_train(sample_dir, check_images=False)
    fit_rows, other = train.iloc[:200], train.iloc[200:]
    plain = MetadataEncoder(extended=True).fit(fit_rows)
    z = MetadataEncoder(extended=True, standardize=True).fit(fit_rows)
    x, xz = plain.transform(fit_rows).astype(float), z.transform(fit_rows).astype(float)
    varying = x.std(0) > 1e-9
    np.testing.assert_allclose(xz.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(xz.std(0)[varying], 1, atol=1e-4)
    np.testing.assert_allclose(xz[:, varying], (x[:, varying] - x[:, varying].mean(0)) / x[:, varying].std(0), atol=1e-4)
    z.save(tmp_path / "enc.json")
    again = MetadataEncoder.load(tmp_path / "enc.json")
    np.testing.assert_array_equal(again.transform(other), z.transform(other))
    assert not MetadataEncoder.load(_saved(plain, tmp_path)).standardize


def _saved(enc, tmp_path):
    enc.save(tmp_path / "plain.json")
    return tmp_path / "plain.json"


@pytest.mark.parametrize("kind", ["base", "extended", "interactions"])
def test_image_models_metadata_features_are_fitted_on_the_training_rows(sample_dir, kind):
    from src.config import experiment_recipe, load_config

    train = load_train(sample_dir, check_images=False)
    fit_rows, other = train.iloc[:200], train.iloc[200:]
    cfg = load_config("exp001", [f"meta_features={kind}", "meta_standardize=true"])
    features = experiment_recipe("exp001").features(cfg).fit(fit_rows)
    x, z = features.transform(fit_rows), features.transform(other)
    widths = {"base": MetadataEncoder().fit(fit_rows).n_features,
              "extended": MetadataEncoder(extended=True).fit(fit_rows).n_features}
    assert x.dtype == np.float32 and x.shape[1] == z.shape[1] and np.isfinite(z).all()
    assert x.shape[1] == widths[kind] if kind in widths else x.shape[1] > widths["extended"] * 3
    varying = x.std(0) > 1e-6
    np.testing.assert_allclose(x[:, varying].mean(0), 0, atol=1e-4)     # z-scored on the rows it was fitted on
    np.testing.assert_array_equal(features.transform(other.iloc[:5]), z[:5])      # row-wise: a lesion encodes the same alone


def test_a_lesion_missing_any_monet_score_takes_the_path_without_and_blanking_moves_only_monet_features():
    from src.features import MONET_COLUMNS, blank_monet, has_monet

    enc = MetadataEncoder(extended=True).fit(TRAIN)
    np.testing.assert_array_equal(has_monet(NEW), [True, False, True, True])   # one clinical score missing
    blind = blank_monet(NEW)
    assert blind[MONET_COLUMNS].isna().all().all() and not NEW[MONET_COLUMNS].isna().all().all()
    assert not has_monet(blind).any()
    x, xb = enc.transform(NEW), enc.transform(blind)
    np.testing.assert_allclose(col(enc, xb, f"derm_{MONET[1]}"), 0.05)               # the training median
    others = [i for i, n in enumerate(enc.feature_names) if "MONET" not in n]
    np.testing.assert_array_equal(xb[:, others], x[:, others])                       # nothing else moves
