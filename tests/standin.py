"""A stand-in installer for the kickstart method's tests (no RHEL-family mirror is reachable here).

It is a real install tree (``.treeinfo``, ``images/pxeboot/vmlinuz``, ``images/pxeboot/initrd.img``)
whose kernel is the host's Debian kernel (package linux-image-amd64: /boot/vmlinuz-* plus its
modules) and whose initrd is a tiny xz-compressed initramfs built here from busybox-static:
its /init plays Anaconda's part just far enough to prove the kickstart method end to end:

* mounts proc/sys/devtmpfs, finds the injected /ks.cfg and checks it (a %post, the success
  marker), prints its sha256;
* loads virtio_pci/virtio_blk (and virtio_net) from the host's modules, copied in with their
  dependencies, so /dev/vda (the target disk) and eth0 exist;
* fetches ``inst.repo``'s ``.treeinfo`` over the network when inst.repo is http (a local tree
  that kickgate serves itself);
* writes a marker block to /dev/vda (offset 0), prints a package listing between the package
  markers and ``KICKGATE-INSTALL-OK``, and powers off.

``standin=hang`` (kernel argument, from the recipe's extra_args) makes it print one line and
hang; ``standin=nomarker`` powers off without the marker; ``standin=fail`` prints the failure
marker.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from builder.initrd import CpioEntry, newc_archive
from builder.recipe import Recipe, RecipeBook
from builder.run import run

REPO_ROOT = Path(__file__).resolve().parent.parent
BUSYBOX = Path("/bin/busybox")
DISK_MARKER = b"KICKGATE-STANDIN-DISK"
# Enough for /dev/vda and eth0 under QEMU's virtio-pci; dependencies are resolved by modinfo.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net")

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
exec </dev/console >/dev/console 2>&1

off() { sync; poweroff -f; sleep 30; }
fail() { echo "KICKGATE-INSTALL-FAILED stand-in: $*"; off; }

echo "stand-in: started"
mode=normal
repo=""
for arg in $(cat /proc/cmdline); do
    case $arg in
        standin=*) mode=${arg#standin=} ;;
        inst.repo=*) repo=${arg#inst.repo=} ;;
    esac
done

case $mode in
    hang) echo "stand-in: hanging on purpose"; while :; do sleep 3600; done ;;
    nomarker) echo "stand-in: powering off without the marker"; off ;;
    fail) fail "failing on purpose" ;;
esac

[ -f /ks.cfg ] || fail "no /ks.cfg in the initramfs"
grep -q '^%post' /ks.cfg || fail "/ks.cfg has no %post section"
grep -q 'KICKGATE-INSTALL-OK' /ks.cfg || fail "/ks.cfg does not print the success marker"
ks_sum=$(sha256sum /ks.cfg | cut -d' ' -f1)
echo "stand-in: /ks.cfg found, $(wc -c < /ks.cfg) bytes, sha256 $ks_sum"

for m in $(cat /etc/standin-modules); do
    insmod "/lib/modules/$m" || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ $i -gt 100 ] && fail "no /dev/vda"; sleep 0.1
done

case $repo in
    http://*)
        ip link set lo up
        ip link set eth0 up || fail "no eth0"
        ip addr add 10.0.2.15/24 dev eth0
        ip route add default via 10.0.2.2
        # (busybox 1.35 wget segfaults with -T: bound it with timeout instead)
        if timeout 20 wget -q -O /tmp/treeinfo "${repo%/}/.treeinfo" &&
                grep -q '^\[general\]' /tmp/treeinfo; then
            echo "stand-in: inst.repo reachable: ${repo%/}/.treeinfo"
        else
            fail "inst.repo $repo not reachable"
        fi
        ;;
esac

{
    echo "KICKGATE-STANDIN-DISK"
    echo "ks.cfg sha256 $ks_sum"
    cat /proc/cmdline
} > /tmp/disk-marker
dd if=/tmp/disk-marker of=/dev/vda conv=notrunc,fsync 2>/dev/null || fail "cannot write /dev/vda"
echo "stand-in: marker written to /dev/vda"

echo "KICKGATE-PKGS-BEGIN"
echo "KICKGATE-PKG busybox 0:$(busybox | head -n 1 | cut -d' ' -f2 | tr -d v)-1 x86_64 busybox-1-1.src.rpm GPLv2"
echo "KICKGATE-PKG stand-in 0:1.0-1 x86_64 stand-in-1.0-1.src.rpm MIT"
echo "KICKGATE-PKGS-END"
echo "KICKGATE-INSTALL-OK stand-in"
off
"""


