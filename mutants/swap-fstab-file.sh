#!/bin/sh
# mutant: a 64 MiB /swapfile made at build time and mounted from /etc/fstab
# breaks: no swap
set -eu
dd if=/dev/zero of=/swapfile bs=1M count=64 status=none
chmod 600 /swapfile
mkswap /swapfile >/dev/null
echo '/swapfile none swap sw 0 0' >> /etc/fstab
