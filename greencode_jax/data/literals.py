"""CodeXGLUE literal normalisation and the whitelist of frequent literals (`literals.json`).

CodeXGLUE replaces every string, character and number literal by a placeholder
(`<STR_LIT>`, `<CHAR_LIT>`, `<NUM_LIT>`) unless the literal is one of the most frequent
ones in the training split, which keep their value (`<STR_LIT:utf-8>`, `<NUM_LIT:0>`).
Inside a kept string literal, spaces and commas are written `U+0020` and `U+002C` so a
literal stays one whitespace-free token.

The whitelist file has CodeXGLUE's format: `{"str": [...], "num": [...], "char": [...],
"regex": []}`, values as they appear inside the placeholder (after the U+ escapes).
CodeXGLUE's own files keep 200 strings, 30 numbers and (Java) 30 characters; a whitelist
built here from a training split keeps the same counts.

Preprocessing first produces *raw* tokens, where a literal is a small tuple that still
carries its value (see `RawToken`); `render` turns raw tokens into the final
CodeXGLUE tokens once the whitelist is known. That split lets the whitelist be counted
on the training split and applied to every split without tokenising twice.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Union

from greencode_jax.atomic import atomic_write_text
from greencode_jax.errors import GreencodeError

SPECIAL_CHARS = {" ": "U+0020", ",": "U+002C"}
QUOTES = ("'''", '"""', "'", '"')
# CodeXGLUE's process_string matches the prefix with ^[a-z]+, so an upper-case prefix (R"..",
# B"..", F"..") loses its quotes there. docs/data.md describes the output as
# prefix + quote + <STR_LIT> + quote, which we follow for prefixes of either case.
_PREFIX = re.compile(r"[A-Za-z]+")

# How many of each kind CodeXGLUE's literals.json files keep.
TOP_STR, TOP_NUM, TOP_CHAR = 200, 30, 30

# Placeholder tokens every tokenizer must keep whole.
PLACEHOLDERS = ("<EOL>", "<STR_LIT>", "<NUM_LIT>", "<CHAR_LIT>")


# Raw literal tokens are plain tuples (they are pickled between processes by the million):
#   ("s", prefix, open_quote, body, close_quote)   a string literal; body has the U+ escapes
#   ("c", prefix, open_quote, body, close_quote)   Java: one character in single quotes
#   ("n", value)                                   a number
# Every other token is a str.
RawToken = Union[str, tuple]


def num_lit(value: str) -> tuple:
    return ("n", value)


def split_string_literal(token: str, java: bool = False) -> tuple:
    """Splits a string literal as CodeXGLUE's `process_string` does (prefix, quotes, escaped body)."""
    match = _PREFIX.match(token)
    prefix = match.group(0) if match else ""
    rest = token[len(prefix):]
    open_quote = close_quote = ""
    body = rest
    for quote in QUOTES:
        if rest.startswith(quote):
            open_quote = quote
            body = body[len(quote):]
            if rest.endswith(quote):
                close_quote = quote
                body = body[: -len(quote)]
            break
    char = java and len(body) == 1 and open_quote == "'"  # decided before the U+ escapes, as upstream
    for plain, escaped in SPECIAL_CHARS.items():
        body = body.replace(plain, escaped)
    return ("c" if char else "s", prefix, open_quote, body, close_quote)


@dataclasses.dataclass(frozen=True)
class Literals:
    """The whitelist: literal values kept verbatim inside their placeholder."""

    str: frozenset = frozenset()
    num: frozenset = frozenset()
    char: frozenset = frozenset()
    # The lists as written (frequency order), kept for saving and for tokenizer special tokens.
    str_list: tuple = ()
    num_list: tuple = ()
    char_list: tuple = ()

    @classmethod
    def from_lists(cls, str_values=(), num_values=(), char_values=()) -> "Literals":
        return cls(frozenset(str_values), frozenset(num_values), frozenset(char_values),
                   tuple(str_values), tuple(num_values), tuple(char_values))

    def to_json(self) -> str:
        return json.dumps({"str": list(self.str_list), "num": list(self.num_list), "char": list(self.char_list),
                           "regex": []}, ensure_ascii=False) + "\n"

    def save(self, path: str | Path):
        atomic_write_text(path, self.to_json())

    def placeholder_tokens(self) -> list[str]:
        """Every placeholder this whitelist can produce, as CodeGPT registers them as special tokens."""
        tokens = list(PLACEHOLDERS)
        tokens += [f"<STR_LIT:{v}>" for v in self.str_list]
        tokens += [f"<NUM_LIT:{v}>" for v in self.num_list]
        tokens += [f"<CHAR_LIT:{v}>" for v in self.char_list]
        return list(dict.fromkeys(tokens))


