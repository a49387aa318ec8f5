"""Per-stage timings and progress for one build or run."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from builder.errors import BuildError, KickgateError

log = logging.getLogger(__name__)


class Stages:
    """Times named stages; a non-kickgate failure inside a stage becomes a BuildError naming it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.timings: dict[str, float] = {}
        self.current: str | None = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        log.info("%s: %s ...", self.label, name)
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
