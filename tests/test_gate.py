"""The gate (builder/gate.py): every outcome pytest reports, and every reason an image is not promoted.

The outcomes are recorded from the reports of a real pytest run (as the plugin records them), the
verdicts from gate.decide; the narrowing options are judged through the plugin on a prebuilt image.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.gate import SpecResults, Verdict, decide, short_name, specs_attribute

EVERY_OUTCOME = """
import pytest

@pytest.fixture
def broken_setup():
    raise RuntimeError("setup broke")

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown broke")

def test_pass():
    pass

def test_fail():
    assert False

def test_setup_error(broken_setup):
    pass

def test_teardown_error(broken_teardown):
    pass

def test_fail_and_teardown_error(broken_teardown):
    assert False

@pytest.mark.skip(reason="later")
def test_skip_mark():
    pass

def test_skip_in_call():
    pytest.skip("not here")

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

@pytest.mark.xfail(reason="known")
def test_xpass():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_xpass_strict():
    pass
"""

EXPECTED = {
    "test_pass": "passed",
    "test_fail": "failed",
    "test_setup_error": "error",
    "test_teardown_error": "error",
    "test_fail_and_teardown_error": "failed",
    "test_skip_mark": "skipped",
    "test_skip_in_call": "skipped",
    "test_xfail": "xfailed",
    "test_xpass": "xpassed",
    "test_xpass_strict": "failed",
}


class Recorder:
    """Feeds SpecResults the way the plugin does (builder/plugin.py, pytest_runtest_logreport)."""

    def __init__(self) -> None:
        self.results = SpecResults()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.results.record(report.nodeid, report.when or "call", report.outcome, hasattr(report, "wasxfail"))


def recorded(pytester: pytest.Pytester, source: str, *args: str) -> SpecResults:
    pytester.makepyfile(test_specs=source)
    rec = Recorder()
    pytester.runpytest("-p", "no:kickgate", "-p", "no:cacheprovider", *args, plugins=[rec])
    return rec.results


@pytest.fixture
def every_outcome(pytester: pytest.Pytester) -> SpecResults:
    return recorded(pytester, EVERY_OUTCOME)


def by_name(results: SpecResults) -> dict[str, str]:
    return {n.split("::", 1)[1]: o for n, o in results.outcomes.items()}


def test_every_outcome_of_a_real_run_is_recorded(every_outcome: SpecResults) -> None:
    assert by_name(every_outcome) == EXPECTED
    assert every_outcome.total == len(EXPECTED)
    assert every_outcome.passed == ["test_specs.py::test_pass"]
    assert every_outcome.any_failed


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {"test_pass"}))
def test_any_outcome_but_passed_blocks_promotion(pytester: pytest.Pytester, name: str) -> None:
    results = recorded(pytester, EVERY_OUTCOME, "test_specs.py::test_pass", f"test_specs.py::{name}")
    assert by_name(results) == {"test_pass": "passed", name: EXPECTED[name]}
    verdict = decide(results, narrowed=None, allow_partial=False, interrupted=False, register=True)
    assert verdict == Verdict(False, f"1 of 2 specs did not pass: test_specs.py::{name} {EXPECTED[name]}")


def test_all_passed_promotes(pytester: pytest.Pytester) -> None:
    results = recorded(pytester, EVERY_OUTCOME, "-k", "test_pass")
    assert decide(results, narrowed=None, allow_partial=False, interrupted=False, register=True) == \
        Verdict(True, "all 1 specs passed")
    assert specs_attribute(results) == "1/1 passed: test_specs.py::test_pass"


def test_a_passed_setup_alone_is_not_a_pass_once_the_call_fails() -> None:
    r = SpecResults()
    r.record("s.py::t", "setup", "passed", False)
    assert r.outcomes == {"s.py::t": "passed"}  # provisional
    r.record("s.py::t", "call", "failed", False)
    r.record("s.py::t", "teardown", "passed", False)
    assert r.outcomes == {"s.py::t": "failed"}


def test_the_worst_phase_wins() -> None:
    r = SpecResults()
    r.record("s.py::t", "setup", "failed", False)
    r.record("s.py::t", "teardown", "passed", False)
    assert r.outcomes == {"s.py::t": "error"}
    r.record("s.py::u", "setup", "passed", False)
    r.record("s.py::u", "call", "passed", False)
    r.record("s.py::u", "teardown", "failed", False)
    r.record("s.py::u", "teardown", "passed", False)
    assert r.outcomes["s.py::u"] == "error"


def passing(n: int = 3) -> SpecResults:
    r = SpecResults()
    for i in range(n):
        r.record(f"specs/test_x.py::test_{i}[generic-dev]", "call", "passed", False)
    return r


def test_registration_off_comes_first() -> None:
    bad = SpecResults({"a.py::t": "failed"})
    assert decide(bad, narrowed="-k x", allow_partial=False, interrupted=True, register=False) == \
        Verdict(False, "registration off (--no-register)")


def test_an_interrupted_run_promotes_nothing() -> None:
    assert decide(passing(), narrowed=None, allow_partial=True, interrupted=True, register=True) == \
        Verdict(False, "the run was interrupted")


def test_no_spec_ran() -> None:
    assert decide(SpecResults(), narrowed=None, allow_partial=True, interrupted=False, register=True) == \
        Verdict(False, "no spec ran against it")


def test_narrowed_needs_allow_partial() -> None:
    v = decide(passing(), narrowed="-m smoke", allow_partial=False, interrupted=False, register=True)
    assert v == Verdict(False, "the run was narrowed (-m smoke); pass --allow-partial to register anyway")
    assert decide(passing(), narrowed="-m smoke", allow_partial=True, interrupted=False, register=True) == \
        Verdict(True, "all 3 specs passed")


def test_a_failure_outweighs_allow_partial() -> None:
    r = passing()
    r.record("specs/test_x.py::test_bad[generic-dev]", "call", "failed", False)
    v = decide(r, narrowed="-k x", allow_partial=True, interrupted=False, register=True)
    assert v == Verdict(False, "1 of 4 specs did not pass: test_x.py::test_bad failed")


def test_long_lists_are_cut_after_six() -> None:
    r = SpecResults({f"specs/test_x.py::test_{i}[img]": "skipped" for i in range(9)})
    v = decide(r, narrowed=None, allow_partial=False, interrupted=False, register=True)
    assert not v.promote
    assert v.reason.startswith("9 of 9 specs did not pass: test_x.py::test_0 skipped, ")
    assert v.reason.count("skipped") == 6 and v.reason.endswith(" (+3 more)")


def test_short_name_and_specs_attribute() -> None:
    assert short_name("specs/test_swap.py::test_no_swap[generic-dev]") == "test_swap.py::test_no_swap"
    assert short_name("specs/test_swap.py") == "specs/test_swap.py"
    r = passing(2)
    r.record("specs/test_y.py::test_z[generic-dev]", "call", "failed", False)
    assert specs_attribute(r) == "2/3 passed: test_x.py::test_0, test_x.py::test_1"


# --------------------------------------------------------------------------- narrowing, through the plugin

SPECS = """
import pytest