def load_literals(path: str | Path) -> Literals:
    """Reads a CodeXGLUE `literals.json`; raises GreencodeError naming the file and field if malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GreencodeError(f"{path}: literals file not found; pass a CodeXGLUE literals.json "
                             "(or leave --literals out to build one from the training split)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GreencodeError(f"{path}: cannot read as a CodeXGLUE literals.json ({error})") from None
    if not isinstance(data, dict):
        raise GreencodeError(f"{path}: expected a JSON object with lists 'str', 'num' and 'char', "
                             f"got {type(data).__name__}")
    lists = {}
    for field in ("str", "num", "char"):
        values = data.get(field, [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise GreencodeError(f"{path}: field {field!r} must be a list of strings")
        lists[field] = values
    if "str" not in data or "num" not in data:
        raise GreencodeError(f"{path}: expected the fields 'str' and 'num' of a CodeXGLUE literals.json")
    return Literals.from_lists(lists["str"], lists["num"], lists["char"])


def render(token: RawToken, literals: Literals) -> str:
    """One raw token -> its CodeXGLUE form under the whitelist."""
    if isinstance(token, str):
        return token
    kind = token[0]
    if kind == "n":
        return f"<NUM_LIT:{token[1]}>" if token[1] in literals.num else "<NUM_LIT>"
    _, prefix, open_quote, body, close_quote = token
    if kind == "c":
        inner = f"<CHAR_LIT:{body}>" if body in literals.char else "<CHAR_LIT>"
    else:
        inner = f"<STR_LIT:{body}>" if body in literals.str else "<STR_LIT>"
    return f"{prefix}{open_quote}{inner}{close_quote}"


def render_line(tokens: Iterable[RawToken], literals: Literals) -> str:
    """Raw tokens of one file -> the CodeXGLUE line `<s> … </s>`."""
    return " ".join(["<s>", *(render(t, literals) for t in tokens), "</s>"])


_KIND = {"s": "str", "c": "char", "n": "num"}


class LiteralCounter:
    """Counts literal values in bounded memory (lossy counting).

    Exact until `capacity` distinct values of a kind have been seen; past that, each prune
    drops the values whose count is at most the number of prunes so far, so a value's count
    is under-estimated by at most that number. The top-200 literals of a code corpus occur
    thousands of times, far above it.
    """

    def __init__(self, capacity: int = 50_000):
        self.capacity = capacity
        self.counts = {"str": Counter(), "num": Counter(), "char": Counter()}
        self.prunes = {"str": 0, "num": 0, "char": 0}

    def add(self, tokens: Iterable[RawToken]):
        """Counts the literals among raw tokens."""
        for token in tokens:
            if not isinstance(token, str):
                kind = _KIND[token[0]]
                self._count(kind, token[1] if kind == "num" else token[3], 1)

    def update(self, counts: dict):
        """Adds counts gathered elsewhere: {"str": Counter, "num": Counter, "char": Counter}."""
        for kind, counter in counts.items():
            for value, count in counter.items():
                self._count(kind, value, count)

    def _count(self, kind: str, value: str, count: int):
        counter = self.counts[kind]
        counter[value] += count
        if len(counter) > self.capacity:
            self.prunes[kind] += 1
            threshold = self.prunes[kind]
            for key in [k for k, c in counter.items() if c <= threshold]:
                del counter[key]

    def whitelist(self, java: bool) -> Literals:
        def top(kind, n):
            # The empty string is left out (CodeXGLUE's lists have none: `<STR_LIT>` already reads as
            # empty), and so is a value holding whitespace (a raw tab in a Java string), which could
            # not stay one token.
            items = [(v, c) for v, c in self.counts[kind].items() if v and not any(ch.isspace() for ch in v)]
            return [v for v, _ in sorted(items, key=lambda vc: (-vc[1], vc[0]))[:n]]

        return Literals.from_lists(top("str", TOP_STR), top("num", TOP_NUM), top("char", TOP_CHAR) if java else [])


_PLACEHOLDER = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def restore_literals(code: str) -> str:
    """CodeXGLUE's line-level post-processing before EM / edit similarity:
    `<NUM_LIT>` -> 0, `<STR_LIT>` and `<CHAR_LIT>` -> empty, `<X_LIT:v>` -> v."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _PLACEHOLDER.sub(lambda m: m.group(2), code)
