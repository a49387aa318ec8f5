"""CycloneDX SBOM: schema-valid, one component per package with purl, source and licences."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

import builder
from builder.packages import Package, parse_rpm_lines, read_dpkg
from builder.sbom import (
    PROP_BUILD_ID,
    PROP_SOURCE_NAME,
    PROP_SOURCE_VERSION,
    SbomError,
    build_sbom,
    package_licences,
    package_purl,
    sbom_json,
    spdx_expression,
    validate_sbom_json,
)
from conftest import Need

SHA = "3f786850e387550fdab836ed7e6dc881de23001b5f3a5c4e0a6a3e9a2f1c5b7d"
HOST_ADMINDIR = Path("/var/lib/dpkg")

DEB = [
    Package("deb", "bsdutils", "1:2.38.1-5+deb12u3", "amd64", "util-linux", "2.38.1-5+deb12u3",
            ("BSD-3-clause", "GPL-2+", "public-domain")),
    Package("deb", "libc6", "2.36-9+deb12u4", "amd64", "glibc", "2.36-9+deb12u4", ("LGPL-2.1+",)),
    Package("deb", "tzdata", "2024a-0+deb12u1", "all", "tzdata", "2024a-0+deb12u1", None),
]
RPM = parse_rpm_lines([
    "bind-libs 32:9.16.23-18.el9_4.6 x86_64 bind-9.16.23-18.el9_4.6.src.rpm MPL-2.0 AND ISC",
    "bash 0:5.1.8-9.el9 x86_64 bash-5.1.8-9.el9.src.rpm GPLv3+",
    "perl-libs 4:5.32.1-481.el9 x86_64 perl-5.32.1-481.el9.src.rpm GPL+ or Artistic",
])


def valid(text: str) -> None:
    """The library's own validator against the CycloneDX 1.6 JSON schema it ships."""
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text, all_errors=True)
    assert errors is None, [str(e) for e in errors]


def sbom(packages: list[Package] | tuple[Package, ...], **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"image_name": "generic-dev", "image_sha256": SHA, "build_id": "20261202-ab12cd"}
    args.update(kw)
    text = sbom_json(build_sbom(packages, **args))
    valid(text)
    doc: dict[str, Any] = json.loads(text)
    return doc


def components(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["components"]}


def props(c: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["value"] for p in c.get("properties", [])}


def test_purls_follow_the_purl_spec() -> None:
    assert package_purl(DEB[0], distro="bookworm").to_string() == \
        "pkg:deb/debian/bsdutils@1:2.38.1-5%2Bdeb12u3?arch=amd64&distro=bookworm"
    assert package_purl(DEB[2]).to_string() == "pkg:deb/debian/tzdata@2024a-0%2Bdeb12u1?arch=all"
    by = {p.name: p for p in RPM}
    # rpm: the epoch is a qualifier, the version is version-release
    assert package_purl(by["bind-libs"], vendor="rocky", distro="rocky-9").to_string() == \
        "pkg:rpm/rocky/bind-libs@9.16.23-18.el9_4.6?arch=x86_64&distro=rocky-9&epoch=32"
    assert package_purl(by["bash"], vendor="almalinux").to_string() == \
        "pkg:rpm/almalinux/bash@5.1.8-9.el9?arch=x86_64"
    legacy = Package("deb", "bash", "5.2.15-2+b2", "", "bash", "5.2.15-2+b2")
    assert package_purl(legacy, distro="bookworm").to_string() == "pkg:deb/debian/bash@5.2.15-2%2Bb2?distro=bookworm"


def test_rpm_purl_needs_a_vendor() -> None:
    with pytest.raises(SbomError, match=r"bash: no vendor given.*vendor='rocky'"):
        package_purl(RPM[0])


