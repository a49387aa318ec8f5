"""What a verified image is made of, stored with its registration: package manifest, SBOM, package diff.

Registries keep this in the image's attributes, where every registry (and an OpenNebula user with
`oneimage show`) can read it back:

- KICKGATE_PACKAGES: the package list as a compressed manifest (builder.packages), a few KiB for
  a server image, far below oned's limits (see builder.packages.MAX_MANIFEST_BYTES);
- KICKGATE_DISTRO: the purl namespace and distribution the SBOM names (``debian/bookworm``);
- KICKGATE_SBOM_SHA256: the sha256 of the image's CycloneDX SBOM. The SBOM is deterministic
  (timestamp = the build time, serial number derived from the image's sha256), so it can be made
  again from the attributes alone and checked against this checksum; the local registry also
  keeps the file beside the image;
- KICKGATE_PACKAGE_DIFF: the one-line difference to the version registered before it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from builder.errors import KickgateError
from builder.packages import Package, PackageDiff, decode_manifest, diff_packages, encode_manifest, summary_line
from builder.sbom import build_sbom, sbom_json

PACKAGES_ATTR = "KICKGATE_PACKAGES"
DISTRO_ATTR = "KICKGATE_DISTRO"
SBOM_ATTR = "KICKGATE_SBOM_SHA256"
DIFF_ATTR = "KICKGATE_PACKAGE_DIFF"
SBOM_FILE = "sbom.cdx.json"

# Serial numbers of kickgate's SBOMs: a UUID derived from the image's sha256 in this namespace.
_SBOM_NAMESPACE = uuid.UUID("6f1c2b0e-3d0e-4b8e-9a57-6b1f7c0c2a11")


@dataclass(frozen=True)
class Inventory:
    """The package facts of one image, as stored with it."""

    name: str  # the image's registered NAME
    sha256: str
    build_id: str
    built_at: str  # ISO 8601
    packages: tuple[Package, ...]
    vendor: str  # purl namespace: debian, rocky, almalinux, …
    distro: str  # purl distro qualifier: bookworm, rocky-9, …

    def sbom(self) -> str:
        """The CycloneDX JSON SBOM; the same inputs always give the same bytes."""
        bom = build_sbom(self.packages, image_name=self.name, image_sha256=self.sha256, build_id=self.build_id,
                         vendor=self.vendor, distro=self.distro,
                         timestamp=dt.datetime.fromisoformat(self.built_at),
                         serial_number=uuid.uuid5(_SBOM_NAMESPACE, self.sha256))
        return sbom_json(bom)

    def attributes(self) -> list[tuple[str, str]]:
        return [(PACKAGES_ATTR, encode_manifest(self.packages)), (DISTRO_ATTR, f"{self.vendor}/{self.distro}"),
                (SBOM_ATTR, hashlib.sha256(self.sbom().encode()).hexdigest())]


def from_attributes(attributes: Mapping[str, str], what: str) -> Inventory:
    """The inventory a registration stored; KickgateError naming what if it has none."""
    manifest = attributes.get(PACKAGES_ATTR)
    if not manifest:
        raise KickgateError(f"{what} carries no {PACKAGES_ATTR} attribute: it was registered without a package "
                            "list (a prebuilt image, or by a kickgate before package manifests)")
    vendor, _, distro = attributes.get(DISTRO_ATTR, "/").partition("/")
    return Inventory(name=attributes.get("NAME", ""), sha256=attributes.get("SHA256", ""),
                     build_id=attributes.get("BUILD_ID", ""), built_at=attributes.get("BUILT_AT", ""),
                     packages=decode_manifest(manifest), vendor=vendor, distro=distro)


def stored_sbom(attributes: Mapping[str, str], what: str) -> str:
    """The SBOM of a registered image, made again from its attributes and checked against its checksum."""
    text = from_attributes(attributes, what).sbom()
    expected = attributes.get(SBOM_ATTR, "")
    actual = hashlib.sha256(text.encode()).hexdigest()
    if actual != expected:
        raise KickgateError(f"{what}: the SBOM made from its package manifest has sha256 {actual}, but the image "
                            f"records {SBOM_ATTR}={expected or '(none)'}: its attributes were changed since "
                            "registration")
    return text


def diff_against(packages: tuple[Package, ...], previous: Mapping[str, str], label: str) -> tuple[PackageDiff, str]:
    """(the difference from a registered version to packages, its one-line summary)."""
    old = from_attributes(previous, label).packages
    diff = diff_packages(old, packages)
    return diff, summary_line(diff, label)
