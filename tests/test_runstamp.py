"""Run stamps decide what a sweep may remove: only what runs that are gone left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder import runstamp
from builder.runstamp import RunId


def _dead_run() -> RunId:
    """The identity of a process that really existed and has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    run = RunId(pid=child.pid, start=0, boot=runstamp.boot_id())
    start = None
    for _ in range(50):  # read its start time while it exists, then let it go
        start = runstamp._start_ticks(child.pid)
        if start is not None:
            break
    child.wait()
    return RunId(pid=run.pid, start=start or 1, boot=run.boot)


def test_this_run_is_alive_and_an_exited_one_is_not() -> None:
    assert RunId.current().alive()
    assert not _dead_run().alive()
    me = RunId.current()
    assert not RunId(pid=me.pid, start=me.start + 1, boot=me.boot).alive(), "a recycled pid looks alive"
    assert not RunId(pid=me.pid, start=me.start, boot="another-boot").alive(), "a run from before a reboot"


def test_only_stamped_dirs_of_dead_runs_are_orphans(tmp_path: Path) -> None:
    live, dead, kept, unstamped = (tmp_path / n for n in ("live", "dead", "kept", "unstamped"))
    for d in (live, dead, kept, unstamped):
        d.mkdir()
    runstamp.stamp(live)
    runstamp.stamp(dead, run=_dead_run())
    runstamp.stamp(kept, kept=True, run=_dead_run())
    assert [runstamp.orphaned(d) for d in (live, dead, kept, unstamped)] == [False, True, False, False]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    fake_tmp = tmp_path / "tmp"
    fake_tmp.mkdir()
    monkeypatch.setattr(runstamp, "TMP", fake_tmp)
    return tmp_path


def test_sweep_stops_a_dead_runs_processes_and_removes_its_dirs(sandbox: Path) -> None:
    tmp, cache = sandbox / "tmp", sandbox / "cache"
    dead_inst = tmp / "kg-inst-dead-1"
    live_inst = tmp / "kg-inst-live-1"
    kept_inst = tmp / "kg-inst-kept-1"
    staging = cache / "tmp" / "generic-dev-abc"
    for d in (dead_inst, live_inst, kept_inst, staging):
        d.mkdir(parents=True)
    runstamp.stamp(dead_inst, run=_dead_run())
    runstamp.stamp(staging, run=_dead_run())
    runstamp.stamp(live_inst)
    runstamp.stamp(kept_inst, kept=True, run=_dead_run())
    # Stand-ins for the QEMU processes the dead run left: their command lines name its directories.
    qemu = sandbox / "qemu-system-x86_64"
    qemu.symlink_to(sys.executable)
    wait = ["-c", "import time; time.sleep(300)"]
    orphan = subprocess.Popen([str(qemu), *wait, str(dead_inst / "overlay.qcow2")])
    survivor = subprocess.Popen([str(qemu), *wait, str(kept_inst / "overlay.qcow2"), str(dead_inst / "socket")])
    for proc in (orphan, survivor):  # until they have exec'd, their command lines are this process's
        while b"qemu-system" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0", 1)[0]:
            time.sleep(0.01)
    try:
        removed = runstamp.sweep(cache)
        assert sorted(removed) == sorted([dead_inst, staging])
        assert orphan.wait(timeout=10) == -9
        assert survivor.poll() is None, "a kept instance's QEMU was stopped"
        assert live_inst.is_dir() and kept_inst.is_dir()
    finally:
        for p in (orphan, survivor):
            p.kill()
            p.wait()


def test_stamp_is_replaced_atomically(tmp_path: Path) -> None:
    runstamp.stamp(tmp_path)
    runstamp.stamp(tmp_path, kept=True)
    assert runstamp.owner(tmp_path) == (RunId.current(), True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [runstamp.STAMP]
    assert os.stat(tmp_path / runstamp.STAMP).st_mtime <= time.time()
