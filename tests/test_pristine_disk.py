"""The image as built reaches the specs read-only: a separate overlay of the base, hot-plugged read-only
after boot, mounted once, unmounted at the end; a guest that cannot mount it is an error, never an
empty tree that passes. (The guest side runs in tests/test_specs_e2e.py and the main-job e2e.)"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from builder import instance as instance_mod
from builder.disk import image_info
from builder.errors import InstanceError
from builder.instance import PRISTINE_MOUNT, PRISTINE_SERIAL, Instance


class FakeHypervisor:
    def __init__(self) -> None:
        self.attached: list[tuple[Any, str]] = []

    def attach_disk(self, dom: Any, xml: str) -> None:
        self.attached.append((dom, xml))


@pytest.fixture
def inst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Instance:
    base = tmp_path / "generic-dev.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    i = Instance(FakeHypervisor(), base, "qcow2", label="generic-dev")  # type: ignore[arg-type]
    i.workdir = tmp_path / "work"
    i.workdir.mkdir()
    i._dom = "the running domain"
    return i


def answering(inst: Instance, monkeypatch: pytest.MonkeyPatch, rc: int, out: str) -> list[str]:
    ran: list[str] = []

    def run(command: str, timeout: float = 60) -> tuple[int, str]:
        ran.append(command)
        return rc, out

    monkeypatch.setattr(inst, "run", run)
    return ran


def test_a_read_only_overlay_of_the_same_base_is_attached_and_mounted_once(
        inst: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = answering(inst, monkeypatch, 0, "/dev/disk/by-id/virtio-kickgate-pristine-part1 (ext4, ro,noload)\n")
    assert inst.pristine_root() == PRISTINE_MOUNT
    assert inst.pristine_root() == PRISTINE_MOUNT
    hv: FakeHypervisor = inst.hv  # type: ignore[assignment]
    assert len(hv.attached) == 1 and len(ran) == 1
    dom, xml = hv.attached[0]
    assert dom == "the running domain"
    disk = ET.fromstring(xml)
    assert disk.find("readonly") is not None and disk.findtext("serial") == PRISTINE_SERIAL
    assert disk.find("target").attrib["dev"] == "vdb"  # type: ignore[union-attr]
    overlay = Path(disk.find("source").attrib["file"])  # type: ignore[union-attr]
    # its own overlay in the instance's work dir (removed with it), backed by the image itself
    assert overlay.parent == inst.workdir and overlay.name != "overlay.qcow2"
    assert image_info(overlay)["backing-filename"] == str(inst.image.resolve())
    # the guest finds the disk by serial, the root filesystem by UUID, and never replays a journal
    assert f"virtio-{PRISTINE_SERIAL}" in ran[0] and "findmnt -no UUID /" in ran[0]
    assert "ro,noload" in ran[0] and "ro,norecovery,nouuid" in ran[0]


def test_a_guest_that_cannot_mount_it_is_an_error_naming_why(inst: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    answering(inst, monkeypatch, 3, "the hot-plugged disk /dev/disk/by-id/virtio-kickgate-pristine did not appear\n")
    monkeypatch.setattr(inst, "serial_tail", lambda n=40: [])
    with pytest.raises(InstanceError, match=r"could not be mounted read-only.*exit status 3.*did not appear"):
        inst.pristine_root()


def test_no_running_instance_no_pristine_image(inst: Instance) -> None:
    inst._dom = None
    with pytest.raises(InstanceError, match="needs a running instance"):
        inst.pristine_root()


def test_released_at_the_end_and_only_when_mounted(inst: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = answering(inst, monkeypatch, 0, "")
    inst._ssh = object()  # type: ignore[assignment]
    inst.release_pristine()
    assert ran == []
    inst.pristine_root()
    inst.release_pristine()
    assert ran[-1] == f"umount {PRISTINE_MOUNT} && rmdir {PRISTINE_MOUNT}"
    inst.release_pristine()
    assert len(ran) == 2


def test_the_mount_point_is_private_to_root() -> None:
    assert "mkdir -p -m 0700 /run/kickgate-pristine" in instance_mod._PRISTINE_MOUNT_SCRIPT
