"""Package lists: dpkg and rpm readers, version ordering, diffs, summaries and image manifests."""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest
from debian import deb822

from builder import packages
from builder.packages import (
    MAX_MANIFEST_BYTES,
    RPM_QUERYFORMAT,
    ManifestTooLarge,
    Package,
    PackageError,
    compare_versions,
    decode_manifest,
    dep5_licences,
    diff_packages,
    encode_manifest,
    packages_from_json,
    packages_from_pairs,
    packages_to_json,
    parse_rpm_lines,
    read_dpkg,
    render_diff,
    resolve_in_tree,
    rpm_query_format,
    sort_packages,
    summary_line,
)
from conftest import Need

HOST_ADMINDIR = Path("/var/lib/dpkg")

# (a, b, sign of a compared with b) as dpkg orders them; test_debian_table_agrees_with_dpkg
# checks every row against the host's own dpkg.
DEBIAN_ORDER = [
    ("1.0", "1.0", 0),
    ("1.0", "1.1", -1),
    ("1.9", "1.10", -1),                       # numbers compare as numbers
    ("7.2+dfsg-7+deb12u18", "7.2+dfsg-7+deb12u9", 1),
    ("1:0.1", "9.9", 1),                       # the epoch comes first
    ("1:7.2", "2:1.0", -1),
    ("0:1.0", "1.0", 0),                       # no epoch is epoch 0
    ("1.0~rc1", "1.0", -1),                    # a tilde sorts before everything, even the end
    ("1.0~~", "1.0~", -1),
    ("1.0~~a", "1.0~", -1),
    ("1.0~rc1-1", "1.0-1", -1),
    ("1.0", "1.0a", -1),                       # letters sort after the end
    ("1.0", "1.0.0", -1),
    ("1.0", "1.0+b1", -1),                     # binary rebuilds
    ("1.0+dfsg", "1.0", 1),
    ("1.0-1", "1.0-2", -1),                    # the Debian revision
    ("1.0", "1.0-0", 0),
    ("1.0-1", "1.0-1+deb12u1", -1),            # stable updates
    ("2.36-9+deb12u3", "2.36-9+deb12u4", -1),
    ("1.0-1~bpo12+1", "1.0-1", -1),            # backports sort below the release they come from
    ("1.0-1.1", "1.0-1+b1", 1),                # '.' sorts after '+'
]

# (a, b, sign) as rpm's rpmvercmp orders them (cases from rpm's own test suite, rpmvercmp.at);
# versions without a release compare version parts only.
RPM_ORDER = [
    ("1.0", "1.0", 0),
    ("1.0", "2.0", -1),
    ("2.0.1", "2.0", 1),
    ("2.0.1a", "2.0.1", 1),
    ("5.5p1", "5.5p2", -1),
    ("5.5p10", "5.5p1", 1),
    ("10xyz", "10.1xyz", -1),
    ("xyz10", "xyz10.1", -1),
    ("xyz.4", "8", -1),                        # numbers sort after letters
    ("5.5p2", "5.6p1", -1),
    ("6.0.rc1", "6.0", 1),                     # unlike Debian: more segments is newer
    ("10b2", "10a1", 1),
    ("1.0a", "1.0aa", -1),
    ("10.0001", "10.1", 0),                    # leading zeros do not count
    ("10.0001", "10.0039", -1),
    ("4.999.9", "5.0", -1),
    ("20101121", "20101122", -1),
    ("2_0", "2.0", 0),                         # separators are all alike
    ("a+", "a_", 0),
    ("1.0~rc1", "1.0", -1),                    # tilde: pre-release
    ("1.0~rc1", "1.0~rc2", -1),
    ("1.0~rc1~git123", "1.0~rc1", -1),
    ("1.0^", "1.0", 1),                        # caret: post-release snapshot
    ("1.0^git1", "1.01", -1),
    ("1.0^20160101", "1.0.1", -1),
    ("1.0^20160102", "1.0^20160101", 1),
    ("1.0~rc1^git1", "1.0~rc1", 1),
    ("1.0^git1~pre", "1.0^git1", -1),
    ("1:1.0-1", "2.0-1", 1),                   # epoch first
    ("5.1.8-6.el9", "5.1.8-9.el9", -1),        # then the release
    ("2.0-10.el9", "2.0-9.el9", 1),
    ("0:1.0-1", "1.0-1", 0),
]


