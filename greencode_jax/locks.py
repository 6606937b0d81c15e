"""One writer per output: an advisory `fcntl` lock held for the life of a command.

The lock lives in a hidden file beside the output, `.NAME.lock`, holding the PID and command
line of its holder; the output itself need not exist yet (most are assembled in a temporary
sibling and renamed into place). A second command writing the same output gets one line naming
the holder instead of a half-overwritten directory. The kernel drops the lock when its holder
dies, however it dies, so a stale lock file never blocks anyone. Within one process the lock is
re-entrant (`greencode run` holds its run directory while `finetune` inside it takes it again).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
import sys
from pathlib import Path

from greencode_jax.atomic import make_parents, remove_empty
from greencode_jax.errors import GreencodeError

_held: dict[str, list] = {}  # lock path -> [fd, depth]


def lock_path(out: str | Path) -> Path:
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(out: str | Path, enabled: bool = True):
    """Holds the lock of output `out` for the block (`enabled` False: a no-op, for the
    non-primary processes of a multi-host run, which write nothing of their own)."""
    if not enabled:
        yield
        return
    path = lock_path(out)
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    created = make_parents(path)
    try:
        fd = _acquire(path, out)
    except BaseException:
        remove_empty(created)
        raise
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(path)  # before the unlock: a waiter that opened it re-checks the inode
        os.close(fd)
        remove_empty(created)


def holds_output_lock(argument: str):
    """Decorator: the function holds the lock of the output its argument `argument` names while it
    runs (on the primary process of a multi-host run: the others write only their share of it)."""
    def wrap(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            # lazy: keeps locks (and data, which uses it) free of JAX. Every locked job runs JAX;
            # jax.distributed, if used, is initialised by now.
            import jax

            out = signature.bind(*args, **kwargs).arguments[argument]
            with output_lock(out, enabled=jax.process_index() == 0):
                return function(*args, **kwargs)
        return locked
    return wrap


def _acquire(path: Path, out) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise GreencodeError(f"{out}: cannot lock the output ({path}: {error.strerror or error})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise GreencodeError(f"{out}: another greencode command is writing it (PID {holder}); wait for it to "
                                 "finish, or choose another output path") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}: {' '.join(sys.argv)[:500]}\n".encode())
    return fd
