"""`kickgate mutants` end to end: real guests apply real mutants and the real specs judge them.

One shipped mutant and one user mutant that breaks nothing, without the control run. The full
table of shipped mutants, with the control, is bench/mutants.py's job (it takes far longer than
CI allows).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# mutant → exactly the specs that must kill it (every other spec passes on it, as on generic-dev).
# One shipped mutant and one harmless user mutant: one round of two at a time, within the CI budget;
# bench/mutants.py runs every shipped mutant with the control.
EXPECTED = {
    "swap-fstab-file": {"test_no_active_swap", "test_no_swap_in_fstab", "test_no_swap_partitions_or_files",
                        "test_no_systemd_swap_units"},
}
HARMLESS = """#!/bin/sh
# mutant: writes a harmless file that no property cares about
# breaks: nothing
set -eu
echo "hello from a mutant" > /etc/kickgate-harmless
"""


def kickgate(repo_root: Path, cache: Path, registry: Path, *args: str,
             timeout: float = 2400) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KICKGATE_CACHE_DIR": str(cache), "KICKGATE_REGISTRY_DIR": str(registry)}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], cwd=repo_root, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def cache_entries(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in (cache / "images").glob("*/*")}


def test_mutants_are_killed_by_their_specs_and_a_harmless_one_survives(repo_root: Path, shared_cache_dir: Path,
                                                                       tmp_path: Path) -> None:
    root = tmp_path / "recipes"
    shutil.copytree(repo_root / "images" / "generic-dev", root / "images" / "generic-dev")
    shutil.copytree(repo_root / "scripts", root / "scripts")
    harmless = root / "images" / "generic-dev" / "mutants" / "harmless.sh"
    harmless.parent.mkdir()
    harmless.write_text(HARMLESS)
    registry = tmp_path / "registry"
    built = kickgate(repo_root, shared_cache_dir, registry, "--recipes", str(root), "build", "generic-dev")
    assert built.returncode == 0, built.stderr[-3000:]
    before = cache_entries(shared_cache_dir)

    res = kickgate(repo_root, shared_cache_dir, registry, "--recipes", str(root), "mutants", "generic-dev",
                   *(a for name in [*EXPECTED, "harmless"] for a in ("--mutant", name)), "--json",
                   # generic-dev passing every spec is the README job's proof; here the mutants only
                   "--no-control")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-6000:]  # the harmless mutant survived
    results = {r["name"]: r for r in json.loads(res.stdout)}
    assert list(results) == [*EXPECTED, "harmless"]
    for name, specs in EXPECTED.items():
        r = results[name]
        assert r["outcome"] == "killed" and set(r["killed_by"]) == specs, (name, r, res.stderr[-4000:])
    assert results["harmless"]["outcome"] == "survived" and results["harmless"]["killed_by"] == []
    assert results["harmless"]["source"] == str(harmless)
    # one log line per mutant start and end
    for name in results:
        assert f"mutant {name}: applying" in res.stderr
    assert "control: done in" not in res.stderr

    assert not registry.exists(), "a mutant run touched the registry"
    assert cache_entries(shared_cache_dir) == before, "a mutant run changed the build cache"
    # leftover guests and /tmp/kg-mut-* directories: the autouse no_leaks fixture (conftest)
