"""`llm-jax eval`: run tasks (llm_jax/evals/tasks.py) on a run's newest checkpoint; a table and a
JSON record with the config and checkpoint step.

Scoring uses one jitted function of fixed shape [batch, seq_len + 1] (compiled once): the
log-probability of every token given those before it, with segments so that documents packed
into one window do not see each other (as in pretraining). Long inputs keep their end.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import to_dict
from llm_jax.data.chat_template import prompt_ids
from llm_jax.data.corpus import ReadStats, read_documents
from llm_jax.data.progress import progress
from llm_jax.errors import UserError
from llm_jax.evals.tasks import Task, extract, load_task
from llm_jax.inference.generate import Generator, first_stop, fit_prompt
from llm_jax.model.transformer import Transformer
from llm_jax.parallel.sharding import Layout, inference_layout, mesh_scope
from llm_jax.run import eval_record_path, load_config_of, load_run


class Scorer:
    """Per-token log-probs of fixed-size windows, `batch` windows per call (with a layout: split over its
    batch shards, parameters where load_run placed them)."""

    def __init__(self, cfg, params, batch: int = 16, layout: Layout | None = None):
        self.cfg, self.params, self.layout, self.width = cfg, params, layout, cfg.seq_len + 1
        shards = layout.axis_size("batch") if layout else 1
        self.batch = -(-batch // shards) * shards
        model = Transformer(cfg)

        def logps(params, tokens, segments, greedy):  # [B, T + 1] -> [B, T]: log p(tokens[:, 1:])
            hidden, _ = model.apply({"params": params}, tokens[:, :-1], segments=segments[:, :-1])
            out = model.apply({"params": params}, hidden, tokens[:, 1:], method=Transformer.token_logps)
            if not greedy:
                return out
            # is each token the argmax? logits 256 positions at a time (a batch's whole [B, T, vocab]
            # would be 16 GB in float32 for 16 rows of 2048 tokens over a 128K vocabulary)
            tops = [
                jnp.argmax(model.apply({"params": params}, hidden[:, t : t + 256], method=Transformer.logits), -1)
                for t in range(0, hidden.shape[1], 256)
            ]
            top = jnp.concatenate(tops, axis=1)
            return out, top == tokens[:, 1:]

        self._logps = jax.jit(logps, static_argnums=3)

    def __call__(self, windows: list[tuple[list[int], list[int]]], greedy: bool = False) -> list:
        """[(tokens, segment ids) of at most seq_len + 1] -> log p of each token after the first
        (with `greedy`: and whether each is the model's most likely token, as (log p, bool) pairs)."""
        out = []
        batches = range(0, len(windows), self.batch)
        for start in progress(batches, len(batches), f"scoring {len(windows):,} windows"):
            chunk = windows[start : start + self.batch]
            tokens = np.zeros((self.batch, self.width), np.int32)
            segments = np.zeros((self.batch, self.width), np.int32)
            for r, (ids, seg) in enumerate(chunk):
                tokens[r, : len(ids)], segments[r, : len(ids)] = ids, seg
                segments[r, len(ids) :] = -1  # padding: its own segment
            with mesh_scope(self.layout):
                result = self._logps(self.params, jnp.asarray(tokens), jnp.asarray(segments), greedy)
            if greedy:
                logps, top = np.asarray(result[0]), np.asarray(result[1])
                out += [(logps[r, : len(ids) - 1], top[r, : len(ids) - 1]) for r, (ids, _) in enumerate(chunk)]
            else:
                logps = np.asarray(result)
                out += [logps[r, : len(ids) - 1] for r, (ids, _) in enumerate(chunk)]
        return out


def choice_scores(scorer: Scorer, tokenizer, rows: list[dict]) -> list[list[float]]:
    """Each row's choices' log-likelihoods given its context (after the BOS, context and choice
    tokenized apart), summed over the choice's tokens."""
    windows, spans = [], []
    for row in rows:
        context = [tokenizer.bos_id] + tokenizer.encode(row["context"])
        for choice in row["choices"]:
            ids = tokenizer.encode(choice)
            full = (context + ids)[-scorer.width :]
            windows.append((full, [0] * len(full)))
            spans.append(min(len(ids), len(full) - 1))
    logps = scorer(windows)
    scores, k = [], 0
    for row in rows:
        n = len(row["choices"])
        scores.append([float(logps[k + i][-spans[k + i] :].sum()) for i in range(n)])
        k += n
    return scores


def multiple_choice(scorer: Scorer, tokenizer, rows: list[dict]) -> dict:
    """acc and acc_norm (log-likelihood per character of the choice, lm-evaluation-harness's
    definition), overall and per sub-task."""
    right, right_norm, total = defaultdict(int), defaultdict(int), defaultdict(int)
    for row, scores in zip(rows, choice_scores(scorer, tokenizer, rows)):
        per_char = [s / max(1, len(c)) for s, c in zip(scores, row["choices"])]
        for key in {"all", row["task"]}:
            right[key] += int(np.argmax(scores) == row["gold"])
            right_norm[key] += int(np.argmax(per_char) == row["gold"])
            total[key] += 1
    return {
        key: {"acc": right[key] / total[key], "acc_norm": right_norm[key] / total[key], "n": total[key]}
        for key in _keys(total)
    }


def generation(
    cfg,
    params,
    tokenizer,
    rows: list[dict],
    system: str | None = None,
    batch: int = 16,
    generator: Generator | None = None,
) -> tuple[dict, list[str]]:
    """Greedy outputs, batched; exact match of the extracted output, overall and per sub-task."""
    outputs = greedy_outputs(cfg, tokenizer, rows, generator or Generator(cfg, params), system, batch)
    right, total = defaultdict(int), defaultdict(int)
    for row, text in zip(rows, outputs):
        for key in {"all", row["task"]}:
            right[key] += int(extract(text, row.get("regex")) == row["answer"].strip())
            total[key] += 1
    return {key: {"exact_match": right[key] / total[key], "n": total[key]} for key in _keys(total)}, outputs


def greedy_outputs(
    cfg, tokenizer, rows: list[dict], generator: Generator, system: str | None = None, batch: int = 16
) -> list[str]:
    """Each row's greedy text ({"prompt" or "messages", "max_tokens", "stop"}), cut before its first
    stop string; rows decode `batch` at a time."""
    outputs = []
    batches = range(0, len(rows), batch)
    for start in progress(batches, len(batches), f"generating {len(rows):,} answers"):
        chunk, prompts, budgets, stops = rows[start : start + batch], [], [], set()
        for row in chunk:
            if "messages" in row:
                ids, stop_ids = prompt_ids(tokenizer, row["messages"], system)
            else:
                ids, stop_ids = [tokenizer.bos_id] + tokenizer.encode(row["prompt"]), (tokenizer.eos_id,)
            ids, new, _ = fit_prompt(ids, cfg.seq_len, row["max_tokens"])
            prompts.append(ids)
            budgets.append(new)
            stops |= set(stop_ids)
        drawn = [[] for _ in chunk]
        n = len(chunk)
        for step in generator.stream_batch(prompts, budgets, [0.0] * n, [0] * n, [1.0] * n, [0] * n, tuple(stops)):
            for r, tok in enumerate(step):
                if tok is not None:
                    drawn[r].append(tok)
        for row, ids in zip(chunk, drawn):
            text = tokenizer.decode(ids)
            end = first_stop(text, row["stop"])
            outputs.append(text[:end])
    return outputs


def perplexity(scorer: Scorer, tokenizer, cfg, source: str, limit: int | None) -> dict:
    """Loss (nats per token), perplexity and bits per byte of every document of a source, packed
    into windows of seq_len + 1 tokens that overlap by one (each token after the first is scored
    once); documents start with EOS as in pretraining and attend only within themselves."""
    d = cfg.data
    stream, segs = [], []
    for i, doc in enumerate(read_documents([source], d.text_field, d.cache_dir, "skip", d.tfds_data_dir, ReadStats())):
        ids = [tokenizer.bos_id] + tokenizer.encode(doc.text)
        stream += ids
        segs += [i] * len(ids)
    if len(stream) < 2:
        raise UserError(f"ppl:{source} holds no text")
    step = scorer.width - 1
    starts = list(range(0, len(stream) - 1, step))[: limit or None]
    windows = [(stream[s : s + scorer.width], segs[s : s + scorer.width]) for s in starts]
    token_bytes = tokenizer.token_bytes(cfg.model.vocab_size)
    nll = tokens = nbytes = 0
    for (ids, seg), logps in zip(windows, scorer(windows)):
        same = np.asarray(seg[1:]) == np.asarray(seg[:-1])  # a document's first token (its EOS) has no context
        nll -= float(logps[same].sum())
        tokens += int(same.sum())
        nbytes += int(token_bytes[np.asarray(ids[1:])[same]].sum())
    loss = nll / tokens
    return {
        "all": {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "bpb": nll / math.log(2) / nbytes,
            "tokens": tokens,
        }
    }


def _keys(total: dict) -> list[str]:
    return sorted(total, key=lambda k: (k != "all", k))


def run_eval(
    run_dir: str,
    specs: list[str],
    limit: int | None = None,
    out: str | None = None,
    system: str | None = None,
    mesh: str = "1,1,1",
    log=print,
) -> dict:
    """The tasks on the run's newest checkpoint, read into place for --mesh (in the compute dtype)."""
    tasks: list[Task] = [load_task(spec, limit) for spec in specs]  # bad task files fail before the model loads
    layout = inference_layout(load_config_of(run_dir), mesh)
    run = load_run(run_dir, layout, inference=True)
    cfg, params, tokenizer = run.cfg, run.params, run.tokenizer
    scorer, generator = Scorer(cfg.model, params, layout=layout), None
    results, t0 = {}, time.time()
    for task in tasks:
        if task.kind == "ppl":
            results[task.name] = perplexity(scorer, tokenizer, cfg, task.source, limit)
        elif task.kind == "choice":
            results[task.name] = multiple_choice(scorer, tokenizer, task.rows)
        else:
            prompt = cfg.sample.system if system is None else system
            generator = generator or Generator(cfg.model, params, layout)
            results[task.name] = generation(cfg.model, params, tokenizer, task.rows, prompt, generator=generator)[0]
    record = {
        "run": str(run_dir),
        "step": run.step,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.time() - t0, 1),
        "tasks": specs,
        "limit": limit,
        "results": results,
        "config": to_dict(cfg),
    }
    path = Path(out).expanduser() if out else eval_record_path(run.path, run.step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    log(format_table(record))
    log(f"-> {path}")
    return record


def format_table(record: dict) -> str:
    lines = [
        f"{record['run']} at step {record['step']} ({record['seconds']} s)",
        f"{'task':<32} {'metric':<12} {'value':>9} {'n':>7}",
    ]
    for task, by_key in record["results"].items():
        for key, metrics in by_key.items():
            if key != "all" and len(by_key) == 2:  # one sub-task: its rows repeat the totals
                continue
            label = task if key == "all" else f"  {key}"
            n = metrics.get("n", metrics.get("tokens", ""))
            for metric, value in metrics.items():
                if metric not in ("n", "tokens"):
                    lines.append(f"{label:<32} {metric:<12} {value:>9.4f} {n:>7}")
                    label = ""
    return "\n".join(lines)
