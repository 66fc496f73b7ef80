"""What a fingerprint comparison says: every differing setting, every changed file of the experiment's code, every
differing part of the data; one line for a fingerprint of another version."""
from src.experiment import FINGERPRINT_VERSION, fingerprint_differences


def _new(code=None, **settings):
    return {"version": FINGERPRINT_VERSION, "settings": {"img_size": 32, "experiment": "exp001", **settings},
            "code": code or {"exp/exp001/train.py": "aaaa"}, "data": {"tables": "t"}}


def test_fingerprints_of_one_version_compare_every_key():
    assert fingerprint_differences(_new(experiment="exp003"), _new()) == ["experiment='exp003' -> 'exp001'"]
    assert fingerprint_differences(_new(img_size=48), _new()) == ["img_size=48 -> 32"]
    assert fingerprint_differences(_new(), {**_new(), "data": {"tables": "u"}}) == \
        ["the tables differ (labels or metadata changed)"]


def test_the_code_of_an_experiment_is_compared_file_by_file():
    a = {"exp/exp003/train.py": "1111", "exp/exp001/train.py": "aaaa"}
    assert fingerprint_differences(_new(a), _new({**a, "exp/exp001/train.py": "bbbb"})) == \
        ["exp/exp001/train.py changed"]
    assert fingerprint_differences(_new(a), _new({"exp/exp003/train.py": "1111"})) == \
        ["exp/exp001/train.py no longer used"]
    assert fingerprint_differences(_new({"exp/exp003/train.py": "1111"}), _new(a)) == ["exp/exp001/train.py added"]


def test_a_fingerprint_of_another_version_is_one_line():
    earlier = {"settings": {"img_size": 48, "embed_norm": False}, "data": {"tables": "t"}}
    assert fingerprint_differences(earlier, _new()) == \
        [f"made by another version of the project (fingerprint version none, this one {FINGERPRINT_VERSION})"]
    assert fingerprint_differences({**_new(), "version": 2}, _new()) == \
        [f"made by another version of the project (fingerprint version 2, this one {FINGERPRINT_VERSION})"]
