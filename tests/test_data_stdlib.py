"""The running Python's real standard library as the corpus.

Each record is checked against an independent reading of its file with the `tokenize`
module: the CodeXGLUE line must hold exactly the file's NAME / OP tokens in order, and one
literal placeholder per STRING / NUMBER token.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tokenize
from pathlib import Path

import pytest

from greencode_jax.data import PreparedData, PrepareOptions, prepare_data
from greencode_jax.data.corpus import decode_record
from greencode_jax.data.sources import stdlib_root

# The reference reading counts an f-string as one STRING token, as Python <= 3.11 tokenizes it.
REFERENCE = sys.version_info < (3, 12)


QUOTE = "(?:'''|\"\"\"|'|\")"
PLACEHOLDER = re.compile(f"[A-Za-z]*{QUOTE}?<(?:STR|NUM|CHAR)_LIT(?::.*)?>{QUOTE}?")


def reference_tokens(path: Path):
    """(NAME/OP token strings, number of STRING+NUMBER tokens) straight from `tokenize`, or None if it fails."""
    try:
        toks = list(tokenize.tokenize(io.BytesIO(path.read_bytes()).readline))
    except (SyntaxError, tokenize.TokenError, UnicodeDecodeError):
        return None
    words = [t.string for t in toks if t.type in (tokenize.NAME, tokenize.OP)
             or (t.type == tokenize.ERRORTOKEN and t.string.strip())]
    literals = sum(t.type in (tokenize.STRING, tokenize.NUMBER) for t in toks)
    return words, literals


def check_records(out: Path):
    data = PreparedData(out)
    root = stdlib_root()
    checked = 0
    for split in ("train", "dev", "test"):
        source = data.records(split)
        for i in range(len(source)):
            record = decode_record(source[i])
            tokens = record["code"].split()
            assert tokens[0] == "<s>" and tokens[-1] == "</s>" and "<s>" not in tokens[1:]
            checked += 1
            if not REFERENCE:
                continue
            words, literals = reference_tokens(root / record["path"])
            body = tokens[1:-1]
            assert [t for t in body if t != "<EOL>" and not PLACEHOLDER.fullmatch(t)] == words, record["path"]
            assert sum(bool(PLACEHOLDER.fullmatch(t)) for t in body) == literals, record["path"]
    return checked


def test_stdlib_subset_with_parallel_workers(tmp_path):
    out = tmp_path / "out"
    summary = prepare_data(PrepareOptions(lang="python", out=str(out), max_files=40, workers=2, vocab_size=2000,
                                          progress=False))
    assert summary["source"].startswith(f"the standard library of Python {sys.version.split()[0]}")
    stats = summary["stats"]
    assert stats["files_found"] == 40
    assert (stats["documents_total"] + stats["duplicates_removed"] + stats["empty_removed"]
            + stats["failures"]["count"]) == 40
    assert check_records(out) == stats["documents_total"]
    data = PreparedData(out)
    assert sum(len(data.tokens(s)) for s in data.manifest["documents"]) == stats["documents_total"]


@pytest.mark.slow
def test_whole_stdlib(tmp_path):
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py")
                   if not any(part in ("site-packages", "dist-packages", "__pycache__") or part.startswith(".")
                              for part in p.relative_to(root).parts[:-1]))
    out = tmp_path / "out"
    summary = prepare_data(PrepareOptions(lang="python", out=str(out), progress=False))
    stats = summary["stats"]
    assert stats["files_found"] == len(files) > 1000
    if REFERENCE:
        failing = sorted(p.relative_to(root).as_posix() for p in files if reference_tokens(p) is None)
        assert sorted(f["path"] for f in stats["failures"]["first"]) == failing
    assert (stats["documents_total"] + stats["duplicates_removed"] + stats["empty_removed"]
            + stats["failures"]["count"]) == len(files)
    assert check_records(out) == stats["documents_total"]
    assert json.loads((out / "prepare.json").read_text())["python"] == sys.version.split()[0]
