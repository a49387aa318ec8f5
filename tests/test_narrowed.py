"""Every narrowed run blocks registration: whatever leaves a spec out, the gate says so and registers nothing.

Like test_plugin_gate, these verify a tiny prebuilt qcow2 with specs that need no guest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SPECS = """
def test_image_is_qcow2(built_image):
    assert built_image.format == "qcow2"
"""
MORE_SPECS = """
def test_sha_taken(built_image):
    assert len(built_image.sha256) == 64

def test_size_known(built_image):
    assert built_image.size > 0
"""


def run_gate(pytester: pytest.Pytester, repo_root: Path, image: Path, registry: Path, *args: str,
             more: str = MORE_SPECS) -> pytest.RunResult:
    """Two spec modules in specs/, as the repository lays them out."""
    write_specs(pytester, more)
    return pytester.runpytest_subprocess("--rootdir", str(pytester.path), "--image-path", str(image),
                                         "--image", "generic-dev", "--recipes", str(repo_root),
                                         "--registry-dir", str(registry), *args)


def write_specs(pytester: pytest.Pytester, more: str = MORE_SPECS) -> None:
    specs = pytester.mkdir("specs")
    (specs / "test_a.py").write_text(SPECS)
    (specs / "test_b.py").write_text(more)


def registered(registry: Path) -> bool:
    return (registry / "generic-dev").is_dir() and any(p.name.isdigit() for p in (registry / "generic-dev").iterdir())


def test_full_run_registers(pytester: pytest.Pytester, repo_root: Path, fake_image: Path, tmp_path: Path) -> None:
    """The baseline the other cases narrow: both modules, every spec, registered."""
    result = run_gate(pytester, repo_root, fake_image, tmp_path / "reg", "specs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*registered: local generic-dev version 1*"])
    assert registered(tmp_path / "reg")


@pytest.mark.parametrize(("args", "reason"), [
    (["--ignore", "specs/test_b.py"], "*the run was narrowed (--ignore specs/test_b.py; "
                                      "spec files not collected: specs/test_b.py)*"),
    (["--ignore-glob", "*/test_b*"], "*the run was narrowed (--ignore-glob */test_b*; "
                                     "spec files not collected: specs/test_b.py)*"),
    (["--deselect", "specs/test_b.py::test_sha_taken"], "*the run was narrowed (--deselect specs/test_b.py::"
                                                        "test_sha_taken; 1 specs deselected)*"),
], ids=["ignore", "ignore-glob", "deselect"])
def test_leaving_specs_out_blocks_registration(pytester: pytest.Pytester, repo_root: Path, fake_image: Path,
                                               tmp_path: Path, args: list[str], reason: str) -> None:
    result = run_gate(pytester, repo_root, fake_image, tmp_path / "reg", "specs", *args)
    assert result.ret == 0, "the specs that ran passed: only the gate may refuse"
    result.stdout.fnmatch_lines([reason + "--allow-partial*"])
    assert not registered(tmp_path / "reg")


def test_spec_file_that_is_never_collected_blocks_registration(pytester: pytest.Pytester, repo_root: Path,
                                                               fake_image: Path, tmp_path: Path) -> None:
    """A module outside what pytest was pointed at (one folder of specs, collected file by file)."""
    write_specs(pytester)
    # conftest collect_ignore is the quiet cousin of --ignore: no option on the command line shows it.
    (pytester.path / "specs" / "conftest.py").write_text("collect_ignore = ['test_b.py']\n")
    result = pytester.runpytest_subprocess("--rootdir", str(pytester.path), "--image-path", str(fake_image),
                                           "--image", "generic-dev",
                                           "--recipes", str(repo_root), "--registry-dir", str(tmp_path / "reg"),
                                           "specs")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*NOT registered: the run was narrowed (spec files not collected: "
                                 "specs/test_b.py)*"])
    assert not registered(tmp_path / "reg")


BROKEN = "import no_such_module_here\n\ndef test_never(built_image):\n    pass\n"


def test_collection_error_blocks_registration(pytester: pytest.Pytester, repo_root: Path, fake_image: Path,
                                              tmp_path: Path) -> None:
    result = run_gate(pytester, repo_root, fake_image, tmp_path / "reg", "specs", more=BROKEN)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*interrupted (1 error during collection)*nothing registered*"])
    assert not registered(tmp_path / "reg")


def test_continue_on_collection_errors_still_blocks_even_with_allow_partial(pytester: pytest.Pytester,
                                                                            repo_root: Path, fake_image: Path,
                                                                            tmp_path: Path) -> None:
    result = run_gate(pytester, repo_root, fake_image, tmp_path / "reg", "specs",
                      "--continue-on-collection-errors", "--allow-partial", more=BROKEN)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*NOT registered: 1 of 2 specs did not pass: specs/test_b.py error*"])
    assert not registered(tmp_path / "reg")


PLUGIN = """
import pytest

class ExtraSpec(pytest.Item):
    def runtest(self):
        pass

class ExtraSpecs(pytest.File):
    def collect(self):
        yield ExtraSpec.from_parent(self, name="extra")

def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".spec":
        return ExtraSpecs.from_parent(parent, path=file_path)
"""


def test_disabling_a_plugin_blocks_registration(pytester: pytest.Pytester, repo_root: Path, fake_image: Path,
                                                tmp_path: Path) -> None:
    """A plugin may bring specs (or their fixtures): without it they silently are not there."""
    pytester.makepyfile(specplugin=PLUGIN)
    result = run_gate(pytester, repo_root, fake_image, tmp_path / "reg", "specs", "-p", "no:specplugin")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*NOT registered: the run was narrowed (-p no:specplugin)*"])
    assert not registered(tmp_path / "reg")


def test_disabling_a_plugin_that_brings_no_specs_does_not_narrow(pytester: pytest.Pytester, repo_root: Path,
                                                                 fake_image: Path, tmp_path: Path) -> None:
    result = run_gate(pytester, repo_root, fake_image, tmp_path / "reg", "specs", "-p", "no:cacheprovider",
                      "-p", "no:warnings")
    result.stdout.fnmatch_lines(["*registered: local generic-dev version 1*"])
    assert registered(tmp_path / "reg")
