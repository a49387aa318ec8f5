"""Domain XML: golden files (reviewed by eye), libvirt's schema, and the structure each build relies on.

The golden files are rewritten only by `python tests/update_golden.py`; review its diff before committing.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import golden_domains
import pytest
from golden_domains import DISKS, GOLDEN, MAC, SPECS, golden_disk_path, golden_files, golden_path

from builder import domain
from builder.domain import NIC_PCI_ADDR, QEMU_NS, Disk, DomainSpec, Nic, disk_xml, domain_xml, random_mac
from conftest import Need

Q = f"{{{QEMU_NS}}}"


def test_every_golden_file_is_used() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("domain-*.xml")) == sorted(f"domain-{n}" for n in SPECS)
    assert sorted(p.stem for p in GOLDEN.glob("disk-*.xml")) == sorted(f"disk-{n}" for n in DISKS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_domain_xml_matches_golden(name: str) -> None:
    golden = golden_path(name)
    assert domain_xml(SPECS[name]) == golden.read_text(), \
        f"{golden} differs; if the change is meant, run python tests/update_golden.py and review the diff"


@pytest.mark.parametrize("name", sorted(DISKS))
def test_disk_xml_matches_golden(name: str) -> None:
    golden = golden_disk_path(name)
    assert disk_xml(*DISKS[name]) == golden.read_text(), \
        f"{golden} differs; if the change is meant, run python tests/update_golden.py and review the diff"


def test_a_differing_golden_file_fails_and_is_left_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Whatever the environment says, the test run only compares: tests/update_golden.py writes.
    monkeypatch.setattr(golden_domains, "GOLDEN", tmp_path)
    monkeypatch.setenv("KICKGATE_UPDATE_GOLDEN", "1")
    name = sorted(SPECS)[0]
    stale = golden_path(name)
    stale.write_text("<domain/>\n")
    with pytest.raises(AssertionError, match=r"update_golden\.py"):
        test_domain_xml_matches_golden(name)
    assert stale.read_text() == "<domain/>\n"


def test_update_golden_writes_what_the_test_compares(repo_root: Path, tmp_path: Path) -> None:
    (tmp_path / "domain-gone.xml").write_text("<domain/>\n")
    (tmp_path / "disk-gone.xml").write_text("<disk/>\n")
    (tmp_path / f"domain-{sorted(SPECS)[0]}.xml").write_text("<domain/>\n")
    res = subprocess.run([sys.executable, str(repo_root / "tests" / "update_golden.py"), "--golden-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=60, check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"domain-{n}.xml" for n in SPECS] + [f"disk-{n}.xml" for n in DISKS])
    for name, spec in SPECS.items():
        assert (tmp_path / f"domain-{name}.xml").read_text() == domain_xml(spec)
    for name, (disk, target) in DISKS.items():
        assert (tmp_path / f"disk-{name}.xml").read_text() == disk_xml(disk, target)
    assert golden_files(tmp_path) == {p: p.read_text() for p in tmp_path.iterdir()}
    assert "removed" in res.stdout and "domain-gone.xml" in res.stdout and "disk-gone.xml" in res.stdout


@pytest.fixture(scope="module")
def libvirt_test_conn(need: Need) -> Iterator[Any]:
    """libvirt's own parser and RNG schema, through the in-process test driver (no daemon, no QEMU)."""
    need.module("libvirt", "libvirt-python, which ci/setup builds against libvirt-dev")
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def define(conn: Any, xml: str) -> None:
    import libvirt

    dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    dom.undefine()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_domain_xml_accepted_by_libvirt(name: str, libvirt_test_conn: Any) -> None:
    define(libvirt_test_conn, domain_xml(SPECS[name]))


@pytest.mark.parametrize("name", sorted(DISKS))
def test_disk_xml_accepted_by_libvirt(name: str, libvirt_test_conn: Any) -> None:
    # libvirt validates a device against the domain schema: the disk goes into a domain's devices.
    xml = domain_xml(SPECS["disk-boot-qemu"]).replace("<devices>", "<devices>\n" + disk_xml(*DISKS[name]), 1)
    assert xml.count('<disk type="file"') == 3
    define(libvirt_test_conn, xml)


def test_pristine_disk_is_read_only_and_named_by_its_serial() -> None:
    disk, target = DISKS["pristine"]
    el = ET.fromstring(disk_xml(disk, target))
    assert el.attrib == {"type": "file", "device": "disk"}
    assert el.find("readonly") is not None
    # Read-only: no cache mode, nothing is ever flushed.
    assert el.find("driver").attrib == {"name": "qemu", "type": "qcow2"}  # type: ignore[union-attr]
    assert el.find("target").attrib == {"dev": "vdb", "bus": "virtio"}  # type: ignore[union-attr]
    assert el.findtext("serial") == "kickgate-pristine"


