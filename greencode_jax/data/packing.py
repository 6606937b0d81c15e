"""Token storage and the training stream: packed fixed-length sequences, seeded shuffling,
per-host shards and an exact resume position.

Storage (`OUT/tokens/`): per split, `SPLIT.bin` holds every document's model ids back to
back (uint16 when the vocabulary fits, else uint32) and `SPLIT.offsets.bin` the int64
document boundaries (length documents + 1); `meta.json` has the dtype and counts. Both
files are read through `np.memmap`: nothing is loaded whole.

The stream. Epoch e permutes the documents (seeded by (seed, e)), concatenates them into
one token stream and cuts it into `seq_len`-token sequences (the tail shorter than
`seq_len` is dropped), then permutes the sequences. Global batch b of the epoch is
sequences [b·G, (b+1)·G) of that order, G the global batch size; process p of P takes
the p-th contiguous slice of G/P of them, so the hosts' shards are disjoint, together
cover the global batch, and the global batch is the same whatever P is. Each row comes
with `segment_ids` (1, 2, … for the pieces of documents in the row) and `positions`
(0-based within each piece), so a train step can keep attention and loss inside
documents.

Everything is a pure function of (seed, step): `state()` is a small dict of ints to save in
a checkpoint, and a stream restored from it yields exactly the batches the original would
have yielded next.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from greencode_jax.errors import GreencodeError

META = "meta.json"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


class TokenWriter:
    """Appends documents' ids to `SPLIT.bin` / `SPLIT.offsets.bin` in constant memory."""

    def __init__(self, directory: str | Path, split: str, dtype: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.dtype = np.dtype(dtype)
        self._tokens = open(self.directory / f"{split}.bin", "wb")
        self._offsets = open(self.directory / f"{split}.offsets.bin", "wb")
        np.zeros(1, np.int64).tofile(self._offsets)
        self.docs = 0
        self.tokens = 0

    def add(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
            raise GreencodeError(f"token id out of range for {self.dtype} storage")
        ids.astype(self.dtype).tofile(self._tokens)
        self.tokens += int(ids.size)
        self.docs += 1
        np.array([self.tokens], np.int64).tofile(self._offsets)

    def close(self) -> dict:
        self._tokens.close()
        self._offsets.close()
        return {"docs": self.docs, "tokens": self.tokens}


def write_meta(directory: str | Path, dtype: str, splits: dict):
    Path(directory, META).write_text(json.dumps({"dtype": dtype, "splits": splits}, indent=2) + "\n")


class TokenStore:
    """Memory-mapped documents of one split."""

    def __init__(self, directory: str | Path, split: str):
        directory = Path(directory)
        meta_path = directory / META
        if not meta_path.is_file():
            raise GreencodeError(f"{directory}: no token files here ({META} missing); prepare the corpus with a "
                                 "tokenizer (--tokenizer bpe or a model directory)")
        meta = json.loads(meta_path.read_text())
        if split not in meta["splits"]:
            raise GreencodeError(f"{directory}: no split {split!r}; prepared splits: {sorted(meta['splits'])}")
        self.split = split
        self.num_docs = int(meta["splits"][split]["docs"])
        self.num_tokens = int(meta["splits"][split]["tokens"])
        self.offsets = np.memmap(directory / f"{split}.offsets.bin", dtype=np.int64, mode="r")
        if len(self.offsets) != self.num_docs + 1:
            raise GreencodeError(f"{directory / f'{split}.offsets.bin'}: {len(self.offsets)} offsets, expected "
                                 f"{self.num_docs + 1}; the prepared corpus is damaged, prepare it again")
        self.tokens = (np.memmap(directory / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
                       if self.num_tokens else np.zeros(0, np.dtype(meta["dtype"])))
        if len(self.tokens) != self.num_tokens:
            raise GreencodeError(f"{directory / f'{split}.bin'}: {len(self.tokens)} tokens, expected "
                                 f"{self.num_tokens}; the prepared corpus is damaged, prepare it again")

    def __len__(self):
        return self.num_docs

    def doc(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))


def _process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax  # lazy: keeps data free of JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


class PackedStream:
    """Batches of packed sequences for this process: dicts of int32 [global_batch / P, seq_len] arrays
    `tokens`, `segment_ids`, `positions`. Iterate it, or ask for `batch(step)` directly."""

    def __init__(self, store: TokenStore, seq_len: int, global_batch: int, seed: int, *, shuffle: bool = True,
                 process_index: int | None = None, process_count: int | None = None, step: int = 0):
        if seq_len <= 0 or global_batch <= 0:
            raise GreencodeError("seq_len and global_batch must be positive")
        self.store = store
        self.seq_len = int(seq_len)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.process_index, self.process_count = _process(process_index, process_count)
        if self.global_batch % self.process_count:
            raise GreencodeError(f"global batch {global_batch} is not divisible by the {self.process_count} processes")
        if not 0 <= self.process_index < self.process_count:
            raise GreencodeError(f"process index {self.process_index} outside 0..{self.process_count - 1}")
        self.per_process = self.global_batch // self.process_count
        self.sequences_per_epoch = store.num_tokens // self.seq_len
        self.batches_per_epoch = self.sequences_per_epoch // self.global_batch
        if self.batches_per_epoch == 0:
            raise GreencodeError(f"split {store.split!r} has {store.num_tokens} tokens, fewer than one global "
                                 f"batch ({self.global_batch} x {self.seq_len}); use a smaller batch or seq_len, "
                                 "or more data")
        self.step = int(step)
        self._lengths = store.doc_lengths()
        self._epoch = None

    # -------------------------------------------------------------------------------------- state

    def _fingerprint(self) -> dict:
        return {"seq_len": self.seq_len, "global_batch": self.global_batch, "seed": self.seed,
                "shuffle": self.shuffle, "num_docs": self.store.num_docs, "num_tokens": self.store.num_tokens}

    def state(self) -> dict:
        """The position to save in a checkpoint: the next step, and what it is valid for."""
        return {"step": self.step, **self._fingerprint()}

    def restore(self, state: dict) -> "PackedStream":
        for key, value in self._fingerprint().items():
            if key in state and state[key] != value:
                raise GreencodeError(f"data stream state: {key} was {state[key]!r} when saved, now {value!r}; "
                                     "resume with the same corpus and data settings")
        self.step = int(state["step"])
        return self

    # ------------------------------------------------------------------------------------ batches

    def _epoch_order(self, epoch: int):
        if self._epoch is None or self._epoch[0] != epoch:
            if self.shuffle:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
                docs = rng.permutation(self.store.num_docs)
                sequences = rng.permutation(self.sequences_per_epoch)
            else:
                docs = np.arange(self.store.num_docs)
                sequences = np.arange(self.sequences_per_epoch)
            starts = np.concatenate([[0], np.cumsum(self._lengths[docs])])
            self._epoch = (epoch, docs, starts, sequences)
        return self._epoch[1:]

    def _sequence(self, docs, starts, index: int):
        length = self.seq_len
        tokens = np.empty(length, np.int32)
        segments = np.empty(length, np.int32)
        positions = np.empty(length, np.int32)
        start = index * length
        k = int(np.searchsorted(starts, start, side="right")) - 1
        filled, segment = 0, 0
        offsets, store_tokens = self.store.offsets, self.store.tokens
        while filled < length:
            doc = docs[k]
            within = start + filled - int(starts[k])
            take = min(int(self._lengths[doc]) - within, length - filled)
            if take > 0:
                begin = int(offsets[doc]) + within
                segment += 1
                tokens[filled:filled + take] = store_tokens[begin:begin + take]
                segments[filled:filled + take] = segment
                positions[filled:filled + take] = np.arange(take)
                filled += take
            k += 1
        return tokens, segments, positions

    def batch(self, step: int) -> dict:
        """This process's part of global batch `step`."""
        epoch, b = divmod(int(step), self.batches_per_epoch)
        docs, starts, sequences = self._epoch_order(epoch)
        first = b * self.global_batch + self.process_index * self.per_process
        rows = [self._sequence(docs, starts, int(sequences[j])) for j in range(first, first + self.per_process)]
        return {"tokens": np.stack([r[0] for r in rows]), "segment_ids": np.stack([r[1] for r in rows]),
                "positions": np.stack([r[2] for r in rows])}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        out = self.batch(self.step)
        self.step += 1
        return out
