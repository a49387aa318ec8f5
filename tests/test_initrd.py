"""The initrd injection: a newc archive appended to a copy, readable by cpio and by the kernel."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import pytest

from builder.initrd import CpioEntry, inject_kickstart, iter_newc, newc_archive
from builder.run import run

KS = "# kickstart\ncmdline\nlang en_US.UTF-8\n%post\necho 'héllo ✓'\n%end\n"


def cpio_list(data: bytes, verbose: bool = False) -> list[str]:
    out = run(["cpio", "-t" + ("v" if verbose else ""), "--quiet"], timeout=30, input=data).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.fixture
def original(tmp_path: Path) -> Path:
    """An uncompressed newc initrd made by GNU cpio, as cpio -t can only read such archives."""
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "os-release").write_text("NAME=Original\n")
    (src / "init").write_text("#!/bin/sh\n")
    os.chmod(src / "init", 0o755)
    listing = b"\n".join([b".", b"etc", b"etc/os-release", b"init"]) + b"\n"
    out = tmp_path / "initrd.img"
    run(["cpio", "-o", "-H", "newc", "--quiet", "-O", str(out)], timeout=30, cwd=src, input=listing)
    return out


def test_newc_archive_layout() -> None:
    data = newc_archive([CpioEntry.file("ks.cfg", b"abc")])
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    assert b"TRAILER!!!\0" in data[-128:]
    (member,) = list(iter_newc(data))
    assert member.name == "ks.cfg" and member.data == b"abc"
    assert member.mode == stat.S_IFREG | 0o644 and member.uid == 0 and member.gid == 0


def test_injected_initrd_lists_ks_after_original(original: Path, tmp_path: Path) -> None:
    before = original.read_bytes()
    out = tmp_path / "injected.img"
    offset = inject_kickstart(original, out, KS)
    data = out.read_bytes()

    assert original.read_bytes() == before  # the original is untouched
    assert data[:len(before)] == before  # ... and an exact prefix of the copy
    assert offset % 4 == 0 and set(data[len(before):offset]) <= {0}

    # GNU cpio stops at the first TRAILER!!!: the original archive reads as before ...
    assert cpio_list(data) == [".", "etc", "etc/os-release", "init"]
    # ... and the appended archive holds ks.cfg, 0644 and owned by root.
    assert cpio_list(data[offset:]) == ["ks.cfg"]
    (verbose,) = cpio_list(data[offset:], verbose=True)
    assert verbose.startswith("-rw-r--r--") and " root " in verbose
    extracted = run(["cpio", "-i", "--quiet", "--to-stdout", "ks.cfg"], timeout=30,
                    input=data[offset:]).stdout
    assert extracted == KS

    # The kernel's view: every archive in turn, ks.cfg last.
    names = [m.name for m in iter_newc(data)]
    assert names == [".", "etc", "etc/os-release", "init", "ks.cfg"]
    assert next(m for m in iter_newc(data) if m.name == "ks.cfg").data.decode() == KS


def test_injection_after_a_compressed_initrd(tmp_path: Path) -> None:
    # Real installer initrds are compressed; the appended archive must start 4-byte aligned.
    archive = newc_archive([CpioEntry.directory("etc"), CpioEntry.file("etc/x", b"x" * 1001)])
    compressed = gzip.compress(archive, mtime=0)
    if len(compressed) % 4 == 0:
        compressed += b"\0"  # make sure padding is needed
    src = tmp_path / "initrd.img"
    src.write_bytes(compressed)
    out = tmp_path / "out.img"
    offset = inject_kickstart(src, out, KS, name="ks.cfg")
    data = out.read_bytes()
    assert offset % 4 == 0 and offset >= len(compressed)
    assert data[len(compressed):offset] == b"\0" * (offset - len(compressed))
    assert [(m.name, m.data.decode()) for m in iter_newc(data, offset)] == [("ks.cfg", KS)]
    assert cpio_list(data[offset:]) == ["ks.cfg"]


def test_archive_of_special_entries(tmp_path: Path) -> None:
    data = newc_archive([
        CpioEntry.directory("bin"),
        CpioEntry.file("bin/tool", b"#!/bin/sh\n", 0o755),
        CpioEntry.symlink("bin/sh", "tool"),
        CpioEntry.chardev("dev/console", 5, 1),
    ])
    listing = cpio_list(data, verbose=True)
    assert listing[0].startswith("drwxr-xr-x")
    assert listing[1].startswith("-rwxr-xr-x") and listing[1].endswith("bin/tool")
    assert listing[2].startswith("lrwxrwxrwx") and listing[2].endswith("bin/sh -> tool")
    assert listing[3].startswith("crw-------") and listing[3].endswith("dev/console")
    # Distinct inode numbers: nothing is mistaken for a hard link.
    inos = {data[m.offset + 6:m.offset + 14] for m in iter_newc(data)}
    assert len(inos) == 4


def test_injection_replaces_nothing_on_failure(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        inject_kickstart(tmp_path / "missing.img", tmp_path / "out.img", KS)
    assert not list(tmp_path.iterdir())


def test_bad_member_names_are_refused() -> None:
    with pytest.raises(ValueError):
        newc_archive([CpioEntry.file("", b"x")])
    with pytest.raises(ValueError):
        newc_archive([CpioEntry(name="d", mode=stat.S_IFDIR | 0o755, data=b"x")])
