"""Prepared datasets as artifacts (llm_jax/data/dataset.py): content-addressed, rebuilt only when an input
changes, shared by runs through data.prepared."""

import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from llm_jax.data.dataset import MANIFEST, build_dataset
from llm_jax.errors import UserError
from llm_jax.train.objectives import prepare_data


@pytest.fixture
def corpus(tmp_path, corpus_slice) -> Path:
    directory = tmp_path / "corpus"
    directory.mkdir()
    for path in corpus_slice:
        shutil.copy(path, directory)
    return directory


def test_the_same_inputs_give_the_same_dataset_and_a_rerun_does_nothing(tmp_path, corpus):
    cfg = tiny_config(tmp_path / "unused", sources=[str(corpus)])
    began = time.perf_counter()
    first = build_dataset(cfg, tmp_path / "datasets", log=lambda *_: None)
    built = time.perf_counter() - began
    assert (first / MANIFEST).is_file() and (first / "tokenizer.model").is_file()
    assert json.loads((first / MANIFEST).read_text())["id"] == first.name and len(first.name) == 16
    stamp = (first / "data" / "meta.json").stat().st_mtime_ns

    lines, began = [], time.perf_counter()
    again = build_dataset(cfg, tmp_path / "datasets", log=lines.append)
    rerun = time.perf_counter() - began
    assert again == first and "up to date" in lines[0] and (first / "data" / "meta.json").stat().st_mtime_ns == stamp
    print(f"build {built:.2f} s, rerun {rerun:.3f} s")  # the rerun reads only the sources' sizes and mtimes

    changed = tiny_config(tmp_path / "unused", "curate.min_words=3", sources=[str(corpus)])
    other = build_dataset(changed, tmp_path / "datasets", log=lambda *_: None)
    assert other != first and other.parent == first.parent
    (tmp_path / "run").mkdir()
    mixed = tiny_config(tmp_path / "run", f"data.prepared={first}", f"data.mixture=[a:1={corpus}]")
    with pytest.raises(UserError, match="was built without data.mixture, so it has no parts to weigh"):
        prepare_data(mixed, tmp_path / "run")
    (corpus / "extra.txt").write_text("A new document of a few words, enough to count.")
    assert build_dataset(cfg, tmp_path / "datasets", log=lambda *_: None) not in (first, other)


@pytest.mark.slow
def test_two_runs_train_on_one_prepared_dataset_and_build_nothing(tmp_path, corpus):
    from llm_jax.train.loop import train

    dataset = build_dataset(tiny_config(tmp_path / "unused", sources=[str(corpus)]), tmp_path / "ds", log=print)
    results = []
    for name, lr in (("a", "1e-3"), ("b", "3e-3")):
        run = tmp_path / name
        cfg = tiny_config(run, f"data.prepared={dataset}", f"optim.lr={lr}", "train.steps=4", "train.eval_every=4")
        results.append(train(cfg, log=lambda *_: None))
        assert not (run / "data").exists()  # read in place
        assert (run / "tokenizer.model").read_bytes() == (dataset / "tokenizer.model").read_bytes()
    assert results[0]["loss"] != results[1]["loss"]
    (tmp_path / "c").mkdir()
    assert prepare_data(tiny_config(tmp_path / "c", f"data.prepared={dataset}"), tmp_path / "c").meta == json.loads(
        (dataset / "data" / "meta.json").read_text()
    )


def test_a_directory_that_is_not_a_dataset_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=r"data.prepared=.*nowhere is not a prepared dataset \(no manifest.json\)"):
        prepare_data(tiny_config(tmp_path / "run", f"data.prepared={tmp_path / 'nowhere'}"), tmp_path / "run")


def test_a_run_may_reweigh_a_prepared_mixture_but_not_rename_its_parts(tmp_path, corpus):
    plays, poems = ";".join(str(p) for p in sorted(corpus.glob("*_gut*.txt"))[:4]), str(corpus / "sonnets_gut.txt")
    mixture = f"data.mixture=[plays:0.5={plays}, poems:0.5={poems}]"
    built = tiny_config(tmp_path / "unused", mixture, "data.txt_split_kb=8")
    dataset = build_dataset(built, tmp_path / "ds", log=lambda *_: None)
    reweighed_build = tiny_config(tmp_path / "unused", mixture.replace("0.5", "0.8"), "data.txt_split_kb=8")
    assert build_dataset(reweighed_build, tmp_path / "ds", log=lambda *_: None) == dataset  # weights: not an input
    (tmp_path / "run").mkdir()
    data = prepare_data(tiny_config(tmp_path / "run", f"data.prepared={dataset}"), tmp_path / "run")
    assert [(p.name, p.weight(1)) for p in data.train.parts] == [("plays", 0.5), ("poems", 0.5)]
    reweighed = tiny_config(tmp_path / "run", f"data.prepared={dataset}", "data.mixture=[poems:0.9=x, plays:0.1=y]")
    assert [(p.name, p.weight(1)) for p in prepare_data(reweighed, tmp_path / "run").train.parts] == [
        ("poems", 0.9),
        ("plays", 0.1),
    ]
    renamed = tiny_config(tmp_path / "run", f"data.prepared={dataset}", "data.mixture=[verse:1=x, plays:1=y]")
    with pytest.raises(UserError, match="the data was built with plays, poems: keep their names"):
        prepare_data(renamed, tmp_path / "run")


def test_a_remote_dataset_is_read_in_place_each_host_only_its_windows(tmp_path, corpus):
    """data.prepared as a URL (file://, through fsspec as gs:// is through gcsfs): only the manifest, tokenizer
    and meta.json are copied; each window is one range read of its shard, and the batches of each of 2
    hosts equal those read from the local directory."""
    from llm_jax.data.loader import train_iterator

    dataset = build_dataset(tiny_config(tmp_path / "unused", sources=[str(corpus)]), tmp_path / "ds", log=print)
    runs = {}
    for name, where in (("local", str(dataset)), ("remote", f"file://{dataset}")):
        (tmp_path / name).mkdir()
        cfg = tiny_config(tmp_path / name, f"data.prepared={where}", f"data.cache_dir={tmp_path / 'cache'}")
        runs[name] = (cfg, prepare_data(cfg, tmp_path / name))
    (cached,) = (tmp_path / "cache" / "datasets").iterdir()  # <id>-<hash of the URL>
    assert cached.name.startswith(dataset.name + "-")
    assert sorted(p.relative_to(cached).as_posix() for p in cached.rglob("*") if p.is_file()) == [
        "data/meta.json",
        "data/report.json",
        "manifest.json",
        "tokenizer.model",
        "tokenizer.vocab",
    ]
    local, remote = runs["local"][1], runs["remote"][1]
    assert all(p.startswith("file://") for p in remote.train.paths) and len(remote.train) == len(local.train) > 8
    for host in range(2):
        batches = [train_iterator(data.train, 8, 0, process_index=host, process_count=2) for data in (local, remote)]
        for _ in range(3):
            a, b = next(batches[0]), next(batches[1])
            np.testing.assert_array_equal(a["tokens"], b["tokens"])
            np.testing.assert_array_equal(a["segments"], b["segments"])


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs would try the network")
def test_a_gs_dataset_without_gcsfs_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=r"^reading gs://bucket/ds needs .*gcsfs.*pip install 'llm_jax\[gcs\]'"):
        prepare_data(tiny_config(tmp_path / "run", "data.prepared=gs://bucket/ds"), tmp_path / "run")