@pytest.fixture(scope="module")
def dpkg_host(need: Need) -> None:
    need.file(HOST_ADMINDIR / "status", "dpkg (the tests need a Debian host)")


needs_dpkg = pytest.mark.usefixtures("dpkg_host")


@pytest.fixture(scope="module")
def host_packages(dpkg_host: None) -> tuple[Package, ...]:
    """The build host's own installed packages: real dpkg data, read once (a few seconds)."""
    return read_dpkg(HOST_ADMINDIR)


# --------------------------------------------------------------------------- ordering


@pytest.mark.parametrize(("a", "b", "expected"), DEBIAN_ORDER)
def test_debian_version_order(a: str, b: str, expected: int) -> None:
    assert compare_versions("deb", a, b) == expected
    assert compare_versions("deb", b, a) == -expected


@needs_dpkg
def test_debian_table_agrees_with_dpkg() -> None:
    # The table above is only worth something if dpkg itself orders it that way.
    for a, b, expected in DEBIAN_ORDER:
        op = {-1: "lt", 0: "eq", 1: "gt"}[expected]
        rc = subprocess.run(["dpkg", "--compare-versions", a, op, b], check=False).returncode
        assert rc == 0, f"dpkg disagrees: {a} {op} {b}"


@pytest.mark.parametrize(("a", "b", "expected"), RPM_ORDER)
def test_rpm_version_order(a: str, b: str, expected: int) -> None:
    assert compare_versions("rpm", a, b) == expected
    assert compare_versions("rpm", b, a) == -expected


def test_the_kind_selects_the_algorithm() -> None:
    # Both orders verified against dpkg --compare-versions and rpm's labelCompare.
    assert compare_versions("deb", "1.a", "1.1") == 1     # dpkg: letters sort after the end
    assert compare_versions("rpm", "1.a", "1.1") == -1    # rpm: numeric segments are newer
    assert compare_versions("deb", "1.0+1", "1.0.1") == -1
    assert compare_versions("rpm", "1.0+1", "1.0.1") == 0  # rpm: separators only separate


def test_invalid_debian_version_is_an_error() -> None:
    with pytest.raises(PackageError, match="cannot compare deb versions"):
        compare_versions("deb", "1.0 beta", "1.0")


def test_sort_uses_version_order() -> None:
    pkgs = [Package("deb", "a", v, "amd64", "a", v) for v in ("1.10", "1.9", "1.0~rc1", "1:0.1")]
    assert [p.version for p in sort_packages(pkgs)] == ["1.0~rc1", "1.9", "1.10", "1:0.1"]


# --------------------------------------------------------------------------- dpkg


@needs_dpkg
def test_read_dpkg_on_the_host_matches_dpkg_status(host_packages: tuple[Package, ...]) -> None:
    pkgs = host_packages
    # Independent reading of the same database: every "install ok installed" stanza.
    with open(HOST_ADMINDIR / "status", encoding="utf-8") as fh:
        expected = {(s["Package"], s["Architecture"], s["Version"])
                    for s in deb822.Deb822.iter_paragraphs(fh, use_apt_pkg=False)
                    if s.get("Status", "").endswith(" installed")}
    got = {(p.name, p.arch, p.version) for p in pkgs}
    assert expected <= got
    assert len(pkgs) >= len(expected) > 50
    assert all(p.kind == "deb" for p in pkgs)
    by_name = {p.name: p for p in pkgs}
    dpkg = by_name["dpkg"]
    version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "dpkg"], capture_output=True, text=True,
                             check=True).stdout
    assert dpkg.version == version
    assert dpkg.source == "dpkg"
    assert by_name["libc6"].source == "glibc"          # Source differs from the binary name
    # Machine-readable copyright files give licences on a stock Debian system.
    assert sum(p.licences is not None for p in pkgs) > len(pkgs) // 3
    assert dpkg.licences is not None and any(lic.startswith("GPL-2") for lic in dpkg.licences)


