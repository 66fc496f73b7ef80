r"""The dual-image metadata-fusion network.

clinical image -> backbone A -> pooled embedding --\
dermoscopic    -> backbone B -> pooled embedding ---+--> [concat] -> dropout -> linear -> 11 logits
metadata features -> (identity | small MLP) -------/                                 \-> aux logits (optional)

With ``fuse_backbones`` the two backbones become one network of twice the width (see ``fuse_pair``): the same
arithmetic and the same results, in half the kernel launches.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import timm
import torch
from torch import nn

WEIGHTS_ENV = "MILK10K_WEIGHTS"


class WeightsUnavailable(RuntimeError):
    pass


def create_backbone(name: str, pretrained: bool, pretrained_path: str = "") -> nn.Module:
    """A timm feature extractor (global-pooled, no classifier).

    Weights: ``pretrained_path`` (or env MILK10K_WEIGHTS) names a local file used as is; otherwise timm fetches
    the ImageNet weights the usual way (Hugging Face hub cache). Without either, a short error says what to do.
    """
    local = pretrained_path or os.environ.get(WEIGHTS_ENV, "")
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0)
    if local:
        if not Path(local).is_file():
            raise WeightsUnavailable(f"weights file {local!r} (pretrained_path / ${WEIGHTS_ENV}) does not exist")
        return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(local)})
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # network, hub, or missing-file errors of several kinds
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailable(
            f"cannot get pretrained weights for {name!r} ({type(exc).__name__}: {reason}). Either connect to the "
            f"internet once (timm caches them), or point pretrained_path=/path/to/weights.safetensors "
            f"(or ${WEIGHTS_ENV}) at a local file, or set pretrained=false."
        ) from None


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


class DualNet(nn.Module):
    def __init__(self, backbone: str, n_meta: int, n_classes: int = 11, n_aux: int = 0, *,
                 shared_backbone: bool = False, meta_mode: str = "concat", meta_hidden: int = 128,
                 meta_dropout: float = 0.3, head_dropout: float = 0.0, pretrained: bool = True,
                 pretrained_path: str = "", fuse_backbones: bool = False):
        super().__init__()
        clin = create_backbone(backbone, pretrained, pretrained_path)
        self.shared = shared_backbone
        self.fused = fuse_backbones and not shared_backbone
        self.branch_streams = False  # set by build_model from the config; CUDA only
        self._side = None
        cfg = clin.pretrained_cfg or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        feat = clin.num_features
        if self.fused:
            self.pair = fuse_pair(clin, create_backbone(backbone, pretrained, pretrained_path))
        else:
            self.clin = clin
            self.derm = clin if shared_backbone else create_backbone(backbone, pretrained, pretrained_path)
        if meta_mode == "mlp" and n_meta:
            self.meta = nn.Sequential(
                nn.Linear(n_meta, meta_hidden), nn.BatchNorm1d(meta_hidden), nn.SiLU(), nn.Dropout(meta_dropout),
                nn.Linear(meta_hidden, meta_hidden), nn.BatchNorm1d(meta_hidden), nn.SiLU(),
            )
            meta_dim = meta_hidden
        elif meta_mode == "concat" and n_meta:
            self.meta, meta_dim = nn.Identity(), n_meta
        else:
            self.meta, meta_dim = None, 0
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(2 * feat + meta_dim, n_classes)
        self.aux_head = nn.Linear(2 * feat + meta_dim, n_aux) if n_aux else None

    def backbones(self) -> list[nn.Module]:
        if self.fused:
            return [self.pair]
        return [self.clin] if self.shared else [self.clin, self.derm]

    def backbone_parameters(self):
        for b in self.backbones():
            yield from b.parameters()

    def head_parameters(self):
        backbone_ids = {id(p) for p in self.backbone_parameters()}
        return [p for p in self.parameters() if id(p) not in backbone_ids]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Checkpoints load whichever way either model holds its backbones (fused or two separate ones)."""
        has_pair = any(k.startswith("pair.") for k in state_dict)
        if self.fused and not has_pair:
            state_dict = fuse_state(state_dict)
        elif not self.fused and has_pair:
            state_dict = split_fused_state(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def embed(self, clin: torch.Tensor, derm: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.pair(torch.cat([clin, derm], dim=1))
        if self.shared:
            both = self.clin(torch.cat([clin, derm]))
            return torch.cat(both.split(clin.shape[0]), dim=1)
        if self.branch_streams and clin.is_cuda:
            return torch.cat(self._embed_two_streams(clin, derm), dim=1)
        return torch.cat([self.clin(clin), self.derm(derm)], dim=1)

    def _embed_two_streams(self, clin: torch.Tensor, derm: torch.Tensor):
        """Run the dermoscopic branch on a side CUDA stream while the clinical branch runs on the current one.
        At batch 64 each branch alone leaves much of a large GPU idle; two streams let their kernels overlap
        (autograd runs each backward op on its forward op's stream, so the backward overlaps too)."""
        main = torch.cuda.current_stream(clin.device)
        if self._side is None or self._side.device != clin.device:
            self._side = torch.cuda.Stream(clin.device)
        side = self._side
        side.wait_stream(main)
        with torch.cuda.stream(side):
            derm.record_stream(side)
            f_derm = self.derm(derm)
        f_clin = self.clin(clin)
        main.wait_stream(side)
        f_derm.record_stream(main)
        return f_clin, f_derm

    def forward_head(self, emb: torch.Tensor, meta: torch.Tensor):
        parts = [emb.float()]
        if self.meta is not None:
            parts.append(self.meta(meta))
        z = self.dropout(torch.cat(parts, dim=1))
        logits = self.head(z)
        aux = self.aux_head(z) if self.aux_head is not None else None
        return logits, aux

    def forward(self, clin: torch.Tensor, derm: torch.Tensor, meta: torch.Tensor):
        return self.forward_head(self.embed(clin, derm), meta)


def build_model(cfg, n_meta: int, n_aux: int = 0) -> DualNet:
    model = DualNet(cfg.backbone, n_meta, n_aux=n_aux, shared_backbone=cfg.shared_backbone, meta_mode=cfg.meta_mode,
                   meta_hidden=cfg.meta_hidden, meta_dropout=cfg.meta_dropout, head_dropout=cfg.head_dropout,
                   pretrained=cfg.pretrained, pretrained_path=cfg.pretrained_path,
                   fuse_backbones=cfg.fuse_backbones)
    model.branch_streams = cfg.branch_streams and not cfg.compile and not model.fused
    return model


def count_parameters(model: DualNet) -> dict[str, int]:
    backbone = sum(p.numel() for p in model.backbone_parameters())
    head = sum(p.numel() for p in model.head_parameters())
    return {"total": backbone + head, "backbones": backbone, "head": head}