def test_a_disk_without_serial_has_no_serial_element() -> None:
    el = ET.fromstring(disk_xml(Disk(Path("/tmp/x.qcow2")), "vdc"))
    assert el.find("serial") is None and el.find("readonly") is None
    assert el.find("driver").attrib["cache"] == "unsafe"  # type: ignore[union-attr]


def test_libvirt_validation_is_real(libvirt_test_conn: Any) -> None:
    import libvirt

    broken = domain_xml(SPECS["disk-boot-qemu"]).replace('<target dev="hdc" bus="ide" />', '<target bus="ide" />')
    with pytest.raises(libvirt.libvirtError, match="schema"):
        define(libvirt_test_conn, broken)


def parse(spec: DomainSpec) -> ET.Element:
    return ET.fromstring(domain_xml(spec))


def qemu_args(root: ET.Element) -> list[str]:
    cmd = root.find(f"{Q}commandline")
    return [] if cmd is None else [a.attrib["value"] for a in cmd.findall(f"{Q}arg")]


def test_kernel_boot_structure() -> None:
    spec = SPECS["kernel-boot-kvm"]
    root = parse(spec)
    os_el = root.find("os")
    assert os_el is not None
    assert os_el.findtext("kernel") == str(spec.kernel)
    assert os_el.findtext("initrd") == str(spec.initrd)
    assert os_el.findtext("cmdline") == spec.cmdline
    assert os_el.find("boot") is None
    assert root.attrib["type"] == "kvm"
    assert root.find("cpu").attrib["mode"] == "host-passthrough"  # type: ignore[union-attr]
    assert root.findtext("on_reboot") == "destroy"
    assert root.findtext("on_poweroff") == "destroy"
    assert root.find("memory").attrib["unit"] == "MiB" and root.findtext("memory") == "1024"  # type: ignore[union-attr]


def test_disk_boot_structure() -> None:
    root = parse(SPECS["disk-boot-qemu"])
    os_el = root.find("os")
    assert os_el is not None
    assert os_el.find("kernel") is None and os_el.find("cmdline") is None
    assert os_el.find("boot").attrib == {"dev": "hd"}  # type: ignore[union-attr]
    assert root.find("cpu").attrib["mode"] == "maximum"  # type: ignore[union-attr]
    assert root.findtext("on_reboot") == "restart"
    assert root.findtext("uuid") == "3f1c9a52-7f0e-4b1e-8c55-1a2b3c4d5e6f"


def test_overlay_disk_and_context_cdrom() -> None:
    root = parse(SPECS["disk-boot-qemu"])
    disk, cdrom = root.findall("devices/disk")
    assert disk.attrib["device"] == "disk"
    # A throwaway overlay: the guest's flushes need not reach the host's storage.
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "unsafe"}  # type: ignore[union-attr]
    assert disk.find("source").attrib["file"] == "/tmp/kg-test/overlay.qcow2"  # type: ignore[union-attr]
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]
    assert disk.find("readonly") is None
    assert cdrom.attrib["device"] == "cdrom"
    assert cdrom.find("driver").attrib == {"name": "qemu", "type": "raw"}  # type: ignore[union-attr]
    assert cdrom.find("source").attrib["file"] == "/tmp/kg-test/context.iso"  # type: ignore[union-attr]
    assert cdrom.find("target").attrib == {"dev": "hdc", "bus": "ide"}  # type: ignore[union-attr]
    assert cdrom.find("readonly") is not None


def test_serial_console_goes_to_log_file() -> None:
    spec = SPECS["disk-boot-qemu"]
    root = parse(spec)
    serial = root.find("devices/serial")
    console = root.find("devices/console")
    assert serial is not None and console is not None
    assert serial.attrib["type"] == "file" and console.attrib["type"] == "file"
    assert serial.find("source").attrib["path"] == str(spec.serial_log)  # type: ignore[union-attr]
    assert console.find("source").attrib["path"] == str(spec.serial_log)  # type: ignore[union-attr]


