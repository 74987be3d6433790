"""Hugging Face models beyond sentencepiece Llama: Llama 3 (byte-level BPE tokenizer.json, llama3
RoPE scaling), Qwen2 (q/k/v biases, ChatML, no BOS), Qwen3 (q/k norms, head_dim of its own), Mistral,
and the mixtures of experts Mixtral, Qwen2-MoE (a gated shared expert) and Qwen3-MoE, made in the test
by transformers and `tokenizers`; imported, compared with transformers, and exported back."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.data.chat_template import prompt_ids, render
from llm_jax.data.tokenizer import load_tokenizer
from llm_jax.inference.generate import Generator
from llm_jax.model.transformer import Transformer
from llm_jax.run import load_run
from llm_jax.tools.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# (special tokens, bos, eos, chat template) per family
FAMILIES = {
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        LLAMA3_TEMPLATE,
    ),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML_TEMPLATE),
    "mistral": (["<s>", "</s>"], "<s>", "</s>", None),
    "mixtral": (["<s>", "</s>"], "<s>", "</s>", None),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML_TEMPLATE),
    "qwen3_moe": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML_TEMPLATE),
    "qwen2_moe": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML_TEMPLATE),
}
MOE = ("mixtral", "qwen3_moe", "qwen2_moe")
VOCAB = 512
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who is Kent? ☃"},
    {"role": "assistant", "content": "A loyal earl."},
    {"role": "user", "content": "And Lear?"},
]


def _hf_tokenizer(corpus_slice, family: str):
    specials, bos, eos, template = FAMILIES[family]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=specials,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((Path(p).read_text() for p in corpus_slice), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    if template:
        fast.chat_template = template
    return fast


def _hf_model(family: str, tokenizer, seed: int, vocab: int = VOCAB):
    torch.manual_seed(seed)
    common = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.1,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if family == "llama3":
        config = transformers.LlamaConfig(
            **common,
            rope_theta=500000.0,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
        model = transformers.LlamaForCausalLM(config)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=False)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # transformers initialises the biases to zero: make them matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    elif family == "mixtral":  # 4 experts of width 128, 2 per token, in every layer
        config = transformers.MixtralConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False
        )
        model = transformers.MixtralForCausalLM(config)
    elif family == "qwen2_moe":  # 4 experts of width 32, 2 per token; a gated shared expert of width 64
        config = transformers.Qwen2MoeConfig(
            **common,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            norm_topk_prob=False,
            tie_word_embeddings=False,
        )
        model = transformers.Qwen2MoeForCausalLM(config)
        with torch.no_grad():  # transformers initialises the biases to zero: make them matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    elif family.startswith("qwen3"):  # heads of 32 (hidden_size / heads = 16), q/k norms
        qwen3 = {"head_dim": 32, "tie_word_embeddings": family == "qwen3", "rope_theta": 1e6}
        if family == "qwen3":
            model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, **qwen3))
        else:  # 4 experts of width 32, 2 per token, weights not renormalised (norm_topk_prob false)
            config = transformers.Qwen3MoeConfig(
                **common, **qwen3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False
            )
            model = transformers.Qwen3MoeForCausalLM(config)
        with torch.no_grad():  # transformers initialises the norms to one: make them matter
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(1.0, 0.3)
    else:
        config = transformers.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
        model = transformers.MistralForCausalLM(config)
    return model.eval()


def _save_and_import(model, tokenizer, directory: Path, run: str = "run") -> Path:
    """The transformers model and tokenizer saved to directory/hf, imported as the run directory/run."""
    model.save_pretrained(directory / "hf")
    tokenizer.save_pretrained(directory / "hf")
    return import_hf(str(directory / "hf"), str(directory / run), log=lambda *_: None)


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, corpus_slice, tmp_path_factory):
    """(family, transformers model, its tokenizer, the HF directory, our imported run)."""
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    tokenizer = _hf_tokenizer(corpus_slice, family)
    model = _hf_model(family, tokenizer, seed=len(family))
    run = _save_and_import(model, tokenizer, tmp)
    return family, model, tokenizer, tmp / "hf", run


def _our_logits(run, tokens):
    loaded = load_run(str(run))
    model = Transformer(loaded.cfg.model)
    hidden, _ = model.apply({"params": loaded.params}, jnp.asarray(tokens))
    return np.asarray(model.apply({"params": loaded.params}, hidden, method=Transformer.logits))


def test_imported_models_match_transformers_logits_and_greedy_tokens(imported):
    family, model, _, _, run = imported
    cfg = load_run(str(run)).cfg.model
    assert (cfg.qkv_bias, bool(cfg.rope_scaling)) == (family in ("qwen2", "qwen2_moe"), family == "llama3")
    assert (cfg.qk_norm, cfg.head_dim) == ((True, 32) if family.startswith("qwen3") else (False, 16))
    assert (cfg.moe.experts, cfg.moe.top_k) == ((4, 2) if family in MOE else (0, 2))
    assert cfg.moe.norm_topk == (family not in ("qwen3_moe", "qwen2_moe"))
    assert (cfg.moe.shared_experts, cfg.moe.shared_gate) == ((2, True) if family == "qwen2_moe" else (0, False))
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(2, 40))  # past the llama3 original context 16
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(_our_logits(run, tokens) - theirs).max() <= 1e-4

    prompt = [int(t) for t in tokens[0, :9]]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    loaded = load_run(str(run))
    assert list(Generator(loaded.cfg.model, loaded.params).stream(prompt, 20)) == out[0, 9:].tolist()


def test_imported_tokenizers_and_chat_templates_give_transformers_ids(imported):
    family, _, theirs, _, run = imported
    ours = load_tokenizer(Path(run) / "tokenizer.json")
    text = "Enter KING LEAR.\n  Lear. Nothing will come of nothing: speak <|im_end|> again ☃ 😀"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert ours.decode(ours.encode(text)) == text
    bos = theirs.bos_token_id if theirs.bos_token_id is not None else theirs.convert_tokens_to_ids("<|endoftext|>")
    assert ours.bos_id == bos  # qwen2: no BOS, its document separator
    assert sum(ours.token_utf8(t) != [] for t in ours.encode(text)) == len(ours.encode(text))
    assert bytes(b for t in ours.encode(text) for b in ours.token_utf8(t)).decode() == text
    if family in ("mistral", "mixtral"):  # no chat template: generate only, and a clear line for chat
        assert ours.chat_template is None
        return
    for upto in (2, 4):
        chat = theirs.apply_chat_template(MESSAGES[:upto], add_generation_prompt=True, tokenize=True)
        ids, stops = prompt_ids(ours, MESSAGES[:upto])
        assert list(getattr(chat, "input_ids", chat)) == ids
        assert theirs.eos_token_id in stops
    ids, weights = render(ours, MESSAGES[:3])
    trained = [t for t, w in zip(ids, weights) if w]  # the reply and its end of turn (the model learns to stop)
    assert ours.decode(trained).strip() == "A loyal earl." and theirs.eos_token_id in trained


# per family: a tensor only the Hub's layout has, and one it must not have
HUB_NAMES = {
    "mixtral": ("model.layers.1.block_sparse_moe.experts.3.w2.weight", "gate_up_proj"),
    "qwen3_moe": ("model.layers.1.mlp.experts.3.down_proj.weight", "gate_up_proj"),
    "qwen3": ("model.layers.1.self_attn.k_norm.weight", "lm_head.weight"),
    "qwen2_moe": ("model.layers.1.mlp.shared_expert_gate.weight", "gate_up_proj"),
}


@pytest.mark.parametrize("family", list(HUB_NAMES))
def test_mixtral_qwen3_and_qwen3_moe_runs_export_in_the_hub_layout_and_transformers_reads_them_back(
    family, corpus_slice, tmp_path
):
    """Import reads transformers 5's fused experts; export writes the Hub's per-expert tensors."""
    tokenizer = _hf_tokenizer(corpus_slice, family)
    model = _hf_model(family, tokenizer, seed=5)
    run = _save_and_import(model, tokenizer, tmp_path)
    out = export_hf(str(run), str(tmp_path / "back"), log=lambda *_: None)
    from safetensors.numpy import load_file

    names = set(load_file(out / "model.safetensors"))
    present, absent = HUB_NAMES[family]
    assert present in names and not any(absent in n for n in names)
    assert json.loads((out / "config.json").read_text())["architectures"] == model.config.architectures
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(3).integers(0, VOCAB, size=(2, 24))
    with torch.no_grad():
        original, back = (m(torch.tensor(tokens)).logits.numpy() for m in (model, reloaded))
    assert np.abs(back - original).max() <= 1e-5
    assert np.abs(_our_logits(run, tokens) - original).max() <= 1e-4


def test_a_bfloat16_checkpoint_exports_back_bit_for_bit_and_transformers_reads_it(corpus_slice, tmp_path):
    tokenizer = _hf_tokenizer(corpus_slice, "qwen2")
    model = _hf_model("qwen2", tokenizer, seed=3)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    run = import_hf(str(tmp_path / "bf16"), str(tmp_path / "run"), log=lambda *_: None)
    assert load_run(str(run)).cfg.model.dtype == "bfloat16"
    out = export_hf(str(run), str(tmp_path / "back"), dtype="bfloat16", log=lambda *_: None)
    from safetensors.torch import load_file

    original, back = load_file(tmp_path / "bf16" / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(original) == set(back)
    for name, t in original.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], t), name

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16).eval()
    tokens = np.random.default_rng(2).integers(0, VOCAB, size=(2, 24))
    with torch.no_grad():
        theirs = reloaded(torch.tensor(tokens)).logits.float().numpy()
    ours = _our_logits(run, tokens)
    # both compute in bfloat16 with float32 accumulation, in different orders (measured on 2026-12-05:
    # 0.040 at most, on logits up to 3.1)
    assert np.abs(ours - theirs).max() <= 0.1
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_an_imported_model_serves_its_own_chat_format_to_the_openai_client(corpus_slice, tmp_path):
    """An instruct model through the server: Qwen2's ChatML, no BOS, biases."""
    from test_server import MODEL, _client, _start

    theirs = _hf_tokenizer(corpus_slice, "qwen2")
    model = _hf_model("qwen2", theirs, seed=4)
    run = _save_and_import(model, theirs, tmp_path)

    proc, port = _start(run, tmp_path / "server.log", "--max-batch", "4")
    try:
        out = _client(port).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    finally:
        proc.terminate()
        proc.wait(30)
    chat = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = list(getattr(chat, "input_ids", chat))
    with torch.no_grad():
        greedy = model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=theirs.eos_token_id, pad_token_id=0
        )
    expected = theirs.decode(greedy[0, len(ids) :], skip_special_tokens=True)
    assert out.choices[0].message.content == expected and out.usage.prompt_tokens == len(ids)


