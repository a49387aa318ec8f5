#!/bin/sh
# The article's rc-local-contextualization: rc.local mounts the OpenNebula context CD at every boot,
# sources context.sh and applies it (SSH key, hostname, network by MAC, init scripts).
set -eu
if [ -d /etc/rc.d ]; then rc=/etc/rc.d/rc.local; else rc=/etc/rc.local; fi
cat > "$rc" <<'EOT'
#!/bin/sh
# OpenNebula contextualization, run at every boot by rc-local.service.
# Mounts the CD-ROM labelled CONTEXT read-only (nosuid, nodev, noexec), sources context.sh, applies
# the values that are well-formed (the others are logged and skipped) and runs the init scripts
# named by INIT_SCRIPTS, which must be plain files on that CD.
# No pathname expansion (but for the NICs in /sys/class/net): context values are data, never patterns.
set -f
# This script's own paths; set again after context.sh is sourced, whose variables (any name a
# template gives them) must never move the log, the mount point or the directory that is emptied.
settings() {
    LOG=/var/log/context.log
    MNT=/run/one-context/cd
    WORK=/run/one-context/scripts
    BYLABEL=/dev/disk/by-label/CONTEXT
    SYSNET=/sys/class/net
    RESOLV=/etc/resolv.conf
}
settings

# Every $(...) and every external command is a process; on an emulated CPU at first boot each
# costs tens of milliseconds of the time before the first login, so splitting is done in the
# shell: IFS=. for one expansion, then unset again (the state the main part runs in).
valid_ipv4() {
    case $1 in ''|*[!0-9.]*|.*|*.|*..*) return 1;; esac
    IFS=.; set -- $1; unset IFS
    [ $# -eq 4 ] || return 1
    for o in "$@"; do
        case $o in [0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5]) ;; *) return 1;; esac
    done
}

valid_ipv6() {
    case $1 in *:*) ;; *) return 1;; esac
    case $1 in *[!0-9A-Fa-f:.]*) return 1;; esac
    [ ${#1} -le 45 ]
}

valid_mask() {
    valid_ipv4 "$1" || return 1
    rest=255
    IFS=.; set -- $1; unset IFS
    for o in "$@"; do
        # After an octet below 255 every octet must be 0: the ones are contiguous.
        if [ "$rest" != 255 ] && [ "$o" != 0 ]; then return 1; fi
        case $o in 255|254|252|248|240|224|192|128|0) rest=$o;; *) return 1;; esac
    done
}

valid_mac() {
    x='[0-9A-Fa-f][0-9A-Fa-f]'
    case $1 in $x:$x:$x:$x:$x:$x) return 0;; esac
    return 1
}

valid_hostname() {
    [ ${#1} -ge 1 ] && [ ${#1} -le 253 ] || return 1
    case $1 in *[!A-Za-z0-9.-]*|.*|*.|*..*|-*|*-|*.-*|*-.*) return 1;; esac
    IFS=.; set -- $1; unset IFS
    for label in "$@"; do
        [ ${#label} -le 63 ] || return 1
    done
}

valid_script_name() {
    case $1 in ''|.*|*..*|*[!A-Za-z0-9._-]*) return 1;; esac
}

# mask2cidr MASK: sets cidr to the prefix length of a valid netmask.
mask2cidr() {
    bits=0
    IFS=.; set -- $1; unset IFS
    for o in "$@"; do
        case $o in 255) bits=$((bits+8));; 254) bits=$((bits+7));; 252) bits=$((bits+6));; 248) bits=$((bits+5));;
        240) bits=$((bits+4));; 224) bits=$((bits+3));; 192) bits=$((bits+2));; 128) bits=$((bits+1));; esac
    done
    cidr=$bits
}

# The CD-ROM carrying the CONTEXT label: only a CD drive the hypervisor attached, never another
# disk or partition that happens to carry the same label.
# first_cd DEV...: print the first CD-ROM drive among DEV, saying why each other one is ignored.
first_cd() {
    for dev in "$@"; do
        case $dev in
            /dev/sr[0-9]|/dev/sr[0-9][0-9]) [ -b "$dev" ] && { echo "$dev"; return 0; } ;;
        esac
        echo "ignoring $dev labelled CONTEXT: not a CD-ROM drive" >&2
    done
    return 1
}

# udev's by-label link is asked first; blkid, which reads every block device, only when it does
# not lead to a CD drive.
context_device() {
    first_cd $({ [ -e "$BYLABEL" ] && readlink -f "$BYLABEL"; } 2>/dev/null) ||
        first_cd $(blkid -t LABEL=CONTEXT -o device 2>/dev/null)
}

