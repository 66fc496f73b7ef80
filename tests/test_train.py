"""Training: resumable after SIGKILL with identical results, W&B offline logging, the model, the weights."""
import glob
import signal
import time

import numpy as np
import pandas as pd
import pytest
import torch

from src.config import experiment_recipe, load_config
from src.data import CLASSES
from src.model import WeightsUnavailable, count_parameters, create_backbone
from src.tracking import read_offline_run
from src.train import read_checkpoint

from .conftest import run_cli as _run_cli, tiny


def run_cli(args, **kw):
    return _run_cli("run", "exp001", *args, **kw)


@pytest.mark.slow
def test_sigkill_mid_fold_then_resume_gives_identical_oof(mini_data, tmp_path):
    epochs = 8
    ref = run_cli(tiny(mini_data, tmp_path / "a", epochs=epochs, folds=0))
    out_a, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out_a

    args = tiny(mini_data, tmp_path / "b", epochs=epochs, folds=0)
    proc = run_cli(args)
    ckpt = tmp_path / "b" / "exp001" / "fold0" / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert ckpt.exists(), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    fold_b = tmp_path / "b" / "exp001" / "fold0"
    assert not (fold_b / "metrics.json").exists(), "the run finished before it could be killed"
    saved = read_checkpoint(ckpt)["state"]["epoch"]
    assert saved < 1 + epochs - 1

    resumed = run_cli(args)
    out_b, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out_b
    assert "resuming after epoch" in out_b
    oof_a = pd.read_csv(tmp_path / "a" / "exp001" / "fold0" / "oof.csv")
    oof_b = pd.read_csv(fold_b / "oof.csv")
    pd.testing.assert_frame_equal(oof_a, oof_b, check_exact=False, rtol=0, atol=1e-6)
    hist_a = pd.read_csv(tmp_path / "a" / "exp001" / "fold0" / "history.csv")
    hist_b = pd.read_csv(fold_b / "history.csv")
    np.testing.assert_allclose(hist_a["val_macro_f1"], hist_b["val_macro_f1"], atol=1e-9)
    assert len(hist_b) == 1 + epochs

    # a complete fold is skipped on the next run
    again = run_cli(args)
    out_c, _ = again.communicate(timeout=600)
    assert "folds to train" not in out_c


