"""Follow a guest's serial log: markers, progress, a hard timeout and an inactivity watchdog."""

from __future__ import annotations

import codecs
import enum
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
serial_log = logging.getLogger("kickgate.serial")  # one line per guest console line, DEBUG

ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc|\r")


class Outcome(enum.Enum):
    POWERED_OFF = "powered off"
    MATCHED = "matched"  # a wait_for pattern appeared
    FAILED = "failure marker"
    TIMEOUT = "timeout"
    IDLE = "inactivity watchdog"


@dataclass
class Watch:
    """Mutable state of one follow; read after watch() returns."""

    path: Path
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    seen: set[str] = field(default_factory=set)  # which of the markers appeared
    matched: str | None = None
    failure_line: str | None = None
    _offset: int = 0
    _partial: str = ""
    # The serial port hands over bytes, so a poll can end inside a multi-byte UTF-8 character.
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    def poll(self) -> list[str]:
        """New complete lines since the last poll (ANSI and CR stripped)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        self._offset += len(chunk)
        text = self._partial + self._decoder.decode(chunk)
        parts = text.split("\n")
        self._partial = parts.pop()
        return self._take([ANSI_RE.sub("", p) for p in parts])

    def flush(self) -> list[str]:
        """The unfinished last line as a line of its own: once the guest is off nothing will end it."""
        text = self._partial + self._decoder.decode(b"", final=True)
        self._partial = ""
        return self._take([ANSI_RE.sub("", text)] if text else [])

    def _take(self, lines: list[str]) -> list[str]:
        for line in lines:
            self.tail.append(line)
            serial_log.debug("%s", line)
        return lines

    def tail_lines(self, n: int = 40) -> list[str]:
        lines = list(self.tail)
        if self._partial.strip():
            lines.append(ANSI_RE.sub("", self._partial))
        return lines[-n:]


def watch(dom: Any, is_active: Callable[[Any], bool], serial: Path, *, timeout: float, idle_timeout: float,
          markers: Iterable[str] = (), failure: Iterable[str] = (), wait_for: Iterable[str] = (),
          progress: Callable[[str], None] | None = None, activity: Callable[[], int] | None = None,
          poll_interval: float = 0.25) -> tuple[Outcome, Watch]:
    """Follow serial until the domain stops, a wait_for pattern or failure marker appears, or time runs out.

    ``activity`` returns a counter (e.g. disk bytes written) whose change also resets the idle
    watchdog, for installers that work silently for minutes.
    """
    w = Watch(serial)
    markers = list(markers)
    failure = list(failure)
    wait_for_res = [re.compile(p) for p in wait_for]
    start = last_activity = time.monotonic()
    last_counter = activity() if activity else 0
    try:
        while True:
            # Read the domain state before the log: lines printed just before power-off are then
            # still judged by this loop, not lost after it.
            active = is_active(dom)
            lines = w.poll()
            if not active:
                # A marker printed without a newline right before power-off still counts.
                lines += w.flush()
            now = time.monotonic()
            if lines:
                last_activity = now
            for line in lines:
                for m in markers:
                    if m in line:
                        w.seen.add(m)
                if progress is not None:
                    progress(line)
                for f in failure:
                    if f in line:
                        w.failure_line = line
                if w.failure_line is not None:
                    return Outcome.FAILED, w
                for rx in wait_for_res:
                    if rx.search(line):
                        w.matched = line
                        return Outcome.MATCHED, w
            # A prompt ("login: ") is never followed by a newline: match the unfinished line too.
            pending = ANSI_RE.sub("", w._partial)
            for rx in wait_for_res:
                if pending and rx.search(pending):
                    w.matched = pending
                    return Outcome.MATCHED, w
            if activity is not None:
                counter = activity()
                if counter != last_counter:
                    last_counter, last_activity = counter, now
            if not active:
                return Outcome.POWERED_OFF, w
            if now - start > timeout:
                return Outcome.TIMEOUT, w
            if now - last_activity > idle_timeout:
                return Outcome.IDLE, w
            time.sleep(poll_interval)
    except KeyboardInterrupt:
        w.poll()
        raise
