"""The experiment folder as the unit of research: a new idea's code lives in its own folder (config.py + train.py),
runs end to end through the one runner, and blends with the others; a new decision rule is one registry entry."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from src.config import experiment_recipe, load_config
from src.data import CLASSES
from src.runner import run_experiment

from .conftest import tiny

HEAD_CODE = '''"""tmpexp: exp001 with a head of its own: the metadata through a bilinear gate of the two embeddings."""
from dataclasses import replace

import torch
from torch import nn

from exp.exp001.train import RECIPE as PARENT
from src.config import key, reads
from src.model import BACKBONE_KEYS, DualNet, backbones


class ProductHead(nn.Module):
    def __init__(self, emb_dim, n_meta, n_classes, width):
        super().__init__()
        self.a, self.b = nn.Linear(emb_dim // 2, width), nn.Linear(emb_dim // 2, width)
        self.classifier = nn.Linear(emb_dim + n_meta + width, n_classes)

    def forward(self, emb, meta):
        half = emb.shape[1] // 2
        prod = self.a(emb[:, :half]) * self.b(emb[:, half:])
        return self.classifier(torch.cat([emb, meta, prod], dim=1)), None


@reads(BACKBONE_KEYS, mix_width=key(4, "width of the product features", results=True, low=1))
def network(cfg, n_meta, n_aux):
    clin, derm = backbones(cfg)
    return DualNet(clin, derm, ProductHead(2 * clin.num_features, n_meta, 11, cfg.mix_width))


RECIPE = replace(PARENT, network=network)
'''


@pytest.fixture()
def own_experiment(tmp_path, monkeypatch):
    """An experiment with its own network code, in a folder outside the repo (MILK10K_EXP_PATH)."""
    root = tmp_path / "experiments"
    (root / "tmpexp").mkdir(parents=True)
    (root / "tmpexp" / "config.py").write_text('"""tmpexp: a head of its own."""\nPARENT = "exp001"\n'
                                               'OVERRIDES = dict(mix_width=3)\n')
    (root / "tmpexp" / "train.py").write_text(HEAD_CODE)
    monkeypatch.setenv("MILK10K_EXP_PATH", str(root))
    return root


@pytest.mark.slow
def test_an_experiment_with_its_own_network_code_runs_end_to_end(own_experiment, mini_data, tmp_path):
    from src.submission import finalize
    from src.train import read_checkpoint

    cfg = load_config("tmpexp", tiny(mini_data, tmp_path / "out", epochs=1, n_folds=2, tta=False))
    assert cfg.mix_width == 3 and cfg.experiment == "tmpexp"
    result = run_experiment(cfg)
    assert result["complete"] and set(result) >= {"macro_f1_threshold_honest", "macro_f1_expected_f1_honest"}
    state = read_checkpoint(cfg.fold_dir(0) / "best.pt")["model"]
    assert state["head.a.weight"].shape[0] == 3                     # the experiment's own head was trained
    saved = json.loads((cfg.fold_dir(0) / "fingerprint.json").read_text())
    assert saved["settings"]["mix_width"] == 3 and saved["settings"]["experiment"] == "tmpexp"
    summary = finalize(cfg, [cfg])
    sub = pd.read_csv(summary["paths"]["submission"])
    assert list(sub.columns) == ["lesion_id", *CLASSES] and len(sub) == 30
    # its own key changes results: the folds refuse another value
    from src.experiment import StaleOutputs

    with pytest.raises(StaleOutputs, match="mix_width=3 -> 5"):
        run_experiment(cfg.replace(mix_width=5))


def test_exp003_starts_as_exp001_and_learns_per_lesion_gates():
    cfg = load_config("exp003", ["backbone=test_efficientnet", "pretrained=false"])
    torch.manual_seed(0)
    ref = experiment_recipe("exp001").network(cfg, 7, 0).eval()
    torch.manual_seed(0)
    net = experiment_recipe("exp003").network(cfg, 7, 0).eval()
    x, y, m = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 7)
    assert torch.equal(ref(x, y, m)[0], net(x, y, m)[0])             # every gate is 1 at the start
    with torch.no_grad():
        net.head.gate.weight.normal_()
    emb = net.embed(x, y)
    gates = net.head.gates(emb, m)
    assert gates.shape == (4, 2) and ((gates > 0) & (gates < 2)).all() and gates.std(0).min() > 0
    assert not torch.equal(ref(x, y, m)[0], net(x, y, m)[0])


def test_a_new_decision_rule_is_one_registry_entry(monkeypatch):
    """Registered once, a rule is scored honestly, reported by the blend and may be chosen by decision=auto."""
    from src import decision
    from src.blend import evaluate

    rule = decision.Rule("top1", False, lambda y, p, batch: np.full(batch.shape[1], 0.0), "f1_top1_honest",
                         "top1", "every class positive", 3)
    monkeypatch.setitem(decision.RULES, "top1", rule)
    rng = np.random.default_rng(0)
    y = np.eye(11)[rng.integers(0, 11, 200)]
    p = np.clip(0.3 * y + 0.7 * rng.random((200, 11)), 0, 1)
    folds = np.arange(200) % 4
    honest = decision.honest_scores(y, p, folds)
    assert set(honest) == {"threshold", "expected_f1", "none", "top1"}
    expected = float(np.mean([2 * y[:, j].sum() / (y[:, j].sum() + 200) for j in range(11)]))
    assert honest["top1"] == pytest.approx(expected)
    assert decision.choose_rule("auto", {**honest, "top1": 1.0})[0] == "top1"
    ev = evaluate(y, p[None], folds)
    assert ev.scores["f1_top1_honest"] == pytest.approx(expected)
