"""The bootstrap build method (Debian family): mmdebstrap, disk without mounts, a short finish VM.

Stages: mmdebstrap → configure (files written into the tree on the host) → disk (sfdisk +
mke2fs -d) → finish-vm (the image's own kernel with init=finish.sh: bootloader, post-install
scripts, seal, marker, power off). The raw disk is handed back for conversion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import tempfile
import uuid
from importlib import resources
from pathlib import Path

from filelock import FileLock

from builder import directboot, disk, runstamp
from builder.domain import Disk, DomainSpec, Nic, random_mac
from builder.domainrun import DomainJob, run_domain
from builder.errors import BuildError
from builder.method import BuildContext, Method, MethodResult
from builder.packages import read_dpkg
from builder.recipe import Recipe
from builder.run import run

log = logging.getLogger(__name__)

PRIVATE_MOUNTS = ("unshare", "--mount", "--propagation", "private", "--")
FINISH_OK = "KICKGATE-FINISH-OK"
FINISH_FAILED = "KICKGATE-FINISH-FAILED"
STEP_BEGIN = "KICKGATE-STEP-BEGIN"
# What the finish VM's own initramfs loads: the root disk and filesystem, and the NIC (post-install
# scripts may read the build MAC from it).
FINISH_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic", "virtio_net")

KERNEL_CMDLINE = "console=tty0 console=ttyS0,115200 net.ifnames=0 biosdevname=0"
_SERIAL = "serial --unit=0 --speed=115200"
_GRUB_DEFAULTS = f"""\
# Written by kickgate: boot straight to a serial console, stable ethN names (no MAC-derived names).
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="{KERNEL_CMDLINE}"
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="{_SERIAL}"
GRUB_DISABLE_OS_PROBER=true
# Recovery mode asks for root's password, which the image locks: its entries could never be used.
GRUB_DISABLE_RECOVERY=true
GRUB_DISABLE_SUBMENU=y
"""


def build(ctx: BuildContext) -> MethodResult:
    recipe = ctx.recipe
    assert recipe.bootstrap is not None
    tree = ctx.workdir / "tree"
    raw = ctx.workdir / "disk.raw"
    root_uuid = str(uuid.uuid4())

    with ctx.stages("mmdebstrap"):
        cached_tree(ctx, tree)
    with ctx.stages("configure"):
        packages = read_dpkg(tree / "var/lib/dpkg", root=tree)
        kernel, initrd = configure_tree(recipe, tree, root_uuid)
        modules_dir = tree / "lib/modules" / kernel.name.removeprefix("vmlinuz-")
        boot_dir = ctx.workdir / "boot"
        boot_dir.mkdir()
        kernel = Path(shutil.copy2(kernel, boot_dir / "vmlinuz"))
        initrd = Path(shutil.copy2(initrd, boot_dir / "initrd.img"))
        boot = directboot.prepare(kernel, initrd, modules_dir, boot_dir, FINISH_MODULES)
    with ctx.stages("disk"):
        disk.create_raw(raw, recipe.disk.size_mib)
        disk.partition(raw)
        disk.mkfs_from_tree(raw, tree, recipe.disk.size_mib, root_uuid)
        shutil.rmtree(tree)
    with ctx.stages("finish-vm"):
        domain_type = ctx.hypervisor.domain_type(kernel)
        build_mac = random_mac()
        finish_vm(ctx, raw, boot.kernel, boot.initrd, root_uuid, build_mac, domain_type)
        if reasons := disk.unclean(raw):
            raise BuildError("finish-vm", f"the root filesystem was not left clean: {'; '.join(reasons)}. "
                             "Post-install scripts must not leave processes running or files open on /",
                             serial_log=str(ctx.serial_log))
    return MethodResult(disk=raw, disk_format="raw", build_mac=build_mac, domain_type=domain_type,
                        packages=packages, extra={"suite": recipe.bootstrap.suite, "root_uuid": root_uuid,
                               "finish_kernel": "pvh" if boot.fast_kernel else "bzimage",
                               "finish_initramfs": "kickgate" if boot.fast_initrd else "image"})


def cached_tree(ctx: BuildContext, tree: Path) -> None:
    """Give the build a private hard-linked copy of the mmdebstrap tree, made once per invocation.

    The tree depends only on the [bootstrap] table; recipes that change only their scripts reuse
    it. configure_tree() unlinks before writing, so the shared inodes are never modified.
    """
    argv = mmdebstrap_argv(ctx.recipe, Path("TREE"))
    version = run(["mmdebstrap", "--version"], timeout=30).stdout.strip()
    key = hashlib.sha256(json.dumps([argv, version]).encode()).hexdigest()[:16]
    trees = ctx.options.cache_dir / "trees"
    trees.mkdir(parents=True, exist_ok=True)
    final = trees / key
    with FileLock(str(trees / f".{key}.lock")):
        if ctx.options.no_cache and final.exists():
            shutil.rmtree(final)
        if not (final / ".complete").exists():
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=trees))
            runstamp.stamp(staging)
            try:
                shutil.rmtree(final, ignore_errors=True)
                # A private mount namespace: the /dev, /proc and /sys mounts mmdebstrap makes in the tree
                # vanish with it even if it is killed, and never appear in the host's mount table.
                run([*PRIVATE_MOUNTS, *mmdebstrap_argv(ctx.recipe, staging / "tree")],
                    timeout=ctx.recipe.vm.build_timeout_s)
                (staging / "tree" / ".complete").touch()
                os.replace(staging / "tree", final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            log.info("%s: reusing the mmdebstrap tree %s", ctx.recipe.name, final)
        run(["cp", "-al", str(final), str(tree)], timeout=600)
    (tree / ".complete").unlink()


def mmdebstrap_argv(recipe: Recipe, tree: Path) -> list[str]:
    spec = recipe.bootstrap
    assert spec is not None
    argv = ["mmdebstrap", "--mode=root", "--variant=apt", "--format=directory",
            f"--components={','.join(spec.components)}", f"--include={','.join(spec.packages)}",
            # No daemon may start inside the tree, and grub-pc must not ask for a boot device.
            "--essential-hook=echo 'grub-pc grub-pc/install_devices_empty boolean true'"
            " | chroot \"$1\" debconf-set-selections",
            # Faster and smaller: no fsync per file while unpacking into a throwaway tree.
            "--dpkgopt=force-unsafe-io"]
    if spec.initramfs_modules:
        # Written before any package unpacks, so the first initramfs is already the short one.
        hook = " && ".join(f"mkdir -p \"$1/{Path(rel).parent}\" && printf %s {shlex.quote(text)} > \"$1/{rel}\""
                           for rel, text in initramfs_config(spec.initramfs_modules).items())
        argv.append(f"--setup-hook={hook}")
    argv += [spec.suite, str(tree), spec.mirror]
    return argv


def initramfs_config(modules: tuple[str, ...]) -> dict[str, str]:
    """Files (relative to the root) that give the image an initramfs of just these modules.

    A short module list makes the initramfs a fraction of MODULES=most: GRUB loads and the kernel
    unpacks it in seconds instead of tens of seconds on an emulated CPU. Both generators Debian
    offers are configured; the recipe's package list decides which one the image has:
    initramfs-tools (udev, fsck and scripts in the initramfs) or tiny-initramfs (one static binary
    that loads the modules, waits for root=UUID= and mounts it; no fsck, as with the list before).
    """
    return {
        "etc/initramfs-tools/conf.d/kickgate.conf": "MODULES=list\nCOMPRESS=zstd\n",
        "etc/initramfs-tools/modules": "\n".join(modules) + "\n",
        # No modules guessed from the build host's hardware, no microcode for the build host's CPU.
        "etc/tiny-initramfs/tiny-initramfs.conf":
            f"AUTO_MODULES=no\nMICROCODE=no\nINCLUDE_MODULES={','.join(modules)}\n",
    }


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # the tree is hard-linked to the cached one: never write through
    path.write_text(text)
    path.chmod(mode)


def grub_cfg(kernel_version: str, root_uuid: str) -> str:
    """The GRUB menu update-grub would write for /etc/default/grub above and one kernel.

    Written on the host because grub-mkconfig spends ~12 s probing on an emulated CPU to arrive at
    the same menu. Left out of update-grub's output: the video modules (the terminal is serial and
    text, so GRUB never needs a video mode) and the grubenv bookkeeping for saved and one-time
    entries (none is ever set on this image). The image's own update-grub replaces this file
    whenever a kernel is installed or removed, from the same /etc/default/grub.
    """
    return f"""\
