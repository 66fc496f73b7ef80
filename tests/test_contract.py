"""The contract between an experiment and the library: an experiment's settings are exactly what its parts read, the
loss part brings its link from logits to probabilities, the fingerprint sees the experiment's code, one decision-rule
registry serves every step, a run given name= blends by that name, and an experiment may bring its own search space."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import src.config as config
from src.config import ConfigError, describe, experiment_keys, load_config
from src.data import CLASSES
from src.experiment import StaleOutputs
from src.runner import run_experiment
from src.submission import finalize

from .conftest import tiny

IMAGE_KEYS = {"img_size", "backbone", "pretrained", "batch_size", "epochs", "tta", "device", "aug_flip", "loss",
              "mixup_alpha", "lr", "cache_dir", "num_workers", "amp"}


def experiment_folder(root, name: str, config_py: str, train_py: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "config.py").write_text(config_py)
    (root / name / "train.py").write_text(train_py)


@pytest.fixture()
def exp_root(tmp_path, monkeypatch):
    """A folder of experiments outside the repo (MILK10K_EXP_PATH). Names are unique per test: an experiment's
    script is loaded once per process."""
    root = tmp_path / "experiments"
    root.mkdir()
    monkeypatch.setenv("MILK10K_EXP_PATH", str(root))
    return root


# ----------------------------------------------------------------------------------------------------
# an experiment's keys are what its parts read
# ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def reads(monkeypatch):
    """The experiment keys any code reads (``cfg.<key>`` of a key that is not shared), recorded."""
    seen: set[str] = set()
    real = config._ConfigMethods.__getattr__

    def recording(self, name):
        seen.add(name)
        return real(self, name)

    monkeypatch.setattr(config._ConfigMethods, "__getattr__", recording)
    return seen


@pytest.mark.parametrize("name, extra", [
    ("exp000", {}), ("exp001", {}), ("exp002", {"mix_off_epochs": 0}), ("exp003", {}),
    ("stack001", {"stack_inputs": "exp000"}),
])
def test_every_key_an_experiment_lists_is_read_by_its_parts(name, extra, mini_data, tmp_path, reads):
    """Train one fold of every experiment (both stages) and record which of its keys the code reads: every key its
    --help lists beyond the shared ones is read, and a metadata-only experiment lists no image key."""
    out = tmp_path / "out"
    if name == "stack001":
        run_experiment(load_config("exp000", tiny_for("exp000", mini_data, out, n_folds=2)))
    cfg = load_config(name, tiny_for(name, mini_data, out, n_folds=2, stage1_epochs=1, epochs=1, **extra))
    reads.clear()
    run_experiment(cfg, folds="0")
    listed = set(experiment_keys(name))
    assert listed - reads == set()
    text = describe(cfg)
    assert all(f"  {k} " in text for k in listed)
    if name in ("exp000", "stack001"):
        assert listed & IMAGE_KEYS == set() and not any(f"  {k} " in text for k in IMAGE_KEYS)
        assert listed == ({"tabular_models"} if name == "exp000" else {"tabular_models", "stack_inputs"})


def tiny_for(name, mini_data, out, **extra) -> list[str]:
    """``tiny`` settings, only those experiment ``name`` has."""
    known = load_config(name).declared()
    return [a for a in tiny(mini_data, out, **extra) if a.split("=", 1)[0] in known]


def test_shared_keys_are_what_every_kind_reads():
    from src.settings import KEYS

    assert set(KEYS) == {"name", "data_dir", "output_dir", "submission_dir", "folds_csv", "n_folds", "fold_seed",
                         "seed", "decision", "wandb_project", "wandb_mode", "wandb_checkpoints"}
    assert len(experiment_keys("exp000")) == 1 and len(experiment_keys("exp001")) == 47


# ----------------------------------------------------------------------------------------------------
# the loss part brings its link
# ----------------------------------------------------------------------------------------------------
SOFTMAX_LOSS = '''"""{name}: exp001 with a softmax focal loss of its own."""
from dataclasses import replace

import torch
import torch.nn.functional as F

from exp.exp001.train import RECIPE as PARENT
from src.config import key
from src.loss import Loss


class Focal(Loss):
    keys = {{"focal_gamma": key(2.0, "focusing parameter", results=True, low=0)}}

    def criterion(self, cfg, y_train):
        gamma = cfg.focal_gamma

        def f(logits, y):
            logp = F.log_softmax(logits, dim=1)
            return -(y * (1 - logp.exp()) ** gamma * logp).sum(1).mean()
        return f

    def link(self, cfg):
        return lambda logits: torch.softmax(logits, dim=1)


RECIPE = replace(PARENT, loss=Focal())
'''


def test_a_softmax_loss_predicts_with_softmax_and_drops_the_replaced_keys(exp_root, mini_data, tmp_path):
    from src.deliver.predict import predict_batch, resolve_source

    name = "focal_t1"
    experiment_folder(exp_root, name, f'"""{name}"""\nPARENT = "exp001"\nOVERRIDES = dict(focal_gamma=1.5)\n',
                      SOFTMAX_LOSS.format(name=name))
    keys = experiment_keys(name)
    assert "focal_gamma" in keys and not {"loss", "pos_weight_power", "class_mult", "label_smoothing",
                                          "aux_weight"} & set(keys)
    with pytest.raises(ConfigError, match="unknown config key 'pos_weight_power'"):
        load_config(name, ["pos_weight_power=1"])
    out = tmp_path / "out"
    cfg = load_config(name, tiny(mini_data, out, n_folds=2, epochs=1))
    assert cfg.focal_gamma == 1.5
    run_experiment(cfg)
    for file in ("oof.csv", "test.csv"):                   # 8 TTA views, each through the softmax, averaged
        probs = pd.read_csv(cfg.exp_dir() / file)[CLASSES].to_numpy()
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    history = pd.read_csv(cfg.fold_dir(0) / "history.csv")
    assert np.isfinite(history["val_loss"]).all()
    finalize(cfg, [cfg])
    source = resolve_source(name, {"output_dir": str(out), "submission_dir": str(out / "subs")})
    lesions = pd.read_csv(mini_data / "MILK10k_Test_Metadata.csv").drop_duplicates("lesion_id")
    from src.data import load_test

    result = predict_batch(source, load_test(mini_data), 1)
    np.testing.assert_allclose(result["blended"].sum(1), 1.0, atol=1e-5)
    assert len(result["blended"]) == len(lesions)


def test_a_parents_value_for_a_replaced_key_is_skipped_and_a_misspelt_one_is_refused(exp_root):
    values = "from exp.exp001.train import *  # noqa: F401,F403\n"
    experiment_folder(exp_root, "pw_parent", 'PARENT = "exp001"\nOVERRIDES = dict(pos_weight_power=2.0, lr=0.002)\n',
                      values)
    experiment_folder(exp_root, "pw_child", 'PARENT = "pw_parent"\nOVERRIDES = dict(focal_gamma=1.5)\n',
                      SOFTMAX_LOSS.format(name="pw_child"))
    cfg = load_config("pw_child")                 # the parent's loss key is not the child's: skipped
    assert (cfg.lr, cfg.focal_gamma) == (0.002, 1.5) and "pos_weight_power" not in experiment_keys("pw_child")
    experiment_folder(exp_root, "typo_parent", 'PARENT = "exp001"\nOVERRIDES = dict(pos_weigth_power=2.0)\n', values)
    experiment_folder(exp_root, "typo_child", 'PARENT = "typo_parent"\nOVERRIDES = dict(focal_gamma=1.5)\n',
                      SOFTMAX_LOSS.format(name="typo_child"))
    for name in ("typo_parent", "typo_child"):    # a key nobody in the chain has is a mistake, wherever it is
        with pytest.raises(ConfigError, match=r"exp/typo_parent/config.py.*pos_weigth_power|"
                                              r"pos_weigth_power.*exp/typo_parent/config.py"):
            load_config(name)


def test_keys_an_experiments_own_code_declares_are_its_keys(exp_root):
    from src.experiment import result_settings

    own = ('from exp.exp001.train import *  # noqa: F401,F403\nfrom src.config import key\n\n'
           'KEYS = {"warm_restarts": key(2, "restarts of the stage-2 schedule", results=True, low=0),\n'
           '        "log_every": key(10, "steps between two log lines", results=False, low=1)}\n')
    experiment_folder(exp_root, "own_keys", 'PARENT = "exp001"\nOVERRIDES = dict(warm_restarts=5)\n', own)
    assert {"warm_restarts", "log_every"} <= set(experiment_keys("own_keys"))
    cfg = load_config("own_keys", ["log_every=3"])
    assert (cfg.warm_restarts, cfg.log_every) == (5, 3)
    text = describe(cfg)
    assert "own_keys's own (exp/own_keys/train.py)" in text and "warm_restarts" in text and "log_every" in text
    settings = result_settings(cfg)
    assert settings["warm_restarts"] == 5 and "log_every" not in settings
    assert "warm_restarts" not in experiment_keys("exp001")


def test_the_library_loss_links_by_its_kind():
    import torch

    from src.loss import WeightedLoss

    logits = torch.tensor([[0.0, np.log(3.0)]])
    bce, ce = load_config("exp001"), load_config("exp001", ["loss=ce"])
    np.testing.assert_allclose(WeightedLoss().link(bce)(logits).numpy(), [[0.5, 0.75]], rtol=1e-6)
    np.testing.assert_allclose(WeightedLoss().link(ce)(logits).numpy(), [[0.25, 0.75]], rtol=1e-6)


def test_the_auxiliary_term_is_the_loss_parts():
    """The objective adds aux_weight x the cross-entropy of the auxiliary output over the lesions whose fine label is
    known (-100: unknown), computed here by hand."""
    import torch

    from src.loss import WeightedLoss

    cfg = load_config("exp001", ["aux_weight=0.5", "pos_weight_power=0"])
    y = np.eye(11)[[0, 1, 2, 3]].astype(np.float32)
    objective = WeightedLoss().objective(cfg, y)
    logits, aux_logits = torch.zeros(2, 11), torch.tensor([[np.log(3.0), 0.0], [0.0, 0.0]])
    aux = torch.tensor([0, -100])
    main = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(y[:2])))
    expected = main + 0.5 * -np.log(3 / 4)                        # only the first lesion's fine label is known
    assert float(objective(logits, torch.tensor(y[:2]), aux_logits, aux)) == pytest.approx(expected, rel=1e-6)
    assert float(objective(logits, torch.tensor(y[:2]))) == pytest.approx(main, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# the fingerprint sees the experiment's code
# ----------------------------------------------------------------------------------------------------
def test_editing_an_experiments_code_after_a_fold_refuses_the_next_fold_by_file(exp_root, mini_data, tmp_path):
    """A child whose train.py imports its parent's: fold 0 trained, then a comment added to the PARENT's train.py;
    fold 1 is refused naming that file, and retrain=true retrains fold 0 under the new code."""
    experiment_folder(exp_root, "codebase_t1", '"""base"""\nPARENT = "exp001"\n',
                      "from exp.exp001.train import *  # noqa: F401,F403\n")
    experiment_folder(exp_root, "codechild_t1", '"""child"""\nPARENT = "codebase_t1"\n',
                      "from exp.codebase_t1.train import *  # noqa: F401,F403\n")
    assert config.experiment_code("codechild_t1") == {
        "experiments/codebase_t1/train.py": config.experiment_code("codebase_t1")["experiments/codebase_t1/train.py"],
        "experiments/codechild_t1/train.py": config.experiment_code("codechild_t1")["experiments/codechild_t1/train.py"],
        "exp/exp001/train.py": config.experiment_code("exp001")["exp/exp001/train.py"]}
    cfg = load_config("codechild_t1", tiny(mini_data, tmp_path / "out", n_folds=2, epochs=1))
    run_experiment(cfg, folds="0")
    saved = json.loads((cfg.fold_dir(0) / "fingerprint.json").read_text())
    assert set(saved["code"]) == {"experiments/codebase_t1/train.py", "experiments/codechild_t1/train.py",
                                  "exp/exp001/train.py"}
    parent = exp_root / "codebase_t1" / "train.py"
    parent.write_text(parent.read_text() + "# a comment is a change\n")
    with pytest.raises(StaleOutputs, match=r"fold 0 \(complete\): experiments/codebase_t1/train.py changed"):
        run_experiment(cfg, folds="1")
    assert not (cfg.fold_dir(1) / "metrics.json").exists()
    result = run_experiment(cfg, retrain=True)
    assert result["complete"]
    assert json.loads((cfg.fold_dir(0) / "fingerprint.json").read_text())["code"] == config.experiment_code(
        "codechild_t1")


def test_the_code_of_an_experiment_follows_its_imports_through_the_tree():
    code = config.experiment_code("exp002")
    assert list(code) == ["exp/exp001/train.py", "exp/exp002/train.py"]
    assert config.experiment_code("exp000") == {"exp/exp000/train.py": code_digest("exp/exp000/train.py")}


def code_digest(rel: str) -> str:
    import hashlib

    return hashlib.sha256((config.REPO_ROOT / rel).read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# one decision-rule registry
# ----------------------------------------------------------------------------------------------------
def test_a_new_rule_in_the_registry_is_chosen_submitted_predicted_and_described(mini_data, tmp_path, monkeypatch):
    """A label-free rule registered in one place (decision.RULES): accepted by the settings, scored honestly by the
    run, carried by the submission with its own thresholds, reproduced by predict and described by the card."""
    from src import decision
    from src.cli import main as cli
    from src.deliver.predict import batch_thresholds, resolve_source

    rule = decision.Rule("q90", False, lambda y, p, batch: np.quantile(batch, 0.9, axis=0), "f1_q90_honest", "q90",
                         "each held-out fold cut at its own 90th percentile", 3, "each class cut at the batch's 90th "
                         "percentile")
    monkeypatch.setitem(decision.RULES, "q90", rule)
    out = tmp_path / "out"
    cfg = load_config("exp000", [f"data_dir={mini_data}", f"output_dir={out}", f"submission_dir={out}/subs",
                                 "n_folds=2", "wandb_mode=disabled", "decision=q90"])
    result = run_experiment(cfg)
    assert "macro_f1_q90_honest" in result and result["decision"] == "q90"
    summary = finalize(cfg, [cfg])
    sidecar = json.loads((out / "subs" / "exp000.json").read_text())
    test = pd.read_csv(out / "exp000" / "test.csv")[CLASSES].to_numpy()
    assert sidecar["decision"] == "q90" and sidecar["thresholds_from"] == "the submitted batch"
    assert sidecar["score_meanings"]["f1_q90_honest"] == "each held-out fold cut at its own 90th percentile"
    stored = np.array([sidecar["thresholds"][c] for c in CLASSES])
    np.testing.assert_allclose(stored, np.quantile(test, 0.9, axis=0))
    assert summary["scores"]["blend"]["f1_q90_honest"] == pytest.approx(result["macro_f1_q90_honest"])
    where = [f"output_dir={out}", f"submission_dir={out}/subs"]
    assert cli(["predict", "exp000", "--data", str(mini_data), *where, "--out", str(tmp_path / "p.csv")]) == 0
    np.testing.assert_allclose(pd.read_csv(tmp_path / "p.csv")[CLASSES].to_numpy(),
                               pd.read_csv(out / "subs" / "exp000.csv")[CLASSES].to_numpy(), atol=1e-12)
    few = test[:5]                                      # another batch: the rule's own cut, or the stored one
    source = resolve_source("exp000", {"output_dir": str(out), "submission_dir": str(out / "subs")})
    np.testing.assert_allclose(batch_thresholds(source, few)[0], np.quantile(few, 0.9, axis=0))
    np.testing.assert_allclose(batch_thresholds(source, few, "stored")[0], stored)
    assert cli(["export", "exp000", *where, "--out", str(tmp_path / "bundle")]) == 0
    card = (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    assert "Rule **q90**: each class cut at the batch's 90th percentile" in card


# ----------------------------------------------------------------------------------------------------
# a run given name= is a source like an experiment
# ----------------------------------------------------------------------------------------------------
def test_a_run_given_a_name_blends_and_predicts_by_that_name(mini_data, tmp_path):
    from src.cli import main as cli

    out = tmp_path / "out"
    where = [f"data_dir={mini_data}", f"output_dir={out}", f"submission_dir={out}/subs", "wandb_mode=disabled"]
    run_experiment(load_config("exp000", [*where, "n_folds=2"]))
    assert cli(["run", "exp000", *where, "n_folds=2", "name=exp000_logreg", "tabular_models=logreg"]) == 0
    assert cli(["blend", "exp000", "exp000_logreg", "--name", "both", *where, "n_folds=2"]) == 0
    sidecar = json.loads((out / "subs" / "both.json").read_text())
    assert sidecar["experiments"] == ["exp000", "exp000_logreg"]
    assert cli(["predict", "exp000_logreg", "--data", str(mini_data), *where[1:3], "--out",
                str(tmp_path / "p.csv")]) == 0
    np.testing.assert_allclose(pd.read_csv(tmp_path / "p.csv")[CLASSES].to_numpy(),
                               pd.read_csv(out / "subs" / "exp000_logreg.csv")[CLASSES].to_numpy(), atol=1e-12)
    assert cli(["blend", "exp000", "no_such_run", *where]) == 2


# ----------------------------------------------------------------------------------------------------
# an experiment's own search space
# ----------------------------------------------------------------------------------------------------
def test_tune_uses_an_experiments_own_search_space_and_writes_its_values(exp_root, mini_data, tmp_path):
    from src.tune import TuneArgs, run_tune, write_best

    name = "focal_t2"
    search = ('\n\ndef search(trial):\n    return {"focal_gamma": trial.suggest_float("focal_gamma", 0.5, 3.0), '
              '"lr": trial.suggest_float("lr", 1e-3, 2e-3)}\n')
    experiment_folder(exp_root, name, f'"""{name}"""\nPARENT = "exp001"\n', SOFTMAX_LOSS.format(name=name) + search)
    cfg = load_config(name, tiny(mini_data, tmp_path / "out", stage1_epochs=0, tta="false"))
    study = run_tune(cfg, TuneArgs(trials=1, folds="0,1", epochs=1))
    best = study.best_trial
    assert set(best.params) == {"focal_gamma", "lr"} and 0.5 <= best.params["focal_gamma"] <= 3.0
    write_best(cfg, study, f"{name}_tuned", TuneArgs(trials=1, folds="0,1", epochs=1))
    assert (exp_root / f"{name}_tuned" / "config.py").is_file()                # beside its parent
    tuned = load_config(f"{name}_tuned")
    assert tuned.focal_gamma == best.params["focal_gamma"] and tuned.lr == best.params["lr"]


def test_tune_without_an_own_search_refuses_an_experiment_lacking_the_librarys_keys(exp_root, mini_data, tmp_path):
    from src.tune import TuneArgs, run_tune

    name = "focal_t3"
    experiment_folder(exp_root, name, f'"""{name}"""\nPARENT = "exp001"\n', SOFTMAX_LOSS.format(name=name))
    cfg = load_config(name, tiny(mini_data, tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"sets \['pos_weight_power', 'class_mult'\].*declare its own search"):
        run_tune(cfg, TuneArgs(trials=1, folds="0,1", epochs=1))
    assert not (tmp_path / "out").exists()
