"""A real `pytest specs/` run stopped at each stage leaves nothing behind and registers nothing.

SIGTERM and SIGHUP unwind like Ctrl-C (guests destroyed, work files removed, exit status and
summary say interrupted); after SIGKILL, which nothing can catch, the next run (or `kickgate
cleanup`) removes what the dead run left: its QEMU processes, embedded libvirt root, instance
directories and build staging.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import runstamp

pytestmark = pytest.mark.slow

PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--log-cli-level=INFO"]


class Run:
    """`pytest specs/` in the background, its output followed line by line."""

    def __init__(self, repo: Path, cache: Path, registry: Path, *args: str) -> None:
        env = {**os.environ, "KICKGATE_CACHE_DIR": str(cache), "KICKGATE_REGISTRY_DIR": str(registry)}
        env.pop("PYTEST_ADDOPTS", None)
        self.proc = subprocess.Popen([*PYTEST, "specs/", "--boot-timeout", "900", *args], cwd=repo, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.seen_dirs: set[str] = set()
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()

    def wait_for(self, pattern: str, timeout: float = 900) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    if rx.search(line):
                        return line
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"the run ended before {pattern!r}:\n" + "\n".join(self.lines[-60:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {pattern!r} within {timeout}s:\n" + "\n".join(self.lines[-60:]))
                self._seen.wait(min(left, 1.0))

    def own_dirs(self) -> set[str]:
        """The /tmp directories this run made (stamped with its pid): read them while it lives."""
        mine = {d for d in _tmp_dirs() if (o := runstamp.owner(Path(d))) is not None and o[0].pid == self.proc.pid}
        self.seen_dirs |= mine
        return mine

    def stop(self, sig: int, timeout: float = 180) -> int:
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the run did not end within {timeout}s of {signal.Signals(sig).name}") from None
        self._reader.join(timeout=10)
        return rc

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def _ours(paths: set[str]) -> list[str]:
    """QEMU processes whose command line names one of paths."""
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if any(p in line for p in paths)]


def _tmp_dirs() -> set[str]:
    return {str(p) for p in Path("/tmp").iterdir() if p.name.startswith(("kg-virt-", "kg-inst-", "kg-probe-"))}


@pytest.fixture
def world(tmp_path: Path, shared_cache_dir: Path) -> Iterator[dict[str, Path]]:
    """A cache sharing the built images and trees of the other slow tests, and an empty registry."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    for entry in shared_cache_dir.iterdir():
        if entry.name in ("images", "trees", "accel", "libvirt-caps"):
            (cache / entry.name).symlink_to(entry)
        elif entry.name == "build-secret.key":  # the same key: the shared builds' records verify
            shutil.copy2(entry, cache / entry.name)
    yield {"cache": cache, "registry": tmp_path / "registry"}


def assert_left_nothing(run: Run, cache: Path, registry: Path) -> None:
    """Nothing of run is left: judged by what it made itself, as other runs may share the machine."""
    assert _ours(run.seen_dirs | {str(cache)}) == [], "QEMU of the stopped run still running"
    left = sorted(d for d in run.seen_dirs if Path(d).exists())
    assert not left, f"the stopped run left {left}"
    staging = list((cache / "tmp").glob("*")) if (cache / "tmp").is_dir() else []
    assert staging == [], f"build staging left: {staging}"
    tree_staging = [p for p in (cache / "trees").glob(".*-*") if p.is_dir()] if (cache / "trees").exists() else []
    assert tree_staging == [], f"mmdebstrap staging left: {tree_staging}"
    assert not (registry / "generic-dev").exists() or not any(
        p.name.isdigit() for p in (registry / "generic-dev").iterdir()), "an interrupted run registered an image"


@pytest.mark.parametrize(("stage", "trigger", "sig"), [
    ("boot", r"booting \(mac", signal.SIGTERM),
    ("specs", r"SSH login with the context key", signal.SIGHUP),
])
def test_a_signal_unwinds_a_verify_run(repo_root: Path, world: dict[str, Path], stage: str, trigger: str,
                                       sig: int) -> None:
    run = Run(repo_root, world["cache"], world["registry"])
    try:
        run.wait_for(trigger)
        time.sleep(2)
        assert run.own_dirs(), "the run made no directory of its own yet"
        rc = run.stop(sig)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert rc == pytest.ExitCode.INTERRUPTED, run.output[-4000:]
    assert f"interrupted ({signal.Signals(sig).name})" in run.output, run.output[-4000:]
    assert_left_nothing(run, world["cache"], world["registry"])


