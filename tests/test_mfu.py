"""MFU's peak FLOP/s: found by the device_kind JAX reports, never by a near miss."""

import pytest

from llm_jax.train.metrics import chip_peak_flops


@pytest.mark.parametrize(
    "kind, peak",
    [  # the TPU kinds as libtpu 0.0.42's abstract v4, v5e, v5p and v6e topologies name their chips
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
    ],
)
def test_each_kind_jax_reports_finds_its_chip(kind, peak):
    assert chip_peak_flops(kind) == peak


def test_names_jax_does_not_report_find_nothing():
    assert (
        chip_peak_flops("TPU v5p") is None and chip_peak_flops("TPU v5e") is None and chip_peak_flops("TPU v7") is None
    )
