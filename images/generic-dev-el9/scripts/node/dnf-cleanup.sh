#!/bin/sh
# EL-specific last node step: nothing the installer downloaded or decided for this one machine
# stays in the base image (package caches, swap entries, shell history). The kickstart's own last
# %post removes the installer's copies of the kickstart and the %post logs.
# The serial console and stable ethN names come from the kickstart's bootloader --append, which
# Anaconda writes to /etc/default/grub for every future kernel too.
set -eu
dnf -y clean all
rm -rf /var/cache/dnf/*
# No swap in the base image: OpenNebula attaches one as a separate disk if wanted.
sed -i '/[[:space:]]swap[[:space:]]/d' /etc/fstab
rm -f /root/.bash_history
grep -q 'console=ttyS0' /etc/default/grub || echo "dnf-cleanup: warning: no serial console in /etc/default/grub"
echo "dnf-cleanup: caches removed, no swap entries"
