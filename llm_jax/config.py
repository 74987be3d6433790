"""Typed configuration: configs/base.yaml holds every default and its documentation; a preset and
`section.key=value` overrides are layered on top, typed by the dataclasses below (which hold no
defaults, so there is one place for them) and validated before anything compiles."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from llm_jax.config_checks import validate
from llm_jax.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Quality rules of `curate.rules` (llm_jax/data/filters.py implements each).
CURATE_RULES = ("markup", "words", "mean_word_length", "alpha_words", "symbols", "bullet_lines", "ellipsis_lines",
                "dup_lines", "dup_ngrams", "code")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_dim: int
    seq_len: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    init_std: float
    dropout: float
    dtype: str
    remat: str
    attention: str
    quant: str

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...]
    text_field: str
    cache_dir: str
    val_fraction: float
    tokenizer: str | None
    tokenizer_sample_bytes: int
    val_sources: tuple[str, ...]
    bad_rows: str
    tfds_data_dir: str | None
    shard_mb: float
    workers: int
    loader_workers: int


@dataclass(frozen=True)
class CurateConfig:
    rules: tuple[str, ...]
    normalize: str
    strip_markup: bool
    max_markup: float
    min_words: int
    max_words: int
    min_mean_word_length: float
    max_mean_word_length: float
    min_alpha_words: float
    max_symbol_ratio: float
    max_bullet_lines: float
    max_ellipsis_lines: float
    max_dup_lines: float
    max_dup_line_chars: float
    max_top_ngram: tuple[float, ...]
    max_dup_ngram: tuple[float, ...]
    max_code_lines: float
    exact_dedup: bool
    near_dedup: float | None
    shingle_words: int
    minhash_perms: int


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    b1: float
    b2: float
    eps: float
    weight_decay: float
    grad_clip: float


@dataclass(frozen=True)
class TrainConfig:
    objective: str
    init_from: str | None
    steps: int
    batch_size: int
    grad_accum: int
    log_every: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    keep_checkpoints: int
    checkpoint_dir: str | None


@dataclass(frozen=True)
class DPOConfig:
    beta: float
    loss: str
    label_smoothing: float
    chosen_nll: float
    reference: str


@dataclass(frozen=True)
class MeshConfig:
    data: int
    pipeline: int
    fsdp: int
    tensor: int
    dcn_data: int
    rules: str
    microbatches: int

    @property
    def pipeline_microbatches(self) -> int:
        return self.microbatches or self.pipeline


@dataclass(frozen=True)
class DistributedConfig:
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    timeout_s: int


@dataclass(frozen=True)
class SampleConfig:
    prompts: tuple[str, ...]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    system: str | None


@dataclass(frozen=True)
class Config:
    run_dir: str
    seed: int
    model: ModelConfig
    data: DataConfig
    curate: CurateConfig
    optim: OptimConfig
    train: TrainConfig
    dpo: DPOConfig
    mesh: MeshConfig
    distributed: DistributedConfig
    sample: SampleConfig


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
        explicit |= set(update.get("model") or {})  # _merge checked that it is a section
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
    saved = init_run / "config.yaml"
    if not saved.is_file():
        raise UserError(f"train.init_from={str(init_run)!r} is not a run directory (no config.yaml); "
                        "train the starting model first, or point init_from at its run_dir")
    model = _read_yaml(saved).get("model", {})
    for key, value in model.items():
        if key in tree["model"] and key not in explicit:
            tree["model"][key] = value


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
                raise UserError(f"{key}={value}: not a valid list; quote items that hold YAML syntax, e.g. "
                                f"{key}='[\"first item?\", \"second\"]', or give a, b, c") from None
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
