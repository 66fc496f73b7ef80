"""cache_on_device: batches gathered from the image cache in device memory are the loader's batches."""
import numpy as np
import pandas as pd
import pytest
import torch

from src.config import ConfigError, experiment_recipe, load_config
from src.batches import EpochSampler, PairDataset, epoch_order
from src.speed.device_cache import DeviceBatches, cache_to_device, resolve_cache_on_device

from .conftest import tiny


def _fixture(n=37, size=4, seed=0):
    rng = np.random.default_rng(seed)
    cache = rng.integers(0, 256, (n + 5, 2, size, size, 3), dtype=np.uint8)
    rows = rng.permutation(n + 5)[:n]
    meta = rng.normal(size=(n, 6)).astype(np.float32)
    y = (rng.random((n, 11)) < 0.2).astype(np.float32)
    aux = rng.integers(-100, 4, n).astype(np.int64)
    return cache, rows, meta, y, aux


@pytest.mark.parametrize("world", [1, 2])
def test_device_batches_equal_the_loader_batches(world):
    cache, rows, meta, y, aux = _fixture()
    cfg = load_config("exp001", ["sampler_power=0.5"])
    targets = y.argmax(1)
    images = cache_to_device(cache, torch.device("cpu"), chunk=4)
    assert torch.equal(images, torch.from_numpy(cache))
    for rank in range(world):
        sampler = EpochSampler(len(rows), rank, world)
        loader = torch.utils.data.DataLoader(PairDataset(cache, rows, meta, y, aux), batch_size=8 // world,
                                             sampler=sampler, drop_last=False)
        dev = DeviceBatches(images, rows, meta, y, aux, 8 // world, rank, world)
        for epoch in range(2):
            order = epoch_order(cfg, len(rows), targets, 0, epoch, 8)
            sampler.set_order(order), dev.set_order(order)
            want, got = list(loader), list(dev)
            assert len(want) == len(got) == len(dev) == len(loader)
            for w, g in zip(want, got):
                for a, b in zip(w, g):
                    assert a.dtype == b.dtype and torch.equal(a, b)


def test_auto_keeps_the_cache_on_the_host_without_cuda():
    cpu = torch.device("cpu")
    assert resolve_cache_on_device(load_config("exp001").cache_on_device, cpu, 10) is False
    assert resolve_cache_on_device(load_config("exp001", ["cache_on_device=yes"]).cache_on_device, cpu, 10) is True
    assert resolve_cache_on_device(load_config("exp001", ["cache_on_device=no"]).cache_on_device, cpu, 10) is False
    with pytest.raises(ConfigError, match="cache_on_device"):
        load_config("exp001", ["cache_on_device=maybe"])


@pytest.mark.slow
def test_a_fold_trained_from_device_memory_equals_the_loader_fold(mini_data, tmp_path, capsys):
    from src.batches import prepare
    from src.train import train_fold

    out = {}
    for mode in ("no", "yes"):
        cfg = load_config("exp001", tiny(mini_data, tmp_path / mode, epochs=2, cache_on_device=mode,
                                         sampler_power=0.5, mixup_alpha=0.4))
        data = prepare(cfg)
        train_fold(experiment_recipe(cfg.experiment), cfg, 0, data)
        assert bool(data._on_device) == (mode == "yes")
        out[mode] = {f: pd.read_csv(cfg.fold_dir(0) / f) for f in ("oof.csv", "test.csv", "history.csv")}
    assert "image cache held in cpu memory" in capsys.readouterr().out
    for f in ("oof.csv", "test.csv"):
        pd.testing.assert_frame_equal(out["no"][f], out["yes"][f], check_exact=False, rtol=0, atol=1e-6)
    cols = ["train_loss", "val_loss", "val_macro_f1"]
    np.testing.assert_allclose(out["no"]["history.csv"][cols], out["yes"]["history.csv"][cols], atol=1e-6)


def test_the_device_copy_is_made_once_and_reused_by_later_folds(mini_data, tmp_path):
    from src.batches import prepare

    data = prepare(load_config("exp001", tiny(mini_data, tmp_path)))
    cpu = torch.device("cpu")
    auto, yes, no = (load_config("exp001", tiny(mini_data, tmp_path, cache_on_device=m)) for m in ("auto", "yes", "no"))
    assert data.images(auto, cpu)[2] is False and not data._on_device   # auto without CUDA: the memory map
    tr, te, on = data.images(yes, cpu)
    assert on and torch.equal(tr, torch.from_numpy(np.array(data.train_cache)))
    assert te.shape == data.test_cache.shape
    again = data.images(auto, cpu)   # once the copy exists, 'auto' uses it rather than deciding anew
    assert again[2] and again[0] is tr and again[1] is te
    assert data.images(no, cpu)[0] is data.train_cache   # an explicit 'no' is honoured
