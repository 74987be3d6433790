"""Generation in the terminal: `llm-jax generate` (one prompt, streamed) and `llm-jax chat` (a
conversation through the chat template, trimmed to the context as it grows)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from llm_jax.config import SampleConfig
from llm_jax.data.chat_template import prompt_ids
from llm_jax.errors import UserError
from llm_jax.inference.generate import Generator, fit_prompt, stream_text
from llm_jax.parallel.sharding import inference_layout
from llm_jax.run import load_config_of, load_run


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int

    @classmethod
    def resolve(
        cls,
        s: SampleConfig,
        max_new_tokens: int | None,
        temperature: float | None,
        top_k: int | None,
        top_p: float | None,
        seed: int,
    ) -> Sampling:
        """Command-line settings over the run's sample.* defaults, checked."""
        out = cls(
            max_new_tokens or s.max_new_tokens,
            s.temperature if temperature is None else temperature,
            s.top_k if top_k is None else top_k,
            s.top_p if top_p is None else top_p,
            seed,
        )
        if out.max_new_tokens <= 0 or out.temperature < 0 or out.top_k < 0 or not 0 < out.top_p <= 1:
            raise UserError("need --max-new-tokens > 0, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
        return out


def generate_text(run_dir: str, prompt: str | None, settings: dict, stop: list[str], mesh: str = "1,1,1") -> None:
    """Streams a continuation of `prompt` (None: standard input) to standard output; settings are
    Sampling.resolve's keywords."""
    run, layout = _load(run_dir, mesh)
    cfg, tokenizer = run.cfg, run.tokenizer
    prompt = sys.stdin.read() if prompt is None else prompt
    s = Sampling.resolve(cfg.sample, **settings)
    ids, max_new, note = fit_prompt([tokenizer.bos_id] + tokenizer.encode(prompt), cfg.model.seq_len, s.max_new_tokens)
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(f"[{run.step} steps] {prompt}", end="", flush=True)
    tokens = Generator(cfg.model, run.params, layout).stream(
        ids, max_new, s.temperature, s.top_k, s.top_p, s.seed, stop_ids=(tokenizer.eos_id,)
    )
    for piece in stream_text(tokenizer, tokens, stop):
        print(piece, end="", flush=True)
    print()


def chat(run_dir: str, settings: dict, system: str | None, mesh: str = "1,1,1") -> None:
    """A conversation on standard input / output; /reset starts over, /exit or end of input quits."""
    run, layout = _load(run_dir, mesh)
    cfg, tokenizer = run.cfg, run.tokenizer
    s = Sampling.resolve(cfg.sample, **settings)
    max_new = min(s.max_new_tokens, cfg.model.seq_len // 2)
    system = cfg.sample.system if system is None else system
    generator = Generator(cfg.model, run.params, layout)
    print(
        f"chat with {run_dir} ({run.step} steps, context {cfg.model.seq_len} tokens); "
        "/reset starts over, /exit or Ctrl-D quits",
        file=sys.stderr,
    )
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
            print(
                f"(that message is {len(ids)} tokens with the template; at most {cfg.model.seq_len - max_new} "
                "fit the context with room for a reply: say less, or pass a lower --max-new-tokens)",
                file=sys.stderr,
            )
            messages.pop()
            continue
        print("bot> ", end="", flush=True)
        reply = []
        tokens = generator.stream(ids, max_new, s.temperature, s.top_k, s.top_p, s.seed + turn, stop)
        for piece in stream_text(tokenizer, tokens):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
        turn += 1


def _load(run_dir: str, mesh: str):
    """The run read into place for --mesh (parallel/sharding.py's inference_layout) -> (run, layout)."""
    layout = inference_layout(load_config_of(run_dir), mesh)
    return load_run(run_dir, layout, inference=True), layout
