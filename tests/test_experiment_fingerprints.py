"""What a fingerprint comparison says: every differing setting, every changed file of the experiment's code, every
differing part of the data; one line for a fingerprint of another version."""
import pytest

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


def _another(name: str, spec, value):
    """A valid value of a key other than ``value``."""
    text = {"backbone": "resnet18", "class_mult": "MEL=2", "tabular_models": "logreg,mlp", "stack_inputs": "exp001",
            "pretrained_path": "/elsewhere/w.safetensors", "compile_mode": "reduce-overhead", "device": "cpu"}
    if name in text:
        assert text[name] != value
        return text[name]
    if spec.choices is not None:
        return next(c for c in spec.choices if c != value)
    if spec.type == "bool":
        return not value
    if spec.type == "str":
        return value + "_other"
    step = 1 if spec.type == "int" else 0.5 * (value or 0.1)
    new = value + step
    return new if spec.high is None or new < spec.high else value - step


def _cases():
    from src.config import experiment_keys, experiment_names
    from src.settings import KEYS

    for exp in experiment_names():
        for key, spec in {**KEYS, **experiment_keys(exp)}.items():
            if key not in ("name", "decision"):
                yield exp, key


@pytest.mark.parametrize("exp, key", list(_cases()))
def test_every_setting_declared_as_changing_results_is_in_the_fingerprint_and_no_other(exp, key):
    """Each key of each experiment changed on its own: a key declared ``results=True`` makes exactly one difference,
    naming it; any other key makes none."""
    from src.config import load_config
    from src.experiment import fingerprint

    cfg = load_config(exp)
    spec = cfg.declared()[key]
    other = cfg.replace(**{key: _another(key, spec, getattr(cfg, key))})
    diff = fingerprint_differences(fingerprint(cfg, {}), fingerprint(other, {}))
    if spec.results:
        assert len(diff) == 1 and diff[0].startswith(f"{key}=")
    else:
        assert diff == []
