"""A CycloneDX 1.6 SBOM of an image, built with cyclonedx-python-lib.

One ``library`` component per installed package, identified by its purl
(``pkg:deb/debian/<name>@<version>?arch=<arch>&distro=<suite>`` or
``pkg:rpm/<vendor>/<name>@<version>-<release>?arch=<arch>&distro=<distro>&epoch=<n>``),
with its source package as properties and its licences where the packager declared them.
The BOM's metadata names the image (name, sha256 of the disk image, build id) as an
``operating-system`` component that depends on every package, and kickgate as the tool.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from datetime import datetime
from uuid import UUID

from cyclonedx import spdx
from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import DisjunctiveLicense, LicenseAcknowledgement, LicenseExpression
from cyclonedx.model.tool import ToolRepository
from cyclonedx.output.json import JsonV1Dot6
from cyclonedx.schema import SchemaVersion
from packageurl import PackageURL

from builder import __version__
from builder.errors import KickgateError
from builder.packages import Package

log = logging.getLogger(__name__)

SCHEMA_VERSION = SchemaVersion.V1_6
# Property names, in kickgate's own namespace (CycloneDX has no standard one for these).
PROP_SOURCE_NAME = "kickgate:package:source_name"
PROP_SOURCE_VERSION = "kickgate:package:source_version"
PROP_BUILD_ID = "kickgate:image:build_id"

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SPDX_OPERATORS = frozenset({"AND", "OR", "WITH", "and", "or", "with"})
_SPDX_TOKEN_RE = re.compile(r"[()]|[^\s()]+")


class SbomError(KickgateError):
    """An SBOM could not be built or does not validate against its schema."""


def package_purl(pkg: Package, *, vendor: str | None = None, distro: str | None = None) -> PackageURL:
    """The package URL of one package.

    Debian: namespace ``vendor`` (default ``debian``), the full version with any epoch.
    RPM: namespace ``vendor`` (required: ``rocky``, ``almalinux``, ``redhat``, ``fedora``…),
    version-release, and a non-zero epoch as the ``epoch`` qualifier, as the purl spec asks.
    ``distro`` (``bookworm``, ``rocky-9``) and a known arch become qualifiers.
    """
    qualifiers: dict[str, str] = {}
    if pkg.arch:
        qualifiers["arch"] = pkg.arch
    if distro:
        qualifiers["distro"] = distro
    if pkg.kind == "deb":
        return PackageURL(type="deb", namespace=vendor or "debian", name=pkg.name, version=pkg.version,
                          qualifiers=qualifiers)
    if not vendor:
        raise SbomError(f"purl of rpm package {pkg.name}: no vendor given; pass the distribution's "
                        "purl namespace (e.g. vendor='rocky')")
    epoch, sep, rest = pkg.version.partition(":")
    version = pkg.version
    if sep and epoch.isdigit():
        version = rest
        if int(epoch):
            qualifiers["epoch"] = str(int(epoch))
    return PackageURL(type="rpm", namespace=vendor, name=pkg.name, version=version, qualifiers=qualifiers)


def spdx_expression(value: str) -> str | None:
    """``value`` if it is an SPDX licence expression made only of SPDX identifiers, else None.

    Stricter than a parse: license-expression also accepts aliases ("GPL" as GPL-1.0-or-later),
    which would put words in a packager's mouth.
    """
    if not spdx.is_expression(value):
        return None
    after_with = False
    for token in _SPDX_TOKEN_RE.findall(value):
        if token in ("(", ")"):
            continue
        if token in _SPDX_OPERATORS:
            after_with = token.upper() == "WITH"
            continue
        ident = token if after_with or not token.endswith("+") else token[:-1]
        if spdx.fixup_id(ident) is None:
            return None
        after_with = False
    return value


def package_licences(pkg: Package) -> list[DisjunctiveLicense | LicenseExpression]:
    """The licences a packager declared, as CycloneDX licences.

    A Debian synopsis that is exactly an SPDX identifier (``BSD-3-clause``, ``Apache-2.0``)
    becomes that id; any other (``GPL-2+``, ``Expat``, ``GPL-2+ or Artistic``) keeps its DEP-5
    words as a licence name, since DEP-5 and SPDX spell versions and operators differently.
    An RPM License tag that is an SPDX id or expression (Fedora, EL10) is used as such; older
    Fedora-style tags (``GPLv2+ and LGPLv2+``) are kept as a name.
    """
    out: list[DisjunctiveLicense | LicenseExpression] = []
    declared = LicenseAcknowledgement.DECLARED
    for text in pkg.licences or ():
        ident = spdx.fixup_id(text)
        if ident is not None:
            out.append(DisjunctiveLicense(id=ident, acknowledgement=declared))
        elif pkg.kind == "rpm" and spdx_expression(text) is not None:
            out.append(LicenseExpression(text, acknowledgement=declared))
        else:
            out.append(DisjunctiveLicense(name=text, acknowledgement=declared))
    return out


def build_sbom(packages: Iterable[Package], *, image_name: str, image_sha256: str, build_id: str,
               vendor: str | None = None, distro: str | None = None,
               timestamp: datetime | None = None, serial_number: UUID | None = None) -> Bom:
    """The SBOM of one image. ``timestamp`` and ``serial_number`` default to now and a random UUID."""
    if not image_name:
        raise SbomError("SBOM: image_name is empty; pass the recipe's name")
    if not _SHA256_RE.match(image_sha256):
        raise SbomError(f"SBOM of {image_name}: image_sha256 {image_sha256!r} is not 64 lowercase hex "
                        "digits; pass the sha256 of the disk image file")
    if not build_id:
        raise SbomError(f"SBOM of {image_name}: build_id is empty; pass the build record's id")
    tools = ToolRepository()
    tools.components.add(Component(type=ComponentType.APPLICATION, name="kickgate", version=__version__,
                                   bom_ref=f"kickgate@{__version__}"))
    image = Component(type=ComponentType.OPERATING_SYSTEM, name=image_name,
                      bom_ref=f"image:{image_name}@sha256:{image_sha256}",
                      hashes=[HashType(alg=HashAlgorithm.SHA_256, content=image_sha256)],
                      properties=[Property(name=PROP_BUILD_ID, value=build_id)])
    metadata = BomMetaData(tools=tools, component=image)
    if timestamp is not None:
        metadata.timestamp = timestamp
    bom = Bom(metadata=metadata, serial_number=serial_number)
    components: list[Component] = []
    seen: set[str] = set()
    for pkg in packages:
        purl = package_purl(pkg, vendor=vendor, distro=distro)
        ref = purl.to_string()
        if ref in seen:
            log.warning("SBOM of %s: package %s %s listed twice; kept once", image_name, pkg.name, pkg.version)
            continue
        seen.add(ref)
        components.append(Component(
            type=ComponentType.LIBRARY, name=pkg.name, version=pkg.version, purl=purl, bom_ref=ref,
            licenses=package_licences(pkg),
            properties=[Property(name=PROP_SOURCE_NAME, value=pkg.source),
                        Property(name=PROP_SOURCE_VERSION, value=pkg.source_version)]))
    for component in components:
        bom.components.add(component)
    bom.register_dependency(image, components)
    return bom


def sbom_json(bom: Bom) -> str:
    """The BOM as CycloneDX 1.6 JSON."""
    return JsonV1Dot6(bom).output_as_string(indent=2)


def validate_sbom_json(text: str) -> None:
    """Raise SbomError unless ``text`` is valid against the CycloneDX 1.6 JSON schema."""
    # Imported here: jsonschema's format checkers take seconds to import, and only validation needs them.
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SCHEMA_VERSION).validate_str(text)
    if error is not None:
        raise SbomError(f"SBOM does not match the CycloneDX {SCHEMA_VERSION.to_version()} JSON schema: {error}")
