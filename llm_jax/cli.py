"""`llm-jax` command line: train, generate, chat, eval-chat, eval, judge, quantize, serve,
export-hf, import-hf, config, sweep, plan, compile, data.
Errors the user can fix print one message."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llm_jax.cli_args import build_parser
from llm_jax.errors import UserError


def main(argv: list[str] | None = None) -> None:
    if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):  # a file or pipe (`make demo > log`): per line
        sys.stdout.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    try:
        _keep_compiled_programs(args.command)
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # the reader went away (`llm-jax generate ... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        raise SystemExit(141) from None


def _keep_compiled_programs(command: str) -> None:
    """JAX's persistent compilation cache in <LLM_JAX_CACHE or ~/.cache/llm_jax>/jit, before JAX starts: a command
    run again (a server restarted, a run resumed, generate in a loop) loads its programs instead of compiling
    them: `llm-jax serve --run runs/shakespeare` is ready in 27 s instead of 65 s (benchmarks/compile_cache.py,
    2 AMD Zen 4 cores); caching only programs that took a second to compile (JAX's default): 37 s by hand. The
    cache keeps its newest 4 GiB. JAX_COMPILATION_CACHE_DIR moves it; set empty, there is none. compile and
    plan build for chips this machine lacks, programs JAX cannot load back here, and sweep reports how long
    each layout takes to compile: they keep none."""
    if command in ("compile", "plan", "sweep") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    folder = Path(os.environ.get("LLM_JAX_CACHE") or "~/.cache/llm_jax").expanduser() / "jit"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: compile as without a cache
        return
    if not os.access(folder, os.W_OK):
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # least recently used entries go first


# Each command imports what it runs when it runs: --help, a bad argument, a malformed config and the
# data synth-* commands answer without importing JAX, Flax and orbax (3 s here, against 0.1 s for
# the config package), and `train` checks its config before JAX starts.


def _train(args) -> None:
    from llm_jax.config import load_config

    cfg = load_config(args.config, args.overrides)  # validated before JAX is imported or anything compiles
    from llm_jax.parallel.distributed import initialize
    from llm_jax.train.objectives import objective_of

    objective_of(cfg)
    joined = initialize(cfg.distributed)  # before any other JAX call
    if joined:
        print(joined, flush=True)
    from llm_jax.train.loop import train

    train(cfg)


def _config(args) -> None:
    import yaml

    from llm_jax.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    from llm_jax.train.objectives import objective_of

    objective_of(cfg)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


def _data(args) -> None:
    if args.action == "prepare":
        from llm_jax.config import load_config
        from llm_jax.train.loop import prepare_run_data

        cfg = load_config(args.config, args.overrides)
        if args.out:
            from llm_jax.data.dataset import build_dataset

            build_dataset(cfg, args.out)
            return
        run_dir, data = prepare_run_data(cfg)
        print(f"prepared: {len(data.train):,} train / {len(data.val):,} val rows in {run_dir / 'data'}")
        return
    from llm_jax.data import synth

    if args.n < 10:
        raise UserError(f"--n {args.n}: ask for at least 10 examples")
    write = synth.write_sft if args.action == "synth-sft" else synth.write_dpo
    try:
        paths = write(Path(args.out).expanduser(), args.n, args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    for split, path in paths.items():
        print(f"{split}: {sum(1 for _ in path.open()):,} examples -> {path}")


def _sampling(args) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def _generate(args) -> None:
    from llm_jax.inference.terminal import generate_text

    generate_text(args.run, args.prompt, _sampling(args), args.stop, args.mesh)


def _chat(args) -> None:
    from llm_jax.inference.terminal import chat

    chat(args.run, _sampling(args), args.system, args.mesh)


def _eval_chat(args) -> None:
    from llm_jax.evals.chat_eval import run_eval_chat

    run_eval_chat(args.run, args.data, args.limit or None, args.system)


def _eval(args) -> None:
    from llm_jax.evals.harness import run_eval

    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.lm_eval:
        try:
            from llm_jax.evals.lm_eval_model import run_lm_eval
        except ImportError:
            raise UserError("--lm-eval needs lm-evaluation-harness: pip install 'lm-eval>=0.4.13'") from None
        run_lm_eval(args.run, args.lm_eval.split(","), args.lm_eval_include, args.limit, args.out, args.mesh)
        return
    run_eval(args.run, args.tasks, args.limit, args.out, args.system, args.mesh)


def _judge(args) -> None:
    from llm_jax.evals.judge import endpoint_from_env, judge

    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    judge(
        args.questions, args.a, args.b, endpoint_from_env(args.judge_url, args.judge_model), args.out, args.max_tokens
    )


def _quantize(args) -> None:
    from llm_jax.tools.quantize import quantize_run

    quantize_run(args.run, args.mode, args.out, args.mesh)


def _serve(args) -> None:
    if min(args.max_tokens, args.max_batch, args.max_queue, args.kv_block_size) < 1 or not 0 <= args.port < 65536:
        raise UserError("need --max-tokens, --max-batch, --max-queue, --kv-block-size >= 1 and 0 <= --port < 65536")
    if args.kv_blocks < 0 or args.prefill_chunk < 16 or not 0 <= args.ride_tokens <= args.prefill_chunk:
        raise UserError(
            "need --kv-blocks >= 0 (0: automatic), --prefill-chunk >= 16 and 0 <= --ride-tokens <= --prefill-chunk"
        )
    from llm_jax.inference.server import serve

    engine = {
        "max_batch": args.max_batch,
        "max_queue": args.max_queue,
        "kv_blocks": args.kv_blocks,
        "block": args.kv_block_size,
        "chunk": args.prefill_chunk,
        "rides": args.ride_tokens,
        "static": args.batching == "static",
        "share_prefixes": args.prefix_sharing == "on",
    }
    serve(args.run, args.host, args.port, args.model_name, args.max_tokens, args.api_key, args.mesh, engine)


def _export_hf(args) -> None:
    from llm_jax.tools.hf import export_hf

    if args.shard_mb < 1:
        raise UserError("--shard-mb must be at least 1")
    export_hf(args.run, args.out, args.shard_mb << 20, args.mesh, args.dtype)


def _import_hf(args) -> None:
    from llm_jax.tools.hf import import_hf

    if args.seq_len is not None and args.seq_len < 2:
        raise UserError("--seq-len must be at least 2")
    import_hf(args.hf, args.out, args.seq_len, args.chat_tokens)


def _sweep(args) -> None:
    from llm_jax.tools.sweep import main as sweep

    sweep(args)


def _compile(args) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiles for abstract devices; never opens this host's own
    from llm_jax.tools.compile import main as compile_steps

    compile_steps(args)


def _plan(args) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # as compile: the TPU compiler runs for abstract chips
    if args.rank:
        from llm_jax.tools.rank import main as plan
    else:
        from llm_jax.tools.plan import main as plan

    plan(args)


COMMANDS = {
    "train": _train,
    "generate": _generate,
    "chat": _chat,
    "eval-chat": _eval_chat,
    "config": _config,
    "sweep": _sweep,
    "plan": _plan,
    "compile": _compile,
    "data": _data,
    "quantize": _quantize,
    "serve": _serve,
    "export-hf": _export_hf,
    "import-hf": _import_hf,
    "eval": _eval,
    "judge": _judge,
}


if __name__ == "__main__":
    main()
