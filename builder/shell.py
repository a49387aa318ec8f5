"""A testinfra backend that runs every command through one long-lived remote shell.

testinfra's paramiko backend opens a new SSH session channel per command, and on an emulated guest
each session costs sshd a fork and a login shell started from scratch. Here one session runs one
shell for the host's lifetime, and each command costs that shell a fork (and, if it printed
anything, one `cat` to return the output). Specs keep testinfra's API (`host.file`, `host.run`,
`host.service`…).

The protocol, over the shell's stdin and stdout:
- the host sends `__kg_run '<command, single-quoted>' <token>` (a fresh random token per command);
- the shell runs the command in a subshell, stdin from /dev/null (a command that reads stdin sees
  end-of-file instead of eating the protocol), stdout and stderr into two files (a daemon the
  command leaves running cannot write into a later command's answer), then writes
  `stdout token stderr token " <exit status>\\n"` (a command that printed nothing costs no `cat`).
Output is bytes, read until the token: anything, including NULs and no final newline, comes back as
the command wrote it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import select
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import paramiko
import testinfra.backend
import testinfra.host
from testinfra.backend import base
from testinfra.backend.paramiko import ParamikoBackend

from builder.errors import KickgateError

log = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT_S = 600.0
CHUNK = 65536

# Sent once when the shell starts. Names start with __kg_ so the commands' own names stay free.
BOOTSTRAP = b"""\
__kg_d=$(mktemp -d) || exit 1
trap 'rm -rf "$__kg_d"' EXIT
trap 'exit 129' HUP
trap 'exit 143' TERM
__kg_run() {
    ( eval "$1" ) </dev/null >"$__kg_d/o" 2>"$__kg_d/e"
    __kg_rc=$?
    if [ -s "$__kg_d/o" ] || [ -s "$__kg_d/e" ]; then
        printf '%s' "$2" >"$__kg_d/t"
        cat "$__kg_d/o" "$__kg_d/t" "$__kg_d/e" "$__kg_d/t"
    else
        printf '%s%s' "$2" "$2"
    fi
    printf ' %d\\n' "$__kg_rc"
}
"""
_STATUS = re.compile(rb" (\d+)\n")


class ShellError(KickgateError):
    """The remote shell broke: it exited, its stream closed, or a command ran past its timeout."""


class Stream(Protocol):
    """The shell's stdin and stdout as one byte stream."""

    def send(self, data: bytes) -> None: ...

    def recv(self, timeout: float) -> bytes:
        """Up to CHUNK bytes; b"" at end of stream; TimeoutError when nothing came in time."""
        ...

    def close(self) -> None: ...


class ChannelStream:
    """A shell started in one SSH session channel."""

    def __init__(self, transport: paramiko.Transport, shell: str) -> None:
        self.channel = transport.open_session()
        self.channel.exec_command(shell)

    def send(self, data: bytes) -> None:
        self.channel.sendall(data)

    def recv(self, timeout: float) -> bytes:
        self.channel.settimeout(timeout)
        try:
            return self.channel.recv(CHUNK)
        except TimeoutError as exc:  # socket.timeout
            raise TimeoutError("no output") from exc

    def stderr_text(self) -> str:
        """What the shell itself said on stderr (the commands' own stderr goes in their answers)."""
        out = b""
        while self.channel.recv_stderr_ready():
            out += self.channel.recv_stderr(CHUNK)
        return out.decode(errors="replace").strip()

    def close(self) -> None:
        self.channel.close()


