"""Clones are distinct machines, and nothing from build time lets anyone in."""

from __future__ import annotations

import shlex
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from guestcmd import run
from judgements import password_problems


def served_host_keys(host: Any) -> dict[str, str]:
    """Every host key sshd serves: path → public key ("type base64"), from `sshd -T`'s hostkey lines.

    sshd skips a configured key file that does not exist, so such a file is not served.
    """
    paths = [line.split(None, 1)[1].strip() for line in run(host, "sshd -T").splitlines()
             if line.lower().startswith("hostkey ")]
    keys = {}
    for path in paths:
        if host.file(path).exists:
            keys[path] = " ".join(run(host, f"ssh-keygen -y -f {shlex.quote(path)}").split()[:2])
    assert keys, f"sshd -T names no host key file that exists ({paths})"
    return keys


def test_two_clones_differ_in_machine_id_and_host_keys(host: Any, instance: Any, instance_factory: Any) -> None:
    other = instance_factory()

    def identity(inst: Any, h: Any) -> tuple[str, dict[str, str], str]:
        return run(h, "cat /etc/machine-id").strip(), served_host_keys(h), inst.served_host_key()

    # Two guests, each on its own emulated CPU: asked at the same time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(identity, (instance, other), (host, other.host)))
    ids = [a[0] for a in answers]
    keys = [a[1] for a in answers]
    handshake = [a[2] for a in answers]
    problems = []
    if not all(ids):
        problems.append("an instance has an empty machine-id")
    elif ids[0] == ids[1]:
        problems.append(f"two instances share the machine-id {ids[0]}")
    shared = sorted(path for path, key in keys[0].items() if key in keys[1].values())
    if shared:
        problems.append(f"two instances serve the same SSH host key from {', '.join(shared)}: "
                        "keys were baked into the image")
    if handshake[0] == handshake[1]:
        problems.append(f"two instances present the same host key in the SSH handshake ({handshake[0].split()[0]})")
    for inst, served, presented in zip((instance, other), keys, handshake, strict=True):
        if presented not in served.values():
            problems.append(f"{inst.name} presented a host key that none of sshd -T's hostkey files holds")
    assert not problems, "; ".join(problems)


def test_host_keys_made_at_first_boot(host: Any) -> None:
    boot = int(run(host, "awk '/^btime/ {print $2}' /proc/stat").strip())
    files = []
    for path in served_host_keys(host):
        files.append(path)
        if host.file(path + ".pub").exists:
            files.append(path + ".pub")
    made = run(host, "stat -c '%Y %n' " + " ".join(shlex.quote(f) for f in files)).splitlines()
    old = [line.split(" ", 1)[1] for line in made if int(line.split(" ", 1)[0]) < boot - 5]
    assert old == [], f"SSH host keys that sshd serves predate this boot (baked into the image): {', '.join(old)}"


def test_no_account_has_an_empty_or_usable_password(host: Any) -> None:
    problems = password_problems(run(host, "getent passwd"), run(host, "getent shadow"))
    assert problems == [], f"accounts open to a password login: {', '.join(problems)}"


def test_no_build_time_authorized_keys(host: Any, instance: Any) -> None:
    homes = [d for d in ("/home", "/root") if host.file(d).is_directory]
    found = run(host, "find " + " ".join(homes) + " -path '*/.ssh/authorized_keys*'").split()
    # contextualization writes root's authorized_keys at every boot: it must hold only this boot's key
    keys = [f for f in found if f != "/root/.ssh/authorized_keys"]
    assert keys == [], f"build-time authorized_keys remain: {keys}"
    root_keys = host.file("/root/.ssh/authorized_keys").content_string.strip().splitlines()
    assert root_keys == [instance.key.public_line], "root trusts a key other than this instance's context key"
