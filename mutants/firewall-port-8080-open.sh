#!/bin/sh
# mutant: sshd also listens on 8080 and the firewall accepts 8080 for it
# breaks: restrictive firewall
set -eu
grep -q '^        tcp dport 22 accept$' /etc/nftables.conf
sed -i 's/^        tcp dport 22 accept$/&\n        tcp dport 8080 accept/' /etc/nftables.conf
mkdir -p /etc/ssh/sshd_config.d
printf 'Port 22\nPort 8080\n' > /etc/ssh/sshd_config.d/20-alt-port.conf
