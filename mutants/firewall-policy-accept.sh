#!/bin/sh
# mutant: the input chain's policy changed from drop to accept
# breaks: restrictive firewall
set -eu
grep -q 'hook input priority filter; policy drop;' /etc/nftables.conf
sed -i '/hook input/s/policy drop;/policy accept;/' /etc/nftables.conf
