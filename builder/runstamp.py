"""Which run owns a directory, and removing what runs that died (SIGKILL, a lost CI runner) left behind.

Every directory a run creates for itself (the embedded libvirt root, instance work dirs, build
staging) carries a stamp naming the run: pid, the pid's start time and the host's boot id, so a
recycled pid or a reboot never makes a dead run look alive. `sweep` removes the directories of dead
runs, after stopping the QEMU processes that still use them, and never touches a live run's or a
kept instance's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STAMP = ".kickgate-run"
TMP = Path("/tmp")
# Directories a run makes for itself in /tmp (instances, libvirt's embedded root, KVM probes, mutants).
TMP_PREFIXES = ("kg-virt-", "kg-inst-", "kg-probe-", "kg-mut-")


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class RunId:
    pid: int
    start: int
    boot: str

    @classmethod
    def current(cls) -> RunId:
        pid = os.getpid()
        return cls(pid=pid, start=_start_ticks(pid) or 0, boot=boot_id())

    def alive(self) -> bool:
        return self.boot == boot_id() and _start_ticks(self.pid) == self.start


def stamp(directory: Path, *, kept: bool = False, run: RunId | None = None) -> None:
    """Mark directory as this run's (kept: it outlives the run on purpose, for `kickgate cleanup`)."""
    data = {**asdict(run or RunId.current()), "kept": kept}
    tmp = directory / f"{STAMP}.{os.getpid()}"
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, directory / STAMP)


def owner(directory: Path) -> tuple[RunId, bool] | None:
    """(the run that made directory, whether it is kept), or None when it carries no readable stamp."""
    try:
        data = json.loads((directory / STAMP).read_text())
        return RunId(pid=int(data["pid"]), start=int(data["start"]), boot=str(data["boot"])), bool(data["kept"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def orphaned(directory: Path) -> bool:
    """True if a run that is gone left directory behind.

    Only stamped directories of this user are judged: an unstamped one may belong to a run that is
    starting up (it stamps right after creating) or to another tool, and is never removed.
    """
    found = owner(directory)
    if found is None:
        return False
    run, kept = found
    try:
        mine = directory.stat().st_uid == os.getuid()
    except OSError:
        return False
    return mine and not kept and not run.alive()


def qemu_pids_using(path: Path) -> list[int]:
    """QEMU processes whose command line names path (their disks, sockets or logs live below it)."""
    needle = str(path).encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes()
            if b"qemu-system" in cmdline.split(b"\0", 1)[0] and needle in cmdline:
                pids.append(int(proc.name))
    return pids


def _stop(pids: Iterable[int]) -> None:
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _start_ticks(p) is not None and not _zombie(p)]
        time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return ") Z " in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True


def candidates(cache_dir: Path | None) -> list[Path]:
    """Directories runs create for themselves: /tmp/kg-*, the cache's staging and tree staging."""
    found = [p for p in TMP.iterdir() if p.name.startswith(TMP_PREFIXES) and p.is_dir() and not p.is_symlink()]
    if cache_dir is not None:
        for sub, pattern in (("tmp", "*"), ("trees", ".*-*")):
            base = cache_dir / sub
            if base.is_dir():
                found += [p for p in base.glob(pattern) if p.is_dir() and not p.is_symlink()]
    return sorted(found)


def sweep(cache_dir: Path | None) -> list[Path]:
    """Remove what dead runs left behind (QEMU processes first, then their directories)."""
    found = candidates(cache_dir)
    # A kept instance's QEMU also names its run's libvirt root: it must survive that root's removal.
    kept = {pid for d in found if (o := owner(d)) is not None and o[1] for pid in qemu_pids_using(d)}
    removed = []
    for directory in found:
        if not orphaned(directory):
            continue
        _stop(set(qemu_pids_using(directory)) - kept)
        shutil.rmtree(directory, ignore_errors=True)
        if not directory.exists():
            log.info("removed %s, left by a run that is gone", directory)
            removed.append(directory)
    return removed
