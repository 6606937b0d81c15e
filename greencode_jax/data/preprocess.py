"""`prepare_data`'s first pass and its bookkeeping: the main process reads each file, drops exact
duplicates (by content digest) and assigns the split by path; worker processes tokenise chunks
of files, spill their raw tokens to a work directory and count literals in training files
(CodeXGLUE lines already tokenised are deduplicated and spilled in this process). `Stats` counts
what every pass kept, dropped and how long it took."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm import tqdm

from greencode_jax.data.codexglue_java import decode_java, java_raw_tokens_from_text
from greencode_jax.data.codexglue_python import PreprocessError, decode_python, python_raw_tokens_from_text
from greencode_jax.data.sources import read_ref
from greencode_jax.data.split import SPLITS, Deduplicator, content_digest, split_of
from greencode_jax.errors import GreencodeError

CHUNK_BYTES = 256 * 1024  # source bytes per worker task
CHUNK_FILES = 64
MAX_FAILURES_LISTED = 100
_LIT = re.compile(r"<(STR|NUM|CHAR)_LIT(:)?")


# ------------------------------------------------------------------------------------- workers


def _preprocess_file(lang: str, data: bytes):
    """-> (raw tokens, decoded text); raises PreprocessError."""
    if lang == "python":
        text = decode_python(data)
        return python_raw_tokens_from_text(text), text
    text = decode_java(data)
    return java_raw_tokens_from_text(text), text


def preprocess_chunk(task):
    """Worker: tokenise a chunk, spill successes to `work_dir`, count literals of training files."""
    chunk_id, lang, work_dir, items, count_literals = task
    results, spilled = [], []
    counts = {"str": Counter(), "num": Counter(), "char": Counter()}
    kinds = {"s": "str", "c": "char", "n": "num"}
    for path, split, data in items:
        try:
            raw, text = _preprocess_file(lang, data)
        except PreprocessError as error:
            results.append((path, split, "failed", error.reason, error.detail, 0))
            continue
        except Exception as error:  # never fatal: any surprise is one failed file
            results.append((path, split, "failed", "error", f"{type(error).__name__}: {error}", 0))
            continue
        if not raw:
            results.append((path, split, "empty", "", "", 0))
            continue
        if count_literals and split == "train":
            for token in raw:
                if not isinstance(token, str):
                    kind = kinds[token[0]]
                    counts[kind][token[1] if kind == "num" else token[3]] += 1
        spilled.append((path, split, raw, text))
        results.append((path, split, "ok", "", "", len(raw)))
    with open(Path(work_dir) / f"chunk-{chunk_id:07d}.pkl", "wb") as f:
        pickle.dump(spilled, f, protocol=pickle.HIGHEST_PROTOCOL)
    return chunk_id, results, counts


def _ordered_pool_map(function, tasks, workers: int):
    """Yields function(task) in task order, at most 3 x workers tasks in flight (bounded memory)."""
    if workers <= 1:
        for task in tasks:
            yield function(task)
        return
    # spawn: the parent may hold threads (JAX, tokenizers) that fork would copy half-way. A worker that
    # dies (killed for memory, or a script without a __main__ guard) breaks the pool instead of hanging it.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        pending = deque()
        for task in tasks:
            pending.append(pool.submit(function, task))
            if len(pending) >= 3 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise GreencodeError(
            "preprocessing worker processes died: out of memory, or prepare_data was called from a script "
            "without an `if __name__ == '__main__':` guard (worker processes re-import the main script); "
            "use --workers 1 to preprocess in this process") from None
    finally:  # on an error or Ctrl-C, drop queued work instead of finishing it
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------- stats


class Stats:
    def __init__(self):
        self.found = 0
        self.docs = Counter()  # split -> documents kept
        self.tokens = Counter()  # split -> CodeXGLUE tokens (without <s> </s>)
        self.model_tokens = Counter()
        self.duplicates = 0
        self.empty = 0
        self.failure_reasons = Counter()
        self.failures: list = []
        self.literals = {k: Counter() for k in ("str", "num", "char")}  # kind -> {"kept", "normalised"}
        self.line_samples = 0
        self.spilled = 0  # documents that passed preprocessing and deduplication
        self.stage_seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, stage: str):
        now = time.perf_counter()
        self.stage_seconds[stage] = round(now - self._clock, 3)
        self._clock = now

    def fail(self, path: str, reason: str, detail: str):
        self.failure_reasons[reason] += 1
        if len(self.failures) < MAX_FAILURES_LISTED:
            self.failures.append({"path": path, "reason": reason, "detail": detail})

    def count_line(self, split: str, line: str):
        tokens = line.split()
        self.docs[split] += 1
        self.tokens[split] += len(tokens) - 2
        for token in tokens:
            if "_LIT" in token:
                match = _LIT.search(token)
                if match:
                    self.literals[match.group(1).lower()]["kept" if match.group(2) else "normalised"] += 1

    def as_dict(self) -> dict:
        return {
            "files_found": self.found,
            "documents": dict(self.docs), "documents_total": sum(self.docs.values()),
            "codexglue_tokens": dict(self.tokens), "model_tokens": dict(self.model_tokens),
            "duplicates_removed": self.duplicates, "empty_removed": self.empty,
            "failures": {"count": sum(self.failure_reasons.values()), "by_reason": dict(self.failure_reasons),
                         "first": self.failures},
            "literals": {k: dict(v) for k, v in self.literals.items()},
            "line_samples": self.line_samples,
            "stage_seconds": self.stage_seconds,
        }


# ------------------------------------------------------------------------------------- the passes


def progress_bar(total, desc, unit, enabled):
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5)


def _file_tasks(source, options, work: Path, stats: Stats, count_literals: bool):
    """Reads files in path order, drops duplicates, yields worker tasks of about CHUNK_BYTES."""
    dedup = Deduplicator()
    items, size, chunk_id = [], 0, 0
    for path, origin in source.refs:
        try:
            data = read_ref(origin)
        except Exception as error:  # OSError, zipfile.BadZipFile, ...: counted, never fatal
            stats.fail(path, "unreadable", getattr(error, "strerror", None) or str(error))
            continue
        if not dedup.first(content_digest(data)):
            stats.duplicates += 1
            continue
        items.append((path, split_of(path, options.split), data))
        size += len(data)
        if size >= CHUNK_BYTES or len(items) >= CHUNK_FILES:
            yield chunk_id, options.lang, str(work), items, count_literals
            items, size, chunk_id = [], 0, chunk_id + 1
    if items:
        yield chunk_id, options.lang, str(work), items, count_literals


def preprocess_files(source, options, work: Path, stats: Stats, counter) -> list[Path]:
    refs = source.refs[: options.max_files] if options.max_files else source.refs
    source.refs = refs
    stats.found = len(refs)
    workers = options.workers or default_workers()
    chunks = []
    bar = progress_bar(len(refs), "preprocess", " files", options.progress)
    tasks = _file_tasks(source, options, work, stats, counter is not None)
    processed = shown = 0
    try:
        for chunk_id, results, counts in _ordered_pool_map(preprocess_chunk, tasks, workers):
            chunks.append(work / f"chunk-{chunk_id:07d}.pkl")
            for path, _split, status, reason, detail, _n in results:
                if status == "failed":
                    stats.fail(path, reason, detail)
                elif status == "empty":
                    stats.empty += 1
                else:
                    stats.spilled += 1
            if counter is not None:
                counter.update(counts)
            processed += len(results)
            seen = processed + stats.duplicates + stats.failure_reasons["unreadable"]
            bar.update(seen - shown)
            shown = seen
    finally:
        bar.close()
    return chunks


def preprocess_lines(source, options, work: Path, stats: Stats, counter) -> list[Path]:
    """CodeXGLUE lines: dedup (test first, so official test documents stay), carve missing splits from train."""
    missing = [s for s in SPLITS if s not in source.splits]
    dedup = Deduplicator()
    chunks, spilled, chunk_id = [], [], 0
    bar = progress_bar(None, "read", " docs", options.progress)

    def flush():
        nonlocal spilled, chunk_id
        path = work / f"chunk-{chunk_id:07d}.pkl"
        with open(path, "wb") as f:
            pickle.dump(spilled, f, protocol=pickle.HIGHEST_PROTOCOL)
        chunks.append(path)
        spilled, chunk_id = [], chunk_id + 1

    try:
        for given in ("test", "dev", "train"):
            if given not in source.splits:
                continue
            for record_path, line in source.splits[given]():
                if options.max_files and stats.found >= options.max_files:
                    break
                stats.found += 1
                bar.update(1)
                if line == "<s> </s>":
                    stats.empty += 1
                    continue
                if not dedup.first(content_digest(line.encode("utf-8"))):
                    stats.duplicates += 1
                    continue
                split = given
                if given == "train" and missing:
                    carved = split_of(line, options.split)
                    split = carved if carved in missing else "train"
                if counter is not None and split == "train":
                    counter.update(_whitelisted_in_line(line))
                spilled.append((record_path, split, line, ""))
                stats.spilled += 1
                if len(spilled) >= CHUNK_FILES:
                    flush()
        if spilled:
            flush()
    finally:
        bar.close()
    return chunks


_QUOTE = "(?:'''|\"\"\"|'|\")"
_KEPT = re.compile(f"[A-Za-z]*{_QUOTE}?<(STR|NUM|CHAR)_LIT:(.*)>{_QUOTE}?")


def _whitelisted_in_line(line: str) -> dict:
    """The literal values a CodeXGLUE line keeps (`<STR_LIT:v>` …): its source's whitelist, observed."""
    counts = {"str": Counter(), "num": Counter(), "char": Counter()}
    for token in line.split():
        if "_LIT:" in token:
            match = _KEPT.fullmatch(token)
            if match:
                counts[match.group(1).lower()][match.group(2)] += 1
    return counts


def iter_chunks(chunks):
    for chunk in chunks:
        with open(chunk, "rb") as f:
            yield from pickle.load(f)
