"""The image as built, not only as booted: what contextualization would hide, read from the pristine image.

Contextualization rewrites root's authorized_keys at every boot, so a key baked into the image is
invisible on a booted instance, yet it lets its owner in wherever the context brings no key. These
specs read the image's own bytes, mounted read-only in the instance (the `pristine` fixture), and
look at it through chroot so that paths, symlinks and accounts are the image's, not the booted
system's.
"""

from __future__ import annotations

import shlex
from typing import Any

from guestcmd import run
from judgements import (
    HISTORY_FILES,
    authorized_keys_files,
    authorized_keys_patterns,
    has_content,
    home_files,
    key_lines,
    name_files,
    passwd_accounts,
    plural,
)

from builder.render import KICKSTART_COPIES, POST_LOGS

# Prints each argument (a path or a glob) that names something in the image; IFS only splits on
# newlines, so a glob expands and a path with spaces stays whole.
_PRESENT = """IFS='
'
for pattern in "$@"; do
    for f in $pattern; do
        if [ -e "$f" ]; then printf '%s\\n' "$f"; fi
    done
done
"""


def in_image(host: Any, root: str, script: str, *args: str) -> str:
    """stdout of a shell script run with the image as built as its root (the image's own /bin/sh)."""
    argv = " ".join(shlex.quote(a) for a in args)
    return run(host, f"chroot {shlex.quote(root)} /bin/sh -c {shlex.quote(script)} sh {argv}")


def present(host: Any, root: str, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Which of the paths (or globs) exist in the image, as the image's paths."""
    if not patterns:
        return []
    return list(dict.fromkeys(in_image(host, root, _PRESENT, *patterns).splitlines()))


def regular_files(host: Any, root: str, paths: list[str]) -> list[str]:
    """Which of the paths are regular files (through symlinks inside the image)."""
    script = 'for f in "$@"; do if [ -f "$f" ]; then printf "%s\\n" "$f"; fi; done'
    return in_image(host, root, script, *paths).splitlines() if paths else []


def read(host: Any, root: str, path: str) -> str:
    return in_image(host, root, 'exec cat -- "$1"', path)


def accounts(host: Any, root: str) -> Any:
    found = passwd_accounts(read(host, root, "/etc/passwd"))
    assert any(a.name == "root" for a in found), "the image as built has no root in /etc/passwd"
    return found


def test_no_authorized_keys_in_the_image_as_built(host: Any, pristine: str) -> None:
    patterns = authorized_keys_patterns(run(host, "sshd -T"))
    candidates = authorized_keys_files(accounts(host, pristine), patterns)
    found, details = {}, {}
    for path in regular_files(host, pristine, sorted(candidates)):
        keys = key_lines(read(host, pristine, path))
        if keys:
            found[path] = candidates[path]
            details[path] = plural(len(keys), "key")
    assert not found, (f"the image as built lets keys log in (contextualization hides them on a booted instance, "
                       f"they are live wherever the context has no key): {name_files(found, details)}")


def test_no_installer_answer_file(host: Any, pristine: str) -> None:
    # Anaconda's copies of the kickstart (root password hash, every %post body), and the bootstrap
    # method's build directory (its finish script, environment and the recipe's variables).
    left = present(host, pristine, [*KICKSTART_COPIES, "/root/kickgate"])
    assert not left, f"the image as built keeps the installer's answers: {', '.join(left)}"


def test_no_build_secret(host: Any, pristine: str) -> None:
    problems = []
    left = present(host, pristine, ["/root/kickgate/env.sh", "/root/kickgate/vars.sh", POST_LOGS, "/ks.cfg",
                                    "/root/ks.cfg"])
    if left:
        problems.append(f"build inputs or logs remain: {', '.join(left)}")
    # Every clone would share these: the private host keys sshd would serve (made at first boot,
    # never at build time) and the seeds of its identity and its credentials.
    hostkeys = [line.split(None, 1)[1].strip() for line in run(host, "sshd -T").splitlines()
                if line.lower().startswith("hostkey ")]
    keys = present(host, pristine, ["/etc/ssh/ssh_host_*_key", *hostkeys])
    if keys:
        problems.append(f"private SSH host keys baked in: {', '.join(keys)}")
    seeds = present(host, pristine, ["/var/lib/systemd/random-seed", "/var/lib/systemd/credential.secret"])
    if seeds:
        problems.append(f"per-machine secrets baked in: {', '.join(seeds)}")
    for path in regular_files(host, pristine, ["/etc/machine-id", "/var/lib/dbus/machine-id"]):
        if has_content(read(host, pristine, path)):
            problems.append(f"{path} is not empty: every clone would share the machine ID")
    assert not problems, "the image as built holds build secrets: " + "; ".join(problems)


def test_no_shell_history(host: Any, pristine: str) -> None:
    candidates = home_files(accounts(host, pristine), HISTORY_FILES)
    found = {path: candidates[path] for path in regular_files(host, pristine, sorted(candidates))
             if has_content(read(host, pristine, path))}
    assert not found, f"the image as built keeps what was typed at build time: {name_files(found)}"
