"""Fingerprints of different versions compare on what both can say: an earlier one lists the keys of its time."""
from src.experiment import FINGERPRINT_VERSION, fingerprint_differences


def _new(**settings):
    return {"version": FINGERPRINT_VERSION, "settings": {"img_size": 32, "experiment": "exp001", **settings},
            "data": {"tables": "t"}}


def _old(**settings):
    return {"settings": {"img_size": 32, "model": "image", "meta_mode": "concat", "embed_norm": False,
                         "head_dropout": 0.0, **settings}, "data": {"tables": "t"}}


def test_an_earlier_fingerprint_matches_when_its_retired_keys_hold_todays_equivalent_values():
    assert fingerprint_differences(_old(), _new()) == []
    assert fingerprint_differences(_new(), _old()) == []              # either side may be the earlier one


def test_an_earlier_fingerprint_differs_on_a_shared_key_or_a_retired_key_at_another_value():
    assert fingerprint_differences(_old(img_size=48), _new()) == ["img_size=48 -> 32"]
    assert fingerprint_differences(_old(embed_norm=True), _new()) == ["embed_norm=True -> False"]
    assert fingerprint_differences(_new(), _old(head_dropout=0.5)) == ["head_dropout=0.0 -> 0.5"]


def test_fingerprints_of_one_version_compare_every_key():
    assert fingerprint_differences(_new(experiment="exp003"), _new()) == ["experiment='exp003' -> 'exp001'"]
    assert fingerprint_differences(_new(), {**_new(), "data": {"tables": "u"}}) == \
        ["the tables differ (labels or metadata changed)"]
