"""`llm-jax compile`: the tiny config's steps compiled by the real XLA TPU compiler (libtpu, from the
dev extra) for abstract TPU chips on this CPU machine, and the figures read off the compiled HLO."""

from __future__ import annotations

import csv
import json

import jax
import pytest

from llm_jax.cli import main
from llm_jax.config import RUN_CONFIG, load_config, save_config
from llm_jax.errors import UserError
from llm_jax.parallel import chips, gpu_target
from llm_jax.parallel.chips import CHIPS, abstract_devices, chip_of_kind, parse_topology
from llm_jax.parallel.sharding import single_device_layout
from llm_jax.tools.compile import compile_config
from llm_jax.tools.hlo import hlo_stats, jaxpr_flops, shape_bytes
from llm_jax.tools.plan import argument_bytes
from llm_jax.train.objectives import objective_of
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.step import make_steps

pytestmark = pytest.mark.skipif(not chips.has_libtpu(), reason="libtpu is in the dev extra; CI has it")

# seq 128: splash takes whole 128-multiple sequences; 8 rows over 8 chips
TINY = ["model.seq_len=128", "train.batch_size=8"]


def _tiny(*overrides):
    return load_config("tiny", [*TINY, *overrides])


@pytest.mark.parametrize("topology", ["v5e-8", "v5p-16"])
def test_the_train_step_compiles_with_the_splash_kernel(topology):
    cfg = _tiny("model.attention=splash", "mesh.data=1", "mesh.fsdp=8", "mesh.rules=fsdp")
    top = parse_topology(topology)
    (train,) = compile_config(cfg, top, ("train",))
    # exactly plan's state bytes, (8, 128) tiles included (the tiny model's 16-wide heads pad to 128)
    assert train.memory["arguments"] == argument_bytes(cfg, {"data": 1, "fsdp": 8, "tensor": 1}, "tpu")
    assert train.memory["arguments"] > argument_bytes(cfg, {"data": 1, "fsdp": 8, "tensor": 1}, "cpu")
    assert 0 < train.memory["peak"] < top.chip.hbm
    assert train.collectives["all-gather"][0] + train.collectives["all-reduce"][0] > 0  # fsdp: weights gathered
    assert train.flops > train.xla_flops  # XLA counts the scanned layers' body once


@pytest.mark.parametrize(
    "topology,rules,mesh", [("v5e-8", "dp", (8, 1, 1)), ("v5p-16", "fsdp", (1, 8, 1)), ("v6e-8", "fsdp_tp", (2, 2, 2))]
)
def test_compiled_arguments_equal_plans_state_bytes(topology, rules, mesh):
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh))
    cfg = _tiny("model.n_kv_heads=4", f"mesh.rules={rules}", *(f"mesh.{k}={v}" for k, v in sizes.items()))
    (train,) = compile_config(cfg, parse_topology(topology), ("train",))
    assert train.memory["arguments"] == argument_bytes(cfg, sizes, "tpu")


def test_the_compiled_hlo_holds_the_mosaic_kernel_not_interpret_mode():
    cfg = _tiny("model.attention=splash", "mesh.data=8")
    layout = _layout(cfg, "v5e-8")
    from llm_jax.model.attention import prebuild_splash

    prebuild_splash(cfg.model)
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, 10), example=objective_of(cfg).example_row(cfg, "train"))
    text = steps.compile_train().as_text()
    assert 'custom_call_target="tpu_custom_call"' in text  # Mosaic: the Pallas kernel compiled for the TPU


def test_continuous_batchings_decode_compiles_with_the_pallas_paged_attention_kernel():
    """serve's paged steps: on TPU the decode attends through jax's paged-attention kernel (heads of 128),
    each device holding its kv heads of the block pool; a 16-wide head falls back to gathering blocks."""
    wide = ["model.d_model=512", "model.mlp_dim=1024", "mesh.data=4", "mesh.tensor=2"]
    prefill, decode = compile_config(_tiny(*wide), parse_topology("v5e-8"), ("paged_prefill", "paged_decode"))
    assert (prefill.kernels, decode.kernels) == (0, 1)  # prompt chunks gather their blocks
    # the donated pool, per chip: k and v, 2 layers, 16 x 8 blocks + 1 scratch split over data 4 (32 + 1
    # scratch each), 16 positions x 128, 1 of the 2 kv heads (tensor 2), float32 (tiny's model.dtype)
    assert decode.memory["aliased"] == 2 * 2 * (32 + 1) * 16 * 128 * 1 * 4 < decode.memory["arguments"]
    (narrow,) = compile_config(_tiny("mesh.data=8"), parse_topology("v5e-8"), ("paged_decode",))
    assert narrow.kernels == 0 and narrow.memory["peak"] > 0


