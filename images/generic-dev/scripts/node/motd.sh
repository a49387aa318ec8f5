#!/bin/sh
# Tell whoever logs in which image this instance came from.
set -eu
printf '%s: built by kickgate from recipe %s\n' "${IMAGE_NAME:-image}" "${IMAGE_NAME:-unknown}" > /etc/motd
echo "motd: written"