def _tree(tmp_path: Path) -> Path:
    """A small Debian tree: a dpkg status file and /usr/share/doc as real packages lay it out.

    The stanzas lack Maintainer fields, so dpkg-query warns about each: its warnings share the
    output stream with the package lines and must not be taken for packages.
    """
    root = tmp_path / "tree"
    admin = root / "var/lib/dpkg"
    (admin / "info").mkdir(parents=True)
    (admin / "updates").mkdir()
    (admin / "status").write_text(
        "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nMulti-Arch: same\n"
        "Source: glibc\nVersion: 2.36-9+deb12u4\nDescription: libc\n\n"
        "Package: libc6\nStatus: install ok installed\nArchitecture: i386\nMulti-Arch: same\n"
        "Source: glibc\nVersion: 2.36-9+deb12u4\nDescription: libc\n\n"
        "Package: libfoo-dev\nStatus: install ok installed\nArchitecture: amd64\n"
        "Source: foo (1:1.2-3)\nVersion: 1:1.2-3+b1\nDescription: foo\n\n"
        "Package: bar\nStatus: install ok installed\nArchitecture: all\nVersion: 0.9-1\nDescription: bar\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1.0-1\n"
        "Description: removed, config files left\n\n")
    doc = root / "usr/share/doc"
    (doc / "libc6").mkdir(parents=True)
    (doc / "libc6/copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        "Upstream-Name: glibc\n\n"
        "Files: *\nCopyright: FSF\nLicense: LGPL-2.1+\n\n"
        "Files: debian/*\nCopyright: Debian\nLicense:   GPL-2+   or   Artistic\n\n"
        "Files: posix/*\nCopyright: FSF\nLicense: LGPL-2.1+\n\n"
        "License: LGPL-2.1+\n On Debian systems the full text is in /usr/share/common-licenses.\n\n"
        "License: Unused-Defined-Only\n text\n")
    (doc / "foo").mkdir()
    (doc / "foo/copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nLicense: Expat\n\n"
        "Files: *\nCopyright: me\nLicense: Expat\n")
    os.symlink("foo", doc / "libfoo-dev")  # relative doc-dir link, as dh_installdocs --link-doc makes
    (doc / "bar").mkdir()
    (doc / "bar/copyright").write_text("This package was debianized by someone.\nIt is GPL.\n")
    return root


def test_read_dpkg_tree_sources_arches_states_and_licences(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    root = _tree(tmp_path)
    pkgs = read_dpkg(root / "var/lib/dpkg")
    assert "missing 'Maintainer' field" in caplog.text  # dpkg-query's warning, passed on
    assert [(p.name, p.arch) for p in pkgs] == [("bar", "all"), ("libc6", "amd64"), ("libc6", "i386"),
                                                ("libfoo-dev", "amd64")]  # config-files entry left out
    by = {(p.name, p.arch): p for p in pkgs}
    libc = by[("libc6", "amd64")]
    assert (libc.source, libc.source_version) == ("glibc", "2.36-9+deb12u4")
    # Header and Files paragraphs only; whitespace normalised; union without repeats.
    assert libc.licences == ("GPL-2+ or Artistic", "LGPL-2.1+")
    foo = by[("libfoo-dev", "amd64")]
    assert (foo.source, foo.source_version, foo.version) == ("foo", "1:1.2-3", "1:1.2-3+b1")
    assert foo.licences == ("Expat",)                 # through the doc-dir symlink
    assert by[("bar", "all")].licences is None        # not machine-readable
    assert (by[("bar", "all")].source, by[("bar", "all")].source_version) == ("bar", "0.9-1")


def test_read_dpkg_without_a_database_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=rf"{tmp_path}.*no dpkg database"):
        read_dpkg(tmp_path)


