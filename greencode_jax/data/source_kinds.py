"""The three kinds of source `resolve_source` returns, and the checks of CodeXGLUE's two formats
that every reader of them applies."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

from greencode_jax.errors import GreencodeError

_SPLIT_NAMES = {"train": "train", "validation": "dev", "valid": "dev", "dev": "dev", "test": "test"}


@dataclasses.dataclass
class FileSource:
    """Files to preprocess. `refs` are (path relative to the source, origin), sorted by path;
    an origin is ("fs", absolute path) or ("zip", zip path, member name)."""

    description: str
    lang: str
    refs: list
    unreadable_dirs: list = dataclasses.field(default_factory=list)
    kind: str = "files"


@dataclasses.dataclass
class LinesSource:
    """CodeXGLUE token-level lines; `splits` maps train/dev/test to a function yielding (record path, line)."""

    description: str
    lang: str
    splits: dict
    kind: str = "lines"


@dataclasses.dataclass
class LineLevelSource:
    """CodeXGLUE line-level samples; `samples()` yields dicts with int `id`, str `input` and `gt`."""

    description: str
    lang: str
    samples: Callable[[], Iterator[dict]]
    kind: str = "line_level"


def check_codexglue_line(line: str, where: str) -> str:
    """A token-level line, whitespace normalised; GreencodeError naming `where` if it is not `<s> … </s>`."""
    tokens = line.split()
    if len(tokens) < 2 or tokens[0] != "<s>" or tokens[-1] != "</s>":
        shown = line.strip()
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise GreencodeError(f"{where}: expected a CodeXGLUE token-level line '<s> … </s>', got {shown!r}")
    return " ".join(tokens)


def check_line_sample(obj, where: str, fallback_id: int) -> dict:
    if not isinstance(obj, dict) or not isinstance(obj.get("input"), str) or not isinstance(obj.get("gt"), str):
        raise GreencodeError(f"{where}: expected a JSON object with string fields 'input' and 'gt' "
                             "(CodeXGLUE line-level format)")
    sample_id = obj.get("id", fallback_id)
    if isinstance(sample_id, str) and sample_id.isdigit():
        sample_id = int(sample_id)
    if not isinstance(sample_id, int) or isinstance(sample_id, bool):
        raise GreencodeError(f"{where}: field 'id' must be an integer, got {sample_id!r}")
    return {"id": sample_id, "input": " ".join(obj["input"].split()), "gt": " ".join(obj["gt"].split())}
