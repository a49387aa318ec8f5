"""`pytest specs/ -n 2` over real images: each built once and verified on one worker, gated on the controller.

One run covers the promises of a parallel run: the reference image passes and registers while an
image without contextualization, on the other worker, fails with a clear error and registers
nothing, without holding the good one back; the good image is booted exactly twice (its instance
and the clone spec's second one: a scheduler that spread its specs over both workers would boot it
on each); and `--keep-instance on-failure` keeps only the failing image's instance, reachable from
the summary the controller prints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline_e2e import junit_outcomes, make_variant, run_specs

pytestmark = pytest.mark.slow

NO_CONTEXT_SCRIPT = """#!/bin/sh
# Deliberately broken: contextualization emptied out of rc.local.
printf '#!/bin/sh\\nexit 0\\n' > /etc/rc.local
"""


def versions(registry: Path, name: str) -> list[str]:
    d = registry / name
    return sorted(p.name for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_parallel_images_are_gated_one_by_one(repo_root: Path, shared_cache_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "recipes"
    make_variant(repo_root, root, "no-context", NO_CONTEXT_SCRIPT)
    shutil.copytree(repo_root / "images" / "generic-dev", root / "images" / "generic-dev")
    registry, artifacts, junit = tmp_path / "registry", tmp_path / "artifacts", tmp_path / "junit.xml"
    kept_cache = tmp_path / "kept-cache"  # where kept-instance records go: this test's own
    kept_cache.mkdir()
    for entry in shared_cache_dir.iterdir():  # share the builds, not the kept records
        if entry.name == "build-secret.key":  # a key file must be a real 0600 file: copy, do not link
            shutil.copy2(entry, kept_cache / entry.name)
        elif entry.name != "kept":
            (kept_cache / entry.name).symlink_to(entry)
    res = run_specs(repo_root, kept_cache, "-n", "2", "--recipes", str(root), "--image", "no-context",
                    "--image", "generic-dev", "--registry-dir", str(registry), f"--junitxml={junit}",
                    "--keep-instance", "on-failure", "--artifacts-dir", str(artifacts))
    pid = None
    try:
        assert res.returncode == 1, res.stdout[-6000:] + res.stderr[-2000:]
        # The good image: every spec passed, registered, booted once plus the clone.
        good = junit_outcomes(junit, "generic-dev")
        assert good and all(outcome == "passed" for outcome, _ in good.values()), good
        assert versions(registry, "generic-dev") == ["1"], res.stdout[-6000:]
        gates = {name: json.loads((artifacts / name / "gate.json").read_text())
                 for name in ("generic-dev", "no-context")}
        assert gates["generic-dev"]["verdict"]["promote"] is True
        assert len(gates["generic-dev"]["timings"]["boot_to_ssh_seconds"]) == 2, gates["generic-dev"]["timings"]
        # The broken image: every spec errors with the reason, nothing registered.
        broken = junit_outcomes(junit, "no-context")
        assert broken and all(outcome == "error" for outcome, _ in broken.values()), broken
        message = next(iter(broken.values()))[1]
        assert "InstanceError" in message and "reached: login prompt" in message
        assert "contextualization did not configure the network" in message
        assert versions(registry, "no-context") == [] and gates["no-context"]["verdict"]["promote"] is False
        assert "NOT registered" in res.stdout
        logs = list((artifacts / "no-context").glob("instance-kg-no-context-*-serial.log"))
        assert logs and "login:" in logs[0].read_text(errors="replace"), "failed boot's log not kept"
        # The failed instance outlives the run for a person to inspect, and the summary says how to reach it.
        assert "kept kg-no-context-" in res.stdout and "ssh -F " in res.stdout
        assert "kept kg-generic-dev-" not in res.stdout, "an image whose specs passed kept its instance"
        records = list((kept_cache / "kept").glob("*.json"))
        assert len(records) == 1 and "no-context" in records[0].name
        pid = json.loads(records[0].read_text())["pid"]
        assert pid and Path(f"/proc/{pid}").exists(), "the kept instance is not running"
    finally:
        cleanup = subprocess.run([sys.executable, "-m", "builder.cli", "--cache-dir", str(kept_cache), "cleanup"],
                                 capture_output=True, text=True, timeout=60, check=False)
    assert "removed 1 kept instance(s)" in cleanup.stdout, cleanup.stdout + cleanup.stderr
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower():
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"kickgate cleanup left the kept QEMU (pid {pid}) running")
