"""`llm-jax`'s arguments: a subparser per command with its options and help (llm_jax/cli.py dispatches).
Pure argparse: --help and a bad argument answer before anything heavy is imported."""

from __future__ import annotations

import argparse
import os


def build_parser() -> argparse.ArgumentParser:
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
        "quantize", help="int8 / int4 / fp4 / nvfp4 weight-only copy of a run, with held-out bpb before and after"
    )
    p.add_argument("--run", required=True, help="a trained run directory")
    p.add_argument("--mode", required=True, choices=["int8", "int4", "fp4", "nvfp4"])
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
        "--ride-tokens",
        type=int,
        default=64,
        help="prompt tokens a decode step carries as rows of its own (0: every prompt prefilled apart)",
    )
    p.add_argument(
        "--prefix-sharing",
        choices=["on", "off"],
        default="on",
        help="a prompt that begins as an earlier one did reads that one's KV blocks instead of prefilling them",
    )
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

    return parser


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
