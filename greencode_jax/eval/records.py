"""The evaluation directory's record file and settings: what makes an evaluation resumable.

`samples.jsonl` holds one record per (protocol, batch size, policy, sample), appended and
flushed as each batch finishes. `settings.json` holds everything that decides the records;
a rerun into the same directory resumes only if its settings are equal, and skips the
records already there. A run killed while writing leaves at most one partial last line,
which the rerun drops.
"""

from __future__ import annotations

import json
from pathlib import Path

from greencode_jax.atomic import atomic_write_text, make_parents
from greencode_jax.ownership import read_manifest, write_manifest
from greencode_jax.errors import GreencodeError

RECORDS, SETTINGS = "samples.jsonl", "settings.json"
FORMAT = "greencode-evaluation"


def record_key(record: dict) -> tuple:
    return record["protocol"], int(record["batch_size"]), record["policy"], int(record["sample"])


def check_resumable(out: Path, settings: dict | None):
    """Refuses an existing `out` that is not an evaluation with exactly these settings (with
    `settings` None: that is not an evaluation at all, checked before anything is loaded)."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise GreencodeError(f"--out {out}: exists and is not a directory")
    path = out / SETTINGS
    if not path.is_file():
        if any(out.iterdir()):
            raise GreencodeError(f"--out {out}: exists and holds no {SETTINGS}, so it is not an evaluation to "
                                 "resume; choose a new directory")
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise GreencodeError(f"{path}: unreadable ({error}); choose a new --out directory") from None
    stored_settings = stored.get("settings") if isinstance(stored, dict) else None
    if not isinstance(stored_settings, dict):
        raise GreencodeError(f"{path}: not the settings of an evaluation; choose a new --out directory")
    if settings is not None and stored_settings != settings:
        differ = _differences(stored_settings, settings)
        raise GreencodeError(f"--out {out}: an evaluation with other settings ({differ}); resume it with the same "
                             "settings or choose a new directory")


def _differences(before: dict, now: dict, prefix: str = "") -> str:
    """The settings that differ, named as deep as they go: `config.samples 3 there, 5 here`."""
    parts = []
    for key in sorted(set(before) | set(now), key=str):
        a, b = before.get(key), now.get(key)
        if a == b:
            continue
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            parts.append(_differences(a, b, f"{name}."))
        elif key == "protocols" or isinstance(a, list) and len(str(a)) > 60:
            parts.append(f"{name}: another list of samples")  # what a different `samples` or split gives
        else:
            parts.append(f"{name} {a!r} there, {b!r} here")
    return "; ".join(parts)


class RecordFile:
    """Appends records to `out/samples.jsonl`; `done` maps each finished key to its record."""

    def __init__(self, out: Path, settings: dict, inputs: dict | None = None):
        self.out = Path(out)
        if not (self.out / SETTINGS).is_file():  # a new evaluation: the directory, its manifest and settings
            make_parents(self.out)
            self.out.mkdir(exist_ok=True)
            if read_manifest(self.out) is None:
                write_manifest(self.out, "evaluation", inputs)
            atomic_write_text(self.out / SETTINGS, json.dumps({"format": FORMAT, "settings": settings}, indent=2)
                              + "\n")
        self.path = self.out / RECORDS
        self.done = self._load()
        self._file = open(self.path, "a", encoding="utf-8")

    def _load(self) -> dict:
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        done, offset = {}, 0
        lines = data.split(b"\n")
        for number, line in enumerate(lines, 1):
            last = number == len(lines)
            if last and line.strip():  # no newline after it: the write was interrupted
                break
            if line.strip():
                try:
                    record = json.loads(line)
                    done[record_key(record)] = record
                except (ValueError, KeyError, TypeError) as error:
                    raise GreencodeError(f"{self.path}: line {number} is not a record ({error}); remove it or "
                                         "choose a new --out directory") from None
            offset += len(line) + 1
        if offset < len(data):  # drop the partial last line before appending after it
            with open(self.path, "r+b") as f:
                f.truncate(offset)
        return done

    def append(self, records: list[dict]):
        """Writes `records` (one batch) and flushes them to the file."""
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        self._file.write(text)
        self._file.flush()  # a killed process loses nothing flushed (the OS holds it)
        for record in records:
            self.done[record_key(record)] = record

    def close(self):
        self._file.close()
