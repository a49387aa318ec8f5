#!/bin/sh
# PID 1 of the bootstrap method's finish VM (init=/root/kickgate/finish.sh): install the
# bootloader, run the post-install scripts (common/ then node/) exactly once, seal the image,
# print a marker and power off. Any failing step prints a failure marker and powers off at once,
# so the host never waits for its watchdog.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive
KG=/root/kickgate
LOGDIR=/var/log/kickgate

poweroff_now() {
    sync
    mount -o remount,ro / 2>/dev/null
    echo o > /proc/sysrq-trigger
    sleep 30
}

fail() {
    echo "KICKGATE-FINISH-FAILED: $*"
    poweroff_now
}

# The initramfs normally moves these over; a bare boot does not.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp
mountpoint -q /run || mount -t tmpfs tmpfs /run
mountpoint -q /tmp || mount -t tmpfs tmpfs /tmp
# Run from a copy in /run: this script is deleted from the image below, and a deleted file still open
# on / is an orphan inode that keeps / from being remounted read-only (and so from being clean).
if [ "$0" != /run/kickgate-finish.sh ]; then
    cp "$0" /run/kickgate-finish.sh || fail "cannot copy $0 to /run"
    exec /bin/sh /run/kickgate-finish.sh
fi
mount -o remount,rw / || fail "cannot remount / read-write"
echo 1 > /proc/sys/kernel/sysrq

. "$KG/env.sh" || fail "cannot read $KG/env.sh"
mkdir -p "$LOGDIR"

step() {
    name=$1; shift
    echo "KICKGATE-STEP-BEGIN $name"
    start=$(date +%s)
    "$@" > "$LOGDIR/$name.log" 2>&1
    rc=$?
    sed "s/^/[$name] /" "$LOGDIR/$name.log"
    [ $rc -eq 0 ] || fail "step $name exited $rc (log: $LOGDIR/$name.log in the image)"
    echo "KICKGATE-STEP-END $name $(( $(date +%s) - start ))s"
}

bootloader() {
    # grub-probe resolves the root device through by-uuid links that only udev would create.
    mkdir -p /dev/disk/by-uuid
    ln -sf ../../vda1 "/dev/disk/by-uuid/$ROOT_UUID"
    echo "grub-pc grub-pc/install_devices multiselect /dev/vda" | debconf-set-selections
    # The menu (/boot/grub/grub.cfg) was written on the host; only the boot code is installed here.
    [ -s /boot/grub/grub.cfg ] || { echo "no /boot/grub/grub.cfg in the image"; return 1; }
    grub-install --target=i386-pc /dev/vda
}

step bootloader bootloader

for script in "$KG"/scripts/*; do
    [ -f "$script" ] || continue
    base=${script##*/}
    step "post-$base" sh -c 'set -a; . "$1/vars.sh"; set +a; exec "$2"' sh "$KG" "$script"
done

seal() {
    # Whatever the scripts did, no clone may share these with another.
    : > /etc/machine-id
    rm -f /etc/ssh/ssh_host_*key /etc/ssh/ssh_host_*key.pub
    rm -f /var/lib/systemd/random-seed
    apt-get clean
    rm -rf /var/lib/apt/lists/* /tmp/* /root/.bash_history
}
step seal seal

rm -rf "$KG"
sync
# Read-only commits the journal and marks the filesystem clean: the shipped image needs no journal
# replay or orphan cleanup at every instance's first boot.
mount -o remount,ro / || fail "cannot remount / read-only: a file on it is still open"
echo "KICKGATE-FINISH-OK"
poweroff_now
