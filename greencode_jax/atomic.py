"""Atomic outputs: write to a temporary sibling, then rename into place.

A command that fails, or is interrupted, leaves no half-written output behind. An output's
missing parent directories are created first (`runs/x/final` on a fresh clone), and removed
again, when still empty, if the command fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from greencode_jax.errors import GreencodeError
from greencode_jax.ownership import (
    check_output_dir, check_output_file, check_replaceable_dir, with_record, write_manifest,
)


@contextlib.contextmanager
def output_parents(out: str | Path):
    """Creates `out`'s missing parent directories for the block; removes those it created (when
    empty) if the block fails, so a failed command does not leave `data/` behind either."""
    created = make_parents(out)
    try:
        yield
    except BaseException:
        remove_empty(created)
        raise


def make_parents(out: str | Path) -> list[Path]:
    """Creates the missing parents of `out`; returns the directories created, outermost first."""
    out = Path(out)
    missing = []
    parent = out.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise GreencodeError(f"{parent}: not a directory, so {out} cannot be written under it")
    created = []
    try:
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except FileExistsError:  # made meanwhile by another process
                if not directory.is_dir():
                    raise
                continue
            created.append(directory)
    except OSError as error:
        remove_empty(created)
        raise GreencodeError(f"{error.filename or directory}: cannot create the output's parent directory "
                             f"({error.strerror or error})") from None
    return created


def remove_empty(directories: list[Path]):
    """Removes `directories` (outermost first, as `make_parents` returns them), innermost first,
    each only if empty."""
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            break  # not empty (another output lives there now), or already gone: keep it and its parents


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False, *, kind: str | None = None,
                     inputs: dict | None = None):
    """Yields a temporary directory beside `out`; renames it to `out` when the block succeeds.

    Missing parents of `out` are created, and removed again if the block fails. With a `kind`
    the output gets its ownership manifest (`ownership.py`), and an existing `out` is replaced
    only when its manifest says a greencode-jax command made it as the same kind, and `out` is
    not one of `inputs`."""
    out = Path(out)
    if kind is not None:
        check_output_dir(out, kind, inputs=inputs, overwrite=overwrite)
    elif out.exists() and not overwrite:
        raise GreencodeError(f"{out}: already exists; choose another output path or pass --overwrite")
    with output_parents(out):
        tmp = Path(_temporary(tempfile.mkdtemp, out))
        try:
            yield tmp
            if kind is not None:
                write_manifest(tmp, kind, inputs)
            usual_permissions(tmp, directory=True)  # mkdtemp makes it owner-only
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


def _temporary(make, out: Path):
    """mkdtemp / mkstemp beside `out`, an OSError (permission, read-only disk) as a GreencodeError."""
    try:
        return make(prefix=f".{out.name}.tmp-", dir=out.parent)
    except OSError as error:
        raise GreencodeError(f"{out}: cannot write here ({error.strerror or error})") from None


def usual_permissions(path: str | Path, directory: bool = False):
    """Gives `path` what a plain mkdir / open would have under the current umask (mkstemp and
    some writers, safetensors' among them, make files owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def atomic_write_text(path: str | Path, text: str):
    """Writes `text` to `path` through a temporary sibling; missing parents are created (and
    removed again if the write fails)."""
    _write_through_sibling(path, text, "w")


def atomic_write_bytes(path: str | Path, data: bytes):
    """`atomic_write_text` for bytes (a PNG, say)."""
    _write_through_sibling(path, data, "wb")


def _write_through_sibling(path: str | Path, data, mode: str):
    path = Path(path)
    with output_parents(path):
        fd, tmp = _temporary(tempfile.mkstemp, path)
        try:
            with os.fdopen(fd, mode) as f:
                f.write(data)
            usual_permissions(tmp)  # mkstemp makes it owner-only
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def partial_path(out: str | Path) -> Path:
    """The work directory of a long job that renames it to `out` when done."""
    return Path(out).with_name(Path(out).name + ".partial")


def write_json_output(path: str | Path, data: dict, kind: str, inputs: dict | None = None):
    """A JSON output file (`--out FILE`, `--json FILE`), written atomically with its
    `greencode_output` record; refused when it would replace a directory, an input, or a file
    that is not our output of the same kind (call `check_output_file` before the work, too)."""
    check_output_file(path, kind, inputs=inputs)
    atomic_write_text(path, json.dumps(with_record(data, kind, inputs), indent=2) + "\n")


def resumable_directory(out: str | Path, settings: dict, what: str, *, kind: str, inputs: dict | None = None,
                        overwrite: bool = False) -> tuple[Path, bool]:
    """The work directory OUT.partial of a long job that renames it to OUT when done: created
    (with its missing parents, its `settings.json` and its ownership manifest), or reused when
    an interrupted run left it with the same settings. One with other settings is refused, or,
    with `overwrite`, removed first when its manifest says it is ours. Returns (path, resumed)."""
    work = partial_path(out)
    settings = json.loads(json.dumps(settings))  # as read back: tuples become lists
    if can_resume(out, settings, what, kind=kind, overwrite=overwrite):
        return work, True
    if work.exists() or work.is_symlink():
        shutil.rmtree(work)
    with atomic_directory(work) as tmp:  # with its manifest and settings, or not at all
        write_manifest(tmp, kind, inputs)
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return work, False


def can_resume(out: str | Path, settings: dict, what: str, *, kind: str, overwrite: bool = False) -> bool:
    """Whether `resumable_directory` would resume OUT.partial (True) or start afresh (False), without
    changing anything; raises its refusal of a work directory with other settings."""
    work = partial_path(out)
    if not (work.exists() or work.is_symlink()):
        return False
    if read_settings(work) == json.loads(json.dumps(settings)):
        return True
    if not overwrite:
        raise GreencodeError(f"{work}: an interrupted {what} with other settings (or another model); rerun with "
                             "the same arguments to resume it, or pass --overwrite to start afresh")
    check_replaceable_dir(work, kind)
    return False


def read_settings(work: Path):
    try:
        return json.loads((work / "settings.json").read_text())
    except (OSError, ValueError):
        return None