def test_absolute_symlinks_resolve_inside_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "usr/share/doc/real").mkdir(parents=True)
    (root / "usr/share/doc/real/copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\nLicense: MIT\n")
    os.symlink("/usr/share/doc/real", root / "usr/share/doc/alias")
    # An absolute link to a path that exists on the host but not in the tree stays in the tree.
    os.symlink("/etc", root / "usr/share/doc/escape")
    assert resolve_in_tree(root, "usr/share/doc/alias/copyright") == root / "usr/share/doc/real/copyright"
    assert dep5_licences(root, "alias") == ("MIT",)
    assert resolve_in_tree(root, "usr/share/doc/escape/passwd") == root / "etc/passwd"
    assert dep5_licences(root, "escape") is None
    os.symlink("loop", root / "usr/share/doc/loop")
    assert resolve_in_tree(root, "usr/share/doc/loop/copyright") is None


# --------------------------------------------------------------------------- rpm

RPM_LINES = """\
KICKGATE-PKG bash 0:5.1.8-9.el9 x86_64 bash-5.1.8-9.el9.src.rpm GPLv3+
noise from the installer that is not a package line
KICKGATE-PKG bind-libs 32:9.16.23-18.el9_4.6 x86_64 bind-9.16.23-18.el9_4.6.src.rpm MPL-2.0 AND ISC
KICKGATE-PKG kernel-core 0:5.14.0-427.13.1.el9_4 x86_64 kernel-5.14.0-427.13.1.el9_4.src.rpm GPLv2 and Redist
KICKGATE-PKG kernel-core 0:5.14.0-362.8.1.el9_3 x86_64 kernel-5.14.0-362.8.1.el9_3.src.rpm GPLv2
KICKGATE-PKG gpg-pubkey 0:350d275d-6279464e (none) (none) pubkey
KICKGATE-PKG glibc 0:2.34-100.el9 i686 glibc-2.34-100.el9.src.rpm (none)
"""


def test_query_format_is_what_the_parser_reads() -> None:
    assert rpm_query_format("KICKGATE-PKG") == "KICKGATE-PKG " + RPM_QUERYFORMAT
    assert RPM_QUERYFORMAT.endswith("%{LICENSE}\\n")   # licence last: it may contain spaces
    assert "%{EPOCHNUM}:%{VERSION}-%{RELEASE}" in RPM_QUERYFORMAT


def test_parse_rpm_lines() -> None:
    lines = [*RPM_LINES.splitlines(), "KICKGATE-PKGS-END", "KICKGATE-PKG"]  # other markers, an empty entry
    pkgs = parse_rpm_lines(lines, marker="KICKGATE-PKG", origin="serial.log")
    assert [(p.name, p.version, p.arch) for p in pkgs] == [
        ("bash", "5.1.8-9.el9", "x86_64"),                 # epoch 0 left out
        ("bind-libs", "32:9.16.23-18.el9_4.6", "x86_64"),  # a real epoch kept
        ("glibc", "2.34-100.el9", "i686"),
        ("kernel-core", "5.14.0-362.8.1.el9_3", "x86_64"),  # install-only: both kept, in rpm order
        ("kernel-core", "5.14.0-427.13.1.el9_4", "x86_64"),
    ]  # gpg-pubkey is a key, not a package
    by = {p.name: p for p in pkgs}
    assert (by["bind-libs"].source, by["bind-libs"].source_version) == ("bind", "9.16.23-18.el9_4.6")
    assert by["bind-libs"].licences == ("MPL-2.0 AND ISC",)
    assert by["glibc"].licences is None
    assert pkgs[-1].licences == ("GPLv2 and Redist",)  # the rest of the line, spaces included
    assert all(p.kind == "rpm" for p in pkgs)


def test_parse_rpm_lines_without_marker_reads_every_line() -> None:
    pkgs = parse_rpm_lines(["", "zlib 0:1.2.11-40.el9 x86_64 zlib-1.2.11-40.el9.src.rpm zlib and Boost", ""])
    assert [(p.name, p.version, p.source) for p in pkgs] == [("zlib", "1.2.11-40.el9", "zlib")]


