"""`PreparedData`: read access to a directory written by `prepare-data`."""

from __future__ import annotations

import json
from pathlib import Path

from greencode_jax.data.corpus import decode_record, open_split
from greencode_jax.data.packing import PackedStream, TokenStore
from greencode_jax.data.prepare import FORMAT, FORMAT_VERSION
from greencode_jax.data.samples import completion_samples
from greencode_jax.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from greencode_jax.errors import GreencodeError


class PreparedData:
    """The corpus, its tokens, tokenizer and evaluation samples, as other packages use them."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / "prepare.json"
        if not manifest.is_file():
            raise GreencodeError(f"{self.root}: not a prepared corpus (prepare.json missing); run "
                                 "`greencode prepare-data --out DIR` first")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise GreencodeError(f"{manifest}: format {self.manifest.get('format')!r} version "
                                 f"{self.manifest.get('format_version')!r}; expected {FORMAT} {FORMAT_VERSION}")
        self.lang = self.manifest["lang"]
        self.view = self.manifest["view"]
        self.tfds_dir = self.root / "tfds"

    @property
    def stats(self) -> dict:
        return json.loads((self.root / "stats.json").read_text())

    def records(self, split: str):
        """Random-access CodeXGLUE records {path, code, source} (bytes values) of a split; [] if empty."""
        name = self.manifest["datasets"].get("token")
        if name is None:
            raise GreencodeError(f"{self.root}: holds line-level samples only, no token-level corpus")
        return open_split(self.tfds_dir, name, split)

    def line_samples(self) -> list[dict]:
        """CodeXGLUE line-level samples {id, input, gt}."""
        name = self.manifest["datasets"].get("line")
        if name is None:
            raise GreencodeError(f"{self.root}: has no line-level samples (prepared with --line-samples 0, or no "
                                 "test split)")
        source = open_split(self.tfds_dir, name, "test")
        return [decode_record(source[i]) for i in range(len(source))]

    def tokenizer(self):
        if self.manifest.get("tokenizer") is None:
            raise GreencodeError(f"{self.root}: prepared with --tokenizer none; no tokenizer or token files")
        return load_tokenizer(self.root / "tokenizer")

    @property
    def tokenizer_fingerprint(self) -> str | None:
        """The tokenizer's fingerprint (`data.tokenizer.vocabulary_fingerprint`): recorded in
        prepare.json, or computed from `tokenizer/` for a corpus prepared before it was; None
        when prepared with --tokenizer none."""
        recorded = self.manifest.get("tokenizer")
        if recorded is None:
            return None
        if recorded.get("fingerprint") is not None:
            return recorded["fingerprint"]
        if not hasattr(self, "_computed_fingerprint"):
            self._computed_fingerprint = tokenizer_fingerprint(self.root / "tokenizer")
        return self._computed_fingerprint

    def check_model_tokenizer(self, model: str, model_fingerprint: str | None, vocab_size: int, tokenizer_dir):
        """Refuses this corpus for `model` (named so in the message, e.g. "checkpoint runs/x/final")
        when its tokenizer differs: by fingerprint when the model holds tokenizer files
        (`model_fingerprint`), else the corpus's ids must all be < the model's `vocab_size`.
        `tokenizer_dir` is the model's directory, for the hint."""
        recorded = self.manifest.get("tokenizer") or {}
        name = recorded.get("name", "no tokenizer")
        if model_fingerprint is not None:
            mine = self.tokenizer_fingerprint
            if mine != model_fingerprint:
                raise GreencodeError(f"{self.root}: prepared with the tokenizer {name} (fingerprint {mine}), but "
                                     f"{model} holds another tokenizer (fingerprint {model_fingerprint}); prepare the "
                                     f"data with `greencode prepare-data --tokenizer {tokenizer_dir}`")
            return
        size = recorded.get("vocab_size")
        if size is not None and size > vocab_size:
            raise GreencodeError(f"{self.root}: its tokenizer ({name}) has {size} tokens, but {model} has a "
                                 f"vocabulary of {vocab_size}; prepare the data with this model's tokenizer")

    def tokens(self, split: str):
        if self.manifest.get("tokenizer") is None:
            raise GreencodeError(f"{self.root}: prepared with --tokenizer none; no token files")
        return TokenStore(self.root / "tokens", split)

    def stream(self, split: str = "train", *, seq_len: int, global_batch: int, seed: int, shuffle: bool = True,
               process_index: int | None = None, process_count: int | None = None):
        """Packed batches of this process's shard (`packing.PackedStream`)."""
        return PackedStream(self.tokens(split), seq_len, global_batch, seed, shuffle=shuffle,
                            process_index=process_index, process_count=process_count)

    def completion_samples(self, split: str = "test", fraction: float = 0.2, max_context: int = 2048,
                           new_tokens: int = 15, max_samples: int | None = 1000):
        """GREEN-CODE evaluation samples (`samples.CompletionSample`)."""
        return completion_samples(self.tokens(split), self.manifest["tokenizer"]["eos_id"], fraction, max_context,
                                  new_tokens, max_samples)
