"""The device a step is traced for, which picks kernels and chunk sizes."""

from __future__ import annotations

import jax


def target_device():
    """The active mesh's device kind (abstract TPU chips under `llm-jax compile`, so a step compiled
    here for a TPU gets the TPU's kernels), else the default device. Has .platform and .device_kind."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device or jax.devices()[0]
