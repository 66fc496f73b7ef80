"""exp002's code: exp001's, with the metadata through a small MLP before the fusion (``MetaMLPHead``).

Everything else exp002 changes (input size, weights, loss, sampling, mixing, EMA, auxiliary head) is a value of a
library part's key (its loss, mixing, optimiser, fold loop), in exp/exp002/config.py.
"""
from dataclasses import replace

import torch
from torch import nn

from exp.exp001.train import RECIPE as EXP001_RECIPE
from src.config import key, reads
from src.data import CLASSES
from src.model import BACKBONE_KEYS, DualNet, backbones


class MetaMLPHead(nn.Module):
    """[clinical embedding, dermoscopic embedding, MLP(metadata)] -> one linear layer (and the auxiliary one)."""

    def __init__(self, emb_dim: int, n_meta: int, n_classes: int, n_aux: int, hidden: int, dropout: float):
        super().__init__()
        self.meta = nn.Sequential(
            nn.Linear(n_meta, hidden), nn.BatchNorm1d(hidden), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.SiLU(),
        )
        self.classifier = nn.Linear(emb_dim + hidden, n_classes)
        self.aux = nn.Linear(emb_dim + hidden, n_aux) if n_aux else None

    def forward(self, emb: torch.Tensor, meta: torch.Tensor):
        z = torch.cat([emb, self.meta(meta)], dim=1)
        return self.classifier(z), (self.aux(z) if self.aux is not None else None)


@reads(BACKBONE_KEYS,
       meta_hidden=key(128, "hidden width of the metadata MLP", results=True, low=1),
       meta_dropout=key(0.3, "dropout inside the metadata MLP", results=True, low=0, high=1, high_open=True))
def network(cfg, n_meta: int, n_aux: int) -> DualNet:
    clin, derm = backbones(cfg)
    head = MetaMLPHead(2 * clin.num_features, n_meta, len(CLASSES), n_aux, cfg.meta_hidden, cfg.meta_dropout)
    return DualNet(clin, derm, head)


RECIPE = replace(EXP001_RECIPE, network=network)
