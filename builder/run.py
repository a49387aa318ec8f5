"""The one subprocess helper: argv lists, a timeout always, stdout and stderr kept apart."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from builder.errors import CommandError

log = logging.getLogger(__name__)


def run(argv: Sequence[str | os.PathLike[str]], *, timeout: float, check: bool = True,
        cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv; raise CommandError on failure or timeout.

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
    try:
        proc = subprocess.run(args, capture_output=True, cwd=cwd, env=full_env,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CommandError(args, None, _text(exc.stdout) + _text(exc.stderr), timeout=timeout) from None
    except FileNotFoundError:
        raise CommandError(args, 127, f"{args[0]}: command not found (run ci/setup to install it)") from None
    result = subprocess.CompletedProcess(args, proc.returncode, _text(proc.stdout), _text(proc.stderr))
    if check and result.returncode != 0:
        raise CommandError(args, result.returncode, _joined(result.stdout, result.stderr))
    return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _joined(stdout: str, stderr: str) -> str:
    """Both streams for an error message: stderr last, as it usually says why."""
    return "\n".join(part.rstrip("\n") for part in (stdout, stderr) if part.strip())
