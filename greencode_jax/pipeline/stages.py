"""The pipeline's bookkeeping: a stage's key (`digest`), reading a stage's JSON output, and a run
directory's pipeline.json (which stage directories of the store it uses)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from greencode_jax.atomic import atomic_write_text
from greencode_jax.errors import GreencodeError


def say(line: str):
    """The runner's default voice: a line on stdout, flushed (the stages' progress bars go to stderr)."""
    print(line, flush=True)


def read_stage_json(path: Path, stage: str) -> dict:
    """A stage's JSON output; a corrupt one (an interrupted write by another tool, a hand edit) is
    named with the stage that makes it."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise GreencodeError(f"[{stage}] {path}: unreadable ({error}); delete it and rerun to make the {stage} "
                             "stage again") from None


def digest(*parts) -> str:
    """A stage's key: 16 hex digits of the hash of the config fields it reads and its upstream keys."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunRecord:
    """pipeline.json of a run directory: per stage, its key, its directory in the store and the
    seconds it took (0 when it was up to date)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "pipeline.json"
        self.done = self._read() if self.path.exists() else {}

    def _read(self) -> dict:
        try:
            done = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:
            done = error
        if not isinstance(done, dict) or not all(isinstance(v, dict) for v in done.values()):
            reason = f" ({done})" if isinstance(done, Exception) else ""
            raise GreencodeError(f"{self.path}: unreadable{reason}; it records which stage directories this run "
                                 "uses: delete it and rerun") from None
        return done

    def save(self, stage, seconds: float):
        self.done[stage.name] = {"key": stage.key, "dir": str(stage.dir), "seconds": round(seconds, 1)}
        atomic_write_text(self.path, json.dumps(self.done, indent=2) + "\n")
