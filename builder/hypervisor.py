"""The libvirt connection: embedded QEMU driver by default, any URI by option; accel detection.

Every domain started through a Hypervisor is destroyed when the Hypervisor closes, whatever
happened in between, so no qemu process outlives a run.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import libvirt

from builder import runstamp
from builder.errors import CommandError, HypervisorError
from builder.fsutil import atomic_copy, atomic_write_text
from builder.options import Accel
from builder.run import run

log = logging.getLogger(__name__)

DomainType = Literal["kvm", "qemu"]

_EMBED_QEMU_CONF = """\
# Written by kickgate: the embedded driver runs QEMU as root with no daemon and no virtlogd.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
"""

_event_loop_lock = threading.Lock()
_event_loop_started = False
_embed_root: Path | None = None


def process_embed_root() -> Path:
    """The one root of libvirt's embedded driver in this process.

    libvirt binds a process to the first embed root it opens, even after that connection is
    closed ("already open with path …"), so every Hypervisor of a process shares it. It is
    removed when the process exits.
    """
    global _embed_root
    with _event_loop_lock:
        if _embed_root is None:
            # Short path: QEMU's monitor sockets live below it and UNIX paths max out at 108 bytes.
            root = Path(tempfile.mkdtemp(prefix="kg-virt-", dir="/tmp"))
            runstamp.stamp(root)
            (root / "etc").mkdir()
            (root / "etc" / "qemu.conf").write_text(_EMBED_QEMU_CONF)
            atexit.register(shutil.rmtree, root, True)
            _embed_root = root
        return _embed_root


def _ensure_event_loop() -> None:
    """libvirt needs one event loop per process, registered before the first connection."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def loop() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def _silence_libvirt_stderr() -> None:
    # libvirt prints every error to stderr by default; we raise them as exceptions instead.
    def handler(_ctx: object, _err: object) -> None:
        return None

    libvirt.registerErrorHandler(handler, None)


