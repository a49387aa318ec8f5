"""No persistent network naming or MAC pinning: an instance boots with a MAC the build never saw."""

from __future__ import annotations

from typing import Any

from guestcmd import run

GENERATORS = ("/lib/udev/rules.d/75-persistent-net-generator.rules",
              "/usr/lib/udev/rules.d/75-persistent-net-generator.rules")
CONFIG_PLACES = ("/etc/network/interfaces", "/etc/network/interfaces.d", "/etc/sysconfig/network-scripts",
                 "/etc/NetworkManager/system-connections", "/etc/netplan", "/etc/systemd/network")
LEASES = (("/var/lib/dhcp", "*.leases"), ("/var/lib/dhclient", "*"), ("/var/lib/NetworkManager", "*.lease"))


def grep_files(host: Any, pattern: str, places: tuple[str, ...] | list[str]) -> list[str]:
    """Files under the places that exist whose lines match pattern (grep answers 1 for none)."""
    existing = [p for p in places if host.file(p).exists]
    if not existing:
        return []
    return run(host, f"grep -rIliE '{pattern}' {' '.join(existing)}", ok=(0, 1)).split()


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
    found = grep_files(host, "^[[:space:]]*(HWADDR|MACADDR|MACAddress|mac-address|macaddress|hwaddress)",
                       CONFIG_PLACES)
    pinned = [f for f in found if not host.file(f).is_symlink]
    assert pinned == [], f"network configuration pins a MAC address: {pinned}"
    if built_image.build_mac:
        leaks = grep_files(host, built_image.build_mac, ["/etc"])
        assert leaks == [], f"the build VM's MAC {built_image.build_mac} is still named in {leaks}"


def test_no_build_time_address(host: Any) -> None:
    static = grep_files(host, "^[[:space:]]*(address|IPADDR|addresses?)[[:space:]]*[=:]?", CONFIG_PLACES)
    assert static == [], f"a static address from build time remains in {static}"
    leases = []
    for folder, name in LEASES:
        if host.file(folder).is_directory:
            leases += run(host, f"find {folder} -maxdepth 1 -type f -name '{name}'").split()
    assert leases == [], f"DHCP leases from build time remain: {leases}"


def test_instance_is_networked_with_its_new_mac(host: Any, instance: Any, built_image: Any) -> None:
    link = run(host, "ip -o link show dev eth0")
    assert instance.mac in link.lower(), f"eth0 does not carry the instance's MAC {instance.mac}: {link}"
    if built_image.build_mac:
        assert instance.mac != built_image.build_mac.lower()
    addr = run(host, "ip -o -4 addr show dev eth0")
    assert "10.0.2.15/24" in addr, f"eth0 did not get the context address 10.0.2.15/24: {addr!r}"
    route = run(host, "ip route show default")
    assert "via 10.0.2.2" in route, f"no default route via the context gateway: {route!r}"
