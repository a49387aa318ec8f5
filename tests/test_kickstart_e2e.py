"""The kickstart method end to end with a stand-in installer (see tests/standin.py).

No RHEL-family mirror is reachable, so the installer is a busybox initramfs booted by the host's
Debian kernel: everything of the method is real (install tree, .treeinfo and checksums, kickstart
rendering and validation, injection into the initrd, direct kernel boot in a libvirt domain,
serial console follower, watchdogs, the build record), except that Anaconda is played by a
shell script.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import standin

from builder.build import build_image
from builder.errors import BuildError
from builder.hypervisor import Hypervisor
from builder.method import BuildOptions
from builder.render import render_kickstart
from builder.run import run
from conftest import Need

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _prerequisites(need: Need) -> None:
    need.that(standin.missing_prerequisites())


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in installer's files, built once: kernel and xz initramfs, a tree, an ISO."""
    base = tmp_path_factory.mktemp("standin")
    kernel = standin.host_kernel()
    assert kernel is not None
    initrd = standin.build_initramfs(kernel, base / "initrd.img")
    tree = standin.make_tree(base / "tree", kernel.path, initrd)
    standin.make_iso(base / "standin.iso", tree)
    return base


@pytest.fixture(scope="module")
def hypervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hypervisor]:
    accel = os.environ.get("KICKGATE_ACCEL", "auto")
    probe_cache = tmp_path_factory.mktemp("accel")  # the KVM probe runs once per module
    with Hypervisor(accel=accel, cache_dir=probe_cache) as hv:  # type: ignore[arg-type]
        yield hv


def active_domains(hv: Hypervisor) -> list[str]:
    import libvirt

    return [d.name() for d in hv._conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]


def assert_no_leftovers(hv: Hypervisor, tmp_path: Path) -> None:
    assert active_domains(hv) == []
    # No QEMU process of this test survives (matched by the test's own paths, so that other
    # QEMUs on the machine do not matter).
    left = run(["pgrep", "-f", f"qemu-system.*{tmp_path}"], timeout=10, check=False)
    assert left.returncode == 1, left.stdout


def raw_head(image: Path, tmp_path: Path, size: int = 4096) -> bytes:
    raw = tmp_path / "check.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], timeout=120)
    with open(raw, "rb") as f:
        return f.read(size)


def test_install_end_to_end(standin_dir: Path, hypervisor: Hypervisor, tmp_path: Path) -> None:
    tree = standin_dir / "tree"
    recipe = standin.recipe_copy(tmp_path / "root", str(tree))
    options = BuildOptions(cache_dir=tmp_path / "cache")
    lines: list[str] = []
    art = build_image(recipe, hypervisor, options, on_console_line=lines.append)

    record = art.record
    assert not art.cached and art.image.is_file() and art.image.suffix == ".qcow2"
    assert record.method == "kickstart" and record.family == "rhel"
    assert {"fetch-installer", "render", "inject", "install", "convert"} <= set(record.timings)
    assert record.domain_type in ("qemu", "kvm")
    assert record.build_mac.startswith("52:54:00:")
    assert [(p.name, p.arch, p.source) for p in record.packages] == [("busybox", "x86_64", "busybox"),
                                                                     ("stand-in", "x86_64", "stand-in")]
    assert record.packages[1].version == "1.0-1" and record.packages[1].licences == ("MIT",)
    assert record.extra["install_source"] == "tree"
    assert record.extra["location"] == str(tree)
    kernel_sum = standin.sha256(tree / "images/pxeboot/vmlinuz")
    assert record.extra["installer_kernel_sha256"] == kernel_sum
    assert record.extra["inst_repo"].startswith("http://10.0.2.2:")

    # The stand-in saw the injected kickstart, byte for byte, and reached the served tree.
    ks_sum = hashlib.sha256(render_kickstart(recipe, env={}).encode()).hexdigest()
    serial = art.serial_log.read_text(errors="replace")
    assert f"sha256 {ks_sum}" in serial
    assert "stand-in: inst.repo reachable" in serial
    assert "KICKGATE-INSTALL-OK" in serial and any("KICKGATE-INSTALL-OK" in ln for ln in lines)

    # The marker it wrote to /dev/vda is in the artifact.
    head = raw_head(art.image, tmp_path)
    assert head.startswith(standin.DISK_MARKER)
    assert f"ks.cfg sha256 {ks_sum}".encode() in head
    assert b"inst.ks=file:/ks.cfg" in head and b"console=ttyS0,115200" in head

    # Same recipe again: from the cache, nothing boots.
    again = build_image(recipe, hypervisor, options)
    assert again.cached and again.record.image_sha256 == record.image_sha256
    assert_no_leftovers(hypervisor, tmp_path)


def test_install_from_iso(standin_dir: Path, hypervisor: Hypervisor, tmp_path: Path) -> None:
    iso = standin_dir / "standin.iso"
    recipe = standin.recipe_copy(tmp_path / "root", "https://unreachable.invalid/os/")
    options = BuildOptions(cache_dir=tmp_path / "cache", location=str(iso))
    art = build_image(recipe, hypervisor, options)
    assert art.record.extra["install_source"] == "iso"
    assert art.record.extra["inst_repo"] == "cdrom"
    assert raw_head(art.image, tmp_path).startswith(standin.DISK_MARKER)
    assert b"inst.repo=cdrom" in raw_head(art.image, tmp_path)
    assert_no_leftovers(hypervisor, tmp_path)


