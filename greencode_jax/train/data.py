"""The training data: a prepared corpus (prepared on first use when the config asks), the
packed training stream of this process's shard, and the unigram baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from greencode_jax.errors import GreencodeError
from greencode_jax.train.config import DataSection

UNIGRAM_SAMPLE_TOKENS = 50_000_000  # the most frequent token is counted over at most this many train tokens


def _barrier(name: str):
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class TrainData:
    def __init__(self, section: DataSection, seed: int, source: str = "config", primary: bool = True):
        from greencode_jax.data import PreparedData, PrepareOptions, prepare_data

        if not section.path:
            raise GreencodeError(f"{source}: data.path is empty; give a directory written by `greencode prepare-data`")
        if section.seq_len < 2:
            raise GreencodeError(f"{source}: data.seq_len={section.seq_len}; expected at least 2 tokens per sequence")
        self.section, self.seed = section, seed
        path = Path(section.path)
        if not (path / "prepare.json").exists() and section.prepare_lang:
            if primary:
                print(f"preparing {section.prepare_lang} corpus at {path} (data.prepare_lang)", flush=True)
                path.parent.mkdir(parents=True, exist_ok=True)
                prepare_data(PrepareOptions(lang=section.prepare_lang, out=str(path),
                                            vocab_size=section.prepare_vocab_size,
                                            max_files=section.prepare_max_files or None, progress=False))
            _barrier("greencode-prepare-data")
        self.prepared = PreparedData(path)
        self.tokenizer = self.prepared.manifest.get("tokenizer")
        if self.tokenizer is None:
            raise GreencodeError(f"{path}: prepared with --tokenizer none; training needs token files (prepare it "
                                 "with --tokenizer bpe or a model directory)")
        self.tokenizer_dir = path / "tokenizer"

    def train_stream(self, global_batch: int):
        return self.prepared.stream("train", seq_len=self.section.seq_len, global_batch=global_batch, seed=self.seed)

    def eval_stream(self, split: str, global_batch: int):
        return self.prepared.stream(split, seq_len=self.section.seq_len, global_batch=global_batch, seed=self.seed,
                                    shuffle=False)

    def most_frequent_token(self) -> int:
        """The unigram baseline's prediction: the train split's most frequent token."""
        tokens = self.prepared.tokens("train").tokens[:UNIGRAM_SAMPLE_TOKENS]
        if len(tokens) == 0:
            raise GreencodeError(f"{self.section.path}: the train split is empty")
        return int(np.bincount(np.asarray(tokens)).argmax())
