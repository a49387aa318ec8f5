"""What an image is made of: installed packages, their differences, and a compact manifest.

Pure functions over package lists, shared by both build methods:

- ``read_dpkg(admindir)`` reads a Debian tree's dpkg database with ``dpkg-query`` and each
  package's licences from its machine-readable (DEP-5) ``usr/share/doc/<pkg>/copyright``.
- ``parse_rpm_lines(lines)`` reads what a kickstart ``%post`` prints with
  ``rpm -qa --qf RPM_QUERYFORMAT`` (one package a line, see ``RPM_QUERYFORMAT``).
- ``diff_packages(old, new)`` says what was added, removed, upgraded and downgraded, ordering
  versions the way dpkg (python-debian) or rpm (rpm-version) do; ``summary_line``,
  ``render_diff`` and ``PackageDiff.to_json`` present it.
- ``encode_manifest``/``decode_manifest`` store a package list in one OpenNebula image attribute.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gzip
import json
import logging
import os
import re
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from debian import deb822
from debian.debian_support import version_compare as _deb_version_compare
from rpm_version import evr_compare as _rpm_evr_compare  # type: ignore[import-untyped]

from builder.errors import KickgateError
from builder.run import run

log = logging.getLogger(__name__)

Kind = Literal["deb", "rpm"]
KINDS: tuple[Kind, ...] = ("deb", "rpm")


class PackageError(KickgateError):
    """A package list could not be read, parsed, compared or decoded."""


# --------------------------------------------------------------------------- the package


@dataclass(frozen=True)
class Package:
    """One installed binary package.

    ``version`` is the full version as the package manager orders it: Debian
    ``[epoch:]upstream[-revision]``; RPM ``[epoch:]version-release`` (epoch 0 is left out).
    ``arch`` is "" when unknown (lists recorded as bare ``(name, version)`` pairs).
    ``licences`` is None when unknown; otherwise the licence statements as the packager wrote
    them: the distinct DEP-5 ``License:`` synopses of a Debian package (each may itself be an
    expression such as ``GPL-2+ or Artistic``), or an RPM's ``License`` tag.
    """

    kind: Kind
    name: str
    version: str
    arch: str
    source: str
    source_version: str
    licences: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "version": self.version, "arch": self.arch,
                "source": self.source, "source_version": self.source_version,
                "licences": list(self.licences) if self.licences is not None else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Package:
        try:
            lic = data.get("licences")
            return cls(kind=_kind(data["kind"]), name=str(data["name"]), version=str(data["version"]),
                       arch=str(data.get("arch", "")), source=str(data.get("source") or data["name"]),
                       source_version=str(data.get("source_version") or data["version"]),
                       licences=tuple(str(x) for x in lic) if lic is not None else None)
        except (KeyError, TypeError) as exc:
            raise PackageError(f"package record {data!r}: missing or invalid field {exc}") from None


def _kind(value: object) -> Kind:
    if value == "deb" or value == "rpm":
        return value
    raise PackageError(f"unknown package kind {value!r}: expected one of {', '.join(KINDS)}")


# Earlier kickstart builds recorded rpm versions as version-release.arch.
_RPM_ARCH_SUFFIX_RE = re.compile(r"^(.+)\.(x86_64|i686|i586|i386|noarch|aarch64|ppc64le|s390x|armv7hl)$")


def packages_from_pairs(pairs: Iterable[Sequence[str]], kind: Kind) -> tuple[Package, ...]:
    """Packages from the ``(name, version)`` pairs older build records hold (arch unknown,
    or split off an rpm version that ends in ``.<arch>``)."""
    _kind(kind)
    out: set[Package] = set()
    for name, version, *_ in pairs:
        arch = ""
        if kind == "rpm" and (m := _RPM_ARCH_SUFFIX_RE.match(version)):
            version, arch = m.group(1), m.group(2)
        out.add(Package(kind=kind, name=name, version=version, arch=arch, source=name, source_version=version))
    return sort_packages(out)


def packages_to_json(packages: Iterable[Package]) -> list[dict[str, Any]]:
    return [p.to_json() for p in packages]


def packages_from_json(data: Iterable[dict[str, Any]]) -> tuple[Package, ...]:
    return tuple(Package.from_json(d) for d in data)


# --------------------------------------------------------------------------- version ordering


def compare_versions(kind: Kind, a: str, b: str) -> int:
    """-1, 0 or 1 as version a sorts before, equal to or after b for this package manager.

    Debian: dpkg's algorithm (python-debian), e.g. ``1.0~rc1 < 1.0 < 1.0+b1 < 1:0.1``.
    RPM: rpm's rpmvercmp on epoch, version and release (rpm-version), e.g.
    ``1.0~rc1 < 1.0 < 1.0^git1 < 1.0.1``.
    """
    try:
        if kind == "deb":
            result = _deb_version_compare(a, b)
        elif kind == "rpm":
            result = int(_rpm_evr_compare(a, b))
        else:
            raise PackageError(f"unknown package kind {kind!r}: expected one of {', '.join(KINDS)}")
    except ValueError as exc:
        raise PackageError(f"cannot compare {kind} versions {a!r} and {b!r}: {exc}") from None
    return (result > 0) - (result < 0)


def sort_packages(packages: Iterable[Package]) -> tuple[Package, ...]:
    """By name, then arch, then version in the package manager's order."""
    groups: dict[tuple[str, str], list[Package]] = defaultdict(list)
    for p in packages:
        groups[(p.name, p.arch)].append(p)
    out: list[Package] = []
    for key in sorted(groups):
        out.extend(sorted(groups[key], key=_BY_VERSION))
    return tuple(out)


