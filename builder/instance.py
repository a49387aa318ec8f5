"""Throwaway instances: a copy-on-write overlay of a built image, booted the way OpenNebula would.

An Instance is a context manager. Entering it creates a private 0700 work dir (overlay, context
CD, ephemeral SSH key, serial log), boots the domain with a fresh MAC and SSH forwarded to
127.0.0.1, and waits until the context key is accepted. Leaving it destroys the domain and
removes everything, unless it is kept (--keep-instance) so a person can log in and look.

On request (pristine_root) a second, read-only overlay of the same image is hot-plugged and mounted
read-only in the guest: the image as built, which contextualization and the boot have not touched.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import paramiko

from builder import disk, runstamp
from builder.context import write_context_iso
from builder.domain import Disk, DomainSpec, Nic, disk_xml, domain_xml, random_mac
from builder.errors import InstanceError
from builder.hypervisor import Hypervisor
from builder.sshkey import KeyPair, generate

log = logging.getLogger(__name__)

KeepPolicy = Literal["never", "on-failure", "always"]

# QEMU's user network: the guest is always 10.0.2.15 behind gateway .2 and resolver .3.
USER_NET = {"IP": "10.0.2.15", "MASK": "255.255.255.0", "GATEWAY": "10.0.2.2", "DNS": "10.0.2.3"}
INIT_MARKER = "/var/run/kickgate-context-init.done"
LOGIN_PROMPT_GRACE_S = 60.0
# Until the guest's network is up, QEMU accepts the forwarded connection and nothing answers on it:
# each look waits this long. Once it is up, a closed port is refused at once, so looks every POLL_S
# find sshd within half a second of it listening.
BANNER_WAIT_S = 2.0
POLL_S = 0.5
# After SSH answers, how long the rest of the boot may take before the instance is given to specs.
SETTLE_TIMEOUT_S = 240.0

# The pristine image in the guest: the hot-plugged disk's serial (virtio: by-id/virtio-<serial>) and
# where its root filesystem is mounted.
PRISTINE_SERIAL = "kickgate-pristine"
PRISTINE_MOUNT = "/run/kickgate-pristine"
PRISTINE_TARGET = "vdb"  # vda is the instance's own overlay; the context CD is on IDE
# Finds the partition of the hot-plugged disk that holds the booted root filesystem (same UUID: same
# image) and mounts it read-only without replaying a journal, so not one byte of the disk is written
# and no clean-up of the build's last shutdown is done for it. XFS refuses a second filesystem with
# a mounted one's UUID unless told (nouuid).
_PRISTINE_MOUNT_SCRIPT = f"""set -eu
dev=/dev/disk/by-id/virtio-{PRISTINE_SERIAL}
i=0
until [ -e "$dev" ]; do
    i=$((i + 1))
    if [ "$i" -gt 120 ]; then echo "the hot-plugged disk $dev did not appear within 60s" >&2; exit 3; fi
    sleep 0.5
done
udevadm settle --timeout=30
root_uuid=$(findmnt -no UUID /)
part=""
for p in "$dev"-part*; do
    [ -e "$p" ] || continue
    if [ "$(blkid -s UUID -o value "$p" || true)" = "$root_uuid" ]; then part=$p; fi
done
if [ -z "$part" ]; then
    echo "no partition of $dev holds the root filesystem (UUID $root_uuid): $(ls "$dev"* 2>&1)" >&2; exit 3
fi
type=$(blkid -s TYPE -o value "$part")
case $type in
    ext2|ext3|ext4) opts=ro,noload ;;
    xfs) opts=ro,norecovery,nouuid ;;
    *) echo "$part holds $type: no read-only mount without journal replay is known for it" >&2; exit 3 ;;
