"""Decode speed of a trained run: time to first token (prefill of the prompt) and decode tokens/s
at batch 1 and batch 16 (16 rows decoded together), for float32 weights, bfloat16 compute, and
int8 / int4 weights (llm_jax/model/dense.py); with --hf, also Hugging Face transformers' PyTorch
`generate` on the same weights (exported by llm_jax/tools/hf.py), prompts and token counts.

    python benchmarks/decode.py [--run runs/shakespeare] [--new-tokens 100] [--repeats 3] [--hf]

Compilation is excluded: each variant generates once before it is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/shakespeare", help="a trained (float) run directory")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf", action="store_true", help="add transformers' generate (needs torch, transformers)")
    args = parser.parse_args()

    from llm_jax.inference.generate import Generator
    from llm_jax.model.dense import param_bytes, quantize
    from llm_jax.run import load_run

    run = load_run(args.run)
    cfg, params, tokenizer = run.cfg, run.params, run.tokenizer
    prompt = tokenizer.encode("Enter KING LEAR, with his daughters and attendants.\n")
    variants = [
        ("float32", cfg.model, params),
        ("bfloat16 compute", dataclasses.replace(cfg.model, dtype="bfloat16"), params),
        ("int8 weights", dataclasses.replace(cfg.model, quant="int8"), quantize(params, "int8")),
        ("int4 weights", dataclasses.replace(cfg.model, quant="int4"), quantize(params, "int4")),
    ]
    print(f"{args.run}: prompt {len(prompt)} tokens, {args.new_tokens} new, greedy")
    print(
        f"{'weights':<18} | {'MiB':>6} | {'first token ms':>14} | {'tokens/s, batch 1':>17} | "
        f"{'tokens/s, batch 16':>18}"
    )
    for name, model_cfg, p in variants:
        gen = Generator(model_cfg, p)
        firsts, rates = [], {1: [], 16: []}
        for batch in (1, 16):
            args_b = (
                [prompt] * batch,
                [args.new_tokens] * batch,
                [0.0] * batch,
                [0] * batch,
                [1.0] * batch,
                list(range(batch)),
            )
            list(gen.stream_batch(*args_b))  # compile prefill and decode for this batch size
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                steps = gen.stream_batch(*args_b)
                next(steps)
                t1 = time.perf_counter()
                n = 1 + sum(1 for _ in steps)
                rates[batch].append(batch * (n - 1) / (time.perf_counter() - t1))
                if batch == 1:
                    firsts.append(1e3 * (t1 - t0))
        print(
            f"{name:<18} | {param_bytes(p) / 2**20:>6.2f} | {statistics.median(firsts):>14.1f} | "
            f"{statistics.median(rates[1]):>17.1f} | {statistics.median(rates[16]):>18.1f}"
        )
    if args.hf:
        hf_row(args, prompt)


def hf_row(args, prompt: list[int]) -> None:
    """transformers' LlamaForCausalLM.generate, greedy, on the exported weights (float32)."""
    import tempfile

    import torch
    import transformers

    from llm_jax.tools.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        model = transformers.LlamaForCausalLM.from_pretrained(
            export_hf(args.run, f"{tmp}/hf", log=lambda *_: None), dtype=torch.float32
        ).eval()

    def generate(batch: int, new: int) -> float:
        ids = torch.tensor([prompt] * batch)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        assert out.shape[1] == len(prompt) + new
        return time.perf_counter() - t0

    firsts, rates = [], {1: [], 16: []}
    for batch in (1, 16):
        generate(batch, args.new_tokens)  # warm up
        for _ in range(args.repeats):
            first = generate(batch, 1)
            rates[batch].append(batch * (args.new_tokens - 1) / (generate(batch, args.new_tokens) - first))
            if batch == 1:
                firsts.append(1e3 * first)
    name = f"HF transformers {transformers.__version__} (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    print(
        f"{'HF float32':<18} | {'':>6} | {statistics.median(firsts):>14.1f} | "
        f"{statistics.median(rates[1]):>17.1f} | {statistics.median(rates[16]):>18.1f}   <- {name}"
    )


if __name__ == "__main__":
    main()
