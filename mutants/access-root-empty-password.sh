#!/bin/sh
# mutant: root's password deleted (passwd -d) "for the console"
# breaks: no open access
set -eu
passwd -d root