def _layout(cfg, topology):
    from llm_jax.parallel.sharding import make_layout

    return make_layout(cfg.mesh, abstract_devices(parse_topology(topology)))


def test_pipelined_steps_compile_and_pass_activations_between_stages():
    gathered = {}
    for repeats in (1, 2):  # GPipe, and circular: stage s holds chunks s and s + 2 of 4 one-layer chunks
        cfg = _tiny(
            "mesh.data=4", "mesh.pipeline=2", f"mesh.pipeline_repeats={repeats}", "model.n_layers=4",
            "mesh.rules=fsdp_tp", "model.attention=xla",
        )  # fmt: skip
        (train,) = compile_config(cfg, parse_topology("v5e-8"), ("train",))
        assert train.collectives["collective-permute"][0] > 0  # stage s hands its micro-batch to s + 1
        gathered[repeats] = train.collectives["all-gather"][1]
    # nothing is gathered: no stage fetches another's weights, no tick the batch's activations
    assert gathered == {1: 0, 2: 0}


@pytest.mark.parametrize("form", ["ring", "all_gather"])
def test_a_context_parallel_step_compiles_for_tpu(form):
    cfg = _tiny("mesh.data=2", "mesh.context=4", "mesh.rules=fsdp_tp", f"model.context_parallel={form}")
    (train,) = compile_config(cfg, parse_topology("v5e-8"), ("train",))
    # the ring passes K/V blocks to the next device; all_gather collects them
    assert train.collectives["collective-permute" if form == "ring" else "all-gather"][0] > 0


def test_an_expert_parallel_moe_step_compiles_for_tpu_with_the_grouped_matmul():
    cfg = _tiny("model.moe.experts=8", "mesh.expert=4", "mesh.data=2", "mesh.rules=fsdp_tp")  # 2 experts a chip
    (train,) = compile_config(cfg, parse_topology("v5e-8"), ("train",))
    assert train.collectives["all-gather"][0] > 0 and train.collectives["reduce-scatter"][0] > 0  # tokens to experts
    assert 0 < train.memory["peak"] < parse_topology("v5e-8").chip.hbm
    steps = make_steps(cfg, _layout(cfg, "v5e-8"), make_optimizer(cfg.optim, 10))
    assert "ragged-dot" in steps.compile_train().as_text()  # XLA:TPU's grouped matmul, not the CPU's blocks


def test_two_slices_over_dcn_data_compile():
    # 128-wide heads: libtpu 0.0.50 (jax 0.12) cannot fuse the cross-slice reduce-scatter of the
    # tiny model's 64-wide arrays ("AllReduceScatterFusion not implemented for 2nd-minor compaction")
    wide = ["model.d_model=128", "model.n_heads=1", "model.n_kv_heads=1", "model.mlp_dim=256"]
    cfg = _tiny("mesh.data=8", "mesh.dcn_data=2", "mesh.rules=dp", *wide)
    top = parse_topology("v5e-4", slices=2)
    devices = abstract_devices(top)
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    (train,) = compile_config(cfg, top, ("train",))
    assert train.collectives["send"][0] > 0  # the gradient sum crosses the data-center network
    assert train.collectives["all-reduce"][0] + train.collectives["reduce-scatter"][0] > 0  # and each slice's ICI


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_post_training_objectives_compile_every_step(objective, tmp_path):
    start = tmp_path / "pretrained"  # only its config is read: the model to start from
    start.mkdir()
    save_config(_tiny(), start / RUN_CONFIG)
    cfg = _tiny(f"train.objective={objective}", f"train.init_from={start}", "mesh.data=8", "model.attention=xla")
    steps = compile_config(cfg, parse_topology("v6e-8"))
    assert [s.step for s in steps] == ["train", "eval", "prefill", "decode", "paged_prefill", "paged_decode"]
    assert all(s.memory["peak"] > 0 for s in steps)


def test_every_supported_topology_reports_a_kind_the_peak_table_knows():
    for name, slice_name in (("v4", "v4-16"), ("v5e", "v5e-8"), ("v5p", "v5p-16"), ("v6e", "v6e-8")):
        devices = abstract_devices(parse_topology(slice_name))
        assert len(devices) == 8
        assert chip_of_kind(devices[0].device_kind) is CHIPS[name]


