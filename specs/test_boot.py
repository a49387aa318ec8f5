"""The boot finishes cleanly: every unit started, none failed.

The harness waits for the boot to finish before any spec runs (builder.instance), so a unit
ordered late in the boot has done its work whichever spec module comes first.
"""

from __future__ import annotations

from typing import Any

from guestcmd import run, run_rc


def test_boot_finished_without_failed_units(host: Any) -> None:
    # is-system-running answers with its exit status too: 0 only when running.
    _, state = run_rc(host, "systemctl is-system-running", ok=(0, 1))
    state = state.strip()
    if state == "degraded":
        units = [line.split()[0] for line in
                 run(host, "systemctl list-units --state=failed --no-legend --plain").splitlines() if line.strip()]
        raise AssertionError(f"the boot is degraded, failed units: {', '.join(units) or '(none listed)'} "
                             "(see `systemctl status UNIT` on an instance: kickgate boot IMAGE)")
    assert state == "running", f"systemd reports the system {state!r} after the boot, not 'running'"
