"""exp001: the reference design.

Two ImageNet-1k EfficientNetV2-S backbones, one for the clinical close-up and one for the dermoscopic image;
their pooled embeddings are concatenated with the metadata features (age, sex, skin tone, site, both images'
MONET scores, manipulation flags) and fed to one linear classifier. 256x256 inputs; BCEWithLogitsLoss with
class-wise pos_weight = neg/pos; stage 1 trains the classifier with the backbones frozen, stage 2 fine-tunes
everything (lower backbone learning rate, warmup + cosine) with early stopping on validation macro F1 computed as
the leaderboard does. 5 stratified folds, 8-view TTA, per-class thresholds folded into the submission.
"""
PARENT = None
OVERRIDES = dict(
    backbone="tf_efficientnetv2_s.in1k",
    img_size=256,
    meta_mode="concat",
    loss="bce",
    pos_weight_power=1.0,
    stage1_epochs=2,
    epochs=15,
    batch_size=64,
)
