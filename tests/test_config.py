import re

import jax
import pytest

from llm_jax.config import CONFIG_DIR, load_config, to_dict
from llm_jax.errors import UserError
from llm_jax.model.transformer import Transformer


def test_overrides_are_typed_by_the_schema():
    cfg = load_config(
        "tiny",
        [
            "optim.lr=3e-4",
            "model.n_layers=3",
            "model.tie_embeddings=false",
            "data.sources=a.txt,b/",
            'sample.prompts=["x", "y z"]',
            "data.tokenizer=null",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.n_layers == 3 and cfg.model.tie_embeddings is False
    assert cfg.data.sources == ("a.txt", "b/") and cfg.sample.prompts == ("x", "y z")
    assert cfg.data.tokenizer is None


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(UserError, match=r"unknown config key 'model.n_layer'.*did you mean 'model.n_layers'"):
        load_config("tiny", ["model.n_layer=3"])
    with pytest.raises(UserError, match=r"unknown config key 'trian.steps'.*did you mean 'train.steps'"):
        load_config("tiny", ["trian.steps=1"])


def test_wrong_types_name_the_key():
    with pytest.raises(UserError, match=r"model.d_model must be int, got 'big'"):
        load_config("tiny", ["model.d_model=big"])
    with pytest.raises(UserError, match=r"model.n_layers must be int, got '2.5'"):
        load_config("tiny", ["model.n_layers=2.5"])
    with pytest.raises(UserError, match=r"model.tie_embeddings must be bool"):
        load_config("tiny", ["model.tie_embeddings=maybe"])


def test_invalid_values_are_all_reported_before_compiling():
    with pytest.raises(UserError) as e:
        load_config(
            "tiny",
            ["optim.lr=-1", "model.n_heads=3", "train.grad_accum=3", "data.decontaminate=[bundled, no/tasks.jsonl]"],
        )
    msg = str(e.value)
    assert "data.decontaminate: no/tasks.jsonl not found: name eval task files or 'bundled'" in msg
    assert "optim.lr=-1.0 must be positive" in msg
    assert "model.n_heads=3 must divide model.d_model=64, or set model.head_dim" in msg
    assert "model.n_kv_heads=2 must divide model.n_heads=3" in msg
    assert "train.grad_accum=3 must divide train.batch_size=8" in msg


def test_head_dim_is_d_model_over_heads_unless_set_and_then_the_heads_may_not_divide_d_model():
    assert load_config("tiny").model.head_dim == 16  # d_model 64 / 4 heads
    cfg = load_config("tiny", ["model.n_heads=3", "model.n_kv_heads=1", "model.head_dim=24"]).model
    assert cfg.head_dim == 24
    from llm_jax.parallel.sharding import abstract_params, single_device_layout

    shapes = abstract_params(cfg, single_device_layout())["layers"]
    assert (shapes["wq"].shape, shapes["wo"].shape) == ((2, 64, 3, 24), (2, 3, 24, 64))
    with pytest.raises(UserError, match=r"- head_dim = 7 must be even for RoPE"):
        load_config("tiny", ["model.head_dim=7"])


def test_bad_override_syntax_and_sections():
    with pytest.raises(UserError, match="section.key=value"):
        load_config("tiny", ["model.n_layers"])
    with pytest.raises(UserError, match="model is a section"):
        load_config("tiny", ["model=3"])
    with pytest.raises(UserError, match="not found: give a YAML path or one of"):
        load_config("nonexistent-preset")


def test_base_yaml_documents_every_key_once():
    lines = (CONFIG_DIR / "base.yaml").read_text().splitlines()
    path, seen = [], {}  # path: the enclosing keys, by indentation (a section, a subsection such as model.moe)
    for line in lines:
        if m := re.match(r"( *)(\w+):", line):
            depth = len(m.group(1)) // 2
            path = path[:depth] + [m.group(2)]
            seen.setdefault(".".join(path), []).append(line)

    def keys(prefix, value):
        if isinstance(value, dict):
            return [k for sub, v in value.items() for k in keys(f"{prefix}.{sub}" if prefix else sub, v)]
        return [prefix]

    for key in keys("", to_dict(load_config())):
        assert len(seen.get(key, [])) == 1, f"{key}: {len(seen.get(key, []))} entries in base.yaml"
        assert "#" in seen[key][0], f"{key} has no comment in base.yaml"


@pytest.mark.parametrize(
    "preset, low, high",
    [
        ("tiny", 0.05e6, 0.2e6),
        ("shakespeare", 6e6, 14e6),
        ("gpt2-124m", 120e6, 130e6),
        ("llama-1b", 1.0e9, 1.4e9),
        ("llama-7b", 6.5e9, 7.0e9),
    ],
)
def test_presets_resolve_to_their_sizes(preset, low, high):
    cfg = load_config(preset)
    shapes = jax.eval_shape(
        lambda: Transformer(cfg.model).init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 8), jax.numpy.int32))
    )
    n = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    assert low <= n <= high, f"{preset}: {n:,} parameters"


def test_the_objective_is_checked_by_its_registry_entry(capsys):
    from llm_jax.cli import main
    from llm_jax.train.objectives import OBJECTIVES, objective_of

    assert list(OBJECTIVES) == ["pretrain", "sft", "dpo"]
    assert objective_of(load_config("tiny")) is OBJECTIVES["pretrain"]
    with pytest.raises(UserError, match=r"train.objective='foo' must be one of pretrain, sft, dpo"):
        objective_of(load_config("tiny", ["train.objective=foo"]))
    for command in ("config", "train"):  # the command line says so before anything is prepared or compiled
        with pytest.raises(SystemExit) as e:
            main([command, "--config", "tiny", "train.objective=dpo", "run_dir=/nonexistent/never-made"])
        assert e.value.code == 2
        assert "train.objective=dpo needs train.init_from" in capsys.readouterr().err
