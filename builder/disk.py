"""Disk images without loop devices or host mounts: sfdisk on the raw file, mke2fs -d into it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from builder.run import run

PART_OFFSET = 1024 * 1024  # the root partition starts at 1 MiB, as every partitioner aligns it


def create_raw(path: Path, size_mib: int) -> None:
    """A sparse file of size_mib."""
    with open(path, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)


def partition(path: Path) -> None:
    """MBR with one bootable Linux partition from 1 MiB to the end (room for GRUB's core.img)."""
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", str(path)],
        input=b"label: dos\nstart=2048, type=83, bootable\n", timeout=60)


def mkfs_from_tree(path: Path, tree: Path, size_mib: int, uuid: str, label: str = "root") -> None:
    """ext4 filled from tree, written at the partition's offset inside the image file."""
    fs_kib = size_mib * 1024 - PART_OFFSET // 1024
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-U", uuid, "-L", label, "-E", f"offset={PART_OFFSET}",
         "-d", str(tree), str(path), f"{fs_kib}k"], timeout=900)


def unclean(path: Path) -> list[str]:
    """Why the ext4 filesystem at the partition's offset is not cleanly unmounted (empty: it is).

    A journal still to replay or orphan inodes to delete mean every instance of the image starts by
    repairing its root filesystem, read-only, in its initramfs.
    """
    out = run(["dumpe2fs", "-h", f"{path}?offset={PART_OFFSET}"], timeout=60).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            found[key.strip()] = value.strip()
    reasons = []
    if "needs_recovery" in found.get("Filesystem features", "").split():
        reasons.append("its journal needs recovery (it was not unmounted)")
    if found.get("First orphan inode", "0") != "0":
        reasons.append(f"it has orphan inodes (first: {found['First orphan inode']}), files deleted while open")
    if found.get("Filesystem state", "clean") != "clean":
        reasons.append(f"its state is '{found['Filesystem state']}'")
    return reasons


def image_info(path: Path) -> dict[str, object]:
    """qemu-img's view of an image (format, virtual size, backing file…)."""
    out = run(["qemu-img", "info", "--output=json", "-U", str(path)], timeout=60).stdout
    info: dict[str, object] = json.loads(out)
    return info


def create_overlay(base: Path, overlay: Path, base_format: str) -> None:
    """A qcow2 whose backing file is base: the instance writes here, base is never touched."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", os.fspath(base.resolve()),
         str(overlay)], timeout=60)
