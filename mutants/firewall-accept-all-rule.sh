#!/bin/sh
# mutant: a counting accept-all rule appended to the input chain "to debug a connection"
# breaks: restrictive firewall
set -eu
grep -q '^        tcp dport 22 accept$' /etc/nftables.conf
sed -i 's/^        tcp dport 22 accept$/&\n        counter accept/' /etc/nftables.conf
