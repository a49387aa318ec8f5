"""Version references as people write them (``NAME@VERSION``) and OpenNebula's versioned image names.

The local registry numbers versions 1, 2, 3… in its directory. OpenNebula image names are unique
per owner, so kickgate registers a new version of NAME as ``NAME-v2``, ``NAME-v3``…: there the
version is the N of ``NAME-vN`` (NAME itself is version 1), and the image ID is a separate number.

A VERSION is ``latest`` (the newest), ``promoted`` (the version consumers are pointed at), ``N``
or ``vN`` (a version number), or ``id:N`` (an OpenNebula image ID). A bare ``N`` is also accepted
as an image ID when no version N exists or both name the same image; when they name different
images the reference is ambiguous and must be written ``vN`` or ``id:N``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from builder.errors import RegistryError

LATEST = "latest"
PROMOTED = "promoted"
_VERSIONED = re.compile(r"(?P<base>.+)-v(?P<n>[0-9]+)")
_VERSION = re.compile(r"v?(?P<n>[0-9]+)")
_IMAGE_ID = re.compile(r"id:(?P<id>[0-9]+)")


@dataclass(frozen=True)
class VersionRef:
    """One parsed VERSION: kind is "latest", "promoted", "number" (n), "id" (n) or "either" (bare N)."""

    kind: str
    n: int = 0

    def __str__(self) -> str:
        return {"number": f"v{self.n}", "id": f"id:{self.n}", "either": str(self.n)}.get(self.kind, self.kind)


def parse_ref(text: str) -> tuple[str, VersionRef]:
    """``NAME[@VERSION]`` → (NAME, VersionRef); a missing VERSION means latest."""
    name, sep, version = text.strip().partition("@")
    if not name:
        raise RegistryError(f"{text!r}: expected NAME or NAME@VERSION (e.g. generic-dev@3)")
    if not sep:
        return name, VersionRef(LATEST)
    return name, parse_version(version, name)


def parse_version(version: str, name: str = "NAME") -> VersionRef:
    v = version.strip()
    if v in (LATEST, PROMOTED):
        return VersionRef(v)
    if m := _IMAGE_ID.fullmatch(v):
        return VersionRef("id", int(m["id"]))
    if m := _VERSION.fullmatch(v):
        return VersionRef("number" if v.startswith("v") else "either", int(m["n"]))
    raise RegistryError(f"{name}@{version}: VERSION must be latest, promoted, a version number (3 or v3) "
                        "or an OpenNebula image ID (id:17)")


def one_version(image_name: str, base: str) -> int | None:
    """The version an OpenNebula image name stands for within base's family: base → 1, base-vN → N."""
    if image_name == base:
        return 1
    m = _VERSIONED.fullmatch(image_name)
    if m and m["base"] == base and int(m["n"]) >= 2 and m["n"] == str(int(m["n"])):
        return int(m["n"])
    return None


def one_name(base: str, version: int) -> str:
    """The OpenNebula image name of version of base (the inverse of one_version)."""
    return base if version == 1 else f"{base}-v{version}"


def one_base(image_name: str) -> str:
    """The family an image name belongs to when nothing else says so: NAME-vN → NAME."""
    m = _VERSIONED.fullmatch(image_name)
    return m["base"] if m and int(m["n"]) >= 2 else image_name


def specs_all_passed(specs: str) -> bool:
    """Whether a SPECS attribute ("23/23 passed: …") records a gate where every spec passed."""
    m = re.match(r"\s*([0-9]+)/([0-9]+) passed\b", specs)
    return bool(m) and int(m[1]) == int(m[2]) > 0  # type: ignore[index]


__all__ = ["LATEST", "PROMOTED", "VersionRef", "one_base", "one_name", "one_version", "parse_ref",
           "parse_version", "specs_all_passed"]