def test_nic_forwards_only_on_localhost_at_fixed_pci_slot() -> None:
    args = qemu_args(parse(SPECS["disk-boot-qemu"]))
    assert args[0] == "-netdev" and args[2] == "-device"
    netdev = args[1].split(",")
    assert netdev[:2] == ["user", "id=n0"]
    forwards = [p for p in netdev if p.startswith("hostfwd=")]
    assert forwards == ["hostfwd=tcp:127.0.0.1:40022-:22", "hostfwd=tcp:127.0.0.1:40080-:80"]
    assert "restrict=on" not in netdev
    device = dict(p.split("=", 1) for p in args[3].split(",")[1:])
    assert args[3].startswith("virtio-net-pci,")
    # No option ROM: SeaBIOS would load and run iPXE at every boot, and nothing boots from the network.
    assert device == {"netdev": "n0", "mac": MAC, "bus": "pci.0", "addr": "0x10", "romfile": ""}
    assert NIC_PCI_ADDR == "0x10"


def test_restricted_nic() -> None:
    args = qemu_args(parse(SPECS["kernel-boot-kvm"]))
    netdev = args[args.index("-netdev") + 1].split(",")
    assert "restrict=on" in netdev
    assert not [p for p in netdev if p.startswith("hostfwd=")]


def test_no_nic_no_commandline() -> None:
    root = parse(SPECS["no-nic"])
    assert root.find(f"{Q}commandline") is None
    assert root.find("devices/interface") is None


def test_extra_qemu_args_follow_nic() -> None:
    spec = DomainSpec(name="x", type="qemu", memory_mib=512, vcpus=1, serial_log=Path("/tmp/s.log"),
                      disks=(), nic=Nic(mac=MAC), extra_qemu_args=("-smbios", "type=1,serial=ds=nocloud"))
    args = qemu_args(parse(spec))
    assert args[-2:] == ["-smbios", "type=1,serial=ds=nocloud"]
    assert args[0] == "-netdev"


def test_commandline_is_in_qemu_namespace() -> None:
    xml = domain_xml(SPECS["disk-boot-qemu"])
    assert f'xmlns:qemu="{QEMU_NS}"' in xml
    assert "<qemu:commandline>" in xml
    assert QEMU_NS == "http://libvirt.org/schemas/domain/qemu/1.0"


def test_names_are_escaped() -> None:
    spec = DomainSpec(name="a&b", type="qemu", memory_mib=512, vcpus=1, serial_log=Path("/tmp/<odd>&.log"),
                      disks=(), kernel=Path("/k"), cmdline="console=ttyS0 x=\"<y>\"")
    root = parse(spec)
    assert root.findtext("name") == "a&b"
    assert root.findtext("os/cmdline") == "console=ttyS0 x=\"<y>\""
    assert root.find("devices/serial/source").attrib["path"] == "/tmp/<odd>&.log"  # type: ignore[union-attr]


def test_random_mac_is_the_prefix_and_three_bytes_of_the_os_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def token_bytes(n: int) -> bytes:
        asked.append(n)
        return bytes([0x00, 0xAB, 0xFF])

    monkeypatch.setattr(domain.secrets, "token_bytes", token_bytes)
    assert random_mac() == "52:54:00:00:ab:ff"
    assert random_mac("02:00:00") == "02:00:00:00:ab:ff"
    assert asked == [3, 3]


def test_random_mac_varies_every_one_of_its_24_bits() -> None:
    # A property, not luck: with 64 draws a given bit stays the same in all of them with
    # probability 2**-63, so this fails by chance about once in 4e17 runs; a generator that
    # fixes any bit (or repeats itself) fails every time.
    assert domain.secrets is secrets
    macs = [random_mac() for _ in range(64)]
    for mac in macs:
        assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac), mac
    values = [int(mac[9:].replace(":", ""), 16) for mac in macs]
    ones = 0
    zeros = 0
    for v in values:
        ones |= v
        zeros |= ~v & 0xFFFFFF
    assert ones == 0xFFFFFF, f"bits never set: {~ones & 0xFFFFFF:06x}"
    assert zeros == 0xFFFFFF, f"bits never clear: {~zeros & 0xFFFFFF:06x}"


def test_tcg_cpu_model_only_for_qemu(libvirt_test_conn: Any) -> None:
    base = SPECS["no-nic"]
    custom = DomainSpec(**{**base.__dict__, "tcg_cpu": "Haswell-noTSX"})
    cpu = parse(custom).find("cpu")
    assert cpu is not None and cpu.attrib == {"mode": "custom", "match": "exact"}
    assert cpu.findtext("model") == "Haswell-noTSX"
    assert cpu.find("model").attrib == {"fallback": "forbid"}  # type: ignore[union-attr]
    define(libvirt_test_conn, domain_xml(custom))
    kvm = DomainSpec(**{**custom.__dict__, "type": "kvm"})
    assert parse(kvm).find("cpu").attrib == {"mode": "host-passthrough"}  # type: ignore[union-attr]
