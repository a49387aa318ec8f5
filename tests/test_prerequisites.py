"""Missing prerequisites: a skip on a developer's machine, a failure naming what to install in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Need


def test_missing_prerequisite_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"there not on PATH \(install the Debian package genisoimage\)"):
        Need().tool("isoinfo-that-is-not-there", "genisoimage")
    with pytest.raises(pytest.fail.Exception, match="install libvirt-python"):
        Need().module("no_such_module_here", "libvirt-python")
    with pytest.raises(pytest.fail.Exception, match=r"/nonexistent/status missing \(install the Debian package dpkg\)"):
        Need().file(Path("/nonexistent/status"), "dpkg")


def test_missing_prerequisite_skips_without_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="install the Debian package genisoimage"):
        Need().tool("isoinfo-that-is-not-there", "genisoimage")


def test_present_prerequisites_pass_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    Need().tool("sh", "dash")
    Need().module("json", "python3")
    Need().file(Path("/"), "base-files")
    Need().that(None)
