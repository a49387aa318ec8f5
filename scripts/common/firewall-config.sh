#!/bin/sh
# The article's firewall-config: a restrictive firewall is active from the first boot, so an instance
# whose later configuration fails is still closed. Inbound: loopback, established, ICMP, SSH only.
set -eu
rules4='*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p icmp -j ACCEPT
-A INPUT -p tcp -m conntrack --ctstate NEW --dport 22 -j ACCEPT
COMMIT'
rules6='*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p ipv6-icmp -j ACCEPT
-A INPUT -p tcp -m conntrack --ctstate NEW --dport 22 -j ACCEPT
COMMIT'
if [ -f /etc/redhat-release ]; then
    printf '%s\n' "$rules4" > /etc/sysconfig/iptables
    printf '%s\n' "$rules6" > /etc/sysconfig/ip6tables
    systemctl disable firewalld.service 2>/dev/null || true
    systemctl enable iptables.service ip6tables.service
    svc=iptables.service
else
    # A native nftables ruleset, loaded by nftables.service before the network comes up: one
    # `nft -f` of a small file, where iptables-persistent's restore costs seconds under emulation.
    cat > /etc/nftables.conf <<'EOT'
#!/usr/sbin/nft -f
# Written by firewall-config: inbound drops all but loopback, replies, ICMP essentials and SSH.
flush ruleset

table inet filter {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        iif "lo" accept
        icmp type { echo-request, destination-unreachable, time-exceeded, parameter-problem } accept
        icmpv6 type { echo-request, destination-unreachable, packet-too-big, time-exceeded, parameter-problem, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } accept
        tcp dport 22 accept
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
    }
    chain output {
        type filter hook output priority filter; policy accept;
    }
}
EOT
    chmod 0755 /etc/nftables.conf
    systemctl enable nftables.service
    svc=nftables.service
fi
echo "firewall-config: default-drop inbound rules persisted, $svc enabled"
