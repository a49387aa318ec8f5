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



def image_info(path: Path) -> dict[str, object]:
    """qemu-img's view of an image (format, virtual size, backing file…)."""
    out = run(["qemu-img", "info", "--output=json", "-U", str(path)], timeout=60).stdout
    info: dict[str, object] = json.loads(out)
    return info


def create_overlay(base: Path, overlay: Path, base_format: str) -> None:
    """A qcow2 whose backing file is base: the instance writes here, base is never touched."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", os.fspath(base.resolve()),
         str(overlay)], timeout=60)
