"""Decode speed of a trained run: time to first token (prefill of the prompt and its first new token)
and decode tokens/s at batch 1 and batch 16 (16 rows decoded together), for the run in float32, in
bfloat16 compute, with int8, int4, fp4 (MXFP4) and nvfp4 weights (llm_jax/model/dense.py; computing
in model.dtype=auto, the fast dtype of this machine); with --hf, also Hugging Face transformers'
PyTorch `generate` on the same weights (exported by llm_jax/tools/hf.py), prompts and token counts,
in float32 and bfloat16, and ours / the best transformers figure per batch size.

    python benchmarks/decode.py [--run runs/shakespeare] [--new-tokens 100] [--repeats 3] [--hf]

Compilation is excluded: each variant generates once before it is timed. Greedy decoding throughout.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCHES = (1, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/shakespeare", help="a trained (float) run directory")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf", action="store_true", help="add transformers' generate (needs torch, transformers)")
    args = parser.parse_args()

    from llm_jax.inference.generate import Generator
    from llm_jax.model.dense import param_bytes, quantize
    from llm_jax.model.device import auto_dtype, cpu_info
    from llm_jax.run import load_run

    run = load_run(args.run)
    cfg, params, tokenizer = run.cfg, run.params, run.tokenizer
    prompt = tokenizer.encode("Enter KING LEAR, with his daughters and attendants.\n")
    fast = auto_dtype()[0]
    model = lambda **kw: dataclasses.replace(cfg.model, **kw)  # noqa: E731
    variants = [
        ("llm_jax float32", model(dtype="float32"), params),
        ("llm_jax bfloat16", model(dtype="bfloat16"), params),
        (f"llm_jax int8 ({fast})", model(dtype=fast, quant="int8"), quantize(params, "int8")),
        *((f"llm_jax {q} ({fast})", model(dtype=fast, quant=q), quantize(params, q)) for q in ("int4", "fp4", "nvfp4")),
    ]
    cpu = cpu_info()
    print(f"{cpu['model']}, {cpu['cores']} cores ({', '.join(cpu['flags'])}); model.dtype=auto -> {fast}")
    print(f"{args.run}: prompt {len(prompt)} tokens, {args.new_tokens} new, greedy, median of {args.repeats}")
    print(row("variant", "MiB", *(f"{h}, batch {b}" for b in BATCHES for h in ("first token ms", "tokens/s"))))
    best = {}
    for name, model_cfg, p in variants:
        gen = Generator(model_cfg, p)
        figures = []
        for batch in BATCHES:
            first, rate = timed(lambda n, g=gen, b=batch: stream(g, prompt, b, n), args.new_tokens, args.repeats)
            figures += [f"{first:.1f}", f"{rate:,.0f}"]
            best[("llm_jax", batch)] = max(best.get(("llm_jax", batch), 0), rate)
        print(row(name, f"{param_bytes(p) / 2**20:.2f}", *figures))
    if args.hf:
        for name, figures, rates in hf_rows(args, prompt):
            print(row(name, "", *figures))
            for batch, rate in zip(BATCHES, rates):
                best[("hf", batch)] = max(best.get(("hf", batch), 0), rate)
        for batch in BATCHES:
            ours, theirs = best[("llm_jax", batch)], best[("hf", batch)]
            ratio = f"{ours:,.0f} / {theirs:,.0f} tokens/s = {ours / theirs:.2f}x"
            print(f"batch {batch}: the best llm_jax variant / the best transformers one: {ratio}")


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def stream(gen, prompt: list[int], batch: int, new: int):
    """A generator of steps; the first next() returns once the first new tokens exist."""
    return gen.stream_batch([prompt] * batch, [new] * batch, [0.0] * batch, [0] * batch, [1.0] * batch, [0] * batch)


def timed(make, new: int, repeats: int) -> tuple[float, float]:
    """(first token ms, decode tokens/s after it) of make(new): medians of `repeats`, after a warm-up."""
    list(make(new))  # compile prefill and decode for this batch size
    firsts, rates = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        steps = make(new)
        first = next(steps)
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in steps)
        rates.append(len(first) * (n - 1) / (time.perf_counter() - t1))
        firsts.append(1e3 * (t1 - t0))
    return statistics.median(firsts), statistics.median(rates)


def hf_rows(args, prompt: list[int]):
    """transformers' LlamaForCausalLM.generate, greedy, on the exported weights, in float32 and bfloat16."""
    import tempfile

    import torch
    import transformers

    from llm_jax.tools.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = export_hf(args.run, f"{tmp}/hf", log=lambda *_: None)
        models = {
            d: transformers.LlamaForCausalLM.from_pretrained(path, dtype=d).eval() for d in ("float32", "bfloat16")
        }
    version = f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    for dtype, model in models.items():

        def generate(batch: int, new: int, model=model) -> float:
            ids = torch.tensor([prompt] * batch)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            assert out.shape[1] == len(prompt) + new
            return time.perf_counter() - t0

        figures, rates = [], []
        for batch in BATCHES:
            generate(batch, args.new_tokens)  # warm up
            firsts, batch_rates = [], []
            for _ in range(args.repeats):
                first = generate(batch, 1)
                batch_rates.append(batch * (args.new_tokens - 1) / (generate(batch, args.new_tokens) - first))
                firsts.append(1e3 * first)
            rates.append(statistics.median(batch_rates))
            figures += [f"{statistics.median(firsts):.1f}", f"{rates[-1]:,.0f}"]
        yield f"HF {dtype} ({version})", figures, rates


if __name__ == "__main__":
    main()
