"""Run one build domain to its end: start it, follow its serial console, destroy it, judge the outcome.

Both build methods use this one helper, so a finish VM and an installer behave alike: the same
--console streaming (each serial line once), hard timeout, inactivity watchdog and reasons.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.console import ANSI_RE, Outcome, Watch, watch
from builder.domain import DomainSpec, domain_xml
from builder.errors import BuildError
from builder.method import BuildContext

log = logging.getLogger(__name__)
serial_info = logging.getLogger("kickgate.serial")

TAIL_LINES = 40


@dataclass(frozen=True)
class DomainJob:
    """What one build domain must do: print ok_marker, then power off."""

    stage: str  # the build stage named in errors
    what: str  # "the finish VM", "the installer": the subject of the reasons
    ok_marker: str
    failure_markers: tuple[str, ...]
    no_marker_hint: str = ""  # appended when it powered off without the marker
    mask: Callable[[str], str] = str  # applied to every line that reaches an error (secrets)


def run_domain(ctx: BuildContext, spec: DomainSpec, job: DomainJob, *,
               progress: Callable[[str], None] | None = None,
               activity: Callable[[Any], int] | None = None) -> None:
    """Return when the domain powered off after job.ok_marker; raise BuildError otherwise.

    progress sees every serial line (for the method's own progress log); activity(dom) returns a
    counter whose change resets the inactivity watchdog (e.g. disk bytes written).
    """
    name = ctx.recipe.name

    def on_line(line: str) -> None:
        if ctx.on_console_line is not None:
            ctx.on_console_line(line)
        if ctx.options.console:
            serial_info.info("%s: %s", name, job.mask(line))
        if progress is not None:
            progress(line)

    vm = ctx.recipe.vm
    dom = ctx.hypervisor.start(domain_xml(spec), spec.name)
    try:
        outcome, w = watch(dom, ctx.hypervisor.is_active, ctx.serial_log, timeout=vm.build_timeout_s,
                           idle_timeout=vm.idle_timeout_s, markers=[job.ok_marker],
                           failure=job.failure_markers, progress=on_line,
                           activity=(lambda: activity(dom)) if activity is not None else None)
    finally:
        ctx.hypervisor.destroy(spec.name)
    judge(ctx, job, outcome, w)


def judge(ctx: BuildContext, job: DomainJob, outcome: Outcome, w: Watch) -> None:
    """Map how the domain ended to success or a BuildError with a reason and the serial tail."""
    vm = ctx.recipe.vm
    text = read_serial(ctx.serial_log)
    # The serial file is the record: a marker on the last line before power-off counts too.
    marker = job.ok_marker in w.seen or any(job.ok_marker in ln for ln in text.splitlines())
    if outcome is Outcome.POWERED_OFF and marker:
        log.info("%s: %s: %s seen, domain powered off", ctx.recipe.name, job.stage, job.ok_marker)
        return
    never_off = (f"; {job.ok_marker} was printed but the domain never powered off"
                 " (does it end with poweroff?)") if marker else ""
    if outcome is Outcome.POWERED_OFF:
        reason = f"{job.what} powered off without printing {job.ok_marker}"
        if job.no_marker_hint:
            reason += f": {job.no_marker_hint}"
    elif outcome is Outcome.FAILED:
        reason = f"failure marker on the console: {job.mask(w.failure_line or '')!r}"
    elif outcome is Outcome.TIMEOUT:
        reason = f"hard timeout: {job.what} did not finish within {vm.build_timeout_s}s ([vm] build_timeout)"
        reason += never_off
    elif outcome is Outcome.IDLE:
        reason = (f"inactivity watchdog: {job.what} printed nothing and wrote nothing for {vm.idle_timeout_s}s "
                  "([vm] idle_timeout)") + never_off
    else:
        reason = f"console follower stopped: {outcome.value}"
    lines = w.tail_lines(TAIL_LINES) or text.splitlines()[-TAIL_LINES:]
    raise BuildError(job.stage, reason, [job.mask(ln) for ln in lines], str(ctx.serial_log))


def read_serial(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return ""
    return ANSI_RE.sub("", raw.decode("utf-8", errors="replace"))
