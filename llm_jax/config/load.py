"""Loading a config: configs/base.yaml (every default, documented) <- a preset <- `section.key=value`
overrides, each key checked against the schema (llm_jax/config/schema.py), each value typed by its
annotation, and the whole config validated (llm_jax/config/checks.py) before anything compiles.

The config layer also owns the config files a run keeps: a run saves its resolved config as
RUN_CONFIG in its directory, which is how train.init_from finds the starting run's model.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from llm_jax.config.checks import validate
from llm_jax.config.schema import Config
from llm_jax.errors import UserError

# The presets: inside the package when installed from a wheel (pyproject.toml ships configs/ as
# llm_jax/configs), else the checkout's top-level configs/.
_PACKAGED = Path(__file__).resolve().parents[1] / "configs"
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[2] / "configs"
RUN_CONFIG = "config.yaml"  # a run directory's resolved config


# ---------------------------------------------------------------------------------------------
# Loading: base.yaml <- preset <- overrides, each key checked against the schema.


def load_config(preset: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Resolves base.yaml, then `preset` (a path or a name in configs/), then `key=value` strings."""
    tree = _read_yaml(CONFIG_DIR / "base.yaml")
    explicit = set()
    if preset is not None:
        path = resolve_preset(preset)
        update = _read_yaml(path)
        _merge(tree, update, origin=str(path))
        model = update.get("model") or {}  # _merge checked that it is a section
        explicit |= {f"{k}.{sub}" for k, v in model.items() if isinstance(v, dict) for sub in v} | set(model)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form section.key=value")
        _set_dotted(tree, key.strip(), raw.strip())
        explicit.add(key.strip().removeprefix("model."))
    if tree["train"]["init_from"] not in (None, "", "null", "none"):
        _inherit_model(tree, Path(str(tree["train"]["init_from"])).expanduser(), explicit)
    return _build(Config, tree, prefix="")


def _inherit_model(tree: dict, init_run: Path, explicit: set[str]) -> None:
    """train.init_from: model keys the preset and overrides leave unset come from the starting run."""
    saved = saved_tree(init_run)
    if saved is None:
        raise UserError(
            f"train.init_from={str(init_run)!r} is not a run directory (no {RUN_CONFIG}); "
            "train the starting model first, or point init_from at its run_dir"
        )
    for key, value in saved.get("model", {}).items():
        if isinstance(value, dict) and isinstance(tree["model"].get(key), dict):  # a subsection (moe): key by key
            tree["model"][key] |= {k: v for k, v in value.items() if f"{key}.{k}" not in explicit}
        elif key in tree["model"] and key not in explicit:
            tree["model"][key] = value


def saved_tree(run_dir: str | Path) -> dict | None:
    """The raw config tree a run was made with (its RUN_CONFIG), or None where there is none."""
    path = Path(run_dir).expanduser() / RUN_CONFIG
    return _read_yaml(path) if path.is_file() else None


def resolve_preset(preset: str | Path) -> Path:
    path = Path(preset).expanduser()
    if path.is_file():
        return path
    named = CONFIG_DIR / f"{preset}.yaml"
    if named.is_file():
        return named
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base")
    raise UserError(f"config {str(preset)!r} not found: give a YAML path or one of {', '.join(names)}")


def config_from_dict(tree: dict) -> Config:
    """Rebuilds a Config from `to_dict` output (e.g. a run's saved config.yaml)."""
    base = _read_yaml(CONFIG_DIR / "base.yaml")
    _merge(base, tree, origin="saved config")
    return _build(Config, base, prefix="")


def to_dict(cfg: Any) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _read_yaml(path: Path) -> dict:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    return tree


def _known_keys() -> list[str]:
    keys = []
    for name, tp in _hints(Config).items():
        keys += [f"{name}.{sub}" for sub in _hints(tp)] if dataclasses.is_dataclass(tp) else [name]
    return keys


def _unknown(key: str, origin: str) -> UserError:
    near = difflib.get_close_matches(key, _known_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else "; configs/base.yaml lists every key"
    return UserError(f"unknown config key {key!r} in {origin}{hint}")


def _merge(tree: dict, update: dict, origin: str, prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in tree:
            raise _unknown(dotted, origin)
        if isinstance(tree[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"{dotted} in {origin} is a section; give its keys, e.g. {dotted}.<key>: value")
            _merge(tree[key], value, origin, prefix=f"{dotted}.")
        else:
            tree[key] = value


def _set_dotted(tree: dict, key: str, raw: str) -> None:
    node, parts = tree, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise _unknown(key, "the command line")
        if i == len(parts) - 1:
            if isinstance(node[part], dict):
                raise UserError(f"{key} is a section; override its keys, e.g. {key}.<key>=value")
            node[part] = _RawString(raw)
        else:
            node = node[part]


class _RawString(str):
    """A command-line value: parsed by the schema type, not by YAML's guesses."""


# ---------------------------------------------------------------------------------------------
# Typing: every value is converted by its annotation; errors name the key and the expected type.


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, tree: dict, prefix: str) -> Any:
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in tree:
            raise UserError(f"config key {key!r} is missing from configs/base.yaml")
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            values[f.name] = _build(tp, tree[f.name], prefix=f"{key}.")
        else:
            values[f.name] = _coerce(tree[f.name], tp, key)
    cfg = cls(**values)
    if cls is Config:
        validate(cfg)
    return cfg


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # `X | None`
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is tuple:
        if isinstance(value, _RawString):
            try:
                value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
            except yaml.YAMLError:
                raise UserError(
                    f"{key}={value}: not a valid list; quote items that hold YAML syntax, e.g. "
                    f'{key}=\'["first item?", "second"]\', or give a, b, c'
                ) from None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except ValueError:
        pass
    raise UserError(f"{key} must be {getattr(tp, '__name__', tp)}, got {value!r}")
