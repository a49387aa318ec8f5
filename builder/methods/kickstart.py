"""The kickstart build method (the article's): Anaconda installs the image from an install tree.

Stages
  fetch-installer  the installer kernel and initrd of the install tree (URL, local tree or ISO),
                   verified against .treeinfo and cached (builder.installsource)
  render           the recipe's kickstart template, rendered and validated with pykickstart
                   (builder.render)
  inject           a copy of the initrd with /ks.cfg appended as an extra cpio archive, as
                   `virt-install --initrd-inject` does (builder.initrd)
  install          an install domain: direct kernel boot of the installer with
                   ``inst.ks=file:/ks.cfg inst.repo=… inst.text console=ttyS0,115200 inst.cmdline``
                   plus the recipe's extra_args, a sparse raw target disk, a user-mode NIC with a
                   fresh MAC (the build MAC), the serial console followed live

The install is done when the domain has powered off AND the last %post printed
``KICKGATE-INSTALL-OK`` on the serial console. A failure marker (``KICKGATE-INSTALL-FAILED``,
an Anaconda traceback, "An unknown error has occurred", a failing %post, a kernel panic), the
hard timeout (``[vm] build_timeout``), the inactivity watchdog (``[vm] idle_timeout``: neither
console output nor disk writes) or a power-off without the marker all end the build with a
BuildError that carries the reason and the last 40 serial lines. The domain is destroyed on
every path, Ctrl-C included.

Installed packages: the template's last %post prints ``KICKGATE-PKG`` lines in the format of
``builder.packages.rpm_query_format`` (name, epoch:version-release, arch, source rpm, licence)
between ``KICKGATE-PKGS-BEGIN`` and ``KICKGATE-PKGS-END``; they become the build record's
package list.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from builder.console import Outcome, Watch
from builder.domain import Disk, DomainSpec, Nic, random_mac
from builder.domainrun import DomainJob, judge, read_serial, run_domain
from builder.errors import RecipeError
from builder.initrd import inject_kickstart
from builder.installsource import (
    InstallSource,
    Origin,
    classify,
    fetch_for_recipe,
    guest_url,
    has_credentials,
    mask_url,
    repo_in_args,
    serve_tree,
)
from builder.method import BuildContext, Method, MethodResult
from builder.packages import Package, parse_rpm_lines
from builder.recipe import Recipe
from builder.render import MARKERS, mask_secrets, render_kickstart

log = logging.getLogger(__name__)

KS_NAME = "ks.cfg"
# Lines that mean the install failed, whatever happens next.
FAILURE_MARKERS = (
    MARKERS.failed,
    "An unknown error has occurred",
    "Traceback (most recent call last)",
    "running the kickstart script at line",  # Anaconda: "Error code N running the kickstart script"
    "Kernel panic - not syncing",
    "Entering emergency mode",
)
# Anaconda's progress lines in cmdline/text mode, worth a line at INFO.
_PROGRESS_RE = re.compile(
    r"^\s*(?:\d\d:\d\d:\d\d\s+)?("
    r"Starting (?:automated install|package installation process|installer)|"
    r"Checking software selection|Installing\.?$|Downloading packages|Preparing transaction|"
    r"Configuring (?:storage|installed system|\S+)|Creating \S+ on /dev/|"
    r"Running (?:pre|post)-installation scripts|Performing post-installation setup tasks|"
    r"Installing boot ?loader|Generating initramfs|Storing configuration files|"
    r"Setting up the installation environment|Installation complete|Running in cmdline mode|"
    r"Installing \S+ \(\d+/\d+\))")
_PKG_PROGRESS_RE = re.compile(r"Installing \S+ \((\d+)/(\d+)\)")


# --------------------------------------------------------------------------- command lines


def kernel_args(recipe: Recipe, repo: str | None, ks_name: str = KS_NAME) -> list[str]:
    """Installer kernel arguments: kickstart, source, text mode on the serial console, extras."""
    assert recipe.kickstart is not None
    extra = list(recipe.kickstart.extra_args)
    args = [f"inst.ks=file:/{ks_name}"]
    # A repository URL with credentials goes into the injected kickstart (url_command), never onto
    # the kernel command line, which QEMU's command line and the domain XML show to every local user.
    if repo and repo_in_args(extra) is None and not has_credentials(repo):
        args.append(f"inst.repo={repo}")
    args += ["inst.text", "console=ttyS0,115200", "inst.cmdline", *extra]
    return args


def url_command(repo: str) -> str:
    """The kickstart's own `url` command for a repository that needs credentials (kept off the kernel
    command line; the injected kickstart lives only in the private, 0600 initrd copy)."""
    return f"url --url={shlex.quote(repo)}\n"


def os_variant(recipe: Recipe) -> str:
    """The osinfo short id virt-install wants: [vars] os_variant, else from the syntax version."""
    explicit = recipe.variables_map.get("os_variant")
    if explicit:
        return explicit
    assert recipe.kickstart is not None
    version = recipe.kickstart.version.upper()
    if m := re.fullmatch(r"RHEL(\d+)", version):
        return f"rhel{m.group(1)}.0"
    if m := re.fullmatch(r"F(\d+)", version):
        return f"fedora{m.group(1)}"
    return "linux2022"


def virt_install_command(recipe: Recipe, location: str | None = None, *,
                         ks_path: str = KS_NAME, connect: str = "qemu:///system",
                         disk_path: str | None = None) -> list[str]:
    """The virt-install argv that does by hand what the kickstart method does, as the article does.

    Render the kickstart first (``kickgate render IMAGE > ks.cfg``); ks_path names that file.
    """
    if recipe.kickstart is None:
        raise RecipeError(recipe.path, "method", "not a kickstart recipe",
                          "virt-install only applies to method = \"kickstart\"")
    origin = Origin.override() if location else Origin.recipe(recipe)
    loc = location or recipe.kickstart.location
    kind, normalized, _ = classify(loc, Path.cwd() if location else recipe.dir, origin)
    repo: str | None = None
    if kind == "url":
        repo = normalized
    elif kind == "iso":
        repo = "cdrom"  # virt-install attaches an ISO --location as a cdrom
    elif repo_in_args(list(recipe.kickstart.extra_args)) is None:
        raise origin.error(
            f"{normalized} is a local install tree, which an installer started by virt-install "
            "cannot reach",
            "serve it over HTTP (e.g. `python3 -m http.server -d TREE 8000`) and pass "
            "--location http://HOST:8000/, or add inst.repo=… to [kickstart] extra_args; "
            "`kickgate build` serves local trees itself")
    args = kernel_args(recipe, repo, Path(ks_path).name)
    size_gib = f"{recipe.disk.size_mib / 1024:g}"
    disk = disk_path or f"/var/lib/libvirt/images/{recipe.name}.img"
    return [
        "virt-install", "--connect", connect,
        "--name", f"{recipe.name}-build",
        "--memory", str(recipe.vm.memory_mib),
        "--vcpus", str(recipe.vm.vcpus),
        "--os-variant", os_variant(recipe),
        "--location", normalized,
        "--initrd-inject", ks_path,
        "--extra-args", " ".join(args),
        "--disk", f"path={disk},size={size_gib},format=raw,bus=virtio,sparse=yes",
        "--network", "network=default,model=virtio",
        "--rng", "/dev/urandom",
        "--graphics", "none",
        "--console", "pty,target_type=serial",
        "--noreboot",
        "--wait", str(max(1, recipe.vm.build_timeout_s // 60)),
    ]


# --------------------------------------------------------------------------- the build


def build(ctx: BuildContext) -> MethodResult:
    recipe = ctx.recipe
    if recipe.kickstart is None:
        raise RecipeError(recipe.path, "method", "the kickstart method needs a [kickstart] table")

    with ctx.stages("fetch-installer"):
        source = fetch_for_recipe(recipe, ctx.options.cache_dir, ctx.options.location)
        log.info("%s: installer from %s (%s%s)", recipe.name, mask_url(source.location), source.kind,
                 f", {source.product}" if source.product else "")

    with ctx.stages("render"):
        kickstart = render_kickstart(recipe)
        masked = mask_secrets(kickstart)
        log.debug("%s: rendered kickstart (secrets masked):\n%s", recipe.name, masked)

    with ctx.stages("inject"):
        initrd = ctx.workdir / "initrd.img"
        repo_hint = repo_in_args(list(recipe.kickstart.extra_args)) or source.repo_arg or ""
        if has_credentials(repo_hint):
            kickstart = url_command(repo_hint) + kickstart
        offset = inject_kickstart(source.initrd, initrd, kickstart, KS_NAME)
        log.debug("%s: /%s appended to the initrd at offset %d", recipe.name, KS_NAME, offset)

    with ctx.stages("install"):
        disk = ctx.workdir / "disk.raw"
        with open(disk, "wb") as f:
            f.truncate(recipe.disk.size_mib * 1024 * 1024)
        mac = random_mac()
        domain_type = ctx.hypervisor.domain_type(source.kernel)
        with _install_repo(source, recipe) as repo:
            cmdline = " ".join(kernel_args(recipe, repo))
            log.info("%s: installing (%s, %d MiB, %d vCPU): %s", recipe.name,
                     "KVM" if domain_type == "kvm" else "TCG", recipe.vm.memory_mib,
                     recipe.vm.vcpus, mask_url(cmdline))
            disks = [Disk(disk, "raw", cache="unsafe")]
            if source.iso is not None:
                disks.append(Disk(source.iso, "raw", device="cdrom", readonly=True))
            name = f"kg-ks-{recipe.name}-{uuid.uuid4().hex[:6]}"
            spec = DomainSpec(
                name=name, type=domain_type, memory_mib=recipe.vm.memory_mib,
                vcpus=recipe.vm.vcpus, serial_log=ctx.serial_log, disks=tuple(disks),
                kernel=source.kernel, initrd=initrd, cmdline=cmdline, nic=Nic(mac=mac),
                on_poweroff="destroy", on_reboot="destroy", on_crash="destroy")
            _run_install(ctx, spec)
        packages = parse_packages(read_serial(ctx.serial_log), str(ctx.serial_log))

    extra = {
        "location": mask_url(source.location),
        "install_source": source.kind,
        "installer_kernel_sha256": source.kernel_sha256,
        "installer_initrd_sha256": source.initrd_sha256,
        "inst_repo": mask_url(repo or ""),
        "kickstart_sha256": hashlib.sha256(masked.encode()).hexdigest(),
        "kickstart_version": recipe.kickstart.version,
    }
    if source.product:
        extra["product"] = source.product
    return MethodResult(disk=disk, disk_format="raw", build_mac=mac, domain_type=domain_type,
                        packages=packages, extra=extra)


@contextlib.contextmanager
def _install_repo(source: InstallSource, recipe: Recipe) -> Iterator[str | None]:
    """The inst.repo value for the install; a local tree is served over HTTP meanwhile."""
    assert recipe.kickstart is not None
    given = repo_in_args(list(recipe.kickstart.extra_args))
    if given is not None or source.tree is None:
        yield given if given is not None else source.repo_arg
        return
    with serve_tree(source.tree) as port:
        yield guest_url(port)


INSTALL_JOB = DomainJob(
    stage="install", what="the installer", ok_marker=MARKERS.ok, failure_markers=FAILURE_MARKERS,
    no_marker_hint="the install or a %post script failed before the last %post (see the serial tail, and "
                   "/root/kickgate-post-*.log in the disk)",
    mask=mask_secrets)


def _run_install(ctx: BuildContext, spec: DomainSpec) -> None:
    recipe = ctx.recipe
    last_written = [0]
    pkg_step = [0]

    def activity_of(dom: Any) -> int:
        with contextlib.suppress(Exception):  # the domain is gone: nothing more was written
            last_written[0] = int(dom.blockStats("vda")[3])  # wr_bytes
        return last_written[0]

    def progress(line: str) -> None:
        text = line.strip()
        m = _PKG_PROGRESS_RE.search(text)
        if m:
            done, total = int(m.group(1)), int(m.group(2))
            step = done * 10 // max(total, 1)
            if done in (1, total) or step > pkg_step[0]:
                pkg_step[0] = step
                log.info("%s: install: %s", recipe.name, text)
            return
        if _PROGRESS_RE.match(text) or text.startswith(MARKERS.ok):
            log.info("%s: install: %s", recipe.name, text)

    run_domain(ctx, spec, INSTALL_JOB, progress=progress, activity=activity_of)


def judge_outcome(ctx: BuildContext, outcome: Outcome, w: Watch) -> None:
    """Return if the install succeeded (powered off after the marker), else raise BuildError."""
    judge(ctx, INSTALL_JOB, outcome, w)


def parse_packages(serial_text: str, origin: str = "serial log") -> tuple[Package, ...]:
    """The packages the last %post listed between the package markers (only the last complete listing)."""
    listing: list[str] = []
    inside = False
    for line in serial_text.splitlines():
        text = line.strip()
        if text == MARKERS.pkgs_begin:
            inside, listing = True, []
        elif text == MARKERS.pkgs_end:
            inside = False
        elif inside:
            listing.append(text)
    return parse_rpm_lines(listing, marker=MARKERS.pkg, origin=origin)


METHOD = Method(name="kickstart", build=build, code=("render.py", "initrd.py", "installsource.py"), tools=(),
                uses_secrets=True)
