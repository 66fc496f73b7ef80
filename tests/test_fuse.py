"""fuse_backbones: two backbones run as one grouped network give the results of two separate ones."""
import copy

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torch import nn

from src.config import experiment_recipe, load_config
from src.model import DualNet, count_parameters
from src.speed.apply import FusedDualNet, accelerate, load_plain_state, plain_state
from src.speed.fuse import FusionUnsupported, PairDropPath, fuse_pair, fuse_state, split_fused_state

from .conftest import tiny


def _net(name: str, n_meta: int = 5, experiment: str = "exp001") -> DualNet:
    """``experiment``'s network (its recipe's network part) over backbone ``name``, untrained, with 3 aux classes."""
    cfg = load_config(experiment, [f"backbone={name}", "pretrained=false"])
    return experiment_recipe(experiment).network(cfg, n_meta, 3)


def _pair(name: str, n_meta: int = 5, experiment: str = "exp001"):
    """A two-backbone network and the same weights fused (its own copy: nothing shared between the two)."""
    torch.manual_seed(0)
    two = _net(name, n_meta, experiment)
    cfg = load_config(experiment, [f"backbone={name}", "pretrained=false", "fuse_backbones=true"])
    fused = accelerate(copy.deepcopy(two), cfg)
    assert isinstance(fused, FusedDualNet)
    return two, fused


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4):
    a, b = a.detach(), b.detach()
    scale = float(a.abs().max()) + 1e-12
    assert float((a - b).abs().max()) <= rel * scale, (float((a - b).abs().max()), scale)


def _run(model, *x, seed=3):
    torch.manual_seed(seed)  # the same dropout masks in the metadata MLP
    return model(*x)


# tf_efficientnet_lite0 uses TF "same" padding (timm's Conv2dSame), test_efficientnet squeeze-excite blocks.
# In float64 the two agree to rounding; in float32, ReLU6 kinks let rounding flip a few gradient elements.
@pytest.mark.parametrize("name", ["test_efficientnet", pytest.param("tf_efficientnet_lite0", marks=pytest.mark.slow)])
def test_forward_backward_and_statistics_match_two_backbones(name):
    two, fused = _pair(name, experiment="exp002")  # exp002's head: the metadata through an MLP with dropout
    assert count_parameters(two) == count_parameters(fused)
    assert len(list(fused.backbone_parameters())) * 2 == len(list(two.backbone_parameters()))
    two, fused = two.double(), fused.double()
    gen = torch.Generator().manual_seed(1)
    clin, derm, meta = (torch.randn(6, 3, 64, 64, generator=gen, dtype=torch.float64),
                        torch.randn(6, 3, 64, 64, generator=gen, dtype=torch.float64),
                        torch.randn(6, 5, generator=gen, dtype=torch.float64))
    for training in (True, False):
        two.train(training), fused.train(training)
        (l2, a2), (lf, af) = _run(two, clin, derm, meta), _run(fused, clin, derm, meta)
        _close(l2, lf, rel=1e-10), _close(a2, af, rel=1e-10)
    two.train(), fused.train()
    (l2, a2), (lf, af) = _run(two, clin, derm, meta), _run(fused, clin, derm, meta)
    (l2.square().mean() + a2.mean()).backward()
    (lf.square().mean() + af.mean()).backward()
    grads = split_fused_state({k: p.grad for k, p in fused.named_parameters()})
    names = [k for k, _ in two.named_parameters()]
    _close(torch.cat([p.grad.flatten() for _, p in two.named_parameters()]),
           torch.cat([grads[k].flatten() for k in names]), rel=1e-10)
    # BatchNorm running statistics (two train-mode forwards) are the two backbones' own
    state = split_fused_state(fused.state_dict())
    assert state.keys() == two.state_dict().keys()
    running = [k for k in state if "running" in k]
    assert running
    _close(torch.cat([two.state_dict()[k].flatten() for k in running]), torch.cat([state[k].flatten() for k in running]),
           rel=1e-10)
    for k, t in two.state_dict().items():
        if "num_batches_tracked" in k:
            assert int(t) == int(state[k]) == 2


def test_float32_forward_matches():
    two, fused = _pair("test_efficientnet")
    x = [torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64), torch.randn(4, 5)]
    for training in (True, False):
        two.train(training), fused.train(training)
        _close(_run(two, *x)[0], _run(fused, *x)[0], rel=1e-4)


def test_clinical_and_dermoscopic_halves_stay_apart():
    """Changing only the dermoscopic image leaves the clinical half of the embedding unchanged."""
    _, fused = _pair("test_efficientnet")
    fused.eval()
    gen = torch.Generator().manual_seed(2)
    clin, derm = torch.randn(3, 3, 64, 64, generator=gen), torch.randn(3, 3, 64, 64, generator=gen)
    with torch.no_grad():
        e1, e2 = fused.embed(clin, derm), fused.embed(clin, derm + 1)
    half = e1.shape[1] // 2
    torch.testing.assert_close(e1[:, :half], e2[:, :half])
    assert float((e1[:, half:] - e2[:, half:]).abs().max()) > 1e-3


