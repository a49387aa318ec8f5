"""Mutants: prove the specs by breaking a built image on purpose, one defect at a time.

A mutant is a shell script (`mutants/*.sh`) that introduces one defect a recipe author could
make. Each runs inside a throwaway copy-on-write copy of the image, *without* the image's own
init: the image's kernel boots with `init=/bin/sh -- /dev/vdb`, so an initramfs (kickgate's small
one from the image's modules where directboot can make it, else the image's own) mounts the root
and hands it to a shell that reads a runner script from a second disk. A normal boot would run
first-boot units, make host keys and contextualize, and every mutant would then look "killed" by
the clone and identity specs. The mutated overlay then gets the same `pytest specs/` a verify
run gives an image; a mutant is killed by the specs that failed on it and passed on the
unmutated image (the control).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from builder import directboot, disk, runstamp
from builder.console import Outcome, watch
from builder.domain import Disk, DomainSpec, domain_xml
from builder.domainrun import read_serial
from builder.errors import CommandError, KickgateError, MutantError
from builder.fsutil import atomic_write_bytes
from builder.hypervisor import Hypervisor
from builder.run import run

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DIR = REPO_ROOT / "mutants"
SPECS_DIR = REPO_ROOT / "specs"

OK_MARKER = "KICKGATE-MUTANT-OK"
FAILED_MARKER = "KICKGATE-MUTANT-FAILED"
HEADERS = ("mutant", "breaks")
APPLY_TIMEOUT_S = 300.0
APPLY_IDLE_S = 120.0
SPECS_TIMEOUT_S = 1800.0
TAIL_LINES = 30

# -- discovery ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutant:
    """One defect: the script's name (file stem), what it does, the seed property it breaks."""

    name: str
    path: Path
    description: str
    breaks: str
    body: str


_HEADER_RE = re.compile(r"#\s*(mutant|breaks)\s*:(.*)$")


