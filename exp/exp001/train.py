"""exp001's code: the reference design, built from the library's parts.

Features: the metadata features named by ``meta_features`` (exp001: exp000's interaction features), z-scored on
the training fold with ``meta_standardize``. Network: the two backbones and ``LinearHead``, one linear layer over
[clinical embedding, dermoscopic embedding, metadata] (src/model.py). Loss: the library's ``WeightedLoss`` (BCE with
class-wise pos_weight, src/loss.py). Stages: stage 1 trains the classifier alone with its own weight decay and, with
``stage1_schedule=cosine``, a cosine schedule over its epochs (a logistic regression over ~900 features needs that
regularisation and those epochs; exp/exp001/config.py has the measured effect); stage 2 is the library's
(``stage_optimizer``: backbones at ``backbone_lr``, head at ``lr``, warmup + cosine).
"""
import torch

from src.config import key, reads
from src.features import FEATURE_KINDS, MetadataFeatures
from src.step import cosine_factor, stage_optimizer
from src.train import ImageRecipe


@reads(meta_features=key("base", "metadata features: 'base' (age, sex, skin tone, site, MONET scores, "
                         "manipulation), 'extended' (plus MONET logits, clinical-minus-dermoscopic differences, age "
                         "hinges and interactions) or 'interactions' (extended plus splines of age and the MONET "
                         "logits, site x MONET and MONET x MONET, as exp000's model uses)", results=True,
                         choices=FEATURE_KINDS),
       meta_standardize=key(False, "z-score every metadata feature with the training fold's mean and std",
                            results=True))
def features(cfg) -> MetadataFeatures:
    return MetadataFeatures(cfg.meta_features, standardize=cfg.meta_standardize)


@reads(stage_optimizer.keys,
       stage1_schedule=key("constant", "stage-1 schedule: 'constant' or 'cosine' (down to 1% by its last step)",
                           results=True, choices=("constant", "cosine")),
       stage1_weight_decay=key(1e-2, "AdamW weight decay of the classifier in stage 1 (backbones frozen)",
                               results=True, low=0))
def optimizer(cfg, model, stage: int, steps_per_epoch: int, fused: bool):
    """Stage 1: AdamW on the classifier at ``stage1_lr`` with ``stage1_weight_decay``, constant or cosine over the
    stage; stage 2: the library's."""
    if stage == 2:
        return stage_optimizer(cfg, model, stage, steps_per_epoch, fused)
    opt = torch.optim.AdamW(model.head_parameters(), lr=cfg.stage1_lr, weight_decay=cfg.stage1_weight_decay,
                            fused=fused)
    total = max(1, cfg.stage1_epochs * steps_per_epoch)
    if cfg.stage1_schedule == "constant":
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(min(1.0, step / total)))


RECIPE = ImageRecipe(features=features, optimizer=optimizer)
