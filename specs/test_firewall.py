"""An active restrictive firewall from the first boot: inbound drops all but loopback, replies and SSH."""

from __future__ import annotations

import socket
import time
from typing import Any

PROBE_PORT = 8080


def _firewall_service(host: Any, rhel: bool) -> str:
    names = ("iptables", "firewalld", "nftables") if rhel else ("netfilter-persistent", "nftables", "ufw")
    for name in names:
        if host.service(name).is_enabled:
            return name
    raise AssertionError(f"no firewall service enabled (looked for {', '.join(names)})")


def test_firewall_service_enabled_and_active(host: Any, rhel: bool) -> None:
    name = _firewall_service(host, rhel)
    state = host.run(f"systemctl is-active {name}").stdout.strip()
    assert state == "active", f"firewall service {name} is enabled but {state}"


def test_inbound_default_is_drop(host: Any) -> None:
    rules = host.check_output("iptables -S INPUT")
    policy_drop = "-P INPUT DROP" in rules
    final_reject = rules.strip().splitlines()[-1].endswith(("-j DROP", "-j REJECT"))
    assert policy_drop or final_reject, f"inbound traffic is not dropped by default:\n{rules}"


def test_ssh_allowed(host: Any) -> None:
    rules = host.check_output("iptables -S INPUT")
    assert "--dport 22" in rules and "-j ACCEPT" in rules, f"no rule accepts SSH:\n{rules}"


def _banner(port: int, timeout: float = 6.0) -> bytes:
    """What a TCP client on the host reads first from the forwarded port (sshd speaks first)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(32)
    except OSError:
        return b""


def test_listener_is_blocked_but_ssh_is_not(host: Any, instance: Any) -> None:
    # A second sshd is a listener every image has; it answers with a banner when reachable.
    host.run(f"/usr/sbin/sshd -p {PROBE_PORT} -o PidFile=/run/kickgate-probe.pid")
    try:
        for _ in range(20):
            if host.run(f"ss -Hltn 'sport = :{PROBE_PORT}'").stdout.strip():
                break
            time.sleep(0.5)
        local = host.run(f"timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{PROBE_PORT}; head -c 7 <&3'")
        assert local.stdout.startswith("SSH-"), "the probe listener does not answer inside the guest"
        assert _banner(instance.host_port(22)).startswith(b"SSH-"), "SSH is not reachable from the host"
        leaked = _banner(instance.host_port(PROBE_PORT))
        assert not leaked.startswith(b"SSH-"), f"port {PROBE_PORT} is reachable from outside the guest"
    finally:
        host.run("kill $(cat /run/kickgate-probe.pid) 2>/dev/null; rm -f /run/kickgate-probe.pid")
