#!/bin/sh
# mutant: an fstab line for a swap partition by label, kept "just in case" (nofail)
# breaks: no swap
set -eu
echo 'LABEL=swap none swap sw,nofail,x-systemd.device-timeout=1s 0 0' >> /etc/fstab
