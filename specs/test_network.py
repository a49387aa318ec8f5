"""No persistent network naming or MAC pinning: an instance boots with a MAC the build never saw."""

from __future__ import annotations

from typing import Any

GENERATORS = ("/lib/udev/rules.d/75-persistent-net-generator.rules",
              "/usr/lib/udev/rules.d/75-persistent-net-generator.rules")
CONFIG_PLACES = "/etc/network/interfaces /etc/network/interfaces.d /etc/sysconfig/network-scripts " \
                "/etc/NetworkManager/system-connections /etc/netplan /etc/systemd/network"


def test_no_persistent_net_rules(host: Any) -> None:
    rules = host.file("/etc/udev/rules.d/70-persistent-net.rules")
    assert not rules.exists, "70-persistent-net.rules exists: the instance's new NIC would not be eth0"


def test_persistent_net_generator_disabled_or_absent(host: Any) -> None:
    mask = host.file("/etc/udev/rules.d/75-persistent-net-generator.rules")
    for gen in GENERATORS:
        if host.file(gen).exists:
            assert mask.is_symlink and mask.linked_to == "/dev/null", \
                f"{gen} is active: it writes a persistent net rule for the build MAC"


def test_no_mac_pinned_in_network_configs(host: Any, built_image: Any) -> None:
    found = host.run(
        f"grep -rIlisE '^[[:space:]]*(HWADDR|MACADDR|MACAddress|mac-address|macaddress|hwaddress)' {CONFIG_PLACES}"
    ).stdout.split()
    pinned = [f for f in found if not host.file(f).is_symlink]
    assert pinned == [], f"network configuration pins a MAC address: {pinned}"
    if built_image.build_mac:
        leaks = host.run(f"grep -rIlis '{built_image.build_mac}' /etc").stdout.split()
        assert leaks == [], f"the build VM's MAC {built_image.build_mac} is still named in {leaks}"


def test_no_build_time_address(host: Any) -> None:
    static = host.run(f"grep -rIlisE '^[[:space:]]*(address|IPADDR|addresses?)[[:space:]]*[=:]?' {CONFIG_PLACES}")
    assert static.stdout.split() == [], f"a static address from build time remains in {static.stdout.split()}"
    leases = host.run("ls /var/lib/dhcp/*.leases /var/lib/dhclient/* /var/lib/NetworkManager/*.lease 2>/dev/null")
    assert leases.stdout.strip() == "", f"DHCP leases from build time remain: {leases.stdout.split()}"


def test_instance_is_networked_with_its_new_mac(host: Any, instance: Any, built_image: Any) -> None:
    link = host.run("ip -o link show dev eth0").stdout
    assert instance.mac in link.lower(), f"eth0 does not carry the instance's MAC {instance.mac}: {link}"
    if built_image.build_mac:
        assert instance.mac != built_image.build_mac.lower()
    addr = host.run("ip -o -4 addr show dev eth0").stdout
    assert "10.0.2.15/24" in addr, f"eth0 did not get the context address 10.0.2.15/24: {addr!r}"
    route = host.run("ip route show default").stdout
    assert "via 10.0.2.2" in route, f"no default route via the context gateway: {route!r}"