def test_checkpoints_load_either_way():
    two, fused = _pair("test_efficientnet")
    with torch.no_grad():  # the fused model moves away from the two-backbone one
        for p in fused.parameters():
            p.add_(0.01 * torch.randn_like(p))
    back = _net("test_efficientnet")
    load_plain_state(back, plain_state(fused))
    again = FusedDualNet(_net("test_efficientnet"))
    load_plain_state(again, plain_state(back))
    for k, t in fused.state_dict().items():
        torch.testing.assert_close(t, again.state_dict()[k])
    x = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 5)]
    back.eval(), fused.eval()
    _close(back(*x)[0], fused(*x)[0])
    # split halves are saved as their own tensors, not as views of the whole fused weight
    one = plain_state(fused)["clin.conv_stem.weight"]
    assert one.untyped_storage().nbytes() == one.numel() * one.element_size()
    assert fuse_state(split_fused_state(fused.state_dict())).keys() == fused.state_dict().keys()


def test_pair_drop_path_drops_each_image_on_its_own():
    torch.manual_seed(0)
    drop = PairDropPath(0.5).train()
    out = drop(torch.ones(4000, 8, 2, 2))
    kept = out.flatten(2).amax(2)          # (4000, 8): 0 where dropped, 2 where kept and rescaled
    clin, derm = kept[:, :4], kept[:, 4:]
    for half in (clin, derm):              # one decision per sample and image, shared by its channels
        assert bool(((half == 0) | (half == 2)).all()) and bool((half == half[:, :1]).all())
    both = ((clin[:, 0] > 0) & (derm[:, 0] > 0)).float().mean()
    assert 0.2 < float(both) < 0.3          # independent halves: 0.5 x 0.5
    assert torch.equal(drop.eval()(out), out)


def test_drop_path_backbones_are_fused_with_pair_drop_path():
    a = timm.create_model("test_efficientnet", pretrained=False, num_classes=0, drop_path_rate=0.2)
    b = timm.create_model("test_efficientnet", pretrained=False, num_classes=0, drop_path_rate=0.2)
    fused = fuse_pair(a, b)
    assert any(isinstance(m, PairDropPath) for m in fused.modules())
    assert not any(isinstance(m, timm.layers.DropPath) for m in fused.modules())


class _OddForward(nn.Module):
    """A convolution followed by forward code that treats channels in ways fusion cannot see."""

    def __init__(self, tail):
        super().__init__()
        self.conv, self.tail = nn.Conv2d(3, 4, 3), tail

    def forward(self, x):
        return self.tail(self.conv(x)).mean((2, 3))


def _mixes(y):    # every channel gets the mean over all channels: the fused mean mixes the two images
    return y + y.mean(1, keepdim=True)


def _slices(y):   # fixed channel counts: the fused tensor has twice as many
    return y[:, :2] * y[:, 2:]


def test_networks_that_cannot_be_fused_are_refused():
    with pytest.raises(FusionUnsupported, match="LayerNorm"):
        fuse_pair(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm(4)), nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm(4)))
    with pytest.raises(FusionUnsupported, match="same architecture"):
        fuse_pair(nn.Sequential(nn.Conv2d(3, 4, 1)), nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()))
    with pytest.raises(FusionUnsupported, match="does not reproduce"):
        fuse_pair(_OddForward(_mixes), _OddForward(_mixes))
    with pytest.raises(FusionUnsupported, match="fails on a check input"):
        fuse_pair(_OddForward(_slices), _OddForward(_slices))


@pytest.mark.slow
def test_a_fused_fold_trains_like_a_two_backbone_fold(mini_data, tmp_path):
    from src.batches import prepare
    from src.train import read_checkpoint, reference_network, train_fold

    oof = {}
    recipe = experiment_recipe("exp001")
    for fuse in (False, True):
        cfg = load_config("exp001", tiny(mini_data, tmp_path / str(fuse), epochs=2, fuse_backbones=fuse))
        train_fold(recipe, cfg, 0, prepare(cfg))
        oof[fuse] = pd.read_csv(cfg.fold_dir(0) / "oof.csv")
    np.testing.assert_array_equal(oof[False]["lesion_id"], oof[True]["lesion_id"])
    probs = [oof[f].drop(columns="lesion_id").to_numpy() for f in (False, True)]
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-4)  # 6e-6 seen: float rounding only
    assert float(np.abs(probs[0] - probs[0].mean(0)).max()) > 1e-2  # the predictions are not constant
    # the fused fold's best checkpoint is in the plain layout: it serves a two-backbone model as it is, and a
    # fused one through load_plain_state
    ckpt = read_checkpoint(tmp_path / "True" / "exp001" / "fold0" / "best.pt")
    assert not any(k.startswith("pair.") for k in ckpt["model"])
    n_meta = ckpt["model"]["head.classifier.weight"].shape[1] - 2 * 256  # test_efficientnet: 256 features per image
    two = reference_network(cfg, n_meta, 0)
    two.load_state_dict(ckpt["model"])
    fused = FusedDualNet(reference_network(cfg, n_meta, 0))
    load_plain_state(fused, ckpt["model"])
    assert plain_state(fused).keys() == two.state_dict().keys()
