"""An active restrictive firewall from the first boot: inbound IPv4 and IPv6 drop all but loopback, replies and SSH.

The rules are judged from whichever tool the image uses: the nftables ruleset (`nft -j list
ruleset`, which also holds iptables-nft's tables) or iptables-save / ip6tables-save. The probe
then proves it: listeners on several TCP ports and a UDP port are unreachable from outside.
"""

from __future__ import annotations

import selectors
import shlex
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from guestcmd import has_tool, run, run_rc
from judgements import (
    IPV4,
    IPV6,
    InputChain,
    accepted_tcp_ports,
    inbound_problems,
    iptables_input_chains,
    nft_input_chains,
)

# Forwarded from the host (builder.instance's extra_guest_ports): a web, a database, a Docker port.
PROBE_TCP_PORTS = (8080, 5432, 2375)
PROBE_UDP_PORT = 1194  # and the next port, for IPv6
PROBE_PID = "/run/kickgate-probe.pid"
# The user-mode NIC forwards TCP only, from IPv4: UDP and IPv6 come from a network namespace in
# the guest whose veth peer delivers them to the input hook like any packet from outside.
NETNS = "kickgate-probe"
NETNS_ADDR = {IPV4: ("192.0.2.1", "192.0.2.2/24", "192.0.2.1/24"),
              IPV6: ("2001:db8:4b47::1", "2001:db8:4b47::2/64", "2001:db8:4b47::1/64")}


def _firewall_service(host: Any, rhel: bool) -> str:
    names = ("iptables", "firewalld", "nftables") if rhel else ("nftables", "netfilter-persistent", "ufw")
    for name in names:
        # is-enabled answers 1 for a disabled unit and, on newer systemd, 4 for one that does not exist.
        rc, _ = run_rc(host, f"systemctl is-enabled {name}.service", ok=(0, 1, 4))
        if rc == 0:
            return name
    raise AssertionError(f"no firewall service enabled (looked for {', '.join(names)})")


def input_chains(host: Any) -> list[InputChain]:
    """Every base chain on the input hook, from the tool the image uses (both, when both are in use)."""
    nft = has_tool(host, "nft")
    chains = nft_input_chains(run(host, "nft -j list ruleset")) if nft else []
    # iptables-nft's tables are in the nft ruleset already; legacy iptables' are not.
    ipt_in_nft = nft and has_tool(host, "iptables") and "nf_tables" in run(host, "iptables -V")
    tools = [t for t in ("iptables-save", "ip6tables-save") if has_tool(host, t)]
    if not ipt_in_nft:
        for tool in tools:
            chains += iptables_input_chains(run(host, tool), IPV6 if tool.startswith("ip6") else IPV4)
    if not nft and not tools:
        raise AssertionError("neither nft nor iptables-save is installed: the firewall cannot be judged")
    return chains


def test_firewall_service_enabled_and_active(host: Any, rhel: bool) -> None:
    name = _firewall_service(host, rhel)
    _, state = run_rc(host, f"systemctl is-active {name}.service", ok=(0, 3))
    assert state.strip() == "active", f"firewall service {name} is enabled but {state.strip()}"


def test_inbound_ipv4_dropped_by_default(host: Any) -> None:
    problems = inbound_problems(input_chains(host), IPV4)
    assert problems == [], "inbound traffic is not dropped by default: " + "; ".join(problems)


def test_inbound_ipv6_dropped_by_default(host: Any) -> None:
    if not host.file("/proc/net/if_inet6").exists:
        return  # IPv6 is off in this kernel: there is no IPv6 traffic to filter
    problems = inbound_problems(input_chains(host), IPV6)
    assert problems == [], "inbound traffic is not dropped by default: " + "; ".join(problems)


def test_ssh_allowed(host: Any) -> None:
    chains = [c for c in input_chains(host) if IPV4 in c.families]
    assert 22 in accepted_tcp_ports(chains), "no input rule accepts SSH (tcp port 22): " + \
        "; ".join(f"{c.source}: {[r.text for r in c.rules]}" for c in chains)


def _banners(ports: tuple[int, ...], control: int, floor: float = 2.0, limit: float = 8.0) -> dict[int, bytes]:
    """What a TCP client on the host reads first from each forwarded port (sshd speaks first).

    A blocked port answers nothing: QEMU's user network accepts on the host and never gets through
    to the guest, so its only cost is how long we wait. The wait is set by the control (sshd on
    the same guest, which must answer): three times its answer time, at least floor, at most
    limit. A reachable probe listener is another sshd on the same guest, as quick as the control.
    """
    socks: dict[int, socket.socket] = {}
    got: dict[int, bytes] = {}
    sel = selectors.DefaultSelector()
    start = time.monotonic()
    deadline = start + limit
    try:
        for port in (*ports, control):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=limit)
            except OSError:
                got[port] = b""
                continue
            s.setblocking(False)
            socks[port] = s
            sel.register(s, selectors.EVENT_READ, port)
        while socks and (now := time.monotonic()) < deadline:
            for key, _ in sel.select(timeout=deadline - now):
                port = key.data
                try:
                    got[port] = socks[port].recv(32)
                except OSError:
                    got[port] = b""
                sel.unregister(socks[port])
                socks.pop(port).close()
                if port == control:
                    deadline = min(deadline, start + max(floor, 3 * (time.monotonic() - start)))
    finally:
        for s in socks.values():
            s.close()
        sel.close()
    return {port: got.get(port, b"") for port in (*ports, control)}