def test_sft_and_dpo_train_an_imported_model_in_its_own_chat_format(corpus_slice, tmp_path, capsys, monkeypatch):
    import io
    import json
    import math

    from llm_jax.cli import main as cli
    from llm_jax.config import load_config
    from llm_jax.data import synth
    from llm_jax.train.loop import train

    theirs = _hf_tokenizer(corpus_slice, "llama3")
    start = _save_and_import(_hf_model("llama3", theirs, seed=5), theirs, tmp_path, "base")
    sft_data, dpo_data = synth.write_sft(tmp_path / "sft_data", 200, 0), synth.write_dpo(tmp_path / "dpo_data", 200, 0)

    def stage(name, init, data):
        overrides = [f"run_dir={tmp_path / name}", f"train.objective={name}", f"train.init_from={init}"]
        overrides += [f"data.sources=[{data['train']}]", f"data.val_sources=[{data['test']}]", "train.steps=2"]
        return load_config("tiny", [*overrides, "train.log_every=1", "train.eval_every=2", "model.dtype=float32"])

    assert 0 < train(stage("sft", start, sft_data), log=lambda *_: None)["loss"] < 20
    sft_run = tmp_path / "sft"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (sft_run / name).read_bytes() == (Path(start) / name).read_bytes()
    ours = load_tokenizer(sft_run / "tokenizer.json")
    rows = np.load(sft_run / "data" / "train.tokens.npy")
    assert rows[0, 0] == ours.bos_id == theirs.bos_token_id  # examples rendered by the model's template

    train(stage("dpo", sft_run, dpo_data), log=lambda *_: None)
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(2)) < 1e-5  # step 1: policy == reference

    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 3?\n/exit\n"))
    cli(["chat", "--run", str(tmp_path / "dpo"), "--max-new-tokens", "4", "--temperature", "0"])
    assert capsys.readouterr().out.count("bot> ") == 1


