"""A faster direct boot for kickgate's own short-lived VMs (the bootstrap method's finish VM).

Under TCG two costs come before any of the image's own work runs in such a VM:
- the bzImage decompressing its kernel on the emulated CPU (~4 s for a 65 MB xz payload);
- the image's initramfs (udev, module probing) just to mount one virtio disk (~5 s).
QEMU boots an uncompressed kernel ELF through its PVH entry point, so the payload is decompressed
once on the host instead; and a small busybox initramfs loads the few modules the root needs from
the image's own module tree and switches to it. Both are the image's kernel and modules, only
unpacked differently. Each falls back to the image's own file when it cannot be made (no PVH entry
note, an unknown compression, a module or a static busybox missing): that VM is then only slower.
The instances under test never boot this way: they go through the image's GRUB, kernel and
initramfs exactly as shipped.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import CommandError
from builder.fsutil import atomic_output
from builder.initrd import CpioEntry, newc_archive
from builder.run import run

log = logging.getLogger(__name__)

_XZ = b"\xfd7zXZ\x00"
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_PT_INTERP = 3
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the note QEMU looks for to boot an ELF kernel through PVH
INITRAMFS_MARK = "kickgate-initramfs:"  # every line the small initramfs prints starts with it

# /init of the root initramfs. Modules are loaded in the order of their file names (dependencies
# first); root=, init= and rw come from the kernel command line as with any initramfs.
_INIT = """\
#!/bin/busybox sh
# kickgate's direct-boot initramfs: load the root's drivers, mount it, hand over to init=.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /modules/*.ko; do
    insmod "$m" || echo "kickgate-initramfs: insmod $m failed"
done
root="" init=/sbin/init mode=ro
for arg in $(cat /proc/cmdline); do
    case $arg in root=*) root=${arg#root=} ;; init=*) init=${arg#init=} ;; rw) mode=rw ;; esac
done
dev=""
i=0
while [ $i -lt 300 ]; do
    case $root in
        UUID=*|LABEL=*) dev=$(findfs "$root" 2>/dev/null) ;;
        *) [ -b "$root" ] && dev=$root ;;
    esac
    [ -n "$dev" ] && break
    sleep 0.1
    i=$((i + 1))
done
# Leaving /init makes the kernel panic, which the host sees on the console at once.
[ -n "$dev" ] || { echo "kickgate-initramfs: root device $root not found"; exit 1; }
mount -o "$mode" "$dev" /newroot || { echo "kickgate-initramfs: cannot mount $dev"; exit 1; }
echo "kickgate-initramfs: $dev mounted $mode, starting $init"
for d in dev proc sys; do
    [ -d "/newroot/$d" ] && mount --move "/$d" "/newroot/$d"
done
# Arguments after "--" on the kernel command line are ours; they belong to the real init.
exec switch_root /newroot "$init" "$@"
"""


@dataclass(frozen=True)
class BootFiles:
    """What a direct-boot domain gets; fast tells whether the PVH kernel and own initramfs are used."""

    kernel: Path
    initrd: Path
    fast_kernel: bool
    fast_initrd: bool


def _u32(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", data, off)[0])


def bzimage_payload(data: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage, located through the boot protocol header."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        return None
    setup_sects = data[0x1F1] or 4
    start = (setup_sects + 1) * 512 + _u32(data, 0x248)
    length = _u32(data, 0x24C)
    if length == 0 or start + length > len(data):
        return None
    return data[start:start + length]


def decompress(payload: bytes, workdir: Path) -> bytes | None:
    """Decompress a kernel payload (xz, gzip or zstd); None for another format.

    The kernel build appends the uncompressed size (4 bytes) after the compressed stream.
    """
    if payload.startswith(_XZ):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(_GZIP):
        return zlib.decompressobj(wbits=31).decompress(payload)
    if payload.startswith(_ZSTD):
        return _unzstd(payload[:-4], workdir)
    return None


def _unzstd(data: bytes, workdir: Path) -> bytes | None:
    """zstd-compressed data unpacked with the zstd tool (the stdlib has no zstd); None if it cannot."""
    if not shutil.which("zstd"):
        return None
    src = workdir / "data.zst"
    dst = workdir / "data"
    src.write_bytes(data)
    try:
        run(["zstd", "-q", "-d", "-f", "-o", str(dst), str(src)], timeout=120)
        return dst.read_bytes()
    except CommandError as exc:
        log.info("direct boot: zstd could not unpack: %s", exc)
        return None
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def _program_headers(elf: bytes) -> Iterable[tuple[int, int, int]]:
    """(type, file offset, file size) of each program header of a 64-bit little-endian ELF."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return
    phoff = int(struct.unpack_from("<Q", elf, 0x20)[0])
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 0x28 > len(elf):
            return
        p_type = _u32(elf, off)
        p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<QQQQ", elf, off + 8)
        yield p_type, int(p_offset), int(p_filesz)


def has_pvh_entry(elf: bytes) -> bool:
    for p_type, off, size in _program_headers(elf):
        if p_type != _PT_NOTE:
            continue
        pos, end = off, min(off + size, len(elf))
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def is_static_elf(path: Path) -> bool:
    data = path.read_bytes()
    return data[:4] == b"\x7fELF" and not any(t == _PT_INTERP for t, _o, _s in _program_headers(data))


