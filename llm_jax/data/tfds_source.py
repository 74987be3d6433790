"""TFDS datasets as a document source: `tfds:<name>[:<version>][#<split>]`.

array_record (and parquet) datasets are read by random access through tfds's data sources, without
TensorFlow; TFRecord-only datasets need TensorFlow (tf.data) and say so. Nothing is downloaded or
prepared here: the dataset must already be prepared in data.tfds_data_dir (None: tfds's default).
tensorflow_datasets is imported inside the functions: it is slow to import.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

from llm_jax.errors import UserError

PREFIX = "tfds:"
_BATCH = 256  # records per random-access read


def parse_spec(spec: str) -> tuple[str, str]:
    """`tfds:<name>[:<version>][#<split>]` -> (name incl. config and version, split; default train)."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    name, _, split = body.partition("#")
    if not name.strip():
        raise UserError(
            f"data source {spec!r} names no dataset; write tfds:<name>[:<version>][#<split>], "
            "e.g. tfds:wikipedia/20230601.en#train[:10%]"
        )
    return name.strip(), split.strip() or "train"


def tfds_documents(spec: str, text_field: str, data_dir: str | None) -> Iterator[tuple[str, str]]:
    """(text, f"{spec}:{index}") for each example of the split, in the dataset's stored order."""
    name, split = parse_spec(spec)
    import numpy as np
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import file_adapters, registered

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except registered.DatasetNotFoundError as e:
        raise UserError(
            f"{spec}: tfds knows no dataset {name!r} and none is prepared in "
            f"{data_dir or 'tfds default data_dir'} ({_gist(e)}); check the name, or set "
            "data.tfds_data_dir to the directory where it was prepared"
        ) from None
    except (ValueError, AssertionError) as e:  # a config or version the builder does not have
        raise UserError(f"{spec}: tfds cannot load {name!r} ({_gist(e)}); check the config and version") from None
    root = str(builder.data_dir_root)
    if not builder.is_prepared():
        raise UserError(
            f"{spec}: dataset {name!r} is not prepared in {root} (looked for {builder.data_path}); datasets are "
            f"never downloaded at run time. Prepare it once: tfds build {name} --data_dir={root} "
            f"--file_format=array_record (or tfds.builder({name!r}, data_dir=...)"
            ".download_and_prepare(file_format='array_record')), or set data.tfds_data_dir to where it is"
        )
    features = list(builder.info.features.keys()) if builder.info.features else []
    if text_field not in features:
        raise UserError(
            f"{spec} has no feature {text_field!r} (features: {', '.join(features) or 'none'}); "
            "set data.text_field to the one holding the text"
        )

    try:
        if builder.info.available_file_formats() & file_adapters.FileFormat.with_random_access():
            source = builder.as_data_source(split=split)
            examples = _random_access(source, len(source))
        elif importlib.util.find_spec("tensorflow") is not None:
            ds = builder.as_dataset(
                split=split, shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1)
            )
            examples = tfds.as_numpy(ds)
        else:
            raise UserError(
                f"{spec}: dataset {name!r} in {root} is stored as TFRecord, which needs tensorflow: "
                "pip install 'llm_jax[tensorflow]' (or rebuild it as array_record: tfds build "
                f"{name} --data_dir=<new dir> --file_format=array_record and set data.tfds_data_dir, or "
                f"convert it where tensorflow is installed: tfds convert_format "
                f"--dataset_version_dir={builder.data_path} --out_file_format=array_record)"
            )
    except (ValueError, KeyError, AssertionError) as e:  # a split tfds cannot resolve
        raise UserError(
            f"{spec}: bad split {split!r} ({_gist(e)}); the splits are "
            f"{', '.join(builder.info.splits.keys())}, with optional slicing like train[:10%]"
        ) from None

    for index, example in enumerate(examples):
        value = example[text_field]
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if not isinstance(value, str):
            raise UserError(
                f"{spec}:{index}: feature {text_field!r} holds {type(value).__name__}, not text; "
                "set data.text_field to a text feature"
            )
        yield value, f"{spec}:{index}"


def _random_access(source, n: int) -> Iterator[dict]:
    for start in range(0, n, _BATCH):
        yield from source.__getitems__(list(range(start, min(start + _BATCH, n))))


def _gist(e: Exception) -> str:
    """First line and last paragraph of a tfds error (its middle lists every known dataset)."""
    paragraphs = [p for p in str(e).strip().split("\n\n") if p.strip()] or [type(e).__name__]
    first, last = paragraphs[0].splitlines()[0], " ".join(paragraphs[-1].split())
    text = " ".join(paragraphs[0].split()) if len(paragraphs) == 1 else f"{first} {last}"
    return text if len(text) <= 500 else text[:497] + "..."
