"""Secondary figures recomputed by hand on eight lesions with known answers: what the path without MONET is recorded to
score, and the model card's headline. A bug that scores the path without MONET with the with-MONET predictions, or tunes
thresholds on the rows it scores, or puts an in-sample figure in the card, changes the numbers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from src.config import load_config
from src.data import CLASSES
from src.experiment import NOMONET, probs_frame
from src.nomonet import paths_without, record

AKIEC, BCC = CLASSES.index("AKIEC"), CLASSES.index("BCC")
FOLDS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
IS_AKIEC = np.array([1, 1, 0, 0, 1, 1, 0, 0])          # the other four lesions are BCC


def probs(akiec: list[float]) -> np.ndarray:
    p = np.zeros((8, len(CLASSES)))
    p[:, AKIEC] = akiec
    p[:, BCC] = np.where(IS_AKIEC == 1, 0.1, 0.9)       # BCC is told apart on both paths
    return p


@pytest.fixture()
def fake(tmp_path):
    """One experiment's out-of-fold files: with MONET AKIEC is separable in both folds; without MONET fold 0 ranks
    it right (0.9, 0.8 against 0.3, 0.2) and fold 1 the wrong way round."""
    ids = [f"IL_{i}" for i in range(8)]
    train = pd.DataFrame({"lesion_id": ids, **{c: 0.0 for c in CLASSES}})
    train["AKIEC"], train["BCC"] = IS_AKIEC.astype(float), 1.0 - IS_AKIEC
    cfg = load_config("exp000", [f"output_dir={tmp_path}", "name=fake", "n_folds=2"])
    cfg.exp_dir().mkdir(parents=True)
    probs_frame(ids, probs([0.9, 0.9, 0.1, 0.1, 0.9, 0.9, 0.1, 0.1])).to_csv(cfg.exp_dir() / "oof.csv", index=False)
    blind = probs([0.9, 0.8, 0.3, 0.2, 0.3, 0.2, 0.9, 0.8])
    probs_frame(ids, blind).to_csv(cfg.exp_dir() / NOMONET, index=False)
    return cfg, train


def test_the_path_without_monet_is_scored_honestly_from_its_own_predictions(fake):
    """By hand, AKIEC without MONET: fold 1's best cut puts every lesion positive (F1 2*2/(2*2+2) = 0.667 beats any
    other), applied to fold 0: 2 TP, 2 FP; fold 0's best cut is between 0.3 and 0.8, applied to fold 1: 0 TP, 2 FP,
    2 FN. Together 2 TP, 4 FP, 2 FN: F1 4/10 = 0.4. BCC is right everywhere and the 9 absent classes are never
    predicted (F1 1 each): macro F1 (0.4 + 10) / 11. Tuned on all eight rows, AKIEC's best cut is every lesion
    positive (F1 8/12), the stored threshold below its lowest value."""
    cfg, train = fake
    paths = paths_without([cfg], FOLDS, train, "threshold")
    y = train[CLASSES].to_numpy()
    decided = paths["stored"] > 0.5
    tp = (decided & (y > 0.5)).sum(0)
    assert tp[AKIEC] == 2 and (decided[:, AKIEC] & (y[:, AKIEC] < 0.5)).sum() == 4
    from src.scoring import macro_f1

    assert macro_f1(y, paths["stored"]) == pytest.approx((0.4 + 10) / 11)
    assert paths["thresholds"][AKIEC] == pytest.approx(0.1) and paths["thresholds"][BCC] == pytest.approx(0.5)
    np.testing.assert_array_equal(paths["batch"], paths["stored"])   # a labelled rule: a batch uses them too


def test_the_recorded_figures_are_those_numbers(fake):
    """What a submission stores: the path with MONET (its honest decisions as given, here all right: 1.0) and the path
    without, by stored thresholds, (0.4 + 10) / 11, with intervals around them."""
    from types import SimpleNamespace

    cfg, train = fake
    y = train[CLASSES].to_numpy()
    rec = record(SimpleNamespace(cfgs=[cfg], folds=FOLDS), "threshold", y.copy(), train)
    monet = rec["monet"]
    assert monet["with"]["honest"] == pytest.approx(1.0)
    assert monet["without"]["stored"]["honest"] == pytest.approx((0.4 + 10) / 11)
    lo, hi = monet["without"]["stored"]["interval"]
    assert lo <= (0.4 + 10) / 11 <= hi < 1.0
    assert rec["thresholds_without_monet"]["AKIEC"] == pytest.approx(0.1)
    assert (monet["n_lesions"], monet["n_folds"]) == (8, 2)


def sample_data(sample_dir, out, n_each: int = 4):
    """The first ``n_each`` AKIEC and BCC lesions of the real sample (MILK10k, "MILK study team", CC-BY-NC) in the
    official layout, with the sample's test metadata; their ids in the order of FOLDS and IS_AKIEC (two AKIEC, two
    BCC in each fold)."""
    gt = pd.read_csv(sample_dir / "MILK10k_Training_GroundTruth.csv")
    a, b = list(gt.loc[gt["AKIEC"] == 1, "lesion_id"][:n_each]), list(gt.loc[gt["BCC"] == 1, "lesion_id"][:n_each])
    ids = [*a[:2], *b[:2], *a[2:], *b[2:]]
    out.mkdir(parents=True)
    gt.set_index("lesion_id").loc[ids].reset_index().to_csv(out / "MILK10k_Training_GroundTruth.csv", index=False)
    for name in ("MILK10k_Training_Metadata.csv", "MILK10k_Training_Supplement.csv"):
        frame = pd.read_csv(sample_dir / name, dtype=str, keep_default_na=False)
        if "lesion_id" not in frame.columns:                        # the supplement: one row per image
            meta = pd.read_csv(sample_dir / "MILK10k_Training_Metadata.csv", dtype=str)
            frame = frame[frame["isic_id"].isin(meta.loc[meta["lesion_id"].isin(ids), "isic_id"])]
        else:
            frame = frame[frame["lesion_id"].isin(ids)]
        frame.to_csv(out / name, index=False)
    import shutil

    shutil.copy(sample_dir / "MILK10k_Test_Metadata.csv", out / "MILK10k_Test_Metadata.csv")
    return ids


def test_the_model_cards_headline_is_the_honest_score_computed_by_hand(sample_dir, tmp_path):
    """The card of an experiment whose out-of-fold AKIEC ranking is right in fold 0 and inverted in fold 1 (the
    eight lesions above, real sample rows): its headline is the honest (0.4 + 10) / 11 worked out by hand, not the
    in-sample or raw figure."""
    from src.data import load_test
    from src.deliver.card import write_card
    from src.deliver.source import Member, Source

    data = tmp_path / "data"
    ids = sample_data(sample_dir, data)
    assert len(ids) == 8
    cfg = load_config("exp000", [f"data_dir={data}", f"output_dir={tmp_path / 'out'}", "name=fake", "n_folds=2",
                                 "decision=threshold"])
    for k in (0, 1):                                                # complete folds, as the blend requires
        cfg.fold_dir(k).mkdir(parents=True)
        (cfg.fold_dir(k) / "metrics.json").write_text("{}")
    pd.DataFrame({"lesion_id": ids, "fold": FOLDS}).to_csv(cfg.resolved_folds_csv(), index=False)
    probs_frame(ids, probs([0.9, 0.8, 0.3, 0.2, 0.3, 0.2, 0.9, 0.8])).to_csv(cfg.exp_dir() / "oof.csv", index=False)
    test_ids = load_test(data, check_images=False)["lesion_id"]
    probs_frame(test_ids, np.full((len(test_ids), len(CLASSES)), 0.1)).to_csv(cfg.exp_dir() / "test.csv", index=False)
    source = Source("fake", "experiment", {"fake": Member("fake", cfg.exp_dir(), cfg, "tabular")}, {"fake": 1.0},
                    "threshold", np.full(len(CLASSES), 0.5), "all blended out-of-fold rows", {}, tmp_path)
    (tmp_path / "card").mkdir()
    figures = write_card(tmp_path / "card", source)
    assert figures["honest_macro_f1"] == pytest.approx((0.4 + 10) / 11)
    assert f"{(0.4 + 10) / 11:.4f}" in (tmp_path / "card" / "MODEL_CARD.md").read_text()
