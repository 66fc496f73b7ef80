r"""The dual-image metadata-fusion network.

clinical image -> backbone A -> pooled embedding --\
dermoscopic    -> backbone B -> pooled embedding ---+--> [concat] -> dropout -> linear -> 11 logits
metadata features -> (identity | small MLP) -------/                                 \-> aux logits (optional)

With ``fuse_backbones`` the two backbones become one network of twice the width (src/speed/fuse.py): the same
arithmetic and the same results, in half the kernel launches; with ``branch_streams`` they run on two CUDA streams
(src/speed/streams.py).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from .speed.fuse import FusionUnsupported, fuse_pair, fuse_state, split_fused_state
from .speed.streams import TwoStreams

__all__ = ["DualNet", "FusionUnsupported", "WeightsUnavailable", "build_model", "count_parameters",
           "create_backbone", "ensure_weights"]

WEIGHTS_ENV = "MILK10K_WEIGHTS"


class WeightsUnavailable(RuntimeError):
    pass


def _weights_help(name: str, why: str) -> str:
    return (f"cannot get pretrained weights for {name!r} ({why}). Either connect to the internet once (timm caches "
            f"them), or point pretrained_path=/path/to/weights.safetensors (or ${WEIGHTS_ENV}) at a local file, or "
            "set pretrained=false.")


def _hub_cached(name: str) -> bool:
    """Whether timm's Hugging Face weights of ``name`` are already in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    try:
        repo = get_pretrained_cfg(name).hf_hub_id
    except (RuntimeError, AttributeError):
        return False
    files = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return bool(repo) and any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def _hub_reachable(timeout: float = 5.0) -> str | None:
    """None when the hub can be tried; otherwise why not (offline mode, or its host cannot be reached). A proxy
    setting skips the direct probe: only a real download can tell."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set and they are not in the local cache"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        return f"they are not in the local cache and {host} cannot be reached: {exc.strerror or exc}"
    return None


def ensure_weights(name: str, pretrained: bool, pretrained_path: str = "") -> None:
    """Fail at once, with what to do, when the backbone's pretrained weights can be neither read nor fetched;
    fetch them into the hub cache otherwise (so a run never finds out after building its image cache)."""
    local = pretrained_path or os.environ.get(WEIGHTS_ENV, "")
    if not pretrained or (local and Path(local).is_file()):
        return
    if local:
        raise WeightsUnavailable(f"weights file {local!r} (pretrained_path / ${WEIGHTS_ENV}) does not exist")
    if not _hub_cached(name):
        create_backbone(name, pretrained=True)


def create_backbone(name: str, pretrained: bool, pretrained_path: str = "") -> nn.Module:
    """A timm feature extractor (global-pooled, no classifier).

    Weights: ``pretrained_path`` (or env MILK10K_WEIGHTS) names a local file used as is; otherwise timm fetches
    the ImageNet weights the usual way (Hugging Face hub cache). Without either, a short error says what to do,
    at once when the hub cannot be reached (no minute of retries).
    """
    local = pretrained_path or os.environ.get(WEIGHTS_ENV, "")
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0)
    if local:
        if not Path(local).is_file():
            raise WeightsUnavailable(f"weights file {local!r} (pretrained_path / ${WEIGHTS_ENV}) does not exist")
        return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(local)})
    if not _hub_cached(name):
        unreachable = _hub_reachable()
        if unreachable:
            raise WeightsUnavailable(_weights_help(name, unreachable))
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # network, hub, or missing-file errors of several kinds
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailable(_weights_help(name, f"{type(exc).__name__}: {reason}")) from None


class DualNet(nn.Module):
    def __init__(self, backbone: str, n_meta: int, n_classes: int = 11, n_aux: int = 0, *,
                 shared_backbone: bool = False, meta_mode: str = "concat", meta_hidden: int = 128,
                 meta_dropout: float = 0.3, head_dropout: float = 0.0, embed_norm: bool = False,
                 pretrained: bool = True,
                 pretrained_path: str = "", fuse_backbones: bool = False):
        super().__init__()
        clin = create_backbone(backbone, pretrained, pretrained_path)
        self.shared = shared_backbone
        self.fused = fuse_backbones and not shared_backbone
        self.branch_streams = False  # set by build_model from the config; CUDA only
        self._streams = TwoStreams()
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
        # embed_norm: each embedding dimension scaled to zero mean and unit variance (batch statistics in training,
        # running ones in evaluation; no learned parameters), so the classifier sees the embeddings on the scale of
        # the standardised metadata whether the backbones are frozen or fine-tuned
        self.embed_norm = nn.BatchNorm1d(2 * feat, eps=1e-8, affine=False) if embed_norm else None
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
            return torch.cat(self._streams(self.clin, self.derm, clin, derm), dim=1)
        return torch.cat([self.clin(clin), self.derm(derm)], dim=1)

    def forward_head(self, emb: torch.Tensor, meta: torch.Tensor):
        emb = emb.float()
        parts = [self.embed_norm(emb) if self.embed_norm is not None else emb]
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
                   embed_norm=cfg.embed_norm,
                   pretrained=cfg.pretrained, pretrained_path=cfg.pretrained_path,
                   fuse_backbones=cfg.fuse_backbones)
    model.branch_streams = cfg.branch_streams and not cfg.compile and not model.fused
    return model


def count_parameters(model: DualNet) -> dict[str, int]:
    backbone = sum(p.numel() for p in model.backbone_parameters())
    head = sum(p.numel() for p in model.head_parameters())
    return {"total": backbone + head, "backbones": backbone, "head": head}
