"""exp003's code: exp001's recipe with ``GatedHead`` as the fusion head; everything else is exp001's."""
from dataclasses import replace

import torch
from torch import nn

from exp.exp001.train import RECIPE as EXP001_RECIPE
from src.config import reads
from src.data import CLASSES
from src.model import BACKBONE_KEYS, DualNet, backbones


class GatedHead(nn.Module):
    """[g_clin * clinical embedding, g_derm * dermoscopic embedding, metadata] -> one linear layer, where the two
    gates g = 2 * sigmoid(W [embeddings, metadata] + b) are computed per lesion. W and b start at zero, so every gate
    starts at 1 and the head starts as exp001's ``LinearHead`` (its classifier is created first, from the same
    random stream)."""

    def __init__(self, emb_dim: int, n_meta: int, n_classes: int, n_aux: int):
        super().__init__()
        self.half = emb_dim // 2
        self.classifier = nn.Linear(emb_dim + n_meta, n_classes)
        self.aux = nn.Linear(emb_dim + n_meta, n_aux) if n_aux else None
        self.gate = nn.Linear(emb_dim + n_meta, 2)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def gates(self, emb: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """(lesions, 2): the clinical and the dermoscopic gate of each lesion, in (0, 2)."""
        return 2 * torch.sigmoid(self.gate(torch.cat([emb, meta], dim=1)))

    def forward(self, emb: torch.Tensor, meta: torch.Tensor):
        g = self.gates(emb, meta)
        z = torch.cat([emb[:, :self.half] * g[:, :1], emb[:, self.half:] * g[:, 1:], meta], dim=1)
        return self.classifier(z), (self.aux(z) if self.aux is not None else None)


@reads(BACKBONE_KEYS)
def network(cfg, n_meta: int, n_aux: int) -> DualNet:
    clin, derm = backbones(cfg)
    return DualNet(clin, derm, GatedHead(2 * clin.num_features, n_meta, len(CLASSES), n_aux))


RECIPE = replace(EXP001_RECIPE, network=network)
