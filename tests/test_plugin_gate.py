"""The gate in the pytest plugin: only images whose every spec passed, in a full run, get registered.

These runs verify a tiny prebuilt qcow2 (--image-path) with specs that need no guest, so they
exercise the plugin, the gate and the local registry without booting anything.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

SPECS = """
def test_image_is_qcow2(built_image):
    assert built_image.format == "qcow2"

def test_sha_taken(built_image):
    assert len(built_image.sha256) == 64
"""


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "registry"


def run_gate(pytester: pytest.Pytester, repo_root: Path, image: Path, registry: Path, *args: str,
             specs: str = SPECS) -> pytest.RunResult:
    pytester.makepyfile(test_specs=specs)
    # --rootdir: else --recipes makes the repository the rootdir, its .pytest_cache shared by every run.
    return pytester.runpytest_subprocess("--rootdir", str(pytester.path), "--image-path", str(image),
                                         "--image", "generic-dev", "--recipes", str(repo_root),
                                         "--registry-dir", str(registry), *args)


def versions(registry: Path) -> list[str]:
    d = registry / "generic-dev"
    return sorted(p.name for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_all_passed_registers_with_provenance(pytester: pytest.Pytester, repo_root: Path, fake_image: Path,
                                              registry: Path) -> None:
    result = run_gate(pytester, repo_root, fake_image, registry, str(pytester.path))
    result.assert_outcomes(passed=2)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*generic-dev: prebuilt*specs 2/2 passed*registered: local generic-dev version 1*"])
    record = json.loads((registry / "generic-dev" / "1" / "record.json").read_text())
    attrs = dict(record["attributes"])
    assert attrs["SHA256"] == record["sha256"]
    # a prebuilt image was not built from this repository: no GitRev of it
    assert attrs["DESCRIPTION"] == "generic-dev image. Source: prebuilt generic-dev.qcow2" and "GITREV" not in attrs
    assert attrs["SPECS"].startswith("2/2 passed: test_specs.py::test_image_is_qcow2, test_specs.py::test_sha_taken")
    assert attrs["IMGTYPE"] == "rcs" and attrs["TYPE"] == "OS" and attrs["PUBLIC"] == "YES"
    assert (registry / "generic-dev" / "1" / "generic-dev.qcow2").read_bytes() == fake_image.read_bytes()


def test_failed_spec_blocks_registration(pytester: pytest.Pytester, repo_root: Path, fake_image: Path,
                                         registry: Path) -> None:
    specs = SPECS + "\ndef test_broken(built_image):\n    assert False, 'boom'\n"
    result = run_gate(pytester, repo_root, fake_image, registry, specs=specs)
    result.assert_outcomes(passed=2, failed=1)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*NOT registered: 1 of 3 specs did not pass: test_specs.py::test_broken failed*"])
    assert versions(registry) == []


def test_skipped_spec_blocks_registration(pytester: pytest.Pytester, repo_root: Path, fake_image: Path,
                                          registry: Path) -> None:
    specs = SPECS + "\nimport pytest\n@pytest.mark.skip(reason='later')\ndef test_skipped(built_image):\n    pass\n"
    result = run_gate(pytester, repo_root, fake_image, registry, specs=specs)
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*NOT registered: 1 of 3 specs did not pass: test_specs.py::test_skipped skipped*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED, "a run that promotes nothing for a skipped spec is red"
    assert versions(registry) == []


@pytest.mark.parametrize("narrowing", [["-k", "qcow2"], ["test_specs.py::test_sha_taken"]])
def test_narrowed_run_blocks_registration_unless_allowed(pytester: pytest.Pytester, repo_root: Path,
                                                         fake_image: Path, registry: Path,
                                                         narrowing: list[str]) -> None:
    result = run_gate(pytester, repo_root, fake_image, registry, *narrowing)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*NOT registered: the run was narrowed*--allow-partial*"])
    assert versions(registry) == []
    result = run_gate(pytester, repo_root, fake_image, registry, *narrowing, "--allow-partial")
    result.stdout.fnmatch_lines(["*registered: local generic-dev version 1*"])
    assert versions(registry) == ["1"]


def test_reregistering_same_bytes_is_a_noop(pytester: pytest.Pytester, repo_root: Path, fake_image: Path,
                                            registry: Path) -> None:
    run_gate(pytester, repo_root, fake_image, registry).assert_outcomes(passed=2)
    result = run_gate(pytester, repo_root, fake_image, registry)
    result.stdout.fnmatch_lines(["*already registered: local generic-dev version 1*"])
    assert versions(registry) == ["1"]


def test_no_register_registers_nothing(pytester: pytest.Pytester, repo_root: Path, fake_image: Path,
                                       registry: Path) -> None:
    result = run_gate(pytester, repo_root, fake_image, registry, "--no-register")
    result.assert_outcomes(passed=2)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*NOT registered: registration off (--no-register)*"])
    assert versions(registry) == []


def test_bytes_changed_after_the_specs_are_not_registered(pytester: pytest.Pytester, repo_root: Path,
                                                          fake_image: Path, registry: Path) -> None:
    specs = SPECS + ("\ndef test_zz_tamper(built_image):\n"
                     "    with open(built_image.path, 'ab') as f:\n        f.write(b'x')\n")
    result = run_gate(pytester, repo_root, fake_image, registry, specs=specs)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*NOT registered: registration failed*sha256 changed after the specs ran*"])
    assert versions(registry) == []


def test_junit_report_names_image_and_sha(pytester: pytest.Pytester, repo_root: Path, fake_image: Path,
                                          registry: Path, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    run_gate(pytester, repo_root, fake_image, registry, f"--junitxml={junit}").assert_outcomes(passed=2)
    xml = junit.read_text()
    assert 'name="kickgate_image" value="generic-dev"' in xml
    assert f'name="image_sha256" value="{hashlib.sha256(fake_image.read_bytes()).hexdigest()}"' in xml


def test_artifacts_dir_holds_gate_result(pytester: pytest.Pytester, repo_root: Path, fake_image: Path,
                                         registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    run_gate(pytester, repo_root, fake_image, registry, "--artifacts-dir", str(out)).assert_outcomes(passed=2)
    gate = json.loads((out / "generic-dev" / "gate.json").read_text())
    assert gate["verdict"]["promote"] is True
    assert gate["registered"]["version"] == "1"


def test_two_concurrent_runs_both_land(repo_root: Path, tmp_path: Path, registry: Path) -> None:
    procs = []
    for n in range(2):
        d = tmp_path / f"run{n}"
        d.mkdir()
        img = d / "generic-dev.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), f"{16 + n}M"], check=True)
        (d / "test_specs.py").write_text(SPECS)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(d / "test_specs.py"),
             "--image-path", str(img), "--image", "generic-dev", "--recipes", str(repo_root),
             "--registry-dir", str(registry), "--allow-partial"], cwd=d, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert versions(registry) == ["1", "2"]
    shas = {json.loads((registry / "generic-dev" / v / "record.json").read_text())["sha256"] for v in ("1", "2")}
    assert len(shas) == 2


def test_spec_for_another_family_is_left_out_without_narrowing(pytester: pytest.Pytester, repo_root: Path,
                                                               fake_image: Path, registry: Path) -> None:
    specs = SPECS + ("\nimport pytest\n@pytest.mark.family('rhel')\ndef test_rhel_only(built_image):\n"
                     "    assert False, 'must not run against a Debian image'\n")
    result = run_gate(pytester, repo_root, fake_image, registry, specs=specs)
    result.assert_outcomes(passed=2, deselected=1)
    result.stdout.fnmatch_lines(["*specs 2/2 passed*registered: local generic-dev version 1*"])