class Hypervisor:
    """A libvirt connection plus the domains this process started on it."""

    def __init__(self, uri: str | None = None, accel: Accel = Accel.AUTO, cache_dir: Path | None = None) -> None:
        self.requested_uri = uri
        self.accel = Accel(accel)
        self.cache_dir = cache_dir
        self._embed_root: Path | None = None
        self._conn: Any = None
        self._domains: dict[str, Any] = {}
        self._kept: set[str] = set()
        self._lock = threading.Lock()
        self._domain_type: DomainType | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Hypervisor:
        self.open()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def uri(self) -> str:
        if self.requested_uri:
            return self.requested_uri
        assert self._embed_root is not None
        return f"qemu:///embed?root={self._embed_root}"

    @property
    def embedded(self) -> bool:
        return not self.requested_uri

    def open(self) -> None:
        if self._conn is not None:
            return
        _ensure_event_loop()
        _silence_libvirt_stderr()
        if self.embedded:
            self._embed_root = process_embed_root()
            self._restore_caps()
        try:
            self._conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            hint = ("install libvirt-daemon-driver-qemu and libvirt-daemon-system (ci/setup does)"
                    if self.embedded else "is libvirtd running and the URI right?")
            raise HypervisorError(f"cannot open libvirt at {self.uri}: {exc.get_error_message()} ({hint})") from None
        log.debug("libvirt connection open: %s", self.uri)

    def _caps_dirs(self) -> tuple[Path, Path] | None:
        if self._embed_root is None or self.cache_dir is None:
            return None
        return self._embed_root / "cache" / "qemu" / "capabilities", self.cache_dir / "libvirt-caps"

    def _restore_caps(self) -> None:
        """Seed a fresh embed root with QEMU capabilities probed by an earlier run.

        Probing them costs seconds per process; libvirt re-probes by itself when the cached
        file no longer matches the QEMU binary or libvirt's version.
        """
        dirs = self._caps_dirs()
        if dirs is None or not dirs[1].is_dir():
            return
        live, saved = dirs
        live.mkdir(parents=True, exist_ok=True)
        for xml in saved.glob("*.xml"):
            if not (live / xml.name).exists():
                shutil.copyfile(xml, live / xml.name)

    def _save_caps(self) -> None:
        dirs = self._caps_dirs()
        if dirs is None or not dirs[0].is_dir():
            return
        live, saved = dirs
        saved.mkdir(parents=True, exist_ok=True)
        for xml in live.glob("*.xml"):
            atomic_copy(xml, saved / xml.name)

    def close(self) -> None:
        with self._lock:
            names = list(self._domains)
        for name in names:
            self.destroy(name)
        if self.embedded and self._conn is not None:
            # Every domain of this process's embedded driver is this run's: none may outlive it
            # unless it was kept (forgotten) on purpose.
            with contextlib.suppress(libvirt.libvirtError):
                for dom in self._conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                    if dom.name() not in self._kept:
                        with contextlib.suppress(libvirt.libvirtError):
                            dom.destroy()
        with contextlib.suppress(OSError):
            self._save_caps()
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    # -- domains -----------------------------------------------------------------------------

    def start(self, xml: str, name: str) -> Any:
        """Start a transient domain; it is destroyed at close() if still running."""
        if self._conn is None:
            raise HypervisorError("hypervisor is not open")
        # Claimed before libvirt starts it: a signal that lands right after createXML returns must not
        # leave a running domain that nobody knows to destroy.
        with self._lock:
            self._domains[name] = None
        try:
            dom = self._conn.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            with self._lock:
                self._domains.pop(name, None)
            raise HypervisorError(f"libvirt refused domain {name}: {exc.get_error_message()}") from None
        with self._lock:
            self._domains[name] = dom
        log.debug("domain %s started (id %s)", name, dom.ID())
        return dom

    def destroy(self, name: str) -> None:
        """Stop a domain for good (idempotent) and wait for its qemu process to be gone."""
        with self._lock:
            if name not in self._domains:
                return
            dom = self._domains.pop(name)
        with contextlib.suppress(libvirt.libvirtError):
            if dom is None and self._conn is not None:
                dom = self._conn.lookupByName(name)
            if dom is not None and dom.isActive():
                dom.destroy()
                log.debug("domain %s destroyed", name)

    def forget(self, name: str, workdir: Path | None = None) -> Path | None:
        """Leave a running domain alone at close (a kept instance); record how to remove it later.

        Returns the record written under cache_dir/kept/, which `kickgate cleanup` reads.
        """
        with self._lock:
            dom = self._domains.pop(name, None)
            self._kept.add(name)
        if dom is None or self.cache_dir is None:
            return None
        pid = 0
        if self._embed_root is not None:
            pidfile = self._embed_root / "run" / "qemu" / f"{name}.pid"
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
        record = {"name": name, "pid": pid, "uri": self.uri if not self.embedded else "embedded",
                  "workdir": str(workdir) if workdir else ""}
        if workdir is not None:
            runstamp.stamp(workdir, kept=True)  # a new run's sweep must leave it alone
        kept = self.cache_dir / "kept"
        kept.mkdir(parents=True, exist_ok=True)
        path = kept / f"{name}.json"
        atomic_write_text(path, json.dumps(record) + "\n")
        return path

    def attach_disk(self, dom: Any, xml: str) -> None:
        """Hot-plug a disk (disk_xml) into a running domain, for its life only (not its definition)."""
        try:
            dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt refused to attach a disk to {dom.name()}: "
                                  f"{exc.get_error_message()}") from None

    def is_active(self, dom: Any) -> bool:
        try:
            return bool(dom.isActive())
        except libvirt.libvirtError:
            return False  # a transient domain that ended is gone from libvirt

    # -- acceleration ------------------------------------------------------------------------

    def domain_type(self, probe_kernel: Path | None = None) -> DomainType:
        if self._domain_type is None:
            self._domain_type = detect_domain_type(self.accel, probe_kernel, self.cache_dir)
        return self._domain_type