# apply_network N: configure the NIC whose MAC is ETHn_MAC from ETHn_IP/MASK/GATEWAY/DNS.
apply_network() {
    n=$1
    eval mac=\${ETH${n}_MAC:-}
    [ -n "$mac" ] || return 0
    if ! valid_mac "$mac"; then echo "ETH${n}: skipped: ETH${n}_MAC is not a MAC address"; return 0; fi
    mac=$(printf '%s' "$mac" | tr 'A-F' 'a-f')
    ifc=""
    set +f  # the NICs under /sys/class/net: the one place a pattern is expanded
    for path in "$SYSNET"/*; do
        addr=""
        [ -r "$path/address" ] && read -r addr < "$path/address"
        [ "$addr" = "$mac" ] && ifc=${path##*/}
    done
    set -f
    if [ -z "$ifc" ]; then echo "ETH${n}: no NIC with MAC $mac"; return 0; fi
    eval ip=\${ETH${n}_IP:-} mask=\${ETH${n}_MASK:-255.255.255.0} gw=\${ETH${n}_GATEWAY:-} dns=\${ETH${n}_DNS:-}
    ip link set dev "$ifc" up
    if [ -n "$ip" ] && ! valid_ipv4 "$ip"; then
        echo "ETH${n}: skipped address: ETH${n}_IP is not an IPv4 address"
    elif [ -n "$ip" ] && ! valid_mask "$mask"; then
        echo "ETH${n}: skipped address: ETH${n}_MASK is not a netmask"
    elif [ -n "$ip" ]; then
        ip addr flush dev "$ifc"
        mask2cidr "$mask"
        ip addr add "$ip/$cidr" dev "$ifc"
        if [ -n "$gw" ] && ! valid_ipv4 "$gw"; then
            echo "ETH${n}: skipped route: ETH${n}_GATEWAY is not an IPv4 address"
        elif [ -n "$gw" ]; then
            ip route replace default via "$gw" dev "$ifc"
        fi
        echo "ETH${n}: $ifc ($mac) $ip/$mask gw ${gw:-none}"
    fi
    if [ -n "$dns" ]; then
        servers=""
        for s in $dns; do
            if valid_ipv4 "$s" || valid_ipv6 "$s"; then servers="$servers $s"
            else echo "ETH${n}: skipped DNS entry: not an address"; fi
        done
        if [ -n "$servers" ]; then
            : > "$RESOLV"
            for s in $servers; do echo "nameserver $s" >> "$RESOLV"; done
            echo "ETH${n}: dns$servers"
        fi
    fi
}

# run_init_scripts CD WORKDIR "LIST": each name in LIST, in order, a plain file on the CD, run
# with sh (the CD is noexec) from a writable copy of the CD, with the context exported.
run_init_scripts() {
    cd_dir=$1 work=$2
    for s in $3; do
        if ! valid_script_name "$s"; then
            echo "INIT_SCRIPTS: skipped an entry: not a plain file name on the CD"
            continue
        fi
        if [ ! -f "$cd_dir/$s" ] || [ -L "$cd_dir/$s" ]; then
            echo "init script $s not on the CD"
            continue
        fi
        echo "running init script $s"
        (cd "$work" && set -a && . "$cd_dir/context.sh" && set +a && sh "$cd_dir/$s") || echo "init script $s failed: $?"
    done
}

# --- main: everything above only defines functions and settings.
exec >>"$LOG" 2>&1
echo "=== context $(date -u +%FT%TZ)"

dev=""
for i in 1 2 3 4 5 6 7 8 9 10; do
    dev=$(context_device) && break
    dev=""
    sleep 1
done
if [ -z "$dev" ]; then echo "no CONTEXT CD attached; nothing to do"; exit 0; fi
mkdir -p "$MNT"
mount -t iso9660 -o ro,nosuid,nodev,noexec "$dev" "$MNT" || { echo "cannot mount $dev"; exit 0; }
if [ ! -f "$MNT/context.sh" ]; then echo "no context.sh on $dev"; umount "$MNT"; exit 0; fi
. "$MNT/context.sh"
# Whatever context.sh set, words split, commands resolve and this script's paths are as above.
unset IFS
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
settings
echo "sourced context.sh from $dev"

if [ -n "${SSH_PUBLIC_KEY:-}" ]; then
    mkdir -p /root/.ssh && chmod 700 /root/.ssh
    printf '%s\n' "$SSH_PUBLIC_KEY" > /root/.ssh/authorized_keys
    chmod 600 /root/.ssh/authorized_keys
    echo "applied SSH_PUBLIC_KEY to root"
fi
if [ -n "${SET_HOSTNAME:-}" ] && ! valid_hostname "$SET_HOSTNAME"; then
    echo "hostname: skipped: SET_HOSTNAME is not a host name"
elif [ -n "${SET_HOSTNAME:-}" ]; then
    echo "$SET_HOSTNAME" > /etc/hostname
    hostname "$SET_HOSTNAME"
    listed=""
    while IFS= read -r line; do
        case $line in *" $SET_HOSTNAME") listed=1 ;; esac
    done < /etc/hosts
    [ -n "$listed" ] || echo "127.0.1.1 $SET_HOSTNAME" >> /etc/hosts
    echo "hostname set to $SET_HOSTNAME"
fi

# Networks: ETHn_MAC names the NIC, matched against the hardware, never against a name.
for n in 0 1 2 3 4 5 6 7; do
    apply_network "$n"
done

# Init scripts: INIT_SCRIPTS names them; without it OpenNebula's convention runs init.sh if present.
scripts=${INIT_SCRIPTS:-}
[ -z "$scripts" ] && [ -f "$MNT/init.sh" ] && scripts=init.sh
if [ -n "$scripts" ]; then
    rm -rf "$WORK"; mkdir -p "$WORK"
    # -R copies links as links: nothing outside the CD comes along.
    cp -pR "$MNT/." "$WORK/" 2>/dev/null || true
    run_init_scripts "$MNT" "$WORK" "$scripts"
fi
umount "$MNT"
echo "context done"
exit 0
EOT
chmod 0755 "$rc"
[ "$rc" = /etc/rc.d/rc.local ] && ln -sf rc.d/rc.local /etc/rc.local
# Contextualization gives the instance its network and SSH key, and a first boot on one busy vCPU
# starts a dozen units beside it: it goes first. Only its own commands and INIT_SCRIPTS run at
# this priority, and they end with it.
mkdir -p /etc/systemd/system/rc-local.service.d
printf '[Service]\nNice=-10\n' > /etc/systemd/system/rc-local.service.d/10-kickgate-first.conf
# rc-local.service is pulled in by systemd's rc-local generator because rc.local is executable.
echo "rc-local-contextualization: wrote $rc"
