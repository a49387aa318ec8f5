"""`pytest specs/ -n 2` over real images: each built once and verified on one worker, gated on the controller.

One run covers both promises: the reference image passes and registers, and a broken variant beside
it, on the other worker, fails its specs and registers nothing without holding the good one back.
Each image is booted exactly twice (its instance and the clone spec's second one): a scheduler that
spread one image's specs over both workers would boot it on each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_pipeline_e2e import LEAKY_SCRIPT, make_variant, run_specs

pytestmark = pytest.mark.slow


def versions(registry: Path, name: str) -> list[str]:
    d = registry / name
    return sorted(p.name for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_parallel_images_are_gated_one_by_one(repo_root: Path, shared_cache_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "recipes"
    make_variant(repo_root, root, "leaky", LEAKY_SCRIPT)
    shutil.copytree(repo_root / "images" / "generic-dev", root / "images" / "generic-dev")
    registry, artifacts = tmp_path / "registry", tmp_path / "artifacts"
    res = run_specs(repo_root, shared_cache_dir, "-n", "2", "--recipes", str(root), "--image", "generic-dev",
                    "--image", "leaky", "--registry-dir", str(registry),
                    "--artifacts-dir", str(artifacts))
    assert res.returncode == 1, res.stdout[-6000:] + res.stderr[-2000:]
    assert versions(registry, "generic-dev") == ["1"], res.stdout[-6000:]
    gates = {name: json.loads((artifacts / name / "gate.json").read_text()) for name in ("generic-dev", "leaky")}
    assert gates["generic-dev"]["verdict"]["promote"] is True
    assert versions(registry, "leaky") == []
    assert gates["leaky"]["verdict"]["promote"] is False and "did not pass" in gates["leaky"]["verdict"]["reason"]
    for name, gate in gates.items():
        # Booted once per run: the first instance and the clone spec's second one, no more.
        assert len(gate["timings"]["boot_to_ssh_seconds"]) == 2, (name, gate["timings"])
