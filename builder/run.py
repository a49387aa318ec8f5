"""The one subprocess helper: argv lists, a timeout always, output captured for errors."""

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
    """Run argv; raise CommandError on failure or timeout. Output is text (stdout+stderr merged)."""
    args = [os.fspath(a) for a in argv]
    log.debug("run: %s", " ".join(args))
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                              env=full_env, input=input, timeout=timeout, check=False)
        result = subprocess.CompletedProcess(args, proc.returncode, proc.stdout.decode(errors="replace"), "")
    except subprocess.TimeoutExpired as exc:
        partial = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else ""
        raise CommandError(args, None, partial, timeout=timeout) from None
    except FileNotFoundError:
        raise CommandError(args, 127, f"{args[0]}: command not found (run ci/setup to install it)") from None
    if check and result.returncode != 0:
        raise CommandError(args, result.returncode, result.stdout)
    return result
