"""Hugging Face Llama interop: round trips without torch; logits and greedy parity with transformers."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import load_config
from llm_jax.data.chat_template import prompt_ids, render
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError
from llm_jax.inference.generate import Generator
from llm_jax.model.transformer import Transformer
from llm_jax.run import load_run, write_params_run
from llm_jax.tools.hf import export_hf, import_hf

# (n_heads, n_kv_heads, tie_embeddings, rope_theta): MHA tied, GQA untied, MQA with a large theta
CONFIGS = [(4, 4, True, 10000.0), (4, 2, False, 500000.0), (8, 1, False, 1e6)]


def _run(tmp_path, tokenizer_path, heads, kv_heads, tie, theta, name="run", extra=()):
    """A run directory with random (scaled-up, so logits are far from uniform) float parameters."""
    cfg = load_config(
        "tiny",
        [
            f"run_dir={tmp_path / name}",
            "model.vocab_size=520",
            "model.seq_len=48",
            f"model.n_heads={heads}",
            f"model.n_kv_heads={kv_heads}",
            f"model.tie_embeddings={str(tie).lower()}",
            f"model.rope_theta={theta}",
            *extra,
        ],
    )
    model = Transformer(cfg.model)
    boxed = jax.jit(lambda: model.init(jax.random.PRNGKey(heads + kv_heads), jnp.zeros((1, 8), jnp.int32)))()
    params = jax.tree_util.tree_map(
        lambda x: x.unbox() * (4 if x.unbox().ndim > 1 else 1), boxed["params"], is_leaf=lambda x: hasattr(x, "unbox")
    )
    write_params_run(tmp_path / name, cfg, params, "7", tokenizer_path.parent)
    return tmp_path / name


def _logits(run, tokens):
    loaded = load_run(str(run))
    cfg, params = loaded.cfg, loaded.params
    model = Transformer(cfg.model)
    hidden, _ = model.apply({"params": params}, jnp.asarray(tokens))
    return np.asarray(model.apply({"params": params}, hidden, method=Transformer.logits))


@pytest.fixture(scope="module")
def tokenizer_path(prepared_template):
    return prepared_template / "tokenizer.model"


def test_export_then_import_gives_back_the_same_parameters_even_sharded(tmp_path, tokenizer_path):
    run = _run(tmp_path, tokenizer_path, 4, 2, False, 500000.0)
    lines = []
    hf = export_hf(str(run), str(tmp_path / "hf"), shard_bytes=100_000, log=lines.append)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "LlamaForCausalLM" in lines[0]
    config = json.loads((hf / "config.json").read_text())
    assert (config["num_key_value_heads"], config["tie_word_embeddings"], config["rope_theta"]) == (2, False, 500000.0)
    back = import_hf(str(hf), str(tmp_path / "back"), log=lambda *_: None)
    a, b = load_run(str(run)).params, load_run(str(back)).params
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    tokens = [[3, 50, 7, 300, 9, 12]]
    np.testing.assert_array_equal(_logits(run, tokens), _logits(back, tokens))


def test_bad_checkpoints_name_the_problem(tmp_path, tokenizer_path):
    from safetensors.numpy import load_file, save_file

    hf = export_hf(str(_run(tmp_path, tokenizer_path, 4, 4, True, 10000.0)), str(tmp_path / "hf"), log=lambda *_: None)
    tensors = load_file(str(hf / "model.safetensors"))
    config = json.loads((hf / "config.json").read_text())

    def attempt(change_tensors=None, change_config=None, name="bad"):
        bad = tmp_path / name
        shutil.copytree(hf, bad)
        if change_tensors:
            save_file(change_tensors(dict(tensors)), str(bad / "model.safetensors"))
        if change_config:
            (bad / "config.json").write_text(json.dumps(change_config(dict(config))))
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        import_hf(str(bad), str(tmp_path / "out"), log=lambda *_: None)

    with pytest.raises(UserError, match=r"missing tensor model.layers.1.mlp.up_proj.weight"):
        attempt(lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}, name="b1")
    with pytest.raises(
        UserError,
        match=r"model.layers.0.self_attn.k_proj.weight has shape \(32, 64\), expected "
        r"\(64, 64\)",
    ):
        attempt(lambda t: t | {"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 64), np.float32)}, name="b2")
    with pytest.raises(UserError, match="hidden_act='gelu' is not supported"):
        attempt(change_config=lambda c: c | {"hidden_act": "gelu"}, name="b3")
    with pytest.raises(UserError, match="model_type='gpt2' is not supported"):
        attempt(change_config=lambda c: c | {"model_type": "gpt2"}, name="b4")
    with pytest.raises(UserError, match=r"rope_scaling=.*yarn.* is not supported \(plain RoPE and Llama 3.1's llama3"):
        attempt(change_config=lambda c: c | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, name="b5")
    with pytest.raises(UserError, match="no place for: model.layers.0.self_attn.q_proj.bias"):
        attempt(lambda t: t | {"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}, name="b6")
    qwen3_moe = {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    with pytest.raises(
        UserError, match=r"decoder_sparse_step=2, mlp_only_layers=\[\]: llm_jax imports Qwen MoE models"
    ):
        attempt(change_config=lambda c: c | qwen3_moe | {"decoder_sparse_step": 2}, name="b8")
    with pytest.raises(UserError, match=r"num_experts_per_tok=None must be a positive integer"):
        attempt(change_config=lambda c: c | qwen3_moe | {"num_experts_per_tok": None}, name="b9")
    (tmp_path / "b7").mkdir()
    (tmp_path / "b7" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has no tokenizer \\(tokenizer.json or a sentencepiece tokenizer.model\\)"):
        import_hf(str(tmp_path / "b7"), str(tmp_path / "out7"))
    with pytest.raises(UserError, match="exists; remove it"):
        export_hf(str(tmp_path / "run"), str(hf))
    both = _run(tmp_path, tokenizer_path, 4, 4, True, 1e4, "both", ["model.qkv_bias=true", "model.qk_norm=true"])
    with pytest.raises(UserError, match="model.qkv_bias with model.qk_norm, or with experts but no shared_gate"):
        export_hf(str(both), str(tmp_path / "hf_both"))


@pytest.fixture
def hf_libs():
    """(transformers, torch), or a skip where they are not installed (the dev extra has them on Python 3.11)."""
    return pytest.importorskip("transformers"), pytest.importorskip("torch")


@pytest.mark.parametrize("heads, kv_heads, tie, theta", CONFIGS)
@pytest.mark.slow
def test_exported_runs_match_transformers_logits_and_greedy_tokens(
    tmp_path, tokenizer_path, hf_libs, heads, kv_heads, tie, theta
):
    transformers, torch = hf_libs
    run = _run(tmp_path, tokenizer_path, heads, kv_heads, tie, theta)
    hf = export_hf(str(run), str(tmp_path / "hf"), log=lambda *_: None)
    model = transformers.LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 520, size=(2, 40))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(_logits(run, tokens) - theirs).max() <= 1e-4

    prompt = [int(t) for t in tokens[0, :9]]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    loaded = load_run(str(run))
    cfg, params = loaded.cfg, loaded.params
    assert list(Generator(cfg.model, params).stream(prompt, 20)) == out[0, 9:].tolist()


def test_transformers_checkpoints_import_with_the_same_logits(tmp_path, tokenizer_path, hf_libs):
    transformers, torch = hf_libs
    for i, (heads, kv_heads, tie, theta) in enumerate(CONFIGS):
        torch.manual_seed(i)
        config = transformers.LlamaConfig(
            vocab_size=520,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            tie_word_embeddings=tie,
            rope_theta=theta,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            initializer_range=0.1,
        )
        model = transformers.LlamaForCausalLM(config).eval()
        src = tmp_path / f"hf{i}"
        model.save_pretrained(src)
        shutil.copyfile(tokenizer_path, src / "tokenizer.model")
        run = import_hf(str(src), str(tmp_path / f"run{i}"), log=lambda *_: None)
        assert load_run(str(run)).cfg.model.tie_embeddings == tie
        tokens = np.random.default_rng(i).integers(0, 520, size=(2, 33))
        with torch.no_grad():
            theirs = model(torch.tensor(tokens)).logits.numpy()
        assert np.abs(_logits(run, tokens) - theirs).max() <= 1e-4, (heads, kv_heads, tie)


def test_the_exported_tokenizer_and_chat_template_load_in_transformers(tmp_path, tokenizer_path, hf_libs):
    transformers, _ = hf_libs
    hf = export_hf(str(_run(tmp_path, tokenizer_path, 4, 2, True, 10000.0)), str(tmp_path / "hf"), log=lambda *_: None)
    ours, theirs = Tokenizer(tokenizer_path), transformers.AutoTokenizer.from_pretrained(hf)
    text = "Enter KING LEAR.\n  Lear. Nothing will come of nothing: speak again ☃ 😀"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    assert theirs.encode(text) == [ours.bos_id] + ours.encode(text)  # our prompt ids: <|endoftext|> first
    assert ours.bos_id == ours.eos_id == theirs.bos_token_id
    assert theirs.decode(ours.encode(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Kent?"}]
    chat = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(getattr(chat, "input_ids", chat)) == prompt_ids(ours, messages)[0]


def test_chat_tokens_join_a_sentencepiece_base_model_as_control_pieces(tmp_path, corpus_slice, hf_libs):
    """A Llama 2-style base model (sentencepiece, no chat tokens, no template) imported with
    --chat-tokens: control pieces user text cannot forge, the embedding grown, old logits unchanged,
    and transformers renders our template to our ids after export."""
    import sentencepiece as spm

    from llm_jax.data.tokenizer import CHAT_TOKENS

    transformers, torch = hf_libs
    src = tmp_path / "hf"
    src.mkdir()
    spm.SentencePieceTrainer.train(
        input=corpus_slice[0], model_prefix=str(src / "tokenizer"), model_type="bpe", vocab_size=400,
        byte_fallback=True, minloglevel=2,
    )  # fmt: skip
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(src)
    run = import_hf(str(src), str(tmp_path / "run"), chat_tokens=True, log=lambda *_: None)
    loaded = load_run(str(run))
    ids = [loaded.tokenizer.piece_id(t) for t in CHAT_TOKENS]
    assert ids == [400, 401, 402, 403] and loaded.cfg.model.vocab_size == 512
    assert not set(ids) & set(loaded.tokenizer.encode("<|user|> hi <|end_of_turn|>"))  # text stays text
    assert prompt_ids(loaded.tokenizer, [{"role": "user", "content": "hi"}])[0][:2] == [1, ids[1]]  # <s> <|user|>
    tokens = np.random.default_rng(0).integers(0, 400, size=(2, 20))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(_logits(run, tokens)[..., :400] - theirs).max() <= 1e-4

    messages = [{"role": "user", "content": "Who is Kent?"}, {"role": "assistant", "content": "An earl."}]
    for legacy in (False, True):  # sentencepiece's dummy prefix on the text after a special token: only if legacy
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": legacy}
        (Path(run) / "tokenizer_config.json").write_text(json.dumps(config))
        out = export_hf(str(run), str(tmp_path / f"back-{legacy}"), log=lambda *_: None)
        chat = transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(messages, tokenize=True)
        assert list(getattr(chat, "input_ids", chat)) == render(load_run(str(run)).tokenizer, messages)[0], legacy


def test_added_chat_tokens_take_padded_rows_or_grow_the_vocabulary_to_a_multiple_of_128(tmp_path, corpus_slice):
    import sentencepiece as spm

    from llm_jax.data.tokenizer import CHAT_TOKENS
    from llm_jax.tools.chat_tokens import add_chat_tokens, grow_embeddings, grown_vocab

    spm.SentencePieceTrainer.train(
        input=corpus_slice[0], model_prefix=str(tmp_path / "tokenizer"), model_type="bpe", vocab_size=400,
        byte_fallback=True, minloglevel=2,
    )  # fmt: skip
    (tmp_path / "out").mkdir()
    tokenizer = add_chat_tokens(Tokenizer(tmp_path / "tokenizer.model"), tmp_path / "out")
    ids = [tokenizer.piece_id(t) for t in CHAT_TOKENS]
    assert ids == [400, 401, 402, 403] and all(tokenizer.is_special(i) for i in ids)
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [2, 403]
    assert tokenizer.chat_template and prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])[1] == (2, 403)
    with pytest.raises(UserError, match="has its own chat template; import it without --chat-tokens"):
        add_chat_tokens(tokenizer, tmp_path / "again")

    assert (grown_vocab(320, 304), grown_vocab(300, 304), grown_vocab(256, 257)) == (320, 384, 384)
    rng = np.random.default_rng(0)
    params = {
        "embedding": rng.normal(size=(420, 4)).astype(np.float32),
        "lm_head": rng.normal(size=(420, 4)).astype(np.float32),
        "final_norm": 1,
    }
    padded = grow_embeddings(params, ids, 420)  # the new ids take padded rows 400..403
    assert padded["embedding"].shape == (420, 4) and padded["final_norm"] == 1
    assert np.allclose(padded["lm_head"][ids], np.delete(params["lm_head"], ids, 0).mean(0))
    assert np.array_equal(padded["lm_head"][:400], params["lm_head"][:400])
    grown = grow_embeddings({"embedding": params["embedding"][:400]}, ids, 512)
    assert grown["embedding"].shape == (512, 4)
    assert np.allclose(grown["embedding"][400:], params["embedding"][:400].mean(0))
