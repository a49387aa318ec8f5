#!/usr/bin/env python3
"""Spec time on a settled guest: testinfra's paramiko backend (a new SSH session per command)
against kickgate's shell backend (one remote shell for every command).

    .venv/bin/python bench/specs.py [--image generic-dev] [--cache-dir DIR] [--backend paramiko|shell]

Each backend gets its own `pytest specs/` run (nothing registered) in a subprocess; before the
first spec the guest is left to finish booting (`systemctl is-system-running --wait`), so first-boot
work does not count against either. Printed: the sum of the specs' call times, and the same
without the clone spec, whose time is mostly the second instance's boot.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CLONE_SPEC = "test_two_clones_differ_in_machine_id_and_host_keys"


def _inner(backend: str, pytest_args: list[str]) -> int:
    """In the spec run's own process: choose the backend, wait for a settled guest, run pytest."""
    sys.path.insert(0, str(REPO))
    import pytest

    from builder.instance import Instance

    shell_host = Instance.host.fget  # type: ignore[attr-defined]

    def paramiko_host(self: Instance) -> Any:
        import testinfra

        if self._host is None:
            self._host = testinfra.get_host(f"paramiko://{self.name}", ssh_config=str(self.ssh_config), timeout=60)
            if self._ssh is not None:
                self._host.backend.__dict__["client"] = self._ssh
        return self._host

    chosen = paramiko_host if backend == "paramiko" else shell_host

    def settled_host(self: Instance) -> Any:
        if self._host is None:
            self.run("systemctl is-system-running --wait", timeout=300)
        return chosen(self)

    Instance.host = property(settled_host)  # type: ignore[assignment,method-assign]
    return int(pytest.main(pytest_args))


def run(backend: str, image: str, cache: Path | None, work: Path) -> dict[str, float]:
    junit = work / f"{backend}.xml"
    args = ["-q", "-p", "no:cacheprovider", "specs/", "--image", image, "--no-register", f"--junitxml={junit}",
            "-o", "junit_duration_report=call"]  # the specs themselves: not the boot in a fixture's setup
    if cache is not None:
        args.append(f"--cache-dir={cache}")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    proc = subprocess.run([sys.executable, __file__, "--inner", backend, "--", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False, timeout=1800)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
        print(f"{backend}: pytest exit {proc.returncode} (times below are still the specs' own)")
    times: dict[str, float] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        times[case.get("name", "")] = float(case.get("time", "0"))
    return times


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--inner":
        return _inner(sys.argv[2], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="generic-dev")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--backend", choices=("paramiko", "shell"), action="append",
                   help="only this backend (repeatable; default: both)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kickgate-bench-specs-") as tmp:
        results = {b: run(b, args.image, args.cache_dir, Path(tmp)) for b in args.backend or ("paramiko", "shell")}
    print(f"spec time on a settled guest: {args.image}, {os.cpu_count()} cores")
    for backend, times in results.items():
        total = sum(times.values())
        clone = sum(t for n, t in times.items() if n.startswith(CLONE_SPEC))
        slowest = sorted(times.items(), key=lambda kv: -kv[1])[:3]
        print(f"  {backend:<9} {len(times)} specs  {total:6.1f} s   without the clone spec {total - clone:6.1f} s   "
              f"slowest: " + ", ".join(f"{n.split('[')[0]} {t:.1f} s" for n, t in slowest))
    backends = list(results)
    print("\n  " + "".join(f"{b:>10}" for b in backends) + "   spec")
    for name in sorted(set().union(*results.values())):
        print("  " + "".join(f"{results[b].get(name, 0.0):10.2f}" for b in backends) + f"   {name.split('[')[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
