"""SIGTERM and SIGHUP unwind a run exactly like Ctrl-C.

CI systems stop jobs with SIGTERM (a cancelled pipeline, a job timeout) and a closed terminal sends
SIGHUP. Turning both into KeyboardInterrupt lets every context manager and finally block clean up:
guests destroyed, work dirs removed, nothing registered.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_received: list[str] = []


def _interrupt(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _received:
        # Already unwinding: a second signal must not cut the cleanup short (SIGKILL still can).
        log.warning("%s received while stopping; still cleaning up", name)
        return
    _received.append(name)
    log.warning("%s received: stopping and cleaning up", name)
    raise KeyboardInterrupt(name)


def received() -> str | None:
    """The stop signal this process received, if any."""
    return _received[0] if _received else None


Handler = Callable[[int, FrameType | None], object] | int | None


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Handler] = {}
    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, _interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
