"""`llm-jax` command line: train, generate, chat, eval-chat, eval, judge, quantize, serve,
export-hf, import-hf, config, sweep, plan, data.
Errors the user can fix print one message."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llm_jax.errors import UserError


def main(argv: list[str] | None = None) -> None:
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

    p = sub.add_parser("quantize", help="int8 / int4 weight-only copy of a run, with held-out bpb before and after")
    p.add_argument("--run", required=True, help="a trained run directory")
    p.add_argument("--mode", required=True, choices=["int8", "int4"])
    p.add_argument("--out", help="the quantized run directory (default: <run>-<mode>)")

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run (completions, chat, streaming)")
    p.add_argument("--run", required=True, help="run directory (float or quantized)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--model-name", help="the model id clients ask for (default: the run directory's name)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most new tokens per request (capped by the context)")
    p.add_argument("--max-batch", type=int, default=16, help="requests generated together in one batch")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 429")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor over this host's devices (the run's rules "
                   "place params and the KV cache); 1,1,1: one device")
    p.add_argument("--api-key", default=os.environ.get("LLM_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LLM_JAX_API_KEY; unset: no key)")

    p = sub.add_parser("export-hf", help="write a run as a Hugging Face Llama checkpoint (safetensors + tokenizer)")
    p.add_argument("--run", required=True, help="a float run directory")
    p.add_argument("--out", required=True, help="the Hugging Face model directory to create")
    p.add_argument("--shard-mb", type=int, default=2000, help="split model.safetensors into shards above this size")

    p = sub.add_parser("import-hf", help="a local Hugging Face Llama / Mistral checkpoint -> an llm_jax run")
    p.add_argument("--hf", required=True, help="directory with config.json, *.safetensors, tokenizer.model")
    p.add_argument("--out", required=True, help="the run directory to create")
    p.add_argument("--seq-len", type=int, help="context of the run (default: max_position_embeddings, at most 4096)")

    p = sub.add_parser("eval", help="perplexity, multiple-choice and generation tasks on a run: table + JSON")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--tasks", required=True, nargs="+", metavar="TASK",
                   help="bundled names (shakespeare_speaker, shakespeare_cloze, shakespeare_next_word), JSONL files, "
                   "or ppl:<text source>")
    p.add_argument("--limit", type=int, help="rows per task (spread over the file); ppl: windows")
    p.add_argument("--out", help="the JSON record (default: <run>/eval/step<N>.json)")
    p.add_argument("--system", help="system prompt for chat rows (default: the run's sample.system)")

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
    p.add_argument("--meshes", required=True, help='data,fsdp,tensor[,pipeline[,microbatches]] layouts separated by ";", '
                   'e.g. "8,1,1;2,4,1;4,1,1,2,8"')
    p.add_argument("--batch-sizes", help="comma-separated global batch sizes (default: train.batch_size)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout (after one untimed)")
    p.add_argument("--out", help="directory for sweep.csv and sweep.png (default: <run_dir>/sweep)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")

    p = sub.add_parser("plan", help="per-device memory of a config on a topology, without the hardware")
    p.add_argument("--config", required=True)
    p.add_argument("--topology", required=True, help="e.g. v5e-256, v5p-256, h100-8 (plan --help lists them)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. mesh.fsdp=-1 mesh.tensor=4")

    p = sub.add_parser("data", help="data tools: prepare (curate, tokenize, pack), synth-sft / synth-dpo")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("prepare", help="curate, train the tokenizer and pack a run's data, with a report")
    a.add_argument("--config", required=True)
    a.add_argument("overrides", nargs="*", metavar="section.key=value")
    for action in ("synth-sft", "synth-dpo"):
        a = actions.add_parser(action, help=f"write a seeded synthetic {action[6:].upper()} dataset")
        a.add_argument("--out", required=True, help="directory for train.jsonl and test.jsonl")
        a.add_argument("--n", type=int, default=20000, help="examples in all (about 10%% held out as test)")
        a.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    try:
        {"train": _train, "generate": _generate, "chat": _chat, "eval-chat": _eval_chat, "config": _config,
         "sweep": _sweep, "plan": _plan, "data": _data, "quantize": _quantize,
         "serve": _serve, "export-hf": _export_hf, "import-hf": _import_hf,
         "eval": _eval, "judge": _judge}[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _quantize(args) -> None:
    from llm_jax.quantize import quantize_run

    quantize_run(args.run, args.mode, args.out)


def _eval(args) -> None:
    from llm_jax.evals.harness import run_eval

    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    run_eval(args.run, args.tasks, args.limit, args.out, args.system)


def _judge(args) -> None:
    from llm_jax.evals.judge import endpoint_from_env, judge

    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    judge(args.questions, args.a, args.b, endpoint_from_env(args.judge_url, args.judge_model), args.out,
          args.max_tokens)


def _export_hf(args) -> None:
    from llm_jax.hf import export_hf

    if args.shard_mb < 1:
        raise UserError("--shard-mb must be at least 1")
    export_hf(args.run, args.out, args.shard_mb << 20)


def _import_hf(args) -> None:
    from llm_jax.hf import import_hf

    if args.seq_len is not None and args.seq_len < 2:
        raise UserError("--seq-len must be at least 2")
    import_hf(args.hf, args.out, args.seq_len)


def _serve(args) -> None:
    if min(args.max_tokens, args.max_batch, args.max_queue) < 1 or not 0 <= args.port < 65536:
        raise UserError("need --max-tokens, --max-batch, --max-queue >= 1 and 0 <= --port < 65536")
    from llm_jax.server import serve

    serve(args.run, args.host, args.port, args.model_name, args.max_tokens, args.max_batch, args.max_queue,
          args.api_key, args.mesh)


def _train(args) -> None:
    from llm_jax.config import load_config

    cfg = load_config(args.config, args.overrides)  # validated before JAX is imported or anything compiles
    from llm_jax.distributed import initialize

    joined = initialize(cfg.distributed)  # before any other JAX call
    if joined:
        print(joined, flush=True)
    from llm_jax.train.loop import train

    train(cfg)


def _sweep(args) -> None:
    from llm_jax.sweep import main as sweep

    sweep(args)


def _plan(args) -> None:
    from llm_jax.plan import main as plan

    plan(args)


def _data(args) -> None:
    if args.action == "prepare":
        from llm_jax.config import load_config
        from llm_jax.train.loop import prepare_run_data

        run_dir, data = prepare_run_data(load_config(args.config, args.overrides))
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


def _config(args) -> None:
    import yaml

    from llm_jax.config import load_config, to_dict

    print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (holds config.yaml, tokenizer.model, checkpoints/)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 is greedy")
    p.add_argument("--top-k", type=int, help="0 disables")
    p.add_argument("--top-p", type=float, help="1 disables")
    p.add_argument("--seed", type=int, default=0)


def load_run(run_dir: str):
    """(config, parameters on one device, tokenizer, checkpoint directory) of a run's newest checkpoint."""
    import yaml

    from llm_jax import sharding
    from llm_jax.config import config_from_dict
    from llm_jax.data.tokenizer import Tokenizer
    from llm_jax.train.checkpoint import checkpoint_dir, latest_checkpoint, restore_params
    from llm_jax.train.step import abstract_params

    run = Path(run_dir).expanduser()
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml); train one with `llm-jax train --config ...`")
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    step_dir = latest_checkpoint(checkpoint_dir(run, cfg.train.checkpoint_dir))
    if step_dir is None:
        raise UserError(f"{run} has no checkpoint yet; train it first (llm-jax train --config {run / 'config.yaml'})")
    params = restore_params(step_dir, abstract_params(cfg.model, sharding.single_device_layout()))
    return cfg, params, Tokenizer(run / "tokenizer.model"), step_dir


