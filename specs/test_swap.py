"""No swap in the base image: OpenNebula attaches swap as its own disk, sized to the VM's memory."""

from __future__ import annotations

from typing import Any

from guestcmd import run


def test_no_active_swap(host: Any) -> None:
    active = host.file("/proc/swaps").content_string.strip().splitlines()[1:]
    assert active == [], f"swap is active on the instance: {active}"


def test_no_swap_in_fstab(host: Any) -> None:
    entries = [line.split() for line in host.file("/etc/fstab").content_string.splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    swap = [" ".join(e) for e in entries if len(e) >= 3 and e[2] == "swap"]
    assert swap == [], f"/etc/fstab mounts swap: {swap}"


def test_no_swap_partitions_or_files(host: Any) -> None:
    # blkid answers 2 when no device matches
    parts = run(host, "blkid -o device -t TYPE=swap", ok=(0, 2)).split()
    assert parts == [], f"swap partitions present: {parts}"
    files = [p for p in ("/swapfile", "/swap.img", "/var/swap", "/swap") if host.file(p).exists]
    assert files == [], f"swap files present: {files}"


def test_no_systemd_swap_units(host: Any) -> None:
    units = run(host, "systemctl list-units --type=swap --all --no-legend --plain").strip()
    assert units == "", f"systemd knows swap units: {units}"
    # The unit files `systemctl list-unit-files --type=swap` would list (it takes seconds on an
    # emulated CPU): every *.swap in systemd's unit search path, top level or in a .wants/ directory.
    # No search path at all is an error (exit 3), never an empty answer.
    files = run(host, 'paths=$(systemd-analyze unit-paths) && [ -n "$paths" ] || exit 3; '
                      'for d in $paths; do [ -d "$d" ] && find "$d" -maxdepth 2 -name "*.swap"; done; true').split()
    assert files == [], f"swap unit files installed: {', '.join(files)}"