@dataclass(frozen=True)
class HostKernel:
    path: Path
    version: str
    modules: Path  # /lib/modules/<version>


def host_kernel() -> HostKernel | None:
    """The newest /boot/vmlinuz-* that can be read and has its modules installed."""
    for path in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        version = path.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / version
        try:
            with open(path, "rb"):
                pass
        except OSError:
            continue
        if modules.is_dir():
            return HostKernel(path=path, version=version, modules=modules)
    return None


def missing_prerequisites() -> str | None:
    """Why the stand-in cannot be built here, or None."""
    if not BUSYBOX.is_file():
        return f"{BUSYBOX} missing (install busybox-static)"
    if host_kernel() is None:
        return "no readable /boot/vmlinuz-* with /lib/modules (install linux-image-amd64)"
    for tool in ("modinfo", "qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} missing"
    return None


def _modinfo(kernel: HostKernel, name: str, field: str) -> str:
    return run(["modinfo", "-k", kernel.version, "-F", field, name], timeout=20).stdout.strip()


def module_files(kernel: HostKernel, names: tuple[str, ...] = MODULES) -> list[Path]:
    """Module files for names and their dependencies, dependencies first; built-ins skipped."""
    ordered: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in filter(None, _modinfo(kernel, name, "depends").split(",")):
            visit(dep.strip())
        filename = _modinfo(kernel, name, "filename")
        if filename and not filename.startswith("(builtin)"):
            ordered.append(Path(filename))

    for n in names:
        visit(n)
    return ordered


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix != ".ko":
        raise RuntimeError(f"{path}: compressed modules other than .ko.xz are not supported here")
    return data


def build_initramfs(kernel: HostKernel, dest: Path) -> Path:
    """An xz-compressed newc initramfs: busybox, the stand-in /init, virtio modules."""
    entries = [CpioEntry.directory(d) for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc",
                                                "sys", "tmp")]
    entries.append(CpioEntry.chardev("dev/console", 5, 1))
    entries.append(CpioEntry.file("bin/busybox", BUSYBOX.read_bytes(), 0o755))
    entries.append(CpioEntry.symlink("bin/sh", "busybox"))
    names = []
    for i, path in enumerate(module_files(kernel)):
        name = f"{i:02d}-{path.name.split('.ko')[0]}.ko"
        names.append(name)
        entries.append(CpioEntry.file(f"lib/modules/{name}", _module_bytes(path)))
    entries.append(CpioEntry.file("etc/standin-modules", ("\n".join(names) + "\n").encode()))
    entries.append(CpioEntry.file("init", INIT.encode(), 0o755))
    archive = newc_archive(entries)
    # What lorax does for Anaconda's initrd.img: xz with CRC32 (the kernel's xz needs it).
    dest.write_bytes(lzma.compress(archive, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
    return dest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def treeinfo(kernel_rel: str = "images/pxeboot/vmlinuz",
             initrd_rel: str = "images/pxeboot/initrd.img",
             checksums: dict[str, str] | None = None, product: str = "Stand-in Linux",
             version: str = "9.9") -> str:
    lines = [
        "[header]", "type = productmd.treeinfo", "version = 1.2", "",
        "[release]", f"name = {product}", "short = Standin", f"version = {version}", "",
        "[general]", "arch = x86_64", f"family = {product}", f"version = {version}",
        "platforms = x86_64", "", "[tree]", "arch = x86_64", "platforms = x86_64", "",
        "[images-x86_64]", f"kernel = {kernel_rel}", f"initrd = {initrd_rel}", "",
    ]
    if checksums:
        lines.append("[checksums]")
        lines += [f"{rel} = sha256:{digest}" for rel, digest in sorted(checksums.items())]
        lines.append("")
    return "\n".join(lines)


def make_tree(dest: Path, kernel_file: Path, initrd_file: Path, *, checksums: bool = True,
              kernel_rel: str = "images/pxeboot/vmlinuz",
              initrd_rel: str = "images/pxeboot/initrd.img", with_treeinfo: bool = True) -> Path:
    """An install tree: .treeinfo naming (and checksumming) the kernel and initrd."""
    for rel, src in ((kernel_rel, kernel_file), (initrd_rel, initrd_file)):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / rel)
    if with_treeinfo:
        sums = None
        if checksums:
            sums = {kernel_rel: sha256(kernel_file), initrd_rel: sha256(initrd_file)}
        (dest / ".treeinfo").write_text(treeinfo(kernel_rel, initrd_rel, sums))
    return dest


def make_iso(dest: Path, tree: Path, volume_id: str = "STANDIN-9-X86_64") -> Path:
    """An installer ISO of tree (ISO9660 + Rock Ridge + Joliet, like a real DVD), with pycdlib."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, rock_ridge="1.09", joliet=3, vol_ident=volume_id)
    counter = 0

    def iso_name(name: str, is_dir: bool) -> str:
        nonlocal counter
        counter += 1
        base = re.sub(r"[^A-Z0-9_]", "_", name.upper().split(".")[0])[:8] or f"F{counter}"
        return base if is_dir else f"{base}{counter:02d}.;1"

    def add(directory: Path, iso_dir: str, joliet_dir: str) -> None:
        for child in sorted(directory.iterdir()):
            ipath = f"{iso_dir.rstrip('/')}/{iso_name(child.name, child.is_dir())}"
            jpath = f"{joliet_dir.rstrip('/')}/{child.name}"
            if child.is_dir():
                iso.add_directory(ipath, rr_name=child.name, joliet_path=jpath)
                add(child, ipath, jpath)
            else:
                data = child.read_bytes()
                iso.add_fp(io.BytesIO(data), len(data), ipath, rr_name=child.name,
                           joliet_path=jpath)

    add(tree, "/", "/")
    iso.write(str(dest))
    iso.close()
    return dest


def recipe_copy(root: Path, location: str, *, memory: str = "512M", vcpus: int = 1,
                build_timeout: str = "60s", idle_timeout: str = "20s",
                extra_args: tuple[str, ...] = (), name: str = "generic-dev-el9") -> Recipe:
    """A copy of images/<name> (and scripts/common) under root, pointed at location."""
    src = REPO_ROOT / "images" / name
    dst = root / "images" / name
    shutil.copytree(src, dst)
    common = root / "scripts" / "common"
    common.mkdir(parents=True, exist_ok=True)
    text = (dst / "image.toml").read_text()
    listed = re.search(r"^common\s*=\s*\[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    for script in re.findall(r'"([^"]+)"', listed.group(1) if listed else ""):
        real = REPO_ROOT / "scripts" / "common" / script
        if real.is_file():
            shutil.copy2(real, common / script)
        else:  # written by someone else; a stub keeps the recipe loadable until it lands
            (common / script).write_text(f"#!/bin/sh\necho '{script}: stub'\n")
    quoted = ", ".join(f'"{a}"' for a in extra_args)
    for key, value in (("location", f'"{location}"'), ("memory", f'"{memory}"'),
                       ("vcpus", str(vcpus)), ("build_timeout", f'"{build_timeout}"'),
                       ("idle_timeout", f'"{idle_timeout}"'), ("extra_args", f"[{quoted}]")):
        text, n = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, count=1, flags=re.MULTILINE)
        assert n == 1, f"{key} not in {name}/image.toml"
    (dst / "image.toml").write_text(text)
    return RecipeBook(root).load(name)