def test_trip_counts_make_the_flops_match_the_six_n_d_rule():
    """remat none: one forward and a backward of twice its matmuls, counted through the scans."""
    cfg = _tiny("model.remat=none", "model.attention=xla", "model.n_kv_heads=2", "train.grad_accum=2")
    layout = single_device_layout()
    steps = make_steps(cfg, layout, make_optimizer(cfg.optim, 10), example=objective_of(cfg).example_row(cfg, "train"))
    with layout.activate():
        traced = steps.jit_train.trace(steps.abstract_state, steps.abstract_batch)
    m = cfg.model
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    matrices = m.n_layers * (m.d_model * (2 * q + 2 * kv) + 3 * m.d_model * m.mlp_dim) + m.d_model * m.vocab_size
    attention = m.n_layers * 2 * m.seq_len * q  # scores and their use, full T x T (the xla kernel)
    tokens = cfg.train.batch_size * m.seq_len
    assert jaxpr_flops(traced.jaxpr) == 6 * (matrices + attention) * tokens
    # XLA's own count sees each scan body once: the compiled step reports far less
    xla = traced.lower().compile().cost_analysis()["flops"]
    assert xla < 0.7 * jaxpr_flops(traced.jaxpr)


def test_hlo_loops_multiply_their_bodies():
    text = """HloModule m
%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8] get-tuple-element(%p), index=1
  %s = f32[8] all-reduce(%x), replica_groups={}, to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8]) tuple(%i, %s)
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %g = f32[32] all-gather(%a), dimensions={0}
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""
    stats = hlo_stats(text)
    assert stats.loops == [5]
    assert stats.collectives["all-reduce"] == [5, 5 * 2 * 32]  # 32 bytes, sent twice by a ring, 5 times
    assert stats.collectives["all-gather"] == [1, 128]
    assert shape_bytes("(bf16[4,8]{1,0:T(8,128)(2,1)}, s32[])") == 64 + 4


def test_a_scatter_counts_its_updates_not_its_whole_buffer():
    """XLA updates a scatter's operand in place (as a dynamic-update-slice's): a KV pool written at a
    few positions moves the indices and updates, not the pool; fused or not."""
    text = """HloModule m
