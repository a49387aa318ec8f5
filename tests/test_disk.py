"""The build's check that the shipped root filesystem is clean, on real ext4 made by mke2fs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from builder import disk


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    disk.create_raw(path, 64)
    disk.partition(path)
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("x\n")
    disk.mkfs_from_tree(path, tree, 64, "0b6c1f2e-4d59-4f4e-9a51-2f0e8e2d1c11")
    return path


def _debugfs(path: Path, request: str) -> None:
    subprocess.run(["debugfs", "-w", "-R", request, f"{path}?offset={disk.PART_OFFSET}"], check=True,
                   capture_output=True, timeout=60)


def test_a_fresh_filesystem_is_clean(image: Path) -> None:
    assert disk.unclean(image) == []


def test_a_journal_left_to_replay_is_reported(image: Path) -> None:
    # What a guest powered off without unmounting / leaves behind.
    _debugfs(image, "feature needs_recovery")
    assert disk.unclean(image) == ["its journal needs recovery (it was not unmounted)"]


def test_orphan_inodes_are_reported(image: Path) -> None:
    # What a file deleted while still open leaves on a filesystem that was never unmounted.
    _debugfs(image, "ssv last_orphan 12")
    assert disk.unclean(image) == ["it has orphan inodes (first: 12), files deleted while open"]