def parse_mutant(path: Path) -> Mutant:
    """A mutant from its script; its `# mutant:` and `# breaks:` headers are required, once each."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise MutantError(path, "", f"cannot read the mutant script: {exc}") from None
    found: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break  # the header is the comment block at the top
        m = _HEADER_RE.match(stripped)
        if m is None:
            continue
        key, value = m.group(1), m.group(2).strip()
        if key in found:
            raise MutantError(path, f"line {number}", f"a second '# {key}:' header (the first is on line "
                              f"{found[key][0]})", f"keep one '# {key}: ...' line")
        if not value:
            raise MutantError(path, f"line {number}", f"'# {key}:' is empty", _hint(key))
        found[key] = (number, value)
    for key in HEADERS:
        if key not in found:
            raise MutantError(path, "line 1", f"no '# {key}:' header in the comment block at the top", _hint(key))
    return Mutant(name=path.stem, path=path, description=found["mutant"][1], breaks=found["breaks"][1], body=text)


def _hint(key: str) -> str:
    if key == "mutant":
        return "write '# mutant: <one-line description of the defect>' near the top"
    return "write '# breaks: <the seed property it breaks, e.g. no swap>' near the top"


def mutant_dirs(recipe_root: Path, image: str, shipped: Path = SHIPPED_DIR) -> list[Path]:
    """Where mutants come from, in order: shipped with kickgate, the recipe root's, the image's own."""
    dirs: list[Path] = []
    for d in (shipped, recipe_root / "mutants", recipe_root / "images" / image / "mutants"):
        if d.is_dir() and all(d.resolve() != seen.resolve() for seen in dirs):
            dirs.append(d)
    return dirs


def discover(dirs: Iterable[Path]) -> list[Mutant]:
    """Every mutant in dirs (`*.sh`), sorted by name; the same name twice is an error."""
    by_name: dict[str, Mutant] = {}
    for d in dirs:
        for path in sorted(d.glob("*.sh")):
            mutant = parse_mutant(path)
            other = by_name.get(mutant.name)
            if other is not None:
                raise MutantError(path, "", f"a mutant named {mutant.name!r} already comes from {other.path}",
                                  "rename one of the two files: the file name is the mutant's name")
            by_name[mutant.name] = mutant
    return sorted(by_name.values(), key=lambda m: m.name)


def select(mutants: Sequence[Mutant], names: Sequence[str]) -> list[Mutant]:
    """The named mutants (all when names is empty); an unknown name is an error listing the known ones."""
    if not names:
        return list(mutants)
    known = {m.name: m for m in mutants}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KickgateError(f"no mutant named {', '.join(unknown)}; known: {', '.join(sorted(known)) or '(none)'}")
    return [known[n] for n in dict.fromkeys(names)]


# -- the script disk ----------------------------------------------------------------------------

_RUNNER = """\
# kickgate mutant runner: PID 1 in place of the image's init (init=/bin/sh -- /dev/vdb). It runs
# one mutant in the image's root, prints a marker and powers off; nothing of the image's boot runs.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp
mountpoint -q /run || mount -t tmpfs tmpfs /run
mountpoint -q /tmp || mount -t tmpfs tmpfs /tmp
mount -o remount,rw / || echo "{failed}: cannot remount / read-write"
echo 1 > /proc/sys/kernel/sysrq
cat > /run/kickgate-mutant.sh <<'{eof}'
{body}
{eof}
echo "KICKGATE-MUTANT-BEGIN {name}"
sh -eu /run/kickgate-mutant.sh </dev/null
rc=$?
if [ "$rc" -eq 0 ]; then echo "{ok}"; else echo "{failed}: the mutant exited $rc"; fi
sync
mount -o remount,ro / 2>/dev/null
echo o > /proc/sysrq-trigger
sleep 30
exit 0
"""


def runner_script(mutant: Mutant, eof: str | None = None) -> bytes:
    """The script the guest's shell reads from the script disk, padded with NULs to whole sectors.

    The shell powers the guest off before it reads past the script, so it never sees the padding.
    """
    body = mutant.body.rstrip("\n")
    eof = eof or f"KICKGATE_MUTANT_BODY_{secrets.token_hex(8)}"
    if eof in body:
        raise MutantError(mutant.path, "", f"the mutant contains the runner's delimiter {eof}")
    text = _RUNNER.format(body=body, eof=eof, name=mutant.name, ok=OK_MARKER, failed=FAILED_MARKER)
    data = text.encode()
    return data + b"\0" * (-len(data) % 512)


# -- the image's kernel, initrd and root --------------------------------------------------------


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path
    root_uuid: str


def _version_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def root_partition_offset(raw: Path) -> int:
    """Byte offset of the Linux partition holding the root (the reference images: one, at 1 MiB)."""
    table = json.loads(run(["sfdisk", "--json", str(raw)], timeout=60).stdout).get("partitiontable", {})
    sector = int(table.get("sectorsize", 512))
    parts = [p for p in table.get("partitions", []) if str(p.get("type", "")).lower() in
             ("83", "0fc63daf-8483-4772-8e79-3d69d8477de4")]
    if not parts:
        raise KickgateError(f"{raw}: no Linux partition in its partition table")
    return int(max(parts, key=lambda p: int(p.get("size", 0)))["start"]) * sector


def extract_boot_files(image: Path, image_format: str, workdir: Path) -> BootFiles:
    """The image's newest kernel and initrd and its root filesystem's UUID, read without mounting it."""
    raw = workdir / "image.raw"
    try:
        run(["qemu-img", "convert", "-U", "-f", image_format, "-O", "raw", str(image), str(raw)], timeout=600)
        offset = root_partition_offset(raw)
        fs = f"{raw}?offset={offset}"
        listing = run(["debugfs", "-R", "ls -p /boot", fs], timeout=60).stdout
        names = [f.split("/")[5] for f in listing.splitlines() if f.count("/") >= 6]
        kernels = sorted((n for n in names if n.startswith("vmlinuz-")), key=_version_key)
        initrds = sorted((n for n in names if n.startswith("initrd.img-")), key=_version_key)
        if not kernels or not initrds:
            raise KickgateError(f"{image}: no /boot/vmlinuz-* and /boot/initrd.img-* in its root filesystem")
        kernel, initrd = workdir / "vmlinuz", workdir / "initrd.img"
        run(["debugfs", "-R", f"dump /boot/{kernels[-1]} {kernel}", fs], timeout=120)
        run(["debugfs", "-R", f"dump /boot/{initrds[-1]} {initrd}", fs], timeout=120)
        uuid = run(["blkid", "-p", "-O", str(offset), "-s", "UUID", "-o", "value", str(raw)], timeout=60).stdout
        modules = _dump_modules(fs, kernels[-1].removeprefix("vmlinuz-"), workdir / "modules")
    finally:
        raw.unlink(missing_ok=True)  # gigabytes: gone as soon as the small files are out
    if not kernel.is_file() or kernel.stat().st_size == 0 or not initrd.is_file():
        raise KickgateError(f"{image}: could not extract {kernels[-1]} and {initrds[-1]} from /boot")
    if not uuid.strip():
        raise KickgateError(f"{image}: its root filesystem has no UUID")
    fast = directboot.prepare(kernel, initrd, modules, workdir, APPLY_MODULES)
    return BootFiles(kernel=fast.kernel, initrd=fast.initrd, root_uuid=uuid.strip())


def _dump_modules(fs: str, kernel_version: str, dest: Path) -> Path:
    """Copy out of the image the modules the apply VM's initramfs loads (see directboot), with their
    dependencies; what is missing just makes directboot fall back to the image's own initramfs."""
    src = f"/lib/modules/{kernel_version}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("modules.dep", "modules.builtin"):
        run(["debugfs", "-R", f"dump {src}/{name} {dest / name}", fs], timeout=60, check=False)
    for rel in directboot.modules_to_load(dest, APPLY_MODULES) or []:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        run(["debugfs", "-R", f"dump {src}/{rel} {dest / rel}", fs], timeout=60, check=False)
    return dest


