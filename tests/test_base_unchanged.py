""""The base image is never written": an instance whose boot writes to the base image fails the run.

The instance is a stand-in that writes to the file it was given (what a misconfigured overlay would
let a guest do), so the check between boot and teardown runs without a guest.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.errors import KickgateError
from builder.fsutil import sha256_file
from builder.options import RunOptions
from builder.pipeline import ImageUnderTest, Pipeline

FAKE_INSTANCE = '''
from pathlib import Path


class WritingInstance:
    """Boots by appending to the base image it was handed, instead of to an overlay."""

    def __init__(self, base: Path, label: str, write: bool) -> None:
        self.base, self.write = base, write
        self.name = f"kg-{label}-fake"
        self.failed = self.kept = False
        self.boot_seconds = 0.5
        self.on_phase = None
        self.serial_log = None
        self.workdir = None

    def __enter__(self):
        if self.write:
            with open(self.base, "ab") as f:
                f.write(b"written through")
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        pass

    def ssh_command(self) -> str:
        return f"ssh {self.name}"
'''


def writing_instance(write: bool) -> type:
    namespace: dict[str, Any] = {"__name__": "fake_instance"}
    exec(compile(FAKE_INSTANCE, "fake_instance", "exec"), namespace)  # the same class the pytester run uses
    cls: type = namespace["WritingInstance"]
    return cls


@pytest.fixture
def image(tmp_path: Path) -> ImageUnderTest:
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return ImageUnderTest(name="generic-dev", recipe=None, path=path, format="qcow2", sha256=sha256_file(path),
                          size=path.stat().st_size, record=None, artifact=None, cached=True, seconds=0.0)


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    with Pipeline(RunOptions(cache_dir=tmp_path / "cache")) as p:
        yield p


@pytest.mark.parametrize("primary", [True, False], ids=["primary", "extra"])
def test_a_written_base_image_is_an_error_when_the_instance_ends(pipeline: Pipeline, image: ImageUnderTest,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 primary: bool) -> None:
    cls = writing_instance(write=True)
    monkeypatch.setattr(pipeline, "new_instance", lambda img, label, **_: cls(img.path, label, True))
    with pytest.raises(KickgateError, match=r"changed while instances ran.*the base image must never be written"), \
            pipeline.running_instance(image, label="generic-dev", primary=primary) as inst:
        assert isinstance(inst, cls)
    assert sha256_file(image.path) != image.sha256


def test_an_untouched_base_image_passes(pipeline: Pipeline, image: ImageUnderTest,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cls = writing_instance(write=False)
    monkeypatch.setattr(pipeline, "new_instance", lambda img, label, **_: cls(img.path, label, False))
    with pipeline.running_instance(image, label="generic-dev", primary=True):
        pass
    assert sha256_file(image.path) == image.sha256


def test_the_write_is_reported_even_when_a_spec_failed(pipeline: Pipeline, image: ImageUnderTest,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cls = writing_instance(write=True)
    monkeypatch.setattr(pipeline, "new_instance", lambda img, label, **_: cls(img.path, label, True))
    with pytest.raises(KickgateError, match="the base image must never be written"), \
            pipeline.running_instance(image, label="generic-dev", primary=True):
        raise AssertionError("a spec failed")


def test_a_run_whose_instance_wrote_the_base_is_red_and_registers_nothing(
        pytester: pytest.Pytester, repo_root: Path, image: ImageUnderTest, tmp_path: Path) -> None:
    pytester.makeconftest(FAKE_INSTANCE + '''
from builder.pipeline import Pipeline

Pipeline.new_instance = lambda self, img, label, **_: WritingInstance(img.path, label, True)
''')
    pytester.makepyfile(test_specs="def test_uses_an_instance(instance):\n    assert instance.name\n")
    registry = tmp_path / "registry"
    result = pytester.runpytest_subprocess("--rootdir", str(pytester.path), "--image-path", str(image.path),
                                           "--image", "generic-dev", "--recipes", str(repo_root),
                                           "--registry-dir", str(registry))
    result.assert_outcomes(passed=1, errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_uses_an_instance*",
                                 "*changed while instances ran*the base image must never be written*"])
    result.stdout.fnmatch_lines(["*NOT registered: 1 of 1 specs did not pass: test_specs.py::test_uses_an_instance "
                                 "error*"])
    assert not (registry / "generic-dev").exists() or not any(
        p.name.isdigit() for p in (registry / "generic-dev").iterdir())


