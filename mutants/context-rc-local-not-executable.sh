#!/bin/sh
# mutant: rc.local left without its exec bit, so systemd's rc-local generator skips it
# breaks: contextualization in rc.local
set -eu
chmod 0644 /etc/rc.local
