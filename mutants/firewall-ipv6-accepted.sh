#!/bin/sh
# mutant: all IPv6 accepted in the inet input chain ("we filter IPv6 upstream")
# breaks: restrictive firewall
set -eu
grep -q '^        iif "lo" accept$' /etc/nftables.conf
sed -i 's/^        iif "lo" accept$/&\n        meta nfproto ipv6 accept/' /etc/nftables.conf
