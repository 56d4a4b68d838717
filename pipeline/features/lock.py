"""The one-writer rule of a cache: an flock per writer (and torchrun rank), held beside the cache."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.features.readers import CacheBusy


class WriterLock:
    """The flock that makes one process (per rank) the writer of a cache; it sits beside the Zarr group
    (a file inside it would be read as a broken member), so it can be held before the cache exists.

    The kernel drops an flock when its holder ends in any way (kill -9 included), so a killed extraction
    never leaves the cache locked. torchrun ranks hold one lock each and write disjoint videos.
    """

    def __init__(self, path: Path, rank: int = 0) -> None:
        self.cache, self.rank = Path(path), rank
        self.path = self.cache.parent / f".{self.cache.name}.writer{rank}.lock"
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        """Hold it, or raise CacheBusy naming the process that does."""
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CacheBusy(
                f"{self.cache}: another extraction is writing this cache ({holder}); "
                "wait for it to end (or stop it), then run the same command again: it resumes"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, rank {self.rank}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock back (closing the file drops the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