def _cmp_packages(a: Package, b: Package) -> int:
    return compare_versions(a.kind, a.version, b.version)


_BY_VERSION = functools.cmp_to_key(_cmp_packages)


# --------------------------------------------------------------------------- dpkg

# source:Package and source:Version fall back to the binary's own name and version when a
# package has no Source field; db:Status-Status tells unpacked packages from removed ones.
# Package lines carry a tag so that nothing else printed on stdout (or on a merged stream)
# is taken for a package; dpkg-query's warnings are passed on as log warnings.
_DPKG_TAG = "kickgate-dpkg"
_DPKG_FORMAT = (f"{_DPKG_TAG}\t${{Package}}\t${{Version}}\t${{Architecture}}\t${{source:Package}}"
                "\t${source:Version}\t${db:Status-Status}\n")
# Package states whose files are on disk; "config-files" and "not-installed" entries are not.
_DPKG_PRESENT = frozenset({"installed", "unpacked", "half-configured", "triggers-awaited", "triggers-pending"})


def read_dpkg(admindir: Path, *, root: Path | None = None, timeout: float = 120) -> tuple[Package, ...]:
    """The packages installed in a Debian tree, read from its dpkg database.

    ``root`` is the tree whose ``usr/share/doc`` holds the copyright files; by default the
    directory three levels above an admindir ending in ``var/lib/dpkg`` (``/`` for the host).
    Without one, licences are left unknown.
    """
    admindir = Path(admindir)
    if not (admindir / "status").is_file():
        raise PackageError(f"{admindir}: no dpkg database here (missing {admindir / 'status'}); "
                           "pass the tree's var/lib/dpkg directory")
    if root is None and admindir.parts[-3:] == ("var", "lib", "dpkg"):
        root = admindir.parents[2]
    if root is None:
        log.info("%s is not TREE/var/lib/dpkg and no root was given: licences left unknown", admindir)
    result = run(["dpkg-query", f"--admindir={admindir}", "-W", "-f", _DPKG_FORMAT], timeout=timeout)
    out = result.stdout
    packages: set[Package] = set()
    licence_cache: dict[str, tuple[str, ...] | None] = {}
    messages: list[str] = []
    for lineno, line in enumerate(out.splitlines(), 1):
        if not line.startswith(_DPKG_TAG + "\t"):
            messages.append(line)
            continue
        fields = line.split("\t")
        if len(fields) != 7:
            raise PackageError(f"dpkg-query --admindir={admindir}: output line {lineno} {line!r} "
                               "does not have 7 tab-separated fields")
        _, name, version, arch, source, source_version, status = fields
        if status not in _DPKG_PRESENT:
            continue
        if status != "installed":
            log.warning("%s: package %s %s is %s, not fully installed", admindir, name, version, status)
        if root is None:
            licences = None
        else:
            if name not in licence_cache:
                licence_cache[name] = dep5_licences(root, name)
            licences = licence_cache[name]
        packages.add(Package(kind="deb", name=name, version=version, arch=arch, source=source or name,
                             source_version=source_version or version, licences=licences))
    messages += [line for line in (result.stderr or "").splitlines() if line.strip()]
    if messages:
        log.warning("dpkg-query --admindir=%s said:\n%s", admindir, "\n".join(messages))
    return sort_packages(packages)


