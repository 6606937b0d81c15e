"""`greencode collect-rollouts`: the model at full depth, once, recording what the exit
policy will be trained on (GREEN-CODE's episodes: a document of the split, a context of a
U(0.2, 0.5) fraction of its tokens, 15 greedy tokens).

Episodes are planned up front from the seed, so the store does not depend on the batch
size or the device count. They are grouped in chunks; process p of a multi-host run
records chunks p, p + P, ...; inside a process the batch is split over its devices. Each
chunk is written atomically, so an interrupted collection resumes at its first missing
chunk. The store is assembled under DIR.partial and renamed to DIR at the end. Ctrl-C or
SIGTERM stops between two batches, keeping the chunks written (never half of one).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from greencode_jax.atomic import atomic_write_text
from greencode_jax.convert import load_pretrained
from greencode_jax.convert.fingerprint import check_corpus_tokenizer, model_fingerprint
from greencode_jax.data.prepared import PreparedData
from greencode_jax.energy.cost_model import architecture
from greencode_jax.errors import GreencodeError
from greencode_jax.generate.record import record_jit
from greencode_jax.interrupts import Interrupted, SafePoints, interrupted
from greencode_jax.ownership import check_output_dir
from greencode_jax.parallel import make_mesh
from greencode_jax.rl import store as st
from greencode_jax.rl.processes import (
    clear_stop_marks, holds_run_lock, is_primary, mark_stopped, shared_work_directory, total_over_processes,
    wait_for_the_others,
)

PROMPT_BUCKET = 64  # prompts are left-padded to a multiple of this: one compile per bucket
CHUNK_BYTES = 64 << 20


def model_identity(model, checkpoint) -> dict:
    """What a store, and a policy trained on it, must agree with: the shape, and the weights'
    fingerprint (`convert.fingerprint.model_fingerprint`: a fine-tune changes it; the layer
    layout, dtype of a checkpoint's load and exit layers do not)."""
    c = model.config
    return {"checkpoint": str(Path(checkpoint).resolve()), "family": c.family, "num_layers": c.num_layers,
            "hidden_size": c.hidden_size, "vocab_size": c.vocab_size, "exit_layers": list(c.exit_layers),
            "fingerprint": model_fingerprint(model), "architecture": architecture(c)}


def plan_episodes(store, eos_id, episodes: int, seed: int, new_tokens: int, max_context: int,
                  fractions=(0.2, 0.5)) -> np.ndarray:
    """[episodes, 2] (document, context length): documents drawn without replacement while
    there are enough (then with), each context a U(lo, hi) fraction of its tokens, at least
    one token, at most `max_context`."""
    lengths = np.diff(np.asarray(store.offsets))
    if eos_id is not None:  # the separator added for training is not part of the file
        lengths = lengths - 1
    eligible = np.flatnonzero(lengths >= 2)
    if not len(eligible):
        raise GreencodeError(f"split '{store.split}' has no document of two or more tokens to draw episodes from")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    docs = rng.choice(eligible, size=episodes, replace=episodes > len(eligible))
    frac = rng.uniform(*fractions, size=episodes)
    context = np.clip((lengths[docs] * frac).astype(np.int64), 1, max_context)
    return np.stack([docs, context], axis=1)


def _settings(identity, data_dir, split, episodes, seed, hidden_dtype, new_tokens, max_context, chunk) -> dict:
    return {"model": identity, "data": str(Path(data_dir).resolve()), "split": split, "episodes": episodes,
            "seed": seed, "hidden_dtype": hidden_dtype, "new_tokens": new_tokens, "max_context": max_context,
            "chunk_episodes": chunk}


@holds_run_lock("out_dir")
def collect_rollouts(checkpoint, data_dir, out_dir, *, split: str = "train", episodes: int = 512,
                     batch_size: int = 16, seed: int = 0, hidden_dtype: str = "float32", new_tokens: int = 15,
                     max_context: int | None = None, chunk_episodes: int | None = None, overwrite: bool = False,
                     progress: bool = True, log=print) -> Path:
    out = Path(out_dir)
    _check_arguments(episodes, batch_size, hidden_dtype, new_tokens, max_context, chunk_episodes)
    inputs = {"checkpoint": checkpoint, "data": data_dir}
    check_output_dir(out, "rollouts", inputs=inputs, overwrite=overwrite)
    tokens, model, decisions, max_context = _load_checked(checkpoint, data_dir, split, new_tokens, max_context)
    config = model.config
    identity = model_identity(model, checkpoint)
    per_episode = new_tokens * len(decisions) * config.hidden_size * (4 if hidden_dtype == "float32" else 2)
    chunk = chunk_episodes or max(batch_size, CHUNK_BYTES // per_episode // batch_size * batch_size)
    settings = _settings(identity, data_dir, split, episodes, seed, hidden_dtype, new_tokens, max_context, chunk)

    work, _ = shared_work_directory(out, settings, "collection", kind="rollouts", inputs=inputs,
                                    overwrite=overwrite)
    (work / st.CHUNKS).mkdir(exist_ok=True)
    if is_primary():
        clear_stop_marks(work)  # before total_over_processes, a barrier: no process reads them before

    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    plan = plan_episodes(tokens, eos, episodes, seed, new_tokens, max_context)
    num_chunks = -(-episodes // chunk)
    pid, pcount = jax.process_index(), jax.process_count()
    # only process pid writes chunks pid, pid + P, ...: what it finds missing of them is exact
    mine = [k for k in range(pid, num_chunks, pcount) if not (work / st.CHUNKS / f"{k:05d}").is_dir()]
    sizes = [min(chunk, episodes - k * chunk) for k in mine]
    missing, to_record = total_over_processes(len(mine), sum(sizes))
    done = num_chunks - missing
    if not is_primary():  # the primary speaks for the run
        log, progress = (lambda *a, **k: None), False
    recorder = _Recorder(model, new_tokens, hidden_dtype)
    log(f"collect-rollouts: {episodes} episodes of {new_tokens} tokens from '{split}' of {data_dir}, "
        f"{len(decisions)} decision exits {list(decisions)}, batch {batch_size} over {recorder.devices} device(s)"
        + (f" in each of {pcount} processes, " if pcount > 1 else ", ") +
        f"{num_chunks} chunk(s) of {chunk}" + (f"; resuming, {done} chunk(s) done" if done else ""))
    bar = tqdm(total=sum(sizes), unit="ep", disable=not progress, dynamic_ncols=True, desc="recording")
    start = time.perf_counter()
    try:
        _record_chunks(recorder, tokens, plan, mine, chunk, batch_size, hidden_dtype, work, num_chunks, bar, start)
        if pcount > 1:  # the others' chunks; on the file system: a collective would not see a signal
            wait_for_the_others(work, lambda: _missing(work, num_chunks) == [],
                                functools.partial(_kept, work, num_chunks))
    except BaseException as error:
        if pcount > 1:
            mark_stopped(work, error)  # the others stop too, instead of waiting for this one's chunks
        raise
    recorded_tokens = to_record * new_tokens
    if is_primary():  # the store's metadata and statistics, and the rename, are the primary's alone
        _finish(work, out, settings, decisions, num_chunks, overwrite)
    seconds = time.perf_counter() - start
    log(f"collect-rollouts: {recorded_tokens} tokens recorded in {seconds:.1f} s "
        f"({recorded_tokens / max(seconds, 1e-9):.0f} tok/s) -> {out}")
    return out


def _check_arguments(episodes, batch_size, hidden_dtype, new_tokens, max_context, chunk_episodes):
    """The arguments that need neither the data nor the model, checked before anything is read."""
    if hidden_dtype not in st.HIDDEN_DTYPES:
        raise GreencodeError(f"hidden dtype {hidden_dtype!r}: expected one of {st.HIDDEN_DTYPES}")
    for name, value in (("episodes", episodes), ("batch size", batch_size), ("new tokens", new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise GreencodeError(f"{name} {value!r}: expected a positive integer")
    if chunk_episodes is not None and (isinstance(chunk_episodes, bool) or not isinstance(chunk_episodes, int)
                                       or chunk_episodes < 1):
        raise GreencodeError(f"chunk episodes {chunk_episodes!r}: expected a positive integer")
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                    or max_context < 1):
        raise GreencodeError(f"max context {max_context!r}: expected a positive number of tokens")


def _load_checked(checkpoint, data_dir, split: str, new_tokens: int, max_context: int | None):
    """The split's tokens and the model, checked against each other: (tokens, model, its decision exits,
    the longest context, within `max_context` where given, that leaves room for `new_tokens`)."""
    data = PreparedData(data_dir)
    tokens = data.tokens(split)
    if len(tokens) == 0:
        raise GreencodeError(f"{data_dir}: split '{split}' is empty; nothing to record")
    model = load_pretrained(checkpoint, scan_layers=False)
    check_corpus_tokenizer(data, checkpoint, model, "checkpoint")
    config = model.config
    decisions = tuple(e for e in config.exit_layers if e < config.num_layers - 1)
    if not decisions:
        raise GreencodeError(f"{checkpoint}: the model has no exit before its last layer {config.num_layers - 1}; "
                             "an exit policy needs at least one (set exit_layers)")
    limit = config.max_position_embeddings - new_tokens
    max_context = limit if max_context is None else min(max_context, limit)
    if max_context < 1:
        raise GreencodeError(f"max context {max_context}: the model's {config.max_position_embeddings} positions "
                             f"leave no room for a prompt before {new_tokens} new tokens")
    return tokens, model, decisions, max_context


def _missing(work: Path, num_chunks: int) -> list[int]:
    return [k for k in range(num_chunks) if not (work / st.CHUNKS / f"{k:05d}").is_dir()]


def _kept(work: Path, num_chunks: int) -> str:
    """What an interrupted collection keeps, in one line."""
    n = num_chunks - len(_missing(work, num_chunks))
    then = "finishes the store" if n == num_chunks else "records the rest"
    return f"collect-rollouts kept {n} of {num_chunks} chunks in {work}; the same command {then}"


def _record_chunks(recorder, tokens, plan, mine, chunk: int, batch_size: int, hidden_dtype: str, work: Path,
                   num_chunks: int, bar, start: float):
    """Records this process's missing chunks, batch by batch, each chunk written atomically; a signal stops
    between batches (the chunk in progress is recorded again). Closes `bar`."""
    episodes = len(plan)
    kept = functools.partial(_kept, work, num_chunks)
    recorded_tokens = 0
    try:
        with SafePoints() as stop:  # a signal stops between batches; the chunk in progress is recorded again
            for k in mine:
                rows = np.arange(k * chunk, min((k + 1) * chunk, episodes))
                parts = []
                for b in range(0, len(rows), batch_size):
                    stop.check(kept)
                    batch = rows[b:b + batch_size]
                    prompts = [_doc(tokens, int(plan[i, 0]))[:int(plan[i, 1])] for i in batch]
                    parts.append(recorder(prompts, batch_size))
                    recorded_tokens += len(batch) * recorder.new_tokens
                    bar.update(len(batch))
                    bar.set_postfix_str(f"{recorded_tokens / (time.perf_counter() - start):.0f} tok/s")
                arrays = _chunk_arrays(parts, plan, rows)
                with stop.critical():
                    st.write_chunk(work, k, arrays, hidden_dtype)
            stop.check(kept)
    except KeyboardInterrupt as error:  # a second Ctrl-C, at once: still say what is kept
        if isinstance(error, Interrupted):
            raise
        raise interrupted(kept()) from None
    finally:
        bar.close()


def _chunk_arrays(parts, plan, rows) -> dict:
    """One chunk's arrays: its batches' recordings joined, and the episodes (document, context length, episode)."""
    arrays = {name: np.concatenate([p[name] for p in parts]) for name in ("hidden", "agree", "confidence", "tokens")}
    arrays["episodes"] = np.stack([plan[rows, 0], plan[rows, 1], rows], axis=1).astype(np.int64)
    return arrays


def _doc(tokens, index: int) -> np.ndarray:
    return np.asarray(tokens.doc(index), np.int32)


def _finish(work: Path, out: Path, settings: dict, decisions, num_chunks: int, overwrite: bool):
    missing = _missing(work, num_chunks)
    if missing:
        raise GreencodeError(f"{work}: chunks {missing[:5]} missing after collection")
    mean, std = st.obs_stats(work, num_chunks)
    np.savez(work / st.STATS, mean=mean, std=std)
    meta = {"format": st.FORMAT, "version": st.VERSION, **settings, "decision_layers": list(decisions),
            "chunks": num_chunks, "arrays": {"hidden": "[n, tokens, exits, hidden]", "agree": "[n, tokens, exits]",
                                             "confidence": "[n, tokens, exits]", "tokens": "[n, tokens]",
                                             "episodes": "[n, (document, context length, episode)]"}}
    os.remove(work / "settings.json")
    atomic_write_text(work / st.META, json.dumps(meta, indent=2) + "\n")
    if out.exists() and overwrite:
        shutil.rmtree(out)
    os.replace(work, out)


class _Recorder:
    """Batches of prompts through generate.record, left-padded, split over the local devices."""

    def __init__(self, model, new_tokens: int, hidden_dtype: str):
        self.devices = jax.local_device_count()
        self.new_tokens = new_tokens
        self.hidden_dtype = jnp.float32 if hidden_dtype == "float32" else jnp.bfloat16
        if self.devices > 1:
            mesh = make_mesh(devices=jax.local_devices())  # (data, fsdp): every local device on `data`
            self.batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
            model = jax.device_put(model, NamedSharding(mesh, PartitionSpec()))
        else:
            self.batch_sharding = None
        self.model = model

    def __call__(self, prompts, batch_size: int) -> dict:
        rows = -(-batch_size // self.devices) * self.devices  # a fixed batch shape: one compile per bucket
        width = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
        ids = np.zeros((rows, width), np.int32)
        valid = np.zeros((rows, width), bool)
        for r in range(rows):
            p = prompts[min(r, len(prompts) - 1)]  # spare rows repeat the last prompt; dropped below
            ids[r, width - len(p):], valid[r, width - len(p):] = p, True
        ids, valid = jnp.asarray(ids), jnp.asarray(valid)
        if self.batch_sharding is not None:
            ids, valid = jax.device_put(ids, self.batch_sharding), jax.device_put(valid, self.batch_sharding)
        rec = record_jit(self.model, ids, valid, new_tokens=self.new_tokens, hidden_dtype=self.hidden_dtype)
        n = len(prompts)
        return {"hidden": np.asarray(rec.hidden.astype(jnp.float32))[:n], "agree": np.asarray(rec.agree)[:n],
                "confidence": np.asarray(rec.confidence)[:n], "tokens": np.asarray(rec.tokens)[:n]}
