"""One writer per run directory: an advisory lock that a killed holder cannot leave stuck.

The lock is flock(2) on a hidden file beside the run (`.NAME.gptjax-lock` in its parent),
so it can be taken before the run directory exists and never appears inside it; the
holder removes it when done. The
kernel drops a flock when its holder dies, however it dies, so there is no stale lock to
clear by hand. The file records the holder's pid, host and start time for the refusal
message. Taking it again inside the same process (the CLI and the library both guard a
fine-tuning run) nests instead of refusing.

flock is advisory and local: it does not protect a run directory on a network filesystem
from a process on another host that mounts it (NFS without lock support, GCS fuse).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from gptjax.errors import GptjaxError

_held: dict[str, int] = {}  # lock path -> nesting depth in this process


def lock_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir).absolute()
    return run_dir.parent / f".{run_dir.name}.gptjax-lock"


@contextmanager
def hold(run_dir: str | os.PathLike, command: str):
    """Hold the run's lock for the block, or raise GptjaxError naming its holder."""
    path = lock_path(Path(run_dir))
    key = str(path)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    made = next((p for p in reversed(path.parents) if not p.exists()), None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise GptjaxError(f"cannot create {run_dir}: Not a directory (a path above it is a "
                          "file)") from None
    fd = _acquire(path, Path(run_dir), command)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        # Unlinked while still held: a process that opened the old file before this and
        # locks it next sees that the path no longer names it, and starts over (_acquire).
        path.unlink(missing_ok=True)
        os.close(fd)  # releases the flock
        _remove_empty(path.parent, made)


def _remove_empty(folder: Path, made: Path | None) -> None:
    """Folders made only to hold the lock go when nothing else was put in them (a run
    refused as bad input leaves nothing behind)."""
    if made is None:
        return
    while True:
        try:
            folder.rmdir()
        except OSError:  # not empty: the run is in it
            return
        if folder == made:
            return
        folder = folder.parent


def _acquire(path: Path, run_dir: Path, command: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise GptjaxError(f"{run_dir} is in use by {holder}; wait for it to finish or stop "
                              "it, or choose another --out") from None
        # The file may have been replaced between open and flock; then lock the new one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    record = f"{command} (pid {os.getpid()} on host {socket.gethostname()}, since " \
             f"{time.strftime('%Y-%m-%d %H:%M:%S')})"
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    return fd


def _read(fd: int) -> str:
    text = os.pread(fd, 1000, 0).decode(errors="replace").strip()
    return text or "another gptjax process (it has not written its pid yet)"
