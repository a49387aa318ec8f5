#!/bin/sh
# Every instance must get its own SSH host keys: none are baked into the image, they are made on
# first boot. No key or password that existed at build time may let anyone in.
set -eu
rm -f /etc/ssh/ssh_host_*key /etc/ssh/ssh_host_*key.pub
if [ ! -f /etc/redhat-release ]; then
    # EL ships sshd-keygen@.service for this; Debian only generates keys in the package's postinst.
    # ed25519 and ECDSA take milliseconds even on an emulated CPU, so both are made before sshd
    # starts. No RSA key: generating one takes up to half a minute there, and every client
    # in use speaks ed25519.
    cat > /etc/systemd/system/ssh-hostkeys.service <<'EOT'
[Unit]
Description=Generate the SSH host keys (ed25519, ECDSA) on first boot
Before=ssh.service
ConditionPathExists=|!/etc/ssh/ssh_host_ed25519_key
ConditionPathExists=|!/etc/ssh/ssh_host_ecdsa_key

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'for t in ed25519 ecdsa; do f=/etc/ssh/ssh_host_$${t}_key; [ -e $$f ] || ssh-keygen -q -t $$t -N "" -f $$f || exit 1; done'
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
EOT
    mkdir -p /etc/ssh/sshd_config.d
    # Only the keys made above: sshd would otherwise log every boot that the RSA key is missing.
    printf 'HostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n' \
        > /etc/ssh/sshd_config.d/10-kickgate-hostkeys.conf
    systemctl enable ssh-hostkeys.service ssh.service
fi
rm -f /root/.ssh/authorized_keys /root/.ssh/authorized_keys2
echo "ssh-first-boot: host keys removed, generated at first boot"
