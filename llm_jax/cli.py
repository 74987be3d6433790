"""`llm-jax` command line: train, generate, chat, eval-chat, eval, judge, quantize, serve,
export-hf, import-hf, config, sweep, plan, compile, data.
Errors the user can fix print one message."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llm_jax.errors import UserError


def main(argv: list[str] | None = None) -> None:
    if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):  # a file or pipe (`make demo > log`): per line
        sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(prog="llm-jax", description="Build a language model from scratch in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain (or resume) a run: python train.py is the same command")
    p.add_argument("--config", required=True, help="a preset name in configs/ (e.g. shakespeare) or a YAML path")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="typed overrides of config keys")

    p = sub.add_parser("generate", help="sample text from a run's newest checkpoint")
    _sampling_args(p)
    p.add_argument("--prompt", help="prompt text (default: read standard input)")
    p.add_argument("--stop", action="append", default=[], help="end the text before this string (repeatable)")

    p = sub.add_parser("chat", help="talk to a fine-tuned (sft/dpo) run in the terminal, with the chat template")
    _sampling_args(p)
    p.add_argument("--system", help="system prompt (default: the run's sample.system)")

    p = sub.add_parser("eval-chat", help="held-out exact-match accuracy of a chat run, per task")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--data", required=True, help="JSONL with messages and answer (e.g. synth-sft's test.jsonl)")
    p.add_argument("--limit", type=int, default=500, help="questions to ask (0: all)")
    p.add_argument("--system", help="system prompt added when a conversation has none")

    p = sub.add_parser(
        "quantize", help="int8 / int4 / fp4 weight-only copy of a run, with held-out bpb before and after"
    )
    p.add_argument("--run", required=True, help="a trained run directory")
    p.add_argument("--mode", required=True, choices=["int8", "int4", "fp4"])
    p.add_argument("--out", help="the quantized run directory (default: <run>-<mode>)")
    _mesh_arg(p)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run (completions, chat, streaming)")
    p.add_argument("--run", required=True, help="run directory (float or quantized)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--model-name", help="the model id clients ask for (default: the run directory's name)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most new tokens per request (capped by the context)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 429")
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=0,
        help="KV-cache blocks in the pool, split over the mesh's batch shards (0: max-batch full contexts)",
    )
    _paged_args(p)
    p.add_argument(
        "--batching",
        choices=["continuous", "static"],
        default="continuous",
        help="static: a new batch only once every row has ended (for comparison)",
    )
    _mesh_arg(p)
    p.add_argument(
        "--api-key",
        default=os.environ.get("LLM_JAX_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $LLM_JAX_API_KEY; unset: no key)",
    )

    p = sub.add_parser("export-hf", help="write a run as a Hugging Face checkpoint (safetensors + tokenizer)")
    p.add_argument("--run", required=True, help="a float run directory")
    p.add_argument("--out", required=True, help="the Hugging Face model directory to create")
    p.add_argument("--shard-mb", type=int, default=2000, help="split model.safetensors into shards above this size")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="the tensors' dtype on disk"
    )
    _mesh_arg(p)

    p = sub.add_parser(
        "import-hf", help="a local Hugging Face checkpoint (Llama, Mistral, Qwen2/3, Mixtral, Qwen2/3-MoE) -> a run"
    )
    p.add_argument(
        "--hf", required=True, help="directory with config.json, *.safetensors, tokenizer.json or tokenizer.model"
    )
    p.add_argument("--out", required=True, help="the run directory to create")
    p.add_argument("--seq-len", type=int, help="context of the run (default: max_position_embeddings, at most 4096)")
    p.add_argument(
        "--chat-tokens",
        action="store_true",
        help="a base model without a chat template: add llm_jax's chat tokens (embedding grown) to fine-tune for chat",
    )

    p = sub.add_parser("eval", help="perplexity, multiple-choice and generation tasks on a run: table + JSON")
    p.add_argument("--run", required=True, help="run directory")
    tasks = p.add_mutually_exclusive_group(required=True)
    tasks.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="bundled names (shakespeare_speaker, shakespeare_cloze, shakespeare_next_word), JSONL files, "
        "or ppl:<text source>",
    )
    tasks.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated")
    p.add_argument("--lm-eval-include", metavar="DIR", help="a directory of your own lm-eval task YAMLs")
    p.add_argument("--limit", type=int, help="rows per task (spread over the file); ppl: windows")
    p.add_argument("--out", help="the JSON record (default: <run>/eval/step<N>.json)")
    p.add_argument("--system", help="system prompt for chat rows (default: the run's sample.system)")
    _mesh_arg(p)

    p = sub.add_parser("judge", help="LLM-as-judge via an OpenAI-compatible endpoint: pairwise win rates or ratings")
    p.add_argument("--questions", required=True, help='JSONL of {"question"} or {"messages"}')
    p.add_argument("--a", required=True, help='contestant A: a run directory or a JSONL of {"answer"}')
    p.add_argument("--b", help="contestant B (pairwise); without it, A's answers are rated 1-10")
    p.add_argument("--out", required=True, help="judgments JSONL, appended as they arrive (a rerun resumes)")
    p.add_argument("--judge-url", help="the endpoint's base URL (default $LLM_JAX_JUDGE_URL), e.g. http://host/v1")
    p.add_argument("--judge-model", help="the judge's model id (default $LLM_JAX_JUDGE_MODEL)")
    p.add_argument("--max-tokens", type=int, default=128, help="answer length for run-directory contestants")

    p = sub.add_parser("config", help="print the resolved config of a preset plus overrides")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")

    p = sub.add_parser("sweep", help="time a few train steps per mesh layout: table, CSV and PNG")
    p.add_argument("--config", required=True)
    p.add_argument(
        "--meshes",
        required=True,
        help='data,fsdp,tensor[,pipeline[,microbatches[,context[,repeats[,expert]]]]] layouts separated by ";", '
        'e.g. "8,1,1;4,1,1,2,8"; expert: an MoE model\'s mesh.expert',
    )
    p.add_argument("--batch-sizes", help="comma-separated global batch sizes (default: train.batch_size)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout (after one untimed)")
    p.add_argument("--out", help="directory for sweep.csv and sweep.png (default: <run_dir>/sweep)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")

    p = sub.add_parser("plan", help="per-device memory of a config on a topology, without the hardware")
    p.add_argument("--config", required=True)
    p.add_argument(
        "--topology", required=True, help="v4-N, v5p-N (N TensorCores), v5e-N, v6e-N, a100-N, h100-N, h200-N (N chips)"
    )
    p.add_argument("--slices", type=int, default=1, help="TPU slices over the data-center network (mesh.dcn_data)")
    p.add_argument("--estimate", action="store_true", help="arithmetic only, even where libtpu could compile")
    p.add_argument("--rank", action="store_true", help="compile the topology's layouts, order them by roofline time")
    p.add_argument("--meshes", help='with --rank: only these data,fsdp,tensor[,pipeline] layouts ("128,1,1;64,2,1")')
    p.add_argument("--max-layouts", type=int, default=8, help="with --rank: compile at most this many layouts (0: all)")
    p.add_argument("--out", help="with --rank: directory for rank.csv and rank.png (default: <run_dir>/rank)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. mesh.fsdp=-1 mesh.tensor=4")

    p = sub.add_parser(
        "compile", help="compile a config's steps for TPU chips or GPUs you do not have: memory, FLOPs, collectives"
    )
    p.add_argument("--config", required=True)
    p.add_argument(
        "--topology", required=True, help="a TPU slice (v4-16, v5p-256, v5e-64, v6e-256, ...) or GPUs (h100-8, a100-16)"
    )
    p.add_argument(
        "--slices", type=int, default=1, help="TPU slices over the data-center network (set mesh.dcn_data=N)"
    )
    p.add_argument(
        "--steps",
        default="all",
        help="comma-separated: train, eval, prefill, decode, paged_prefill, paged_decode (default: all)",
    )
    p.add_argument("--serve-batch", type=int, default=16, help="rows of the prefill and decode steps")
    _paged_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. mesh.fsdp=-1 mesh.tensor=4")

    p = sub.add_parser("data", help="data tools: prepare (curate, tokenize, pack), synth-sft / synth-dpo")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("prepare", help="curate, train the tokenizer and pack a run's data, with a report")
    a.add_argument("--config", required=True)
    a.add_argument("--out", help="write a dataset any run can use (data.prepared) to OUT/<id> instead")
    a.add_argument("overrides", nargs="*", metavar="section.key=value")
    for action in ("synth-sft", "synth-dpo"):
        a = actions.add_parser(action, help=f"write a seeded synthetic {action[6:].upper()} dataset")
        a.add_argument("--out", required=True, help="directory for train.jsonl and test.jsonl")
        a.add_argument("--n", type=int, default=20000, help="examples in all (about 10%% held out as test)")
        a.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    try:
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
    if args.kv_blocks < 0 or args.prefill_chunk < 16:
        raise UserError("need --kv-blocks >= 0 (0: automatic) and --prefill-chunk >= 16")
    from llm_jax.inference.server import serve

    engine = {
        "max_batch": args.max_batch,
        "max_queue": args.max_queue,
        "kv_blocks": args.kv_blocks,
        "block": args.kv_block_size,
        "chunk": args.prefill_chunk,
        "static": args.batching == "static",
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


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (holds config.yaml, tokenizer.model, checkpoints/)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 is greedy")
    p.add_argument("--top-k", type=int, help="0 disables")
    p.add_argument("--top-p", type=float, help="1 disables")
    p.add_argument("--seed", type=int, default=0)
    _mesh_arg(p)


def _paged_args(p: argparse.ArgumentParser) -> None:
    """serve's paged KV cache and chunked prefill, which compile's paged steps take too."""
    p.add_argument("--kv-block-size", type=int, default=16, help="positions per KV-cache block")
    p.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens prefilled per request per step")


def _mesh_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mesh",
        default="1,1,1",
        help="data,fsdp,tensor over this host's devices: the run's rules place the parameters, read straight "
        "into place (in the compute dtype; float32 for quantize and export-hf), and the KV cache; 1,1,1: one device",
    )


if __name__ == "__main__":
    main()