# Written by kickgate at build time, equivalent to update-grub's output for /etc/default/grub;
# update-grub rewrites it whenever a kernel is installed or removed.
set default=0
set timeout=0
{_SERIAL}
terminal_input serial console
terminal_output serial console
menuentry 'Debian GNU/Linux, with Linux {kernel_version}' --class debian --class gnu-linux --class os {{
\tinsmod part_msdos
\tinsmod ext2
\tsearch --no-floppy --fs-uuid --set=root --hint-bios=hd0,msdos1 --hint=hd0,msdos1 {root_uuid}
\techo\t'Loading Linux {kernel_version} ...'
\tlinux\t/boot/vmlinuz-{kernel_version} root=UUID={root_uuid} ro {KERNEL_CMDLINE}
\techo\t'Loading initial ramdisk ...'
\tinitrd\t/boot/initrd.img-{kernel_version}
}}
"""


def configure_tree(recipe: Recipe, tree: Path, root_uuid: str) -> tuple[Path, Path]:
    """Write fstab, GRUB defaults, the finish script and the post-install scripts into the tree."""
    _write(tree / "etc/fstab", f"# <file system> <mount point> <type> <options> <dump> <pass>\n"
                               f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n")
    _write(tree / "etc/default/grub", _GRUB_DEFAULTS)
    kg = tree / "root/kickgate"
    finish = resources.files("builder").joinpath("data/bootstrap-finish.sh").read_text()
    _write(kg / "finish.sh", finish, 0o755)
    env = {"ROOT_UUID": root_uuid, "IMAGE_NAME": recipe.name, "IMAGE_FAMILY": recipe.family}
    _write(kg / "env.sh", "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    variables = {**dict(recipe.variables), "IMAGE_NAME": recipe.name}
    _write(kg / "vars.sh", "".join(f"{k}={shlex.quote(v)}\n" for k, v in variables.items()))
    for i, script in enumerate(recipe.scripts):
        _write(kg / "scripts" / f"{i:02d}-{script.namespace}-{script.name}", script.path.read_text(), 0o755)

    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    initrds = sorted((tree / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise BuildError("configure", "no kernel or initrd in the tree's /boot: add linux-image-amd64 and an "
                         "initramfs generator (initramfs-tools or tiny-initramfs) to [bootstrap] packages")
    _write(tree / "boot/grub/grub.cfg", grub_cfg(kernels[-1].name.removeprefix("vmlinuz-"), root_uuid), 0o444)
    return kernels[-1], initrds[-1]


FINISH_JOB = DomainJob(stage="finish-vm", what="the finish VM", ok_marker=FINISH_OK,
                       failure_markers=(FINISH_FAILED, "Kernel panic"))


def finish_vm(ctx: BuildContext, raw: Path, kernel: Path, initrd: Path, root_uuid: str, mac: str,
              domain_type: str) -> None:
    recipe = ctx.recipe
    spec = DomainSpec(
        name=f"kg-build-{recipe.name}-{uuid.uuid4().hex[:6]}", type="kvm" if domain_type == "kvm" else "qemu",
        memory_mib=recipe.vm.memory_mib, vcpus=recipe.vm.vcpus, serial_log=ctx.serial_log,
        disks=(Disk(raw, "raw", cache="unsafe"),), kernel=kernel, initrd=initrd,
        cmdline=f"root=UUID={root_uuid} rw console=ttyS0,115200 net.ifnames=0 init=/root/kickgate/finish.sh panic=-1",
        nic=Nic(mac=mac, restrict=True))

    def progress(line: str) -> None:
        if line.startswith(STEP_BEGIN):
            log.info("%s: finish-vm: %s", recipe.name, line[len(STEP_BEGIN):].strip())

    run_domain(ctx, spec, FINISH_JOB, progress=progress)


METHOD = Method(name="bootstrap", build=build, code=("disk.py", "directboot.py", "initrd.py"),
                tools=("mmdebstrap", "mke2fs"))
