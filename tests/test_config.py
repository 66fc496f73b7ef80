import json

import pytest

from src.config import (KEYS, SHARED, Config, ConfigError, config_from_dict, describe, experiment_module,
                        experiment_names, experiment_recipe, load_config)


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
    ("folds=7", "folds= is an argument of `bash run.sh EXP`, not a setting"),
    ("class_mult=FOO=2", "class_mult='FOO=2': unknown class 'FOO'"),
    ("epochs", "is not key=value"),
    ("epochs=-1", "epochs=-1: must be >= 0"),
    ("name=../elsewhere", "use a plain name"),
    ("name=/tmp/x", "use a plain name"),
    ("name=a..b", "'..' is not allowed"),
    ("meta_features=raw", "is not one of"),
    ("stage1_weight_decay=-1", "stage1_weight_decay=-1.0: must be >= 0"),
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
    cfg = load_config("exp001")
    with pytest.raises(ConfigError, match="expected an int"):
        cfg.replace(epochs=2.5)
    with pytest.raises(ConfigError, match="expected an int, got a bool"):
        cfg.replace(epochs=True)
    with pytest.raises(ConfigError, match="unknown config key 'epochs'"):   # a Config of no experiment: paths only
        Config().replace(epochs=2)


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
        (tmp_path / name / "train.py").write_text("from exp.exp001.train import *  # noqa\n")
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
    assert config_from_dict(data) == cfg
    assert data["experiment"] == "exp001" and data["stage1_weight_decay"] == cfg.stage1_weight_decay
    with pytest.raises(ConfigError, match="unknown config key 'embed_norm'"):
        config_from_dict({**data, "embed_norm": False})


def test_help_lists_every_key_by_the_part_that_reads_it():
    from src.config import experiment_keys

    text = describe(load_config("exp002"))
    for key in [*KEYS, *experiment_keys("exp002")]:
        assert f"  {key} " in text
    assert "folds=0,2" in text
    group = {}
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif line.startswith("  ") and "=" in line:
            group[line.split()[0]] = current
    assert (group["meta_hidden"], group["backbone"], group["stage1_weight_decay"], group["meta_features"]) == (
        "network", "network", "optimizer", "features")
    assert (group["label_smoothing"], group["mixup_alpha"], group["aug_color"], group["tta"], group["device"]) == (
        "loss", "mixing", "augmentation", "training", "speed")


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


def test_every_numbered_folder_is_a_config_and_a_script():
    from src.config import EXP_ROOT

    numbered = sorted(p.name for p in EXP_ROOT.iterdir() if p.is_dir() and p.name[-3:].isdigit())
    assert numbered and numbered == [n for n in experiment_names() if n[-3:].isdigit()]
    for name in numbered:
        assert (EXP_ROOT / name / "config.py").is_file() and (EXP_ROOT / name / "train.py").is_file(), name


@pytest.mark.parametrize("name", experiment_names())
def test_every_experiment_file_loads(name):
    cfg = load_config(name)
    assert cfg.name == name and cfg.experiment == name
    module = experiment_module(name)
    assert (module.__doc__ or "").strip(), f"exp/{name}/config.py has no docstring saying what it tests"
    recipe = experiment_recipe(name)
    assert callable(recipe.train_fold) and callable(recipe.prepare)


def test_the_demo_settings_apply_on_top_of_any_experiment():
    demo = experiment_module("demo").OVERRIDES
    for name in ("exp001", "exp002"):
        cfg = load_config(name, preset="demo")
        assert cfg.name == name and all(getattr(cfg, k) == v for k, v in demo.items())
    # what the demo does not set stays the experiment's own
    assert load_config("exp002", preset="demo").loss == load_config("exp002").loss == "ce"
    # keys of the demo's parent that another experiment does not have are skipped, not refused
    assert load_config("exp000", preset="demo").own == {"tabular_models": "lrx"}
    assert load_config("exp000", preset="demo").data_dir == demo["data_dir"]
    with pytest.raises(ConfigError, match="exp/demo is a preset"):
        load_config("demo")


@pytest.mark.parametrize("name", experiment_names())
def test_every_key_is_declared_once_with_its_help_range_and_effect(name):
    from src.config import experiment_keys

    assert sum(len(g) for g in SHARED.values()) == len(KEYS)   # no shared key in two groups
    assert set(SHARED) == {"data", "decision", "tracking"}     # what every kind of run reads
    for name, spec in {**KEYS, **experiment_keys(name)}.items():
        assert spec.help.strip() and isinstance(spec.results, bool), name
        if spec.type in ("int", "float"):
            assert spec.low is not None or spec.high is not None, f"{name}: no range"
        if spec.type == "str":
            assert spec.choices is not None or spec.text, f"{name}: neither choices nor free text"
    from src.config import key

    for bad in (lambda: key(1, "x", results=True), lambda: key("a", "x", results=True), lambda: key([1], "x", results=True)):
        with pytest.raises(TypeError):
            bad()


def test_every_shared_key_is_read_by_some_code():
    """A key nothing reads is dead weight every experiment carries."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = "\n".join(p.read_text() for d in ("src", "exp") for p in (root / d).rglob("*.py")
                     if p.name not in ("config.py", "settings.py") or p.parent.name != "src")
    unread = [k for k in KEYS if not re.search(rf"(cfg|self\.cfg|c|first|s\.cfg|base)\.{k}\b|\"{k}\"", code)]
    assert unread == []


@pytest.mark.parametrize("text, msg", [
    ("OVERRIDES = dict(img_size=64\n", r"config.py, line 1: '\(' was never closed"),
    ("PARENT = None\nOVERRIDES = dict(img_size=SIZE)\n", r"config.py, line 2: NameError: name 'SIZE' is not defined"),
    ("OVERRIDES = [('img_size', 64)]\n", r"config.py: OVERRIDES must be a dict"),
    ("PARENT = 1\n", r"config.py: PARENT must be an experiment name or None"),
])
def test_a_mistake_in_an_experiment_file_names_the_file_and_line(tmp_path, monkeypatch, text, msg):
    monkeypatch.setenv("MILK10K_EXP_PATH", str(tmp_path))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.py").write_text(text)
    (tmp_path / "broken" / "train.py").write_text("from exp.exp001.train import *  # noqa\n")
    with pytest.raises(ConfigError, match=msg):
        load_config("broken")


def test_a_mistake_in_an_experiment_script_names_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("MILK10K_EXP_PATH", str(tmp_path))
    (tmp_path / "broken2").mkdir()
    (tmp_path / "broken2" / "config.py").write_text("PARENT = None\n")
    (tmp_path / "broken2" / "train.py").write_text("import torch\n\nRECIPE = torch.nonexistent_part\n")
    with pytest.raises(ConfigError, match=r"broken2/train.py, line 3: AttributeError"):
        load_config("broken2")


def test_the_folds_to_run_are_an_argument_of_the_run_checked_before_anything(mini_data, tmp_path):
    from src.runner import run_experiment

    cfg = load_config("exp000", [f"data_dir={mini_data}", f"output_dir={tmp_path}", "wandb_mode=disabled"])
    for folds, msg in (("7", "fold 7 is outside 0..4"), ("a", "expected a comma list"), ("1,1", "listed twice")):
        with pytest.raises(ConfigError, match=msg):
            run_experiment(cfg, folds=folds)
    assert not (tmp_path / "exp000").exists()