def dep5_licences(root: Path, package: str) -> tuple[str, ...] | None:
    """Distinct licence synopses of a package's machine-readable copyright file, sorted.

    Only the header's and the ``Files`` paragraphs' ``License:`` first lines count (stand-alone
    ``License`` paragraphs define texts those refer to). None when the file is missing or not in
    the machine-readable format (its first paragraph has no ``Format`` field).
    """
    path = resolve_in_tree(root, f"usr/share/doc/{package}/copyright")
    if path is None or not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            paragraphs = list(deb822.Deb822.iter_paragraphs(fh, use_apt_pkg=False))
    except (OSError, ValueError) as exc:
        log.debug("%s: unreadable copyright file: %s", path, exc)
        return None
    if not paragraphs or not ("Format" in paragraphs[0] or "Format-Specification" in paragraphs[0]):
        return None
    found: set[str] = set()
    for i, para in enumerate(paragraphs):
        if i != 0 and "Files" not in para:
            continue
        value = para.get("License", "")
        synopsis = " ".join(value.split("\n", 1)[0].split())
        if synopsis:
            found.add(synopsis)
    return tuple(sorted(found)) if found else None


def resolve_in_tree(root: Path, relpath: str, max_links: int = 40) -> Path | None:
    """``root/relpath`` with every symlink resolved as if ``root`` were ``/``.

    Doc directories are often symlinks to a sibling package's (``/usr/share/doc/libfoo-dev ->
    libfoo1``); an absolute target must not escape to the build host's own files.
    None on a symlink loop.
    """
    parts = [p for p in PurePosixPath(relpath).parts if p not in ("/", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            links += 1
            if links > max_links:
                return None
            target = PurePosixPath(os.readlink(candidate))
            if target.is_absolute():
                resolved = []
            parts = [p for p in target.parts if p not in ("/", ".")] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


# --------------------------------------------------------------------------- rpm

# What the kickstart %post prints, one package a line, after an optional marker word:
#   <name> <epoch>:<version>-<release> <arch> <source rpm file> <licence, may contain spaces>
#   bash 0:5.1.8-9.el9 x86_64 bash-5.1.8-9.el9.src.rpm GPLv3+
# EPOCHNUM prints 0 for packages without an epoch; "(none)" stands for a missing tag.
RPM_QUERYFORMAT = r"%{NAME} %{EPOCHNUM}:%{VERSION}-%{RELEASE} %{ARCH} %{SOURCERPM} %{LICENSE}\n"

_RPM_EVR_RE = re.compile(r"^(?:(\d+):)?([^\s:-]+)-([^\s:-]+)$")
_SRPM_RE = re.compile(r"^(?P<name>.+)-(?P<version>[^-]+)-(?P<release>[^-]+)\.(?:no)?src\.rpm$")


def rpm_query_format(marker: str = "") -> str:
    """The ``rpm -qa --qf`` argument that prints lines ``parse_rpm_lines(..., marker=marker)`` reads."""
    return f"{marker} {RPM_QUERYFORMAT}" if marker else RPM_QUERYFORMAT


def parse_rpm_lines(lines: Iterable[str], *, marker: str | None = None,
                    origin: str = "rpm package list") -> tuple[Package, ...]:
    """Packages from lines printed with ``rpm -qa --qf RPM_QUERYFORMAT``.

    With ``marker``, only lines starting with that word count and anything else (a serial
    console's other output) is skipped; without it every non-blank line must be a package.
    ``gpg-pubkey`` entries are signing keys imported into the rpm database, not software:
    skipped. ``origin`` names the input (e.g. the serial log) in errors.
    """
    packages: set[Package] = set()
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if marker is not None:
            words = line.split(None, 1)
            if not words or words[0] != marker:
                continue
            line = words[1] if len(words) > 1 else ""
        if not line:
            continue
        fields = line.split(None, 4)
        expected = ("expected '<name> <epoch>:<version>-<release> <arch> <source rpm> <licence>' "
                    "as rpm -qa --qf builder.packages.RPM_QUERYFORMAT prints it")
        if len(fields) != 5:
            raise PackageError(f"{origin}: line {lineno}: {line!r}: {expected}")
        name, evr, arch, srpm, licence = fields
        if name == "gpg-pubkey":
            continue
        m = _RPM_EVR_RE.match(evr)
        if not m:
            raise PackageError(f"{origin}: line {lineno}: version {evr!r} of {name} is not "
                               f"[epoch:]version-release; {expected}")
        epoch, ver, rel = m.groups()
        version = f"{ver}-{rel}" if not epoch or int(epoch) == 0 else f"{int(epoch)}:{ver}-{rel}"
        if srpm == "(none)":
            source, source_version = name, version
        else:
            sm = _SRPM_RE.match(srpm)
            if not sm:
                raise PackageError(f"{origin}: line {lineno}: source rpm {srpm!r} of {name} is not "
                                   f"<name>-<version>-<release>.src.rpm; {expected}")
            # The file name carries no epoch: the source version is version-release only.
            source, source_version = sm["name"], f"{sm['version']}-{sm['release']}"
        packages.add(Package(kind="rpm", name=name, version=version, arch=arch, source=source,
                             source_version=source_version,
                             licences=None if licence == "(none)" else (licence,)))
    return sort_packages(packages)


# --------------------------------------------------------------------------- differences


@dataclass(frozen=True)
class Change:
    """A package present on both sides with another version (or, rarely, another arch)."""

    old: Package
    new: Package

    @property
    def name(self) -> str:
        return self.new.name


@dataclass(frozen=True)
class PackageDiff:
    kind: Kind
    added: tuple[Package, ...]
    removed: tuple[Package, ...]
    upgraded: tuple[Change, ...]
    downgraded: tuple[Change, ...]
    unchanged: int

    @property
    def changed(self) -> int:
        return len(self.upgraded) + len(self.downgraded)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.upgraded or self.downgraded)

    def to_json(self) -> dict[str, Any]:
        def pkg(p: Package) -> dict[str, str]:
            return {"name": p.name, "arch": p.arch, "version": p.version}

        def chg(c: Change) -> dict[str, str]:
            d = {"name": c.name, "arch": c.new.arch, "old": c.old.version, "new": c.new.version}
            if c.old.arch != c.new.arch:
                d["old_arch"] = c.old.arch
            return d

        return {"kind": self.kind,
                "counts": {"added": len(self.added), "removed": len(self.removed), "upgraded": len(self.upgraded),
                           "downgraded": len(self.downgraded), "unchanged": self.unchanged},
                "added": [pkg(p) for p in self.added], "removed": [pkg(p) for p in self.removed],
                "upgraded": [chg(c) for c in self.upgraded], "downgraded": [chg(c) for c in self.downgraded]}


def _arch_match(a: str, b: str) -> bool:
    return a == b or not a or not b  # "" = unknown (legacy name/version lists)


def diff_packages(old: Iterable[Package], new: Iterable[Package]) -> PackageDiff:
    """What changed from ``old`` to ``new``, per package name.

    Entries with equal versions (in the package manager's order) and matching arch are
    unchanged. The rest of each name pair up oldest with oldest, so a kernel rotated from
    {5.14-362, 5.14-427} to {5.14-427, 5.14-500} reads as one upgrade; a lone entry whose arch
    changed along with its version (``all`` to ``amd64``) is a change too; whatever is left
    over was added or removed.
    """
    old_t, new_t = tuple(old), tuple(new)
    kinds = {p.kind for p in old_t + new_t}
    if len(kinds) > 1:
        raise PackageError(f"cannot compare package lists of different kinds ({', '.join(sorted(kinds))}): "
                           "compare an image only with images of the same family")
    kind: Kind = kinds.pop() if kinds else "deb"
    cmp: Callable[[str, str], int] = lambda a, b: compare_versions(kind, a, b)  # noqa: E731
    by_name_old: dict[str, list[Package]] = defaultdict(list)
    by_name_new: dict[str, list[Package]] = defaultdict(list)
    for p in set(old_t):
        by_name_old[p.name].append(p)
    for p in set(new_t):
        by_name_new[p.name].append(p)
    added: list[Package] = []
    removed: list[Package] = []
    upgraded: list[Change] = []
    downgraded: list[Change] = []
    unchanged = 0
    for name in sorted(set(by_name_old) | set(by_name_new)):
        olds = list(sort_packages(by_name_old.get(name, [])))
        news = list(sort_packages(by_name_new.get(name, [])))
        # 1. unchanged: same version, compatible arch
        for o in list(olds):
            match = next((n for n in news if _arch_match(o.arch, n.arch) and cmp(o.version, n.version) == 0), None)
            if match is not None:
                olds.remove(o)
                news.remove(match)
                unchanged += 1
        # 2. same arch, other version: pair in version order
        pairs: list[tuple[Package, Package]] = []
        for o in list(olds):
            match = next((n for n in news if _arch_match(o.arch, n.arch)), None)
            if match is not None:
                olds.remove(o)
                news.remove(match)
                pairs.append((o, match))
        # 3. one entry left on each side: the arch changed with the version
        if len(olds) == 1 and len(news) == 1 and cmp(olds[0].version, news[0].version) != 0:
            pairs.append((olds.pop(), news.pop()))
        for o, n in pairs:
            (upgraded if cmp(o.version, n.version) < 0 else downgraded).append(Change(old=o, new=n))
        removed.extend(olds)
        added.extend(news)
    return PackageDiff(kind=kind, added=tuple(added), removed=tuple(removed), upgraded=tuple(upgraded),
                       downgraded=tuple(downgraded), unchanged=unchanged)


def summary_line(diff: PackageDiff, against: str) -> str:
    """``+2 -1 ~14 vs generic-dev v3``: added, removed, up- or downgraded, and the reference."""
    return f"+{len(diff.added)} -{len(diff.removed)} ~{diff.changed} vs {against}"


def render_diff(diff: PackageDiff, against: str) -> str:
    """The whole difference for people, one package a line, by name within each section."""
    lines = [f"packages {summary_line(diff, against)} ({len(diff.upgraded)} upgraded, "
             f"{len(diff.downgraded)} downgraded, {diff.unchanged} unchanged)"]

    def arch(p: Package) -> str:
        return f" [{p.arch}]" if p.arch else ""

    sections: list[tuple[str, list[str]]] = [
        ("added", [f"  + {p.name} {p.version}{arch(p)}" for p in diff.added]),
        ("removed", [f"  - {p.name} {p.version}{arch(p)}" for p in diff.removed]),
        ("upgraded", [f"  ^ {c.name} {c.old.version} -> {c.new.version}{arch(c.new)}" for c in diff.upgraded]),
        ("downgraded", [f"  v {c.name} {c.old.version} -> {c.new.version}{arch(c.new)}" for c in diff.downgraded]),
    ]
    for title, body in sections:
        if body:
            lines.append(f"{title}:")
            lines.extend(body)
    if diff.empty:
        lines.append("no package changed")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- manifest

# Where the encoded manifest goes: one attribute of an OpenNebula image template. oned puts no
# length limit on a template value itself (its flex lexer reads a quoted string of any length:
# OpenNebula's src/parsers/template_parser.l); the limits are around it:
# - the whole image, template included, is one XML body in image_pool.body, a MEDIUMTEXT column
#   with the MySQL backend (src/sql/OneDB.cc): at most 16 MiB - 1 (SQLite, the default, allows more);
# - oned caps every XML-RPC message at MESSAGE_SIZE (oned.conf, default 1073741824 bytes,
#   applied with xmlrpc_limit_set in src/rm/RequestManager.cc);
# - one.imagepool.info returns every image's template in one reply, so each listing carries
#   every image's manifest.
# 256 KiB keeps a listing of hundreds of images small and is over 13 times what 777 Debian
# packages with licences take (19 KiB encoded; generic-dev's 185 take 6.5 KiB).
MAX_MANIFEST_BYTES = 256 * 1024
_MANIFEST_FORMAT = "kickgate-packages"
_MANIFEST_VERSION = 1
# A decoded manifest may not inflate beyond this (guards against a crafted attribute).
_MAX_INFLATED = 64 * 1024 * 1024


class ManifestTooLarge(PackageError):
    """The encoded manifest does not fit the size bound of one image attribute."""


def encode_manifest(packages: Iterable[Package], *, limit: int = MAX_MANIFEST_BYTES) -> str:
    """A package list as one ASCII string (JSON, gzip, base64) for an image attribute.

    Raises ManifestTooLarge, naming the limit, when the result is longer than ``limit`` bytes.
    """
    pkgs = sort_packages(packages)
    kinds = {p.kind for p in pkgs}
    if len(kinds) > 1:
        raise PackageError(f"one manifest holds one kind of package, got {', '.join(sorted(kinds))}")
    rows = [[p.name, p.version, p.arch,
             None if p.source == p.name else p.source,
             None if p.source_version == p.version else p.source_version,
             list(p.licences) if p.licences is not None else None] for p in pkgs]
    doc = {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION, "kind": kinds.pop() if kinds else "deb",
           "packages": rows}
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    encoded = base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode("ascii")
    if len(encoded) > limit:
        raise ManifestTooLarge(
            f"package manifest of {len(pkgs)} packages encodes to {len(encoded)} bytes, over the "
            f"{limit}-byte limit for one image attribute (builder.packages.MAX_MANIFEST_BYTES); "
            "keep the full list in the build record or SBOM and store a smaller one in the image")
    return encoded


def decode_manifest(text: str) -> tuple[Package, ...]:
    """The package list ``encode_manifest`` stored; PackageError if ``text`` is not one."""
    what = "not a kickgate package manifest"
    try:
        compressed = base64.b64decode(text.strip(), validate=True)
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
        raw = inflater.decompress(compressed, _MAX_INFLATED)
        if inflater.unconsumed_tail:
            raise PackageError(f"{what}: inflates beyond {_MAX_INFLATED} bytes")
        if not inflater.eof:
            raise PackageError(f"{what}: the compressed data is cut short (was the attribute truncated?)")
        doc = json.loads(raw)
    except (binascii.Error, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{what}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != _MANIFEST_FORMAT:
        raise PackageError(f"{what}: no format marker {_MANIFEST_FORMAT!r}")
    if doc.get("version") != _MANIFEST_VERSION:
        raise PackageError(f"package manifest version {doc.get('version')!r} is not supported "
                           f"(this kickgate reads version {_MANIFEST_VERSION}); upgrade kickgate")
    kind = _kind(doc.get("kind"))
    out: list[Package] = []
    try:
        for row in doc["packages"]:
            name, version, arch, source, source_version, licences = row
            out.append(Package(kind=kind, name=name, version=version, arch=arch, source=source or name,
                               source_version=source_version or version,
                               licences=tuple(licences) if licences is not None else None))
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{what}: malformed package entry ({exc})") from None
    return tuple(out)