%fused (p0: f32[1000,16], p1: s32[4,1], p2: f32[4,16]) -> f32[1000,16] {
  %p0 = f32[1000,16] parameter(0)
  %p1 = s32[4,1] parameter(1)
  %p2 = f32[4,16] parameter(2)
  ROOT %s = f32[1000,16] scatter(%p0, %p1, %p2), update_window_dims={1}, to_apply=%add
}
ENTRY %main (pool: f32[1000,16], i: s32[4,1], u: f32[4,16]) -> f32[1000,16] {
  %pool = f32[1000,16] parameter(0)
  %i = s32[4,1] parameter(1)
  %u = f32[4,16] parameter(2)
  %a = f32[1000,16] scatter(%pool, %i, %u), update_window_dims={1}, to_apply=%add
  ROOT %b = f32[1000,16] fusion(%a, %i, %u), kind=kLoop, calls=%fused
}
"""
    assert hlo_stats(text).hbm_bytes == 2 * (16 + 256 + 256)  # each: read indices and updates, write updates
    dus = text.replace(
        "scatter(%pool, %i, %u), update_window_dims={1}, to_apply=%add", "dynamic-update-slice(%pool, %u, %j, %j)"
    )
    dus = dus.replace(
        "%u = f32[4,16] parameter(2)\n  %a", "%u = f32[4,16] parameter(2)\n  %j = s32[] constant(0)\n  %a"
    )
    # the dynamic-update-slice reads its two s32 start indices and its update and writes the update
    assert "dynamic-update-slice" in dus and hlo_stats(dus).hbm_bytes == (8 + 256 + 256) + (16 + 256 + 256)


def test_compile_command_prints_every_step_and_json(capsys):
    args = ["compile", "--config", "tiny", "--topology", "v5e-8", "mesh.data=8", *TINY]
    main(args)
    out = capsys.readouterr().out
    assert "v5e-8: 8 v5e chips | mesh data=8 pipeline=1 fsdp=1 expert=1 context=1 tensor=1" in out
    for step in ("train", "eval", "prefill", "decode", "paged_prefill", "paged_decode"):
        assert f"\n{step} " in out
    main([*args, "--json", "--steps", "train"])
    record = json.loads(capsys.readouterr().out)
    assert record["chips"] == 8 and list(record["steps"]) == ["train"]
    assert record["steps"]["train"]["roofline"]["step_s"] > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--topology", "v5q-8"], "unknown topology 'v5q-8'"),
        (["--topology", "v5e-12"], "a v5e slice holds a power of two of chips, not 12"),
        (["--topology", "l4-8"], "compiling knows a100, h100, h200 GPUs"),
        (
            ["--topology", "v5e-8", "mesh.data=16"],
            "v5e-8: 8 v5e chips: mesh data=16 pipeline=1 fsdp=1 expert=1 context=1 tensor=1 needs 16",
        ),
        (["--topology", "v5e-8", "--steps", "train,backward"], "unknown backward"),
    ],
)
def test_bad_input_gets_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "--config", "tiny", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_without_libtpu_the_command_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(chips, "has_libtpu", lambda: False)
    with pytest.raises(UserError, match=r"needs libtpu beside jax: pip install 'llm_jax\[tpu\]'"):
        abstract_devices(parse_topology("v5e-8"))


def test_no_array_is_created_on_the_abstract_chips():
    """Everything is traced from shapes: the default backend stays the CPU and holds no new buffer."""
    before = len(jax.live_arrays())
    compile_config(_tiny("mesh.data=8"), parse_topology("v5e-8"), ("train",))
    assert jax.devices()[0].platform == "cpu" and len(jax.live_arrays()) == before


def test_rank_compiles_layouts_drops_what_does_not_fit_and_orders_the_rest(tmp_path, capsys):
    main(["plan", "--config", "tiny", "--topology", "v5e-8", "--rank", "--max-layouts", "3", "--out", str(tmp_path),
          *TINY, "model.attention=xla"])  # fmt: skip
    out = capsys.readouterr().out
    assert "layouts of v5e-8: 8 v5e chips divide the model" in out and "compiling 3 (--max-layouts 3:" in out
    rows = list(csv.DictReader((tmp_path / "rank.csv").open()))
    assert len(rows) == 3 and (tmp_path / "rank.png").stat().st_size > 0
    times = [float(r["step_ms"]) for r in rows]
    assert times == sorted(times) and all(r["fits"] == "True" for r in rows)
    assert rows[0]["mesh"] in out.split("ranked")[1].splitlines()[2]  # the table's first row is the fastest


def test_rank_candidates_cover_the_axes_the_model_divides():
    from llm_jax.tools.rank import candidates, label, spread

    cfg = load_config("llama-7b")
    layouts = candidates(cfg, parse_topology("v5p-256"))
    names = [label(c) for c in layouts]
    assert {"64x2x1", "32x1x4", "64x1x1 p2m8", "1x128x1"} <= set(names)
    assert "128x1x1" not in names  # replicated 7B state (16 bytes a parameter) is over 95 GiB
    first = [label(c) for c in spread(layouts, 4)]  # one per tensor x pipeline choice, most data-parallel
    assert first == ["64x2x1", "64x1x2", "64x1x1 p2m8", "32x1x4"]


@pytest.mark.skipif(gpu_target.has_cuda_plugin(), reason="this checks the message where jax's CUDA plugin is absent")
def test_a_gpu_topology_without_the_cuda_plugin_says_what_to_install():
    with pytest.raises(UserError, match=r"needs jax's CUDA plugin: pip install 'llm_jax\[cuda\]' \(no GPU is needed\)"):
        abstract_devices(parse_topology("h100-8"))


@pytest.mark.skipif(not gpu_target.has_cuda_plugin(), reason="jax's CUDA plugin: pip install 'llm_jax[cuda]'")
def test_the_train_step_compiles_for_abstract_h100s():
    """Deviceless XLA:GPU (no GPU, no CUDA library): attention xla, as cuDNN's needs its library to trace."""
    cfg = _tiny("model.attention=xla", "mesh.data=1", "mesh.fsdp=8", "mesh.rules=fsdp")
    devices = abstract_devices(parse_topology("h100-8"))
    assert len(devices) == 8 and chip_of_kind(devices[0].device_kind) is CHIPS["h100"]
    (train,) = compile_config(cfg, parse_topology("h100-8"), ("train",))
    assert train.memory["peak"] > train.memory["arguments"] > 0
    assert train.collectives["all-reduce"][0] + train.collectives["all-gather"][0] > 0


def test_the_gpu_target_describes_the_chip_the_peak_table_names():
    text = gpu_target.target_config(gpu_target.SPECS["h100"])
    assert "core_count: 132" in text and "cuda_compute_capability { major: 9 minor: 0 }" in text
    assert chip_of_kind(gpu_target.SPECS["h100"].name) is CHIPS["h100"]
    assert chip_of_kind(gpu_target.SPECS["a100"].name) is CHIPS["a100"]
