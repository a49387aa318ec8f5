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
    mkdir -p /etc/iptables
    printf '%s\n' "$rules4" > /etc/iptables/rules.v4
    printf '%s\n' "$rules6" > /etc/iptables/rules.v6
    systemctl enable netfilter-persistent.service
    svc=netfilter-persistent.service
fi
echo "firewall-config: default-drop inbound rules persisted, $svc enabled"