@pytest.mark.parametrize(("line", "problem"), [
    ("KICKGATE-PKG bash 0:5.1.8-9.el9 x86_64 bash-5.1.8-9.el9.src.rpm", "line 2: .*expected"),
    ("KICKGATE-PKG bash 5.1.8 x86_64 bash-5.1.8-9.el9.src.rpm GPLv3+", "line 2: version '5.1.8' of bash"),
    ("KICKGATE-PKG bash 0:5.1.8-9.el9 x86_64 bash.rpm GPLv3+", "line 2: source rpm 'bash.rpm'"),
])
def test_malformed_rpm_line_names_origin_and_line(line: str, problem: str) -> None:
    with pytest.raises(PackageError, match=rf"^serial\.log: {problem}"):
        parse_rpm_lines(["console noise", line], marker="KICKGATE-PKG", origin="serial.log")


# --------------------------------------------------------------------------- diffs


def deb(name: str, version: str, arch: str = "amd64") -> Package:
    return Package("deb", name, version, arch, name, version)


def rpm(name: str, version: str, arch: str = "x86_64") -> Package:
    return Package("rpm", name, version, arch, name, version)


def test_diff_two_lists() -> None:
    old = [deb("libc6", "2.36-9+deb12u3"), deb("openssl", "3.0.11-1~deb12u2"), deb("wget", "1.21.3-1+b2"),
           deb("zlib1g", "1:1.2.13.dfsg-1"), deb("tool", "1.9"), deb("same", "1.0", "all"),
           deb("rolledback", "2.0-1")]
    new = [deb("libc6", "2.36-9+deb12u4"), deb("openssl", "3.0.13-1~deb12u1"), deb("curl", "7.88.1-10+deb12u5"),
           deb("zlib1g", "1:1.2.13.dfsg-1"), deb("tool", "1.10"), deb("same", "1.0", "all"),
           deb("rolledback", "2.0-1~bpo12+1"), deb("jq", "1.6-2.1")]
    d = diff_packages(old, new)
    assert [p.name for p in d.added] == ["curl", "jq"]
    assert [p.name for p in d.removed] == ["wget"]
    assert [(c.name, c.old.version, c.new.version) for c in d.upgraded] == [
        ("libc6", "2.36-9+deb12u3", "2.36-9+deb12u4"),
        ("openssl", "3.0.11-1~deb12u2", "3.0.13-1~deb12u1"),
        ("tool", "1.9", "1.10"),                          # a string comparison would call this a downgrade
    ]
    assert [(c.name, c.old.version, c.new.version) for c in d.downgraded] == [
        ("rolledback", "2.0-1", "2.0-1~bpo12+1")]
    assert d.unchanged == 2
    assert summary_line(d, "generic-dev v3") == "+2 -1 ~4 vs generic-dev v3"


def test_summary_line_counts_up_and_downgrades() -> None:
    old = [deb(f"up{i:02}", "1.0") for i in range(12)] + [deb("down1", "2.0"), deb("down2", "1:1.0"),
                                                         deb("dropped", "1.0")]
    new = [deb(f"up{i:02}", "1.0+deb12u1") for i in range(12)] + [deb("down1", "2.0~rc1"), deb("down2", "9.0"),
                                                                 deb("new1", "1"), deb("new2", "2")]
    d = diff_packages(old, new)
    assert (len(d.upgraded), len(d.downgraded)) == (12, 2)
    assert summary_line(d, "generic-dev v3") == "+2 -1 ~14 vs generic-dev v3"


def test_epoch_decides_even_against_bigger_upstream() -> None:
    d = diff_packages([deb("file", "1:5.44-3")], [deb("file", "5.45-1")])
    assert [c.name for c in d.downgraded] == ["file"] and not d.upgraded


