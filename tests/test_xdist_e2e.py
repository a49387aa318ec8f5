"""`pytest specs/ -n 2` over real images: each built once and verified on one worker, gated on the controller.

One run covers both promises: the two reference images (Debian 12 and 13) pass and register, and a
broken variant beside them fails its specs and registers nothing, without holding the others back.
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
    for name in ("generic-dev", "generic-dev-trixie"):
        shutil.copytree(repo_root / "images" / name, root / "images" / name)
    registry, artifacts = tmp_path / "registry", tmp_path / "artifacts"
    res = run_specs(repo_root, shared_cache_dir, "-n", "2", "--recipes", str(root), "--image", "generic-dev",
                    "--image", "generic-dev-trixie", "--image", "leaky", "--registry-dir", str(registry),
                    "--artifacts-dir", str(artifacts))
    assert res.returncode == 1, res.stdout[-6000:] + res.stderr[-2000:]
    for name in ("generic-dev", "generic-dev-trixie"):
        assert versions(registry, name) == ["1"], res.stdout[-6000:]
        gate = json.loads((artifacts / name / "gate.json").read_text())
        assert gate["verdict"]["promote"] is True
        # Booted once per run: the first instance and the clone spec's second one, no more.
        assert len(gate["timings"]["boot_to_ssh_seconds"]) == 2, gate["timings"]
    assert versions(registry, "leaky") == []
    leaky = json.loads((artifacts / "leaky" / "gate.json").read_text())
    assert leaky["verdict"]["promote"] is False and "did not pass" in leaky["verdict"]["reason"]
