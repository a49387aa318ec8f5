"""The subprocess helper: what callers parse is stdout only; stderr still explains failures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from builder.disk import image_info
from builder.errors import CommandError
from builder.provenance import git_state
from builder.run import run


def _shim(bin_dir: Path, tool: str) -> None:
    """A wrapper that prints a warning on stderr, then runs the real tool: how real tools behave."""
    real = shutil.which(tool)
    assert real is not None, f"{tool} is not installed (run ci/setup)"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / tool
    shim.write_text(f'#!/bin/sh\necho "warning: something {tool} wants you to know" >&2\nexec {real} "$@"\n')
    shim.chmod(0o755)


def test_stdout_and_stderr_are_kept_apart() -> None:
    res = run(["sh", "-c", "echo out; echo warning >&2"], timeout=10)
    assert res.stdout == "out\n"
    assert res.stderr == "warning\n"


def test_a_failure_names_stderr() -> None:
    with pytest.raises(CommandError) as err:
        run(["sh", "-c", "echo partial; echo 'the reason' >&2; exit 3"], timeout=10)
    assert err.value.returncode == 3
    assert "the reason" in str(err.value) and "partial" in str(err.value)


def test_stdin_is_empty_so_nothing_waits_for_a_terminal() -> None:
    assert run(["cat"], timeout=10).stdout == ""
    assert run(["cat"], timeout=10, input=b"given").stdout == "given"


def test_timeout_is_a_command_error() -> None:
    with pytest.raises(CommandError) as err:
        run(["sleep", "5"], timeout=0.3)
    assert err.value.timed_out


def test_a_git_warning_does_not_make_a_clean_tree_dirty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    for argv in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "start"]):
        subprocess.run(argv, cwd=repo, env=env, check=True)
    _shim(tmp_path / "bin", "git")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    state = git_state(repo)
    assert len(state.revision) == 40
    assert not state.dirty, "a warning on stderr was taken for a changed file"


def test_a_qemu_img_warning_does_not_break_its_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], timeout=30)
    _shim(tmp_path / "bin", "qemu-img")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    info = image_info(image)
    assert run(["qemu-img", "--version"], timeout=10).stderr.startswith("warning:")  # the shim was in use
    assert info["format"] == "qcow2" and info["virtual-size"] == 16 * 1024 * 1024


def _running(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False).stdout.split()


def test_a_timeout_stops_the_whole_process_group() -> None:
    with pytest.raises(CommandError):
        run(["sh", "-c", "sleep 301.25 & sleep 301.25"], timeout=0.5)
    assert _running("sleep 301.25") == [], "a child of the timed-out command is still running"


def test_an_interrupt_stops_the_whole_process_group() -> None:
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            run(["sh", "-c", "sleep 302.25 & sleep 302.25"], timeout=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert _running("sleep 302.25") == [], "a child of the interrupted command is still running"


def test_on_start_lets_another_thread_stop_the_whole_process_group() -> None:
    """kickgate mutants stops spec runs that worker threads wait on: SIGTERM to the group ends them."""
    import threading

    def stop(pid: int) -> None:
        threading.Timer(0.5, os.killpg, (pid, signal.SIGTERM)).start()

    res = run(["sh", "-c", "sleep 303.25 & sleep 303.25"], timeout=60, check=False, on_start=stop)
    assert res.returncode == -signal.SIGTERM
    assert _running("sleep 303.25") == [], "a child of the stopped command is still running"
