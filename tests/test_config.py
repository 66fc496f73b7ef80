import json

import pytest

from src.config import Config, ConfigError, describe, experiment_module, experiment_names, load_config


def test_exp001_resolves_reference_recipe():
    cfg = load_config("exp001")
    assert cfg.name == "exp001"
    assert cfg.backbone.startswith("tf_efficientnetv2_s")
    assert (cfg.img_size, cfg.loss, cfg.n_folds) == (256, "bce", 5)


def test_cli_overrides_are_typed():
    cfg = load_config("exp001", ["data_dir=/data/milk10k", "epochs=1", "lr=0.01", "tta=false"])
    assert cfg.data_dir == "/data/milk10k" and cfg.epochs == 1 and cfg.lr == 0.01 and cfg.tta is False


@pytest.mark.parametrize("arg, msg", [
    ("epoch=3", "unknown config key 'epoch' (did you mean 'epochs'?)"),
    ("epochs=three", "expected an int"),
    ("lr=fast", "expected a float"),
    ("tta=maybe", "expected a bool"),
    ("loss=focal", "is not one of"),
    ("folds=7", "outside 0..4"),
    ("class_mult=FOO=2", "unknown class 'FOO'"),
    ("epochs", "is not key=value"),
    ("epochs=-1", "epochs=-1: must be >= 0"),
    ("folds=a", "folds='a': expected a comma list of fold numbers"),
    ("folds=1,1", "a fold is listed twice"),
    ("tune_folds=0,9", "tune_folds='0,9': fold 9 is outside"),
    ("eval_batch_size=0", "eval_batch_size=0: must be >= 1"),
    ("device=tpu", "device='tpu': use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    ("lr=-1", "lr=-1.0: must be > 0"),
    ("lr=0", "lr=0.0: must be > 0"),
    ("lr=nan", "must be a finite number"),
    ("backbone_lr=inf", "must be a finite number"),
    ("ema_decay=1", "ema_decay=1.0: must be >= 0 and < 1"),
    ("patience=0", "patience=0: must be >= 1"),
    ("num_workers=-2", "num_workers=-2: must be >= -1"),
])
def test_bad_overrides_are_refused(arg, msg):
    with pytest.raises(ConfigError, match="command line") as err:
        load_config("exp001", [arg])
    assert msg in str(err.value)


def test_settings_that_train_nothing_are_refused():
    with pytest.raises(ConfigError, match="stage1_epochs=0 and epochs=0 train nothing"):
        load_config("exp001", ["stage1_epochs=0", "epochs=0"])
    assert load_config("exp001", ["stage1_epochs=0", "epochs=1"]).epochs == 1
    assert load_config("exp001", ["stage1_epochs=3", "epochs=0"]).stage1_epochs == 3


def test_python_values_of_wrong_type_are_refused():
    with pytest.raises(ConfigError, match="expected an int"):
        Config().replace(epochs=2.5)
    with pytest.raises(ConfigError, match="expected an int, got a bool"):
        Config().replace(epochs=True)


def test_unknown_experiment_lists_known_ones():
    with pytest.raises(ConfigError, match="exp001"):
        load_config("exp999")


def test_child_experiment_inherits_and_overrides(tmp_path, monkeypatch):
    import src.config as config

    for name, text in {"base1": "PARENT = None\nOVERRIDES = dict(img_size=128, lr=0.5)\n",
                       "child1": '"""doc"""\nPARENT = "base1"\nOVERRIDES = dict(img_size=384)\n',
                       "loop1": 'PARENT = "loop2"\n', "loop2": 'PARENT = "loop1"\n',
                       "badkey": "OVERRIDES = dict(imgsize=3)\n"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.py").write_text(text)
    monkeypatch.setattr(config, "EXP_ROOT", tmp_path)
    cfg = load_config("child1")
    assert (cfg.img_size, cfg.lr, cfg.name) == (384, 0.5, "child1")
    with pytest.raises(ConfigError, match="cycle"):
        load_config("loop1")
    with pytest.raises(ConfigError, match=r"exp/badkey/config.py: unknown config key 'imgsize'"):
        load_config("badkey")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("exp001", ["epochs=3"])
    cfg.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert Config(**data) == cfg


def test_help_lists_every_key():
    text = describe(load_config("exp001"))
    for key in ("data_dir", "pos_weight_power", "backbone", "tta", "decision"):
        assert f"  {key} " in text


def test_written_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from src.io_utils import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("name", experiment_names())
def test_every_experiment_file_loads(name):
    cfg = load_config(name)
    assert cfg.name == name
    module = experiment_module(name)
    assert (module.__doc__ or "").strip(), f"exp/{name}/config.py has no docstring saying what it tests"


def test_the_demo_settings_apply_on_top_of_any_experiment():
    demo = experiment_module("demo").OVERRIDES
    for name in ("exp001", "exp002"):
        cfg = load_config(name, preset="demo")
        assert cfg.name == name and all(getattr(cfg, k) == v for k, v in demo.items())
    # what the demo does not set stays the experiment's own
    assert load_config("exp002", preset="demo").loss == load_config("exp002").loss == "ce"
    assert load_config("demo").to_dict() == {**load_config("exp001", preset="demo").to_dict(), "name": "demo"}
