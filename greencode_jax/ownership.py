"""Which outputs are ours, and the one rule for replacing or deleting one.

Every output directory a command makes carries a small manifest, `.greencode-output.json`:
the kind of output, the command (and pipeline stage) that made it, and its inputs. Every JSON
file a command writes as its output carries the same record under the key
`greencode_output`. A command replaces or deletes an output only when that record says a
greencode-jax command made it, for the same kind of output (and, for `greencode run`, the same
stage), and never when the output is, contains, or lies inside one of the command's own
inputs. Anything else is refused with one line naming the path and why, before any work starts
and with nothing touched.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import os
from pathlib import Path

from greencode_jax.errors import GreencodeError

MANIFEST = ".greencode-output.json"
JSON_KEY = "greencode_output"
FORMAT = "greencode-output"

_stage: contextvars.ContextVar[str | None] = contextvars.ContextVar("greencode_stage", default=None)
_command: contextvars.ContextVar[str] = contextvars.ContextVar("greencode_command", default="python API")


def set_command(name: str):
    """The command recorded as the maker of every output written from now on (the CLI sets it)."""
    _command.set(name)


@contextlib.contextmanager
def stage(name: str):
    """Within the block, outputs record that pipeline stage `name` made them."""
    token = _stage.set(name)
    try:
        yield
    finally:
        _stage.reset(token)


def current_stage() -> str | None:
    return _stage.get()


def record(kind: str, inputs: dict | None = None) -> dict:
    """What a manifest (or a JSON output's `greencode_output` entry) says of its output."""
    return {"format": FORMAT, "version": 1, "kind": kind, "command": _command.get(), "stage": _stage.get(),
            "inputs": {name: _describe(path) for name, path in (inputs or {}).items() if path is not None},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "pid": os.getpid()}


def _describe(path) -> str:
    text = str(path)
    return str(Path(text).resolve()) if os.path.exists(text) else text  # a hub id stays as given


def write_manifest(directory: str | Path, kind: str, inputs: dict | None = None):
    """Writes `directory`'s manifest, whole or not at all (a rename), with the usual file mode."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f"{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record(kind, inputs), indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of `directory`, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def read_json_record(path: str | Path) -> dict | None:
    """The `greencode_output` entry of a JSON output file, or None."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    entry = data.get(JSON_KEY) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) and entry.get("format") == FORMAT else None


def _made_by(entry: dict) -> str:
    stage_name = f" (stage {entry['stage']})" if entry.get("stage") else ""
    command = entry.get("command")
    maker = "the Python API" if command == "python API" else f"`greencode {command}`"
    return f"{maker}{stage_name} as a {entry.get('kind')}"


# ------------------------------------------------------------------------------------------------ the rule


def check_not_an_input(out: str | Path, inputs: dict | None, replacing: bool):
    """Refuses an output that is or contains one of the command's inputs (always), or lies inside
    one (when it would be replaced or deleted)."""
    target = Path(os.path.realpath(out))
    for name, path in (inputs or {}).items():
        if path is None or not os.path.exists(str(path)):
            continue  # a hub id, or an optional input not given
        source = Path(os.path.realpath(path))
        if target == source:
            raise GreencodeError(f"{out}: is the command's own input ({name}); choose another output path")
        if source.is_relative_to(target):
            raise GreencodeError(f"{out}: contains the command's input {path} ({name}); choose another output path")
        if replacing and target.is_relative_to(source):
            raise GreencodeError(f"{out}: lies inside the command's input {path} ({name}); it is not replaced; "
                                 "choose another output path")


def check_replaceable_dir(out: str | Path, kind: str, stage_name: str | None = None):
    """Refuses to replace or delete `out` unless its manifest says we made it as a `kind` (by
    pipeline stage `stage_name`, when given)."""
    out = Path(out)
    if out.is_symlink() or not out.is_dir():
        raise GreencodeError(f"{out}: exists and is not a directory a greencode-jax command made; it is left as it "
                             "is: choose another output path, or remove it yourself")
    entry = read_manifest(out)
    if entry is None:
        raise GreencodeError(f"{out}: exists and was not made by greencode-jax (it has no {MANIFEST}); it is left "
                             "as it is: choose another output path, or remove it yourself")
    if entry.get("kind") != kind:
        raise GreencodeError(f"{out}: made by {_made_by(entry)}, not a {kind}; it is left as it is: choose another "
                             "output path")
    _check_stage(out, entry, stage_name)


def _check_stage(path: Path, entry: dict, stage_name: str | None):
    if stage_name is not None and entry.get("stage") != stage_name:
        raise GreencodeError(f"{path}: made by {_made_by(entry)}, not by this run's {stage_name} stage; it is left "
                             "as it is: move it away and rerun")


def check_stage_output(path: str | Path, stage_name: str):
    """Refuses to delete `path` (a directory or a JSON file) unless pipeline stage `stage_name`
    made it: `greencode run` removes a stage's outputs made for other inputs, and nothing else."""
    path = Path(path)
    is_dir = path.is_dir() and not path.is_symlink()
    entry = read_manifest(path) if is_dir else read_json_record(path)
    if entry is None:
        raise GreencodeError(f"{path}: in the way of this run's {stage_name} stage, and not made by greencode-jax; it "
                             "is left as it is: move it away and rerun")
    _check_stage(path, entry, stage_name)


def check_output_dir(out: str | Path, kind: str, *, inputs: dict | None = None, overwrite: bool = False):
    """Everything about output directory `out` that can be checked before the work starts."""
    out = Path(out)
    exists = out.exists() or out.is_symlink()
    check_not_an_input(out, inputs, replacing=exists)
    if not exists:
        _check_parent(out)
        return
    if not overwrite:
        raise GreencodeError(f"{out}: already exists; choose another output path or pass --overwrite")
    check_replaceable_dir(out, kind)


def check_output_file(path: str | Path, kind: str, *, inputs: dict | None = None):
    """A JSON output file (`--out FILE`, `--json FILE`): may be written unless it is a directory,
    an input, or an existing file that is not our output of the same kind."""
    path = Path(path)
    check_not_an_input(path, inputs, replacing=path.exists())
    if path.is_dir():
        raise GreencodeError(f"{path}: is a directory; give a file path to write the {kind} to")
    if path.exists() or path.is_symlink():
        entry = read_json_record(path)
        if entry is None:
            raise GreencodeError(f"{path}: exists and was not written by greencode-jax; it is left as it is: choose "
                                 "another path, or remove it yourself")
        if entry.get("kind") != kind:
            raise GreencodeError(f"{path}: written by {_made_by(entry)}, not a {kind}; it is left as it is: choose "
                                 "another path")
        return
    _check_parent(path)


def _check_parent(out: Path):
    """The nearest existing ancestor of `out` must be a writable directory."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise GreencodeError(f"{parent}: not a directory, so {out} cannot be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GreencodeError(f"{parent}: not writable, so {out} cannot be written under it")


def with_record(data: dict, kind: str, inputs: dict | None = None) -> dict:
    """`data` (a JSON output) with its `greencode_output` entry first."""
    return {JSON_KEY: record(kind, inputs), **{k: v for k, v in data.items() if k != JSON_KEY}}
