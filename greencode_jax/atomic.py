"""Atomic outputs: write to a temporary sibling, then rename into place.

A command that fails, or is interrupted, leaves no half-written output behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from greencode_jax.errors import GreencodeError


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False):
    """Yields a temporary directory beside `out`; renames it to `out` when the block succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise GreencodeError(f"{out}: already exists; choose another output path or pass --overwrite")
    if not out.parent.exists():
        raise GreencodeError(f"{out.parent}: output's parent directory does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _usual_permissions(tmp, directory=True)  # mkdtemp makes it owner-only
        if out.exists():  # overwrite: move the old one aside first, so a crash never loses both
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _usual_permissions(path: Path, directory: bool):
    """What a plain mkdir / open would have given under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def atomic_write_text(path: str | Path, text: str):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _usual_permissions(Path(tmp), directory=False)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def resumable_directory(out: str | Path, settings: dict, what: str) -> tuple[Path, bool]:
    """The work directory OUT.partial of a long job that renames it to OUT when done: created
    with `settings.json`, or reused when an interrupted run left it with the same settings
    (refused otherwise). Returns (path, resumed)."""
    import json

    work = Path(out).with_name(Path(out).name + ".partial")
    settings = json.loads(json.dumps(settings))  # as read back: tuples become lists
    if work.exists():
        try:
            previous = json.loads((work / "settings.json").read_text())
        except (OSError, ValueError):
            previous = None
        if previous != settings:
            raise GreencodeError(f"{work}: an interrupted {what} with other settings (or another model); delete it, "
                                 "or rerun with the same arguments to resume it")
        return work, True
    work.mkdir(parents=True)
    atomic_write_text(work / "settings.json", json.dumps(settings, indent=2) + "\n")
    return work, False