esac
mkdir -p -m 0700 {PRISTINE_MOUNT}
mount -t "$type" -o "$opts" "$part" {PRISTINE_MOUNT}
echo "$part ($type, $opts)"
"""

# Boot phases recognised on the serial console, in order.
_PHASES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("bootloader", re.compile(r"GRUB|Booting from Hard Disk|Booting `")),
    ("kernel", re.compile(r"Linux version \d")),
    ("init", re.compile(r"systemd\[1\]|Welcome to|Run /init|Reached target")),
    ("login prompt", re.compile(r"login:")),
)


def sshd_answering(port: int, wait: float = BANNER_WAIT_S) -> socket.socket | None:
    """A connection to 127.0.0.1:port on which sshd has sent its banner, or None.

    The banner is only peeked at: the same connection then carries the login. Every connection
    costs the guest an sshd start, which on an emulated CPU is a good part of a second at the
    moment the boot's last units compete for it.
    """
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    except OSError:
        return None
    try:
        sock.settimeout(wait)
        if sock.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL) == b"SSH-":
            return sock
    except OSError:
        pass
    sock.close()
    return None


@dataclass(frozen=True)
class InstanceOptions:
    memory_mib: int = 1024
    vcpus: int = 1
    boot_timeout_s: float = 240.0
    keep: KeepPolicy = "never"
    extra_guest_ports: tuple[int, ...] = (8080, 5432, 2375)  # forwarded too, for firewall checks
    hostname: str | None = None
    init_script: str | None = None  # OpenNebula FILES: init.sh run by contextualization
    context_extra: Mapping[str, str] = field(default_factory=dict)
    # The guest under test reaches nothing but its forwarded ports: not the host's loopback services
    # (an OpenNebula front-end, other instances' SSH) nor the outside (recipe: [verify] network).
    isolated: bool = True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def default_init_script() -> str:
    return ("#!/bin/sh\n# Written on the context CD by kickgate: proves FILES/INIT_SCRIPTS run.\n"
            f'echo "init.sh ran for $SET_HOSTNAME" > {INIT_MARKER}\n')


class Instance:
    """One throwaway instance of a built image."""

    def __init__(self, hypervisor: Hypervisor, image: Path, image_format: str, *, label: str,
                 options: InstanceOptions | None = None, avoid_mac: str | None = None,
                 domain_type: str | None = None, on_stop: Callable[[Instance], None] | None = None) -> None:
        self.hv = hypervisor
        self.image = image
        self.image_format = image_format
        self.label = label
        self.options = options or InstanceOptions()
        self.avoid_mac = (avoid_mac or "").lower()
        self._domain_type = domain_type
        self.on_stop = on_stop  # runs before the files are removed (e.g. to keep a failed boot's log)
        self.on_phase: Callable[[str], None] | None = None  # told each boot phase (_PHASES) as it is seen
        self.name = f"kg-{label[:24]}-{uuid.uuid4().hex[:6]}"
        self.hostname = self.options.hostname or f"kg-{uuid.uuid4().hex[:8]}"
        self.workdir: Path | None = None
        self.mac = ""
        self.ssh_port = 0
        self.forwards: dict[int, int] = {}  # guest port → host port
        self.key: KeyPair | None = None
        self.serial_log: Path | None = None
        self.ssh_config: Path | None = None
        self.boot_seconds = 0.0
        self.settle_seconds = 0.0
        self.system_state = ""  # systemd's state once the boot finished: running or degraded
        self.reached = "nothing"
        self.failed = False
        self.kept = False
        self._dom: Any = None
        self._ssh: paramiko.SSHClient | None = None
        self._host: Any = None
        self._pristine: str | None = None  # guest path of the mounted pristine image, once attached

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self) -> Instance:
        try:
            if self._dom is None:  # a spare may have been started ahead of use
                self.start()
            self.wait_ready()
            self.wait_settled()
        except BaseException:
            self.failed = True
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is not None:
            self.failed = True
        self.stop()

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"kg-inst-{self.label[:20]}-"))
        self.workdir.chmod(0o700)
        runstamp.stamp(self.workdir)
        self.serial_log = self.workdir / "serial.log"
        self.key = generate(self.workdir, f"kickgate-{self.name}")
        self.mac = random_mac()
        while self.mac.lower() == self.avoid_mac:
            self.mac = random_mac()

        overlay = self.workdir / "overlay.qcow2"
        disk.create_overlay(self.image, overlay, self.image_format)
        context_iso = self.workdir / "context.iso"
        values = {
            "ETH0_MAC": self.mac, **{f"ETH0_{k}": v for k, v in USER_NET.items()},
            "SSH_PUBLIC_KEY": self.key.public_line, "SET_HOSTNAME": self.hostname, "TARGET": "hdc",
            "DISK_ID": "1",
        }
        files: dict[str, bytes] = {}
        script = self.options.init_script if self.options.init_script is not None else default_init_script()
        if script:
            files["init.sh"] = script.encode()
            values["FILES"] = "init.sh"
            values["INIT_SCRIPTS"] = "init.sh"
        values.update(self.options.context_extra)
        write_context_iso(context_iso, values, files)

        dtype = self._domain_type or self.hv.domain_type()
        for attempt in range(3):
            self.ssh_port = free_port()
            self.forwards = {22: self.ssh_port, **{p: free_port() for p in self.options.extra_guest_ports}}
            spec = DomainSpec(
                name=self.name, type="kvm" if dtype == "kvm" else "qemu", memory_mib=self.options.memory_mib,
                vcpus=self.options.vcpus, serial_log=self.serial_log,
                disks=(Disk(overlay, "qcow2"), Disk(context_iso, "raw", device="cdrom")),
                nic=Nic(mac=self.mac, host_forwards=tuple((h, g) for g, h in self.forwards.items()),
                        restrict=self.options.isolated),
                on_reboot="restart")
            try:
                self._dom = self.hv.start(domain_xml(spec), self.name)
                break
            except Exception as exc:
                # Another process may have taken a port between our probe and QEMU's bind.
                if attempt == 2 or "hostfwd" not in str(exc).lower():
                    raise
        self.ssh_config = self.workdir / "ssh_config"
        self.ssh_config.write_text(
            f"Host {self.name}\n  HostName 127.0.0.1\n  Port {self.ssh_port}\n  User root\n"
            f"  IdentityFile {self.key.private_path}\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
        log.info("%s: booting (mac %s, ssh 127.0.0.1:%d)", self.name, self.mac, self.ssh_port)

    # -- waiting -----------------------------------------------------------------------------

    def _serial_text(self) -> str:
        assert self.serial_log is not None
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def serial_tail(self, n: int = 40) -> list[str]:
        return self._serial_text().replace("\r", "").splitlines()[-n:]

    def _update_reached(self) -> None:
        text = self._serial_text()
        for phase, rx in _PHASES:
            if rx.search(text):
                self.reached = phase

    def _fail(self, reason: str) -> InstanceError:
        self.failed = True
        return InstanceError(self.reached, reason, self.serial_tail(),
                             str(self.serial_log) if self.options.keep != "never" else None)

    def wait_ready(self) -> None:
        """Wait for boot → network → sshd → our context key accepted, with progress."""
        assert self.key is not None
        start = time.monotonic()
        deadline = start + self.options.boot_timeout_s
        last = ""
        auth_error = ""
        prompt_at: float | None = None
        while True:
            if not self.hv.is_active(self._dom):
                raise self._fail("the domain stopped while booting")
            self._update_reached()
            if (sock := sshd_answering(self.ssh_port)) is not None:
                self.reached = "sshd"
                try:
                    self._ssh = self._connect(sock)
                    self.reached = "key accepted"
                    break
                except paramiko.AuthenticationException:
                    auth_error = "sshd rejected the context key (contextualization did not apply SSH_PUBLIC_KEY)"
                except (paramiko.SSHException, OSError) as exc:
                    auth_error = f"ssh: {exc}"
                if self._ssh is None:
                    sock.close()
            if self.reached != last:
                log.info("%s: reached %s after %.1fs", self.name, self.reached, time.monotonic() - start)
                last = self.reached
                if self.on_phase is not None and self.reached != "nothing":
                    self.on_phase(self.reached)
            if self.reached == "login prompt":
                # getty starts after rc-local, so by now contextualization has run: an instance
                # that still does not answer SSH was not given its network by the context.
                prompt_at = prompt_at or time.monotonic()
                if time.monotonic() - prompt_at > LOGIN_PROMPT_GRACE_S and not auth_error:
                    raise self._fail(
                        f"the guest booted to a login prompt but did not answer SSH on its context address "
                        f"within {LOGIN_PROMPT_GRACE_S:.0f}s: contextualization did not configure the network "
                        "(check rc.local and /var/log/context.log in the image)")
            if time.monotonic() > deadline:
                raise self._fail(auth_error or f"no SSH login within {self.options.boot_timeout_s:.0f}s")
            time.sleep(POLL_S)
        self.boot_seconds = time.monotonic() - start
        log.info("%s: SSH login with the context key after %.1fs", self.name, self.boot_seconds)

    def wait_settled(self) -> None:
        """Wait until systemd has finished the boot, so no spec sees a half-booted system.

        SSH answers long before the boot ends: units ordered after sshd (or after multi-user.target)
        may still change the firewall or fail. Polled rather than `is-system-running --wait`, which
        systemd before 240 (EL8) does not have.
        """
        start = time.monotonic()
        state = ""
        while time.monotonic() - start < SETTLE_TIMEOUT_S:
            _, out = self.run("systemctl is-system-running", timeout=30)
            state = out.strip().splitlines()[-1] if out.strip() else ""
            if state not in ("initializing", "starting", ""):
                break
            time.sleep(2.0)
        else:
            _, jobs = self.run("systemctl list-jobs --no-legend --plain", timeout=30)
            raise self._fail(f"the boot did not finish within {SETTLE_TIMEOUT_S:.0f}s after SSH answered "
                             f"(systemd: {state or 'no answer'}); jobs still queued: "
                             f"{', '.join(line.split()[1] for line in jobs.splitlines() if len(line.split()) > 1)}")
        self.system_state = state
        self.settle_seconds = time.monotonic() - start
        log.info("%s: boot finished (%s) %.1fs after SSH login", self.name, state, self.settle_seconds)

    def _connect(self, sock: socket.socket) -> paramiko.SSHClient:
        """Log in on sock, a connection sshd has already answered on."""
        assert self.key is not None
        client = paramiko.SSHClient()
        # Host keys are made at this instance's first boot: there is nothing to pin them against.
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        sock.settimeout(None)  # paramiko sets its own timeouts on the connection it is given
        client.connect("127.0.0.1", port=self.ssh_port, username="root", key_filename=str(self.key.private_path),
                       timeout=10, banner_timeout=20, auth_timeout=20, look_for_keys=False, allow_agent=False,
                       sock=sock)
        return client

    # -- use ---------------------------------------------------------------------------------

    @property
    def host(self) -> Any:
        """testinfra Host whose commands all run in one shell on the harness's SSH session."""
        if self._host is None:
            from builder.shell import host_over

            assert self.ssh_config is not None
            # The session the harness already authenticated with the context key (a second
            # handshake can time out while an emulated guest is busy, and would prove nothing new);
            # without one, the backend logs in through ssh_config itself.
            self._host = host_over(self._ssh, self.name, ssh_config=str(self.ssh_config), timeout=60)
        return self._host

    def ssh_command(self) -> str:
        return f"ssh -F {self.ssh_config} {self.name}"

    def run(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run a command over the harness's own SSH session; (exit status, stdout+stderr)."""
        assert self._ssh is not None
        _, stdout, stderr = self._ssh.exec_command(command, timeout=timeout)
        out = stdout.read().decode(errors="replace") + stderr.read().decode(errors="replace")
        return stdout.channel.recv_exit_status(), out

    def served_host_key(self) -> str:
        """The host key sshd presented in the harness's SSH handshake, as "type base64"."""
        assert self._ssh is not None
        transport = self._ssh.get_transport()
        assert transport is not None
        key = transport.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"

    def host_port(self, guest_port: int) -> int:
        return self.forwards[guest_port]

    # -- the image as built ------------------------------------------------------------------

    def pristine_root(self) -> str:
        """Guest path of the image as built, mounted read-only: what contextualization hides.

        Attached after boot, not at it: two disks with the root filesystem's UUID would make the
        boot's root=UUID= ambiguous. The disk is an overlay of its own over the same base, opened
        read-only, so neither the base nor the instance's overlay can change through it.
        """
        if self._pristine is not None:
            return self._pristine
        if self.workdir is None or self._dom is None:
            raise InstanceError(self.reached, "the pristine image needs a running instance")
        overlay = self.workdir / "pristine.qcow2"
        disk.create_overlay(self.image, overlay, self.image_format)
        self.hv.attach_disk(self._dom, disk_xml(Disk(overlay, "qcow2", readonly=True, serial=PRISTINE_SERIAL),
                                                PRISTINE_TARGET))
        rc, out = self.run(_PRISTINE_MOUNT_SCRIPT, timeout=180)
        if rc != 0:
            raise InstanceError(self.reached, f"the image as built could not be mounted read-only in the guest "
                                              f"(exit status {rc}): {out.strip()[-800:]}", self.serial_tail(20))
        log.info("%s: image as built mounted read-only at %s from %s", self.name, PRISTINE_MOUNT, out.strip())
        self._pristine = PRISTINE_MOUNT
        return self._pristine

    def release_pristine(self) -> None:
        """Unmount the image as built (the disk and its overlay go with the domain and the work dir)."""
        if self._pristine is None or self._ssh is None:
            return
        rc, out = self.run(f"umount {PRISTINE_MOUNT} && rmdir {PRISTINE_MOUNT}", timeout=60)
        if rc != 0:
            log.warning("%s: could not unmount %s: %s", self.name, PRISTINE_MOUNT, out.strip())
        self._pristine = None

    # -- stop --------------------------------------------------------------------------------

    def _close_ssh(self) -> None:
        if self._host is not None:
            with contextlib.suppress(Exception):
                self._host.backend.client.close()
        if self._ssh is not None:
            with contextlib.suppress(Exception):
                self._ssh.close()
        self._ssh = None

    def stop(self) -> None:
        keep = self.options.keep == "always" or (self.options.keep == "on-failure" and self.failed)
        self._pristine = None  # the mount ends with the domain; a kept one keeps it for a person to look at
        self._close_ssh()
        if self.on_stop is not None and self.workdir is not None:
            try:
                self.on_stop(self)
            except Exception as exc:  # a failing observer must not stop the teardown
                log.warning("%s: teardown hook failed: %s", self.name, exc)
        if keep and self._dom is not None and self.hv.is_active(self._dom):
            self.kept = True
            log.warning("%s kept for inspection: %s  (serial log %s; destroy it with Ctrl-C of this run "
                        "or when the run ends)", self.name, self.ssh_command(), self.serial_log)
            return
        self.hv.destroy(self.name)
        self._dom = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

