"""`PreparedData`: read access to a directory written by `prepare-data`."""

from __future__ import annotations

import json
from pathlib import Path

from greencode_jax.errors import GreencodeError


class PreparedData:
    """The corpus, its tokens, tokenizer and evaluation samples, as other packages use them."""

    def __init__(self, root: str | Path):
        from greencode_jax.data.prepare import FORMAT, FORMAT_VERSION

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
        from greencode_jax.data.corpus import open_split

        name = self.manifest["datasets"].get("token")
        if name is None:
            raise GreencodeError(f"{self.root}: holds line-level samples only, no token-level corpus")
        return open_split(self.tfds_dir, name, split)

    def line_samples(self) -> list[dict]:
        """CodeXGLUE line-level samples {id, input, gt}."""
        from greencode_jax.data.corpus import decode_record, open_split

        name = self.manifest["datasets"].get("line")
        if name is None:
            raise GreencodeError(f"{self.root}: has no line-level samples (prepared with --line-samples 0, or no "
                                 "test split)")
        source = open_split(self.tfds_dir, name, "test")
        return [decode_record(source[i]) for i in range(len(source))]

    def tokenizer(self):
        from greencode_jax.data.tokenizer import load_tokenizer

        if self.manifest.get("tokenizer") is None:
            raise GreencodeError(f"{self.root}: prepared with --tokenizer none; no tokenizer or token files")
        return load_tokenizer(self.root / "tokenizer")

    def tokens(self, split: str):
        from greencode_jax.data.packing import TokenStore

        if self.manifest.get("tokenizer") is None:
            raise GreencodeError(f"{self.root}: prepared with --tokenizer none; no token files")
        return TokenStore(self.root / "tokens", split)

    def stream(self, split: str = "train", *, seq_len: int, global_batch: int, seed: int, shuffle: bool = True,
               process_index: int | None = None, process_count: int | None = None):
        """Packed batches of this process's shard (`packing.PackedStream`)."""
        from greencode_jax.data.packing import PackedStream

        return PackedStream(self.tokens(split), seq_len, global_batch, seed, shuffle=shuffle,
                            process_index=process_index, process_count=process_count)

    def completion_samples(self, split: str = "test", fraction: float = 0.2, max_context: int = 2048,
                           new_tokens: int = 15, max_samples: int | None = 1000):
        """GREEN-CODE evaluation samples (`samples.CompletionSample`)."""
        from greencode_jax.data.samples import completion_samples

        return completion_samples(self.tokens(split), self.manifest["tokenizer"]["eos_id"], fraction, max_context,
                                  new_tokens, max_samples)
