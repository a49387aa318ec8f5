"""The rc.local that rc-local-contextualization.sh writes: its checks and its INIT_SCRIPTS runner,
run on this machine with a fake CD directory and stub commands, without a VM.

Only the functions are loaded (the text above the '# --- main' line); the boot-time part, which
would touch /etc and /root, never runs here.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import Need

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "common" / "rc-local-contextualization.sh"


def rc_local_text() -> str:
    text = SCRIPT.read_text()
    m = re.search(r"^cat > \"\$rc\" <<'EOT'\n(.*?)^EOT$", text, re.MULTILINE | re.DOTALL)
    assert m, "test bug: the rc.local here-document was not found"
    return m.group(1)


def functions_only() -> str:
    body = rc_local_text()
    head, sep, _ = body.partition("\n# --- main")
    assert sep, "the rc.local has no '# --- main' line separating its functions from what runs at boot"
    return head + "\n"


def sh(tmp_path: Path, code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run code after the rc.local's functions, with tmp_path/bin first on PATH."""
    lib = tmp_path / "rc-functions.sh"
    lib.write_text(functions_only())
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    full_env = {"PATH": f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), **(env or {})}
    return subprocess.run(["sh", "-c", f'. "$0"\n{code}', str(lib)], capture_output=True, text=True,
                          env=full_env, cwd=tmp_path, timeout=30, check=False)


