"""The pipeline's bookkeeping: pipeline.json (per stage, the key of the inputs its outputs were
made from), running a stage unless its outputs are up to date, and removing what a stage made for
other inputs (only what is its own)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from greencode_jax import interrupts, ownership
from greencode_jax.atomic import atomic_write_text, partial_path
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


class Stages:
    """pipeline.json: per stage, the key of the inputs its outputs were made from."""

    def __init__(self, run_dir: Path, log=None):
        self.log = log or say
        self.path = run_dir / "pipeline.json"
        self.done = self._read() if self.path.exists() else {}
        self.seconds = {}

    def _read(self) -> dict:
        try:
            done = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:
            done = error
        if not isinstance(done, dict) or not all(isinstance(v, dict) for v in done.values()):
            reason = f" ({done})" if isinstance(done, Exception) else ""
            raise GreencodeError(f"{self.path}: unreadable{reason}; it records which stages are done: delete it and "
                                 "rerun, and every stage whose outputs it made runs again") from None
        return done

    def run(self, name: str, key: str, outputs, build, what: str, stale=()):
        """Runs `build` unless `outputs` exist for `key`. `stale`: paths (an interrupted run's
        DIR.partial among them) removed first when they were started for other inputs; kept,
        so that the stage resumes, when an interrupted run had the same inputs."""
        log = self.log
        outputs = [Path(p) for p in outputs]
        entry = self.done.get(name, {})
        if entry.get("key") == key and all(p.exists() for p in outputs):
            log(f"[{name}] up to date ({what}), skipped")
            self.seconds[name] = 0.0
            return
        if entry.get("started") != key:
            try:
                remove_stale_outputs(stale, name)
            except GreencodeError as error:
                raise GreencodeError(f"[{name}] {error}") from None
        self.done[name] = {"started": key}
        atomic_write_text(self.path, json.dumps(self.done, indent=2) + "\n")
        log(f"[{name}] {what}")
        start = time.perf_counter()
        try:
            with ownership.stage(name):
                build()
        except interrupts.Interrupted as stop:  # what the stage kept; `greencode run` again resumes it
            raise stop.prefixed(f"[{name}]") from None
        except BaseException as error:
            if isinstance(error, KeyboardInterrupt) or (isinstance(error, Exception) and interrupts.received()):
                raise interrupts.interrupted(f"[{name}] stopped; the same command continues from this stage") \
                    from None
            if isinstance(error, GreencodeError):  # the earlier stages' outputs stay as they are, for the rerun
                raise GreencodeError(f"[{name}] {error}") from None
            raise
        seconds = time.perf_counter() - start
        self.seconds[name] = seconds
        self.done[name] = {"key": key, "started": key, "seconds": round(seconds, 1)}
        atomic_write_text(self.path, json.dumps(self.done, indent=2) + "\n")
        log(f"[{name}] done in {seconds:.1f} s")


def remove_stale_outputs(paths, stage_name: str):
    """Removes what stage `stage_name` made for other inputs (each path and its DIR.partial), after
    checking that every one of them is its own: anything else is left, and named."""
    present = [p for path in map(Path, paths) for p in (path, partial_path(path)) if p.exists() or p.is_symlink()]
    for path in present:  # every check first: nothing is removed unless all of it may be
        ownership.check_stage_output(path, stage_name)
    for path in present:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
