#!/bin/sh
# mutant: a build-time host key kept outside ssh_host_* and served through an sshd drop-in
# breaks: unique identity
set -eu
mkdir -p /etc/ssh/keys /etc/ssh/sshd_config.d
ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/keys/host_ed25519
echo 'HostKey /etc/ssh/keys/host_ed25519' > /etc/ssh/sshd_config.d/50-fixed-hostkey.conf