def test_debian_sbom_is_valid_and_complete() -> None:
    when = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    serial = UUID("12345678-1234-5678-1234-567812345678")
    doc = sbom(DEB, distro="bookworm", timestamp=when, serial_number=serial)
    assert (doc["bomFormat"], doc["specVersion"]) == ("CycloneDX", "1.6")
    assert doc["serialNumber"] == f"urn:uuid:{serial}"
    meta = doc["metadata"]
    assert meta["timestamp"].startswith("2026-12-02T10:00:00")
    image = meta["component"]
    assert (image["name"], image["type"]) == ("generic-dev", "operating-system")
    assert image["hashes"] == [{"alg": "SHA-256", "content": SHA}]
    assert props(image) == {PROP_BUILD_ID: "20261202-ab12cd"}
    assert {"name": "kickgate", "version": builder.__version__}.items() <= meta["tools"]["components"][0].items()

    comps = components(doc)
    assert set(comps) == {"bsdutils", "libc6", "tzdata"}
    bsd = comps["bsdutils"]
    assert bsd["version"] == "1:2.38.1-5+deb12u3"
    assert bsd["purl"] == "pkg:deb/debian/bsdutils@1:2.38.1-5%2Bdeb12u3?arch=amd64&distro=bookworm"
    assert bsd["type"] == "library"
    assert props(bsd) == {PROP_SOURCE_NAME: "util-linux", PROP_SOURCE_VERSION: "2.38.1-5+deb12u3"}
    assert [entry["license"] for entry in bsd["licenses"]] == [
        {"id": "BSD-3-Clause", "acknowledgement": "declared"},  # an SPDX id in other case: the id
        {"name": "GPL-2+", "acknowledgement": "declared"},      # DEP-5 spelling kept as written
        {"name": "public-domain", "acknowledgement": "declared"},
    ]
    assert "licenses" not in comps["tzdata"]                   # unknown stays unknown
    # The image depends on every package.
    deps = {d["ref"]: d.get("dependsOn", []) for d in doc["dependencies"]}
    assert sorted(deps[image["bom-ref"]]) == sorted(c["bom-ref"] for c in doc["components"])


def test_rpm_sbom_licences_and_epochs() -> None:
    doc = sbom(RPM, vendor="rocky", distro="rocky-9")
    comps = components(doc)
    assert comps["bind-libs"]["licenses"] == [{"expression": "MPL-2.0 AND ISC", "acknowledgement": "declared"}]
    assert comps["bash"]["licenses"] == [{"license": {"name": "GPLv3+", "acknowledgement": "declared"}}]
    assert comps["perl-libs"]["purl"] == "pkg:rpm/rocky/perl-libs@5.32.1-481.el9?arch=x86_64&distro=rocky-9&epoch=4"
    assert comps["perl-libs"]["version"] == "4:5.32.1-481.el9"
    assert props(comps["perl-libs"]) == {PROP_SOURCE_NAME: "perl", PROP_SOURCE_VERSION: "5.32.1-481.el9"}


@pytest.mark.parametrize(("text", "expected"), [
    ("MIT", "MIT"),
    ("MIT AND BSD-3-Clause", "MIT AND BSD-3-Clause"),
    ("(GPL-2.0-or-later WITH Bison-exception-2.2) OR MIT", "(GPL-2.0-or-later WITH Bison-exception-2.2) OR MIT"),
    ("GPL-2.0+", "GPL-2.0+"),
    ("GPL", None),                # an alias license-expression would read as GPL-1.0-or-later
    ("GPLv2+ and LGPLv2+", None),  # Fedora's former short names
    ("GPL+ or Artistic", None),
    ("MIT AND", None),
])
def test_spdx_expressions_are_strict(text: str, expected: str | None) -> None:
    assert spdx_expression(text) == expected


def test_debian_synopsis_is_never_read_as_an_expression() -> None:
    # DEP-5 "or" and "GPL-2+" look like SPDX but mean other things: kept as a name.
    pkg = Package("deb", "x", "1", "amd64", "x", "1", ("GPL-2+ or Artistic", "MIT"))
    out = [(getattr(lic, "name", None), getattr(lic, "id", None)) for lic in package_licences(pkg)]
    assert out == [("GPL-2+ or Artistic", None), (None, "MIT")]


def test_metadata_errors_name_the_field() -> None:
    with pytest.raises(SbomError, match="image_sha256 'abc' is not 64 lowercase hex"):
        build_sbom(DEB, image_name="generic-dev", image_sha256="abc", build_id="b")
    with pytest.raises(SbomError, match="build_id is empty"):
        build_sbom(DEB, image_name="generic-dev", image_sha256=SHA, build_id="")


def test_validate_rejects_a_broken_document() -> None:
    text = sbom_json(build_sbom(DEB, image_name="generic-dev", image_sha256=SHA, build_id="b"))
    validate_sbom_json(text)
    doc = json.loads(text)
    doc["metadata"]["component"]["hashes"][0]["content"] = "not-a-sha"
    with pytest.raises(SbomError, match=r"CycloneDX 1\.6 JSON schema"):
        validate_sbom_json(json.dumps(doc))


def test_sbom_of_the_hosts_real_package_list_is_valid(need: Need) -> None:
    need.file(HOST_ADMINDIR / "status", "dpkg (the test needs a Debian host)")
    pkgs = read_dpkg(HOST_ADMINDIR)
    doc = sbom(pkgs, distro="bookworm")
    assert len(doc["components"]) == len(pkgs)
    purls = [c["purl"] for c in doc["components"]]
    assert len(set(purls)) == len(purls)
    assert all(p.startswith("pkg:deb/debian/") and "arch=" in p for p in purls)
