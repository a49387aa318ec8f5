"""Contextualization wired into rc.local, as the article does, and really applied at boot."""

from __future__ import annotations

from typing import Any

from guestcmd import run, run_rc

from builder.instance import INIT_MARKER


def _rc_local(host: Any) -> Any:
    return host.file("/etc/rc.d/rc.local") if host.file("/etc/rc.d/rc.local").exists else host.file("/etc/rc.local")


def test_rc_local_exists_and_is_executable(host: Any) -> None:
    rc = _rc_local(host)
    assert rc.exists, "there is no rc.local"
    assert rc.mode & 0o111, f"{rc.path} is not executable, so systemd will not run it"


def test_rc_local_mounts_the_context_cd_and_sources_context_sh(host: Any) -> None:
    text = _rc_local(host).content_string
    assert "CONTEXT" in text, "rc.local does not look for the CD labelled CONTEXT"
    assert "mount" in text and "-o ro" in text, "rc.local does not mount the context CD read-only"
    assert "context.sh" in text, "rc.local does not source context.sh"


def test_rc_local_runs_at_boot(host: Any) -> None:
    # rc-local is a oneshot that stays active after its script ran (RemainAfterExit).
    _, state = run_rc(host, "systemctl is-active rc-local.service", ok=(0, 3))
    assert state.strip() == "active", f"rc-local.service did not run at boot: it is {state.strip()}"


def test_context_key_applied(host: Any, instance: Any) -> None:
    keys = host.file("/root/.ssh/authorized_keys").content_string.strip().splitlines()
    assert keys == [instance.key.public_line], "authorized_keys holds something other than the context key"


def test_context_hostname_applied(host: Any, instance: Any) -> None:
    assert run(host, "hostname").strip() == instance.hostname


def test_context_init_script_ran(host: Any, instance: Any) -> None:
    marker = host.file(INIT_MARKER)
    assert marker.exists, "init.sh from the context CD (FILES/INIT_SCRIPTS) did not run"
    assert instance.hostname in marker.content_string, "init.sh ran without the context variables"


def test_context_cd_unmounted_after_use(host: Any) -> None:
    mounts = host.file("/proc/mounts").content_string
    assert "/run/one-context/cd" not in mounts, "the context CD is still mounted"
