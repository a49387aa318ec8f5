"""The specs catch realistic defects: one variant of generic-dev carries several, each named by its own spec.

One build (its root tree is shared with generic-dev, so only the finish VM runs again) and one
verify run keep this module's cost to a few minutes; the reference image passing the same specs
is shown by test_pipeline_e2e's main-job test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pipeline_e2e import junit_outcomes, make_variant, run_specs

pytestmark = pytest.mark.slow

# A usable SHA-512 crypt hash (of "build-time"), as a build that set a password would leave.
USABLE_HASH = "$6$kickgatesalt$b3EvdNiJ9W91Rwj0w3iRipwOdiIte9cSSGvRoarAO2ICS8.k8IQgoGSSvNp/ZWq5zv.4EhtuBlH5MkjiShZFe0"

FLAWED_SCRIPT = f"""#!/bin/sh
# Deliberately broken in ways the first specs let through, each caught by one spec.
set -eu
# Accounts: root's shadow field emptied, an empty field in /etc/passwd, a usable hash.
passwd -d root
useradd -M -s /bin/sh ghost
sed -i 's/^ghost:x:/ghost::/' /etc/passwd
useradd -M -s /bin/sh builder
usermod -p '{USABLE_HASH}' builder
# Identity: sshd serves a key made now, from outside ssh_host_*; every clone presents it.
mkdir -p /etc/ssh/baked /etc/ssh/sshd_config.d
ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/baked/host_ed25519
echo 'HostKey /etc/ssh/baked/host_ed25519' > /etc/ssh/sshd_config.d/50-baked.conf
# The image as built (contextualization hides or never looks): root trusts a build key, which the
# context's key replaces at every boot; a service account outside /home and a per-user key file
# that the configuration adds trust it too; the installer's answers and a shell history stay.
ssh-keygen -q -t ed25519 -N '' -C build@kickgate -f /tmp/build_key
mkdir -p -m 700 /root/.ssh
{{ echo '# build access'; cat /tmp/build_key.pub; }} > /root/.ssh/authorized_keys
useradd -m -d /var/lib/deploy -s /bin/sh deploy
mkdir -p -m 700 /var/lib/deploy/.ssh
cp /tmp/build_key.pub /var/lib/deploy/.ssh/authorized_keys
echo 'AuthorizedKeysFile .ssh/authorized_keys .ssh/authorized_keys2 /etc/ssh/authorized_keys/%u' \
    >> /etc/ssh/sshd_config.d/50-baked.conf
mkdir -p /etc/ssh/authorized_keys
cp /tmp/build_key.pub /etc/ssh/authorized_keys/builder
rm -f /tmp/build_key /tmp/build_key.pub
printf 'lang=en_US.UTF-8\nversion=bookworm\n' > /root/anaconda-ks.cfg
printf 'curl -u deploy:build-time https://repo.example/upload\n' > /var/lib/deploy/.bash_history
printf 'import os\n' > /root/.python_history
# Firewall (the reference images' native nftables ruleset): IPv6 let in by a family match at the
# top of the input chain; IPv4 opened by an accept-all rule late in the boot.
sed -i 's/^\\( *\\)ct state established,related accept/\\1meta nfproto ipv6 accept\\n&/' /etc/nftables.conf
grep -q 'meta nfproto ipv6 accept' /etc/nftables.conf
cat > /etc/systemd/system/late-open.service <<'EOT'
[Unit]
Description=Opens the IPv4 firewall after the rest of the boot
After=multi-user.target nftables.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'sleep 25; nft insert rule inet filter input meta nfproto ipv4 accept'
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
EOT
# Swap: a swap file in fstab, active at every boot.
fallocate -l 32M /swapfile && chmod 600 /swapfile && mkswap /swapfile
echo '/swapfile none swap sw 0 0' >> /etc/fstab
# Persistent naming: the build NIC's MAC pinned to eth0 by a udev rule.
mac=$(cat /sys/class/net/eth0/address)
echo "SUBSYSTEM==\\"net\\", ACTION==\\"add\\", ATTR{{address}}==\\"$mac\\", NAME=\\"eth0\\"" \\
    > /etc/udev/rules.d/70-persistent-net.rules
