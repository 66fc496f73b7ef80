"""Two backbones of the same architecture run as one network of twice the width (``fuse_backbones=true``).

Every convolution gets twice the channels and twice the groups (the two weights stacked), every BatchNorm both
sets of statistics, stochastic depth drops the two halves independently. Each layer is then one kernel for both
images: the same arithmetic and the same results as two separate backbones in half the kernel launches (a
dual-backbone step at batch 64 is bound by launches on a large GPU). Checkpoints convert either way
(``fuse_state`` / ``split_fused_state``).
"""
from __future__ import annotations

import copy

import timm
import torch
from torch import nn


class FusionUnsupported(ValueError):
    pass


class PairDropPath(nn.Module):
    """Stochastic depth of a fused pair: each sample drops the clinical and the dermoscopic path independently,
    as two separate backbones would."""

    def __init__(self, drop_prob: float, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0], 2) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0 and self.scale_by_keep:
            mask.div_(keep)
        return (x.unflatten(1, (2, -1)) * mask).flatten(1, 2)


def _direct_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    return {**{k: v for k, v in m._parameters.items() if v is not None},
            **{k: v for k, v in m._buffers.items() if v is not None}}


def _stack(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The fused layout of one tensor: ``a``'s half then ``b``'s along dim 0; a scalar (BatchNorm's
    num_batches_tracked) is one value that serves both halves."""
    return t if t.ndim == 0 else torch.cat([t, u])


def fuse_pair(a: nn.Module, b: nn.Module, check_size: int = 64) -> nn.Module:
    """One network computing ``cat([a(x1), b(x2)], dim=1)`` from ``cat([x1, x2], dim=1)``, for two backbones of
    the same architecture (separate weights).

    Every convolution becomes one with twice the channels and twice the groups, its weight the two weights stacked
    along the output channels; every BatchNorm holds both sets of per-channel statistics; activations and pooling
    act per channel anyway. So each layer is one kernel for both images instead of two: at batch 64 a dual-backbone
    step is bound by kernel launches, and this halves them while doing the same arithmetic. Parameter i of
    ``a`` is the first half of the fused parameter, ``b``'s the second (``split_fused_state`` / ``fuse_state``).

    Only layers that act per channel or per group can be fused; others (LayerNorm over channels, attention,
    linear layers) raise FusionUnsupported, and so does a network whose fused output does not match the two
    networks' on a random check input, e.g. one that mixes channels in its forward code.
    """
    names_a = [(n, type(m)) for n, m in a.named_modules()]
    if names_a != [(n, type(m)) for n, m in b.named_modules()]:
        raise FusionUnsupported("fuse_backbones needs two backbones of the same architecture")
    mods_b = dict(b.named_modules())
    fused = copy.deepcopy(a)
    for name, m in list(fused.named_modules()):
        where = f"{name or 'the backbone'} ({type(m).__name__})"
        tensors = _direct_tensors(m)
        if isinstance(m, timm.layers.DropPath):
            parent, _, leaf = name.rpartition(".")
            setattr(fused.get_submodule(parent) if parent else fused, leaf, PairDropPath(m.drop_prob, m.scale_by_keep))
            continue
        if not tensors:
            continue
        if isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = 2 * m.in_channels, 2 * m.out_channels, 2 * m.groups
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_features = 2 * m.num_features
        else:
            raise FusionUnsupported(f"fuse_backbones cannot fuse {where}: only convolutions and BatchNorm layers "
                                    "hold weights in a fusable backbone; use fuse_backbones=false")
        other = _direct_tensors(mods_b[name])
        for key, t in tensors.items():
            both = _stack(t.detach(), other[key].detach())
            if key in m._parameters:
                m._parameters[key] = nn.Parameter(both, requires_grad=t.requires_grad)
            else:
                m._buffers[key] = both
    if hasattr(fused, "num_features"):
        fused.num_features = 2 * a.num_features
    _check_fused(fused, a, b, check_size)
    return fused


@torch.no_grad()
def _check_fused(fused: nn.Module, a: nn.Module, b: nn.Module, size: int) -> None:
    modes = {m: m.training for m in (fused, a, b)}
    for m in modes:
        m.eval()
    try:
        gen = torch.Generator().manual_seed(0)
        x1, x2 = (torch.randn(2, 3, size, size, generator=gen) for _ in range(2))
        want = torch.cat([a(x1), b(x2)], dim=1)
        try:
            got = fused(torch.cat([x1, x2], dim=1))
        except RuntimeError as exc:  # e.g. channel counts written into the forward code
            raise FusionUnsupported(f"fuse_backbones: the fused backbone fails on a check input ({exc}); use "
                                    "fuse_backbones=false") from None
    finally:
        for m, mode in modes.items():
            m.train(mode)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6):
        raise FusionUnsupported("fuse_backbones: the fused backbone does not reproduce the two separate ones on a "
                                "check input (the architecture mixes channels somewhere); use fuse_backbones=false")


def fuse_state(state: dict, prefix: str = "") -> dict:
    """``<prefix>clin.*`` and ``<prefix>derm.*`` entries of a state dict as the ``<prefix>pair.*`` entries of a
    fused model; everything else unchanged."""
    out, pa, pb = {}, prefix + "clin.", prefix + "derm."
    for key, t in state.items():
        if key.startswith(pa):
            rest = key[len(pa):]
            out[prefix + "pair." + rest] = _stack(t, state[pb + rest])
        elif not key.startswith(pb):
            out[key] = t
    return out


def split_fused_state(state: dict, prefix: str = "") -> dict:
    """The inverse of ``fuse_state``: a fused model's state dict as a two-backbone model's."""
    out, pf = {}, prefix + "pair."
    for key, t in state.items():
        if not key.startswith(pf):
            out[key] = t
            continue
        rest = key[len(pf):]
        halves = (t, t) if t.ndim == 0 else t.chunk(2)
        out[prefix + "clin." + rest], out[prefix + "derm." + rest] = (h.clone() for h in halves)
    return out