def _kvm_openable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def _probe_cache_key(kernel: Path) -> str:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    qemu = shutil.which("qemu-system-x86_64") or ""
    qemu_stamp = str(Path(qemu).stat().st_mtime_ns) if qemu else ""
    return hashlib.sha256(f"{boot_id}|{qemu_stamp}|{kernel.stat().st_size}".encode()).hexdigest()[:16]


def probe_kvm(kernel: Path, timeout: float = 10.0) -> bool:
    """Boot a kernel with no root under KVM: a usable KVM reaches the expected panic in seconds.

    Where KVM is broken the guest aborts on an MSR write or hangs right after real mode.
    """
    with tempfile.TemporaryDirectory(prefix="kg-probe-") as tmp:
        runstamp.stamp(Path(tmp))
        serial = Path(tmp) / "serial.log"
        argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults",
                "-display", "none", "-no-reboot", "-kernel", str(kernel),
                "-append", "console=ttyS0 panic=-1 loglevel=4", "-serial", f"file:{serial}"]
        with contextlib.suppress(CommandError):  # a timeout is the hung-guest answer
            run(argv, timeout=timeout, check=False)
        text = serial.read_text(errors="replace") if serial.exists() else ""
    return "Kernel panic" in text


def detect_domain_type(accel: Accel, probe_kernel: Path | None, cache_dir: Path | None) -> DomainType:
    env = os.environ.get("KICKGATE_ACCEL")
    if env in {a.value for a in Accel}:
        accel = Accel(env)
    if accel is Accel.TCG:
        return "qemu"
    if accel is Accel.KVM:
        return "kvm"
    if not _kvm_openable():
        log.info("acceleration: /dev/kvm not usable, using TCG")
        return "qemu"
    if probe_kernel is None:
        host_kernels = sorted(Path("/boot").glob("vmlinuz-*"))
        probe_kernel = host_kernels[-1] if host_kernels else None
    if probe_kernel is None:
        log.info("acceleration: no kernel to probe KVM with, using TCG")
        return "qemu"
    marker: Path | None = None
    if cache_dir is not None:
        marker = cache_dir / "accel" / _probe_cache_key(probe_kernel)
        if marker.exists():
            result: DomainType = "kvm" if marker.read_text().strip() == "kvm" else "qemu"
            log.debug("acceleration: %s (probed earlier this boot)", result)
            return result
    started = time.monotonic()
    ok = probe_kvm(probe_kernel)
    result = "kvm" if ok else "qemu"
    log.info("acceleration: %s (KVM probe %s in %.1fs)", "KVM" if ok else "TCG",
             "passed" if ok else "failed: guests hang or abort under KVM here", time.monotonic() - started)
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, result)
    return result


def cleanup_kept(cache_dir: Path) -> list[str]:
    """Stop instances kept by earlier runs (on whatever libvirt URI they ran) and remove their files."""
    done = []
    for record in sorted((cache_dir / "kept").glob("*.json")):
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            record.unlink(missing_ok=True)
            continue
        name, pid, uri = str(data.get("name", "")), int(data.get("pid", 0)), str(data.get("uri", "embedded"))
        if uri != "embedded":
            _destroy_on(uri, name)
        elif pid:
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if f"guest={name},".encode() in cmdline:  # never kill a recycled pid
                    os.kill(pid, 15)
        if data.get("workdir"):
            shutil.rmtree(str(data["workdir"]), ignore_errors=True)
        record.unlink(missing_ok=True)
        done.append(name)
    return done


def _destroy_on(uri: str, name: str) -> None:
    """Destroy a kept domain that a libvirt daemon runs (its QEMU is not ours to signal)."""
    _silence_libvirt_stderr()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot reach {uri} to stop the kept instance {name}: "
                              f"{exc.get_error_message()}") from None
    try:
        with contextlib.suppress(libvirt.libvirtError):  # already gone is what we want
            conn.lookupByName(name).destroy()
    finally:
        conn.close()