def _udp_listener(family: str) -> str:
    """A one-shot UDP listener: the first datagram that reaches it leaves a marker file."""
    bind = f"0.0.0.0:{PROBE_UDP_PORT}" if family == IPV4 else f"[::]:{PROBE_UDP_PORT + 1}"
    marker = f"/run/kickgate-udp-{family}"
    inner = f"echo $$ >> {PROBE_PID}; exec systemd-socket-activate --datagram -l {bind} " \
            f"/bin/sh -c 'echo hit > {marker}'"
    return f"rm -f {marker}; setsid -f sh -c {shlex.quote(inner)} </dev/null >/dev/null 2>&1"


def _udp_reached(host: Any, family: str) -> bool:
    return bool(host.file(f"/run/kickgate-udp-{family}").exists)


def _send_udp(addr: str, family: str) -> str:
    port = PROBE_UDP_PORT if family == IPV4 else PROBE_UDP_PORT + 1
    return f"bash -c 'echo probe > /dev/udp/{addr}/{port}'"


def test_listeners_are_blocked_but_ssh_is_not(host: Any, instance: Any) -> None:
    missing = [p for p in PROBE_TCP_PORTS if p not in instance.forwards]
    assert not missing, f"the instance does not forward the probe ports {missing} (InstanceOptions.extra_guest_ports)"
    ports = " ".join(f"-p {p}" for p in PROBE_TCP_PORTS)
    setup = [f"ip netns add {NETNS}",
             f"ip link add kgprobe0 type veth peer name kgprobe1 netns {NETNS}",
             "ip link set kgprobe0 up", f"ip -n {NETNS} link set lo up", f"ip -n {NETNS} link set kgprobe1 up"]
    for local, peer, own in NETNS_ADDR.values():
        setup += [f"ip addr add {own} dev kgprobe0 nodad" if ":" in local else f"ip addr add {own} dev kgprobe0",
                  f"ip -n {NETNS} addr add {peer} dev kgprobe1" + (" nodad" if ":" in local else "")]
    try:
        # A second sshd is a listener every image has; it answers with a banner when reachable.
        run(host, f"/usr/sbin/sshd {ports} -o PidFile={PROBE_PID}.sshd")
        run(host, " && ".join([f"rm -f {PROBE_PID}", _udp_listener(IPV4), _udp_listener(IPV6)]))
        run(host, " && ".join(setup))
        for _ in range(50):
            listening = run(host, "ss -Hltnu").split()
            if all(any(w.endswith(f":{p}") for w in listening) for p in (*PROBE_TCP_PORTS, PROBE_UDP_PORT)):
                break
            time.sleep(0.2)
        # The probe sshd answers inside the guest. One port is asked: ss shows the one process
        # listening on every probe port, and each answer costs an sshd fork on the emulated CPU.
        port = PROBE_TCP_PORTS[0]
        local = run(host, f"timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}; head -c 4 <&3'")
        assert local.startswith("SSH-"), f"the probe listener on tcp port {port} does not answer inside the guest"
        run(host, " && ".join(f"ip netns exec {NETNS} {_send_udp(local_addr, family)}"
                              for family, (local_addr, _, _) in NETNS_ADDR.items()))
        udp_sent = time.monotonic()
        # A blocked probe costs its whole timeout, so every probe runs at once: the host's TCP
        # banners in threads while the guest tries TCP from the namespace over both families.
        with ThreadPoolExecutor(max_workers=1) as pool:
            probing = pool.submit(_banners, tuple(instance.host_port(p) for p in PROBE_TCP_PORTS),
                                  instance.host_port(22))
            # Inside the guest an allowed connection over the veth pair takes milliseconds.
            tries = [f"(ip netns exec {NETNS} timeout 2 bash -c 'exec 3<>/dev/tcp/{addr}/{PROBE_TCP_PORTS[0]}' "
                     f"2>/dev/null; echo {family} $?)" for family, (addr, _, _) in NETNS_ADDR.items()]
            from_outside = dict(line.split() for line in run(host, " & ".join(tries) + " & wait").splitlines())
            banners = probing.result()
        reached = [f"tcp {port} from the host" for port in PROBE_TCP_PORTS
                   if banners[instance.host_port(port)].startswith(b"SSH-")]
        assert banners[instance.host_port(22)].startswith(b"SSH-"), "SSH is not reachable from the host"
        for family, rc in from_outside.items():
            if rc not in ("0", "1", "124"):
                pytest.fail(f"the TCP probe from the namespace over {family} could not run (exit status {rc})")
            if rc == "0":
                reached.append(f"tcp {PROBE_TCP_PORTS[0]} over {family} from outside")
        # A datagram that got through may still be on its way to the marker file (a fork in the guest).
        time.sleep(max(0.0, 1.5 - (time.monotonic() - udp_sent)))
        controls = []
        for family in (IPV4, IPV6):
            if _udp_reached(host, family):
                reached.append(f"udp over {family} from outside")
            else:  # the control: from loopback, which the firewall accepts, the listener answers
                run(host, _send_udp("127.0.0.1" if family == IPV4 else "::1", family))
                controls.append(family)
        for _ in range(25):
            controls = [family for family in controls if not _udp_reached(host, family)]
            if not controls:
                break
            time.sleep(0.2)
        if controls:
            pytest.fail(f"the UDP probe listener ({', '.join(controls)}) does not work inside the guest")
        assert reached == [], f"listeners in the guest are reachable: {', '.join(reached)}"
    finally:
        host.run(f"kill $(cat {PROBE_PID} {PROBE_PID}.sshd 2>/dev/null) 2>/dev/null; "
                 f"rm -f {PROBE_PID} {PROBE_PID}.sshd /run/kickgate-udp-*; ip netns del {NETNS} 2>/dev/null")
