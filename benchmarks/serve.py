"""Serving throughput and latency of `llm-jax serve` under concurrent streaming clients: continuous
against static batching (the same server, `--batching static`: a new batch only once every row has
ended), and Hugging Face transformers' batched `generate` on the same exported weights for reference.

Per concurrency level C (default 1, 16, 64): C client threads, each sending streamed completions one after
another over its own keep-alive connection (raw HTTP, server-sent events), 4 x C requests in all (at least
16), prompts of 6-40 tokens cut from the corpus and max_tokens drawn uniformly from 8-96, greedy (a request
that meets the end of text earlier ends there). Figures: output tokens/s (the completion tokens that
`usage` reports, over wall time), time to first token and inter-token latency (between streamed pieces),
p50 and p99. Transformers runs the same requests in batches of C (left-padded), each batch generating
until its longest request's max_tokens: static batching without a server, counted at the tokens asked for.

    python benchmarks/serve.py [--run runs/shakespeare] [--clients 1,16,64] [--no-hf]
                               [--preamble N] [--modes continuous,static,unshared]

With --preamble N every prompt begins with the same N tokens (a system prompt: the corpus's first
tokens), and --modes continuous,unshared compares prefix sharing on and off (`--prefix-sharing`).
The server is started once per mode on a free port (compilation happens before the first timed
level: one warm-up round at the highest concurrency).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MIN_NEW, MAX_NEW = 8, 96
MODES = {  # the servers a run compares: their serve flags
    "continuous": ["--batching", "continuous"],
    "static": ["--batching", "static"],
    "unshared": ["--batching", "continuous", "--prefix-sharing", "off"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/shakespeare")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's decode rows")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers (needs torch and transformers)")
    parser.add_argument("--preamble", type=int, default=0, help="tokens every prompt begins with (a system prompt)")
    parser.add_argument("--modes", default="continuous,static", help=f"servers to compare, of {', '.join(MODES)}")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")

    from llm_jax.model.device import auto_dtype, cpu_info
    from llm_jax.run import load_run

    run = load_run(args.run)
    cpu = cpu_info()
    print(f"{cpu['model']}, {cpu['cores']} cores ({', '.join(cpu['flags'])}); model.dtype=auto -> {auto_dtype()[0]}")
    print(
        f"{args.run}: context {run.cfg.model.seq_len}; server --max-batch {args.max_batch}; "
        f"preamble {args.preamble} tokens; {time.strftime('%Y-%m-%d')}"
    )
    workloads = {c: workload(run.tokenizer, c, run.cfg.model.seq_len, args.preamble) for c in levels}
    print(
        row("batching", "clients", "requests", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms")
    )
    results = {}
    for mode in modes:
        with server(args.run, mode, args.max_batch) as port:
            drive(port, workloads[max(levels)], max(levels))  # compile every shape first
            for c in levels:
                results[mode, c] = drive(port, workloads[c], c)
                print(row(mode, c, len(workloads[c]), *fmt(results[mode, c])), flush=True)
    if not args.no_hf:
        for c in levels:
            rate = hf_rate(args.run, workloads[c], c)
            print(
                row("transformers generate (bf16, batches of C)", c, len(workloads[c]), f"{rate:,.0f}", "", "", "", "")
            )
            results["hf", c] = {"rate": rate}
    for c in levels:
        first, *others = modes
        for other in others:
            a, b = results[first, c], results[other, c]
            print(
                f"{c} clients: {first} / {other} output tokens/s = {a['rate'] / b['rate']:.2f}x; "
                f"TTFT p99 {a['ttft99']:.0f} vs {b['ttft99']:.0f} ms ({a['ttft99'] / b['ttft99']:.2f}x)"
            )
        if ("hf", c) in results:
            ratio = results[first, c]["rate"] / results["hf", c]["rate"]
            print(f"{c} clients: {first} / transformers output tokens/s = {ratio:.2f}x")


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def fmt(r: dict) -> list[str]:
    return [f"{r['rate']:,.0f}", f"{r['ttft50']:.0f}", f"{r['ttft99']:.0f}", f"{r['itl50']:.1f}", f"{r['itl99']:.1f}"]


def workload(tokenizer, clients: int, seq_len: int, preamble: int) -> list[tuple[str, int]]:
    """(prompt text, max_tokens) per request, the same for every mode; each prompt the corpus's first
    `preamble` tokens and then its own."""
    from llm_jax.data.corpus import shakespeare_dir

    text = " ".join(p.read_text() for p in sorted(shakespeare_dir("~/.cache/llm_jax").glob("*.txt"))[:3])
    ids = tokenizer.encode(text)
    rng = random.Random(clients)
    out = []
    for _ in range(max(16, 4 * clients)):
        n, start = rng.randint(6, 40), rng.randrange(preamble, len(ids) - 64)
        new = min(rng.randint(MIN_NEW, MAX_NEW), seq_len - preamble - n - 2)
        out.append((tokenizer.decode(ids[:preamble] + ids[start : start + n]), new))
    return out


class server:
    """`llm-jax serve` on a free port for the block: `with server(run, mode, rows) as port`."""

    def __init__(self, run: str, mode: str, rows: int):
        self.args = [sys.executable, "-m", "llm_jax", "serve", "--run", run, "--port", "0", "--model-name", "m"]
        self.args += ["--max-batch", str(rows), "--max-queue", "1024", *MODES[mode]]

    def __enter__(self) -> int:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if "serving" not in line:
            raise SystemExit(f"the server did not start: {line}")
        return int(line.split("http://127.0.0.1:")[1].split("/")[0])

    def __exit__(self, *_):
        self.proc.terminate()
        self.proc.wait(60)


def drive(port: int, requests: list[tuple[str, int]], clients: int) -> dict:
    """Streams every request through `clients` threads -> rate, TTFT and ITL percentiles."""
    todo, lock = list(enumerate(requests)), threading.Lock()
    first, gaps, tokens = [], [], [0]

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                if not todo:
                    return
                _, (prompt, new) = todo.pop()
            body = {"model": "m", "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True}
            body = json.dumps(body | {"stream_options": {"include_usage": True}})
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            stamps, used = [], 0
            for line in reply:
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    if event["choices"] and event["choices"][0].get("text"):
                        stamps.append(time.perf_counter())
                    used = (event.get("usage") or {}).get("completion_tokens", used)
            with lock:
                tokens[0] += used
                if stamps:
                    first.append(stamps[0] - t0)
                    gaps.extend(b - a for a, b in itertools.pairwise(stamps))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    def pct(xs, q):
        return 1e3 * sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "rate": tokens[0] / wall,
        "ttft50": pct(first, 0.5),
        "ttft99": pct(first, 0.99),
        "itl50": pct(gaps, 0.5),
        "itl99": pct(gaps, 0.99),
    }


def hf_rate(run: str, requests: list[tuple[str, int]], batch: int) -> float:
    """transformers' generate in bfloat16 over the requests in batches of `batch` -> output tokens/s."""
    import tempfile

    import torch
    import transformers

    from llm_jax.run import load_run
    from llm_jax.tools.hf import export_hf

    tok = load_run(run).tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        model = transformers.LlamaForCausalLM.from_pretrained(
            export_hf(run, f"{tmp}/hf", log=lambda *_: None), dtype="bfloat16"
        ).eval()
    prompts = [[tok.eos_id] + tok.encode(p) for p, _ in requests]

    def run_all():
        produced = 0
        for i in range(0, len(requests), batch):
            group = prompts[i : i + batch]
            width = max(map(len, group))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            new = max(n for _, n in requests[i : i + batch])
            with torch.no_grad():
                model.generate(
                    ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
                )
            produced += sum(n for _, n in requests[i : i + batch])  # what the requests asked for
        return produced

    run_all()  # warm up
    t0 = time.perf_counter()
    produced = run_all()
    return produced / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
