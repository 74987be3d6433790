"""The config schema: one frozen dataclass per section of configs/base.yaml.

The dataclasses hold no defaults: configs/base.yaml holds every default and its documentation, so
there is one place for them. Pure Python: a config is typed and checked before JAX is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

# Quality rules of `curate.rules` (llm_jax/data/filters.py implements each).
CURATE_RULES = (
    "markup",
    "words",
    "mean_word_length",
    "alpha_words",
    "symbols",
    "bullet_lines",
    "ellipsis_lines",
    "dup_lines",
    "dup_ngrams",
    "code",
)


@dataclass(frozen=True)
class MoEConfig:
    experts: int
    top_k: int
    shared_experts: int
    shared_gate: bool
    every: int
    mlp_dim: int
    router: str
    norm_topk: bool
    aux_loss: float
    bias_update: float
    z_loss: float
    capacity_factor: float


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # 0 in the YAML: d_model / n_heads, resolved in __post_init__
    mlp_dim: int
    seq_len: int
    rope_theta: float
    rope_scaling: tuple[float, ...]
    qkv_bias: bool
    qk_norm: bool
    norm_eps: float
    tie_embeddings: bool
    init_std: float
    dropout: float
    dtype: str
    remat: str
    attention: str
    context_parallel: str
    quant: str
    moe: MoEConfig

    def __post_init__(self):
        if self.head_dim == 0 and self.n_heads > 0 and self.d_model % self.n_heads == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)

    @property
    def expert_dim(self) -> int:
        """An expert's SwiGLU hidden width (model.moe.mlp_dim; 0: model.mlp_dim)."""
        return self.moe.mlp_dim or self.mlp_dim

    def is_moe(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) routes its MLP over experts: the last of each group of moe.every."""
        return self.moe.experts > 0 and (layer + 1) % self.moe.every == 0


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...]
    mixture: tuple[str, ...]
    prepared: str | None
    text_field: str
    txt_split_kb: float
    cache_dir: str
    val_fraction: float
    tokenizer: str | None
    tokenizer_sample_bytes: int
    val_sources: tuple[str, ...]
    bad_rows: str
    tfds_data_dir: str | None
    shard_mb: float
    workers: int
    engine: str
    beam_options: tuple[str, ...]
    loader_workers: int
    progress_s: float
    decontaminate: tuple[str, ...]


@dataclass(frozen=True)
class CurateConfig:
    rules: tuple[str, ...]
    normalize: str
    whitespace: str
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
    name: str
    lr: float
    schedule: str
    min_lr_ratio: float
    warmup_steps: int
    decay_fraction: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    grad_clip: float
    z_loss: float


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
    context: int
    tensor: int
    expert: int
    dcn_data: int
    rules: str
    microbatches: int
    pipeline_repeats: int

    @property
    def pipeline_microbatches(self) -> int:
        return self.microbatches or self.pipeline

    @property
    def pipeline_bubble(self) -> float:
        """The share of a pipelined step in which stages compute on padding: (S - 1) / (R M + S - 1)."""
        stages = self.pipeline
        return (stages - 1) / (self.pipeline_repeats * self.pipeline_microbatches + stages - 1)


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
