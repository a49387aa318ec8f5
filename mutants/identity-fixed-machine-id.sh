#!/bin/sh
# mutant: a machine-id written into the image, so every clone shares it
# breaks: unique identity
set -eu
echo 5c0ffee5c0ffee5c0ffee5c0ffee5c0f > /etc/machine-id
