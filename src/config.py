"""One experiment's resolved settings (``Config``) and the loading of an experiment folder.

An experiment is a folder ``exp/<name>/`` holding

- ``config.py``: values only; what differs from its parent, with the hypothesis in its docstring::

      PARENT = "exp001"          # or None for the shared defaults below
      OVERRIDES = dict(img_size=384, ema_decay=0.999)

- ``train.py``: code; which features, network, loss and stages the experiment builds from the library's parts
  (its ``RECIPE``), each part declaring the settings it reads, and optionally ``KEYS``: settings its own code reads
  outside those parts.

An experiment's settings are the shared ones (src/settings.py: data and paths, folds, seed, decision, tracking) plus
its recipe's parts' keys plus its ``KEYS``; nothing else (``experiment_keys``). ``load_config(name, ["key=value",
...])`` resolves the chain of parents, applies command-line overrides last, and refuses unknown keys, values of the
wrong type and values out of range. Each key is declared once (``key``: its default, its help, its allowed values or
range, and whether it changes what a fold computes); the fingerprint of a result, the ``--help`` text and every check
are derived from those declarations. ``Config.to_json`` is what every run saves.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import field
from pathlib import Path
from typing import Any, Mapping

from .settings import KEYS, PLAIN_NAME, SHARED, Key, key, keys_of, merge_keys, reads  # noqa: F401 (key, reads:
# what experiment scripts declare with)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXP_ROOT = REPO_ROOT / "exp"
EXP_PATH_ENV = "MILK10K_EXP_PATH"  # extra folders holding experiments (os.pathsep-separated), searched first


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, wrong type, bad value, a broken experiment file."""


class _ConfigMethods:
    """Paths and serialisation of a Config; an experiment's own keys read like the shared ones (``cfg.key``)."""

    def __getattr__(self, name: str):
        own = self.__dict__.get("own")
        if own is not None and name in own:
            return own[name]
        raise AttributeError(f"Config has no setting {name!r}")

    def exp_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def fold_dir(self, fold: int) -> Path:
        return self.exp_dir() / f"fold{fold}"

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"

    def resolved_folds_csv(self) -> Path:
        if self.folds_csv:
            return Path(self.folds_csv)
        return Path(self.output_dir) / f"folds_k{self.n_folds}_s{self.fold_seed}.csv"

    def to_dict(self) -> dict[str, Any]:
        """Every setting, flat: the shared keys, the experiment's own keys and the experiment it belongs to."""
        return {**{k: getattr(self, k) for k in KEYS}, **self.own, "experiment": self.experiment}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | os.PathLike) -> None:
        from .io_utils import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    def replace(self, **changes: Any) -> "Config":
        return apply_overrides(self, changes, source="replace()")

    def declared(self) -> dict[str, Key]:
        """Every key of this config: the shared ones and its experiment's (none for a Config of no experiment)."""
        return {**KEYS, **experiment_keys(self.experiment)} if self.experiment else dict(KEYS)


Config = dataclasses.make_dataclass(
    "Config",
    [(k, type(v.default), field(default=v.default)) for k, v in KEYS.items()]
    + [("experiment", str, field(default="")), ("own", dict, field(default_factory=dict))],
    bases=(_ConfigMethods,), frozen=True, namespace={"__module__": __name__},
)
Config.__doc__ = ("One experiment's resolved settings: the shared keys (KEYS), its experiment's keys (own: its recipe's "
                  "parts' and its own code's) and the experiment. ``Config()`` belongs to no experiment: the shared "
                  "keys only (paths).")


def config_from_dict(saved: Mapping[str, Any], source: str = "saved config") -> "Config":
    """A Config from ``to_dict`` output (a run's config.json); keys the code no longer knows are refused."""
    values = dict(saved)
    experiment = values.pop("experiment", None) or values.get("name", "exp001")
    base = Config(name=values.get("name", experiment), experiment=experiment, own=_own_defaults(experiment))
    return apply_overrides(base, values, source)


