"""The fs datastore's ``stat`` and ``cp`` drivers, as far as image registration depends on them.

oned: src/datastore_mad/remotes/common/stat (fs/stat links to it) calls libfs.sh ``fs_size``:
- a PATH that is neither a file nor a directory: the message of ``ls`` reshaped to
  ``cannot access 'PATH' (No such file or directory)``;
- an unreadable file: ``cannot access 'PATH' (Permission denied)``;
- the format comes from ``qemu-img info``; bytes qemu-img cannot open give
  ``Failed to detect image format``;
- a raw file's size is that of its decompressed content (gzip, xz, bzip2) or the file's own;
  any other format's is the virtual size from ``qemu-img info --output json``;
- a size of 0 gives ``Runtime error during size estimation``;
- the size is reported in MiB, rounded up.
oned then answers allocate with ``Cannot parse image SIZE: <that message>``
(src/rm/RequestManagerAllocate.cc ImageAllocate).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import os
import stat

from builder.errors import CommandError
from builder.run import run

MIB = 1024 * 1024
_QEMU_IMG_TIMEOUT = 30.0


class StatError(Exception):
    """The stat driver failed; str() is the message oned puts after 'Cannot parse image SIZE: '."""


def qemu_img_info(path: str) -> dict[str, object] | None:
    """``qemu-img info --output=json`` of path, or None when qemu-img cannot open it."""
    try:
        proc = run(["qemu-img", "info", "--output=json", path], timeout=_QEMU_IMG_TIMEOUT)
    except CommandError:
        return None
    # builder.run merges stderr into stdout: the JSON object is the outermost braces
    text = proc.stdout
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        info = json.loads(text[start:end + 1])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _decompressed_size(path: str) -> int | None:
    """libfs.sh fs_size: gzip/xz/bzip2-compressed raw files count by their content."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        with gzip.GzipFile(path, "rb") as gz:
            return _count(gz)
    if magic == b"\xfd7zXZ\x00":
        with lzma.LZMAFile(path, "rb") as xz:
            return _count(xz)
    if magic[:3] == b"BZh":
        with bz2.BZ2File(path, "rb") as bz:
            return _count(bz)
    return None


def _count(stream: io.BufferedIOBase) -> int:
    total = 0
    while chunk := stream.read(1 << 20):
        total += len(chunk)
    return total


def fs_size_mb(path: str) -> int:
    """SIZE in MiB as the fs datastore's stat driver reports it; StatError with its message."""
    try:
        st = os.stat(path) if os.path.isabs(path) else None
    except OSError as e:
        raise StatError(f"cannot access '{path}' ({e.strerror})") from None
    if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        # a relative PATH is looked up from the driver's own directory, where it is not
        raise StatError(f"cannot access '{path}' (No such file or directory)")
    if stat.S_ISDIR(st.st_mode):
        size = 0
        for root, _dirs, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    size += os.lstat(os.path.join(root, name)).st_size
    else:
        if not os.access(path, os.R_OK):
            raise StatError(f"cannot access '{path}' (Permission denied)")
        info = qemu_img_info(path)
        if info is None or not info.get("format"):
            raise StatError("Failed to detect image format")
        if info["format"] in ("raw", "luks"):
            try:
                unpacked = _decompressed_size(path)
            except (OSError, EOFError, lzma.LZMAError):
                raise StatError("Runtime error during size estimation") from None
            size = unpacked if unpacked is not None else int(str(info.get("virtual-size", 0)))
        else:
            size = int(str(info.get("virtual-size", 0)))
    if size <= 0:
        raise StatError("Runtime error during size estimation")
    return (size + MIB - 1) // MIB


def image_format(path: str) -> str | None:
    """fs/cp: FORMAT of the copy is qemu-img's "file format" (luks is reported as raw)."""
    info = qemu_img_info(path)
    if info is None or not info.get("format"):
        return None
    fmt = str(info["format"])
    return "raw" if fmt == "luks" else fmt


def allocated_bytes(path: str) -> int:
    """Bytes a file takes on disk, as df (the fs ``monitor`` driver) sees them."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0