def test_rpm_install_only_kernels_rotate_as_one_upgrade() -> None:
    old = [rpm("kernel-core", "5.14.0-362.8.1.el9_3"), rpm("kernel-core", "5.14.0-427.13.1.el9_4")]
    new = [rpm("kernel-core", "5.14.0-427.13.1.el9_4"), rpm("kernel-core", "5.14.0-503.11.1.el9_5")]
    d = diff_packages(old, new)
    assert d.unchanged == 1 and not d.added and not d.removed
    assert [(c.old.version, c.new.version) for c in d.upgraded] == [("5.14.0-362.8.1.el9_3", "5.14.0-503.11.1.el9_5")]


def test_diff_uses_the_kinds_order() -> None:
    assert len(diff_packages([rpm("x", "1.a-1")], [rpm("x", "1.1-1")]).upgraded) == 1
    assert len(diff_packages([deb("x", "1.a-1")], [deb("x", "1.1-1")]).downgraded) == 1
    assert len(diff_packages([rpm("y", "1.0-1")], [rpm("y", "1.0^git1-1")]).upgraded) == 1


def test_multiarch_and_arch_changes() -> None:
    old = [deb("libc6", "2.36-9", "amd64"), deb("libc6", "2.36-9", "i386"), deb("data", "1.0", "all")]
    new = [deb("libc6", "2.36-9+deb12u4", "amd64"), deb("data", "2.0", "amd64")]
    d = diff_packages(old, new)
    assert [(c.name, c.new.arch) for c in d.upgraded] == [("data", "amd64"), ("libc6", "amd64")]
    assert [(p.name, p.arch) for p in d.removed] == [("libc6", "i386")]
    assert d.to_json()["upgraded"][0] == {"name": "data", "arch": "amd64", "old": "1.0", "new": "2.0",
                                          "old_arch": "all"}


def test_legacy_name_version_pairs_compare_with_full_lists() -> None:
    # Build records written before arch and source were kept hold (name, version) pairs only.
    old = packages_from_pairs([("libc6", "2.36-9+deb12u3"), ("bash", "5.2.15-2+b2")], "deb")
    new = [deb("libc6", "2.36-9+deb12u4"), deb("bash", "5.2.15-2+b2")]
    d = diff_packages(old, new)
    assert d.unchanged == 1 and [c.name for c in d.upgraded] == ["libc6"] and not d.added and not d.removed


def test_legacy_rpm_pairs_carry_the_arch_in_the_version() -> None:
    old = packages_from_pairs([("bash", "5.1.8-6.el9.x86_64"), ("tzdata", "2024a-1.el9.noarch")], "rpm")
    assert [(p.name, p.version, p.arch) for p in old] == [("bash", "5.1.8-6.el9", "x86_64"),
                                                          ("tzdata", "2024a-1.el9", "noarch")]
    d = diff_packages(old, [rpm("bash", "5.1.8-9.el9"), rpm("tzdata", "2024a-1.el9", "noarch")])
    assert [(c.old.version, c.new.version) for c in d.upgraded] == [("5.1.8-6.el9", "5.1.8-9.el9")]
    assert d.unchanged == 1


def test_mixed_kinds_cannot_be_compared() -> None:
    with pytest.raises(PackageError, match="different kinds"):
        diff_packages([deb("a", "1")], [rpm("a", "1-1")])


def test_render_and_json() -> None:
    d = diff_packages([deb("wget", "1.21.3-1+b2"), deb("a", "1.0"), deb("b", "2.0")],
                      [deb("curl", "7.88.1-10", "amd64"), deb("a", "1.1"), deb("b", "1.0")])
    text = render_diff(d, "generic-dev v3")
    assert text.splitlines() == [
        "packages +1 -1 ~2 vs generic-dev v3 (1 upgraded, 1 downgraded, 0 unchanged)",
        "added:", "  + curl 7.88.1-10 [amd64]",
        "removed:", "  - wget 1.21.3-1+b2 [amd64]",
        "upgraded:", "  ^ a 1.0 -> 1.1 [amd64]",
        "downgraded:", "  v b 2.0 -> 1.0 [amd64]",
    ]
    data = json.loads(json.dumps(d.to_json()))
    assert data["counts"] == {"added": 1, "removed": 1, "upgraded": 1, "downgraded": 1, "unchanged": 0}
    assert data["added"] == [{"name": "curl", "arch": "amd64", "version": "7.88.1-10"}]
    assert data["downgraded"] == [{"name": "b", "arch": "amd64", "old": "2.0", "new": "1.0"}]
    assert render_diff(diff_packages([deb("a", "1")], [deb("a", "1")]), "x").endswith("no package changed\n")


