"""Per-stage timings and progress for one build or run."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from builder import progress
from builder.errors import BuildError, KickgateError

log = logging.getLogger(__name__)


class Stages:
    """Times named stages; a non-kickgate failure inside a stage becomes a BuildError naming it.

    Each stage is also reported as a stage of the build activity running in this thread (see
    builder.progress.current), so people see it live; the build code needs no observer of its own.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.timings: dict[str, float] = {}
        self.current: str | None = None
        self._progress = progress.current()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        log.info("%s: %s ...", self.label, name)
        if self._progress is not None:
            self._progress.stage(self.label, progress.BUILD, name)
        start = time.monotonic()
        try:
            yield
        except KickgateError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            raise BuildError(name, f"{type(exc).__name__}: {exc}") from exc
        finally:
            elapsed = time.monotonic() - start
            self.timings[name] = round(self.timings.get(name, 0.0) + elapsed, 3)
            self.current = None
        log.info("%s: %s done in %.1fs", self.label, name, elapsed)
