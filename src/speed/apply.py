"""Speed applied from outside the network: ``accelerate`` puts a DualNet's two backbones into one fused network
(``fuse_backbones``) or onto two CUDA streams (``branch_streams``); ``runner`` wraps the model for DDP and
``torch.compile``. Checkpoints are always in the plain layout (``plain_state`` / ``load_plain_state``), so a fold
trained fused resumes, predicts and exports like any other."""
from __future__ import annotations

import torch
from torch import nn

from ..model import DualNet, DualNetBase
from .fuse import fuse_pair, fuse_state, split_fused_state
from .streams import TwoStreams


class FusedDualNet(DualNetBase):
    """A DualNet whose two backbones run as one network of twice the width (src/speed/fuse.py)."""

    def __init__(self, net: DualNet):
        super().__init__()
        self.pair = fuse_pair(net.clin, net.derm)
        self.head, self.mean, self.std = net.head, net.mean, net.std

    def backbones(self) -> list[nn.Module]:
        return [self.pair]

    def embed(self, clin: torch.Tensor, derm: torch.Tensor) -> torch.Tensor:
        return self.pair(torch.cat([clin, derm], dim=1))


class StreamedDualNet(DualNet):
    """A DualNet whose backbones run on two CUDA streams (src/speed/streams.py); same parameters, same layout."""

    def __init__(self, net: DualNet):
        super().__init__(net.clin, net.derm, net.head)
        self._streams = TwoStreams()

    def embed(self, clin: torch.Tensor, derm: torch.Tensor) -> torch.Tensor:
        if not clin.is_cuda:
            return super().embed(clin, derm)
        return torch.cat(self._streams(self.clin, self.derm, clin, derm), dim=1)


def accelerate(net: DualNet, cfg, world: int = 1) -> DualNetBase:
    """``net`` with the configured speed machinery: fused backbones, or (single process, uncompiled) two streams."""
    fuse, streams = cfg.fuse_backbones, cfg.branch_streams and not cfg.compile and world == 1  # DDP: one stream
    if net.shared:
        return net
    if fuse:
        return FusedDualNet(net)
    if streams:
        return StreamedDualNet(net)
    return net


def runner(model: nn.Module, cfg, dist) -> nn.Module:
    """What a training step calls: the model wrapped for DDP (several processes) and compiled when asked."""
    wrapped, mode = dist.wrap(model), cfg.compile_mode
    return torch.compile(wrapped, mode=mode) if cfg.compile else wrapped


def plain_state(model: nn.Module) -> dict:
    """The model's weights in the plain two-backbone layout, whatever speed machinery it runs with."""
    state = model.state_dict()
    return split_fused_state(state) if isinstance(model, FusedDualNet) else state


def load_plain_state(model: nn.Module, state: dict) -> None:
    """Load weights in the plain layout into ``model``, whatever speed machinery it runs with."""
    model.load_state_dict(fuse_state(state) if isinstance(model, FusedDualNet) else state)
