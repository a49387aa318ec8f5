#!/bin/sh
# Every instance must get its own SSH host keys: none are baked into the image, they are made on
# first boot. No key or password that existed at build time may let anyone in.
set -eu
rm -f /etc/ssh/ssh_host_*key /etc/ssh/ssh_host_*key.pub
if [ ! -f /etc/redhat-release ]; then
    # EL ships sshd-keygen@.service for this; Debian only generates keys in the package's postinst.
    # One ed25519 key, made before sshd starts. No RSA or ECDSA: on an emulated CPU each
    # ssh-keygen run takes seconds of the one vCPU the rest of the first boot needs, and OpenSSH
    # clients prefer ed25519.
    cat > /etc/systemd/system/ssh-hostkeys.service <<'EOT'
[Unit]
Description=Generate the SSH ed25519 host key on first boot
# Made as soon as / is writable, alongside the early boot units, so that sshd starts at
# basic.target together with rc-local instead of after a key made while rc-local holds the CPU.
DefaultDependencies=no
After=local-fs.target
Before=ssh.service shutdown.target
Conflicts=shutdown.target
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
# sshd waits for this key, and the first login waits for sshd: ahead of the rest of the boot.
Nice=-10
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
EOT
    mkdir -p /etc/ssh/sshd_config.d /etc/systemd/system/ssh.service.d
    # Only the key made above: sshd would otherwise log at every boot that the others are missing.
    printf 'HostKey /etc/ssh/ssh_host_ed25519_key\n' > /etc/ssh/sshd_config.d/10-kickgate-hostkeys.conf
    # The unit's `sshd -t` before `sshd -D` is a second sshd start on the way to the first login;
    # sshd -D checks the same configuration and fails the unit the same way.
    printf '[Service]\nExecStartPre=\n' > /etc/systemd/system/ssh.service.d/10-kickgate-no-pretest.conf
    systemctl enable ssh-hostkeys.service ssh.service
fi
rm -f /root/.ssh/authorized_keys /root/.ssh/authorized_keys2
echo "ssh-first-boot: host keys removed, generated at first boot"
