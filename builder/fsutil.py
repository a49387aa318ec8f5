"""Durable file operations shared by the build cache and the registries."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename inside path durable; best effort, as some filesystems refuse it."""
    with contextlib.suppress(OSError):
        fsync_file(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
