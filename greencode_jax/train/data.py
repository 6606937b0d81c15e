"""The training data: a prepared corpus (prepared on first use when the config asks), the
packed training stream of this process's shard, and the unigram baseline."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from greencode_jax.errors import GreencodeError
from greencode_jax.config import DataSection
from greencode_jax.convert import resolve_model_dir
from greencode_jax.data import PreparedData, PrepareOptions, prepare_data
from greencode_jax.data.split import parse_ratios

PREPARE_LANGS = ("python", "java")  # data.prepare_lang: the stdlib, or a JDK's sources
UNIGRAM_SAMPLE_TOKENS = 50_000_000  # the most frequent token is counted over at most this many train tokens


def _barrier(name: str):
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def _new_parents(path: Path):
    """Creates `path`'s missing parent directories; removes them again if the block fails."""
    parent = path.parent.absolute()
    created = None
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            break
        created = ancestor
    parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _prepare_tokenizer(section: DataSection, model_init: str, source: str) -> str:
    """prepare_data's --tokenizer for data.prepare_tokenizer: "bpe", or model.init's own directory."""
    if section.prepare_tokenizer == "bpe":
        return "bpe"
    if section.prepare_tokenizer != "model":
        raise GreencodeError(f"{source}: data.prepare_tokenizer={section.prepare_tokenizer!r}; expected bpe (trained "
                             "on the corpus) or model (model.init's own tokenizer)")
    if model_init == "scratch":
        raise GreencodeError(f"{source}: data.prepare_tokenizer=model needs a pretrained model.init; a model from "
                             "scratch has no tokenizer (use bpe)")
    return str(resolve_model_dir(model_init))


def _split(ratios, source: str) -> tuple:
    """data.prepare_split as prepare-data's --split takes it (three ratios summing to 1)."""
    try:
        return parse_ratios(",".join(str(r) for r in ratios))
    except GreencodeError as error:
        raise GreencodeError(f"{source}: data.prepare_split={list(ratios)}: {str(error).split(': ', 2)[-1]}") from None


class TrainData:
    def __init__(self, section: DataSection, seed: int, source: str = "config", primary: bool = True,
                 progress: bool = False, model_init: str = "scratch"):
        if not section.path:
            raise GreencodeError(f"{source}: data.path is empty; give a directory written by `greencode prepare-data`")
        if section.seq_len < 2:
            raise GreencodeError(f"{source}: data.seq_len={section.seq_len}; expected at least 2 tokens per sequence")
        self.section, self.seed = section, seed
        path = Path(section.path)
        if section.prepare_lang and section.prepare_lang not in PREPARE_LANGS:
            raise GreencodeError(f"{source}: data.prepare_lang={section.prepare_lang!r}; expected one of "
                                 f"{list(PREPARE_LANGS)}, or \"\" to read a prepared data.path only")
        if not (path / "prepare.json").exists() and section.prepare_lang:
            for field, value in (("data.prepare_vocab_size", section.prepare_vocab_size),
                                 ("data.prepare_max_files", section.prepare_max_files)):
                if value < 0 or (value == 0 and field.endswith("vocab_size")):
                    raise GreencodeError(f"{source}: {field}={value}; expected a positive integer"
                                         + (" (or 0: every file)" if field.endswith("max_files") else ""))
            tokenizer = _prepare_tokenizer(section, model_init, source)
            if primary:
                print(f"preparing {section.prepare_lang} corpus at {path} (data.prepare_lang)", flush=True)
                with _new_parents(path):  # a failed preparation leaves no directory it created
                    prepare_data(PrepareOptions(lang=section.prepare_lang, out=str(path), tokenizer=tokenizer,
                                                vocab_size=section.prepare_vocab_size, view=section.prepare_view,
                                                max_files=section.prepare_max_files or None,
                                                split=_split(section.prepare_split, source), progress=progress))
            _barrier("greencode-prepare-data")
        elif not path.exists():
            raise GreencodeError(f"{source}: data.path={path}: no such directory; prepare it with `greencode "
                                 f"prepare-data --out {path}`, or set data.prepare_lang (python | java) to prepare it "
                                 "on first use")
        try:
            self.prepared = PreparedData(path)
        except GreencodeError as error:
            raise GreencodeError(f"{source}: data.path: {error}") from None
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
