"""With pytest-xdist the controller gates: workers build and verify, the controller decides and registers.

Like test_plugin_gate, these verify a tiny prebuilt qcow2 with specs that need no guest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SPECS = """
import os

import pytest

@pytest.fixture(autouse=True)
def where(worker_id):
    open(os.environ["KG_WORKERS"] + "/" + worker_id, "a").write("x")

def test_one(built_image):
    assert built_image.format == "qcow2"

def test_two(built_image):
    pass

def test_three(built_image):
    assert len(built_image.sha256) == 64

@pytest.mark.parametrize("n", range(5))
def test_more(built_image, n):
    pass
"""


@pytest.fixture
def image(fake_image: Path) -> Path:
    return fake_image


def run_n2(pytester: pytest.Pytester, repo_root: Path, image: Path, registry: Path, specs: str,
           monkeypatch: pytest.MonkeyPatch) -> pytest.RunResult:
    workers = pytester.path / "workers"
    workers.mkdir()
    monkeypatch.setenv("KG_WORKERS", str(workers))
    pytester.makepyfile(test_specs=specs)
    return pytester.runpytest_subprocess("-n", "2", "--image-path", str(image), "--image", "generic-dev",
                                         "--recipes", str(repo_root), "--registry-dir", str(registry))


def test_the_controller_registers_what_the_workers_verified(pytester: pytest.Pytester, repo_root: Path,
                                                            image: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    registry = tmp_path / "registry"
    result = run_n2(pytester, repo_root, image, registry, SPECS, monkeypatch)
    result.assert_outcomes(passed=8)
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*generic-dev: prebuilt*specs 8/8 passed*registered: local generic-dev version 1*"])
    record = json.loads((registry / "generic-dev" / "1" / "record.json").read_text())
    assert dict(record["attributes"])["SPECS"].startswith("8/8 passed")
    # One image is one group: all its specs ran on one worker, which built and booted it once.
    assert len(list((pytester.path / "workers").iterdir())) == 1


def test_a_failure_on_a_worker_blocks_registration(pytester: pytest.Pytester, repo_root: Path, image: Path,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = tmp_path / "registry"
    result = run_n2(pytester, repo_root, image, registry, SPECS + "\ndef test_bad(built_image):\n    assert 0\n",
                    monkeypatch)
    result.assert_outcomes(passed=8, failed=1)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*NOT registered: 1 of 9 specs did not pass: test_specs.py::test_bad failed*"])
    assert not (registry / "generic-dev").exists()


def test_a_narrowed_distributed_run_registers_nothing(pytester: pytest.Pytester, repo_root: Path, image: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = tmp_path / "registry"
    workers = pytester.path / "workers"
    workers.mkdir()
    monkeypatch.setenv("KG_WORKERS", str(workers))
    pytester.makepyfile(test_specs=SPECS)
    result = pytester.runpytest_subprocess("-n", "2", "-k", "not three", "--image-path", str(image), "--image",
                                           "generic-dev", "--recipes", str(repo_root), "--registry-dir",
                                           str(registry))
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(["*NOT registered: the run was narrowed*"])
    assert not (registry / "generic-dev").exists()


@pytest.mark.parametrize(("nodeid", "image"), [
    ("specs/test_swap.py::test_no_swap[generic-dev]", "generic-dev"),
    ("specs/test_swap.py::test_no_swap[generic-dev-trixie]", "generic-dev-trixie"),
    ("specs/test_x.py::Class::test_y[generic-dev-trixie-tcp]", "generic-dev-trixie"),
    ("specs/test_x.py::test_y[udp-generic-dev]", "generic-dev"),
    ("specs/test_x.py::test_y[a-generic-dev-b]", "generic-dev"),
    ("specs/test_x.py::test_y[generic-devel]", None),
    ("specs/test_x.py::test_y", None),
    ("specs/test_x[1].py::test_y", None),
])
def test_each_spec_is_scheduled_with_its_image(nodeid: str, image: str | None) -> None:
    from builder.scheduling import image_of

    assert image_of(nodeid, ["generic-dev", "generic-dev-trixie"]) == image
