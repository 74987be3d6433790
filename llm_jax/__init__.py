"""llm_jax: build a large language model from scratch in JAX."""

__version__ = "0.1.0"
