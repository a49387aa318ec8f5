#!/bin/sh
# mutant: rc.local deleted ("cleanup of legacy init scripts")
# breaks: contextualization in rc.local
set -eu
rm /etc/rc.local
