#!/usr/bin/env python3
"""Build a kickgate recipe's image with mkosi 14, timed stage by stage, for a side-by-side with kickgate.

    .venv/bin/python bench/peer_mkosi.py [--image generic-dev] [--incremental] [--keep DIR] [--boot]

The package set, suite, components, mirror, disk size and initramfs modules come from the recipe
(read with builder.recipe), so the peer image cannot drift from kickgate's. The result is a BIOS +
GRUB + ext4 image like kickgate's: mkosi 14's Bootable=yes means UEFI, systemd-boot and dracut, so
the image is built with Bootable=no and a finalize script (on the host, root partition mounted
from mkosi's loop device) that writes fstab and GRUB defaults, builds the initramfs, installs GRUB
and runs the recipe's post-install scripts in a chroot. Needs root, loop devices and `apt-get
install mkosi`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.methods.bootstrap import _GRUB_DEFAULTS, initramfs_config  # noqa: E402  (kickgate's settings)
from builder.recipe import Recipe, RecipeBook  # noqa: E402

# Comparable stages, named as kickgate's build record names them.
STAGES = ("mmdebstrap", "configure", "disk", "finish-vm", "convert", "checksum")

# mkosi's step lines ("‣ Installing Debian…") mapped to kickgate's stages; the first match wins.
_STEP_STAGE = (
    (re.compile(r"Installing (Debian|Ubuntu)|Mounting Package Cache|debootstrap", re.I), "mmdebstrap"),
    (re.compile(r"Running finalize script", re.I), "finish-vm"),  # split further with the script's own phases
    (re.compile(r"qcow2|Digging holes", re.I), "convert"),
    (re.compile(r"SHA256SUMS|checksum", re.I), "checksum"),
    (re.compile(r"locale|hostname|root password|serial terminal|autologin|dracut|netdev|"
                r"machine ID|random seed|skeleton|extra file", re.I), "configure"),
)

# The finalize script's phases mapped to kickgate's stages: kickgate writes fstab and GRUB defaults
# on the host (configure) and builds nothing else there; its finish VM installs GRUB, runs the
# post-install scripts and seals. Its initramfs is built while mmdebstrap installs packages, which
# mkosi prevents (INITRD=No), so that phase is counted with the packages.
_PHASE_STAGE = {"configure": "configure", "initramfs": "mmdebstrap", "bootloader": "finish-vm",
                "post-scripts": "finish-vm", "seal": "finish-vm"}

_FINALIZE = r"""#!/bin/sh
# mkosi finalize script (host side, root partition mounted at $BUILDROOT from mkosi's loop device):
# turn the Bootable=no tree into a BIOS + GRUB image as kickgate's finish VM does.
set -eu
[ "${1:-final}" = final ] || exit 0
HERE=$(dirname "$(readlink -f "$0")")
if [ -z "${KG_PRIVATE_NS:-}" ]; then
    # A private mount namespace: the /dev, /proc and /sys mounts below vanish with this process,
    # whatever way it ends, and never appear in the host's mount table.
    KG_PRIVATE_NS=1 exec unshare --mount --propagation private -- "$0" "$@"
fi
R=$BUILDROOT
PHASES=$HERE/phases
phase() { echo "$1 $(date +%s.%N)" >> "$PHASES"; }
cleanup() { for m in sys proc dev; do umount -l "$R/$m" 2>/dev/null || true; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM

phase configure
dev=$(findmnt -n -o SOURCE --mountpoint "$R")
disk=/dev/$(lsblk -n -o PKNAME "$dev" | head -n1)
uuid=$(blkid -s UUID -o value "$dev")
printf '# <file system> <mount point> <type> <options> <dump> <pass>\nUUID=%s / ext4 errors=remount-ro 0 1\n' \
    "$uuid" > "$R/etc/fstab"
cp "$HERE/grub-defaults" "$R/etc/default/grub"
# mkosi always adds systemd-resolved, whose package points /etc/resolv.conf into /run; the image
# starts with a plain file as kickgate's does (the post-install scripts empty it).
if [ -L "$R/etc/resolv.conf" ]; then rm -f "$R/etc/resolv.conf"; : > "$R/etc/resolv.conf"; fi
mkdir -p "$R/root/kickgate"
cp -r "$HERE/post" "$R/root/kickgate/scripts"
cp "$HERE/vars.sh" "$R/root/kickgate/vars.sh"
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"

phase initramfs
# Whichever generator the recipe installs: tiny-initramfs or initramfs-tools.
if [ -x "$R/usr/sbin/update-tirfs" ]; then chroot "$R" update-tirfs; else chroot "$R" update-initramfs -c -k all; fi

phase bootloader
chroot "$R" grub-install --target=i386-pc "$disk"
chroot "$R" update-grub
# Without udev's by-uuid links grub-mkconfig falls back to the build host's device name.
sed -i "s|root=$dev |root=UUID=$uuid |g" "$R/boot/grub/grub.cfg"
grep -q "root=UUID=$uuid" "$R/boot/grub/grub.cfg"

phase post-scripts
for script in "$R"/root/kickgate/scripts/*; do
    [ -f "$script" ] || continue
    chroot "$R" sh -c 'set -a; . /root/kickgate/vars.sh; set +a; exec "$1"' sh "/root/kickgate/scripts/${script##*/}"
