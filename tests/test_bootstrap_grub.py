"""The GRUB menu the bootstrap method writes on the host instead of running update-grub in the VM."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from builder.methods.bootstrap import configure_tree, mmdebstrap_argv
from builder.recipe import RecipeBook
from tests.test_recipe import BASE, make_tree

ROOT_UUID = "8d17b1ff-2b05-4ab4-a754-03583eef1c8b"


def _configured(tmp_path: Path, kernels: tuple[str, ...] = ("6.1.0-50-amd64",)) -> Path:
    make_tree(tmp_path / "repo", BASE)
    recipe = RecipeBook(tmp_path / "repo").load("demo")
    tree = tmp_path / "tree"
    (tree / "boot").mkdir(parents=True)
    for k in kernels:
        (tree / "boot" / f"vmlinuz-{k}").write_text("")
        (tree / "boot" / f"initrd.img-{k}").write_text("")
    configure_tree(recipe, tree, ROOT_UUID)
    return tree


def _defaults(tree: Path) -> dict[str, str]:
    values = {}
    for line in (tree / "etc/default/grub").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = " ".join(shlex.split(value))
    return values


def test_menu_boots_the_kernel_with_the_command_line_of_etc_default_grub(tmp_path: Path) -> None:
    tree = _configured(tmp_path)
    cfg = (tree / "boot/grub/grub.cfg").read_text()
    defaults = _defaults(tree)
    linux = re.findall(r"^\s*linux\s+(\S+)\s+(.*)$", cfg, re.M)
    assert linux == [("/boot/vmlinuz-6.1.0-50-amd64", f"root=UUID={ROOT_UUID} ro {defaults['GRUB_CMDLINE_LINUX']}")]
    assert re.findall(r"^\s*initrd\s+(\S+)$", cfg, re.M) == ["/boot/initrd.img-6.1.0-50-amd64"]
    assert re.search(rf"^\s*search --no-floppy --fs-uuid --set=root .*{ROOT_UUID}$", cfg, re.M)
    # The menu must not wait and must talk on the serial console, as /etc/default/grub says.
    assert "set timeout=0" in cfg and defaults["GRUB_TIMEOUT"] == "0"
    assert defaults["GRUB_SERIAL_COMMAND"] in cfg.splitlines()
    assert "terminal_output serial console" in cfg and defaults["GRUB_TERMINAL"] == "serial console"
    assert cfg.count("menuentry ") == 1 and cfg.count("{") == cfg.count("}")



def test_setup_hook_configures_both_initramfs_generators_with_the_recipe_modules(tmp_path: Path) -> None:
    # The hook runs in sh before any package unpacks (mmdebstrap passes the tree as $1); whichever
    # generator the recipe installs must find the short module list there, never its defaults.
    recipe = RecipeBook(Path(__file__).resolve().parent.parent).load("generic-dev")
    assert recipe.bootstrap is not None
    hooks = [a.removeprefix("--setup-hook=") for a in mmdebstrap_argv(recipe, tmp_path / "unused")
             if a.startswith("--setup-hook=")]
    assert len(hooks) == 1
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["sh", "-c", hooks[0], "sh", str(tree)], check=True, timeout=30)
    modules = recipe.bootstrap.initramfs_modules
    assert (tree / "etc/initramfs-tools/modules").read_text().split() == list(modules)
    assert "MODULES=list" in (tree / "etc/initramfs-tools/conf.d/kickgate.conf").read_text().splitlines()
    # tiny-initramfs reads its configuration as shell: source it the same way.
    out = subprocess.run(["sh", "-c", '. "$1" && echo "$AUTO_MODULES|$MICROCODE|$INCLUDE_MODULES"', "sh",
                          str(tree / "etc/tiny-initramfs/tiny-initramfs.conf")],
                         check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    assert out == f"no|no|{','.join(modules)}"
