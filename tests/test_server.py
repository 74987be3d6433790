"""`llm-jax serve` as a real process on 127.0.0.1, driven by the official openai client and raw HTTP."""

import http.client
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from conftest import lm_eval_samples, lm_eval_task_dir, tiny_config

from llm_jax.data.chat_template import prompt_ids
from llm_jax.inference.generate import Generator, stream_text
from llm_jax.model.transformer import Transformer
from llm_jax.run import load_run
from llm_jax.train.loop import train

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepared_template, corpus_slice) -> Path:
    run = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(prepared_template, run)
    train(tiny_config(run, "train.steps=30", "train.eval_every=30", sources=corpus_slice), log=lambda *_: None)
    return run


def _start(run: Path, log: Path, *flags: str):
    """A server process on a free port -> (process, port), once it says it is serving."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_jax", "serve", "--run", str(run), "--port", "0", "--model-name", MODEL, *flags],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    line = proc.stdout.readline()
    assert "serving" in line, (line, log.read_text()[-2000:])
    return proc, int(line.split("http://127.0.0.1:")[1].split("/")[0])


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    # rows over data 2, kv heads over tensor 2 of the 8 simulated devices (tests/conftest.py sets XLA_FLAGS)
    proc, port = _start(run, tmp_path_factory.mktemp("log") / "server.log", "--max-batch", "16", "--mesh", "2,1,2")
    yield proc, port
    proc.terminate()
    proc.wait(30)


def _client(port, **kw):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", **kw)


def _post(port, path, body, raw=False, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST", path, body if raw else json.dumps(body), {"Content-Type": "application/json", **(headers or {})}
    )
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def _get_text(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    return conn.getresponse().read().decode()


def _get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


@pytest.mark.slow
def test_openai_client_completions_chat_and_streams_match_the_generator(run, server):
    _, port = server
    client = _client(port)
    assert [m.id for m in client.models.list().data] == [MODEL]
    loaded = load_run(str(run))
    cfg, params, tok = loaded.cfg, loaded.params, loaded.tokenizer
    gen = Generator(cfg.model, params)
    stop_ids = (tok.eos_id,) + prompt_ids(tok, [{"role": "user", "content": ""}])[1]

    # greedy completion == what the generator writes for the same prompt
    ids = [tok.eos_id] + tok.encode("Romeo.\n")
    expected = "".join(stream_text(tok, gen.stream(ids, 24, stop_ids=stop_ids)))
    out = client.completions.create(model=MODEL, prompt="Romeo.\n", max_tokens=24, temperature=0)
    assert out.choices[0].text == expected and len(expected) > 0
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 24
    assert out.choices[0].finish_reason == "length"
    streamed = list(
        client.completions.create(model=MODEL, prompt="Romeo.\n", max_tokens=24, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "length"

    # a stop string ends the text just before it
    cut = expected[len(expected) // 2 :][:3]
    out = client.completions.create(model=MODEL, prompt="Romeo.\n", max_tokens=24, temperature=0, stop=[cut])
    assert out.choices[0].text == expected[: expected.index(cut)] and out.choices[0].finish_reason == "stop"

    # chat through the template, plain and streamed; a seed makes sampling repeatable
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Kent?"}]
    chat_ids, _ = prompt_ids(tok, messages)
    expected = "".join(stream_text(tok, gen.stream(chat_ids, 20, 1.0, 0, 0.9, 7, stop_ids)))
    kw = {"model": MODEL, "messages": messages, "max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    out = client.chat.completions.create(**kw)
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(chat_ids)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


BAD = [
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": ', 400, "not valid JSON"),
    ("/v1/completions", {"model": MODEL}, 400, "'prompt' must be a string"),
    ("/v1/completions", {"prompt": "x"}, 400, "missing required field 'model'"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "'gpt-9' does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "'max_tokens' must be an integer"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "at most 63 new tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x " * 80, "max_tokens": 8}, 400, "maximum context length is 64"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 17}, 400, "'n' must be an integer in [1, 16]"),
    ("/v1/completions", {"model": MODEL, "prompt": ["x"] * 4, "n": 5}, 400, "'n' must be an integer in [1, 4]"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, -2]}, 400, "a list of token ids (each in [0, vocab"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "'logprobs' must be an integer in"),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "max_tokens": 0},
        400,
        "'max_tokens' must be an integer in [1,",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": "yes"}, 400, "'echo' must be true or false"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "needs 'logprobs': true",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "'stop' must be"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "'messages' must be a non-empty list"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
        400,
        "unsupported role 'tool'",
    ),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "message 0 must be"),
    ("/v1/embeddings", {"model": MODEL, "input": "x"}, 404, "no endpoint POST /v1/embeddings"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    _, port = server
    for path, body, status, message in BAD:
        got, reply = _post(port, path, body, raw=isinstance(body, bytes))
        assert (got, set(reply["error"])) == (status, {"message", "type", "param", "code"}), (body, reply)
        assert message in reply["error"]["message"], (message, reply)
    client = _client(port, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length") as error:
        client.completions.create(model=MODEL, prompt="x " * 80, max_tokens=8)
    assert error.value.code == "context_length_exceeded"
    assert _get(port, "/health") == (200, _get(port, "/health")[1]) and _get(port, "/health")[1]["status"] == "ok"
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=3).usage.completion_tokens <= 3


def test_after_every_kind_of_4xx_the_same_keep_alive_connection_serves_the_next_request(server):
    _, port = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    ok = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2})
    bad = [
        ("POST", "/v1/embeddings", ok, 404),
        ("GET", "/v1/completions", None, 404),
        ("POST", "/v1/completions", '{"model": ', 400),
        ("POST", "/v1/completions", json.dumps({"model": "gpt-9", "prompt": "x"}), 404),
        ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x" * 10}) + " " * (1 << 20), 413),
        ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x " * 80, "max_tokens": 8}), 400),
    ]
    conn.connect()
    sock = conn.sock
    for method, path, body, status in bad:
        conn.request(method, path, body, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == status and "error" in json.loads(reply.read()), (path, body and body[:40])
        conn.request("POST", "/v1/completions", ok, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 200 and json.loads(reply.read())["usage"]["completion_tokens"] <= 2
        assert conn.sock is sock  # the same connection throughout (http.client would reconnect silently)
    text = _get_text(port, "/metrics")
    assert "llm_jax_kv_blocks_total 64" in text and 'llm_jax_time_to_first_token_seconds{quantile="0.5"}' in text
    assert _get(port, "/openapi.json")[1]["paths"]["/v1/completions"]["post"]


def test_a_prompt_sent_again_reads_its_shared_blocks_and_gets_the_same_answer(run, server):
    """Prefix sharing through the server (blocks of 16, the pool split over 2 batch shards): the second
    of two equal greedy completions reads the first one's full prompt blocks (all but the block of its
    last token) instead of prefilling them, and answers the same."""
    _, port = server
    tok = load_run(str(run)).tokenizer
    text = "Enter KING LEAR, with his daughters, and the Duke of Gloucester and attendants.\n"
    full = 1 + len(tok.encode(text))  # with the leading <|endoftext|>; the context is 64

    def shared() -> int:
        return int(re.search(r"^llm_jax_prompt_tokens_shared_total (\d+)$", _get_text(port, "/metrics"), re.M)[1])

    before = shared()
    client = _client(port)
    outs = [client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0) for _ in range(2)]
    assert outs[0].choices[0].text == outs[1].choices[0].text and outs[1].usage.prompt_tokens == full
    assert shared() - before == (full - 1) // 16 * 16 > 0


def test_logprobs_echo_and_n_through_the_openai_client_equal_the_model(run, server):
    """Completions with echo and logprobs (what lm-evaluation-harness's local-completions sends) give the
    prompt's log-probs as the model computes them; n choices with a seed are seed, seed + 1, ..."""
    _, port = server
    client = _client(port)
    loaded = load_run(str(run))
    tok, model = loaded.tokenizer, Transformer(loaded.cfg.model)
    text = "Romeo and Juliet.\n"
    out = client.completions.create(model=MODEL, prompt=text, max_tokens=3, temperature=0, logprobs=2, echo=True)
    choice = out.choices[0]
    ids = [tok.eos_id] + tok.encode(text)
    hidden, _ = model.apply({"params": loaded.params}, jnp.asarray([ids]))
    logps = jax.nn.log_softmax(model.apply({"params": loaded.params}, hidden, method=Transformer.logits)[0])
    prompt = [float(logps[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    lp = choice.logprobs
    assert choice.text.startswith(text) and len(lp.tokens) == len(ids) - 1 + 3
    np.testing.assert_allclose(lp.token_logprobs[: len(prompt)], prompt, atol=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    assert "".join(lp.tokens[: len(prompt)]).strip() == text.strip()
    scored = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].text == text and scored.usage.completion_tokens == 0
    np.testing.assert_allclose(scored.choices[0].logprobs.token_logprobs, prompt, atol=1e-4)

    many = client.completions.create(model=MODEL, prompt=["To be", "Romeo"], max_tokens=6, n=3, seed=5)
    assert [c.index for c in many.choices] == list(range(6)) and many.usage.completion_tokens <= 36
    for k, c in enumerate(many.choices):
        alone = client.completions.create(model=MODEL, prompt=["To be", "Romeo"][k // 3], max_tokens=6, seed=5 + k % 3)
        assert c.text == alone.choices[0].text

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Who?"}], max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    _, port = server
    before = _get(port, "/health")[1]["cancelled"]
    body = json.dumps({"model": MODEL, "prompt": "Romeo.\n", "max_tokens": 56, "temperature": 0, "stream": True})
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        assert b"200 OK" in sock.recv(200)
    for _ in range(100):
        if _get(port, "/health")[1]["cancelled"] > before:
            break
        time.sleep(0.1)
    assert _get(port, "/health")[1]["cancelled"] == before + 1
    assert _client(port).completions.create(model=MODEL, prompt="x", max_tokens=4).choices[0].finish_reason


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


MALFORMED = [
    (b'{"model": "tiny-chat", "prompt": ', 400),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "many"}).encode(), 400),
    (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404),
    (json.dumps({"model": MODEL, "prompt": "x " * 80}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400),
]


def _leave_mid_stream(port, i):
    """A streamed request whose client reads the first event and closes the connection."""
    body = json.dumps({"model": MODEL, "prompt": f"{i}. ", "max_tokens": 40, "stream": True, "seed": i})
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        return b"200 OK" in sock.recv(200)


@pytest.mark.slow
def test_64_clients_with_malformed_and_abandoned_requests_all_answered_in_bounded_memory(server):
    """2 rounds of 192 requests from 64 concurrent clients: completions and chat, streamed or not, 1-40
    new tokens; 1 in 6 malformed (a 4xx each), 1 in 12 streams abandoned after their first event.
    Every valid request is answered, the server's memory grows < 64 MiB in the second round, and
    afterwards no request waits, runs or holds KV blocks."""
    proc, port = server
    client = _client(port, max_retries=0)

    def ask(i):
        r = random.Random(i)
        n, stream = r.randint(1, 40), i % 3 == 0
        if i % 6 == 5:
            body, status = MALFORMED[i % len(MALFORMED)]
            path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
            return _post(port, path, body, raw=True)[0] == status
        if i % 12 == 3:
            return _leave_mid_stream(port, i)
        if i % 2:
            out = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=n, seed=i, stream=stream
            )
            text = "".join(c.choices[0].delta.content or "" for c in out) if stream else out.choices[0].message.content
        else:
            out = client.completions.create(model=MODEL, prompt=f"{i}. " * r.randint(1, 4), max_tokens=n, stream=stream)
            text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        return isinstance(text, str)

    def load():
        with ThreadPoolExecutor(64) as pool:
            return sum(pool.map(ask, range(192)))

    assert load() == 192
    rss = _rss_mib(proc.pid)
    assert load() == 192
    _wait_idle(port)
    assert _rss_mib(proc.pid) - rss < 64, (rss, _rss_mib(proc.pid))


def _wait_idle(port):
    for _ in range(200):
        health = _get(port, "/health")[1]
        if health["waiting"] == health["prefilling"] == health["running"] == health["kv_blocks_used"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {health}")


def test_a_full_queue_answers_429_and_loses_nothing(run, tmp_path):
    proc, port = _start(run, tmp_path / "server.log", "--max-batch", "1", "--max-queue", "1", "--api-key", "k3y")
    try:
        body = {"model": MODEL, "prompt": "Romeo.\n", "max_tokens": 50, "temperature": 0}
        assert _post(port, "/v1/completions", body)[1]["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            _client(port).models.list()
        auth = {"Authorization": "Bearer k3y"}
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: _post(port, "/v1/completions", body, headers=auth), range(8)))
        statuses = sorted(status for status, _ in replies)
        assert set(statuses) == {200, 429} and len(statuses) == 8, statuses
        busy = next(reply for status, reply in replies if status == 429)["error"]
        assert busy["type"] == "rate_limit_error" and "requests are already waiting" in busy["message"]
        assert _post(port, "/v1/completions", body, headers=auth)[0] == 200

        # SIGTERM while a stream runs: the stream still ends whole, then the server exits
        stream = json.dumps(body | {"stream": True})
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(stream)}\r\n\r\n{stream}".encode()
            )
            reply = sock.recv(4096)
            assert b"200 OK" in reply
            proc.terminate()
            while b"data: [DONE]" not in reply and (part := sock.recv(4096)):
                reply += part
        events = [json.loads(line[6:]) for line in reply.decode().split("\r\n") if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length" and b"data: [DONE]" in reply
        assert proc.wait(30) in (0, -15)
    finally:
        proc.kill()
        proc.wait(30)


def test_a_serving_mesh_must_fit_the_devices_and_the_model(run):
    from llm_jax.errors import UserError
    from llm_jax.parallel.sharding import inference_layout as serve_layout

    cfg = load_run(str(run)).cfg
    assert serve_layout(cfg, "1,1,1") is None
    assert dict(serve_layout(cfg, "4,1,2").mesh.shape) == {
        "data": 4,
        "pipeline": 1,
        "fsdp": 1,
        "expert": 1,
        "context": 1,
        "tensor": 2,
    }
    for mesh, message in [
        ("4,1,4", "needs 16 devices; this host has 8"),
        ("1,1,8", "kv_heads=2 is split over"),
        ("2,1,1,2", "no pipeline stages for inference"),
        ("two", "must be data,fsdp,tensor"),
    ]:
        with pytest.raises(UserError, match=message):
            serve_layout(cfg, mesh)


def test_inference_reads_a_run_straight_into_its_shards_in_the_compute_dtype(run, tmp_path):
    """load_run with a layout (generate / chat / serve --mesh): each of 8 devices holds 1/8 of the weight
    matrices' bytes (norm scales replicated), already in the run's compute dtype (bfloat16 here), and
    generates what one device does."""
    from llm_jax.config import MeshConfig
    from llm_jax.parallel.sharding import make_layout

    shutil.copytree(run, tmp_path / "run")
    config = tmp_path / "run" / "config.yaml"
    config.write_text(config.read_text().replace("dtype: float32", "dtype: bfloat16"))
    run = tmp_path / "run"
    cfg = load_run(str(run)).cfg
    layout = make_layout(
        MeshConfig(
            data=1,
            pipeline=1,
            fsdp=4,
            expert=1,
            context=1,
            tensor=2,
            dcn_data=1,
            rules=cfg.mesh.rules,
            microbatches=0,
            pipeline_repeats=1,
        ),
        jax.devices()[:8],
    )
    sharded = load_run(str(run), layout, inference=True)
    leaves = jax.tree_util.tree_leaves_with_path(sharded.params)
    total = sum(x.nbytes for _, x in leaves)
    per_device = dict.fromkeys(jax.devices()[:8], 0)
    for _, x in leaves:
        for shard in x.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    replicated = sum(x.nbytes for p, x in leaves if "norm" in jax.tree_util.keystr(p))
    assert all(b <= (total - replicated) / 8 + replicated for b in per_device.values()), (total, per_device)
    assert {str(x.dtype) for p, x in leaves if x.ndim >= 2 and "norm" not in jax.tree_util.keystr(p)} == {"bfloat16"}
    prompt = [3, 17, 99, 5]
    one = list(Generator(cfg.model, load_run(str(run)).params).stream(prompt, 12))
    assert list(Generator(cfg.model, sharded.params, layout).stream(prompt, 12)) == one


@pytest.mark.slow
def test_lm_evaluation_harness_scores_the_served_model_as_llm_jax_eval_does(run, server, tmp_path):
    """lm-eval's `local-completions` model (echo + logprobs, our /tokenize for its tokenizer) on a local
    multiple-choice task: its per-choice log-likelihoods equal llm-jax eval's scorer to 1e-4, and its
    accuracy equals ours."""
    from llm_jax.evals.harness import Scorer, choice_scores

    _, port = server
    args = f"model={MODEL},base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=remote,num_concurrent=4"
    samples = lm_eval_samples("lm_eval", "local-completions", args, lm_eval_task_dir(tmp_path / "tasks"), tmp_path)
    theirs = [[float(r[0][0]) for r in s["resps"]] for s in samples]

    loaded = load_run(str(run))
    rows = [
        {"context": s["doc"]["question"], "choices": s["doc"]["choices"], "gold": s["doc"]["answer"]} for s in samples
    ]
    ours = choice_scores(Scorer(loaded.cfg.model, loaded.params), loaded.tokenizer, rows)
    np.testing.assert_allclose(np.array(theirs), np.array(ours), atol=1e-4)
    accuracy = np.mean([int(np.argmax(o) == r["gold"]) for o, r in zip(ours, rows)])
    assert np.mean([s["acc"] for s in samples]) == accuracy and len(rows) == 8
