"""The prepared corpus as TFDS datasets in ArrayRecord format, written and read without TensorFlow.

Two datasets live under `OUT/tfds/` (a TFDS `data_dir`):

* `codexglue_token_<lang>/1.0.0`: one record per file, splits train / dev / test, features
  `path` (the file's path in its source, or `train.txt:17` for a line of a CodeXGLUE file),
  `code` (the CodeXGLUE line `<s> … </s>`) and `source` (the file's decoded text; empty when
  the source only had CodeXGLUE lines).
* `codexglue_line_<lang>/1.0.0`: line-level samples, split test, features `id`, `input`, `gt`.

They are written with `tfds.core.SequentialWriter` (records in the order given, shards
closed as they fill, memory independent of corpus size) and read with
`tfds.data_source(name, data_dir=OUT/tfds, split=…)` or `tfds.builder_from_directory`,
both random-access through ArrayRecord. A split with no records is left out of the
dataset (ArrayRecord cannot open an empty split); `open_split` returns an empty list for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from greencode_jax.errors import GreencodeError

VERSION = "1.0.0"
RECORDS_PER_SHARD = 4096
TFDS_DIR = "tfds"
FLUSH_RECORDS = 512  # SequentialWriter rewrites dataset_info.json on every call: hand it batches
FLUSH_BYTES = 8 << 20


def token_dataset_name(lang: str) -> str:
    return f"codexglue_token_{lang}"


def line_dataset_name(lang: str) -> str:
    return f"codexglue_line_{lang}"


def _token_features():
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({"path": tfds.features.Text(), "code": tfds.features.Text(),
                                       "source": tfds.features.Text()})


def _line_features():
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({"id": np.int64, "input": tfds.features.Text(), "gt": tfds.features.Text()})


class CorpusWriter:
    """Appends records to the splits of one TFDS ArrayRecord dataset under `data_dir`."""

    def __init__(self, data_dir: str | Path, name: str, level: str, description: str):
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
        features = _token_features() if level == "token" else _line_features()
        directory = Path(data_dir) / name / VERSION
        directory.mkdir(parents=True, exist_ok=True)
        identity = tfds.core.dataset_info.DatasetIdentity(
            name=name, version=tfds.core.Version(VERSION), data_dir=str(directory),
            module_name="greencode_jax.data.corpus")
        info = tfds.core.DatasetInfo(builder=identity, features=features, description=description,
                                     disable_shuffling=True)
        self._writer = tfds.core.SequentialWriter(ds_info=info, max_examples_per_shard=RECORDS_PER_SHARD,
                                                  file_format="array_record")
        self._open: list[str] = []
        self._buffers: dict[str, list] = {}
        self._buffered_bytes = 0
        self.counts: dict[str, int] = {}

    def add(self, split: str, record: dict):
        if split not in self.counts:
            self._writer.initialize_splits([split])
            self._open.append(split)
            self._buffers[split] = []
            self.counts[split] = 0
        self._buffers[split].append(record)
        self._buffered_bytes += sum(len(v) for v in record.values() if isinstance(v, (str, bytes)))
        self.counts[split] += 1
        if len(self._buffers[split]) >= FLUSH_RECORDS or self._buffered_bytes >= FLUSH_BYTES:
            self._flush()

    def _flush(self):
        pending = {split: records for split, records in self._buffers.items() if records}
        if pending:
            self._writer.add_examples(pending)
        self._buffers = {split: [] for split in self._buffers}
        self._buffered_bytes = 0

    def close(self):
        if self._open:
            self._flush()
            self._writer.close_splits(self._open)
            self._open = []


def open_split(data_dir: str | Path, name: str, split: str):
    """Random-access records of one split (a `tfds` ArrayRecord data source), or [] if the split is empty.

    Text fields come back as bytes, as TFDS returns them; `decode_record` turns them into str.
    """
    import tensorflow_datasets as tfds

    directory = Path(data_dir) / name / VERSION
    if not (directory / "dataset_info.json").is_file():
        raise GreencodeError(f"{directory}: no prepared dataset here (dataset_info.json missing); "
                             "run `greencode prepare-data` first")
    builder = tfds.builder_from_directory(os.fspath(directory))
    if split not in builder.info.splits or not builder.info.splits[split].num_examples:
        return []
    return builder.as_data_source(split=split)


def decode_record(record: dict) -> dict:
    return {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in record.items()}
