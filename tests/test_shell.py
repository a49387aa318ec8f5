"""The persistent-shell testinfra backend: framing, odd commands, testinfra's API on top, recovery.

The fast tests drive the same protocol through a local `sh` process (no SSH); the slow one runs it
over a real instance's SSH session.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import testinfra
import testinfra.host

from builder.shell import ProcessStream, Shell, ShellBackend, ShellError, Stream, quote


class LocalShellBackend(ShellBackend):
    """The backend with its shell started as a local process instead of in an SSH channel."""

    def __init__(self, argv: tuple[str, ...] = ("sh",), **kwargs: Any) -> None:
        super().__init__("local-sh", **kwargs)
        self.argv = argv

    def open_stream(self) -> Stream:
        return ProcessStream(self.argv)


def sh_in(tmp: Path) -> list[str]:
    """A local shell whose own temporary directory is made under tmp (where a killed one leaves it)."""
    return ["env", f"TMPDIR={tmp}", "sh"]


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    sh = Shell(ProcessStream(sh_in(tmp_path)), timeout=30)
    yield sh
    sh.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[testinfra.host.Host]:
    backend = LocalShellBackend(argv=tuple(sh_in(tmp_path)))
    h = testinfra.host.Host(backend)
    backend.set_host(h)
    yield h
    backend.close()


def test_status_stdout_stderr_apart(shell: Shell) -> None:
    assert shell.run(b"echo out; echo err >&2; exit 3") == (3, b"out\n", b"err\n")
    assert shell.run(b"true") == (0, b"", b"")


def test_output_without_final_newline_and_binary(shell: Shell) -> None:
    assert shell.run(b"printf abc") == (0, b"abc", b"")
    rc, out, _ = shell.run(rb"printf '\000\377\n\r x\000'")
    assert (rc, out) == (0, b"\x00\xff\n\r x\x00")


def test_quotes_newlines_and_shell_syntax_are_taken_literally(shell: Shell) -> None:
    cmd = b"""printf '%s|' "it's" 'a "b"' $((1+2)) \\$HOME; echo
echo second line"""
    assert shell.run(cmd) == (0, b"""it's|a "b"|3|$HOME|\nsecond line\n""", b"")


def test_a_command_that_reads_stdin_sees_end_of_file(shell: Shell) -> None:
    started = time.monotonic()
    assert shell.run(b"cat; read x; echo done $?") == (0, b"done 1\n", b"")
    assert time.monotonic() - started < 5
    assert shell.run(b"echo still here") == (0, b"still here\n", b"")


def test_commands_do_not_change_the_shell(shell: Shell) -> None:
    shell.run(b"cd /; X=1; export Y=2; set -e; exit 4")
    assert shell.run(b'pwd; echo "${X:-unset} ${Y:-unset}"; false; echo after') == \
        (0, Path.cwd().as_posix().encode() + b"\nunset unset\nafter\n", b"")


def test_syntax_error_is_the_commands_not_the_shells(shell: Shell) -> None:
    rc, out, err = shell.run(b"if then fi (")
    assert rc != 0 and out == b"" and err
    assert shell.run(b"echo ok") == (0, b"ok\n", b"")


def test_large_output(shell: Shell) -> None:
    rc, out, err = shell.run(b"head -c 3000000 /dev/zero; head -c 100000 /dev/zero >&2")
    assert rc == 0 and out == b"\0" * 3_000_000 and err == b"\0" * 100_000


def test_a_background_process_does_not_hold_up_or_garble_answers(shell: Shell) -> None:
    started = time.monotonic()
    assert shell.run(b"(sleep 1; echo late) & echo now") == (0, b"now\n", b"")
    assert time.monotonic() - started < 1
    time.sleep(1.5)
    assert shell.run(b"echo next") == (0, b"next\n", b"")


def test_many_commands_are_quick(shell: Shell) -> None:
    started = time.monotonic()
    for i in range(200):
        assert shell.run(f"echo {i}".encode()) == (0, f"{i}\n".encode(), b"")
    assert time.monotonic() - started < 20


def test_a_shell_that_dies_is_reported(shell: Shell) -> None:
    with pytest.raises(ShellError, match="exited"):
        shell.run(b"kill -9 $$; sleep 5")
    with pytest.raises(ShellError):
        shell.run(b"true")


def test_timeout(tmp_path: Path) -> None:
    sh = Shell(ProcessStream(sh_in(tmp_path)), timeout=30)
    try:
        with pytest.raises(ShellError, match="within"):
            sh.run(b"sleep 5", timeout=0.5)
        assert sh.broken
    finally:
        sh.close()
    # Stopped while busy, the shell still removed its temporary directory on the way out.
    assert list(tmp_path.iterdir()) == []


def test_quote_rejects_nul() -> None:
    assert quote(b"a'b") == b"'a'\\''b'"
    with pytest.raises(ValueError):
        quote(b"a\0b")


def test_testinfra_api_over_the_shell(host: testinfra.host.Host, tmp_path: Path) -> None:
    f = tmp_path / "it's here"
    f.write_bytes(b"line\nno newline")
    f.chmod(0o640)
    assert host.file(str(f)).exists and host.file(str(f)).is_file
    assert host.file(str(f)).mode == 0o640
    assert host.file(str(f)).content_string == "line\nno newline"
    assert not host.file(str(tmp_path / "absent")).exists
    assert host.run("echo hi; exit 2").rc == 2
    assert host.check_output("printf '%s' x") == "x"
    assert host.run("printf 'caf\\303\\251'").stdout == "café"
    with pytest.raises(AssertionError):
        host.check_output("false")


def test_backend_recovers_with_a_new_shell(host: testinfra.host.Host) -> None:
    assert host.run("echo $$").rc == 0
    with pytest.raises(ShellError):
        host.run("kill -9 $$; sleep 5")
    assert host.check_output("echo again") == "again"


def test_registered_for_get_host() -> None:
    backend = testinfra.get_host("kickgate-shell://somewhere?timeout=5").backend
    assert isinstance(backend, ShellBackend)
    assert backend.get_connection_type() == "kickgate-shell"


@pytest.mark.slow
def test_specs_backend_over_a_real_instance(shared_cache_dir: Path) -> None:
    from builder.options import RunOptions
    from builder.pipeline import Pipeline

    with Pipeline(RunOptions(images=("generic-dev",), cache_dir=shared_cache_dir, register=False)) as pipeline:
        image = pipeline.image("generic-dev")
        with pipeline.running_instance(image, label="generic-dev", primary=True) as inst:
            host = inst.host
            assert isinstance(host.backend, ShellBackend)
            assert host.check_output("hostname") == inst.hostname
            assert host.file("/etc/machine-id").content_string.strip()
            assert host.service("ssh").is_running
            assert host.run("printf 'a\\000b'").stdout_bytes == b"a\x00b"
            assert host.run("cat").rc == 0
            # Every command went through one session channel: the shell's.
            pids = {host.check_output("echo $$") for _ in range(3)}
            assert len(pids) == 1
