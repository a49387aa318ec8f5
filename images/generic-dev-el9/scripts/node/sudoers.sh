#!/bin/sh
# The article's node-specific sudoers step: members of the developers group administer the VM.
# EL keeps %wheel in /etc/sudoers as shipped; the developers group gets its own drop-in.
set -eu
group=${developers_group:-developers}
getent group "$group" >/dev/null || groupadd --system "$group"
printf '%%%s ALL=(ALL:ALL) ALL\n' "$group" > /etc/sudoers.d/90-developers
chmod 0440 /etc/sudoers.d/90-developers
visudo -cf /etc/sudoers.d/90-developers
echo "sudoers: group $group may use sudo"
