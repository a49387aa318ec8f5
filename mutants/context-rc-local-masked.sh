#!/bin/sh
# mutant: rc-local.service masked ("legacy, we do not use it")
# breaks: contextualization in rc.local
set -eu
systemctl mask rc-local.service
