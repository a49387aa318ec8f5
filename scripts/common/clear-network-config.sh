#!/bin/sh
# The article's clear-network-config: an instance boots with a MAC the build never saw, so nothing
# in the image may pin the build NIC (udev rules, MAC-derived names, MACs or addresses in configs).
set -eu
log() { echo "clear-network-config: $*"; }

rm -f /etc/udev/rules.d/70-persistent-net.rules
# Old udev generators write the rule again on next boot: mask the generator if the distro ships one.
for gen in /lib/udev/rules.d/75-persistent-net-generator.rules /usr/lib/udev/rules.d/75-persistent-net-generator.rules; do
    if [ -e "$gen" ]; then
        ln -sf /dev/null /etc/udev/rules.d/75-persistent-net-generator.rules
        log "masked $gen"
    fi
done
# systemd's default link policy names NICs by slot or MAC; ethN (net.ifnames=0) follows no hardware id.
mkdir -p /etc/systemd/network
ln -sf /dev/null /etc/systemd/network/99-default.link
for f in /etc/systemd/network/*.link; do
    [ -f "$f" ] && [ ! -L "$f" ] && grep -qi '^MACAddress=' "$f" && { rm -f "$f"; log "removed $f"; }
done

if [ -f /etc/redhat-release ]; then
    for f in /etc/sysconfig/network-scripts/ifcfg-*; do
        [ -f "$f" ] || continue
        case "$f" in */ifcfg-lo) continue ;; esac
        rm -f "$f"; log "removed build-time $f"
    done
    # Connection profiles written for the build NIC carry its name, MAC, UUID and address.
    rm -f /etc/NetworkManager/system-connections/*.nmconnection
    mkdir -p /etc/NetworkManager/conf.d
    printf '[main]\nno-auto-default=*\n' > /etc/NetworkManager/conf.d/90-kickgate-context.conf
else
    mkdir -p /etc/network/interfaces.d
    cat > /etc/network/interfaces <<'EOT'
# Interfaces are configured at boot by contextualization (/etc/rc.local); nothing is pinned here.
auto lo
iface lo inet loopback

source /etc/network/interfaces.d/*
EOT
    rm -f /etc/network/interfaces.d/*
fi
for f in /etc/netplan/*.yaml; do
    [ -f "$f" ] && sed -i '/macaddress:/d' "$f" && log "unpinned MACs in $f"
done

# Build-time leases, resolver and name must not leak into instances.
rm -f /var/lib/dhcp/*.leases /var/lib/dhclient/*.lease* /var/lib/NetworkManager/*.lease
: > /etc/resolv.conf
echo localhost > /etc/hostname
log "done"
