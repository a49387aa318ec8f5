"""Pure: a DomainSpec becomes libvirt domain XML. No I/O, golden-tested."""

from __future__ import annotations

import secrets
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# Fixed PCI slot for the user-mode NIC given on the qemu command line: libvirt hands out low
# slots itself, and an unaddressed device collides with its slot 2.
NIC_PCI_ADDR = "0x10"


@dataclass(frozen=True)
class Disk:
    path: Path
    format: Literal["qcow2", "raw"] = "qcow2"
    device: Literal["disk", "cdrom"] = "disk"
    readonly: bool = False
    # Every disk kickgate attaches is a build's scratch disk or a throwaway overlay, gone with the
    # domain: flushes to the host's storage protect nothing and slow the guest's boot.
    cache: Literal["none", "writeback", "unsafe", "default"] = "unsafe"
    # What the guest sees as the disk's serial (virtio: /dev/disk/by-id/virtio-<serial>, at most 20
    # bytes), so a disk attached later is found by name rather than by the order the kernel saw it.
    serial: str | None = None


@dataclass(frozen=True)
class Nic:
    """User-mode NIC; host_forwards are (host_port, guest_port) bound to 127.0.0.1 only."""

    mac: str
    host_forwards: tuple[tuple[int, int], ...] = ()
    restrict: bool = False  # True: no route out of the guest (builds that need no network)


@dataclass(frozen=True)
class DomainSpec:
    name: str
    type: Literal["kvm", "qemu"]
    memory_mib: int
    vcpus: int
    serial_log: Path
    disks: tuple[Disk, ...]
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    nic: Nic | None = None
    on_poweroff: Literal["destroy", "preserve"] = "destroy"
    on_reboot: Literal["destroy", "restart"] = "destroy"
    on_crash: Literal["destroy", "preserve"] = "destroy"
    uuid: str | None = None
    extra_qemu_args: tuple[str, ...] = field(default=())
    tcg_cpu: str = "maximum"


def random_mac(prefix: str = "52:54:00") -> str:
    """A locally administered MAC in QEMU's OUI, as libvirt would pick."""
    return prefix + "".join(f":{b:02x}" for b in secrets.token_bytes(3))


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _disk_targets() -> list[str]:
    return [f"vd{c}" for c in "abcdefgh"]


def _disk(parent: ET.Element, disk: Disk, target: str) -> ET.Element:
    d = _sub(parent, "disk", type="file", device=disk.device)
    drv = {"name": "qemu", "type": disk.format}
    if disk.cache != "default" and disk.device == "disk" and not disk.readonly:
        drv["cache"] = disk.cache  # read-only media are never flushed
    _sub(d, "driver", **drv)
    _sub(d, "source", file=str(disk.path))
    _sub(d, "target", dev=target, bus="ide" if disk.device == "cdrom" else "virtio")
    if disk.serial is not None:
        _sub(d, "serial", disk.serial)
    if disk.readonly or disk.device == "cdrom":
        _sub(d, "readonly")
    return d


def disk_xml(disk: Disk, target: str) -> str:
    """One <disk> element, for attaching to a running domain (target: its name in the domain, vdb…)."""
    el = _disk(ET.Element("devices"), disk, target)
    ET.indent(el, space="  ")
    return ET.tostring(el, encoding="unicode") + "\n"


def domain_xml(spec: DomainSpec) -> str:
    ET.register_namespace("qemu", QEMU_NS)
    dom = ET.Element("domain", {"type": spec.type})
    _sub(dom, "name", spec.name)
    if spec.uuid:
        _sub(dom, "uuid", spec.uuid)
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    if spec.kernel is not None:
        _sub(os_el, "kernel", str(spec.kernel))
        if spec.initrd is not None:
            _sub(os_el, "initrd", str(spec.initrd))
        if spec.cmdline:
            _sub(os_el, "cmdline", spec.cmdline)
    else:
        _sub(os_el, "boot", dev="hd")
    feats = _sub(dom, "features")
    _sub(feats, "acpi")
    _sub(feats, "apic")
    if spec.type == "kvm":
        _sub(dom, "cpu", mode="host-passthrough")
    elif spec.tcg_cpu == "maximum":
        _sub(dom, "cpu", mode="maximum")
    else:
        cpu = _sub(dom, "cpu", mode="custom", match="exact")
        _sub(cpu, "model", spec.tcg_cpu, fallback="forbid")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", spec.on_poweroff)
    _sub(dom, "on_reboot", spec.on_reboot)
    _sub(dom, "on_crash", spec.on_crash)

    devs = _sub(dom, "devices")
    vd_targets = iter(_disk_targets())
    hd_targets = iter(["hdc", "hdd", "hda", "hdb"])  # cdrom on the secondary IDE master: /dev/sr0
    for disk in spec.disks:
        _disk(devs, disk, next(hd_targets) if disk.device == "cdrom" else next(vd_targets))

    serial = _sub(devs, "serial", type="file")
    _sub(serial, "source", path=str(spec.serial_log))
    _sub(serial, "target", port="0")
    console = _sub(devs, "console", type="file")
    _sub(console, "source", path=str(spec.serial_log))
    _sub(console, "target", type="serial", port="0")
    rng = _sub(devs, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devs, "memballoon", model="none")

    qemu_args: list[str] = []
    if spec.nic is not None:
        netdev = "user,id=n0"
        if spec.nic.restrict:
            netdev += ",restrict=on"
        for host_port, guest_port in spec.nic.host_forwards:
            netdev += f",hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"
        # romfile= (none): no iPXE option ROM for SeaBIOS to load and run at every boot; nothing
        # here boots from the network.
        qemu_args += ["-netdev", netdev, "-device",
                      f"virtio-net-pci,netdev=n0,mac={spec.nic.mac},bus=pci.0,addr={NIC_PCI_ADDR},romfile="]
    qemu_args += list(spec.extra_qemu_args)
    if qemu_args:
        cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        for arg in qemu_args:
            ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": arg})

    ET.indent(dom, space="  ")
    return ET.tostring(dom, encoding="unicode") + "\n"
