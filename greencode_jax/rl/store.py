"""The rollout store: what `collect-rollouts` writes and `train-policy` reads.

    DIR/rollouts.json          format, model identity and fingerprint, split, episodes, dtype, chunks
    DIR/obs_stats.npz          mean [E], std [E] of every recorded hidden state (float64 sums)
    DIR/chunks/NNNNN/          one chunk of episodes, written atomically:
        hidden.npy   [n, N, X, E] float32 or bfloat16 (stored as uint16 bits)  hidden state per token and decision exit
        agree.npy    [n, N, X]    bool      that exit's argmax equals the final layer's
        confidence.npy [n, N, X]  float32   that exit's top softmax probability
        tokens.npy   [n, N]       int32     the greedy tokens at full depth
        episodes.npy [n, 3]       int64     document index, context length, episode index
        sums.npz                  sum and sum of squares of the chunk's hidden states (float64)
Arrays are .npy files, so `np.load(..., mmap_mode="r")` maps them without reading them.
A store being written lives at DIR.partial; it is renamed to DIR when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from greencode_jax.energy.cost_model import ARCHITECTURE_FIELDS
from greencode_jax.errors import GreencodeError

FORMAT, VERSION = "greencode-rollouts", 1
META, STATS, CHUNKS = "rollouts.json", "obs_stats.npz", "chunks"
HIDDEN_DTYPES = ("float32", "bfloat16")
ARRAYS = ("hidden", "agree", "confidence", "tokens", "episodes")


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def write_chunk(root: Path, index: int, arrays: dict, hidden_dtype: str):
    """Writes chunk `index` under root/chunks atomically, with its hidden-state sums."""
    final = root / CHUNKS / f"{index:05d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hidden = np.asarray(arrays["hidden"], np.float32)
    flat = hidden.reshape(-1, hidden.shape[-1]).astype(np.float64)
    np.savez(tmp / "sums.npz", sum=flat.sum(0), sumsq=(flat * flat).sum(0), count=np.int64(flat.shape[0]))
    stored = dict(arrays)
    if hidden_dtype == "bfloat16":  # NumPy has no bfloat16 .npy: keep its bits (the upper half of float32)
        stored["hidden"] = (hidden.view(np.uint32) >> 16).astype(np.uint16)
    else:
        stored["hidden"] = hidden
    for name in ARRAYS:
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(stored[name]))
    os.replace(tmp, final)


def obs_stats(root: Path, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    total = sq = None
    count = 0
    for k in range(chunks):
        with np.load(root / CHUNKS / f"{k:05d}" / "sums.npz") as s:
            total = s["sum"] if total is None else total + s["sum"]
            sq = s["sumsq"] if sq is None else sq + s["sumsq"]
            count += int(s["count"])
    mean = total / count
    var = np.maximum(sq / count - mean * mean, 0.0)
    # A feature that never varies would divide by zero: its normalised value is 0 anyway.
    return mean, np.sqrt(np.maximum(var, 1e-12))


class RolloutStore:
    """Read access to a complete store."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / META
        if not self.root.is_dir():
            hint = " (an interrupted collection: rerun collect-rollouts to finish it)" if partial_dir(self.root).is_dir() else ""
            raise GreencodeError(f"{self.root}: no such rollouts directory{hint}")
        try:
            self.meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise GreencodeError(f"{self.root}: not a rollouts directory ({META} is missing; "
                                 "collect-rollouts writes one)") from None
        except (OSError, ValueError) as e:
            raise GreencodeError(f"{meta_path}: unreadable ({e})") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise GreencodeError(f"{meta_path}: not a greencode rollout store (expected format {FORMAT!r} "
                                 f"version {VERSION})")
        stats = self.root / STATS
        try:
            archive = np.load(stats)  # allow_pickle stays off: anything but an archive is refused, never unpickled
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("an .npy array, not an archive")
            with archive:
                self.obs_mean, self.obs_std = archive["mean"].astype(np.float32), archive["std"].astype(np.float32)
        except FileNotFoundError:
            raise GreencodeError(f"{stats}: missing; collect the rollouts again") from None
        except KeyError as e:
            raise GreencodeError(f"{stats}: array {e.args[0]!r} is missing (expected mean and std); collect the "
                                 "rollouts again") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            raise GreencodeError(f"{stats}: not a NumPy .npz archive (expected mean and std); collect the rollouts "
                                 "again") from None

    @property
    def episodes(self) -> int:
        return int(self.meta["episodes"])

    @property
    def model(self) -> dict:
        return self.meta["model"]

    @property
    def architecture(self) -> dict:
        """The recorded model's `energy.cost_model.architecture`, or the part of it an older
        store records (family, num_layers, hidden_size, vocab_size)."""
        model = self.model
        return dict(model.get("architecture") or {k: model[k] for k in ARCHITECTURE_FIELDS if k in model})

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return tuple(self.meta["model"]["exit_layers"])

    @property
    def decision_layers(self) -> tuple[int, ...]:
        return tuple(self.meta["decision_layers"])

    def _chunk(self, k: int, name: str):
        path = self.root / CHUNKS / f"{k:05d}" / f"{name}.npy"
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise GreencodeError(f"{path}: unreadable ({e}); collect the rollouts again") from None

    def array(self, name: str, max_episodes: int | None = None) -> np.ndarray:
        """One array over every chunk (hidden as float32), the first `max_episodes` episodes."""
        parts, n = [], 0
        for k in range(int(self.meta["chunks"])):
            if max_episodes is not None and n >= max_episodes:
                break
            part = self._chunk(k, name)
            if name == "hidden" and self.meta["hidden_dtype"] == "bfloat16":
                part = (np.asarray(part).astype(np.uint32) << 16).view(np.float32)
            parts.append(np.asarray(part))
            n += len(part)
        out = np.concatenate(parts) if parts else np.zeros((0,))
        return out if max_episodes is None else out[:max_episodes]

    def check_model(self, other: dict, what: str):
        """Refuses a store recorded from another model shape than `other` (a model identity dict)."""
        mine = self.model
        for key in ("family", "num_layers", "hidden_size", "exit_layers"):
            if mine.get(key) != other.get(key):
                raise GreencodeError(f"{self.root}: recorded from a model with {key}={mine.get(key)}, but {what} has "
                                     f"{key}={other.get(key)}")