def parse_folds(key_name: str, text: str, n_folds: int) -> list[int]:
    """'0,2' -> [0, 2]; empty = every fold."""
    if not text.strip():
        return list(range(n_folds))
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{key_name}={text!r}: expected a comma list of fold numbers, e.g. '0,2'") from None
    bad = [k for k in out if not 0 <= k < n_folds]
    if bad:
        raise ConfigError(f"{key_name}={text!r}: fold {bad[0]} is outside 0..{n_folds - 1}")
    if len(set(out)) < len(out):
        raise ConfigError(f"{key_name}={text!r}: a fold is listed twice")
    return out


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _coerce(spec: Key, name: str, value: Any, source: str) -> Any:
    """``value`` as the declared type of ``name``; strings from the command line are parsed. Floats must be finite."""
    ftype = spec.type
    where = f"{source}: {name}={value!r}"
    if ftype == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string")
    if ftype == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected a bool (true/false)")
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected {'an int' if ftype == 'int' else 'a float'}, got a bool")
    parse = int if ftype == "int" else float
    try:
        out = parse(value) if isinstance(value, str) or ftype == "float" else value
    except (TypeError, ValueError):
        out = None
    if ftype == "int" and not isinstance(out, int) or ftype == "float" and not isinstance(out, float):
        raise ConfigError(f"{where}: expected {'an int' if ftype == 'int' else 'a float'}")
    if ftype == "float" and not math.isfinite(out):
        raise ConfigError(f"{where}: must be a finite number")
    return out


def parse_bool(name: str, value: Any, source: str) -> bool:
    """A bool from the command line ('true', 'false', '1', '0', 'yes', 'no', 'on', 'off')."""
    return _coerce(Key(False, "", False), name, value, source)


