#!/bin/sh
# mutant: compressed swap in RAM (zram) set up at every boot by an enabled service
# breaks: no swap
set -eu
cat > /etc/systemd/system/zram-swap.service <<'EOT'
[Unit]
Description=Swap on zram
DefaultDependencies=no
Before=swap.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'modprobe zram num_devices=1 && echo 64M > /sys/block/zram0/disksize && mkswap /dev/zram0 && swapon -p 100 /dev/zram0'

[Install]
WantedBy=swap.target
EOT
systemctl enable zram-swap.service
