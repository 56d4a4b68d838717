"""Files that survive a power loss, not only a killed process: what a resume trusts is flushed to the
disk (fsync) before anything that vouches for it (a rename, a `done` flag) is written.

A rename is atomic for processes, but after a power loss it can point to a file whose data never
reached the disk, and a new file's directory entry can vanish; so the data is synced before the
rename and the directory after it.
"""

from __future__ import annotations

import os
from pathlib import Path


def sync_file(path: Path | str) -> None:
    """Flush one file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path | str) -> None:
    """Flush a directory's entries (new names, renames) to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path | str, path: Path | str) -> None:
    """`os.replace(tmp, path)` with `tmp`'s data on the disk first and the rename after it."""
    sync_file(tmp)
    os.replace(tmp, path)
    sync_dir(Path(path).parent)