def stub(tmp_path: Path, name: str, body: str = "") -> Path:
    """A command on PATH that logs its arguments to tmp_path/calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls"\n{body}\n')
    path.chmod(0o755)
    return path


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls"
    return log.read_text().splitlines() if log.exists() else []


def check(tmp_path: Path, function: str, value: str) -> bool:
    result = sh(tmp_path, f'{function} "$V"', env={"V": value})
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


# --------------------------------------------------------------------------- value checks


@pytest.mark.parametrize("value", ["10.0.2.15", "0.0.0.0", "255.255.255.255", "192.168.1.1"])
def test_ipv4_accepted(tmp_path: Path, value: str) -> None:
    assert check(tmp_path, "valid_ipv4", value)


@pytest.mark.parametrize("value", [
    "", "10.0.2", "10.0.2.15.1", "256.1.1.1", "10.0.2.015", "10.0.2.15/24", "10.0.2.15 ", "a.b.c.d",
    "10.0.2.15;reboot", "$(reboot)", "10.0.2.*", "10..2.15", ".10.0.2", "10.0.2.15\n10.0.2.16",
])
def test_ipv4_refused(tmp_path: Path, value: str) -> None:
    assert not check(tmp_path, "valid_ipv4", value)


@pytest.mark.parametrize(("value", "ok"), [
    ("255.255.255.0", True), ("255.255.254.0", True), ("255.0.0.0", True), ("255.255.255.255", True),
    ("255.0.255.0", False), ("255.255.253.0", False), ("24", False), ("255.255.255.0 up", False),
])
def test_netmask(tmp_path: Path, value: str, ok: bool) -> None:
    assert check(tmp_path, "valid_mask", value) is ok


@pytest.mark.parametrize(("value", "ok"), [
    ("52:54:00:12:34:56", True), ("52:54:00:AB:cd:EF", True), ("52:54:00:12:34", False),
    ("52:54:00:12:34:56:78", False), ("52-54-00-12-34-56", False), ("52:54:00:12:34:5g", False),
    ("*", False), ("52:54:00:12:34:56\n", False),
])
def test_mac(tmp_path: Path, value: str, ok: bool) -> None:
    assert check(tmp_path, "valid_mac", value) is ok


@pytest.mark.parametrize(("value", "ok"), [
    ("kg-1a2b3c4d", True), ("node.example.org", True), ("a", True), ("x" * 63, True),
    ("x" * 64, False), ("-lead", False), ("trail-", False), ("a..b", False), ("a b", False),
    ("a;reboot", False), ("$(reboot)", False), ("a_b", False), ("", False), ("host\nevil", False),
    (".".join(["x" * 63] * 4), False),
])
def test_hostname(tmp_path: Path, value: str, ok: bool) -> None:
    assert check(tmp_path, "valid_hostname", value) is ok


# --------------------------------------------------------------------------- the CONTEXT device


def test_context_device_ignores_a_disk_carrying_the_label(tmp_path: Path) -> None:
    # A second disk labelled CONTEXT, by-label pointing at it and blkid naming it: no device.
    stub(tmp_path, "blkid", "echo /dev/vdb1")
    link = tmp_path / "by-label-CONTEXT"
    link.symlink_to("/dev/null")
    result = sh(tmp_path, f'BYLABEL={link}\ncontext_device')
    assert result.returncode == 1
    assert result.stdout == ""
    assert "/dev/vdb1" in result.stderr and "not a CD-ROM" in result.stderr
    assert calls(tmp_path) == ["blkid -t LABEL=CONTEXT -o device"]


def _a_disk() -> str | None:
    for name in sorted(os.listdir("/sys/class/block")):
        path = Path("/dev") / name
        if not name.startswith("sr") and path.is_block_device():
            return str(path)
    return None


def test_context_device_ignores_a_real_disk_carrying_the_label(tmp_path: Path, need: Need) -> None:
    disk = _a_disk()
    need.that(None if disk else "no block device in /sys/class/block to stand for a disk labelled CONTEXT "
              "(run on a machine or VM with a disk)")
    assert disk is not None
    stub(tmp_path, "blkid", f"echo {disk}")
    result = sh(tmp_path, f"BYLABEL={tmp_path}/absent\ncontext_device")
    assert result.returncode == 1 and result.stdout == ""
    assert f"ignoring {disk}" in result.stderr


def test_context_device_needs_a_block_device(tmp_path: Path) -> None:
    # /dev/sr7 by name only: not a block device on this machine, so not a CD drive to mount.
    assert not Path("/dev/sr7").exists()
    stub(tmp_path, "blkid", "echo /dev/sr7")
    result = sh(tmp_path, f"BYLABEL={tmp_path}/absent\ncontext_device")
    assert result.returncode == 1 and result.stdout == ""


def test_rc_local_mounts_iso9660_read_only_nosuid_nodev_noexec() -> None:
    mounts = [ln.strip() for ln in rc_local_text().splitlines() if re.match(r"\s*mount\s", ln)]
    assert len(mounts) == 1, mounts
    assert re.search(r"-t iso9660 -o ro,nosuid,nodev,noexec \"\$dev\" \"\$MNT\"", mounts[0]), mounts[0]


# --------------------------------------------------------------------------- INIT_SCRIPTS


@pytest.fixture
def cd(tmp_path: Path) -> Path:
    """A fake context CD: context.sh, two good scripts, and bait that must never run."""
    ran = tmp_path / "ran"
    cd = tmp_path / "cd"
    (cd / "a").mkdir(parents=True)
    (cd / "context.sh").write_text("SET_HOSTNAME='kg-test'\n")
    for name in ("first.sh", "second.sh", "a/b", "star.sh"):
        (cd / name).write_text(f'echo "{name} $SET_HOSTNAME $(pwd)" >> "{ran}"\n')
    (tmp_path / "x").write_text(f'echo "../x" >> "{ran}"\n')  # one level above the CD
    (cd / "link.sh").symlink_to(tmp_path / "x")  # a link leading off the CD
    (tmp_path / "work").mkdir()
    return cd


def ran(tmp_path: Path) -> list[str]:
    path = tmp_path / "ran"
    return path.read_text().splitlines() if path.exists() else []


def test_init_scripts_run_in_order_with_the_context(tmp_path: Path, cd: Path) -> None:
    result = sh(tmp_path, f'run_init_scripts "{cd}" "{tmp_path}/work" "second.sh first.sh"')
    assert result.returncode == 0, result.stderr
    work = tmp_path / "work"
    assert ran(tmp_path) == [f"second.sh kg-test {work}", f"first.sh kg-test {work}"]
    assert "running init script second.sh\nrunning init script first.sh" in result.stdout


@pytest.mark.parametrize("entry", ["../x", "a/b", "*", "st*", "$(touch pwned)", "`touch pwned`",
                                   "link.sh", "..", ".", "/etc/passwd", "first.sh;touch pwned",
                                   "missing.sh"])
def test_bad_init_script_entries_never_run(tmp_path: Path, cd: Path, entry: str) -> None:
    result = sh(tmp_path, f'run_init_scripts "{cd}" "{tmp_path}/work" "$LIST"',
                env={"LIST": f"first.sh {entry} second.sh"})
    assert result.returncode == 0, result.stderr
    assert ran(tmp_path) == [f"first.sh kg-test {tmp_path}/work", f"second.sh kg-test {tmp_path}/work"]
    assert not list(tmp_path.rglob("pwned"))
    assert "skipped an entry" in result.stdout or "not on the CD" in result.stdout


def test_init_scripts_run_with_sh_not_exec(tmp_path: Path, cd: Path) -> None:
    # The CD is mounted noexec: a script without the x bit must still run.
    (cd / "first.sh").chmod(0o644)
    result = sh(tmp_path, f'run_init_scripts "{cd}" "{tmp_path}/work" first.sh')
    assert result.returncode == 0 and ran(tmp_path) == [f"first.sh kg-test {tmp_path}/work"]


# --------------------------------------------------------------------------- networks


@pytest.fixture
def sysnet(tmp_path: Path) -> Path:
    net = tmp_path / "sys-class-net"
    for name, mac in (("eth0", "52:54:00:12:34:56"), ("lo", "00:00:00:00:00:00")):
        (net / name).mkdir(parents=True)
        (net / name / "address").write_text(mac + "\n")
    stub(tmp_path, "ip")
    return net


def network(tmp_path: Path, sysnet: Path, **values: str) -> subprocess.CompletedProcess[str]:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    env = {f"ETH0_{k}": v for k, v in values.items()}
    return sh(tmp_path, f"SYSNET={sysnet}\nRESOLV={resolv}\napply_network 0", env=env)


def test_network_applied_by_mac(tmp_path: Path, sysnet: Path) -> None:
    result = network(tmp_path, sysnet, MAC="52:54:00:12:34:56", IP="10.0.2.15", MASK="255.255.255.0",
                     GATEWAY="10.0.2.2", DNS="10.0.2.3 2001:db8::53")
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == ["ip link set dev eth0 up", "ip addr flush dev eth0",
                               "ip addr add 10.0.2.15/24 dev eth0",
                               "ip route replace default via 10.0.2.2 dev eth0"]
    assert (tmp_path / "resolv.conf").read_text() == "nameserver 10.0.2.3\nnameserver 2001:db8::53\n"


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("IP", "10.0.2.15 dev lo; reboot", ["ip link set dev eth0 up"]),
    ("MASK", "255.0.255.0", ["ip link set dev eth0 up"]),
    ("GATEWAY", "$(reboot)", ["ip link set dev eth0 up", "ip addr flush dev eth0",
                              "ip addr add 10.0.2.15/24 dev eth0"]),
])
def test_malformed_address_skipped_and_logged(tmp_path: Path, sysnet: Path, key: str, value: str,
                                              expected: list[str]) -> None:
    good = {"MAC": "52:54:00:12:34:56", "IP": "10.0.2.15", "MASK": "255.255.255.0", "GATEWAY": "10.0.2.2"}
    result = network(tmp_path, sysnet, **{**good, key: value})
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == expected
    assert f"ETH0_{key} is not" in result.stdout


def test_malformed_dns_entries_skipped(tmp_path: Path, sysnet: Path) -> None:
    result = network(tmp_path, sysnet, MAC="52:54:00:12:34:56", DNS="10.0.2.3\nsearch evil.example *")
    assert (tmp_path / "resolv.conf").read_text() == "nameserver 10.0.2.3\n"
    assert result.stdout.count("skipped DNS entry") == 3  # search, evil.example and *


def test_malformed_mac_touches_nothing(tmp_path: Path, sysnet: Path) -> None:
    result = network(tmp_path, sysnet, MAC="*", IP="10.0.2.15")
    assert calls(tmp_path) == []
    assert "ETH0_MAC is not a MAC address" in result.stdout


def test_functions_part_runs_nothing_at_load(tmp_path: Path) -> None:
    # Sourcing the functions must not mount, log or configure anything.
    for name in ("mount", "ip", "blkid", "hostname", "umount"):
        stub(tmp_path, name)
    result = sh(tmp_path, "true")
    assert result.returncode == 0 and result.stdout == "" and calls(tmp_path) == []
