"""`kickgate build IMAGE --console` streams the build domain's serial console, every line exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import standin

pytestmark = pytest.mark.slow


def test_console_prints_each_serial_line_once(tmp_path: Path) -> None:
    missing = standin.missing_prerequisites()
    assert missing is None, f"the stand-in installer needs: {missing} (run ci/setup)"
    kernel = standin.host_kernel()
    assert kernel is not None
    initrd = standin.build_initramfs(kernel, tmp_path / "initrd.img")
    tree = standin.make_tree(tmp_path / "tree", kernel.path, initrd)
    root = tmp_path / "root"
    recipe = standin.recipe_copy(root, str(tree))
    env = {**os.environ, "KICKGATE_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "builder.cli", "--root", str(root), "build", recipe.name, "--console"],
                         capture_output=True, text=True, timeout=600, env=env, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    streamed = [line for line in res.stderr.splitlines() if "kickgate.serial" in line]
    started = [line for line in streamed if line.endswith("stand-in: started")]
    assert len(started) == 1, f"'stand-in: started' streamed {len(started)} times:\n" + "\n".join(streamed[-30:])
    assert any("KICKGATE-INSTALL-OK" in line for line in streamed)
    # Without --console, nothing of the console reaches the terminal.
    quiet = subprocess.run([sys.executable, "-m", "builder.cli", "--root", str(root), "build", recipe.name,
                            "--no-cache"], capture_output=True, text=True, timeout=600, env=env, check=False)
    assert quiet.returncode == 0, quiet.stderr[-4000:]
    assert "stand-in: started" not in quiet.stderr
