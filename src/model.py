r"""The dual-image metadata-fusion network, as parts an experiment puts together.

clinical image -> backbone A -> pooled embedding --\
dermoscopic    -> backbone B -> pooled embedding ---+--> head(embeddings, metadata features) -> 11 logits
metadata features ---------------------------------/                                       \-> aux logits (optional)

``DualNet(clin, derm, head)``: two backbones (or one shared: ``derm is clin``) and a fusion head. The library's
head is ``LinearHead`` (concatenation and one linear layer, the reference design); an experiment with another idea
writes its own head in its folder (any module with ``forward(embeddings, meta) -> (logits, aux_logits | None)``).
Speed machinery (fused backbones, CUDA streams, compilation) is applied from outside by src/speed/apply.py.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from .settings import key

__all__ = ["BACKBONE_KEYS", "DualNet", "DualNetBase", "LinearHead", "WeightsUnavailable", "backbones",
           "count_parameters", "create_backbone", "ensure_weights"]

# what ``backbones`` reads: a network part built on it declares them (``@reads(BACKBONE_KEYS, ...)``)
BACKBONE_KEYS = {
    "backbone": key("tf_efficientnetv2_s", "timm model name of each image branch", results=True, text=True),
    "pretrained": key(True, "start from ImageNet weights", results=True),
    "pretrained_path": key("", "local weights file for the backbone (also env MILK10K_WEIGHTS); used instead of "
                           "downloading", results=False, text=True),
    "shared_backbone": key(False, "one backbone for both images instead of one per image", results=True),
}

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


class LinearHead(nn.Module):
    """The reference fusion: [clinical embedding, dermoscopic embedding, metadata features] -> one linear layer
    (and a second one for the auxiliary diagnoses when ``n_aux``)."""

    def __init__(self, emb_dim: int, n_meta: int, n_classes: int = 11, n_aux: int = 0):
        super().__init__()
        self.classifier = nn.Linear(emb_dim + n_meta, n_classes)
        self.aux = nn.Linear(emb_dim + n_meta, n_aux) if n_aux else None

    def forward(self, emb: torch.Tensor, meta: torch.Tensor):
        z = torch.cat([emb, meta], dim=1) if meta.shape[1] else emb
        return self.classifier(z), (self.aux(z) if self.aux is not None else None)


class DualNetBase(nn.Module):
    """What training needs of a dual-image network: its backbones (to freeze, and for their learning rate), the
    rest (the head), the normalisation of its input images and ``forward(clin, derm, meta)``."""

    head: nn.Module
    mean: tuple
    std: tuple
    shared: bool = False

    def backbones(self) -> list[nn.Module]:
        raise NotImplementedError

    def embed(self, clin: torch.Tensor, derm: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backbone_parameters(self):
        for b in self.backbones():
            yield from b.parameters()

    def head_parameters(self):
        backbone_ids = {id(p) for p in self.backbone_parameters()}
        return [p for p in self.parameters() if id(p) not in backbone_ids]

    def forward(self, clin: torch.Tensor, derm: torch.Tensor, meta: torch.Tensor):
        return self.head(self.embed(clin, derm).float(), meta)


class DualNet(DualNetBase):
    """Two backbones (``derm is clin`` for one shared backbone) and a fusion head."""

    def __init__(self, clin: nn.Module, derm: nn.Module, head: nn.Module):
        super().__init__()
        self.clin, self.derm, self.head = clin, derm, head
        self.shared = derm is clin
        cfg = clin.pretrained_cfg or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    def backbones(self) -> list[nn.Module]:
        return [self.clin] if self.shared else [self.clin, self.derm]

    def embed(self, clin: torch.Tensor, derm: torch.Tensor) -> torch.Tensor:
        if self.shared:
            both = self.clin(torch.cat([clin, derm]))
            return torch.cat(both.split(clin.shape[0]), dim=1)
        return torch.cat([self.clin(clin), self.derm(derm)], dim=1)


def backbones(cfg) -> tuple[nn.Module, nn.Module]:
    """The clinical and the dermoscopic backbone of ``cfg`` (the same module with ``shared_backbone``)."""
    shared = cfg.shared_backbone
    clin = create_backbone(cfg.backbone, cfg.pretrained, cfg.pretrained_path)
    derm = clin if shared else create_backbone(cfg.backbone, cfg.pretrained, cfg.pretrained_path)
    return clin, derm


def count_parameters(model: DualNetBase) -> dict[str, int]:
    backbone = sum(p.numel() for p in model.backbone_parameters())
    head = sum(p.numel() for p in model.head_parameters())
    return {"total": backbone + head, "backbones": backbone, "head": head}
