"""The finish VM's fast direct boot: the kernel unpacked on the host for PVH, and the small initramfs."""

from __future__ import annotations

import gzip
import lzma
import shutil
import stat
import struct
from pathlib import Path

import pytest

from builder import directboot
from builder.initrd import iter_newc


def _elf(notes: list[tuple[bytes, int]]) -> bytes:
    """A minimal 64-bit little-endian ELF whose one program header is a PT_NOTE holding notes."""
    body = b""
    for name, n_type in notes:
        name_z = name + b"\0"
        desc = struct.pack("<I", 0x1000000)
        body += struct.pack("<III", len(name_z), len(desc), n_type)
        body += name_z.ljust((len(name_z) + 3) // 4 * 4, b"\0") + desc
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 64 + 56, 0, 0, len(body), len(body), 4)
    return bytes(ehdr) + phdr + body


def _bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    """A bzImage-shaped file: boot sector, setup sectors, then the payload with its size trailer."""
    data = bytearray((setup_sects + 1) * 512)
    data[0x1F1] = setup_sects
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x20F)
    pm_prefix = b"\x90" * 100  # the decompressor stub before the payload
    struct.pack_into("<I", data, 0x248, len(pm_prefix))
    struct.pack_into("<I", data, 0x24C, len(payload) + 4)
    return bytes(data) + pm_prefix + payload + struct.pack("<I", 12345)


PVH_ELF = _elf([(b"GNU", 3), (b"Xen", 18)])


@pytest.mark.parametrize("compress", [lzma.compress, gzip.compress], ids=["xz", "gzip"])
def test_pvh_kernel_unpacks_the_payload(tmp_path: Path, compress: object) -> None:
    src = tmp_path / "vmlinuz"
    src.write_bytes(_bzimage(compress(PVH_ELF)))  # type: ignore[operator]
    assert directboot.pvh_kernel(src, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == PVH_ELF


def test_pvh_kernel_refuses_an_elf_without_the_pvh_note(tmp_path: Path) -> None:
    src = tmp_path / "vmlinuz"
    src.write_bytes(_bzimage(lzma.compress(_elf([(b"GNU", 3), (b"Xen", 17)]))))
    assert not directboot.pvh_kernel(src, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()


@pytest.mark.parametrize("data", [b"MZ" + b"\0" * 4000, _bzimage(b"\x02\x21\x4c\x18" + b"lz4 data")],
                         ids=["not a bzImage", "lz4 payload"])
def test_pvh_kernel_falls_back_on_what_it_cannot_unpack(tmp_path: Path, data: bytes) -> None:
    src = tmp_path / "vmlinuz"
    src.write_bytes(data)
    assert not directboot.pvh_kernel(src, tmp_path / "vmlinux")
    assert list(tmp_path.iterdir()) == [src]  # nothing half-written


def test_pvh_kernel_unpacks_zstd(tmp_path: Path) -> None:
    import subprocess

    assert shutil.which("zstd"), "ci/setup installs zstd (trixie's kernel is zstd-compressed)"
    packed = subprocess.run(["zstd", "-q", "-c"], input=PVH_ELF, capture_output=True, check=True).stdout
    src = tmp_path / "vmlinuz"
    src.write_bytes(_bzimage(packed))
    assert directboot.pvh_kernel(src, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == PVH_ELF


def test_the_host_debian_kernel_unpacks_to_a_pvh_elf(tmp_path: Path) -> None:
    # ci/setup installs linux-image-amd64; Debian builds it with CONFIG_PVH.
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    assert kernels, "no /boot/vmlinuz-*: ci/setup installs linux-image-amd64"
    assert directboot.pvh_kernel(kernels[-1], tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes()[:4] == b"\x7fELF"


DEP = """\
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/net/virtio-net.ko: kernel/drivers/virtio/virtio_ring.ko
"""


def test_module_order_puts_dependencies_first_once() -> None:
    order = directboot.module_load_order(DEP, ["ext4", "virtio_blk", "virtio_net"])
    assert order == ["kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko", "kernel/fs/ext4/ext4.ko",
                     "kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/block/virtio_blk.ko.xz",
                     "kernel/drivers/net/virtio-net.ko"]


def test_module_order_skips_built_in_modules_and_refuses_unknown_ones() -> None:
    assert directboot.module_load_order(DEP, ["virtio_pci", "ext4"], builtin="kernel/drivers/virtio/virtio_pci.ko\n")
    assert directboot.module_load_order(DEP, ["virtio_pci", "ext4"]) is None


def _modules_tree(root: Path) -> Path:
    mods = root / "lib/modules/6.1.0-test"
    for line in DEP.splitlines():
        rel = line.split(":")[0]
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        content = f"module {rel}".encode()
        (mods / rel).write_bytes(lzma.compress(content) if rel.endswith(".xz") else content)
    (mods / "modules.dep").write_text(DEP)
    return mods


def test_root_initramfs_holds_busybox_init_and_unpacked_modules(tmp_path: Path) -> None:
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    assert directboot.is_static_elf(busybox), "ci/setup installs busybox-static"
    mods = _modules_tree(tmp_path)
    out = tmp_path / "initramfs.cpio"
    assert directboot.root_initramfs(mods, ["virtio_blk", "ext4"], out)
    members = {m.name: m for m in iter_newc(out.read_bytes())}
    assert members["init"].mode & 0o111 and members["init"].data.startswith(b"#!/bin/busybox sh")
    assert members["bin/busybox"].data == busybox.read_bytes()
    assert stat.S_ISCHR(members["dev/console"].mode)
    loaded = sorted(n for n in members if n.startswith("modules/"))
    assert loaded == ["modules/00-virtio_ring.ko", "modules/01-virtio_blk.ko", "modules/02-jbd2.ko",
                      "modules/03-mbcache.ko", "modules/04-crc16.ko", "modules/05-ext4.ko"]
    # The .ko.xz was unpacked on the host: busybox insmod takes plain modules only.
    assert members["modules/01-virtio_blk.ko"].data == b"module kernel/drivers/block/virtio_blk.ko.xz"


def test_root_initramfs_unpacks_zstd_modules(tmp_path: Path) -> None:
    import subprocess

    mods = tmp_path / "lib/modules/6.12.0-test"
    (mods / "kernel/fs").mkdir(parents=True)
    packed = subprocess.run(["zstd", "-q", "-c"], input=b"ext4 module", capture_output=True, check=True).stdout
    (mods / "kernel/fs/ext4.ko.zst").write_bytes(packed)
    (mods / "modules.dep").write_text("kernel/fs/ext4.ko.zst:\n")
    out = tmp_path / "initramfs.cpio"
    assert directboot.root_initramfs(mods, ["ext4"], out)
    members = {m.name: m for m in iter_newc(out.read_bytes())}
    assert members["modules/00-ext4.ko"].data == b"ext4 module"


def test_root_initramfs_falls_back_without_a_static_busybox(tmp_path: Path) -> None:
    mods = _modules_tree(tmp_path)
    dynamic = Path("/bin/sh").resolve()
    assert not directboot.root_initramfs(mods, ["ext4"], tmp_path / "initramfs.cpio", busybox=dynamic)
    assert not (tmp_path / "initramfs.cpio").exists()


def test_prepare_names_what_it_could_not_speed_up(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd")
    out = tmp_path / "boot"
    out.mkdir()
    files = directboot.prepare(kernel, initrd, tmp_path / "no-modules", out, ["ext4"])
    assert files == directboot.BootFiles(kernel=kernel, initrd=initrd, fast_kernel=False, fast_initrd=False)