def _variant(repo_root: Path, root: Path) -> None:
    """generic-dev with one more node script: a build that reuses the cached mmdebstrap tree."""
    shutil.copytree(repo_root / "scripts", root / "scripts")
    shutil.copytree(repo_root / "images" / "generic-dev", root / "images" / "generic-dev")
    toml = root / "images" / "generic-dev" / "image.toml"
    stamp = f"interrupt-{time.time_ns()}"
    (root / "images" / "generic-dev" / "scripts" / "node" / "stamp.sh").write_text(f"#!/bin/sh\necho {stamp}\n")
    (root / "images" / "generic-dev" / "scripts" / "node" / "stamp.sh").chmod(0o755)
    toml.write_text(re.sub(r'node = \[(.*?)\]', r'node = [\1, "stamp.sh"]', toml.read_text()))


def test_sigterm_during_the_finish_vm(repo_root: Path, world: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "recipes"
    _variant(repo_root, root)
    run = Run(repo_root, world["cache"], world["registry"], "--recipes", str(root))
    try:
        run.wait_for(r"generic-dev: finish-vm \.\.\.")
        time.sleep(3)
        assert run.own_dirs(), "the run made no directory of its own yet"
        rc = run.stop(signal.SIGTERM)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert rc == pytest.ExitCode.INTERRUPTED, run.output[-4000:]
    assert "interrupted (SIGTERM)" in run.output
    assert_left_nothing(run, world["cache"], world["registry"])


def test_sigterm_during_mmdebstrap(repo_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cold-cache"  # nothing cached: mmdebstrap really runs
    cache.mkdir()
    registry = tmp_path / "registry"
    mounts_before = Path("/proc/self/mountinfo").read_text().count(str(cache))
    run = Run(repo_root, cache, registry)
    try:
        run.wait_for(r"generic-dev: mmdebstrap \.\.\.")
        time.sleep(8)
        run.own_dirs()
        rc = run.stop(signal.SIGTERM)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert rc == pytest.ExitCode.INTERRUPTED, run.output[-4000:]
    leftover = subprocess.run(["pgrep", "-af", str(cache)], capture_output=True, text=True, check=False).stdout
    assert leftover == "", f"processes of the stopped build still run:\n{leftover}"
    assert Path("/proc/self/mountinfo").read_text().count(str(cache)) == mounts_before, "mounts left behind"
    assert_left_nothing(run, cache, registry)


@pytest.mark.parametrize(("stage", "trigger"), [
    ("boot", r"booting \(mac"),
    ("finish-vm", r"generic-dev: finish-vm \.\.\."),
])
def test_after_sigkill_the_next_run_removes_what_the_dead_one_left(repo_root: Path, world: dict[str, Path],
                                                                  tmp_path: Path, stage: str, trigger: str) -> None:
    args: list[str] = []
    if stage == "finish-vm":
        _variant(repo_root, tmp_path / "recipes")
        args = ["--recipes", str(tmp_path / "recipes")]
    run = Run(repo_root, world["cache"], world["registry"], *args)
    try:
        run.wait_for(trigger)
        time.sleep(3)
        run.own_dirs()
        os.killpg(run.proc.pid, signal.SIGKILL)  # the runner dies; its QEMU children do not
        run.proc.wait(timeout=60)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert run.seen_dirs and _ours(run.seen_dirs), "the killed run left nothing: it was not stopped where meant to"
    cleanup = subprocess.run([sys.executable, "-m", "builder.cli", "--cache-dir", str(world["cache"]), "cleanup"],
                             capture_output=True, text=True, timeout=120, check=False)
    assert cleanup.returncode == 0, cleanup.stderr
    assert "left over" in cleanup.stdout or "leftover" in cleanup.stdout
    assert_left_nothing(run, world["cache"], world["registry"])