# What the apply VM's initramfs loads: the overlay and the runner disk, and the root filesystem.
APPLY_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")


def cmdline(boot: BootFiles) -> str:
    return (f"root=UUID={boot.root_uuid} rw console=ttyS0,115200 net.ifnames=0 panic=-1 "
            "init=/bin/sh -- /dev/vdb")


# -- results ------------------------------------------------------------------------------------

SpecOutcome = Literal["passed", "failed", "error", "skipped"]


@dataclass(frozen=True)
class SpecRun:
    """The outcome of every spec of one `pytest specs/` run, by spec name (image parameter dropped)."""

    outcomes: tuple[tuple[str, SpecOutcome, str], ...]  # (spec, outcome, first line of the message)

    def names(self, *outcomes: str) -> list[str]:
        return [n for n, o, _ in self.outcomes if o in outcomes]

    def message(self, name: str) -> str:
        return next((m for n, _, m in self.outcomes if n == name), "")


def spec_name(testcase: str, image: str) -> str:
    """`test_x[generic-dev]` → `test_x`; other parameters stay (`test_y[generic-dev-ipv6]` → `test_y[ipv6]`)."""
    name, bracket, param = testcase.partition("[")
    if not bracket:
        return name
    param = param.removesuffix("]")
    if param == image:
        return name
    for rest in (param.removeprefix(image + "-"), param.removesuffix("-" + image)):
        if rest != param:
            return f"{name}[{rest}]"
    return f"{name}[{param}]"


def parse_junit(path: Path, image: str) -> SpecRun:
    outcomes: list[tuple[str, SpecOutcome, str]] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome: SpecOutcome = "passed"
        message = ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = "failed" if tag == "failure" else "error" if tag == "error" else "skipped"
                lines = (el.get("message") or el.text or "").strip().splitlines()
                message = lines[0] if lines else ""
                break
        outcomes.append((spec_name(case.get("name", ""), image), outcome, message[:300]))
    return SpecRun(tuple(outcomes))


MutantOutcome = Literal["killed", "survived", "error"]


@dataclass(frozen=True)
class MutantResult:
    name: str
    description: str
    breaks: str
    source: str
    outcome: MutantOutcome
    killed_by: tuple[str, ...] = ()
    error: str | None = None
    detail: str = ""  # e.g. the instance error every spec reported
    apply_seconds: float = 0.0
    spec_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.apply_seconds + self.spec_seconds

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "breaks": self.breaks, "source": self.source,
                "outcome": self.outcome, "killed_by": list(self.killed_by), "error": self.error,
                "detail": self.detail, "seconds": {"apply": round(self.apply_seconds, 1),
                                                   "specs": round(self.spec_seconds, 1),
                                                   "total": round(self.seconds, 1)}}


