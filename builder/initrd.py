"""Append files to an initrd as an extra newc cpio archive, as `virt-install --initrd-inject` does.

Linux unpacks every archive it finds in the initrd, one after the other: compressed ones and
uncompressed ones may be concatenated, and files in a later archive are added to (or replace)
those of an earlier one. So injecting a kickstart needs neither root nor unpacking the original:
copy the initrd, pad it with NUL bytes to a 4-byte boundary (the kernel only looks for an
uncompressed archive's magic at such offsets and skips NULs between archives), then append a
small uncompressed newc archive holding ``ks.cfg`` and its ``TRAILER!!!`` entry.

The writer is pure Python and also builds whole initramfs images (directories, symlinks,
device nodes), which the tests use for their stand-in installer.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from builder.fsutil import atomic_output

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_LEN = 110  # 6 bytes magic + 13 fields of 8 hex digits


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``mode`` holds the file type bits too (stat.S_IFREG | 0o644, ...)."""

    name: str
    mode: int
    data: bytes = b""  # file content, or a symlink's target
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0
    nlink: int = 1

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644, mtime: int = 0) -> CpioEntry:
        return cls(name=name, mode=stat.S_IFREG | perm, data=data, mtime=mtime)

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> CpioEntry:
        return cls(name=name, mode=stat.S_IFDIR | perm, nlink=2)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        return cls(name=name, mode=stat.S_IFLNK | 0o777, data=target.encode())

    @classmethod
    def chardev(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(name=name, mode=stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(entry: CpioEntry, ino: int, name: bytes) -> bytes:
    fields = (ino, entry.mode, entry.uid, entry.gid, entry.nlink, entry.mtime, len(entry.data),
              0, 0, entry.rdev_major, entry.rdev_minor, len(name) + 1, 0)
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def _member(entry: CpioEntry, ino: int) -> bytes:
    name = entry.name.lstrip("/").encode()
    if not name or b"\0" in name:
        raise ValueError(f"invalid cpio member name {entry.name!r}")
    if entry.data and not (stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode)):
        raise ValueError(f"{entry.name}: only regular files and symlinks carry data")
    head = _header(entry, ino, name) + name + b"\0"
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def newc_archive(entries: Iterable[CpioEntry], first_ino: int = 721) -> bytes:
    """A complete newc ("070701") archive: the members, then the TRAILER!!! entry.

    Every member gets its own inode number, so the kernel never mistakes two files for hard links.
    """
    out = bytearray()
    ino = first_ino
    for entry in entries:
        out += _member(entry, ino)
        ino += 1
    out += _member(CpioEntry(name=TRAILER, mode=0), 0)
    return bytes(out)


def append_archive(src: Path, dst: Path, entries: Iterable[CpioEntry]) -> int:
    """Copy the initrd src to dst and append a newc archive of entries; return its offset in dst."""
    archive = newc_archive(entries)
    # 0600: the appended kickstart may carry a password hash.
    with atomic_output(dst, 0o600) as tmp:
        shutil.copyfile(src, tmp)
        with open(tmp, "r+b") as f:
            end = f.seek(0, os.SEEK_END)
            f.write(_pad4(end))
            offset = f.tell()
            f.write(archive)
    return offset


def inject_kickstart(src: Path, dst: Path, kickstart: str, name: str = "ks.cfg") -> int:
    """dst = src + an archive holding /<name> (0644, root-owned), for inst.ks=file:/<name>."""
    return append_archive(src, dst, [CpioEntry.file(name, kickstart.encode("utf-8"), 0o644)])


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class CpioMember:
    name: str
    mode: int
    uid: int
    gid: int
    data: bytes
    offset: int  # where the member's header starts in the initrd


def iter_newc(data: bytes, start: int = 0) -> Iterator[CpioMember]:
    """Members of the uncompressed newc archives found from start on, as the kernel walks them.

    NUL padding between archives is skipped; reading stops at the end or at anything that is not
    an uncompressed newc header (e.g. a compressed archive, which this reader does not unpack).
    """
    pos = start
    size = len(data)
    while pos < size:
        if data[pos] == 0:
            pos += 1
            continue
        if pos % 4 or data[pos:pos + 6] != NEWC_MAGIC:
            return
        head = data[pos:pos + _HEADER_LEN]
        if len(head) < _HEADER_LEN:
            raise ValueError(f"truncated cpio header at offset {pos}")
        try:
            f = [int(head[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ValueError(f"corrupt cpio header at offset {pos}") from None
        mode, uid, gid, filesize, namesize = f[1], f[2], f[3], f[6], f[11]
        name_start = pos + _HEADER_LEN
        name = data[name_start:name_start + namesize - 1].decode("utf-8", errors="replace")
        data_start = name_start + namesize
        data_start += -data_start % 4
        body = data[data_start:data_start + filesize]
        if len(body) < filesize:
            raise ValueError(f"truncated cpio member {name!r} at offset {pos}")
        member_offset = pos
        pos = data_start + filesize
        pos += -pos % 4
        if name == TRAILER:
            continue  # the next archive, if any, follows after NUL padding
        yield CpioMember(name=name, mode=mode, uid=uid, gid=gid, data=body, offset=member_offset)
