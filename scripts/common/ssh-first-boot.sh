#!/bin/sh
# Every instance must get its own SSH host keys: none are baked into the image, they are made on
# first boot. No key or password that existed at build time may let anyone in.
set -eu
rm -f /etc/ssh/ssh_host_*key /etc/ssh/ssh_host_*key.pub
if [ ! -f /etc/redhat-release ]; then
    # EL ships sshd-keygen@.service for this; Debian only generates keys in the package's postinst.
    # ed25519 is made before sshd starts (milliseconds); RSA/ECDSA after it, because RSA
    # generation can take half a minute on an emulated CPU and would hold up the first login.
    cat > /etc/systemd/system/ssh-hostkeys.service <<'EOT'
[Unit]
Description=Generate the SSH ed25519 host key on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
EOT
    cat > /etc/systemd/system/ssh-hostkeys-extra.service <<'EOT'
[Unit]
Description=Generate the remaining SSH host keys on first boot
After=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_rsa_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
ExecStartPost=-/bin/systemctl reload ssh.service
RemainAfterExit=yes
# Background work: never starve sshd or the first login of CPU.
Nice=19
CPUSchedulingPolicy=idle
IOSchedulingClass=idle

[Install]
WantedBy=multi-user.target
EOT
    systemctl enable ssh-hostkeys.service ssh-hostkeys-extra.service ssh.service
fi
rm -f /root/.ssh/authorized_keys /root/.ssh/authorized_keys2
echo "ssh-first-boot: host keys removed, generated at first boot"
