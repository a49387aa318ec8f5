"""Clones are distinct machines, and nothing from build time lets anyone in."""

from __future__ import annotations

from typing import Any


def _identity(run: Any) -> tuple[str, str]:
    machine_id = run("cat /etc/machine-id").strip()
    hostkey = run("cat /etc/ssh/ssh_host_ed25519_key.pub").split()[1]
    return machine_id, hostkey


def test_two_clones_differ_in_machine_id_and_host_keys(instance: Any, instance_factory: Any) -> None:
    other = instance_factory()
    a = _identity(lambda c: instance.run(c)[1])
    b = _identity(lambda c: other.run(c)[1])
    assert a[0] and b[0], "an instance has an empty machine-id"
    assert a[0] != b[0], f"two instances share the machine-id {a[0]}"
    assert a[1] != b[1], "two instances share the SSH host key: keys were baked into the image"


def test_host_keys_made_at_first_boot(host: Any) -> None:
    boot = int(host.check_output("awk '/^btime/ {print $2}' /proc/stat"))
    made = int(host.check_output("stat -c %Y /etc/ssh/ssh_host_ed25519_key"))
    assert made >= boot - 5, "the SSH host key predates this boot: it was baked into the image"


def test_no_build_time_password_or_key(host: Any, instance: Any) -> None:
    root = host.check_output("getent shadow root").split(":")[1]
    assert root.startswith(("!", "*")) or root == "", "root has a usable password in the image"
    users = host.check_output("getent shadow").splitlines()
    with_password = [u.split(":")[0] for u in users if u.split(":")[1] not in ("", "*", "!", "!!", "!*")
                     and not u.split(":")[1].startswith(("!", "*"))]
    assert with_password == [], f"accounts with a password: {with_password}"
    keys = host.run("ls /home/*/.ssh/authorized_keys* /root/.ssh/authorized_keys2 2>/dev/null").stdout.split()
    assert keys == [], f"build-time authorized_keys remain: {keys}"
    root_keys = host.file("/root/.ssh/authorized_keys").content_string.strip().splitlines()
    assert root_keys == [instance.key.public_line], "root trusts a key other than this instance's context key"
