"""Config constraints: every violated one listed at once, each with the numbers involved and the
fix. Pure Python, run before JAX is imported (llm_jax/config/load.py calls it on every load).
What depends on train.objective is checked by that objective (llm_jax/train/objectives.py)."""

from __future__ import annotations

from pathlib import Path

from llm_jax.config.mixture import parse_mixture
from llm_jax.config.rules import rules_table
from llm_jax.config.schema import CURATE_RULES, Config, MeshConfig, ModelConfig
from llm_jax.errors import UserError


def validate(cfg: Config) -> None:
    """Every violated constraint at once, each with the numbers involved."""
    m, o, t, d, s, p, c = cfg.model, cfg.optim, cfg.train, cfg.data, cfg.sample, cfg.dpo, cfg.curate
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.context, cfg.mesh.tensor)
    quant_group = 16 if m.quant == "nvfp4" else 32  # inputs sharing a scale (model/dense.py's GROUPS)
    checks = _moe_checks(m, cfg.mesh) + [
        (
            all(v > 0 for v in (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim, m.seq_len)),
            "model sizes (vocab_size, d_model, n_layers, n_heads, n_kv_heads, mlp_dim, seq_len) must be positive",
        ),
        (
            m.head_dim > 0,
            f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model}, or set model.head_dim"
            if m.head_dim == 0
            else f"model.head_dim={m.head_dim} must be positive (0: d_model / n_heads)",
        ),
        (
            m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0,
            f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}",
        ),
        (
            m.head_dim <= 0 or m.head_dim % 2 == 0,
            f"head_dim = {m.head_dim} must be even for RoPE (model.head_dim, or d_model / n_heads where it is 0)",
        ),
        (m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be positive"),
        (
            not m.rope_scaling
            or (len(m.rope_scaling) == 4 and min(m.rope_scaling) > 0 and m.rope_scaling[2] > m.rope_scaling[1]),
            f"model.rope_scaling={list(m.rope_scaling)} must be [] or [factor, low_freq_factor, "
            "high_freq_factor, original_context], all positive, high_freq_factor > low_freq_factor",
        ),
        (
            m.quant in ("none", "int8", "int4", "fp4", "nvfp4"),
            f"model.quant={m.quant!r} must be none, int8, int4, fp4 or nvfp4",
        ),
        (
            m.quant not in ("int4", "fp4", "nvfp4")
            or all(x % quant_group == 0 for x in (m.d_model, m.mlp_dim, m.n_heads * m.head_dim)),
            f"model.quant={m.quant} scales groups of {quant_group} inputs: d_model={m.d_model}, mlp_dim={m.mlp_dim} "
            f"and n_heads x head_dim={m.n_heads * m.head_dim} must be multiples of {quant_group}",
        ),
        (m.norm_eps > 0, f"model.norm_eps={m.norm_eps} must be positive"),
        (m.init_std > 0, f"model.init_std={m.init_std} must be positive"),
        (0 <= m.dropout < 1, f"model.dropout={m.dropout} must be in [0, 1)"),
        (m.dtype in ("auto", "bfloat16", "float32"), f"model.dtype={m.dtype!r} must be auto, bfloat16 or float32"),
        (m.remat in ("none", "full", "dots"), f"model.remat={m.remat!r} must be none, full or dots"),
        (
            m.attention in ("auto", "xla", "cudnn", "blocked", "splash"),
            f"model.attention={m.attention!r} must be auto, xla, cudnn, blocked or splash",
        ),
        (
            m.context_parallel in ("ring", "all_gather"),
            f"model.context_parallel={m.context_parallel!r} must be ring or all_gather",
        ),
        (
            cfg.mesh.context == 1 or m.attention in ("auto", "xla", "blocked"),
            f"model.attention={m.attention} cannot take a sequence split over mesh.context={cfg.mesh.context}: "
            "use model.attention=auto (context-parallel attention is its own kernel) or mesh.context=1",
        ),
        (
            cfg.mesh.context <= 1 or m.seq_len % (2 * cfg.mesh.context) == 0,
            f"model.seq_len={m.seq_len} must split into 2 x mesh.context={cfg.mesh.context} equal chunks "
            "(each device holds two, one early and one late, so the causal work is balanced)",
        ),
        (
            cfg.mesh.context == 1 or cfg.mesh.pipeline == 1,
            "mesh.context > 1 with mesh.pipeline > 1 is not supported yet: choose one of them",
        ),
        (cfg.distributed.timeout_s > 0, f"distributed.timeout_s={cfg.distributed.timeout_s} must be positive"),
        (len(d.sources) > 0, "data.sources is empty: name at least one file, directory, glob or builtin:shakespeare"),
        (not d.mixture or t.objective == "pretrain", f"data.mixture is for pretraining, not objective {t.objective}"),
        (not d.prepared or t.objective == "pretrain", f"data.prepared is for pretraining, not objective {t.objective}"),
        (not d.mixture or d.loader_workers == 0, "data.mixture is read in the training thread: data.loader_workers=0"),
        (0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in (0, 1)"),
        (d.tokenizer_sample_bytes > 0, "data.tokenizer_sample_bytes must be positive"),
        (d.bad_rows in ("strict", "skip"), f"data.bad_rows={d.bad_rows!r} must be strict or skip"),
        (d.txt_split_kb >= 0, f"data.txt_split_kb={d.txt_split_kb} must be >= 0 (0: a document per .txt file)"),
        (
            d.shard_mb > 0 and d.workers >= 0 and d.loader_workers >= 0 and d.progress_s >= 0,
            "data.shard_mb must be positive; data.workers, data.loader_workers and data.progress_s >= 0",
        ),
        (d.engine in ("local", "beam"), f"data.engine={d.engine!r} must be local or beam"),
        (
            not (missing := [x for x in d.decontaminate if x != "bundled" and not Path(x).expanduser().is_file()]),
            f"data.decontaminate: {missing[0] if missing else ''} not found: name eval task files or 'bundled'",
        ),
        (
            not (bad := sorted(set(c.rules) - set(CURATE_RULES))),
            f"curate.rules has unknown rules {bad}; known: {', '.join(CURATE_RULES)}",
        ),
        (c.normalize in ("NFC", "NFKC", "none"), f"curate.normalize={c.normalize!r} must be NFC, NFKC or none"),
        (c.whitespace in ("collapse", "keep"), f"curate.whitespace={c.whitespace!r} must be collapse or keep"),
        (0 < c.min_words <= c.max_words, f"curate.min_words={c.min_words} must be in 1 .. max_words={c.max_words}"),
        (
            0 < c.min_mean_word_length <= c.max_mean_word_length,
            "curate.min_mean_word_length must be positive and at most max_mean_word_length",
        ),
        (
            len(c.max_top_ngram) == 3 and len(c.max_dup_ngram) == 6,
            "curate.max_top_ngram needs 3 values (2- to 4-grams), max_dup_ngram 6 (5- to 10-grams)",
        ),
        (c.near_dedup is None or 0 < c.near_dedup <= 1, f"curate.near_dedup={c.near_dedup} must be in (0, 1] or null"),
        (c.shingle_words > 0 and c.minhash_perms >= 8, "curate.shingle_words must be positive, minhash_perms >= 8"),
        (p.beta > 0, f"dpo.beta={p.beta} must be positive"),
        (p.loss in ("sigmoid", "ipo"), f"dpo.loss={p.loss!r} must be sigmoid or ipo"),
        (0 <= p.label_smoothing < 0.5, f"dpo.label_smoothing={p.label_smoothing} must be in [0, 0.5)"),
        (p.chosen_nll >= 0, f"dpo.chosen_nll={p.chosen_nll} must be >= 0"),
        (p.reference in ("precomputed", "in_step"), f"dpo.reference={p.reference!r} must be precomputed or in_step"),
        (o.name in ("adamw", "muon"), f"optim.name={o.name!r} must be adamw or muon"),
        (o.schedule in ("cosine", "wsd"), f"optim.schedule={o.schedule!r} must be cosine or wsd"),
        (0 < o.decay_fraction <= 1, f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]"),
        (o.z_loss >= 0, f"optim.z_loss={o.z_loss} must be >= 0"),
        (o.lr > 0, f"optim.lr={o.lr} must be positive"),
        (0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]"),
        (o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0"),
        (0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1={o.b1} and optim.b2={o.b2} must be in [0, 1)"),
        (o.eps > 0, f"optim.eps={o.eps} must be positive"),
        (o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0"),
        (o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables)"),
        (t.steps > 0, f"train.steps={t.steps} must be positive"),
        (t.batch_size > 0 and t.grad_accum > 0, "train.batch_size and train.grad_accum must be positive"),
        (
            t.grad_accum <= 0 or t.batch_size % t.grad_accum == 0,
            f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size}",
        ),
        (
            min(t.log_every, t.eval_every, t.eval_batches, t.checkpoint_every, t.keep_checkpoints) > 0,
            "train.log_every, eval_every, eval_batches, checkpoint_every and keep_checkpoints must be positive",
        ),
        (
            sum(v == -1 for v in sizes) <= 1 and all(v == -1 or v > 0 for v in sizes),
            "mesh sizes must be positive, with at most one -1 (which takes the remaining devices)",
        ),
        (cfg.mesh.dcn_data > 0, f"mesh.dcn_data={cfg.mesh.dcn_data} must be positive"),
        (cfg.mesh.pipeline > 0, f"mesh.pipeline={cfg.mesh.pipeline} must be a positive number of stages (no -1)"),
        (
            cfg.mesh.pipeline <= 0 or m.n_layers % cfg.mesh.pipeline == 0,
            f"model.n_layers={m.n_layers} does not split into mesh.pipeline={cfg.mesh.pipeline} equal stages: "
            f"make n_layers a multiple of the stage count",
        ),
        (
            cfg.mesh.pipeline_repeats > 0,
            f"mesh.pipeline_repeats={cfg.mesh.pipeline_repeats} must be positive (1: GPipe, more: a circular pipeline)",
        ),
        (
            cfg.mesh.pipeline_repeats <= 1 or cfg.mesh.pipeline > 1,
            f"mesh.pipeline_repeats={cfg.mesh.pipeline_repeats} needs pipeline stages: set mesh.pipeline > 1 "
            f"(or pipeline_repeats=1)",
        ),
        (
            cfg.mesh.pipeline <= 0
            or cfg.mesh.pipeline_repeats <= 0
            or m.n_layers % (cfg.mesh.pipeline * cfg.mesh.pipeline_repeats) == 0,
            f"the {m.n_layers // max(cfg.mesh.pipeline, 1)} layers per stage (model.n_layers={m.n_layers} / "
            f"mesh.pipeline={cfg.mesh.pipeline}) do not split into mesh.pipeline_repeats={cfg.mesh.pipeline_repeats} "
            f"equal chunks: make n_layers a multiple of pipeline x pipeline_repeats",
        ),
        (
            cfg.mesh.microbatches == 0 or cfg.mesh.microbatches >= cfg.mesh.pipeline,
            f"mesh.microbatches={cfg.mesh.microbatches} is fewer than the mesh.pipeline={cfg.mesh.pipeline} stages: "
            f"every stage needs a micro-batch in flight (0 means one per stage)",
        ),
        (
            t.grad_accum <= 0
            or cfg.mesh.pipeline_microbatches <= 0
            or (t.batch_size // t.grad_accum) % cfg.mesh.pipeline_microbatches == 0,
            f"the {t.batch_size // max(t.grad_accum, 1)} sequences of each step (train.batch_size / "
            f"train.grad_accum) do not split into {cfg.mesh.pipeline_microbatches} pipeline micro-batches "
            f"(mesh.microbatches="
            f"{cfg.mesh.microbatches}{', i.e. one per stage' if not cfg.mesh.microbatches else ''})",
        ),
        (s.max_new_tokens > 0, f"sample.max_new_tokens={s.max_new_tokens} must be positive"),
        (s.temperature >= 0, f"sample.temperature={s.temperature} must be >= 0 (0 is greedy)"),
        (s.top_k >= 0, f"sample.top_k={s.top_k} must be >= 0 (0 disables)"),
        (0 < s.top_p <= 1, f"sample.top_p={s.top_p} must be in (0, 1]"),
    ]
    problems = [msg for ok, msg in checks if not ok]
    try:
        parse_mixture(d.mixture)
    except UserError as e:
        problems.append(str(e))
    rules_table(cfg.mesh.rules)  # an unknown preset, file, logical or mesh axis: its own message
    if problems:
        raise UserError("invalid config:\n  - " + "\n  - ".join(problems))


def _moe_checks(m: ModelConfig, mesh: MeshConfig) -> list[tuple[bool, str]]:
    e = m.moe
    return [
        (
            min(e.experts, e.shared_experts, e.mlp_dim) >= 0,
            "model.moe.experts, shared_experts and mlp_dim must be >= 0",
        ),
        (
            e.experts == 0 or 1 <= e.top_k <= e.experts,
            f"model.moe.top_k={e.top_k} must be between 1 and model.moe.experts={e.experts}",
        ),
        (
            e.every > 0 and m.n_layers % e.every == 0,
            f"model.moe.every={e.every} must be positive and divide model.n_layers={m.n_layers}",
        ),
        (e.router in ("softmax", "sigmoid"), f"model.moe.router={e.router!r} must be softmax or sigmoid"),
        (
            e.bias_update >= 0 and (e.bias_update == 0 or mesh.pipeline_repeats <= 1),
            f"model.moe.bias_update={e.bias_update} must be >= 0, and 0 in a circular pipeline (pipeline_repeats > 1)",
        ),
        (
            e.experts > 0 or not (e.bias_update or e.shared_experts or e.shared_gate),
            "model.moe.bias_update, shared_experts and shared_gate act beside routed experts, but model.moe.experts=0 "
            "(a dense model): set model.moe.experts, or leave them at 0 / false",
        ),
        (
            not e.shared_gate or e.shared_experts > 0,
            "model.moe.shared_gate gates the shared experts, but model.moe.shared_experts=0: set both or neither",
        ),
        (
            min(e.aux_loss, e.z_loss, e.capacity_factor) >= 0,
            "model.moe.aux_loss, z_loss and capacity_factor must be >= 0 (capacity_factor 0: dropless)",
        ),
        (
            mesh.expert in (-1, 1) or e.experts > 0,
            f"mesh.expert={mesh.expert} splits experts, but model.moe.experts=0 (a dense model): set model.moe.experts "
            "or leave mesh.expert=1",
        ),
        (
            mesh.expert <= 1 or e.experts % mesh.expert == 0,
            f"model.moe.experts={e.experts} do not split evenly over mesh.expert={mesh.expert} devices: make the "
            "expert count a multiple of the axis",
        ),
        (
            e.experts == 0 or m.quant == "none",
            f"model.quant={m.quant} does not take MoE weights yet (model.moe.experts={e.experts}): use none",
        ),
        (
            e.experts == 0
            or e.every <= 1
            or mesh.pipeline <= 1
            or m.n_layers % (e.every * mesh.pipeline * max(mesh.pipeline_repeats, 1)) == 0,
            f"a pipeline cuts the layers into groups of model.moe.every={e.every} (dense layers, then an MoE one): "
            f"model.n_layers={m.n_layers} must be a multiple of every x mesh.pipeline x mesh.pipeline_repeats",
        ),
    ]
