"""`pytest specs/ -n 2` over two real images: each built once and verified on one worker, gated on the controller."""

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


def test_two_images_in_parallel_both_register(repo_root: Path, shared_cache_dir: Path, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    res = run_specs(repo_root, shared_cache_dir, "-n", "2", "--image", "generic-dev", "--image", "generic-dev-trixie",
                    "--registry-dir", str(registry), "--artifacts-dir", str(tmp_path / "artifacts"))
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    for name in ("generic-dev", "generic-dev-trixie"):
        assert versions(registry, name) == ["1"], res.stdout[-4000:]
        gate = json.loads((tmp_path / "artifacts" / name / "gate.json").read_text())
        assert gate["verdict"]["promote"] is True
        # Built once and booted once (the clone spec's second instance is the only other boot).
        assert len(gate["timings"]["boot_to_ssh_seconds"]) == 2, gate["timings"]


def test_only_the_image_whose_specs_passed_registers(repo_root: Path, shared_cache_dir: Path,
                                                     tmp_path: Path) -> None:
    root = tmp_path / "recipes"
    make_variant(repo_root, root, "leaky", LEAKY_SCRIPT)
    shutil.copytree(repo_root / "images" / "generic-dev", root / "images" / "generic-dev")
    registry = tmp_path / "registry"
    res = run_specs(repo_root, shared_cache_dir, "-n", "2", "--recipes", str(root), "--image", "generic-dev",
                    "--image", "leaky", "--registry-dir", str(registry))
    assert res.returncode == 1, res.stdout[-6000:]
    assert versions(registry, "generic-dev") == ["1"]
    assert versions(registry, "leaky") == []
    assert "leaky: " in res.stdout and "NOT registered" in res.stdout
