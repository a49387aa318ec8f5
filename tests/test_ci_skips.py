""".ci/run's skip check: every skip is listed, one not expected by node id fails the CI run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = """
import pytest

def test_runs():
    pass

def test_skipped():
    pytest.skip("no frobnicator")

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    if n == 2:
        pytest.skip("two is too many")

class TestGroup:
    def test_in_class(self):
        pytest.skip("grouped")

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False
"""
SKIPPED = ["sub/test_sample.py::TestGroup::test_in_class", "sub/test_sample.py::test_param[2]",
           "sub/test_sample.py::test_skipped"]


@pytest.fixture
def junit(pytester: pytest.Pytester) -> Path:
    pytester.mkpydir("sub")
    (pytester.path / "sub" / "test_sample.py").write_text(SAMPLE)
    report = pytester.path / "junit.xml"
    pytester.runpytest_subprocess("sub", f"--junitxml={report}").assert_outcomes(passed=2, skipped=3,
                                                                                  xfailed=1)
    return report


def check(repo_root: Path, junit: Path, *expected: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(repo_root / ".ci" / "skips.py"), str(junit), *expected],
                          capture_output=True, text=True, timeout=60, check=False)


def test_unexpected_skips_fail_and_are_listed(repo_root: Path, junit: Path) -> None:
    res = check(repo_root, junit, SKIPPED[0])
    assert res.returncode == 1
    assert "3 skipped test(s)" in res.stdout
    assert f"{SKIPPED[0]}  [expected] grouped" in res.stdout
    assert f"{SKIPPED[1]}  [NOT EXPECTED] two is too many" in res.stdout
    assert f"{SKIPPED[2]}  [NOT EXPECTED] no frobnicator" in res.stdout
    assert "test_xfail" not in res.stdout
    assert "2 unexpected skip(s)" in res.stderr


def test_only_expected_skips_pass(repo_root: Path, junit: Path) -> None:
    res = check(repo_root, junit, *SKIPPED)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ci_run_expects_no_skips_and_sets_ci(repo_root: Path) -> None:
    script = (repo_root / ".ci" / "run").read_text()
    assert "expected_skips=(\n)" in script
    assert "export CI=" in script and ".ci/skips.py" in script