def judge(mutant: Mutant, control: SpecRun | None, run_: SpecRun) -> tuple[MutantOutcome, tuple[str, ...], str]:
    """Killed by the specs that failed (or errored) on the mutant and passed on the control.

    Without a control run every failing spec counts. When every counted spec errored with the same
    message (the instance never came up), that message is the detail.
    """
    bad = run_.names("failed", "error")
    if control is not None:
        passed = set(control.names("passed"))
        bad = [n for n in bad if n in passed]
    if not bad:
        # Survival is a claim about every spec: a run that did not judge them all cannot make it.
        ran = {n for n, _, _ in run_.outcomes}
        missing = sorted({n for n, _, _ in control.outcomes} - ran) if control is not None else []
        if not ran or missing:
            what = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "") if missing else "any spec"
            return "error", (), f"the spec run on the mutant did not run {what}: it cannot have survived"
        return "survived", (), ""
    detail = ""
    messages = {run_.message(n) for n in bad}
    if len(bad) > 1 and len(messages) == 1 and set(run_.names("error")) >= set(bad):
        detail = next(iter(messages))
    return "killed", tuple(bad), detail


# -- the table ----------------------------------------------------------------------------------


def killed_text(result: MutantResult, control_passed: int | None) -> str:
    if result.outcome == "error":
        return f"ERROR: {(result.error or '').splitlines()[0] if result.error else 'unknown'}"
    if result.outcome == "survived":
        return "SURVIVED"
    if result.detail and control_passed is not None and len(result.killed_by) == control_passed:
        return f"killed by every spec ({len(result.killed_by)}): {result.detail}"
    return "killed by " + ", ".join(result.killed_by)


def render_table(results: Sequence[MutantResult], control_passed: int | None = None) -> str:
    rows = [("mutant", "breaks", "result", "time")]
    rows += [(r.name, r.breaks, killed_text(r, control_passed), f"{r.seconds:.0f}s") for r in results]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {d:>5}  {c}" for a, b, c, d in rows]
    killed = sum(r.outcome == "killed" for r in results)
    survived = sum(r.outcome == "survived" for r in results)
    errors = sum(r.outcome == "error" for r in results)
    lines.append(f"{killed} killed, {survived} survived, {errors} could not be applied, of {len(results)} mutants")
    return "\n".join(lines) + "\n"


def render_json(results: Sequence[MutantResult]) -> str:
    return json.dumps([r.to_json() for r in results], indent=2) + "\n"


def exit_status(results: Sequence[MutantResult], control_failed: bool) -> int:
    return 1 if control_failed or any(r.outcome != "killed" for r in results) else 0


# -- running ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    image_name: str
    image: Path
    image_format: str
    recipes: Path
    domain_type: str  # "kvm" or "qemu"
    jobs: int = 2
    control: bool = True
    user_cache: Path | None = None  # read only: libvirt capabilities probed by earlier runs
    memory_mib: int = 512
    python: str = sys.executable


@dataclass
class Report:
    results: list[MutantResult] = field(default_factory=list)
    control: SpecRun | None = None
    control_error: str | None = None
    control_seconds: float = 0.0

    @property
    def control_failed(self) -> bool:
        return self.control_error is not None or (self.control is not None
                                                  and bool(self.control.names("failed", "error")))

    @property
    def control_passed(self) -> int | None:
        return len(self.control.names("passed")) if self.control is not None else None


class ApplyError(KickgateError):
    """The mutant could not be applied: the guest did not print the success marker and power off."""