class ProcessStream:
    """A shell run as a local process: the same protocol without SSH (tests, and local hosts)."""

    def __init__(self, argv: Sequence[str]) -> None:
        # Not builder.run: that helper runs a command to its end, this one is a long-lived peer.
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise ShellError("the shell process is gone") from exc

    def recv(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError("no output")
        return os.read(fd, CHUNK)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        # Still busy with a command (a timeout): stop it and whatever it started. TERM first, which
        # the shell traps to remove its temporary directory; KILL what is left.
        for sig, wait in ((None, 1.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, None)):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def quote(command: bytes) -> bytes:
    """command as one single-quoted shell word: taken literally, whatever it holds."""
    if b"\0" in command:
        raise ValueError("a shell command cannot contain a NUL byte")
    return b"'" + command.replace(b"'", b"'\\''") + b"'"


class Shell:
    """One remote shell running commands one at a time; thread-safe."""

    def __init__(self, stream: Stream, timeout: float = DEFAULT_COMMAND_TIMEOUT_S) -> None:
        self.stream = stream
        self.timeout = timeout
        self.broken = False
        self._buf = b""
        self._lock = threading.Lock()
        ready = secrets.token_hex(16).encode()
        self.stream.send(BOOTSTRAP + b"printf '%s\\n' " + ready + b"\n")
        # Whatever a login script printed before the shell took over is not an answer.
        self._read_until(ready + b"\n", time.monotonic() + 60)
        self._buf = b""

    def _fail(self, reason: str) -> ShellError:
        self.broken = True
        detail = ""
        if isinstance(self.stream, ChannelStream):
            with contextlib.suppress(Exception):
                detail = self.stream.stderr_text()
        with contextlib.suppress(Exception):
            self.stream.close()
        return ShellError(reason + (f" (shell said: {detail})" if detail else ""))

    def _read_until(self, marker: bytes, deadline: float, start: int = 0) -> int:
        """Read until marker is in the buffer at or after start; its index."""
        while True:
            at = self._buf.find(marker, start)
            if at >= 0:
                return at
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"no answer from the shell within {self.timeout:.0f}s")
            try:
                data = self.stream.recv(min(left, 30.0))
            except TimeoutError:
                continue
            except (OSError, paramiko.SSHException) as exc:
                raise self._fail(f"the shell's stream failed: {exc}") from exc
            if not data:
                raise self._fail("the shell exited")
            self._buf += data

    def run(self, command: bytes, timeout: float | None = None) -> tuple[int, bytes, bytes]:
        """Run command; (exit status, stdout, stderr). ShellError if the shell itself broke."""
        line = b"__kg_run " + quote(command)
        with self._lock:
            if self.broken:
                raise ShellError("the shell broke earlier")
            token = secrets.token_hex(16).encode()
            deadline = time.monotonic() + (timeout or self.timeout)
            try:
                self.stream.send(line + b" " + token + b"\n")
            except (OSError, paramiko.SSHException) as exc:
                raise self._fail(f"cannot send to the shell: {exc}") from exc
            first = self._read_until(token, deadline)
            second = self._read_until(token, deadline, first + len(token))
            end = self._read_until(b"\n", deadline, second + len(token))
            status = _STATUS.fullmatch(self._buf, second + len(token), end + 1)
            if status is None:
                raise self._fail(f"unexpected answer from the shell: {self._buf[second:end + 1]!r}")
            out, err = self._buf[:first], self._buf[first + len(token):second]
            self._buf = self._buf[end + 1:]
            return int(status.group(1)), out, err

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(Exception):
            self.stream.close()


class ShellBackend(ParamikoBackend):  # type: ignore[misc]  # testinfra ships no types
    """testinfra's paramiko backend (same host spec, ssh_config and client), one shell for every command.

    `testinfra.get_host("kickgate-shell://NAME?ssh_config=FILE")` once this module is imported, or
    `host_over(client, name)` around an SSH client that is already logged in.
    """

    NAME = "kickgate-shell"
    SHELL_COMMAND = 'exec "${SHELL:-/bin/sh}"'  # the login shell, which the paramiko backend's commands get

    def __init__(self, hostspec: str, *args: Any, command_timeout: float = DEFAULT_COMMAND_TIMEOUT_S,
                 **kwargs: Any) -> None:
        super().__init__(hostspec, *args, **kwargs)
        self.command_timeout = float(command_timeout)
        self._shell: Shell | None = None
        self._shell_lock = threading.Lock()

    def open_stream(self) -> Stream:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            # The paramiko backend's own recovery: a dropped connection is made again, once.
            del self.client
            transport = self.client.get_transport()
            assert transport is not None
        return ChannelStream(transport, self.SHELL_COMMAND)

    def shell(self) -> Shell:
        with self._shell_lock:
            if self._shell is None or self._shell.broken:
                self._shell = Shell(self.open_stream(), timeout=self.command_timeout)
            return self._shell

    def run(self, command: str, *args: str, **kwargs: Any) -> base.CommandResult:
        cmd = self.encode(self.get_command(command, *args))
        rc, stdout, stderr = self.shell().run(cmd)
        return self.result(rc, cmd, stdout, stderr)

    def close(self) -> None:
        if self._shell is not None:
            self._shell.close()
            self._shell = None


testinfra.backend.BACKENDS.setdefault(ShellBackend.NAME, f"{__name__}.ShellBackend")


def host_over(client: paramiko.SSHClient | None, name: str, **kwargs: Any) -> testinfra.host.Host:
    """A testinfra Host whose commands go through one shell on client's (already logged-in)
    connection; without a client, the backend connects like the paramiko backend (ssh_config…)."""
    backend = ShellBackend(name, **kwargs)
    if client is not None:
        # ParamikoBackend.client is a functools.cached_property: setting it hands over the session.
        backend.__dict__["client"] = client
    host = testinfra.host.Host(backend)
    backend.set_host(host)
    return host
