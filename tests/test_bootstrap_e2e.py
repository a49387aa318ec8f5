"""The bootstrap method for real: generic-dev is built under libvirt/QEMU and boots to a login prompt."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from builder import build as build_module
from builder.build import Artifact, build_image
from builder.console import Outcome, watch
from builder.disk import create_overlay, image_info, unclean
from builder.domain import Disk, DomainSpec, domain_xml
from builder.fsutil import sha256_file
from builder.hypervisor import Hypervisor
from builder.method import BuildOptions
from builder.recipe import RecipeBook

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifact(repo_root: Path, shared_cache_dir: Path) -> Artifact:
    recipe = RecipeBook(repo_root).load("generic-dev")
    with Hypervisor(cache_dir=shared_cache_dir) as hv:
        return build_image(recipe, hv, BuildOptions(cache_dir=shared_cache_dir))


def test_artifact_is_the_recorded_qcow2(artifact: Artifact) -> None:
    info = image_info(artifact.image)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 3 * 1024**3
    assert sha256_file(artifact.image) == artifact.record.image_sha256
    assert artifact.image.stat().st_size == artifact.record.image_size
    record = json.loads(artifact.record_path.read_text())
    assert record["recipe"] == "generic-dev" and record["method"] == "bootstrap"
    assert record["git_revision"] == "" or len(record["git_revision"]) == 40
    assert {"mmdebstrap", "disk", "finish-vm", "convert"} <= set(record["timings"])
    packages = {p["name"]: p for p in record["packages"]}
    assert "openssh-server" in packages and "linux-image-amd64" in packages
    assert packages["openssh-server"]["source"] == "openssh" and packages["openssh-server"]["arch"] == "amd64"
    assert "KICKGATE-FINISH-OK" in artifact.serial_log.read_text()


def test_shipped_root_filesystem_is_clean(artifact: Artifact, tmp_path: Path) -> None:
    # Unmounted cleanly by the finish VM: no instance starts by replaying a journal or deleting orphans.
    raw = tmp_path / "shipped.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(artifact.image), str(raw)], check=True, timeout=300)
    assert unclean(raw) == []


def test_post_install_scripts_ran_in_order(artifact: Artifact) -> None:
    serial = artifact.serial_log.read_text()
    steps = [line.split()[1] for line in serial.splitlines() if line.startswith("KICKGATE-STEP-BEGIN")]
    assert steps == ["bootloader", "post-00-common-clear-network-config.sh",
                     "post-01-common-rc-local-contextualization.sh", "post-02-common-firewall-config.sh",
                     "post-03-common-ssh-first-boot.sh", "post-04-common-seal.sh", "post-05-node-sudoers.sh",
                     "post-06-node-motd.sh", "seal"]


def test_finish_vm_boots_the_unpacked_kernel_and_small_initramfs(artifact: Artifact) -> None:
    # The fast direct boot falls back silently where it cannot be made; on Debian's kernels it can,
    # so a fallback here is a regression worth ~9 s of every build.
    assert artifact.record.extra["finish_kernel"] == "pvh"
    assert artifact.record.extra["finish_initramfs"] == "kickgate"
    serial = artifact.serial_log.read_text()
    mounted = "kickgate-initramfs: /dev/vda1 mounted rw, starting /root/kickgate/finish.sh"
    assert mounted in serial, serial[-2000:]
    assert "Starting systemd-udevd" not in serial.split("KICKGATE-STEP-BEGIN")[0]


def test_unchanged_recipe_is_reused_fast(repo_root: Path, shared_cache_dir: Path, artifact: Artifact,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build(*_args: object, **_kw: object) -> None:
        raise AssertionError("an unchanged recipe was built again")

    monkeypatch.setattr(build_module, "_build_uncached", no_build)
    recipe = RecipeBook(repo_root).load("generic-dev")
    with Hypervisor(cache_dir=shared_cache_dir) as hv:
        start = time.monotonic()
        again = build_image(recipe, hv, BuildOptions(cache_dir=shared_cache_dir))
        elapsed = time.monotonic() - start
    assert again.cached and again.image == artifact.image
    # The README's "well under 2 s" is measured by bench/; here only a margin of 10x that holds
    # on a loaded 2-core machine (the hit re-hashes the image), to catch a hit that does real work.
    assert elapsed < 20.0, f"cache hit took {elapsed:.2f}s"


def test_image_boots_to_a_login_prompt(artifact: Artifact, shared_cache_dir: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    create_overlay(artifact.image, overlay, "qcow2")
    serial = tmp_path / "serial.log"
    with Hypervisor(cache_dir=shared_cache_dir) as hv:
        name = f"kg-e2e-{uuid.uuid4().hex[:6]}"
        spec = DomainSpec(name=name, type=hv.domain_type(), memory_mib=1024, vcpus=1, serial_log=serial,
                          disks=(Disk(overlay, "qcow2"),), on_reboot="restart")
        dom = hv.start(domain_xml(spec), name)
        # Not anchored at the line's end: a late kernel message (udev still loads modules) may be
        # printed on the prompt's line before the console is read.
        outcome, w = watch(dom, hv.is_active, serial, timeout=240, idle_timeout=120, wait_for=[r"\S+ login: "])
    assert outcome is Outcome.MATCHED, f"no login prompt ({outcome.value}):\n" + "\n".join(w.tail_lines())
    text = serial.read_text(errors="replace")
    assert "GRUB" in text or "Booting" in text, "the image did not boot through its own bootloader"
    assert sha256_file(artifact.image) == artifact.record.image_sha256, "booting an overlay wrote the base"


def test_finish_vm_failure_names_stage_and_serial_tail(repo_root: Path, shared_cache_dir: Path,
                                                       tmp_path: Path) -> None:
    """A failing post-install script ends the build at once with the stage and the serial tail."""
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(repo_root / "images" / "generic-dev", root / "images" / "broken-post")
    shutil.copytree(repo_root / "scripts", root / "scripts")
    toml = root / "images" / "broken-post" / "image.toml"
    toml.write_text(toml.read_text().replace('name = "generic-dev"', 'name = "broken-post"')
                    .replace('node = ["sudoers.sh", "motd.sh"]', 'node = ["sudoers.sh", "motd.sh", "fail.sh"]'))
    fail = root / "images" / "broken-post" / "scripts" / "node" / "fail.sh"
    fail.write_text("#!/bin/sh\necho 'about to fail on purpose'\nexit 3\n")
    fail.chmod(0o755)
    from builder.errors import BuildError

    recipe = RecipeBook(root).load("broken-post")
    with Hypervisor(cache_dir=shared_cache_dir) as hv, pytest.raises(BuildError) as err:
        build_image(recipe, hv, BuildOptions(cache_dir=shared_cache_dir))
    assert err.value.stage == "finish-vm"
    # The script's exit ended the build, not a watchdog or the timeout (their reasons say so).
    assert err.value.reason.startswith("failure marker on the console"), err.value.reason
    assert "post-07-node-fail.sh exited 3" in err.value.reason
    assert any("about to fail on purpose" in line for line in err.value.serial_tail)
    assert err.value.serial_log and Path(err.value.serial_log).is_file()
    leftovers = list((shared_cache_dir / "tmp").glob("broken-post-*"))
    assert leftovers == [], f"staging left behind: {leftovers}"
    assert list((shared_cache_dir / "images" / "broken-post").glob("*/record.json")) == [], "a failed build is cached"


def test_build_mac_recorded(artifact: Artifact) -> None:
    # Its randomness is random_mac()'s, tested by property in test_domain.py.
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", artifact.record.build_mac), artifact.record.build_mac
