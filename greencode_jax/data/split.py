"""Deterministic train / dev / test assignment and exact-duplicate removal.

A file's split depends only on its path (relative to the source) and the ratios: the
first 8 bytes of SHA-256(path) read as a fraction u in [0, 1); train if u < r_train, dev
if u < r_train + r_dev, else test. The same file lands in the same split on every
machine, run and Python version, whatever else is in the corpus. Documents without a path
(lines of a CodeXGLUE file) are keyed by their content.
"""

from __future__ import annotations

import hashlib
import math

from greencode_jax.errors import GreencodeError

SPLITS = ("train", "dev", "test")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)


def parse_ratios(text: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1); three non-negative numbers summing to 1."""
    try:
        ratios = tuple(float(part) for part in text.split(","))
    except ValueError:
        ratios = ()
    if len(ratios) != 3 or not all(math.isfinite(r) and r >= 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise GreencodeError(f"--split {text!r}: expected three non-negative train,dev,test ratios (finite numbers) "
                             "summing to 1, such as 0.8,0.1,0.1")
    return ratios  # type: ignore[return-value]


def unit_hash(key: str) -> float:
    """A fraction in [0, 1) from SHA-256 of `key`."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2.0**64


def split_of(key: str, ratios=DEFAULT_RATIOS) -> str:
    u = unit_hash(key)
    if u < ratios[0]:
        return "train"
    if u < ratios[0] + ratios[1]:
        return "dev"
    return "test"


def content_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class Deduplicator:
    """Remembers content digests (16 bytes each) and says whether a document is the first of its kind."""

    def __init__(self):
        self._seen: set[bytes] = set()

    def first(self, digest: bytes) -> bool:
        if digest in self._seen:
            return False
        self._seen.add(digest)
        return True

    def __len__(self):
        return len(self._seen)
