"""Durable file operations: every file kickgate writes for later readers goes through here.

Writers fill a uniquely named temp file beside the target, fsync it, give it its final mode and
rename it into place: readers see the old content or the new, never a half-written file, and two
runs replacing the same file never trip over each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from builder.errors import IntegrityError, KickgateError


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


def sha256_file(path: Path, bufsize: int = 4 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """A temp path beside path for a tool to write; renamed to path with mode if the block succeeds."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def _atomic_write(path: Path, fill: Callable[[BinaryIO], object], mode: int) -> None:
    with atomic_output(path, mode) as tmp, open(tmp, "wb") as f:
        fill(f)
        f.flush()


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    _atomic_write(path, lambda f: f.write(data), mode)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: Path, data: Any, mode: int = 0o644) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n", mode)


def atomic_copy(src: Path, dst: Path, *, mode: int = 0o644, expect_sha256: str | None = None) -> str:
    """dst becomes a complete copy of src or stays as it was; returns the copy's sha256.

    With expect_sha256, the bytes read from src and the bytes that landed in dst are both checked
    against it (IntegrityError names which differed), so a file changed after it was tested, or a
    copy damaged on its way to disk, is never put in place.
    """
    with atomic_output(dst, mode) as tmp:
        read = hashlib.sha256()
        with open(src, "rb") as source, open(tmp, "wb") as out:
            while chunk := source.read(1 << 20):
                read.update(chunk)
                out.write(chunk)
            out.flush()
        if expect_sha256 is not None and read.hexdigest() != expect_sha256.lower():
            raise IntegrityError(src, expect_sha256, read.hexdigest(), "changed since it was checked")
        written = sha256_file(tmp)
        if written != read.hexdigest():
            raise IntegrityError(dst, read.hexdigest(), written, "was damaged while it was copied")
    return written


def private_key_file(path: Path, size: int = 32) -> bytes:
    """A secret key kept on this machine only: created 0600 once, refused if others can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(size))
            os.fsync(fd)
        finally:
            os.close(fd)
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise KickgateError(f"{path}: a key file must be a regular file owned by this user with mode 0600 "
                            f"(it is {stat.filemode(st.st_mode)}, uid {st.st_uid}); fix it with "
                            f"`chmod 600 {path}` or remove it to make a new one")
    key = path.read_bytes()
    if len(key) < size:
        raise KickgateError(f"{path}: the key file is truncated; remove it to make a new one")
    return key



def check_private_dir(path: Path, what: str, how: str) -> None:
    """Refuse a directory others could write to (they could swap what kickgate verifies or promotes)."""
    st = path.lstat()
    problem = ""
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
    elif st.st_mode & 0o022:
        problem = f"is writable by group or others (mode {stat.filemode(st.st_mode)})"
    if problem:
        raise KickgateError(f"{what} {path} {problem}: use a directory of your own ({how}), or fix it with "
                            f"`chown {os.getuid()} {path} && chmod go-w {path}`")
