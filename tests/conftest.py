"""Shared fixtures for kickgate's own tests. Slow end-to-end tests share one build cache."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import hypervisor

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


class Need:
    """A test's prerequisites. Missing, the test is skipped on a developer's machine, but fails
    when CI is set: ci/setup installs every one of them, so a skip there would hide a broken setup."""

    def that(self, missing: str | None) -> None:
        """missing: what is absent and what to install, or None when all is there."""
        if missing is None:
            return
        if os.environ.get("CI"):
            pytest.fail(f"prerequisite missing (CI is set, so this fails instead of skipping): {missing}",
                        pytrace=False)
        pytest.skip(f"prerequisite missing: {missing}")

    def tool(self, name: str, package: str) -> None:
        self.that(None if shutil.which(name) else f"{name} not on PATH (install the Debian package {package})")

    def module(self, name: str, install: str) -> None:
        self.that(None if importlib.util.find_spec(name) else f"Python module {name} missing (install {install})")

    def file(self, path: Path, package: str) -> None:
        self.that(None if path.exists() else f"{path} missing (install the Debian package {package})")


@pytest.fixture(scope="session")
def need() -> Need:
    return Need()


@pytest.fixture(scope="session")
def shared_cache_dir() -> Path:
    """One build cache for every slow test of the run (and across runs on the same machine)."""
    path = Path(os.environ.get("KICKGATE_TEST_CACHE", REPO / ".kickgate" / "test-cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _guests() -> set[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True, check=False).stdout
    return {line.split(None, 1)[0] for line in out.splitlines() if "guest=kg-" in line}


def _tmp_leftovers() -> set[str]:
    # This process's own libvirt embed root lives until the process exits, by design.
    own = hypervisor._embed_root.name if hypervisor._embed_root is not None else None
    return {p.name for p in Path("/tmp").iterdir()
            if p.name.startswith(("kg-virt-", "kg-inst-", "kg-probe-", "kg-mut-")) and p.name != own}


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Slow tests must leave no QEMU guest and no temp dir behind, whatever happened."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    guests, tmp = _guests(), _tmp_leftovers()
    yield
    leaked = _guests() - guests
    assert not leaked, f"QEMU guests left running: {leaked}"
    left = _tmp_leftovers() - tmp
    assert not left, f"temporary directories left in /tmp: {left}"


@pytest.fixture
def fake_image(tmp_path: Path) -> Path:
    """A tiny real qcow2 named like the reference image, for runs whose specs need no guest."""
    path = tmp_path / "img" / "generic-dev.qcow2"
    path.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path