@pytest.mark.slow
def test_wandb_offline_run_folder_holds_the_metrics(mini_data, tmp_path, monkeypatch):
    from src.batches import prepare
    from src.train import train_fold

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # where offline artifacts are staged
    assert load_config("exp001", []).wandb_checkpoints is False        # checkpoints are logged only when asked
    cfg = load_config("exp001", tiny(mini_data, tmp_path, wandb_mode="offline", epochs=2, wandb_checkpoints=True))
    metrics = train_fold(experiment_recipe(cfg.experiment), cfg, 1, prepare(cfg))
    files = glob.glob(str(cfg.exp_dir() / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    deadline = time.time() + 30  # wandb-core may still be flushing the log file after finish() returns
    while True:
        run = read_offline_run(files[0])
        if "fold/best_epoch" in run["summary"] or time.time() > deadline:
            break
        time.sleep(0.2)
    assert run["group"] == "exp001@generated" and run["name"] == "exp001@generated/fold1"  # the demo's data
    assert run["job_type"] == "train" and set(run["tags"]) == {"data:generated", "kind:image"}
    f1s = [row["val/macro_f1"] for row in run["history"] if "val/macro_f1" in row]
    assert len(f1s) == 3
    hist = pd.read_csv(cfg.fold_dir(1) / "history.csv")
    np.testing.assert_allclose(f1s, hist["val_macro_f1"], atol=1e-9)
    assert any("val/f1/MAL_OTH" in row for row in run["history"])
    assert run["summary"]["val/macro_f1"] == pytest.approx(metrics["macro_f1"])   # the best epoch's, with TTA
    assert run["summary"]["val/f1/MAL_OTH"] == pytest.approx(metrics["f1"]["MAL_OTH"])
    model, = run["artifacts"]
    assert (model["name"], model["type"], model["files"]) == ("exp001-generated-fold1-model", "model", ["best.pt"])


def test_wandb_failure_never_stops_training(mini_data, tmp_path, monkeypatch):
    import wandb

    from src.batches import prepare
    from src.train import train_fold

    def broken(*a, **k):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken)
    cfg = load_config("exp001", tiny(mini_data, tmp_path, wandb_mode="online", epochs=1))
    metrics = train_fold(experiment_recipe(cfg.experiment), cfg, 0, prepare(cfg))
    assert (cfg.fold_dir(0) / "metrics.json").is_file() and 0 <= metrics["macro_f1"] <= 1


def test_fold_outputs_follow_the_submission_format(mini_data, tmp_path):
    from src.data import load_test
    from src.batches import prepare
    from src.train import train_fold

    cfg = load_config("exp001", tiny(mini_data, tmp_path, epochs=1, tta="true"))
    data = prepare(cfg)
    m = train_fold(experiment_recipe(cfg.experiment), cfg, 2, data)
    oof = pd.read_csv(cfg.fold_dir(2) / "oof.csv")
    test = pd.read_csv(cfg.fold_dir(2) / "test.csv")
    assert list(oof.columns) == ["lesion_id", *CLASSES] == list(test.columns)
    assert set(oof.lesion_id) == set(data.train.lesion_id[data.folds == 2])
    assert list(test.lesion_id) == list(load_test(cfg.data_dir, check_images=False).lesion_id)
    assert ((oof[CLASSES] >= 0) & (oof[CLASSES] <= 1)).all().all()
    for key in ("macro_f1", "f1", "auc", "accuracy", "loss", "epochs_run", "wall_time_s"):
        assert key in m
    assert m["tta_views"] == 8 and m["epochs_run"] == 2
    for name in ("best.pt", "features.json", "config.json", "history.csv"):
        assert (cfg.fold_dir(2) / name).is_file()
    blind = pd.read_csv(cfg.fold_dir(2) / "oof_nomonet.csv")      # the same lesions, every MONET score removed
    assert blind.lesion_id.tolist() == oof.lesion_id.tolist() and 0 <= m["macro_f1_without_monet"] <= 1
    assert not np.allclose(blind[CLASSES].to_numpy(), oof[CLASSES].to_numpy())


def test_exp001_model_has_the_reference_size():
    network = experiment_recipe("exp001").network
    model = network(load_config("exp001", ["backbone=tf_efficientnetv2_s", "pretrained=false"]), 30, 0)
    counts = count_parameters(model)
    assert 40.2e6 < counts["total"] < 40.5e6
    assert counts["head"] == (2 * 1280 + 30) * 11 + 11
    shared = count_parameters(network(load_config("exp001", ["backbone=tf_efficientnetv2_s", "pretrained=false",
                                                             "shared_backbone=true"]), 30, 0))
    assert shared["backbones"] * 2 == counts["backbones"]


def test_forward_shapes_with_meta_mlp_and_aux():
    cfg = load_config("exp002", ["backbone=test_efficientnet", "pretrained=false", "meta_hidden=16"])
    model = experiment_recipe("exp002").network(cfg, 7, 5)  # exp002's network: the metadata through an MLP
    assert model.head.meta[0].out_features == 16
    x = torch.randn(3, 3, 32, 32)
    logits, aux = model(x, x, torch.randn(3, 7))
    assert logits.shape == (3, 11) and aux.shape == (3, 5)


def test_local_weights_file_and_clear_error_offline(tmp_path, monkeypatch):
    ref = create_backbone("test_efficientnet", pretrained=False)
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    loaded = create_backbone("test_efficientnet", pretrained=True, pretrained_path=str(path))
    for a, b in zip(ref.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    monkeypatch.setenv("MILK10K_WEIGHTS", str(path))
    assert create_backbone("test_efficientnet", pretrained=True) is not None
    monkeypatch.delenv("MILK10K_WEIGHTS")
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        create_backbone("test_efficientnet", pretrained=True, pretrained_path=str(tmp_path / "nope.pth"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="pretrained_path="):
        create_backbone("test_efficientnet", pretrained=True)


def test_wandb_mode_offline_by_default_online_when_logged_in(tmp_path, monkeypatch):
    from src.tracking import resolve_mode

    cfg = load_config("exp001")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode(cfg) == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    (tmp_path / "netrc").chmod(0o600)
    assert resolve_mode(cfg) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(cfg) == "disabled"
    assert resolve_mode(cfg.replace(wandb_mode="offline")) == "offline"


def test_exp002_switches_train_together(mini_data, tmp_path):
    """CE + label smoothing, balanced sampling, mixup/cutmix with the off-switch, EMA, meta MLP, aux head."""
    from src.batches import prepare
    from src.train import train_fold

    args = tiny(mini_data, tmp_path, epochs=3, mix_off_epochs=1, tta="false")
    cfg = load_config("exp002", args)
    assert (cfg.loss, cfg.aux_weight > 0, cfg.ema_decay > 0, cfg.sampler_power > 0) == ("ce", True, True, True)
    m = train_fold(experiment_recipe(cfg.experiment), cfg, 0, prepare(cfg))
    oof = pd.read_csv(cfg.fold_dir(0) / "oof.csv")
    np.testing.assert_allclose(oof[CLASSES].sum(1), 1.0, atol=1e-5)  # softmax probabilities
    hist = pd.read_csv(cfg.fold_dir(0) / "history.csv")
    assert len(hist) == 4 and np.isfinite(hist.train_loss).all()
    assert m["epochs_run"] == 4 and 0 <= m["macro_f1"] <= 1
    vocab = __import__("json").loads((cfg.fold_dir(0) / "aux_vocab.json").read_text())
    assert len(vocab) > 3
    weights = read_checkpoint(cfg.fold_dir(0) / "best.pt")["model"]  # the meta MLP and the aux head were trained
    assert any(k.startswith("head.meta.") for k in weights) and weights["head.aux.weight"].shape[0] == len(vocab)


@pytest.mark.slow
def test_exp002_with_fused_backbones_and_the_cache_in_memory_gives_the_same_fold(mini_data, tmp_path):
    """The speed switches change no result: EMA, aux head, mixing and the meta MLP over a fused pair of backbones
    fed from the in-memory cache give the plain run's predictions."""
    from src.batches import prepare
    from src.train import train_fold

    oof = []
    for extra in ({}, {"fuse_backbones": "true", "cache_on_device": "yes"}):
        cfg = load_config("exp002", tiny(mini_data, tmp_path / str(len(extra)), epochs=2, mix_off_epochs=1,
                                         tta="false", **extra))
        train_fold(experiment_recipe(cfg.experiment), cfg, 0, prepare(cfg))
        oof.append(pd.read_csv(cfg.fold_dir(0) / "oof.csv"))
    pd.testing.assert_frame_equal(oof[0], oof[1], check_exact=False, rtol=0, atol=1e-4)
