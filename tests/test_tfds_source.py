"""TFDS document source on a real tiny tfds dataset, prepared once per module in a tmp dir.

array_record is read through tfds's random-access data source, without tensorflow. tfds writes TFRecord
only through tensorflow, so the TFRecord copy is made from the same serialized tf.train.Examples in
TFRecord framing (tensorboardX's writer) plus a dataset_info.json that says tfrecord: the files
`tfds build --file_format=tfrecord` would have produced, and tfds itself then reports a TFRecord dataset.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llm_jax.data.tfds_source import parse_spec, tfds_documents
from llm_jax.errors import UserError

NAME = "llm_jax_tiny_text"
TRAIN = [f"train document {i}: caf\u00e9 {'word ' * i}".strip() for i in range(20)]
TEST = [f"held-out document {i}" for i in range(4)] + [b"bad \xff byte"]  # bytes: not valid UTF-8
HAS_TF = importlib.util.find_spec("tensorflow") is not None


class LlmJaxTinyText(tfds.core.GeneratorBasedBuilder):
    """Defining it registers it: tfds.builder("llm_jax_tiny_text", data_dir=...) finds it."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "id": np.int64})
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)  # stored in order

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(TRAIN), "test": self._generate_examples(TEST)}

    def _generate_examples(self, texts):
        for i, text in enumerate(texts):
            yield i, {"text": text, "id": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tfds_array_record")
    tfds.disable_progress_bar()
    LlmJaxTinyText(data_dir=str(root)).download_and_prepare(file_format="array_record")
    return str(root)


@pytest.fixture(scope="module")
def tfrecord_dir(data_dir, tmp_path_factory) -> str:
    from array_record.python.array_record_module import ArrayRecordReader
    from tensorboardX.record_writer import RecordWriter

    src = Path(data_dir) / NAME / "1.0.0"
    root = tmp_path_factory.mktemp("tfds_tfrecord")
    dst = root / NAME / "1.0.0"
    dst.mkdir(parents=True)
    for shard in src.glob(f"{NAME}-*.array_record-*"):
        reader = ArrayRecordReader(str(shard))
        records = reader.read_all()
        reader.close()
        writer = RecordWriter(str(dst / shard.name.replace(".array_record-", ".tfrecord-")))
        for record in records:
            writer.write(record)
        writer.close()
    info = json.loads((src / "dataset_info.json").read_text())
    (dst / "dataset_info.json").write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    shutil.copy(src / "features.json", dst)
    return str(root)


def texts(spec, data_dir, text_field="text"):
    return [text for text, _ in tfds_documents(spec, text_field, data_dir)]


def test_parse_spec():
    assert parse_spec("tfds:wikipedia/20230601.en") == ("wikipedia/20230601.en", "train")
    assert parse_spec("tfds:c4/en:3.1.0#validation[:1%]") == ("c4/en:3.1.0", "validation[:1%]")
    for bad in ("tfds:", "tfds:#train", "tfds:  "):
        with pytest.raises(UserError, match="names no dataset"):
            parse_spec(bad)


def test_reads_array_record_in_stored_order(data_dir):
    docs = list(tfds_documents(f"tfds:{NAME}", "text", data_dir))
    assert [text for text, _ in docs] == TRAIN
    assert [where for _, where in docs] == [f"tfds:{NAME}:{i}" for i in range(20)]
    assert texts(f"tfds:{NAME}:1.0.0#test", data_dir) == [*TEST[:4], "bad \ufffd byte"]


def test_split_slicing(data_dir):
    assert texts(f"tfds:{NAME}#train[:5]", data_dir) == TRAIN[:5]
    assert texts(f"tfds:{NAME}#train[15:]", data_dir) == TRAIN[15:]
    assert texts(f"tfds:{NAME}#train[:10%]", data_dir) == TRAIN[:2]
    wheres = [w for _, w in tfds_documents(f"tfds:{NAME}#train[-2:]", "text", data_dir)]
    assert wheres == [f"tfds:{NAME}#train[-2:]:0", f"tfds:{NAME}#train[-2:]:1"]
    with pytest.raises(UserError, match=r"bad split 'validation'.*the splits are train, test"):
        texts(f"tfds:{NAME}#validation", data_dir)


def test_text_field_errors(data_dir):
    with pytest.raises(UserError, match=r"no feature 'body' \(features: (id, text|text, id)\).*data.text_field"):
        texts(f"tfds:{NAME}", data_dir, text_field="body")
    with pytest.raises(UserError, match=r":0: feature 'id' holds int, not text"):
        texts(f"tfds:{NAME}", data_dir, text_field="id")


def test_not_prepared_and_unknown(tmp_path, data_dir):
    empty = str(tmp_path / "empty")
    with pytest.raises(UserError) as err:
        texts(f"tfds:{NAME}", empty)
    message = str(err.value)
    assert f"'{NAME}' is not prepared in {empty}" in message and "never downloaded" in message
    assert f"tfds build {NAME} --data_dir={empty} --file_format=array_record" in message
    assert "data.tfds_data_dir" in message and not (tmp_path / "empty" / NAME / "1.0.0").exists()
    with pytest.raises(UserError, match=r"knows no dataset 'llm_jax_no_such_set'.*Dataset llm_jax_no_such_set not"):
        texts("tfds:llm_jax_no_such_set", data_dir)
    with pytest.raises(UserError, match=r"cannot load 'llm_jax_tiny_text:9.9.9'.*only: 1.0.0"):
        texts(f"tfds:{NAME}:9.9.9", data_dir)


def test_tfrecord_needs_tensorflow(tfrecord_dir):
    builder = tfds.builder(NAME, data_dir=tfrecord_dir)
    assert builder.is_prepared() and builder.info.file_format.value == "tfrecord"
    if HAS_TF:  # the TFRecord copy is real: tf.data reads it back
        assert texts(f"tfds:{NAME}", tfrecord_dir) == TRAIN
        return
    with pytest.raises(UserError) as err:
        texts(f"tfds:{NAME}", tfrecord_dir)
    message = str(err.value)
    assert "is stored as TFRecord, which needs tensorflow: pip install 'llm_jax[tensorflow]'" in message
    assert "rebuild it as array_record" in message and "--out_file_format=array_record" in message