def _sampling(args, cfg) -> tuple[int, float, int, float]:
    s = cfg.sample
    max_new = args.max_new_tokens or s.max_new_tokens
    temperature = s.temperature if args.temperature is None else args.temperature
    top_k = s.top_k if args.top_k is None else args.top_k
    top_p = s.top_p if args.top_p is None else args.top_p
    if max_new <= 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise UserError("need --max-new-tokens > 0, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    return max_new, temperature, top_k, top_p


def _generate(args) -> None:
    from llm_jax.generate import Generator, fit_prompt, stream_text

    cfg, params, tokenizer, step_dir = load_run(args.run)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    max_new, *settings = _sampling(args, cfg)
    ids, max_new, note = fit_prompt([tokenizer.eos_id] + tokenizer.encode(prompt), cfg.model.seq_len, max_new)
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(f"[{step_dir.name} steps] {prompt}", end="", flush=True)
    tokens = Generator(cfg.model, params).stream(ids, max_new, *settings, args.seed, stop_ids=(tokenizer.eos_id,))
    for piece in stream_text(tokenizer, tokens, args.stop):
        print(piece, end="", flush=True)
    print()


def _chat(args) -> None:
    from llm_jax.chat import prompt_ids
    from llm_jax.generate import Generator, stream_text

    cfg, params, tokenizer, step_dir = load_run(args.run)
    max_new, *settings = _sampling(args, cfg)
    max_new = min(max_new, cfg.model.seq_len // 2)
    system = cfg.sample.system if args.system is None else args.system
    generator = Generator(cfg.model, params)
    print(f"chat with {args.run} ({step_dir.name} steps, context {cfg.model.seq_len} tokens); "
          "/reset starts over, /exit or Ctrl-D quits", file=sys.stderr)
    messages, turn = [], 0
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": text})
        ids, stop = prompt_ids(tokenizer, messages, system)
        while len(ids) + max_new > cfg.model.seq_len and len(messages) > 1:  # forget the oldest exchange
            messages = messages[2:]
            print("(the conversation outgrew the context: dropped the oldest exchange)", file=sys.stderr)
            ids, stop = prompt_ids(tokenizer, messages, system)
        if len(ids) + max_new > cfg.model.seq_len:
            print(f"(that message is {len(ids)} tokens with the template; at most {cfg.model.seq_len - max_new} "
                  "fit the context with room for a reply: say less, or pass a lower --max-new-tokens)",
                  file=sys.stderr)
            messages.pop()
            continue
        print("bot> ", end="", flush=True)
        reply = []
        for piece in stream_text(tokenizer, generator.stream(ids, max_new, *settings, args.seed + turn, stop)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
        turn += 1


def _eval_chat(args) -> None:
    from llm_jax.chat_eval import exact_match, load_questions

    cfg, params, tokenizer, step_dir = load_run(args.run)
    rows = load_questions(args.data, args.limit or None)
    scores = exact_match(cfg.model, params, tokenizer, rows, system=args.system)
    print(f"exact match of {args.run} ({step_dir.name} steps) on {len(rows)} questions of {args.data}:")
    for task, acc in scores.items():
        print(f"  {task:<14} {acc:6.1%}")


if __name__ == "__main__":
    main()
