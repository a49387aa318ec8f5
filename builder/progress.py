"""Progress a person can read: what a run is doing now, for how long, and what each stage took.

The pipeline reports through a small observer interface: an activity (an image's build, an
instance's boot) begins, passes through named stages, and ends. A `Progress` hub hands every event
to its observers and keeps a `Timeline` for the final per-stage table. `LiveDisplay` turns events
into lines for people: on a terminal one line rewritten in place (with a ticking elapsed time), and
elsewhere (CI logs, files) plain lines, one per stage change, without control characters. Where
the lines go is a `Sink`: pytest's terminal reporter (see builder.plugin) or a stream such as
stderr (the `kickgate` command).

Nothing here imports pytest or the rest of kickgate: the core and both front ends use it alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TextIO

log = logging.getLogger(__name__)

Clock = Callable[[], float]
EventKind = Literal["begin", "stage", "end"]

# The two long activities of a run, and what their stages are called.
BUILD = "build"
BOOT = "boot"


@dataclass(frozen=True)
class Event:
    """One step of an activity. subject names who does it (the image, or the instance booting)."""

    kind: EventKind
    image: str
    activity: str
    subject: str
    at: float  # clock time of the event
    stage: str = ""  # kind "stage": the stage that starts now
    outcome: str = ""  # kind "end": "built", "cached", "SSH login", "failed", "interrupted", ...
    started: float | None = None  # kind "begin": when the activity really started, if earlier than at


class Observer(Protocol):
    def __call__(self, event: Event) -> None: ...


@dataclass(frozen=True)
class StageTiming:
    name: str
    start: float  # seconds after the activity started
    seconds: float | None  # None for the last stage: the activity ended inside it


@dataclass(frozen=True)
class ActivityTiming:
    """One finished activity, as the final table shows it."""

    image: str
    activity: str
    subject: str
    stages: tuple[StageTiming, ...]
    seconds: float
    outcome: str

    def to_wire(self) -> dict[str, Any]:
        return {"image": self.image, "activity": self.activity, "subject": self.subject,
                "stages": [[s.name, s.start, s.seconds] for s in self.stages], "seconds": self.seconds,
                "outcome": self.outcome}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ActivityTiming:
        return cls(image=str(data["image"]), activity=str(data["activity"]), subject=str(data["subject"]),
                   stages=tuple(StageTiming(str(n), float(s), None if d is None else float(d))
                                for n, s, d in data["stages"]),
                   seconds=float(data["seconds"]),
                   outcome=str(data["outcome"]))


@dataclass
class _Open:
    """An activity between its begin and end events (mutable while it runs)."""

    image: str
    activity: str
    subject: str
    started: float
    stages: list[tuple[str, float]] = field(default_factory=list)  # (name, clock time it started)

    def timing(self, now: float, outcome: str) -> ActivityTiming:
        stages = []
        for i, (name, at) in enumerate(self.stages):
            nxt = self.stages[i + 1][1] if i + 1 < len(self.stages) else None
            stages.append(StageTiming(name, round(at - self.started, 3),
                                      round(nxt - at, 3) if nxt is not None else None))
        return ActivityTiming(self.image, self.activity, self.subject, tuple(stages),
                              round(now - self.started, 3), outcome)


class Timeline:
    """Every activity of a run in the order they began: the data of the final per-stage table."""

    def __init__(self) -> None:
        self._done: list[ActivityTiming] = []
        self._open: dict[tuple[str, str], _Open] = {}
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        key = (event.activity, event.subject)
        with self._lock:
            if event.kind == "begin":
                self._open[key] = _Open(event.image, event.activity, event.subject,
                                        event.started if event.started is not None else event.at)
            elif event.kind == "stage":
                act = self._open.get(key)
                if act is not None and (not act.stages or act.stages[-1][0] != event.stage):
                    act.stages.append((event.stage, event.at))
            else:
                act = self._open.pop(key, None)
                if act is not None:
                    self._done.append(act.timing(event.at, event.outcome))

    def activities(self, image: str | None = None) -> list[ActivityTiming]:
        with self._lock:
            done = list(self._done)
        return [a for a in done if image is None or a.image == image]

    def adopt(self, wire: list[Mapping[str, Any]]) -> None:
        """Take over the activities another process of the same run timed (pytest-xdist workers)."""
        with self._lock:
            self._done += [ActivityTiming.from_wire(w) for w in wire]

    def to_wire(self) -> list[dict[str, Any]]:
        return [a.to_wire() for a in self.activities()]


_current: ContextVar[Progress | None] = ContextVar("kickgate_progress", default=None)


class Progress:
    """The hub: the pipeline reports here, every observer hears it, the timeline remembers it.

    A failing observer (a closed terminal, a full disk) is logged and never stops the run.
    """

    def __init__(self, *observers: Observer, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.timeline = Timeline()
        self._observers: list[Observer] = [self.timeline, *observers]

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def _emit(self, event: Event) -> None:
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception as exc:  # progress is for people: it must never break a build or a boot
                log.warning("progress observer %r failed: %s", observer, exc)

    def begin(self, image: str, activity: str, subject: str | None = None, started: float | None = None) -> None:
        self._emit(Event("begin", image, activity, subject or image, self.clock(), started=started))

    def stage(self, image: str, activity: str, stage: str, subject: str | None = None) -> None:
        self._emit(Event("stage", image, activity, subject or image, self.clock(), stage=stage))

    def end(self, image: str, activity: str, outcome: str, subject: str | None = None) -> None:
        self._emit(Event("end", image, activity, subject or image, self.clock(), outcome=outcome))

    @contextlib.contextmanager
    def activity(self, image: str, activity: str, subject: str | None = None,
                 started: float | None = None) -> Iterator[Activity]:
        """begin … end around a block, which reports its stages and outcome through the handle it gets.

        Within the block this hub is the current one (see `current`); an exception ends the activity
        as failed (or interrupted).
        """
        handle = Activity(self, image, activity, subject or image)
        self.begin(image, activity, handle.subject, started)
        token = _current.set(self)
        try:
            yield handle
        except BaseException as exc:
            handle.outcome = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            raise
        finally:
            _current.reset(token)
            self.end(image, activity, handle.outcome, handle.subject)


class Activity:
    """The handle of one running activity: its stages, and how it turned out ("done" unless told)."""

    def __init__(self, progress: Progress, image: str, activity: str, subject: str) -> None:
        self.progress = progress
        self.image = image
        self.activity = activity
        self.subject = subject
        self.outcome = "done"

    def stage(self, name: str) -> None:
        self.progress.stage(self.image, self.activity, name, self.subject)


def current() -> Progress | None:
    """The hub of the activity running in this thread, for code that is handed no observer
    (builder.stages: the build's stages report to the build activity that runs them)."""
    return _current.get()


# -- lines for people ------------------------------------------------------------------------


def _secs(seconds: float) -> str:
    return f"{seconds:.1f}s"


@dataclass
class _Shown:
    event: Event  # the begin event
    stage: str = ""
    stage_at: float = 0.0
    done: list[tuple[str, float]] = field(default_factory=list)

    @property
    def started(self) -> float:
        return self.event.started if self.event.started is not None else self.event.at

    @property
    def title(self) -> str:
        e = self.event
        return f"{e.image} {e.activity}" + (f" {e.subject}" if e.subject != e.image else "")


class LineRenderer:
    """Turns events into text: the live line of the activity in progress, and plain lines per change.

    Pure: it is given the time (`now`) and keeps only the state of the activities it was told about.
    """

    def __init__(self) -> None:
        self._shown: dict[tuple[str, str], _Shown] = {}
        self._order: list[tuple[str, str]] = []

    def feed(self, event: Event) -> list[str]:
        """Record the event; the plain lines it makes (one per stage change, one at the end)."""
        key = (event.activity, event.subject)
        if event.kind == "begin":
            self._shown[key] = _Shown(event)
            if key in self._order:
                self._order.remove(key)
            self._order.append(key)
            since = f" (started {_secs(event.at - event.started)} ago)" if event.started is not None \
                and event.at - event.started >= 0.05 else ""
            return [f"kickgate: {self._shown[key].title}: started{since}"]
        shown = self._shown.get(key)
        if shown is None:
            return []
        if event.kind == "stage":
            if event.stage == shown.stage:
                return []
            if shown.stage:
                shown.done.append((shown.stage, event.at - shown.stage_at))
            shown.stage, shown.stage_at = event.stage, event.at
            prev = f" ({shown.done[-1][0]} took {_secs(shown.done[-1][1])})" if shown.done else ""
            return [f"kickgate: {shown.title}: {event.stage} at {_secs(event.at - shown.started)}{prev}"]
        del self._shown[key]
        self._order.remove(key)
        return [self.final(shown, event)]

    @staticmethod
    def final(shown: _Shown, end: Event) -> str:
        line = f"kickgate: {shown.title}: {end.outcome}"
        if shown.stage and end.outcome in ("failed", "interrupted"):
            line += f" in {shown.stage}"
        line += f" after {_secs(end.at - shown.started)}"
        if shown.stage:
            line += f" ({shown.stage} took {_secs(end.at - shown.stage_at)})"
        return line

    def live(self, now: float) -> str | None:
        """The line of the activity begun last that is still running, or None."""
        if not self._order:
            return None
        shown = self._shown[self._order[-1]]
        parts = [f"kickgate: {shown.title}"]
        if shown.stage:
            parts.append(f"{shown.stage} {_secs(now - shown.stage_at)}")
        parts.append(f"total {_secs(now - shown.started)}")
        if shown.done:
            parts.append("done: " + ", ".join(f"{n} {_secs(s)}" for n, s in shown.done))
        return " | ".join(parts)


class Sink(Protocol):
    """Where the lines of a LiveDisplay go."""

    def rewrite(self, text: str) -> None:
        """Replace the line being rewritten with text (terminals only)."""

    def line(self, text: str) -> None:
        """A finished line (ends the line being rewritten, if any)."""


class StreamSink:
    """Lines on a text stream (stderr of the `kickgate` command). rewrite() uses \\r: terminals only."""

    def __init__(self, stream: TextIO, width: int | None = None) -> None:
        self.stream = stream
        self.width = width
        self._live = 0  # length of the line being rewritten

    def _fit(self, text: str) -> str:
        return text if self.width is None or len(text) < self.width else text[:max(self.width - 4, 10)] + "..."

    def rewrite(self, text: str) -> None:
        text = self._fit(text)
        self.stream.write("\r" + text + " " * max(self._live - len(text), 0))
        self._live = len(text)
        self.stream.flush()

    def line(self, text: str) -> None:
        if self._live:
            self.stream.write("\r" + " " * self._live + "\r")
            self._live = 0
        self.stream.write(text + "\n")
        self.stream.flush()


def plain_output(isatty: bool, environ: Mapping[str, str] | None = None) -> bool:
    """Plain lines (no \\r, no live line) when the output is not a terminal or CI is set."""
    env = os.environ if environ is None else environ
    return not isatty or env.get("CI", "").strip().lower() not in ("", "0", "false", "no")


class LiveDisplay:
    """An observer that shows a run's progress through a Sink.

    live=True: one line rewritten in place every `tick` seconds while an activity runs (elapsed time
    of the stage and of the activity), then replaced by the activity's final line. live=False: the
    plain lines only, one per stage change.
    """

    def __init__(self, sink: Sink, *, live: bool, clock: Clock = time.monotonic, tick: float = 1.0) -> None:
        self.sink = sink
        self.live = live
        self.clock = clock
        self.tick = tick
        self.renderer = LineRenderer()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, event: Event) -> None:
        with self._lock:
            lines = self.renderer.feed(event)
            if not self.live:
                for line in lines:
                    self.sink.line(line)
                return
            if event.kind == "end":
                for line in lines:
                    self.sink.line(line)
            current = self.renderer.live(self.clock())
            if current is not None:
                self.sink.rewrite(current)
                self._start_ticking()

    def _start_ticking(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kickgate-progress", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            with self._lock:
                current = self.renderer.live(self.clock())
                if current is None:
                    continue
                try:
                    self.sink.rewrite(current)
                except Exception as exc:  # a closed terminal: stop ticking, keep the run going
                    log.warning("progress display stopped: %s", exc)
                    return

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
