"""The gate: from the outcomes of one image's specs, decide whether it may be promoted. Pure logic."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Outcome = Literal["passed", "failed", "error", "skipped", "xfailed", "xpassed"]


@dataclass
class SpecResults:
    """Outcomes per spec node id for one image, filled from pytest reports (xdist-safe: reports only)."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def record(self, nodeid: str, when: str, outcome: str, wasxfail: bool) -> None:
        current = self.outcomes.get(nodeid)
        if current in ("failed", "error"):
            return  # the worst phase wins
        if outcome == "failed":
            self.outcomes[nodeid] = "failed" if when == "call" else "error"
        elif outcome == "skipped":
            self.outcomes[nodeid] = "xfailed" if wasxfail else "skipped"
        elif when == "call" and outcome == "passed":
            self.outcomes[nodeid] = "xpassed" if wasxfail else "passed"
        elif current is None and outcome == "passed" and when == "setup":
            self.outcomes[nodeid] = "passed"  # provisional until the call reports

    @property
    def total(self) -> int:
        return len(self.outcomes)

    @property
    def passed(self) -> list[str]:
        return sorted(n for n, o in self.outcomes.items() if o == "passed")

    @property
    def any_failed(self) -> bool:
        return any(o in ("failed", "error") for o in self.outcomes.values())

    @property
    def not_passed(self) -> dict[str, Outcome]:
        return {n: o for n, o in sorted(self.outcomes.items()) if o != "passed"}


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str  # why not, or "all N specs passed"


def short_name(nodeid: str) -> str:
    """specs/test_swap.py::test_no_swap[generic-dev] → test_swap.py::test_no_swap"""
    path, _, rest = nodeid.partition("::")
    return f"{path.rsplit('/', 1)[-1]}::{rest.split('[', 1)[0]}" if rest else path


def decide(results: SpecResults, *, narrowed: str | None, allow_partial: bool, interrupted: bool,
           register: bool) -> Verdict:
    if not register:
        return Verdict(False, "registration off (--no-register)")
    if interrupted:
        return Verdict(False, "the run was interrupted")
    if results.total == 0:
        return Verdict(False, "no spec ran against it")
    bad = results.not_passed
    if bad:
        listed = ", ".join(f"{short_name(n)} {o}" for n, o in list(bad.items())[:6])
        more = f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""
        return Verdict(False, f"{len(bad)} of {results.total} specs did not pass: {listed}{more}")
    if narrowed and not allow_partial:
        return Verdict(False, f"the run was narrowed ({narrowed}); pass --allow-partial to register anyway")
    return Verdict(True, f"all {results.total} specs passed")


def specs_attribute(results: SpecResults) -> str:
    """The SPECS attribute: passed/total and the names that passed."""
    names = ", ".join(sorted({short_name(n) for n in results.passed}))
    return f"{len(results.passed)}/{results.total} passed: {names}"
