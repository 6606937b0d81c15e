"""CodeXGLUE py150 token-level preprocessing of one Python file.

The rules (docs/data.md, CodeXGLUE `dataset/py150/preprocess.py`): tokens from the
standard `tokenize` module, each token's whitespace collapsed; strings and numbers become
literal placeholders; NEWLINE / NL become `<EOL>` with runs collapsed and none at either
end; comments, INDENT / DEDENT, ENCODING and ENDMARKER (and any empty token) dropped; the
file becomes one line `<s> … </s>`. A file that does not tokenise is reported as a failure
(CodeXGLUE writes it as `<s> </s>`).

Python 3.12 (PEP 701) splits an f-string into FSTRING_START, FSTRING_MIDDLE, replacement
field tokens and FSTRING_END (3.14 does the same for t-strings). `merge_fstrings` joins each
of them, nested ones included, back into the one STRING token that earlier Pythons produce,
taking its text from the source between the start and end positions, so every Python
version gives the same lines.

Differences from the upstream script, on purpose: the file is decoded with its PEP 263
coding declaration (upstream decodes as UTF-8 whatever the file says), and a string
prefix keeps its quotes whatever its case (see `literals`).
"""

from __future__ import annotations

import io
import tokenize
from typing import Iterable, Iterator, Sequence

from greencode_jax.data.literals import RawToken, num_lit, split_string_literal

_START = {"FSTRING_START": "FSTRING_END", "TSTRING_START": "TSTRING_END"}
_END = set(_START.values())
_DROPPED = {"COMMENT", "INDENT", "DEDENT", "ENCODING", "ENDMARKER", "TYPE_COMMENT"}
_NAMES = tokenize.tok_name
_SPLITS_FSTRINGS = hasattr(tokenize, "FSTRING_START")  # Python >= 3.12


class PreprocessError(Exception):
    """A file that cannot be preprocessed; `reason` is a short category for the stats."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# A token as (type, string, (row, col) start, (row, col) end); the type is the running Python's
# number (a `tokenize.TokenInfo`) or its name. Names carry across versions (token numbers differ
# between Pythons), so a recorded 3.12 stream can be read on 3.11.
Token = tuple


def decode_python(source: bytes) -> str:
    """Bytes -> text, honouring a BOM or PEP 263 coding declaration; newlines normalised to \\n."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(source).readline)
    except SyntaxError as error:
        raise PreprocessError("undecodable", f"bad coding declaration ({error})") from None
    try:
        text = source.decode(encoding)
    except (UnicodeDecodeError, LookupError) as error:
        raise PreprocessError("undecodable", f"not valid {encoding} ({error})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    # Upstream reads with universal newlines: \r\n and lone \r both become \n.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _slice(lines: Sequence[str], start, end) -> str:
    (r0, c0), (r1, c1) = start, end
    if r0 == r1:
        return lines[r0 - 1][c0:c1]
    return lines[r0 - 1][c0:] + "".join(lines[r0:r1 - 1]) + lines[r1 - 1][:c1]


def merge_fstrings(tokens: Iterable[Token], lines: Sequence[str]) -> Iterator[Token]:
    """Joins each FSTRING_START … FSTRING_END run (nesting included) into one STRING token.

    `lines` are the source lines (with their newlines) the positions refer to. Token types
    may be names or the running Python's numbers (`tokenize.TokenInfo`).
    """
    depth = 0
    start = None
    for tok in tokens:
        kind = tok[0]
        if kind.__class__ is int:
            kind = _NAMES[kind]
        if depth == 0:
            if kind in _START:
                depth, start = 1, tok[2]
            else:
                yield tok
            continue
        if kind in _START:
            depth += 1
        elif kind in _END:
            depth -= 1
            if depth == 0:
                yield "STRING", _slice(lines, start, tok[3]), start, tok[3]
    if depth:
        raise PreprocessError("tokenize", "f-string not terminated")


def raw_tokens(tokens: Iterable[Token]) -> list[RawToken]:
    """A (merged) token stream -> CodeXGLUE raw tokens (literals still carry their values)."""
    out: list[RawToken] = []
    append = out.append
    prev_eol = False
    for tok in tokens:
        kind, value = tok[0], tok[1]
        if kind.__class__ is int:
            kind = _NAMES[kind]
        if kind == "NAME" or kind == "OP":  # never hold whitespace
            append(value)
            prev_eol = False
        elif kind == "STRING":
            append(split_string_literal(" ".join(value.split())))
            prev_eol = False
        elif kind == "NUMBER":
            append(num_lit(value))
            prev_eol = False
        elif kind == "NEWLINE" or kind == "NL":
            if not prev_eol:
                append("<EOL>")
                prev_eol = True
        elif kind not in _DROPPED:
            value = " ".join(value.split())  # ERRORTOKEN and the like: kept unless blank, as upstream
            if value:
                append(value)
                prev_eol = False
    if out and out[0] == "<EOL>":
        out = out[1:]
    if out and out[-1] == "<EOL>":
        out = out[:-1]
    return out


def python_raw_tokens_from_stream(tokens: Iterable[Token], text: str) -> list[RawToken]:
    """Raw tokens from any Python version's token stream over `text` (merging f-strings)."""
    return _guarded(lambda: raw_tokens(merge_fstrings(tokens, io.StringIO(text).readlines())))


def python_raw_tokens(source: bytes) -> list[RawToken]:
    """One Python file's bytes -> raw tokens; raises PreprocessError if it cannot be decoded or tokenised."""
    return python_raw_tokens_from_text(decode_python(source))


def python_raw_tokens_from_text(text: str) -> list[RawToken]:
    """Decoded source (see `decode_python`) -> raw tokens with the running Python's tokenizer."""
    stream = tokenize.generate_tokens(io.StringIO(text).readline)
    if _SPLITS_FSTRINGS:
        return _guarded(lambda: raw_tokens(merge_fstrings(stream, io.StringIO(text).readlines())))
    return _guarded(lambda: raw_tokens(stream))


def _guarded(run):
    try:
        return run()
    except PreprocessError:
        raise
    except (tokenize.TokenError, SyntaxError) as error:  # IndentationError is a SyntaxError
        raise PreprocessError("tokenize", f"{type(error).__name__}: {error}") from None
