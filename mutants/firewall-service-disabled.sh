#!/bin/sh
# mutant: nftables.service disabled, the ruleset file left in place
# breaks: restrictive firewall
set -eu
systemctl disable nftables.service
