#!/bin/sh
# mutant: SSH host keys generated at build time (ssh-keygen), so the first-boot unit skips
# breaks: unique identity
set -eu
ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