def test_a_base_model_serves_completions_and_learns_chat_through_added_chat_tokens(corpus_slice, tmp_path):
    """Mistral-style base model, no chat template, no padded vocabulary rows: served as completions
    only; `--chat-tokens` adds our four tokens (the embedding grows), SFT trains them, and the
    export gives transformers our template and logits."""
    import openai
    from test_server import MODEL, _client, _start

    from llm_jax.config import load_config
    from llm_jax.data import synth
    from llm_jax.data.tokenizer import CHAT_TOKENS
    from llm_jax.train.loop import train

    theirs = _hf_tokenizer(corpus_slice, "mistral")
    model = _hf_model("mistral", theirs, seed=6, vocab=len(theirs))
    base = _save_and_import(model, theirs, tmp_path, "base")
    prompt = "Enter KING LEAR"
    ids = [theirs.bos_token_id, *theirs.encode(prompt, add_special_tokens=False)]  # BOS first, as ours start
    with torch.no_grad():
        greedy = model.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=theirs.eos_token_id, pad_token_id=-1
        )  # pad_token_id: not the BOS (id 0), which generate would then mask out
    proc, port = _start(base, tmp_path / "server.log", "--max-batch", "2")
    try:
        out = _client(port).completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        with pytest.raises(openai.BadRequestError, match="no chat template .* /v1/completions serves it"):
            _client(port).chat.completions.create(model=MODEL, messages=MESSAGES[:2], max_tokens=4)
    finally:
        proc.terminate()
        proc.wait(30)
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].text == theirs.decode(greedy[0, len(ids) :], skip_special_tokens=True)

    run = import_hf(str(tmp_path / "hf"), str(tmp_path / "chat"), chat_tokens=True, log=lambda *_: None)
    loaded = load_run(str(run))
    new_ids = [loaded.tokenizer.piece_id(t) for t in CHAT_TOKENS]
    assert new_ids == list(range(len(theirs), len(theirs) + 4)) and loaded.cfg.model.vocab_size == 512
    embedding = np.asarray(loaded.params["embedding"])
    assert np.allclose(embedding[len(theirs) :], embedding[: len(theirs)].mean(0), atol=1e-6)
    tokens = np.random.default_rng(3).integers(0, len(theirs), size=(2, 24))
    with torch.no_grad():
        reference = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(_our_logits(run, tokens)[..., : len(theirs)] - reference).max() <= 1e-4  # old tokens: unchanged
    ids, stops = prompt_ids(loaded.tokenizer, MESSAGES[:2])
    assert ids[:2] == [theirs.bos_token_id, new_ids[0]] and new_ids[3] in stops

    data = synth.write_sft(tmp_path / "sft_data", 100, 0)
    overrides = [f"run_dir={tmp_path / 'sft'}", "train.objective=sft", f"train.init_from={run}", "train.steps=2"]
    overrides += [f"data.sources=[{data['train']}]", f"data.val_sources=[{data['test']}]", "model.dtype=float32"]
    train(load_config("tiny", [*overrides, "train.eval_every=2"]), log=lambda *_: None)
    rows = np.load(tmp_path / "sft" / "data" / "train.tokens.npy")
    assert {*new_ids} <= {*rows.ravel().tolist()}  # examples in our format, with the added tokens

    out = export_hf(str(tmp_path / "sft"), str(tmp_path / "back"), log=lambda *_: None)
    exported = transformers.AutoTokenizer.from_pretrained(out)
    chat = exported.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert list(getattr(chat, "input_ids", chat)) == prompt_ids(load_tokenizer(out / "tokenizer.json"), MESSAGES)[0]
    assert new_ids[3] in transformers.AutoConfig.from_pretrained(out).eos_token_id
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs_after = reloaded(torch.tensor(tokens)).logits.numpy()
    assert np.abs(_our_logits(tmp_path / "sft", tokens) - theirs_after).max() <= 1e-4