def _check_value(spec: Key, name: str, value: Any, source: str) -> None:
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{source}: {name}={value!r} is not one of {sorted(spec.choices)}")
    if spec.check is not None:
        try:
            spec.check(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {name}={value!r}: {exc}") from None
    if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        if name == "device":
            raise ConfigError(f"{source}: device={value!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if name == "name":
            raise ConfigError(f"{source}: name={value!r}: use a plain name (letters, digits, '.', '_', '-'; no "
                              "'/' and no '..'), e.g. name=exp001_b")
        raise ConfigError(f"{source}: {name}={value!r}: must match {spec.pattern!r}")
    if name == "name" and ".." in value:
        raise ConfigError(f"{source}: name={value!r}: '..' is not allowed in a name")
    lo_ok = spec.low is None or value > spec.low or (not spec.low_open and value == spec.low)
    hi_ok = spec.high is None or value < spec.high or (not spec.high_open and value == spec.high)
    if not (lo_ok and hi_ok):
        raise ConfigError(f"{source}: {name}={value!r}: must be {spec.allowed()}")


def _unknown(name: str, known, source: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if name in ("folds", "retrain"):
        hint = f" ({name}= is an argument of `bash run.sh EXP`, not a setting)"
    return ConfigError(f"{source}: unknown config key {name!r}{hint}; `bash run.sh <exp> --help` lists the keys")


def apply_overrides(cfg: "Config", overrides: Mapping[str, Any], source: str) -> "Config":
    declared = cfg.declared()
    shared, own = {}, dict(cfg.own)
    for name, value in overrides.items():
        if name == "experiment":
            if value != cfg.experiment:
                raise ConfigError(f"{source}: experiment={value!r}: the experiment is the folder a run is started "
                                  f"from ({cfg.experiment!r}); use name= for another output folder")
            continue
        spec = declared.get(name)
        if spec is None:
            raise _unknown(name, declared, source)
        value = _coerce(spec, name, value, source)
        _check_value(spec, name, value, source)
        (shared if name in KEYS else own)[name] = value
    new = dataclasses.replace(cfg, **shared, own=own)
    _validate(new, source)
    return new


def _validate(cfg: "Config", source: str) -> None:
    """Combinations the experiment's recipe cannot use (``validate``), before anything runs."""
    validate = getattr(experiment_recipe(cfg.experiment), "validate", None) if cfg.experiment else None
    why = validate(cfg) if validate is not None else None
    if why:
        raise ConfigError(f"{source}: {why}")


def parse_cli_overrides(args: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep or not name:
            raise ConfigError(f"command line: {arg!r} is not key=value")
        out[name.strip()] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# experiment folders
# --------------------------------------------------------------------------------------------------------------
def experiment_roots() -> list[Path]:
    extra = [Path(p) for p in os.environ.get(EXP_PATH_ENV, "").split(os.pathsep) if p]
    return [*extra, EXP_ROOT]


def experiment_dir(name: str) -> Path | None:
    if not PLAIN_NAME.fullmatch(name or "") or ".." in name:
        return None
    for root in experiment_roots():
        if (root / name / "config.py").is_file():
            return root / name
    return None


def experiment_names() -> list[str]:
    """Every experiment: a folder holding a config.py and a train.py (a folder with only a config.py, such as
    exp/demo, is a preset of values applied on top of an experiment)."""
    names = {p.name for root in experiment_roots() if root.is_dir() for p in root.iterdir()
             if (p / "config.py").is_file() and (p / "train.py").is_file()}
    return sorted(names)


def _exec_file(path: Path, module_name: str, fresh: bool = False):
    """Execute one experiment file; a mistake in it is one line naming the file and the line. A script is loaded
    once per process as ``exp.<name>.train``, from whichever experiment root holds it (MILK10K_EXP_PATH's or the
    repo's), so a child anywhere can import its parent's; ``fresh``: executed anew at every call (values only)."""
    try:
        if not fresh:
            if str(REPO_ROOT) not in sys.path:
                sys.path.insert(0, str(REPO_ROOT))
            import exp

            exp.__path__ = [str(r) for r in experiment_roots()]
            return importlib.import_module(f"exp.{path.parent.name}.{path.stem}")
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except ConfigError:
        raise
    except SyntaxError as exc:
        raise ConfigError(f"{path}, line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the file does wrong, name the file and the line
        line = next((f.lineno for f in reversed(_frames(exc)) if Path(f.filename) == path), None)
        where = f"{path}, line {line}" if line else str(path)
        raise ConfigError(f"{where}: {type(exc).__name__}: {exc}") from None


def _frames(exc: BaseException):
    import traceback

    return traceback.extract_tb(exc.__traceback__)


def experiment_module(name: str):
    """The module ``exp/<name>/config.py``, executed."""
    folder = experiment_dir(name)
    if folder is None:
        raise ConfigError(f"no experiment {name!r}: no exp/{name}/config.py "
                          f"(known: {', '.join(experiment_names()) or 'none'})")
    return _exec_file(folder / "config.py", f"exp_{name}_config", fresh=True)


def experiment_script(name: str):
    """The module ``exp/<name>/train.py`` (the experiment's code), executed; None for a folder without one."""
    folder = experiment_dir(name)
    if folder is None or not (folder / "train.py").is_file():
        return None
    return _exec_file(folder / "train.py", f"exp_{name}_train")


def experiment_recipe(name: str):
    """The ``RECIPE`` of ``exp/<name>/train.py``: what the experiment builds, handed to the runner."""
    script = experiment_script(name)
    recipe = getattr(script, "RECIPE", None)
    if recipe is None:
        where = f"exp/{name}/train.py"
        raise ConfigError(f"{where} is missing or defines no RECIPE; an experiment folder holds config.py (values) "
                          f"and train.py (its code; a child that only changes values has `from exp.<parent>.train "
                          f"import *`)" if script is not None else f"experiment {name!r} has no {where}")
    return recipe


def experiment_key_groups(name: str) -> dict[str, dict[str, Key]]:
    """The keys of experiment ``name`` beyond the shared ones, by who reads them: each part of its recipe
    (``RECIPE.key_groups()``), then its own code (``KEYS`` of exp/<name>/train.py)."""
    script = experiment_script(name)
    groups = {g: dict(k) for g, k in experiment_recipe(name).key_groups().items() if k}
    own = dict(getattr(script, "KEYS", {}) or {})
    if own:
        groups[f"{name}'s own (exp/{name}/train.py)"] = own
    where = f"exp/{name}/train.py"
    for group, keys in groups.items():
        clash = sorted(set(keys) & set(KEYS))
        if clash:
            raise ConfigError(f"{where}: {group} keys {clash} are shared settings already; give them other names")
    try:
        merge_keys(*groups.values(), where=where)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return groups


def experiment_keys(name: str) -> dict[str, Key]:
    """Every key of experiment ``name`` beyond the shared ones: its recipe's parts' and its own code's."""
    return merge_keys(*experiment_key_groups(name).values())


def experiment_code(name: str) -> dict[str, str]:
    """The code of experiment ``name``, file by file (path from its experiment root's parent, e.g.
    'exp/exp003/train.py' -> the first 16 hex digits of its SHA-256, byte for byte): its train.py and every module of
    the experiment tree that it imports, directly or through a parent's (``from exp.exp001.train import ...``,
    ``from .heads import ...``). Library code under src/ is not part of it."""
    out: dict[str, str] = {}
    todo = [(name, "train")]
    while todo:
        exp_name, module = todo.pop()
        folder = experiment_dir(exp_name)
        path = folder / f"{module}.py" if folder is not None else None
        if path is None or not path.is_file():
            continue
        rel = path.relative_to(folder.parent.parent).as_posix()
        if rel in out:
            continue
        data = path.read_bytes()
        out[rel] = hashlib.sha256(data).hexdigest()[:16]
        todo += _imported_modules(data, exp_name)
    return dict(sorted(out.items()))


def _imported_modules(source: bytes, exp_name: str) -> list[tuple[str, str]]:
    """(experiment, module) of every import of the experiment tree in ``source``: ``exp.<name>.<module>`` or, inside
    an experiment's folder, ``.<module>``."""
    found = []
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return found
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [tuple(a.name.split(".")[1:3]) for a in node.names
                      if a.name.startswith("exp.") and a.name.count(".") == 2]
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 1:
                found += [(exp_name, parts[0])] if node.module else [(exp_name, a.name) for a in node.names]
            elif node.level == 0 and parts[0] == "exp" and len(parts) == 3:
                found.append((parts[1], parts[2]))
            elif node.level == 0 and parts[0] == "exp" and len(parts) == 2:
                found += [(parts[1], a.name) for a in node.names]
    return found


def _own_defaults(name: str) -> dict[str, Any]:
    return {k: v.default for k, v in experiment_keys(name).items()}


def _config_file(name: str) -> tuple[str | None, dict[str, Any], str]:
    module = experiment_module(name)
    overrides = getattr(module, "OVERRIDES", {})
    parent = getattr(module, "PARENT", None)
    where = f"exp/{name}/config.py"
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: OVERRIDES must be a dict of key=value settings, got {type(overrides).__name__}")
    if parent is not None and not isinstance(parent, str):
        raise ConfigError(f"{where}: PARENT must be an experiment name or None, got {parent!r}")
    return parent, dict(overrides), (module.__doc__ or "").strip()


def experiment_chain(name: str) -> list[tuple[str, dict[str, Any], str]]:
    chain: list[tuple[str, dict[str, Any], str]] = []
    seen: set[str] = set()
    current: str | None = name
    while current is not None:
        if current in seen:
            raise ConfigError(f"experiment {name!r}: PARENT cycle through {current!r}")
        seen.add(current)
        parent, overrides, doc = _config_file(current)
        chain.append((current, overrides, doc))
        current = parent
    return list(reversed(chain))


def load_config(name: str, cli: list[str] | dict[str, Any] | None = None, preset: str | None = None) -> "Config":
    """The config of experiment ``name``: its chain of parents from the shared defaults, then (``preset``) the
    OVERRIDES of another experiment's own file (e.g. the demo's small settings on top of exp002), then the command
    line ``cli``. A value a parent or the preset sets for a key of its own experiment that ``name`` does not have (a
    child that replaces its parent's loss has none of its loss keys) is skipped; any other unknown key is refused."""
    experiment_module(name)  # a clear error for an unknown name before anything else
    if experiment_script(name) is None:
        raise ConfigError(f"experiment {name!r} has no exp/{name}/train.py: an experiment folder holds config.py "
                          f"(values) and train.py (its code; `from exp.<parent>.train import *` reuses a parent's)"
                          + (" -- exp/demo is a preset: `bash run.sh demo EXP`" if name == "demo" else ""))
    cfg = Config(name=name, experiment=name, own=_own_defaults(name))
    chain = experiment_chain(name)
    if preset is not None:
        chain.append((preset, _config_file(preset)[1], ""))
    known = cfg.declared()
    for exp_name, overrides, _ in chain:
        if "name" in overrides:
            raise ConfigError(f"exp/{exp_name}/config.py: 'name' comes from the folder name; remove it")
        if exp_name != name:
            theirs = _chain_keys(exp_name)
            overrides = {k: v for k, v in overrides.items() if k in known or k not in theirs}
        cfg = apply_overrides(cfg, overrides, f"exp/{exp_name}/config.py")
    if cli:
        pairs = parse_cli_overrides(cli) if isinstance(cli, list) else dict(cli)
        cfg = apply_overrides(cfg, pairs, "command line")
    return cfg


def _chain_keys(name: str) -> set[str]:
    """The keys of ``name``'s experiment, or for a preset (no train.py) those of the experiments it extends."""
    if experiment_script(name) is not None:
        return set(experiment_keys(name))
    return {k for parent, _, _ in experiment_chain(name)[:-1] for k in _chain_keys(parent)}


def load_named(name: str, cli: list[str] | None = None) -> "Config":
    """The config of ``name``: an experiment folder (``load_config``), or else a run given ``name=`` (the settings it
    saved in ``<output_dir>/<name>/config.json``, output_dir as ``cli`` gives it); ``cli`` applied last (only the keys
    that run has)."""
    if experiment_dir(name) is not None:
        return load_config(name, cli)
    pairs = parse_cli_overrides(cli or [])
    saved = Path(pairs.get("output_dir", KEYS["output_dir"].default)) / (name or "?") / "config.json"
    if not PLAIN_NAME.fullmatch(name or "") or ".." in name or not saved.is_file():
        raise ConfigError(f"no experiment {name!r} (no exp/{name}/config.py; known: "
                          f"{', '.join(experiment_names()) or 'none'}) and no run of that name ({saved} is missing; "
                          "give output_dir= where it was trained)")
    try:
        values = json.loads(saved.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{saved}: not a saved config ({exc})") from None
    cfg = config_from_dict(values, source=str(saved))
    return apply_overrides(cfg, {k: v for k, v in pairs.items() if k in cfg.declared()}, "command line")


def describe(cfg: "Config") -> str:
    """The ``--help`` text: every key, by concern, with its type, resolved value, allowed values and meaning."""
    lines = [f"Keys of {cfg.name} (experiment {cfg.experiment}; override any with key=value; * = changes results):"]
    seen: set[str] = set()
    groups = [("data", list(SHARED["data"].items()))]
    for group, keys in experiment_key_groups(cfg.experiment).items():
        groups.append((group, [(k, v) for k, v in keys.items() if k not in seen]))
        seen |= set(keys)
    groups += [(g, list(SHARED[g].items())) for g in SHARED if g != "data"]
    groups = [(g, items) for g, items in groups if items]
    width = max(len(k) for _, items in groups for k, _ in items)
    for group, items in groups:
        lines += ["", f"[{group}]"]
        for k, spec in items:
            allowed = spec.allowed()
            lines.append(f"  {k:<{width}} {'*' if spec.results else ' '} {spec.type:<5} = {getattr(cfg, k)!r:<24} "
                         f"{spec.help}" + (f" [{allowed}]" if spec.low is not None or spec.high is not None else ""))
    lines += ["", "Arguments of the run itself: folds=0,2 (the folds to train; default all), retrain=true (retrain "
              "folds made under other settings or data instead of refusing them)."]
    return "\n".join(lines)