done

phase seal
: > "$R/etc/machine-id"
rm -f "$R"/etc/ssh/ssh_host_*key "$R"/etc/ssh/ssh_host_*key.pub "$R/var/lib/systemd/random-seed"
chroot "$R" apt-get clean
rm -rf "$R"/var/lib/apt/lists/* "$R"/root/kickgate
chroot "$R" dpkg-query -W -f '.\n' | wc -l > "$HERE/package-count"
phase end
"""


@dataclass
class PeerRun:
    label: str
    wall: float
    stages: dict[str, float]
    steps: list[tuple[str, float]] = field(default_factory=list)  # mkosi's own steps, in order
    phases: dict[str, float] = field(default_factory=dict)  # the finalize script's phases
    packages: int = 0
    image: Path | None = None
    image_bytes: int = 0


def mkosi_version() -> str | None:
    """mkosi's version, or None when it is not installed."""
    if shutil.which("mkosi") is None:
        return None
    out = subprocess.run(["mkosi", "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().split()[-1] if out.strip() else "unknown"


def load_recipe(image: str) -> Recipe:
    recipe = RecipeBook(REPO).load(image)
    if recipe.bootstrap is None:
        raise SystemExit(f"{image} is a {recipe.method} recipe; the mkosi peer builds bootstrap (Debian) recipes")
    return recipe


def write_config(recipe: Recipe, confdir: Path, cache: Path, output: Path, workspace: Path) -> None:
    """mkosi 14's mkosi.default, a skeleton tree and the finalize script, all inside confdir."""
    spec = recipe.bootstrap
    assert spec is not None
    confdir.mkdir(parents=True, exist_ok=True)
    # The image's total size is the recipe's: kickgate's disk is one partition after a 1 MiB gap;
    # mkosi adds a 1 MiB BIOS boot partition and the GPT around the root partition.
    root_mib = recipe.disk.size_mib - 2
    conf = f"""\
[Distribution]
Distribution=debian
Release={spec.suite}
Mirror={spec.mirror}
Repositories={",".join(spec.components)}

[Output]
Format=gpt_ext4
Bootable=no
QCow2=yes
Output={output / "image.qcow2"}
Hostname={recipe.name}
WorkspaceDirectory={workspace}

[Partitions]
RootSize={root_mib}M
BiosSize=1M

[Content]
Packages={",".join(spec.packages)}
WithDocs=yes
Cache={cache}
FinalizeScript={confdir / "mkosi.finalize"}

[Validation]
Checksum=yes

[Host]
NspawnKeepUnit=yes
"""
    (confdir / "mkosi.default").write_text(conf)
    if spec.initramfs_modules:
        # The same short module list kickgate's mmdebstrap setup hook writes: a small initramfs.
        for rel, text in initramfs_config(spec.initramfs_modules).items():
            (confdir / "mkosi.skeleton" / rel).parent.mkdir(parents=True, exist_ok=True)
            (confdir / "mkosi.skeleton" / rel).write_text(text)
    finalize = confdir / "mkosi.finalize"
    finalize.write_text(_FINALIZE)
    finalize.chmod(0o755)
    (confdir / "grub-defaults").write_text(_GRUB_DEFAULTS)
    variables = {**dict(recipe.variables), "IMAGE_NAME": recipe.name}
    (confdir / "vars.sh").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in variables.items()))
    post = confdir / "post"
    post.mkdir()
    for i, script in enumerate(recipe.scripts):
        target = post / f"{i:02d}-{script.namespace}-{script.name}"
        target.write_text(script.path.read_text())
        target.chmod(0o755)


def _stage_of(step: str) -> str:
    if re.search(r"ownership|Removing output|namespace|workspace|second \(final\) stage|"
                 r"^Link|Saving manifest|Resulting image", step, re.I):
        return "other"  # mkosi's own bookkeeping, no work on the image
    for pattern, stage in _STEP_STAGE:
        if pattern.search(step):
            return stage
    return "disk"  # creating, partitioning, formatting, mounting and unmounting the image


def run_mkosi(label: str, confdir: Path, extra: tuple[str, ...] = (), log: Path | None = None) -> PeerRun:
    """Run `mkosi build` once; time each of its steps from the moment its line appears."""
    phases_file = confdir / "phases"
    phases_file.unlink(missing_ok=True)
    argv = ["mkosi", "--force", *extra, "build"]
    steps: list[tuple[str, int, float]] = []
    lines: list[str] = []
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=confdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("‣"):
                body = line[1:].rstrip("\n")
                level = len(body) - len(body.lstrip(" "))
                steps.append((body.strip().rstrip("…"), level, time.monotonic() - start))
        rc = proc.wait()
    except BaseException:
        # Ctrl-C reaches mkosi too (same process group); let it unmount and detach its loop device.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    wall = time.monotonic() - start
    if log is not None:
        log.write_text("".join(lines))
    if rc != 0:
        sys.stderr.write("".join(lines[-60:]))
        raise SystemExit(f"mkosi {label} build failed (exit {rc})")

    durations: list[tuple[str, float]] = []
    stages = dict.fromkeys(STAGES, 0.0)
    stages["other"] = steps[0][2] if steps else wall  # mkosi's start-up before its first step
    parents: list[tuple[int, str]] = []  # enclosing steps: (indent, stage)
    for i, (step, level, at) in enumerate(steps):
        until = steps[i + 1][2] if i + 1 < len(steps) else wall
        durations.append((step, until - at))
        while parents and parents[-1][0] >= level:
            parents.pop()
        # Steps nested in the package installation (API VFS mounts, skeleton) are part of it.
        stage = "mmdebstrap" if parents and parents[-1][1] == "mmdebstrap" else _stage_of(step)
        parents.append((level, stage))
        stages[stage] += until - at
    phases = _phases(phases_file)
    if phases:
        # The finalize script's time was counted as finish-vm; move each phase to its stage.
        stages["finish-vm"] -= sum(phases.values())
        for name, secs in phases.items():
            stages[_PHASE_STAGE.get(name, "finish-vm")] += secs
    count = confdir / "package-count"
    packages = int(count.read_text().strip()) if count.exists() else 0
    images = sorted((confdir / "out").glob("image.qcow2*"))
    image = images[0] if images else None
    return PeerRun(label=label, wall=wall, stages=stages, steps=durations, phases=phases, packages=packages,
                   image=image, image_bytes=image.stat().st_size if image else 0)


def _phases(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    marks = [(name, float(at)) for name, at in (line.split() for line in path.read_text().splitlines() if line)]
    return {name: marks[i + 1][1] - at for i, (name, at) in enumerate(marks[:-1])}


def _leftovers(root: Path) -> None:
    """Unmount and detach whatever an interrupted mkosi left under root, so nothing outlives the bench."""
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True,
                            check=False).stdout.split()
    for target in sorted((m for m in mounts if m.startswith(str(root))), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    loops = subprocess.run(["losetup", "-n", "-O", "NAME,BACK-FILE", "-l"], capture_output=True, text=True,
                           check=False).stdout.splitlines()
    for line in loops:
        name, _, backing = line.strip().partition(" ")
        if backing.strip().startswith(str(root)):
            subprocess.run(["losetup", "-d", name], check=False)


@contextlib.contextmanager
def workspace(keep: Path | None = None) -> Iterator[Path]:
    """A private directory for config, cache and output; removed with anything mounted under it."""
    root = keep if keep else Path(tempfile.mkdtemp(prefix="kickgate-peer-mkosi-"))
    root.mkdir(parents=True, exist_ok=True)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)  # a killed bench cleans up as Ctrl-C does
    try:
        yield root
    finally:
        signal.signal(signal.SIGTERM, previous)
        _leftovers(root)
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def measure(image: str, root: Path, incremental: bool = False) -> dict[str, PeerRun]:
    """Cold (empty package cache and output), then warm (the same command again: kept package cache).

    With incremental, two more builds with --incremental: the first fills mkosi's cached tree, the
    second, reported, reuses it.
    """
    recipe = load_recipe(image)
    confdir = root / "conf"
    cache = root / "package-cache"
    for stale in (confdir, cache, root / "workspace"):  # a kept directory from an earlier run is not cold
        shutil.rmtree(stale, ignore_errors=True)
    cache.mkdir()
    write_config(recipe, confdir, cache, confdir / "out", root / "workspace")
    (confdir / "out").mkdir(exist_ok=True)
    (root / "workspace").mkdir(exist_ok=True)  # under root: removed with it even if mkosi is killed
    runs = {"cold": run_mkosi("cold", confdir, log=root / "cold.log")}
    runs["warm"] = run_mkosi("warm", confdir, log=root / "warm.log")
    if incremental:
        run_mkosi("incremental-fill", confdir, ("--incremental",), log=root / "incremental-fill.log")
        runs["incremental"] = run_mkosi("incremental", confdir, ("--incremental",), log=root / "incremental.log")
    return runs


def boot_to_login(image: Path, timeout: float = 300.0, memory_mib: int = 1024,
                  keep_serial: Path | None = None, accel: str = "tcg") -> float:
    """Boot the image once under QEMU (an overlay) and time it to the login prompt.

    TCG unless told otherwise: a /dev/kvm that opens may still not run guests (the guest then hangs
    after GRUB), which is why kickgate probes it; bench.py passes the accelerator kickgate chose.
    """
    with tempfile.TemporaryDirectory(prefix="kickgate-peer-boot-") as tmp:
        overlay = Path(tmp) / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(overlay)],
                       check=True)
        serial = Path(tmp) / "serial.log"
        argv = ["qemu-system-x86_64", "-machine", f"pc,accel={accel}", "-m", str(memory_mib), "-smp", "1",
                "-display", "none", "-serial", f"file:{serial}", "-monitor", "none", "-nic", "none",
                "-drive", f"file={overlay},if=virtio,format=qcow2"]
        start = time.monotonic()
        proc = subprocess.Popen(argv)
        try:
            while time.monotonic() - start < timeout:
                if serial.exists() and "login:" in serial.read_text(errors="replace"):
                    took = time.monotonic() - start
                    if keep_serial is not None:
                        shutil.copy(serial, keep_serial)
                    return took
                if proc.poll() is not None:
                    break
                time.sleep(0.5)
            tail = serial.read_text(errors="replace")[-2000:] if serial.exists() else ""
            raise SystemExit(f"the mkosi image did not reach a login prompt in {timeout:.0f}s:\n{tail}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def print_runs(runs: dict[str, PeerRun]) -> None:
    for label, run in runs.items():
        print(f"\n== mkosi {label} ==")
        for step, secs in run.steps:
            print(f"  {step[:60]:<62}{secs:8.1f} s")
        for name, secs in run.phases.items():
            print(f"  {'finalize: ' + name:<62}{secs:8.1f} s")
        print(f"  {'TOTAL (wall)':<62}{run.wall:8.1f} s   ({run.packages} packages, "
              f"{run.image_bytes / 2**20:.0f} MiB image)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="generic-dev")
    p.add_argument("--incremental", action="store_true", help="also time mkosi --incremental (two more builds)")
    p.add_argument("--boot", action="store_true", help="boot the image once to its login prompt (wrap in vmlock)")
    p.add_argument("--keep", type=Path, help="keep config, cache, logs and image here (default: a temp dir)")
    args = p.parse_args()
    if mkosi_version() is None:
        raise SystemExit("mkosi is not installed: apt-get install mkosi (the peer is not part of ci/setup)")
    if os.geteuid() != 0:
        raise SystemExit("mkosi needs root (loop devices, mounts, chroot)")
    with workspace(args.keep) as root:
        runs = measure(args.image, root, args.incremental)
        print_runs(runs)
        print(json.dumps({label: run.stages for label, run in runs.items()}, indent=2))
        if args.boot:
            image = runs["warm"].image
            assert image is not None
            print(f"\nmkosi image boot-to-login (TCG): {boot_to_login(image):.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