# Boot: a unit that fails, so the system ends up degraded.
cat > /etc/systemd/system/flawed-agent.service <<'EOT'
[Unit]
Description=An agent that fails at every boot

[Service]
Type=oneshot
ExecStart=/bin/false

[Install]
WantedBy=multi-user.target
EOT
systemctl enable late-open.service flawed-agent.service
"""

# spec → what its failure message must name; every other spec passes on the variant.
EXPECTED = {
    "test_boot_finished_without_failed_units": ["the boot is degraded", "flawed-agent.service"],
    "test_no_account_has_an_empty_or_usable_password": [
        "root (empty password in /etc/shadow)", "ghost (empty password field in /etc/passwd)",
        "builder (usable password hash in /etc/shadow)"],
    "test_two_clones_differ_in_machine_id_and_host_keys": [
        "serve the same SSH host key from /etc/ssh/baked/host_ed25519", "same host key in the SSH handshake"],
    "test_host_keys_made_at_first_boot": ["predate this boot", "/etc/ssh/baked/host_ed25519"],
    # the accept-all rule is inserted by a unit that runs after SSH answers: only a settled boot shows it
    "test_inbound_ipv4_dropped_by_default": ["IPv4: nft inet filter input accepts everything", '"ipv4"'],
    "test_inbound_ipv6_dropped_by_default": ["IPv6: nft inet filter input accepts everything", '"ipv6"'],
    # the image as built: root's baked key is gone from the booted instance, the others are outside
    # where the booted spec looks (/home and /root)
    "test_no_authorized_keys_in_the_image_as_built": [
        "/root/.ssh/authorized_keys (root; 1 key)", "/var/lib/deploy/.ssh/authorized_keys (deploy; 1 key)",
        "/etc/ssh/authorized_keys/builder (builder; 1 key)"],
    "test_no_installer_answer_file": ["installer's answers: /root/anaconda-ks.cfg"],
    "test_no_build_secret": ["private SSH host keys baked in: /etc/ssh/baked/host_ed25519"],
    "test_no_shell_history": ["/root/.python_history (root)", "/var/lib/deploy/.bash_history (deploy)"],
    "test_no_active_swap": ["swap is active on the instance", "/swapfile"],
    "test_no_swap_in_fstab": ["/etc/fstab mounts swap"],
    "test_no_swap_partitions_or_files": ["/swapfile"],
    "test_no_systemd_swap_units": ["swapfile.swap"],
    "test_no_persistent_net_rules": ["70-persistent-net.rules exists"],
    "test_no_mac_pinned_in_network_configs": ["MAC", "70-persistent-net.rules"],
    "test_listeners_are_blocked_but_ssh_is_not": [
        "tcp 8080 from the host", "tcp 5432 from the host", "tcp 2375 from the host", "udp over IPv4 from outside",
        "tcp 8080 over IPv6 from outside", "udp over IPv6 from outside"],
}


def test_each_defect_fails_the_spec_that_names_it(repo_root: Path, shared_cache_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "recipes"
    make_variant(repo_root, root, "flawed", FLAWED_SCRIPT)
    junit = tmp_path / "junit.xml"
    registry = tmp_path / "registry"
    res = run_specs(repo_root, shared_cache_dir, "--recipes", str(root), "--image", "flawed",
                    "--registry-dir", str(registry), f"--junitxml={junit}")
    assert res.returncode == 1, res.stdout[-6000:] + res.stderr[-3000:]
    outcomes = junit_outcomes(junit)
    failed = {name: msg for name, (outcome, msg) in outcomes.items() if outcome != "passed"}
    unexpected = {name: msg[-1500:] for name, msg in failed.items() if name not in EXPECTED}
    assert not unexpected and set(failed) == set(EXPECTED), \
        f"unexpected: {unexpected}, missed: {set(EXPECTED) - set(failed)}"
    for name, phrases in EXPECTED.items():
        for phrase in phrases:
            assert phrase in failed[name], f"{name} does not say {phrase!r}:\n{failed[name][-2000:]}"
    assert f"NOT registered: {len(EXPECTED)} of" in res.stdout
    assert not (registry / "flawed").exists()
