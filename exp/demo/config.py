"""demo: exp001 shrunk to run end to end on a CPU in about a minute, on a generated miniature MILK10k.

`bash run.sh demo` generates the data (SYNTH below) into output/demo/input, trains exp001 with these settings,
blends and writes a submission; `bash run.sh demo EXP` applies the same settings on top of any other experiment
(e.g. `bash run.sh demo exp002`), and the tests start from them too. The tiny backbone and 64 px inputs test the
machinery, not the recipe.
"""
PARENT = "exp001"
SYNTH = dict(n_train=400, n_test=80, seed=0)  # the generated miniature dataset
OVERRIDES = dict(
    data_dir="output/demo/input",
    output_dir="output/demo",
    submission_dir="output/demo/submissions",
    backbone="test_efficientnet",                  # timm's 0.1M-parameter test network, no download
    pretrained=False,
    img_size=64,
    batch_size=32,
    stage1_epochs=1,
    stage1_lr=3e-3,
    epochs=10,
    lr=3e-3,
    backbone_lr=2e-3,
    warmup_epochs=0.0,
    patience=4,
    num_workers=0,
    eval_batch_size=128,
    meta_features="extended",                      # 400 lesions are too few for exp001's 381 interaction features
)
