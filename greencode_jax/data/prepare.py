"""`prepare_data`: a source -> the prepared corpus directory (`greencode prepare-data`).

Passes, each in memory that does not grow with the corpus (the duplicate-digest set grows
by ~100 bytes per file, the literal counter up to its fixed capacity; every buffer is
bounded in documents and bytes):
1. preprocess: the main process reads each file, drops exact duplicates (by content
   digest) and assigns the split by path; worker processes tokenise chunks of files,
   spill their raw tokens to a work directory and count literals in training files;
2. whitelist: the user's `literals.json`, or the most frequent literals of the train split;
3. write: raw tokens -> CodeXGLUE lines -> the TFDS ArrayRecord corpus, stats, line-level
   samples from the test split;
4. tokenizer: the model's own, or a byte-level BPE trained on (a sample of) the train split;
5. encode: every split to memory-mappable token files.

The output appears only when every pass has succeeded (`atomic_directory`). Output:
`prepare.json` (what was prepared, how), `stats.json`, `literals.json`, `tfds/`,
`tokenizer/` and `tokens/` (unless --tokenizer none).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from greencode_jax.atomic import atomic_directory
from greencode_jax.data.corpus import TFDS_DIR, CorpusWriter, line_dataset_name, token_dataset_name
from greencode_jax.data.literals import LiteralCounter, load_literals, render_line
from greencode_jax.data.packing import TokenWriter, token_dtype, write_meta
from greencode_jax.data.preprocess import (MAX_FAILURES_LISTED, Stats, iter_chunks, preprocess_files,
                                           preprocess_lines, progress_bar)
from greencode_jax.data.samples import line_rng, line_sample
from greencode_jax.data.sources import resolve_source
from greencode_jax.data.split import unit_hash
from greencode_jax.data.tokenizer import load_hf_tokenizer, train_bpe
from greencode_jax.errors import GreencodeError
from greencode_jax.locks import output_lock
from greencode_jax.ownership import check_output_dir

FORMAT = "greencode-prepared-data"
FORMAT_VERSION = 1
ENCODE_BATCH = 256  # documents per tokenizer call, and at most
ENCODE_BYTES = 1 << 20  # this much text (the tokenizer's per-token records dwarf the text)


@dataclasses.dataclass
class PrepareOptions:
    lang: str
    out: str
    source: str | None = None  # None: stdlib (python) or jdk (java)
    literals: str | None = None  # a CodeXGLUE literals.json; None: built from the train split
    split: tuple = (0.8, 0.1, 0.1)
    seed: int = 0
    workers: int = 0  # 0: one per CPU core (at most 8); 1: in this process
    tokenizer: str = "bpe"  # "bpe", "none", or a Hugging Face model directory
    vocab_size: int = 8192
    view: str = "codexglue"  # what the model sees: "codexglue" (space-joined tokens) or "raw" (source text)
    line_samples: int = 1000
    max_files: int | None = None
    bpe_sample_mb: float = 8.0
    tfds_data_dir: str | None = None
    overwrite: bool = False
    progress: bool = True


def shown_text(line: str, source_text: str, view: str) -> str:
    """What the model sees of one document: the CodeXGLUE tokens between <s> and </s>, space-joined
    (GREEN-CODE's `' '.join(code[1:-1])`), or the raw source."""
    if view == "raw":
        return source_text
    return line[4:-5] if len(line) > 9 else ""


def _no_documents_error(source, stats: Stats) -> GreencodeError:
    parts = [f"{stats.found} found"]
    if stats.duplicates:
        parts.append(f"{stats.duplicates} duplicates")
    if stats.empty:
        parts.append(f"{stats.empty} empty")
    for reason, count in stats.failure_reasons.items():
        parts.append(f"{count} {reason}")
    first = "; first: " + ", ".join(f"{f['path']} ({f['reason']}: {f['detail']})" for f in stats.failures[:3]) \
        if stats.failures else ""
    return GreencodeError(f"{source.description}: no usable documents ({', '.join(parts)}){first}; "
                          "provide readable, decodable source files")


def _write_corpus(chunks, source, options, literals, tfds_dir: Path, work: Path, stats: Stats, line_writer):
    """Pass 3: CodeXGLUE lines into the TFDS corpus; shown texts spilled per split for the tokenizer."""
    writer = CorpusWriter(tfds_dir, token_dataset_name(options.lang), "token",
                          f"CodeXGLUE token-level {options.lang} corpus from {source.description}")
    shown_files = {}
    shown_buffers = {}
    buffered = Counter()
    shown_bytes = Counter()
    rng = line_rng(options.seed)  # the same cuts as samples.line_samples over the test split
    test_index = 0
    bar = progress_bar(stats.spilled, "write", " docs", options.progress)
    try:
        for path, split, payload, text in iter_chunks(chunks):
            line = payload if isinstance(payload, str) else render_line(payload, literals)
            writer.add(split, {"path": path, "code": line, "source": text})
            stats.count_line(split, line)
            shown = shown_text(line, text, options.view)
            shown_bytes[split] += len(shown)
            buffer = shown_buffers.setdefault(split, [])
            buffer.append((path, shown))
            buffered[split] += len(shown)
            if len(buffer) >= ENCODE_BATCH or buffered[split] >= ENCODE_BYTES:
                if split not in shown_files:
                    shown_files[split] = open(work / f"shown-{split}.pkl", "wb")
                pickle.dump(buffer, shown_files[split], protocol=pickle.HIGHEST_PROTOCOL)
                shown_buffers[split] = []
                buffered[split] = 0
            if split == "test":
                if line_writer is not None and stats.line_samples < options.line_samples:
                    sample = line_sample(line, options.lang, rng, test_index)
                    if sample is not None:
                        line_writer.add("test", sample)
                        stats.line_samples += 1
                test_index += 1
            bar.update(1)
        for split, buffer in shown_buffers.items():
            if split not in shown_files:
                shown_files[split] = open(work / f"shown-{split}.pkl", "wb")
            if buffer:
                pickle.dump(buffer, shown_files[split], protocol=pickle.HIGHEST_PROTOCOL)
        writer.close()  # on an error the half-written dataset goes with the temporary output
    finally:
        bar.close()
        for f in shown_files.values():
            f.close()
    return {split: work / f"shown-{split}.pkl" for split in shown_files}, shown_bytes


def _iter_shown(path: Path):
    with open(path, "rb") as f:
        while True:
            try:
                yield from pickle.load(f)
            except EOFError:
                return


def _make_tokenizer(options, literals, shown, shown_bytes, placeholders: bool):
    if options.tokenizer != "bpe":
        return load_hf_tokenizer(options.tokenizer)
    if "train" not in shown or not shown_bytes["train"]:
        raise GreencodeError("--tokenizer bpe: the train split is empty, nothing to train a BPE on; pass "
                             "--tokenizer MODEL_DIR (a Hugging Face model's tokenizer) or --tokenizer none")
    keep = min(1.0, options.bpe_sample_mb * 1e6 / shown_bytes["train"])
    if options.progress:
        print(f"training a byte-level BPE (vocab {options.vocab_size}) on "
              f"{min(shown_bytes['train'], options.bpe_sample_mb * 1e6) / 1e6:.1f} MB of train text", file=sys.stderr)
    texts = (text for path, text in _iter_shown(shown["train"]) if keep >= 1.0 or unit_hash("bpe:" + path) < keep)
    specials = literals.placeholder_tokens() if placeholders else []
    return train_bpe(texts, options.vocab_size, specials)


def _encode(tokenizer, shown, tokens_dir: Path, stats: Stats, progress: bool) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {}
    bar = progress_bar(sum(stats.docs.values()), "encode", " docs", progress)
    try:
        for split, path in shown.items():
            writer = TokenWriter(tokens_dir, split, dtype)
            batch, size = [], 0
            for _, text in _iter_shown(path):
                batch.append(text)
                size += len(text)
                if len(batch) >= ENCODE_BATCH or size >= ENCODE_BYTES:
                    for ids in tokenizer.encode_docs(batch):
                        writer.add(ids)
                    bar.update(len(batch))
                    batch, size = [], 0
            if batch:
                for ids in tokenizer.encode_docs(batch):
                    writer.add(ids)
                bar.update(len(batch))
            splits[split] = writer.close()
            stats.model_tokens[split] = splits[split]["tokens"]
    finally:
        bar.close()
    write_meta(tokens_dir, dtype, splits)
    return splits


def _validate(options: PrepareOptions):
    if options.view not in ("codexglue", "raw"):
        raise GreencodeError(f"--view {options.view!r}: expected codexglue or raw")
    if options.vocab_size <= 0 or options.line_samples < 0 or options.bpe_sample_mb <= 0:
        raise GreencodeError("--vocab-size and --bpe-sample-mb must be positive and --line-samples non-negative")
    if options.max_files is not None and options.max_files <= 0:
        raise GreencodeError("--max-files must be positive")
    if options.workers < 0:
        raise GreencodeError("--workers must be 0 (one per core) or more")


def _keep_first_files(source, count: int):
    """Cuts a file source to its first `count` files (path order), its description saying so:
    "...: 200 of 1790 .py files under ..." rather than the count found."""
    total = len(source.refs)
    source.refs = source.refs[:count]
    described, found = re.subn(rf"\b{total} (\.\w+ files)", rf"{count} of {total} \1", source.description, count=1)
    source.description = described if found else f"{source.description} (the first {count} of {total} files)"


def prepare_data(options: PrepareOptions) -> dict:
    """Prepares the corpus; returns the summary written to prepare.json (with the stats under 'stats')."""
    started = time.perf_counter()
    _validate(options)
    out = Path(options.out)
    inputs = {"source": options.source, "literals": options.literals, "tfds_data_dir": options.tfds_data_dir,
              "tokenizer": None if options.tokenizer in ("bpe", "none") else options.tokenizer}
    check_output_dir(out, "corpus", inputs=inputs, overwrite=options.overwrite)
    with output_lock(out):
        return _prepare(options, out, inputs, started)


def _prepare(options: PrepareOptions, out: Path, inputs: dict, started: float) -> dict:
    source, user_literals = _checked_source(options)
    stats = Stats()
    if options.progress:
        print(f"prepare-data: {options.lang} from {source.description}", file=sys.stderr)
    with atomic_directory(out, overwrite=options.overwrite, kind="corpus", inputs=inputs) as tmp:
        work = tmp / ".work"
        work.mkdir()
        summary = {"format": FORMAT, "format_version": FORMAT_VERSION, "lang": options.lang,
                   "source": source.description, "source_spec": options.source or
                   ("stdlib" if options.lang == "python" else "jdk"), "view": options.view,
                   "python": sys.version.split()[0], "split_ratios": list(options.split), "seed": options.seed,
                   "datasets": {}, "tokenizer": None}
        if source.kind == "line_level":
            _copy_line_samples(source, options, tmp / TFDS_DIR, stats, summary)
        else:
            shown, shown_bytes, literals = _write_token_corpus(source, options, user_literals, tmp, work, stats,
                                                               summary)
            if options.tokenizer != "none":
                _tokenize(options, literals, shown, shown_bytes, tmp, stats, summary)
        shutil.rmtree(work)
        stats_dict = _write_stats(tmp, stats, source, started)
        _write_summary(tmp, summary, stats, source, options)
    summary["stats"] = stats_dict
    summary["out"] = str(out)
    return summary


def _checked_source(options: PrepareOptions):
    """The source (cut to --max-files) and the user's literals (None without), with the checks that need
    the source, all before anything is written."""
    source = resolve_source(options.source, options.lang, options.tfds_data_dir)
    if source.kind == "files" and options.max_files and options.max_files < len(source.refs):
        _keep_first_files(source, options.max_files)
    if options.view == "raw" and source.kind != "files":
        raise GreencodeError(f"--view raw needs source files, but {source.description} holds CodeXGLUE tokens "
                             "only; use --view codexglue")
    user_literals = load_literals(options.literals) if options.literals else None
    if options.tokenizer not in ("bpe", "none") and not Path(options.tokenizer).is_dir():
        raise GreencodeError(f"--tokenizer {options.tokenizer}: no such directory; pass bpe, none, or a Hugging "
                             "Face model directory")
    return source, user_literals


def _copy_line_samples(source, options: PrepareOptions, tfds_dir: Path, stats: Stats, summary: dict):
    """A line-level source: its samples, as they are, into the TFDS line dataset (no token corpus)."""
    line_writer = CorpusWriter(tfds_dir, line_dataset_name(options.lang), "line",
                               f"CodeXGLUE line-level {options.lang} samples from {source.description}")
    for sample in source.samples():
        line_writer.add("test", sample)
        stats.line_samples += 1
    line_writer.close()
    if not stats.line_samples:
        raise GreencodeError(f"{source.description}: no samples found; expected JSON lines with 'input' "
                             "and 'gt'")
    summary["datasets"]["line"] = line_dataset_name(options.lang)
    summary["literals"] = None


def _write_token_corpus(source, options: PrepareOptions, user_literals, tmp: Path, work: Path, stats: Stats,
                        summary: dict):
    """Passes 1 to 3 (preprocess, whitelist, write): the token corpus, its literals.json and the line samples
    cut from its test split. Returns (the shown texts' spill files by split, their bytes by split, literals)."""
    tfds_dir = tmp / TFDS_DIR
    counter = None if user_literals else LiteralCounter()
    if source.kind == "files":
        chunks = preprocess_files(source, options, work, stats, counter)
    else:
        chunks = preprocess_lines(source, options, work, stats, counter)
    stats.lap("preprocess")
    if not stats.spilled:
        raise _no_documents_error(source, stats)
    literals = user_literals or counter.whitelist(java=options.lang == "java")
    (tmp / "literals.json").write_text(literals.to_json())
    summary["literals"] = options.literals or "built from the train split"
    line_writer = (CorpusWriter(tfds_dir, line_dataset_name(options.lang), "line",
                                f"CodeXGLUE line-level {options.lang} samples cut from the test split")
                   if options.line_samples else None)
    shown, shown_bytes = _write_corpus(chunks, source, options, literals, tfds_dir, work, stats, line_writer)
    if line_writer is not None:
        line_writer.close()
    stats.lap("write")
    summary["datasets"]["token"] = token_dataset_name(options.lang)
    if stats.line_samples:
        summary["datasets"]["line"] = line_dataset_name(options.lang)
    return shown, shown_bytes, literals


def _tokenize(options: PrepareOptions, literals, shown, shown_bytes, tmp: Path, stats: Stats, summary: dict):
    """Passes 4 and 5 (tokenizer, encode): the tokenizer saved, every split encoded to token files."""
    tokenizer = _make_tokenizer(options, literals, shown, shown_bytes, options.view == "codexglue")
    tokenizer.save(tmp / "tokenizer")
    stats.lap("tokenizer")
    _encode(tokenizer, shown, tmp / "tokens", stats, options.progress)
    stats.lap("encode")
    summary["tokenizer"] = {"kind": tokenizer.kind, "name": tokenizer.name,
                            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                            "fingerprint": tokenizer.fingerprint()}


def _write_stats(tmp: Path, stats: Stats, source, started: float) -> dict:
    """stats.json (with the seconds since `started`); returns what it holds."""
    seconds = time.perf_counter() - started
    stats_dict = stats.as_dict()
    stats_dict["seconds"] = round(seconds, 3)
    if source.kind == "files" and source.unreadable_dirs:
        stats_dict["unreadable_directories"] = source.unreadable_dirs[:MAX_FAILURES_LISTED]
    (tmp / "stats.json").write_text(json.dumps(stats_dict, indent=2, ensure_ascii=False) + "\n")
    return stats_dict


def _write_summary(tmp: Path, summary: dict, stats: Stats, source, options: PrepareOptions):
    """prepare.json: the summary completed with the documents, line samples and warnings (empty splits,
    also printed)."""
    summary["documents"] = dict(stats.docs)
    summary["line_samples"] = stats.line_samples
    if source.kind != "line_level":
        empty = [split for split in ("train", "dev", "test") if not stats.docs.get(split)]
        summary["warnings"] = [f"the {split} split is empty (split ratios {','.join(map(str, options.split))})"
                               for split in empty]
        for warning in summary["warnings"]:
            print(f"prepare-data: warning: {warning}", file=sys.stderr)
    (tmp / "prepare.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
