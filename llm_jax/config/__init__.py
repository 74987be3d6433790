"""Configuration: the schema, loading (base.yaml <- preset <- overrides), checks and the
logical-axis rules. Pure Python, so a config is checked before JAX is imported."""

from llm_jax.config.load import (
    CONFIG_DIR,
    RUN_CONFIG,
    config_from_dict,
    load_config,
    resolve_preset,
    save_config,
    saved_tree,
    to_dict,
)
from llm_jax.config.schema import (
    CURATE_RULES,
    Config,
    CurateConfig,
    DataConfig,
    DistributedConfig,
    DPOConfig,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)

__all__ = [
    "CONFIG_DIR",
    "CURATE_RULES",
    "RUN_CONFIG",
    "Config",
    "CurateConfig",
    "DPOConfig",
    "DataConfig",
    "DistributedConfig",
    "MeshConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimConfig",
    "SampleConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "resolve_preset",
    "save_config",
    "saved_tree",
    "to_dict",
]