def pvh_kernel(bzimage: Path, out: Path) -> bool:
    """Write the kernel ELF of bzimage to out if QEMU can boot it through PVH; False if not."""
    payload = bzimage_payload(bzimage.read_bytes())
    if payload is None:
        return False
    with tempfile.TemporaryDirectory(prefix="kg-kernel-", dir=out.parent) as tmp:
        try:
            elf = decompress(payload, Path(tmp))
        except (lzma.LZMAError, zlib.error) as exc:
            log.info("direct boot: cannot unpack %s: %s", bzimage, exc)
            return False
    if elf is None or not has_pvh_entry(elf):
        return False
    with atomic_output(out) as tmp_out:
        tmp_out.write_bytes(elf)
    return True


def _module_key(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    for suffix in (".xz", ".gz", ".zst"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def module_load_order(modules_dep: str, wanted: Sequence[str], builtin: str = "") -> list[str] | None:
    """Paths (relative to the module tree) of wanted and their dependencies, dependencies first.

    A wanted module listed in modules.builtin (builtin) needs nothing; None when one is neither.
    """
    built_in = {_module_key(line) for line in builtin.split()}
    wanted = [w for w in wanted if _module_key(w) not in built_in]
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in modules_dep.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[_module_key(path)] = (path.strip(), rest.split())
    order: list[str] = []
    seen: set[str] = set()

    def visit(key: str) -> bool:
        if key in seen:
            return True
        seen.add(key)
        if key not in deps:
            return False
        path, requires = deps[key]
        for dep in requires:
            if not visit(_module_key(dep)):
                return False
        order.append(path)
        return True

    for name in wanted:
        if not visit(_module_key(name)):
            log.info("direct boot: no module %s in modules.dep", name)
            return None
    return order


def _module_bytes(path: Path, workdir: Path) -> bytes | None:
    data = path.read_bytes()
    if path.suffix == ".ko":
        return data
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        return _unzstd(data, workdir)
    return None


def modules_to_load(modules_dir: Path, wanted: Sequence[str]) -> list[str] | None:
    """module_load_order() from a module tree's own modules.dep and modules.builtin; None without
    modules.dep or when a wanted module is neither there nor built in."""
    dep_file = modules_dir / "modules.dep"
    if not dep_file.is_file():
        return None
    builtin = modules_dir / "modules.builtin"
    return module_load_order(dep_file.read_text(), wanted, builtin.read_text() if builtin.is_file() else "")


def root_initramfs(modules_dir: Path, wanted: Sequence[str], out: Path,
                   busybox: Path | None = None) -> bool:
    """Write an uncompressed initramfs that loads wanted (with dependencies) and mounts root=."""
    bb = busybox or Path(shutil.which("busybox") or "/bin/busybox")
    if not bb.is_file() or not is_static_elf(bb):
        log.info("direct boot: no static busybox: using the image's initramfs")
        return False
    order = modules_to_load(modules_dir, wanted)
    if order is None:
        log.info("direct boot: the modules in %s cannot mount the root: using the image's initramfs", modules_dir)
        return False
    entries = [CpioEntry.directory(d) for d in ("bin", "dev", "proc", "sys", "newroot", "modules")]
    entries += [CpioEntry.chardev("dev/console", 5, 1), CpioEntry.chardev("dev/null", 1, 3, 0o666),
                CpioEntry.file("bin/busybox", bb.read_bytes(), 0o755), CpioEntry.file("init", _INIT.encode(), 0o755)]
    with tempfile.TemporaryDirectory(prefix="kg-mods-", dir=out.parent) as tmp:
        for i, rel in enumerate(order):
            data = _module_bytes(modules_dir / rel, Path(tmp)) if (modules_dir / rel).is_file() else None
            if not data:
                log.info("direct boot: cannot unpack module %s", rel)
                return False
            entries.append(CpioEntry.file(f"modules/{i:02d}-{_module_key(rel)}.ko", data, 0o644))
    with atomic_output(out) as tmp_out:
        tmp_out.write_bytes(newc_archive(entries))
    return True


def prepare(kernel: Path, initrd: Path, modules_dir: Path, outdir: Path, modules: Sequence[str]) -> BootFiles:
    """Direct-boot files for an image's kernel (its modules in modules_dir): the fast ones where
    possible, else kernel and initrd themselves."""
    fast_kernel = pvh_kernel(kernel, outdir / "vmlinux")
    fast_initrd = root_initramfs(modules_dir, modules, outdir / "initramfs.cpio")
    files = BootFiles(kernel=outdir / "vmlinux" if fast_kernel else kernel,
                      initrd=outdir / "initramfs.cpio" if fast_initrd else initrd,
                      fast_kernel=fast_kernel, fast_initrd=fast_initrd)
    log.info("direct boot: %s kernel, %s initramfs", "PVH (unpacked on the host)" if fast_kernel else "the bzImage",
             "kickgate's small" if fast_initrd else "the image's")
    return files