class MutantRunner:
    """Runs mutants against one image: apply each to an overlay, verify it, judge it; cleans everything up."""

    def __init__(self, settings: RunSettings, hypervisor: Hypervisor) -> None:
        self.settings = settings
        self.hv = hypervisor
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._children: set[int] = set()
        self._domains: set[str] = set()
        self.workdir: Path | None = None
        self.boot: BootFiles | None = None

    # -- lifetime -------------------------------------------------------------------------------

    def __enter__(self) -> MutantRunner:
        self.workdir = Path(tempfile.mkdtemp(prefix="kg-mut-", dir="/tmp"))
        self.workdir.chmod(0o700)
        runstamp.stamp(self.workdir)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def stop(self) -> None:
        """Stop everything still running: spec runs get SIGTERM (they clean up after themselves), guests go."""
        self._stop.set()
        with self._lock:
            children, domains = list(self._children), list(self._domains)
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        for name in domains:
            self.hv.destroy(name)

    # -- the run --------------------------------------------------------------------------------

    def run(self, mutants: Sequence[Mutant], on_result: Callable[[MutantResult], None] | None = None) -> Report:
        assert self.workdir is not None, "use MutantRunner as a context manager"
        s = self.settings
        started = time.monotonic()
        self.boot = extract_boot_files(s.image, s.image_format, self.workdir)
        log.info("%s: kernel, initrd and root UUID read in %.1fs", s.image_name, time.monotonic() - started)
        report = Report()
        order: list[Mutant | None] = [None] if s.control else []
        order += list(mutants)
        results: dict[str, MutantResult] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, s.jobs), thread_name_prefix="mutant") as pool:
            futures = {pool.submit(self._job, m, report): m for m in order}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    result = fut.result()
                    if result is not None:
                        results[result.name] = result
                        if on_result is not None:
                            on_result(result)
            except BaseException:
                self.stop()
                for f in futures:
                    f.cancel()
                raise
        report.results = [results[m.name] for m in mutants if m.name in results]
        return report

    def _job(self, mutant: Mutant | None, report: Report) -> MutantResult | None:
        if self._stop.is_set():
            return None
        if mutant is None:
            self._control(report)
            return None
        return self.mutate(mutant, report)

    def _control(self, report: Report) -> None:
        s = self.settings
        log.info("control: the specs on the unmutated %s", s.image_name)
        started = time.monotonic()
        work = self._private_dir("control")
        try:
            report.control = self.run_specs(s.image, work)
            failed = report.control.names("failed", "error")
            if failed:
                log.error("control: specs failed on the unmutated image: %s", ", ".join(failed))
                self._stop.set()  # no mutant can be judged against a failing control
        except KickgateError as exc:
            report.control_error = str(exc)
            log.error("control: %s", exc)
            self._stop.set()
        finally:
            shutil.rmtree(work, ignore_errors=True)
            report.control_seconds = time.monotonic() - started
            log.info("control: done in %.0fs", report.control_seconds)

    def _private_dir(self, name: str) -> Path:
        assert self.workdir is not None
        return Path(tempfile.mkdtemp(prefix=f"{name[:40]}-", dir=self.workdir))

    def mutate(self, mutant: Mutant, report: Report) -> MutantResult | None:
        s = self.settings
        log.info("mutant %s: applying (%s)", mutant.name, mutant.breaks)
        work = self._private_dir(mutant.name)
        base = MutantResult(name=mutant.name, description=mutant.description, breaks=mutant.breaks,
                            source=str(mutant.path), outcome="error")
        started = time.monotonic()
        try:
            overlay = work / "overlay.qcow2"
            disk.create_overlay(s.image, overlay, s.image_format)
            try:
                self.apply(mutant, overlay, work)
            except KickgateError as exc:
                if self._stop.is_set():
                    return None
                log.warning("mutant %s: could not be applied: %s", mutant.name, str(exc).splitlines()[0])
                return replace(base, error=str(exc), apply_seconds=time.monotonic() - started)
            applied = time.monotonic()
            if self._stop.is_set():
                return None
            log.info("mutant %s: applied in %.0fs; running the specs", mutant.name, applied - started)
            try:
                spec_run = self.run_specs(overlay, work)
            except KickgateError as exc:
                if self._stop.is_set():
                    return None
                return replace(base, error=str(exc), apply_seconds=applied - started,
                               spec_seconds=time.monotonic() - applied)
            if self._stop.is_set():  # an interrupted spec run judges nothing
                return None
            outcome, killed_by, detail = judge(mutant, report.control if s.control else None, spec_run)
            result = replace(base, outcome=outcome, killed_by=killed_by, detail=detail,
                             error=detail if outcome == "error" else None,
                             apply_seconds=applied - started, spec_seconds=time.monotonic() - applied)
            log.info("mutant %s: %s in %.0fs (apply %.0fs, specs %.0fs)", mutant.name,
                     "SURVIVED" if outcome == "survived" else "ERROR: " + detail if outcome == "error"
                     else "killed by " + ", ".join(killed_by),
                     result.seconds, result.apply_seconds, result.spec_seconds)
            return result
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def apply(self, mutant: Mutant, overlay: Path, work: Path) -> None:
        """Boot the image's kernel on the overlay with the runner as PID 1; return once it applied the mutant."""
        assert self.boot is not None
        s = self.settings
        script = work / "script.img"
        atomic_write_bytes(script, runner_script(mutant), mode=0o600)
        serial = work / "serial.log"
        name = f"kg-mut-{mutant.name[:24]}-{secrets.token_hex(3)}"
        spec = DomainSpec(name=name, type="kvm" if s.domain_type == "kvm" else "qemu", memory_mib=s.memory_mib,
                          vcpus=1, serial_log=serial,
                          # writeback: the guest's sync before power-off must reach the overlay.
                          disks=(Disk(overlay, "qcow2", cache="writeback"), Disk(script, "raw", readonly=True)),
                          kernel=self.boot.kernel, initrd=self.boot.initrd, cmdline=cmdline(self.boot))
        with self._lock:
            if self._stop.is_set():
                raise ApplyError("stopped")
            self._domains.add(name)
        try:
            dom = self.hv.start(domain_xml(spec), name)

            def active(d: Any) -> bool:  # a stopped run stops following at once, even a guest started late
                return not self._stop.is_set() and self.hv.is_active(d)

            outcome, w = watch(dom, active, serial, timeout=APPLY_TIMEOUT_S, idle_timeout=APPLY_IDLE_S,
                               markers=[OK_MARKER], failure=[FAILED_MARKER, "Kernel panic"])
        finally:
            self.hv.destroy(name)
            with self._lock:
                self._domains.discard(name)
        text = read_serial(serial)
        ok = OK_MARKER in w.seen or any(OK_MARKER in ln for ln in text.splitlines())
        if outcome is Outcome.POWERED_OFF and ok:
            return
        if outcome is Outcome.FAILED:
            reason = f"failure on the console: {w.failure_line!r}"
        elif outcome is Outcome.POWERED_OFF:
            reason = f"the guest powered off without printing {OK_MARKER}"
        elif outcome is Outcome.TIMEOUT:
            reason = f"not done within {APPLY_TIMEOUT_S:.0f}s"
        else:
            reason = f"{outcome.value}: nothing printed for {APPLY_IDLE_S:.0f}s"
        tail = w.tail_lines(TAIL_LINES) or text.splitlines()[-TAIL_LINES:]
        raise ApplyError(f"mutant {mutant.name} was not applied: {reason}\n--- last serial lines ---\n"
                         + "\n".join(tail))

    def run_specs(self, image: Path, work: Path) -> SpecRun:
        """`pytest specs/` on image as a verify run would, with a private cache and registry: nothing of
        the user's build cache or registry is touched."""
        s = self.settings
        cache = work / "cache"
        cache.mkdir()
        if s.user_cache is not None and (s.user_cache / "libvirt-caps").is_dir():
            # QEMU's capabilities probed by earlier runs: seconds saved per spec run.
            shutil.copytree(s.user_cache / "libvirt-caps", cache / "libvirt-caps")
        junit = work / "junit.xml"
        argv = [s.python, "-m", "pytest", str(SPECS_DIR), "--image-path", str(image), "--image", s.image_name,
                "--recipes", str(s.recipes), "--no-register", "--registry-dir", str(work / "registry"),
                "--cache-dir", str(cache), "--accel", "kvm" if s.domain_type == "kvm" else "tcg",
                f"--junitxml={junit}", "-p", "no:cacheprovider", "-q"]
        env = {"KICKGATE_CACHE_DIR": str(cache), "KICKGATE_REGISTRY_DIR": str(work / "registry"),
               "PYTEST_ADDOPTS": ""}
        mine: list[int] = []

        def started(pid: int) -> None:
            mine.append(pid)
            with self._lock:
                self._children.add(pid)
            if self._stop.is_set():  # stopped while it was being started
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)

        try:
            res = run(argv, timeout=SPECS_TIMEOUT_S, check=False, cwd=REPO_ROOT, env=env, on_start=started)
        except CommandError as exc:
            raise KickgateError(f"the spec run did not finish: {exc}") from None
        finally:
            with self._lock:
                self._children.difference_update(mine)
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-TAIL_LINES:])
        if not junit.is_file():
            raise KickgateError(f"the spec run wrote no JUnit report (exit status {res.returncode}):\n{tail}")
        if res.returncode not in (0, 1):  # 0 all passed, 1 some failed; anything else judged nothing whole
            raise KickgateError(f"the spec run ended with exit status {res.returncode} (interrupted, or a usage "
                                f"or collection error):\n{tail}")
        return parse_junit(junit, s.image_name)
