#!/bin/sh
# The article's rc-local-contextualization: rc.local mounts the OpenNebula context CD at every boot,
# sources context.sh and applies it (SSH key, hostname, network by MAC, init scripts).
set -eu
if [ -d /etc/rc.d ]; then rc=/etc/rc.d/rc.local; else rc=/etc/rc.local; fi
cat > "$rc" <<'EOT'
#!/bin/sh
# OpenNebula contextualization, run at every boot by rc-local.service.
# Mounts the CD labelled CONTEXT read-only, sources context.sh, applies it, runs init scripts.
LOG=/var/log/context.log
MNT=/run/one-context/cd
exec >>"$LOG" 2>&1
echo "=== context $(date -u +%FT%TZ)"

dev=""
for i in 1 2 3 4 5 6 7 8 9 10; do
    [ -e /dev/disk/by-label/CONTEXT ] && { dev=/dev/disk/by-label/CONTEXT; break; }
    sleep 1
done
if [ -z "$dev" ]; then echo "no CONTEXT CD attached; nothing to do"; exit 0; fi
mkdir -p "$MNT"
mount -o ro "$dev" "$MNT" || { echo "cannot mount $dev"; exit 0; }
if [ ! -f "$MNT/context.sh" ]; then echo "no context.sh on $dev"; umount "$MNT"; exit 0; fi
. "$MNT/context.sh"
echo "sourced context.sh from $dev"

mask2cidr() {
    bits=0; IFS=.; set -- $1; unset IFS
    for o in "$@"; do
        case $o in 255) bits=$((bits+8));; 254) bits=$((bits+7));; 252) bits=$((bits+6));; 248) bits=$((bits+5));;
        240) bits=$((bits+4));; 224) bits=$((bits+3));; 192) bits=$((bits+2));; 128) bits=$((bits+1));; esac
    done
    echo $bits
}

if [ -n "${SSH_PUBLIC_KEY:-}" ]; then
    mkdir -p /root/.ssh && chmod 700 /root/.ssh
    printf '%s\n' "$SSH_PUBLIC_KEY" > /root/.ssh/authorized_keys
    chmod 600 /root/.ssh/authorized_keys
    echo "applied SSH_PUBLIC_KEY to root"
fi
if [ -n "${SET_HOSTNAME:-}" ]; then
    echo "$SET_HOSTNAME" > /etc/hostname
    hostname "$SET_HOSTNAME"
    grep -q " $SET_HOSTNAME\$" /etc/hosts || echo "127.0.1.1 $SET_HOSTNAME" >> /etc/hosts
    echo "hostname set to $SET_HOSTNAME"
fi

# Networks: ETHn_MAC names the NIC, matched against the hardware, never against a name.
for n in 0 1 2 3 4 5 6 7; do
    eval mac=\${ETH${n}_MAC:-}
    [ -n "$mac" ] || continue
    ifc=""
    for p in /sys/class/net/*; do
        [ "$(cat "$p/address" 2>/dev/null)" = "$mac" ] && ifc=${p##*/}
    done
    if [ -z "$ifc" ]; then echo "ETH${n}: no NIC with MAC $mac"; continue; fi
    eval ip=\${ETH${n}_IP:-} mask=\${ETH${n}_MASK:-255.255.255.0} gw=\${ETH${n}_GATEWAY:-} dns=\${ETH${n}_DNS:-}
    ip link set dev "$ifc" up
    if [ -n "$ip" ]; then
        ip addr flush dev "$ifc"
        ip addr add "$ip/$(mask2cidr "$mask")" dev "$ifc"
        [ -n "$gw" ] && ip route replace default via "$gw" dev "$ifc"
        echo "ETH${n}: $ifc ($mac) $ip/$mask gw ${gw:-none}"
    fi
    if [ -n "$dns" ]; then
        : > /etc/resolv.conf
        for s in $dns; do echo "nameserver $s" >> /etc/resolv.conf; done
        echo "ETH${n}: dns $dns"
    fi
done

# Init scripts: INIT_SCRIPTS names them; without it OpenNebula's convention runs init.sh if present.
scripts=${INIT_SCRIPTS:-}
[ -z "$scripts" ] && [ -f "$MNT/init.sh" ] && scripts=init.sh
if [ -n "$scripts" ]; then
    work=/run/one-context/scripts
    rm -rf "$work"; mkdir -p "$work"
    cp -p "$MNT"/* "$work"/ 2>/dev/null || true
    for s in $scripts; do
        if [ -f "$work/$s" ]; then
            echo "running init script $s"
            (cd "$work" && set -a && . "$MNT/context.sh" && set +a && sh "./$s") || echo "init script $s failed: $?"
        else
            echo "init script $s not on the CD"
        fi
    done
fi
umount "$MNT"
echo "context done"
exit 0
EOT
chmod 0755 "$rc"
[ "$rc" = /etc/rc.d/rc.local ] && ln -sf rc.d/rc.local /etc/rc.local
# rc-local.service is pulled in by systemd's rc-local generator because rc.local is executable.
echo "rc-local-contextualization: wrote $rc"
