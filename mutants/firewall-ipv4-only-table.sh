#!/bin/sh
# mutant: the ruleset's table written for IPv4 only (table ip), so IPv6 is not filtered at all
# breaks: restrictive firewall
set -eu
grep -q '^table inet filter {$' /etc/nftables.conf
sed -i 's/^table inet filter {$/table ip filter {/; /icmpv6 type/d' /etc/nftables.conf
