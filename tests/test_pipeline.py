"""The whole path through the command line, on a small slice of the builtin corpus."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user's laptop has


def _generate(run, prompt: str, new_tokens: int) -> list[str]:
    """The arguments of `python -m llm_jax generate` for a run, a prompt and a token budget."""
    return ["-m", "llm_jax", "generate", "--run", str(run), "--prompt", prompt, "--max-new-tokens", str(new_tokens)]


def _run(*args, timeout=600, env=ENV):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_slice):
    run = tmp_path_factory.mktemp("pipeline") / "run"
    cmd = [
        "train.py",
        "--config",
        "configs/tiny.yaml",
        f"run_dir={run}",
        f"data.sources=[{','.join(corpus_slice)}]",
        "train.steps=40",
        "train.eval_every=20",
        "train.checkpoint_every=20",
        "model.vocab_size=1024",
    ]
    proc = _run(*cmd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run, cmd, proc.stdout


@pytest.mark.slow
def test_training_writes_the_documented_run_directory(trained_run, corpus_slice):
    from llm_jax.data.corpus import split_text

    run, _, out = trained_run
    for name in (
        "config.yaml",
        "tokenizer.model",
        "tokenizer.vocab",
        "data/train-00000.bin",
        "data/val-00000.bin",
        "data/documents/documents-00000.array_record",
        "data/meta.json",
        "data/report.json",
        "metrics.jsonl",
        "samples.txt",
        "checkpoints/40",
        "checkpoints/20",
    ):
        assert (run / name).exists(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    meta = json.loads((run / "data" / "meta.json").read_text())
    pieces = sum(len(split_text(Path(p).read_text(), 64 << 10)) for p in corpus_slice)  # data.txt_split_kb
    docs = meta["documents"]
    assert (
        docs["read"] == docs["kept"] == pieces > 5
        and 1 <= docs["val"] < pieces
        and meta["train_tokens"] > 100_000
        and meta["val_tokens"] > 1_000
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [20, 40]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5 and val[1]["bpb"] < val[0]["bpb"]
    assert {"loss", "lr", "tokens_per_s", "mfu", "grad_norm"} <= set(train[0])
    assert {"loss", "perplexity", "bpb"} <= set(val[0])
    assert "tokenizer: trained a 1024-piece BPE model" in out and "val | loss" in out
    assert (run / "samples.txt").read_text().startswith("--- sample 1 ---\nRomeo.\n")


@pytest.mark.slow
def test_rerunning_a_finished_run_changes_nothing(trained_run):
    run, cmd, _ = trained_run
    before = (run / "metrics.jsonl").read_text()
    proc = _run(*cmd)
    assert proc.returncode == 0, proc.stderr
    assert "run already complete at step 40" in proc.stdout
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_generate_streams_a_deterministic_continuation(trained_run, tmp_path):
    """Run twice with the command line's compilation cache: the second run compiles nothing new."""
    run, _, _ = trained_run
    args = [*_generate(run, "Ham.\n", 30), "--temperature", "0"]
    env = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"} | {"LLM_JAX_CACHE": str(tmp_path)}
    first = _run(*args, env=env)
    cached = sorted(p.name for p in (tmp_path / "jit").glob("*-cache"))
    second = _run(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("[40 steps] Ham.\n") and len(first.stdout) > len("[40 steps] Ham.\n") + 10
    assert first.stdout == second.stdout and "Warning" not in first.stderr + second.stderr
    assert len(cached) >= 3 and sorted(p.name for p in (tmp_path / "jit").glob("*-cache")) == cached
    sampled = _run(*args[:-2], "--temperature", "1.0", "--seed", "1")
    assert sampled.returncode == 0 and sampled.stdout != first.stdout


def test_a_prompt_longer_than_the_context_is_cut_from_the_left(trained_run):
    run, _, _ = trained_run
    proc = _run(*_generate(run, "To be, or not to be. " * 40, 8))
    assert proc.returncode == 0, proc.stderr
    assert "note: prompt has" in proc.stderr and "kept its last 56" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "llm_jax", "generate", "--run", "no/such/run", "--prompt", "x"], "is not a run directory"),
        (
            ["train.py", "--config", "tiny", "data.sources=[no/such/file.txt]", "run_dir=/tmp/llm_jax_bad"],
            "corpus path 'no/such/file.txt' does not exist",
        ),
        (["train.py", "--config", "tiny", "model.n_layer=3"], "did you mean 'model.n_layers'"),
        (["train.py", "--config", "tiny", "model.n_kv_heads=3"], "model.n_kv_heads=3 must divide model.n_heads=4"),
    ],
)
def test_bad_input_gets_one_clear_line_not_a_traceback(args, message):
    proc = _run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_reader_that_goes_away_stops_generate_quietly(trained_run):
    """`llm-jax generate ... | head`: the closed pipe ends the command with 141, as cat's, and no traceback."""
    run, _, _ = trained_run
    proc = subprocess.Popen(
        [sys.executable, *_generate(run, "Ham.\n", 40)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        cwd=ROOT,
    )
    proc.stdout.close()  # gone before the first token is written
    err = proc.communicate(timeout=600)[1].decode()
    assert proc.returncode == 141 and "Traceback" not in err, err
