"""Synthetic rollout stores for RL tests, written by the store's own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from greencode_jax.rl import store as st
from greencode_jax.rl.collect import _finish


def synthetic_arrays(episodes=256, tokens=15, decisions=3, hidden=8, seed=0):
    """l* is a simple function of the observation: decision exit x agrees iff feature 0 of its
    hidden state is positive (so exiting iff h[0] > 0 is optimal, and learnable)."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(episodes, tokens, decisions, hidden)).astype(np.float32)
    agree = h[..., 0] > 0.3
    conf = 1 / (1 + np.exp(-3 * h[..., 0]))
    return {"hidden": h, "agree": agree, "confidence": conf.astype(np.float32),
            "tokens": rng.integers(0, 50, (episodes, tokens)).astype(np.int32),
            "episodes": np.stack([np.arange(episodes), np.full(episodes, 10), np.arange(episodes)], 1)}


def write_synthetic_store(out: Path, arrays, exit_layers=(1, 3, 5, 7), fingerprint="synthetic", chunk=128) -> Path:
    out = Path(out)
    n = len(arrays["hidden"])
    work = st.partial_dir(out)
    (work / st.CHUNKS).mkdir(parents=True)
    (work / "settings.json").write_text("{}")
    for k in range(-(-n // chunk)):
        part = {name: a[k * chunk:(k + 1) * chunk] for name, a in arrays.items()}
        st.write_chunk(work, k, part, "float32")
    num_layers = exit_layers[-1] + 1
    settings = {"model": {"checkpoint": "synthetic", "family": "llama", "num_layers": num_layers,
                          "hidden_size": arrays["hidden"].shape[-1], "vocab_size": 50,
                          "exit_layers": list(exit_layers), "fingerprint": fingerprint},
                "data": "synthetic", "split": "train", "episodes": n, "seed": 0, "hidden_dtype": "float32",
                "new_tokens": arrays["hidden"].shape[1], "max_context": 10, "chunk_episodes": chunk}
    _finish(work, out, settings, tuple(exit_layers[:-1]), -(-n // chunk), False)
    return out
