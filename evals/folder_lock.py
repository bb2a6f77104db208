"""An exclusive lock on an output folder, so two runs never write into one folder at once (a second one fails at
once, naming the process that holds it). Uses `flock`, which the system releases when the process dies."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def locked(folder: Path, name: str = ".lock") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (the file `folder/name`) for the duration of the block.

    Raises:
        ValueError: another process (or another open in this one) holds the lock.
    """
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise ValueError(f"output folder {str(folder)!r} is in use by another run ({holder}); wait for it to "
                             "finish or give another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
