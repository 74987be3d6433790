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

from llm_jax.errors import UserError
from llm_jax.rules import rules_table

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
        _validate(cfg)
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


def _validate(cfg: Config) -> None:
    """Every violated constraint at once, each with the numbers involved."""
    m, o, t, d, s, p, c = cfg.model, cfg.optim, cfg.train, cfg.data, cfg.sample, cfg.dpo, cfg.curate
    checks = [
        (all(v > 0 for v in (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim, m.seq_len)),
         "model sizes (vocab_size, d_model, n_layers, n_heads, n_kv_heads, mlp_dim, seq_len) must be positive"),
        (m.n_heads > 0 and m.d_model % m.n_heads == 0,
         f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model}"),
        (m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0,
         f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}"),
        (m.n_heads <= 0 or m.head_dim % 2 == 0,
         f"head_dim = d_model / n_heads = {m.d_model / max(m.n_heads, 1):g} must be even for RoPE"),
        (m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be positive"),
        (m.quant in ("none", "int8", "int4"), f"model.quant={m.quant!r} must be none, int8 or int4"),
        (m.quant != "int4" or (m.d_model % 32 == 0 and m.mlp_dim % 32 == 0),
         f"model.quant=int4 scales groups of 32 inputs: d_model={m.d_model} and mlp_dim={m.mlp_dim} must be "
         "multiples of 32"),
        (m.norm_eps > 0, f"model.norm_eps={m.norm_eps} must be positive"),
        (m.init_std > 0, f"model.init_std={m.init_std} must be positive"),
        (0 <= m.dropout < 1, f"model.dropout={m.dropout} must be in [0, 1)"),
        (m.dtype in ("bfloat16", "float32"), f"model.dtype={m.dtype!r} must be bfloat16 or float32"),
        (m.remat in ("none", "full", "dots"), f"model.remat={m.remat!r} must be none, full or dots"),
        (m.attention in ("auto", "xla", "cudnn", "blocked"),
         f"model.attention={m.attention!r} must be auto, xla, cudnn or blocked"),
        (len(d.sources) > 0, "data.sources is empty: name at least one file, directory, glob or builtin:shakespeare"),
        (0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in (0, 1)"),
        (d.tokenizer_sample_bytes > 0, "data.tokenizer_sample_bytes must be positive"),
        (d.bad_rows in ("strict", "skip"), f"data.bad_rows={d.bad_rows!r} must be strict or skip"),
        (d.shard_mb > 0 and d.workers >= 0 and d.loader_workers >= 0,
         "data.shard_mb must be positive; data.workers and data.loader_workers >= 0"),
        (not (bad := sorted(set(c.rules) - set(CURATE_RULES))),
         f"curate.rules has unknown rules {bad}; known: {', '.join(CURATE_RULES)}"),
        (c.normalize in ("NFC", "NFKC", "none"), f"curate.normalize={c.normalize!r} must be NFC, NFKC or none"),
        (0 < c.min_words <= c.max_words, f"curate.min_words={c.min_words} must be in 1 .. max_words={c.max_words}"),
        (0 < c.min_mean_word_length <= c.max_mean_word_length,
         "curate.min_mean_word_length must be positive and at most max_mean_word_length"),
        (len(c.max_top_ngram) == 3 and len(c.max_dup_ngram) == 6,
         "curate.max_top_ngram needs 3 values (2- to 4-grams), max_dup_ngram 6 (5- to 10-grams)"),
        (c.near_dedup is None or 0 < c.near_dedup <= 1, f"curate.near_dedup={c.near_dedup} must be in (0, 1] or null"),
        (c.shingle_words > 0 and c.minhash_perms >= 8, "curate.shingle_words must be positive, minhash_perms >= 8"),
        (t.objective in ("pretrain", "sft", "dpo"), f"train.objective={t.objective!r} must be pretrain, sft or dpo"),
        (t.objective != "dpo" or bool(t.init_from),
         "train.objective=dpo needs train.init_from: the run whose model is the policy's start and the reference"),
        (p.beta > 0, f"dpo.beta={p.beta} must be positive"),
        (p.loss in ("sigmoid", "ipo"), f"dpo.loss={p.loss!r} must be sigmoid or ipo"),
        (0 <= p.label_smoothing < 0.5, f"dpo.label_smoothing={p.label_smoothing} must be in [0, 0.5)"),
        (p.chosen_nll >= 0, f"dpo.chosen_nll={p.chosen_nll} must be >= 0"),
        (p.reference in ("precomputed", "in_step"), f"dpo.reference={p.reference!r} must be precomputed or in_step"),
        (o.lr > 0, f"optim.lr={o.lr} must be positive"),
        (0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]"),
        (0 <= o.warmup_steps, f"optim.warmup_steps={o.warmup_steps} must be >= 0"),
        (0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1={o.b1} and optim.b2={o.b2} must be in [0, 1)"),
        (o.eps > 0, f"optim.eps={o.eps} must be positive"),
        (o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0"),
        (o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables)"),
        (t.steps > 0, f"train.steps={t.steps} must be positive"),
        (t.batch_size > 0 and t.grad_accum > 0, "train.batch_size and train.grad_accum must be positive"),
        (t.grad_accum <= 0 or t.batch_size % t.grad_accum == 0,
         f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size}"),
        (min(t.log_every, t.eval_every, t.eval_batches, t.checkpoint_every, t.keep_checkpoints) > 0,
         "train.log_every, eval_every, eval_batches, checkpoint_every and keep_checkpoints must be positive"),
        (sum(v == -1 for v in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)) <= 1
         and all(v == -1 or v > 0 for v in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)),
         "mesh sizes must be positive, with at most one -1 (which takes the remaining devices)"),
        (cfg.mesh.dcn_data > 0, f"mesh.dcn_data={cfg.mesh.dcn_data} must be positive"),
        (cfg.mesh.pipeline > 0, f"mesh.pipeline={cfg.mesh.pipeline} must be a positive number of stages (no -1)"),
        (cfg.mesh.pipeline <= 0 or m.n_layers % cfg.mesh.pipeline == 0,
         f"model.n_layers={m.n_layers} does not split into mesh.pipeline={cfg.mesh.pipeline} equal stages: "
         f"make n_layers a multiple of the stage count"),
        (cfg.mesh.microbatches == 0 or cfg.mesh.microbatches >= cfg.mesh.pipeline,
         f"mesh.microbatches={cfg.mesh.microbatches} is fewer than the mesh.pipeline={cfg.mesh.pipeline} stages: "
         f"every stage needs a micro-batch in flight (0 means one per stage)"),
        (t.grad_accum <= 0 or cfg.mesh.pipeline_microbatches <= 0
         or (t.batch_size // t.grad_accum) % cfg.mesh.pipeline_microbatches == 0,
         f"mesh.microbatches={cfg.mesh.pipeline_microbatches} does not divide the {t.batch_size // max(t.grad_accum, 1)} "
         f"sequences of each step (train.batch_size / train.grad_accum)"),
        (s.max_new_tokens > 0, f"sample.max_new_tokens={s.max_new_tokens} must be positive"),
        (s.temperature >= 0, f"sample.temperature={s.temperature} must be >= 0 (0 is greedy)"),
        (s.top_k >= 0, f"sample.top_k={s.top_k} must be >= 0 (0 disables)"),
        (0 < s.top_p <= 1, f"sample.top_p={s.top_p} must be in (0, 1]"),
    ]
    problems = [msg for ok, msg in checks if not ok]
    rules_table(cfg.mesh.rules)  # an unknown preset, file, logical or mesh axis: its own message
    if problems:
        raise UserError("invalid config:\n  - " + "\n  - ".join(problems))
