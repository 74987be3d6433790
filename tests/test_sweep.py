"""`llm-jax sweep`: compiled memory and timed steps per layout, CSV and PNG, clear errors."""

from __future__ import annotations

import csv

import pytest

from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.parallel.sharding import parse_meshes
from llm_jax.tools.sweep import run_sweep


@pytest.mark.slow
def test_sweep_measures_each_layout_and_skips_the_ones_that_do_not_fit(tmp_path, capsys):
    main(
        [
            "sweep",
            "--config",
            "tiny",
            "--meshes",
            "8,1,1; 1,8,1; 1,1,8; 4,1,1,2,2; 2,1,1,1,0,4; 4,1,1,2,2,1,2",
            "--batch-sizes",
            "8",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
            "model.n_kv_heads=4",
            "model.n_layers=4",
            "model.dtype=float32",
            "mesh.rules=fsdp_tp",
        ]
    )
    rows = {r["mesh"]: r for r in csv.DictReader((tmp_path / "sweep.csv").open())}
    assert list(rows) == ["8x1x1", "1x8x1", "1x1x8", "4x1x1 p2m2", "2x1x1 c4", "4x1x1 p2m2r2"]
    dp, fsdp, bad = rows["8x1x1"], rows["1x8x1"], rows["1x1x8"]
    for r in (dp, fsdp):
        assert r["error"] == "" and float(r["tokens_per_s"]) > 0 and float(r["compile_s"]) > 0
        assert int(r["peak_bytes"]) >= int(r["arg_bytes"]) > 0
    # fsdp splits parameters and AdamW state 8 ways; data parallelism replicates them.
    assert int(fsdp["arg_bytes"]) * 4 < int(dp["arg_bytes"])
    assert "heads=4 is split over mesh tensor=8 = 8 shards" in bad["error"]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "8x1x1 |     8 |" in out and "skipped: heads=4" in out
    # Two stages of two layers each hold half the layer parameters per device; 2 micro-batches
    # leave a bubble of (2 - 1) / (2 + 2 - 1) = 33% in theory, measured against 8x1x1.
    piped = rows["4x1x1 p2m2"]
    assert piped["error"] == "" and int(piped["arg_bytes"]) < int(dp["arg_bytes"])
    assert float(piped["bubble_theory"]) == pytest.approx(1 / 3) and piped["bubble_measured"] != ""
    assert "4x1x1 p2m2, batch 8: bubble 33.3% in theory" in out
    # circular: each stage holds 2 chunks of one layer, every micro-batch goes round twice:
    # (2 - 1) / (2 x 2 + 2 - 1) = 20%
    circular = rows["4x1x1 p2m2r2"]
    assert circular["error"] == "" and circular["arg_bytes"] == piped["arg_bytes"]
    assert float(circular["bubble_theory"]) == pytest.approx(1 / 5) and circular["bubble_measured"] != ""
    # the sequence split over 4 devices of the context axis (data 2): each holds a quarter of every row
    assert rows["2x1x1 c4"]["error"] == "" and float(rows["2x1x1 c4"]["tokens_per_s"]) > 0


@pytest.mark.parametrize(
    "text,message",
    [
        ("2,4", "mesh '2,4' in --meshes must be data,fsdp,tensor"),
        ("8,1,x", "mesh '8,1,x' in --meshes must be data,fsdp,tensor"),
        ("0,8,1", "mesh '0,8,1' in --meshes must be data,fsdp,tensor"),
        ("-1,-1,8", "mesh '-1,-1,8' in --meshes must be data,fsdp,tensor"),
        (" ; ", "--meshes is empty"),
    ],
)
def test_malformed_meshes_name_the_layout(text, message):
    with pytest.raises(UserError, match=message):
        parse_meshes(text)


def test_a_sweep_where_nothing_fits_is_an_error():
    with pytest.raises(UserError, match="no layout fits: 1x1x8: heads=4 is split"):
        run_sweep(load_config("tiny", ["model.n_kv_heads=4"]), [(1, 1, 8, 1, 0, 1, 1, 1)], [8], 1, log=lambda *_: None)


def test_batch_sizes_are_swept_and_one_that_does_not_split_is_listed(capsys):
    cfg = load_config("tiny", ["model.n_kv_heads=4"])
    rows = run_sweep(cfg, [(2, 2, 2, 1, 0, 1, 1, 1)], [2, 8], 1, log=lambda *_: None)
    assert [(r["mesh"], r["batch_size"]) for r in rows] == [("2x2x2", 2), ("2x2x2", 8)]
    assert "batch=2 is split over mesh data=2 x fsdp=2 = 4 shards" in rows[0]["error"]
    assert rows[1]["error"] == "" and rows[1]["tokens_per_s"] > 0 and rows[1]["peak_bytes"] > 0


def test_bad_batch_sizes_and_grad_accum_are_user_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--config", "tiny", "--meshes", "8,1,1", "--batch-sizes", "8,x", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--batch-sizes '8,x' must be comma-separated" in capsys.readouterr().err
    with pytest.raises(UserError, match="8x1x1: train.grad_accum=3 must divide train.batch_size=8"):
        run_sweep(
            load_config("tiny", ["train.batch_size=6", "train.grad_accum=3"]),
            [(8, 1, 1, 1, 0, 1, 1, 1)],
            [8],
            1,
            log=lambda *_: None,
        )
