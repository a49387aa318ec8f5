#!/bin/sh
# mutant: a systemd .link file that names the NIC with the build MAC "lan0"
# breaks: no persistent net naming
set -eu
mkdir -p /etc/systemd/network
cat > /etc/systemd/network/10-lan0.link <<'EOT'
[Match]
MACAddress=52:54:00:12:34:56

[Link]
Name=lan0
EOT
