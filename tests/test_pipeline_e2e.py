"""The main job as a user runs it: `pytest specs/` builds, verifies with real guests, and gates.

These run the real pipeline in a subprocess: real QEMU guests under libvirt, real testinfra over
SSH. They share the build cache with the other slow tests, so the reference image is built once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from onesim import OneSim, SimDatastore, SimUser

pytestmark = pytest.mark.slow

PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]


def run_specs(repo_root: Path, cache: Path, *args: str, env: dict[str, str] | None = None,
              timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "KICKGATE_CACHE_DIR": str(cache), **(env or {})}
    full_env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([*PYTEST, "specs/", *args], cwd=repo_root, env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def junit_outcomes(path: Path, image: str | None = None) -> dict[str, tuple[str, str]]:
    """test name (without the image parameter) → (outcome, message); only image's specs if given."""
    out: dict[str, tuple[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name, _, param = case.get("name", "").partition("[")
        if image is not None and param.rstrip("]") != image:
            continue
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, message = tag, (el.get("message") or "") + "\n" + (el.text or "")
        out[name] = (outcome, message)
    return out


def test_readme_main_job_registers_the_reference_image(repo_root: Path, shared_cache_dir: Path,
                                                       tmp_path: Path) -> None:
    """README's first command (after ci/setup): `.venv/bin/pytest specs/` on the embedded defaults."""
    registry = tmp_path / "registry"
    artifacts = tmp_path / "artifacts"
    res = run_specs(repo_root, shared_cache_dir, "--artifacts-dir", str(artifacts),
                    env={"KICKGATE_REGISTRY_DIR": str(registry)})
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "registered: local generic-dev version 1" in res.stdout
    record = json.loads((registry / "generic-dev" / "latest" / "record.json").read_text())
    attrs = dict(record["attributes"])
    build = json.loads((artifacts / "generic-dev" / "build-record.json").read_text())
    assert record["sha256"] == attrs["SHA256"] == build["image_sha256"]
    assert attrs["BUILD_ID"] == build["build_id"]
    passed, total = attrs["SPECS"].split(" ", 1)[0].split("/")
    assert passed == total and int(total) >= 20
    assert ", GitRev: " in attrs["DESCRIPTION"] and attrs["DESCRIPTION"].split("Source: ")[1].startswith("generic-dev")
    stored = registry / "generic-dev" / "latest" / "generic-dev.qcow2"
    assert stored.stat().st_size == record["size"]
    gate = json.loads((artifacts / "generic-dev" / "gate.json").read_text())
    assert gate["verdict"]["promote"] is True
    listing = subprocess.run([sys.executable, "-m", "builder.cli", "images", "--registry-dir", str(registry)],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    assert "generic-dev\tversion 1" in listing


def test_registers_in_opennebula(repo_root: Path, shared_cache_dir: Path, tmp_path: Path) -> None:
    """`pytest specs/ --registry opennebula` against a stand-in oned, with unmodified pyone.

    The OpenNebula path needs one verified image, not every spec: one image, the boot spec and
    --allow-partial (a narrowed run registers only with it). The README job verifies everything.
    """
    publish = tmp_path / "publish"
    auth = tmp_path / "one_auth"
    auth.write_text("kick:e2e-Secret-pw\n")
    users = [SimUser("oneadmin", "onepass", 0, 0, "oneadmin"), SimUser("kick", "e2e-Secret-pw", 2, 1, "users")]
    dss = [SimDatastore(0, "system", "SYSTEM"), SimDatastore(1, "default", "IMAGE", safe_dirs=[str(publish)])]
    with OneSim(users=users, datastores=dss, copy_delay=0.5) as sim:
        res = run_specs(repo_root, shared_cache_dir, "--image", "generic-dev", "--allow-partial",
                        "-k", "test_boot",
                        "--registry", "opennebula", "--one-datastore", "default",
                        "--one-publish-dir", str(publish),
                        env={"ONE_XMLRPC": sim.endpoint, "ONE_AUTH": str(auth)})
        assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
        assert "e2e-Secret-pw" not in res.stdout + res.stderr, "the OpenNebula password reached the output"
        images = sim.find_images("generic-dev")
        assert len(images) == 1
        image = images[0]
        assert image.state == 1, f"image not READY: state {image.state}"
        assert image.tget("SHA256") and len(image.tget("SHA256") or "") == 64
        assert "Source: generic-dev, GitRev: " in (image.tget("DESCRIPTION") or "")
        listing = subprocess.run([sys.executable, "-m", "builder.cli", "images", "--registry", "opennebula"],
                                 capture_output=True, text=True, timeout=60, check=False,
                                 env={**os.environ, "ONE_XMLRPC": sim.endpoint, "ONE_AUTH": str(auth)})
        assert listing.returncode == 0, listing.stderr
        assert "generic-dev" in listing.stdout


def make_variant(repo_root: Path, root: Path, name: str, script: str) -> None:
    """A copy of generic-dev whose last node script breaks it on purpose."""
    if not (root / "scripts").exists():
        shutil.copytree(repo_root / "scripts", root / "scripts")
    folder = root / "images" / name
    shutil.copytree(repo_root / "images" / "generic-dev", folder)
    toml = folder / "image.toml"
    toml.write_text(toml.read_text().replace('name = "generic-dev"', f'name = "{name}"')
                    .replace('NAME = "generic-dev"', f'NAME = "{name}"')
                    .replace('node = ["sudoers.sh", "motd.sh"]', 'node = ["sudoers.sh", "motd.sh", "break.sh"]'))
    (folder / "scripts" / "node" / "break.sh").write_text(script)
    (folder / "scripts" / "node" / "break.sh").chmod(0o755)
