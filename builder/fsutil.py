"""Durable file operations shared by the build cache and the registries."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_copy(src: Path, dst: Path) -> None:
    """dst becomes a complete copy of src or stays as it was; concurrent writers never collide."""
    with open(src, "rb") as source:
        _atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 20))


def _atomic_write(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    # A unique temp name per writer: two runs replacing the same file never trip over each other.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