def test_hanging_installer_is_stopped_by_the_idle_watchdog(
        standin_dir: Path, hypervisor: Hypervisor, tmp_path: Path) -> None:
    recipe = standin.recipe_copy(tmp_path / "root", str(standin_dir / "tree"),
                                 extra_args=("standin=hang",), idle_timeout="8s",
                                 build_timeout="60s")
    with pytest.raises(BuildError) as exc:
        build_image(recipe, hypervisor, BuildOptions(cache_dir=tmp_path / "cache"))
    err = exc.value
    assert err.stage == "install"
    assert err.reason.startswith("inactivity watchdog") and "8s" in err.reason
    assert "stand-in: hanging on purpose" in err.serial_tail
    assert len(err.serial_tail) <= 40
    assert err.serial_log is not None and Path(err.serial_log).is_file()  # kept for the user
    assert_no_leftovers(hypervisor, tmp_path)
    assert not list((tmp_path / "cache" / "images" / recipe.name).glob("*/record.json"))


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("nomarker", "powered off without printing KICKGATE-INSTALL-OK"),
     ("fail", "failure marker on the console: "
              "'KICKGATE-INSTALL-FAILED stand-in: failing on purpose'")],
    ids=["nomarker", "fail"],
)
def test_installer_that_does_not_succeed(standin_dir: Path, hypervisor: Hypervisor, tmp_path: Path,
                                         mode: str, reason: str) -> None:
    recipe = standin.recipe_copy(tmp_path / "root", str(standin_dir / "tree"),
                                 extra_args=(f"standin={mode}",))
    with pytest.raises(BuildError) as exc:
        build_image(recipe, hypervisor, BuildOptions(cache_dir=tmp_path / "cache"))
    assert exc.value.stage == "install"
    assert reason in exc.value.reason
    assert any("stand-in:" in line for line in exc.value.serial_tail)
    assert_no_leftovers(hypervisor, tmp_path)


def test_interrupt_destroys_the_install_domain(standin_dir: Path, hypervisor: Hypervisor,
                                               tmp_path: Path) -> None:
    recipe = standin.recipe_copy(tmp_path / "root", str(standin_dir / "tree"),
                                 extra_args=("standin=hang",))

    def interrupt(line: str) -> None:
        if "stand-in: hanging" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_image(recipe, hypervisor, BuildOptions(cache_dir=tmp_path / "cache"),
                    on_console_line=interrupt)
    assert_no_leftovers(hypervisor, tmp_path)


# A SHA-512 crypt(3) hash, distinctive enough that any copy of it, or of its salt, is found.
ROOTPW_HASH = "$6$kgE2eSalt$" + "Xr7" * 28 + "q1"


def files_holding(root: Path, needles: tuple[bytes, ...], *, besides: tuple[Path, ...] = ()) -> list[str]:
    return sorted(str(p) for p in root.rglob("*")
                  if p.is_file() and p not in besides and any(n in p.read_bytes() for n in needles))


def test_root_password_hash_reaches_the_installer_and_nothing_else(
        standin_dir: Path, hypervisor: Hypervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KICKGATE_ROOTPW_HASH", ROOTPW_HASH)
    caplog.set_level(logging.DEBUG)  # every log line kickgate writes, the serial console's included
    needles = (ROOTPW_HASH.encode(), b"kgE2eSalt")
    cache = tmp_path / "cache"
    options = BuildOptions(cache_dir=cache, console=True)
    lines: list[str] = []

    # A failed install: the error, its serial tail and the kept serial log.
    failing = standin.recipe_copy(tmp_path / "failing", str(standin_dir / "tree"), extra_args=("standin=fail",))
    with pytest.raises(BuildError) as exc:
        build_image(failing, hypervisor, options, on_console_line=lines.append)
    assert "failing on purpose" in exc.value.reason
    assert not any(n.decode() in str(exc.value) + "\n".join(exc.value.serial_tail) for n in needles)

    # A good one: the installer gets the hash (the kickstart it checked is the one that holds it).
    recipe = standin.recipe_copy(tmp_path / "root", str(standin_dir / "tree"))
    kickstart = render_kickstart(recipe)
    assert f"rootpw --iscrypted {ROOTPW_HASH}" in kickstart
    art = build_image(recipe, hypervisor, options, on_console_line=lines.append)
    serial = art.serial_log.read_text(errors="replace")
    assert f"sha256 {hashlib.sha256(kickstart.encode()).hexdigest()}" in serial

    # The image holds what the installer wrote (a real one puts the hash in /etc/shadow, by design);
    # everything else kickgate keeps must not: record, serial logs, kept logs of failed builds, staging.
    assert files_holding(cache, needles, besides=(art.image,)) == []
    assert (art.image.parent / "record.json").is_file() and art.serial_log.is_file()
    assert list((cache / "logs").iterdir()), "the failed build's serial log was not kept"
    assert not any(n.decode() in repr(art.record) for n in needles)
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, "\n".join(lines)):
        assert "kgE2eSalt" not in text
    assert "rendered kickstart" in caplog.text, "the debug log this test searches was not captured"
    assert_no_leftovers(hypervisor, tmp_path)
