"""The one subprocess helper: argv lists, a timeout always, stdout and stderr kept apart."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from builder.errors import CommandError

log = logging.getLogger(__name__)


def run(argv: Sequence[str | os.PathLike[str]], *, timeout: float, check: bool = True,
        cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
        input: bytes | None = None, on_start: Callable[[int], None] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run argv; raise CommandError on failure or timeout.

    on_start is told the process id (also its process group id) as soon as it runs, for a caller
    that must be able to stop it from another thread.

    stdout is what callers parse; stderr is kept apart (a tool's warning must never change a parsed
    result) and goes into the error text. stdin is /dev/null unless input is given, so a tool that
    prompts fails instead of waiting for a terminal that is not there.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("run: %s", " ".join(args))
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    # Its own session: an interrupt or timeout stops the whole process group, so tools that fork
    # (mmdebstrap's apt and dpkg) leave nothing running behind.
    try:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=full_env,
                                start_new_session=True)
    except FileNotFoundError:
        raise CommandError(args, 127, f"{args[0]}: command not found (run ci/setup to install it)") from None
    if on_start is not None:
        on_start(proc.pid)
    with proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = _kill_group(proc)
            raise CommandError(args, None, _joined(_text(out), _text(err)), timeout=timeout) from None
        except BaseException:
            _kill_group(proc)
            raise
    result = subprocess.CompletedProcess(args, proc.returncode, _text(out), _text(err))
    if check and result.returncode != 0:
        raise CommandError(args, result.returncode, _joined(result.stdout, result.stderr))
    return result


TERM_GRACE_S = 10.0


def _kill_group(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """Stop the command's whole process group: SIGTERM first, so a tool can undo what it set up (mounts),
    then SIGKILL for whatever is still there. Returns what it printed so far."""
    out: bytes | None = b""
    err: bytes | None = b""
    for sig, wait in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            out, err = proc.communicate(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
        except ValueError:  # the pipes were already read to the end
            proc.wait(timeout=wait)
            break
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # descendants that ignored SIGTERM after their leader left
    if proc.returncode is None:
        proc.wait()
    return out or b"", err or b""


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _joined(stdout: str, stderr: str) -> str:
    """Both streams for an error message: stderr last, as it usually says why."""
    return "\n".join(part.rstrip("\n") for part in (stdout, stderr) if part.strip())
