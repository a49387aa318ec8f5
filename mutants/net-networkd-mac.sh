#!/bin/sh
# mutant: a systemd-networkd .network file that configures only the NIC with the build MAC
# breaks: no persistent net naming
set -eu
mkdir -p /etc/systemd/network
cat > /etc/systemd/network/20-wired.network <<'EOT'
[Match]
MACAddress=52:54:00:12:34:56

[Network]
DHCP=yes
EOT
