#!/bin/sh
# mutant: an ifupdown stanza for eth0 that sets the build NIC's MAC (hwaddress)
# breaks: no persistent net naming
set -eu
mkdir -p /etc/network/interfaces.d
cat > /etc/network/interfaces.d/eth0 <<'EOT'
allow-hotplug eth0
iface eth0 inet dhcp
    hwaddress ether 52:54:00:12:34:56
EOT
