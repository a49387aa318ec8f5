"""What an image is made of travels with its registration: package manifest, SBOM, package diff."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from builder.build import Artifact, BuildRecord
from builder.errors import KickgateError
from builder.fsutil import sha256_file
from builder.gate import SpecResults
from builder.inventory import DIFF_ATTR, PACKAGES_ATTR, SBOM_ATTR, SBOM_FILE, from_attributes, stored_sbom
from builder.packages import Package
from builder.pipeline import ImageState, ImageUnderTest
from builder.recipe import RecipeBook
from builder.registration import inventory_of, register_image
from builder.registry.local import LocalRegistry
from builder.sbom import validate_sbom_json

REPO = Path(__file__).resolve().parent.parent


def deb(name: str, version: str) -> Package:
    return Package("deb", name, version, "amd64", name, version, ("GPL-2+",))


V1 = (deb("bash", "5.2.15-2+b2"), deb("curl", "7.88.1-10"), deb("zstd", "1.5.4+dfsg2-5"))
V2 = (deb("bash", "5.2.15-2+b7"), deb("curl", "7.88.1-10"), deb("jq", "1.6-2.1"))


SIZES = {"one": "16M", "two": "17M"}  # other bytes: a new version, not the same one again


def image(tmp_path: Path, tag: str, packages: tuple[Package, ...]) -> ImageUnderTest:
    disk = tmp_path / tag / "generic-dev.qcow2"
    disk.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), SIZES[tag]], check=True)
    digest = sha256_file(disk)
    record = BuildRecord(
        recipe="generic-dev", method="bootstrap", family="debian", recipe_hash="a" * 64, cache_key="b" * 64,
        build_id=f"generic-dev-{tag}", built_at="2026-12-01T10:00:00+00:00", kickgate_version="0",
        git_repo="kickgate", git_revision="c" * 40, git_dirty=False, tools={}, timings={}, total_seconds=1.0,
        image_file=disk.name, image_format="qcow2", image_sha256=digest, image_size=disk.stat().st_size,
        virtual_size_mib=16, serial_log="serial.log", build_mac="52:54:00:00:00:01", domain_type="qemu",
        packages=packages, extra={"suite": "bookworm"})
    recipe = RecipeBook(REPO).load("generic-dev")
    return ImageUnderTest(name="generic-dev", recipe=recipe, path=disk, format="qcow2", sha256=digest,
                          size=disk.stat().st_size, record=record,
                          artifact=Artifact(dir=disk.parent, record=record, cached=False, seconds=1.0),
                          cached=False, seconds=1.0)


def passed() -> SpecResults:
    results = SpecResults()
    results.record("specs/test_swap.py::test_no_swap[generic-dev]", "call", "passed", False)
    return results


def test_the_sbom_is_deterministic_valid_and_checked(tmp_path: Path) -> None:
    inv = inventory_of(image(tmp_path, "one", V1))
    assert inv is not None
    text = inv.sbom()
    assert text == inv.sbom(), "two SBOMs of the same image differ: its checksum could not be verified"
    validate_sbom_json(text)
    purls = {c["purl"] for c in json.loads(text)["components"]}
    assert "pkg:deb/debian/bash@5.2.15-2%2Bb2?arch=amd64&distro=bookworm" in purls
    attrs = dict(inv.attributes())
    attrs.update(NAME=inv.name, SHA256=inv.sha256, BUILD_ID=inv.build_id, BUILT_AT=inv.built_at)
    assert stored_sbom(attrs, "generic-dev v1") == text
    assert from_attributes(attrs, "x").packages == tuple(sorted(V1, key=lambda p: p.name))
    tampered = {**attrs, "BUILD_ID": "generic-dev-forged"}
    with pytest.raises(KickgateError, match="changed since registration"):
        stored_sbom(tampered, "generic-dev v1")


def test_registration_stores_manifest_sbom_and_the_diff_to_the_last_version(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    first = ImageState(image=image(tmp_path, "one", V1), results=passed())
    reg1 = register_image(first, registry)
    assert first.package_diff is None and DIFF_ATTR not in reg1.attributes  # nothing to compare with yet
    assert reg1.attributes[PACKAGES_ATTR] and len(reg1.attributes[SBOM_ATTR]) == 64
    stored = Path(reg1.location).parent / SBOM_FILE
    assert sha256_file(stored) == reg1.attributes[SBOM_ATTR]

    second = ImageState(image=image(tmp_path, "two", V2), results=passed())
    reg2 = register_image(second, registry)
    assert second.package_diff_line == "+1 -1 ~1 vs generic-dev v1"
    assert reg2.attributes[DIFF_ATTR] == "+1 -1 ~1 vs generic-dev v1"
    diff = second.package_diff
    assert diff is not None
    assert [p.name for p in diff.added] == ["jq"] and [p.name for p in diff.removed] == ["zstd"]
    assert [(c.name, c.old.version, c.new.version) for c in diff.upgraded] == [("bash", "5.2.15-2+b2", "5.2.15-2+b7")]


def test_kickgate_diff_and_sbom_read_the_registry(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    register_image(ImageState(image=image(tmp_path, "one", V1), results=passed()), registry)
    register_image(ImageState(image=image(tmp_path, "two", V2), results=passed()), registry)

    def cli(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "builder.cli", *args, "--registry-dir", str(registry.root)],
                             capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr
        return res.stdout

    text = cli("diff", "generic-dev@1", "generic-dev@2")
    assert text.startswith("generic-dev version 2: packages +1 -1 ~1 vs generic-dev version 1")
    assert "  + jq 1.6-2.1" in text and "  - zstd 1.5.4+dfsg2-5" in text
    assert "  ^ bash 5.2.15-2+b2 -> 5.2.15-2+b7" in text
    sbom = cli("sbom", "generic-dev@1")
    assert json.loads(sbom)["metadata"]["component"]["hashes"][0]["content"] == registry.get("generic-dev", "1").sha256
    assert sbom == (registry.root / "generic-dev" / "1" / SBOM_FILE).read_text()


def test_a_prebuilt_image_has_no_inventory(tmp_path: Path) -> None:
    img = replace(image(tmp_path, "one", V1), record=None, artifact=None)
    assert inventory_of(img) is None