def test_image_is_qcow2(built_image):
    assert built_image.format == "qcow2"

@pytest.mark.smoke
def test_sha_taken(built_image):
    assert len(built_image.sha256) == 64
"""


@pytest.fixture
def gate_run(pytester: pytest.Pytester, repo_root: Path, tmp_path: Path) -> tuple[pytest.Pytester, list[str], Path]:
    image = tmp_path / "img" / "generic-dev.qcow2"
    image.parent.mkdir()
    pytester.run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    registry = tmp_path / "registry"
    pytester.makeconftest("def pytest_configure(config):\n"
                          "    config.addinivalue_line('markers', 'smoke: quick specs')\n")
    # --rootdir: --recipes names the repository, whose pyproject.toml would otherwise become the
    # run's rootdir and its .pytest_cache (which --lf reads) shared with every other run.
    return pytester, ["--rootdir", str(pytester.path), "--image-path", str(image), "--image", "generic-dev",
                      "--recipes", str(repo_root), "--registry-dir", str(registry)], registry


def registered(registry: Path) -> list[str]:
    d = registry / "generic-dev"
    return sorted(p.name for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.parametrize(("args", "why"), [
    (["-m", "smoke"], "-m smoke"),
    (["-k", "sha"], "-k sha"),
])
def test_selecting_options_narrow_the_run(gate_run: tuple[pytest.Pytester, list[str], Path],
                                          args: list[str], why: str) -> None:
    pt, base, registry = gate_run
    pt.makepyfile(test_specs=SPECS)
    result = pt.runpytest_subprocess(*base, *args)
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines([f"*NOT registered: the run was narrowed ({why}*--allow-partial*"])
    assert registered(registry) == []


def test_last_failed_narrows_the_run(gate_run: tuple[pytest.Pytester, list[str], Path]) -> None:
    pt, base, registry = gate_run
    pt.makepyfile(test_specs=SPECS.replace("== 64", "== 65"))
    pt.runpytest_subprocess(*base).assert_outcomes(passed=1, failed=1)
    pt.makepyfile(test_specs=SPECS)
    result = pt.runpytest_subprocess(*base, "--lf")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*specs 1/1 passed*NOT registered: the run was narrowed (--lf)*"])
    assert registered(registry) == []


def test_exitfirst_stop_promotes_nothing(gate_run: tuple[pytest.Pytester, list[str], Path]) -> None:
    pt, base, registry = gate_run
    pt.makepyfile(test_specs=SPECS.replace('== "qcow2"', '== "raw"'))
    result = pt.runpytest_subprocess(*base, "-x")
    result.assert_outcomes(failed=1)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*specs 0/1 passed | NOT registered: only 1 of 2 specs ran*"])
    assert registered(registry) == []


def test_exitfirst_without_a_failure_registers(gate_run: tuple[pytest.Pytester, list[str], Path]) -> None:
    pt, base, registry = gate_run
    pt.makepyfile(test_specs=SPECS)
    result = pt.runpytest_subprocess(*base, "-x")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*registered: local generic-dev version 1*"])
    assert registered(registry) == ["1"]
