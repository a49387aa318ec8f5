"""The serial follower: a real file written by a background "guest" thread, an Event-backed is_active.

A unit test of watch()'s logic, not of libvirt: the guest thread appends bytes to the log the way
QEMU's file chardev does and "powers off" by setting an Event.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from builder.console import Outcome, Watch, watch

POLL = 0.01
SAFETY_S = 8.0  # no test follows longer; then the guest powers off
OFF = "power off"
Step = bytes | float | str  # bytes: written; float: sleep; OFF: the domain stops


class Guest:
    """Plays a script of writes and pauses on a thread; is_active() is False once it powered off."""

    def __init__(self, path: Path, script: Sequence[Step] = (), *, chatter: float | None = None) -> None:
        self.path = path
        self.script = list(script)
        self.chatter = chatter  # after the script: one line every `chatter` seconds until stop()
        self.off = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.deadline = time.monotonic() + SAFETY_S

    def is_active(self, _dom: object) -> bool:
        return not self.off.is_set()

    def _run(self) -> None:
        with open(self.path, "ab", buffering=0) as f:
            for step in self.script:
                if self.stopped.is_set():
                    return
                if isinstance(step, bytes):
                    f.write(step)
                elif isinstance(step, float):
                    time.sleep(step)
                elif step == OFF:
                    self.off.set()
                    return
            n = 0
            while self.chatter is not None and not self.stopped.wait(self.chatter):
                f.write(f"chatter {n}\n".encode())
                n += 1
                if time.monotonic() > self.deadline:
                    break
            # Safety net: a watch() that never returns fails the test instead of hanging the run.
            if not self.stopped.wait(max(0.0, self.deadline - time.monotonic())):
                self.off.set()

    def start(self) -> Guest:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)


@pytest.fixture
def serial(tmp_path: Path) -> Path:
    path = tmp_path / "serial.log"
    path.touch()
    return path


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for g in started:
        g.stop()


def follow(guests: list[Guest], serial: Path, script: Sequence[Step] = (), *, chatter: float | None = None,
           timeout: float = 5.0, idle_timeout: float = 2.0, **kw: Any) -> tuple[Outcome, Watch, float]:
    guest = Guest(serial, script, chatter=chatter)
    guests.append(guest)
    guest.start()
    t0 = time.monotonic()
    outcome, w = watch(None, guest.is_active, serial, timeout=timeout, idle_timeout=idle_timeout,
                       poll_interval=POLL, **kw)
    return outcome, w, time.monotonic() - t0


def scripted_is_active(path: Path, writes: Sequence[bytes | None]) -> Callable[[object], bool]:
    """Deterministic: the n-th state check first appends writes[n] (the guest printed it just now)
    and reports active while writes remain, inactive afterwards."""
    it = iter(writes)

    def is_active(_dom: object) -> bool:
        try:
            data = next(it)
        except StopIteration:
            return False
        if data is not None:
            with open(path, "ab") as f:
                f.write(data)
        return True

    return is_active


def test_markers_seen_then_powered_off(guests: list[Guest], serial: Path) -> None:
    outcome, w, _ = follow(guests, serial, [b"boot\n", 0.05, b"step 1\n[ 5.1] KICKGATE-OK done\n", 0.05, OFF],
                           markers=["KICKGATE-OK", "NEVER-PRINTED"])
    assert outcome is Outcome.POWERED_OFF
    assert w.seen == {"KICKGATE-OK"}
    assert list(w.tail) == ["boot", "step 1", "[ 5.1] KICKGATE-OK done"]


def test_progress_gets_every_line_in_order(guests: list[Guest], serial: Path) -> None:
    got: list[str] = []
    script: list[Step] = [f"line {i}\n".encode() for i in range(20)]
    outcome, _, _ = follow(guests, serial, [*script[:7], 0.03, *script[7:], 0.03, OFF], progress=got.append)
    assert outcome is Outcome.POWERED_OFF
    assert got == [f"line {i}" for i in range(20)]


def test_failure_marker(guests: list[Guest], serial: Path) -> None:
    outcome, w, _ = follow(
        guests, serial, [b"booting\n", 0.03, b"[ 1.23] Kernel panic - not syncing: VFS\n", b"more\n"],
        chatter=0.02, markers=["KICKGATE-OK"], failure=["KICKGATE-FAILED", "Kernel panic"])
    assert outcome is Outcome.FAILED
    assert w.failure_line == "[ 1.23] Kernel panic - not syncing: VFS"
    assert "KICKGATE-OK" not in w.seen


def test_wait_for_regex(guests: list[Guest], serial: Path) -> None:
    outcome, w, _ = follow(guests, serial, [b"Debian GNU/Linux 12 host ttyS0\n", 0.03, b"host login: x\n"],
                           chatter=0.02, wait_for=[r"^\S+ login:"])
    assert outcome is Outcome.MATCHED
    assert w.matched == "host login: x"


def test_wait_for_matches_a_prompt_with_no_newline(guests: list[Guest], serial: Path) -> None:
    # getty prints "host login: " and waits: the line never ends, yet the prompt is there.
    outcome, w, _ = follow(guests, serial, [b"Debian GNU/Linux 12 host ttyS0\n\n", b"host login: "],
                           idle_timeout=SAFETY_S, wait_for=[r"login: ?$"])
    assert outcome is Outcome.MATCHED, outcome
    assert w.matched == "host login: "


def test_idle_watchdog_when_nothing_is_written(guests: list[Guest], serial: Path) -> None:
    outcome, w, elapsed = follow(guests, serial, [b"one line, then silence\n"], timeout=60, idle_timeout=0.2)
    assert outcome is Outcome.IDLE
    assert w.tail_lines() == ["one line, then silence"]
    assert elapsed >= 0.2


def test_hard_timeout_while_lines_keep_coming(guests: list[Guest], serial: Path) -> None:
    # idle_timeout is long enough that a loaded machine's scheduling gaps do not trip it first.
    outcome, w, elapsed = follow(guests, serial, chatter=0.02, timeout=0.4, idle_timeout=SAFETY_S / 2)
    assert outcome is Outcome.TIMEOUT
    assert elapsed >= 0.4
    assert w.tail, "the chatter was not read"


def test_activity_counter_keeps_watchdog_quiet(guests: list[Guest], serial: Path) -> None:
    counter = itertools.count()
    outcome, w, elapsed = follow(guests, serial, timeout=0.5, idle_timeout=0.15, activity=lambda: next(counter))
    assert outcome is Outcome.TIMEOUT
    assert elapsed >= 0.5
    assert list(w.tail) == []


def test_unchanging_activity_counter_does_not_count(guests: list[Guest], serial: Path) -> None:
    # The outcome, not a stopwatch, says the idle watchdog fired long before the hard timeout.
    outcome, _, elapsed = follow(guests, serial, timeout=60, idle_timeout=0.15, activity=lambda: 42)
    assert outcome is Outcome.IDLE
    assert elapsed >= 0.15


def test_marker_right_before_power_off_is_seen(guests: list[Guest], tmp_path: Path) -> None:
    for i in range(10):
        serial = tmp_path / f"serial-{i}.log"
        serial.touch()
        outcome, w, _ = follow(guests, serial, [b"working\n", 0.02 + i * 0.003, b"KICKGATE-OK\n", OFF],
                               markers=["KICKGATE-OK"])
        assert outcome is Outcome.POWERED_OFF
        assert w.seen == {"KICKGATE-OK"}, f"run {i}: marker lost"


def test_marker_printed_between_poll_and_state_check_is_seen(serial: Path) -> None:
    # The guest prints the marker and powers off after the last poll, before the next state check.
    calls = itertools.count(1)

    def is_active(_dom: object) -> bool:
        if next(calls) < 3:
            return True
        with open(serial, "ab") as f:
            f.write(b"KICKGATE-OK\n")
        return False

    outcome, w = watch(None, is_active, serial, timeout=5, idle_timeout=5, markers=["KICKGATE-OK"],
                       poll_interval=POLL)
    assert outcome is Outcome.POWERED_OFF
    assert w.seen == {"KICKGATE-OK"}


def test_ansi_escapes_and_cr_are_stripped(guests: list[Guest], serial: Path) -> None:
    outcome, w, _ = follow(guests, serial, [
        b"[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mssh.service\x1b[0m.\r\n",
        b"\x1bc\x1b[?25l\x1b[2Jplain text\r\n",
        b"progress 10%\rprogress 100%\r\n",
        0.02, OFF], markers=["[  OK  ] Started ssh.service."])
    assert outcome is Outcome.POWERED_OFF
    assert list(w.tail) == ["[  OK  ] Started ssh.service.", "plain text", "progress 10%progress 100%"]
    assert w.seen == {"[  OK  ] Started ssh.service."}
    assert not any("\x1b" in line or "\r" in line for line in w.tail_lines())


def test_tail_keeps_last_40_lines(guests: list[Guest], serial: Path) -> None:
    data = b"".join(f"line {i}\n".encode() for i in range(100))
    outcome, w, _ = follow(guests, serial, [data[:300], 0.02, data[300:], 0.02, OFF])
    assert outcome is Outcome.POWERED_OFF
    assert list(w.tail) == [f"line {i}" for i in range(60, 100)]
    assert w.tail_lines() == [f"line {i}" for i in range(60, 100)]
    assert w.tail_lines(3) == ["line 97", "line 98", "line 99"]


def test_partial_last_line_in_tail_lines(guests: list[Guest], serial: Path) -> None:
    outcome, w, _ = follow(guests, serial, [b"first\nsecond\n", b"\x1b[1mhost login: ", 0.02, OFF],
                           markers=["host login:"])
    assert outcome is Outcome.POWERED_OFF
    assert w.tail_lines() == ["first", "second", "host login: "]
    assert w.seen == {"host login:"}


def test_partial_line_while_running_is_in_tail_lines_only() -> None:
    w = Watch(Path("/nonexistent"))
    w._take(["first"])
    w._partial = "host login: "
    assert list(w.tail) == ["first"]
    assert w.tail_lines() == ["first", "host login: "]


def test_marker_on_unfinished_last_line_at_power_off_counts(serial: Path) -> None:
    # The guest prints the marker without a newline and powers off: nothing will ever end that line.
    got: list[str] = []
    is_active = scripted_is_active(serial, [b"working\n", b"KICKGATE-", b"OK"])
    outcome, w = watch(None, is_active, serial, timeout=60, idle_timeout=60, markers=["KICKGATE-OK"],
                       progress=got.append, poll_interval=POLL)
    assert outcome is Outcome.POWERED_OFF
    assert w.seen == {"KICKGATE-OK"}
    assert got == ["working", "KICKGATE-OK"]
    assert list(w.tail) == ["working", "KICKGATE-OK"]
    assert w.tail_lines() == ["working", "KICKGATE-OK"]


def test_failure_marker_on_unfinished_last_line_at_power_off(serial: Path) -> None:
    is_active = scripted_is_active(serial, [b"working\n\x1b[1mKICKGATE-FAILED step 3"])
    outcome, w = watch(None, is_active, serial, timeout=60, idle_timeout=60, markers=["KICKGATE-OK"],
                       failure=["KICKGATE-FAILED"], poll_interval=POLL)
    assert outcome is Outcome.FAILED
    assert w.failure_line == "KICKGATE-FAILED step 3"
    assert w.seen == set()


def test_utf8_cut_at_power_off_is_replaced_not_lost(serial: Path) -> None:
    is_active = scripted_is_active(serial, ["done ✓".encode()[:-1]])
    outcome, w = watch(None, is_active, serial, timeout=60, idle_timeout=60, markers=["done"],
                       poll_interval=POLL)
    assert outcome is Outcome.POWERED_OFF
    assert w.seen == {"done"}
    assert list(w.tail) == ["done \ufffd"]


def test_line_split_across_writes_is_one_line(serial: Path) -> None:
    is_active = scripted_is_active(serial, [b"KICKGATE-", None, b"OK and", b" the rest\nnext\n"])
    outcome, w = watch(None, is_active, serial, timeout=5, idle_timeout=5, markers=["KICKGATE-OK"],
                       poll_interval=POLL)
    assert outcome is Outcome.POWERED_OFF
    assert list(w.tail) == ["KICKGATE-OK and the rest", "next"]
    assert w.seen == {"KICKGATE-OK"}


def test_utf8_character_split_across_writes(serial: Path) -> None:
    # A UART delivers byte by byte: a poll can fall inside a multi-byte character.
    text = "café ✓ ok\n".encode()
    cut1, cut2 = text.index(b"\xa9"), text.index("✓".encode()) + 1
    is_active = scripted_is_active(serial, [text[:cut1], text[cut1:cut2], text[cut2:]])
    outcome, w = watch(None, is_active, serial, timeout=5, idle_timeout=5, poll_interval=POLL)
    assert outcome is Outcome.POWERED_OFF
    assert list(w.tail) == ["café ✓ ok"]


def test_serial_file_created_late(guests: list[Guest], tmp_path: Path) -> None:
    serial = tmp_path / "not-yet.log"
    outcome, w, _ = follow(guests, serial, [0.05, b"KICKGATE-OK\n", 0.02, OFF], markers=["KICKGATE-OK"])
    assert outcome is Outcome.POWERED_OFF
    assert w.seen == {"KICKGATE-OK"}
