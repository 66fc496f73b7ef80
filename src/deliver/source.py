"""What a predict SOURCE is and how it is found: an experiment, a blend or an export, resolved to the experiments
(``Member``) it predicts with, their blend weights, its decision rule and thresholds (``Source``).

SOURCE is what made a submission: an experiment (``<output_dir>/<name>/`` and its submission's sidecar
``<submission_dir>/<name>.json``), a blend (its sidecar names the experiments and their weights) or an export (a
folder or ``.tar.gz`` written by ``bash run.sh export``; src/deliver/export.py opens it). A stacker brings its inputs along
as members. Each member's settings are the ones its folds were trained with (its config.json); only settings that
do not change results (paths, device, eval_batch_size, ...) may be given as key=value.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Config, ConfigError, config_from_dict, experiment_recipe
from ..data import CLASSES
from ..settings import KEYS, merge_keys


class PredictError(ValueError):
    """A source, an input or an output that predict cannot use; the message names what and where."""


# ----------------------------------------------------------------------------------------------------
# sources: what to predict with
# ----------------------------------------------------------------------------------------------------
@dataclass
class Member:
    """One experiment a source predicts with: its folder (an experiment's output folder or its copy in an export),
    the settings its folds were trained with, and how it predicts ('image', 'tabular' or 'stack' over ``inputs``)."""

    name: str
    folder: Path
    cfg: Config
    kind: str
    inputs: list[str] = field(default_factory=list)
    bundle: bool = False

    @property
    def n_folds(self) -> int:
        return self.cfg.n_folds

    def fold_dir(self, k: int) -> Path:
        return self.folder / f"fold{k}"


@dataclass
class Source:
    """What made a submission: its experiments with their blend weights, its decision rule and thresholds."""

    name: str
    kind: str                      # 'experiment', 'blend' or 'export'
    members: dict[str, Member]     # every experiment needed: the blended ones and a stacker's inputs
    weights: dict[str, float]      # the blended experiments, in the sidecar's order
    rule: str
    thresholds: np.ndarray         # the submission's
    thresholds_from: str
    info: dict                     # the sidecar, or the export's bundle.json
    where: Path

    def image_config(self) -> Config | None:
        """The settings of the source's first image experiment (its device, workers, cache); None when it has none."""
        return next((m.cfg for m in self.members.values() if m.kind == "image"), None)

    def describe(self) -> str:
        blend = ", ".join(f"{k} {v:.4f}" for k, v in self.weights.items())
        return (f"{self.kind} {self.name} ({self.where}): {blend}; rule {self.rule}")


def member_kind(cfg: Config) -> tuple[str, list[str]]:
    """('image' | 'tabular' | 'stack', the stacker's inputs) of an experiment, from this checkout's recipe."""
    from ..stacker import StackRecipe, input_names

    recipe = experiment_recipe(cfg.experiment)
    if isinstance(recipe, StackRecipe):
        return "stack", input_names(cfg)
    return ("image" if recipe.images else "tabular"), []


NOT_TAKEN = ("name", "decision")  # the folder is the source's; the rule is the submission's


def split_overrides(args: list[str]) -> dict[str, str]:
    """key=value arguments; only settings that do not change results are accepted (the folds' own settings are
    what predicts). The image settings (and torch with them) are read only when a key is not a shared one."""
    from ..config import parse_cli_overrides

    pairs = parse_cli_overrides(args)
    known = dict(KEYS)
    if set(pairs) - set(known):
        from ..model import BACKBONE_KEYS
        from ..train import IMAGE_KEYS, SPEED_KEYS

        known = merge_keys(KEYS, IMAGE_KEYS, SPEED_KEYS, BACKBONE_KEYS)
    for name in pairs:
        spec = known.get(name)
        if spec is None or name in NOT_TAKEN:
            takes = ", ".join(k for k, s in known.items() if not s.results and k not in NOT_TAKEN)
            raise ConfigError(f"command line: {name}= is not a setting predict takes; it takes the settings that do "
                              f"not change results: {takes}")
        if spec.results:
            raise ConfigError(f"command line: {name}= changes results; predict uses the settings each fold was "
                              f"trained with (only settings that do not change results can be given)")
    return pairs


def saved_config(path: Path, overrides: dict[str, str]) -> Config:
    """The settings an experiment was trained with (its config.json), with those of ``overrides`` it has applied (a
    metadata-only experiment has no device=, for instance)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PredictError(f"{path}: missing (the experiment's settings)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PredictError(f"{path}: not a saved config ({exc})") from None
    try:
        cfg = config_from_dict(saved, source=str(path))
        mine = {k: v for k, v in overrides.items() if k in cfg.declared()}
        return cfg.replace(**mine) if mine else cfg
    except ConfigError as exc:
        raise PredictError(f"{path}: {exc}") from None


def sidecar_source(name: str, overrides: dict[str, str]) -> Source:
    """An experiment or a blend, found through its submission's sidecar ``<submission_dir>/<name>.json``."""
    path = Path(name)
    paths = {k: v for k, v in overrides.items() if k in KEYS}
    base = Config().replace(**paths) if paths else Config()
    sidecar = Path(base.submission_dir) / f"{name}.json"
    if not sidecar.is_file():
        folder = Path(base.output_dir) / name
        if (folder / "config.json").is_file():
            raise PredictError(f"{name}: experiment {folder} has no submission ({sidecar} is missing): `bash run.sh "
                               f"blend {name}` writes it; predict applies the submission's weights and decision rule")
        raise PredictError(f"{name}: no experiment, blend or export of that name (looked for the submission sidecar "
                           f"{sidecar}, the experiment folder {folder}, and a folder or .tar.gz export at {path}); "
                           "give output_dir= / submission_dir= where it was trained")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        weights = {str(k): float(info["weights"][k]) for k in info["experiments"]}
        rule = str(info["decision"])
        thresholds = np.array([float(info["thresholds"][c]) for c in CLASSES])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PredictError(f"{sidecar}: not a submission sidecar of this project ({type(exc).__name__}: {exc})") \
            from None
    members: dict[str, Member] = {}
    todo = list(weights)
    while todo:
        exp_name = todo.pop(0)
        if exp_name in members:
            continue
        folder = Path(base.output_dir) / exp_name
        cfg = saved_config(folder / "config.json", {**overrides, "output_dir": str(base.output_dir)})
        from ..experiment import ExperimentDir

        reason = ExperimentDir(cfg.replace(name=exp_name)).incomplete_reason()
        if reason:
            raise PredictError(reason)
        kind, inputs = member_kind(cfg)
        members[exp_name] = Member(exp_name, folder, cfg, kind, inputs)
        todo += inputs
    kind = "experiment" if list(weights) == [name] else "blend"
    return Source(name, kind, members, weights, rule, thresholds, str(info.get("thresholds_from", "")), info, sidecar)