# --------------------------------------------------------------------------- manifest and records


@needs_dpkg
def test_manifest_round_trip_of_the_host_list_fits_the_bound(host_packages: tuple[Package, ...]) -> None:
    pkgs = host_packages
    encoded = encode_manifest(pkgs)
    assert len(encoded) <= MAX_MANIFEST_BYTES
    assert encoded.isascii() and '"' not in encoded and "\n" not in encoded  # safe in KEY = "value"
    assert decode_manifest(encoded) == pkgs
    assert encode_manifest(reversed(pkgs)) == encoded  # deterministic: order and gzip time fixed


def test_manifest_round_trip_rpm() -> None:
    pkgs = parse_rpm_lines(RPM_LINES.splitlines(), marker="KICKGATE-PKG")
    assert decode_manifest(encode_manifest(pkgs)) == pkgs


def test_manifest_over_the_bound_names_the_limit() -> None:
    pkgs = [deb(f"package-{i}", f"{i}.0-1") for i in range(400)]
    size = len(encode_manifest(pkgs))
    with pytest.raises(ManifestTooLarge, match=rf"encodes to {size} bytes, over the {size - 1}-byte limit.*"
                                               "MAX_MANIFEST_BYTES"):
        encode_manifest(pkgs, limit=size - 1)


def _gz(data: bytes) -> str:
    return base64.b64encode(gzip.compress(data, mtime=0)).decode()  # fixed time: the same test ids on every worker


@pytest.mark.parametrize("text", ["not base64!", base64.b64encode(b"plain text").decode(),
                                  _gz(b'{"format": "other"}'),
                                  _gz(b'{"format": "kickgate-packages", "version": 1, "kind": "deb", '
                                      b'"packages": [["a"]]}')])
def test_decode_rejects_what_is_not_a_manifest(text: str) -> None:
    with pytest.raises(PackageError):
        decode_manifest(text)


def test_decode_refuses_a_truncated_manifest() -> None:
    encoded = encode_manifest([deb(f"p{i}", "1.0") for i in range(200)])
    cut = base64.b64encode(base64.b64decode(encoded)[:-40]).decode()
    with pytest.raises(PackageError, match="cut short"):
        decode_manifest(cut)


def test_decode_refuses_a_manifest_that_inflates_without_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packages, "_MAX_INFLATED", 1024 * 1024)  # the real bound is 64 MiB: slow to build
    bomb = base64.b64encode(gzip.compress(b"0" * (2 * 1024 * 1024))).decode()
    with pytest.raises(PackageError, match="inflates beyond"):
        decode_manifest(bomb)
    ok = encode_manifest([deb(f"p{i}", "1.0") for i in range(100)])
    assert len(decode_manifest(ok)) == 100  # under the bound still decodes


def test_future_manifest_version_says_upgrade() -> None:
    doc = json.dumps({"format": "kickgate-packages", "version": 2, "kind": "deb", "packages": []}).encode()
    with pytest.raises(PackageError, match=r"version 2 is not supported.*upgrade kickgate"):
        decode_manifest(base64.b64encode(gzip.compress(doc)).decode())


def test_package_json_round_trip() -> None:
    pkgs = (Package("deb", "libc6", "2.36-9", "amd64", "glibc", "2.36-9", ("LGPL-2.1+",)), deb("x", "1"))
    assert packages_from_json(json.loads(json.dumps(packages_to_json(pkgs)))) == pkgs
    with pytest.raises(PackageError, match="unknown package kind 'apk'"):
        packages_from_json([{"kind": "apk", "name": "x", "version": "1"}])
