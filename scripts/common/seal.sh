#!/bin/sh
# Last common step: forget everything that makes this one machine. Each clone gets a new
# machine-id at first boot; root has no usable password (login is by context SSH key only).
set -eu
: > /etc/machine-id
[ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ] && rm -f /var/lib/dbus/machine-id
rm -f /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
usermod -p '!' root
swapoff -a 2>/dev/null || true
rm -f /swapfile /swap.img
echo "seal: machine-id emptied, root password locked"
