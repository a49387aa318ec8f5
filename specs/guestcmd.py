"""Commands the specs run in the guest: a missing tool or a failing command is an error, never an empty result.

A spec that parses `host.run(...).stdout` passes vacuously when the tool is not installed (empty
output, "nothing found"). `run` returns stdout only when the exit status is one the caller
declared as an answer; anything else raises GuestCommandError with the command's stderr.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

# Shell exit statuses that never mean an answer: not executable, not found.
NOT_RUNNABLE = {126: "is not executable", 127: "is not installed (command not found)"}


class Result(Protocol):
    rc: int
    stdout: str
    stderr: str


class GuestCommandError(Exception):
    """A command in the guest could not give an answer; the spec that needed it cannot judge."""

    def __init__(self, command: str, rc: int, stderr: str, why: str) -> None:
        self.command, self.rc, self.stderr = command, rc, stderr
        detail = stderr.strip()[-800:] or "(no stderr)"
        super().__init__(f"`{command}` {why} (exit status {rc}): {detail}")


def run(host: Any, command: str, *, ok: Iterable[int] = (0,)) -> str:
    """stdout of command in the guest, if its exit status is in ok; otherwise GuestCommandError."""
    return run_rc(host, command, ok=ok)[1]


def run_rc(host: Any, command: str, *, ok: Iterable[int] = (0,)) -> tuple[int, str]:
    """(exit status, stdout) of command, for commands whose exit status is part of the answer."""
    result: Result = host.run(command)
    allowed = set(ok)
    if result.rc in NOT_RUNNABLE:
        tool = command.split()[0] if command.split() else command
        raise GuestCommandError(command, result.rc, result.stderr, f"failed: {tool} {NOT_RUNNABLE[result.rc]}")
    if result.rc not in allowed:
        expected = ", ".join(str(c) for c in sorted(allowed))
        raise GuestCommandError(command, result.rc, result.stderr, f"failed (expected exit status {expected})")
    return result.rc, result.stdout


def has_tool(host: Any, name: str) -> bool:
    """Whether name is a command in the guest's PATH (for specs that accept one of several tools)."""
    # `command -v` answers 1 (bash) or 127 (dash) for an unknown name: both mean "absent".
    return bool(host.run(f"command -v {name}").rc == 0)
