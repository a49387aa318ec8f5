#!/bin/sh
# mutant: a swap file activated by an enabled systemd .swap unit, nothing in fstab
# breaks: no swap
set -eu
mkdir -p /var/lib/swap
dd if=/dev/zero of=/var/lib/swap/swapfile bs=1M count=64 status=none
chmod 600 /var/lib/swap/swapfile
mkswap /var/lib/swap/swapfile >/dev/null
cat > /etc/systemd/system/var-lib-swap-swapfile.swap <<'EOT'
[Unit]
Description=Build-time swap file

[Swap]
What=/var/lib/swap/swapfile

[Install]
WantedBy=swap.target
EOT
systemctl enable var-lib-swap-swapfile.swap
