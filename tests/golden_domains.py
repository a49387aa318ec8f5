"""The domain specs and single disks whose XML is kept in tests/golden/ (compared by test_domain.py, written by
update_golden.py)."""

from __future__ import annotations

from pathlib import Path

from builder.domain import Disk, DomainSpec, Nic, disk_xml, domain_xml

GOLDEN = Path(__file__).parent / "golden"
MAC = "52:54:00:12:34:56"

SPECS: dict[str, DomainSpec] = {
    # The bootstrap finish VM: direct kernel boot, raw disk, no route out, KVM.
    "kernel-boot-kvm": DomainSpec(
        name="kg-build-generic-dev-abc123", type="kvm", memory_mib=1024, vcpus=1,
        serial_log=Path("/var/cache/kickgate/tmp/generic-dev-x/out/serial.log"),
        disks=(Disk(Path("/var/cache/kickgate/tmp/generic-dev-x/work/disk.raw"), "raw", cache="unsafe"),),
        kernel=Path("/var/cache/kickgate/tmp/generic-dev-x/work/vmlinuz"),
        initrd=Path("/var/cache/kickgate/tmp/generic-dev-x/work/initrd.img"),
        cmdline="root=UUID=0f3c3e59-2f43-4a7c-9a53-5c1f0f6c3a10 rw console=ttyS0,115200 panic=-1",
        nic=Nic(mac=MAC, restrict=True)),
    # A throwaway test instance: disk boot from a qcow2 overlay + context CD, ssh forward, TCG.
    "disk-boot-qemu": DomainSpec(
        name="kg-test-generic-dev-def456", type="qemu", memory_mib=2048, vcpus=2,
        serial_log=Path("/tmp/kg-test/serial.log"),
        disks=(Disk(Path("/tmp/kg-test/overlay.qcow2"), "qcow2"),
               Disk(Path("/tmp/kg-test/context.iso"), "raw", device="cdrom")),
        nic=Nic(mac=MAC, host_forwards=((40022, 22), (40080, 80))),
        on_reboot="restart", uuid="3f1c9a52-7f0e-4b1e-8c55-1a2b3c4d5e6f"),
    # No NIC at all: no qemu:commandline element.
    "no-nic": DomainSpec(
        name="kg-plain", type="qemu", memory_mib=512, vcpus=1, serial_log=Path("/tmp/plain/serial.log"),
        disks=(Disk(Path("/tmp/plain/disk.qcow2")),)),
}


# Disks attached to a running domain: (disk, target in the domain).
DISKS: dict[str, tuple[Disk, str]] = {
    # An instance's pristine view of its image: a read-only overlay the guest finds by its serial.
    "pristine": (Disk(Path("/tmp/kg-inst-generic-dev-abc/pristine.qcow2"), "qcow2", readonly=True,
                      serial="kickgate-pristine"), "vdb"),
}


def golden_path(name: str, directory: Path | None = None) -> Path:
    return (directory or GOLDEN) / f"domain-{name}.xml"


def golden_disk_path(name: str, directory: Path | None = None) -> Path:
    return (directory or GOLDEN) / f"disk-{name}.xml"


def golden_files(directory: Path | None = None) -> dict[Path, str]:
    """Every golden file (under directory, default GOLDEN) and the XML it must hold."""
    files = {golden_path(n, directory): domain_xml(s) for n, s in SPECS.items()}
    files.update({golden_disk_path(n, directory): disk_xml(d, t) for n, (d, t) in DISKS.items()})
    return files
