"""Cache keys: the same inputs give the same key, any change to what shapes the image gives a new one."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from builder.build import BuildRecord, cache_key, method_code_hash, recipe_hash
from builder.recipe import Recipe, RecipeBook

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"qemu-img": "qemu-img version 8.2.2", "qemu-system-x86_64": "QEMU emulator version 8.2.2",
         "mmdebstrap": "mmdebstrap 1.4.3", "mke2fs": "mke2fs 1.47.0 (5-Feb-2023)"}


def copy_checkout(dest: Path, name: str = "generic-dev") -> Path:
    """A checkout with one reference recipe and the common scripts, as a user's clone would have."""
    shutil.copytree(REPO_ROOT / "images" / name, dest / "images" / name)
    shutil.copytree(REPO_ROOT / "scripts" / "common", dest / "scripts" / "common")
    return dest


def load(root: Path, name: str = "generic-dev") -> Recipe:
    return RecipeBook(root).load(name)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    return copy_checkout(tmp_path / "checkout")


def keys(root: Path, name: str = "generic-dev") -> tuple[str, str]:
    recipe = load(root, name)
    return recipe_hash(recipe), cache_key(recipe, TOOLS)


def test_same_recipe_twice_same_key(checkout: Path) -> None:
    first, second = load(checkout), load(checkout)
    assert recipe_hash(first) == recipe_hash(second)
    assert cache_key(first, TOOLS) == cache_key(second, dict(reversed(TOOLS.items())))
    assert len(recipe_hash(first)) == 64 and len(cache_key(first, TOOLS)) == 64


def test_content_not_mtime_decides(checkout: Path) -> None:
    before = keys(checkout)
    for path in load(checkout).input_files():
        os.utime(path, (1, 1))
    assert keys(checkout) == before


def test_editing_node_script_changes_key(checkout: Path) -> None:
    before = keys(checkout)
    script = checkout / "images" / "generic-dev" / "scripts" / "node" / "motd.sh"
    script.write_text(script.read_text() + "echo changed\n")
    after = keys(checkout)
    assert after[0] != before[0] and after[1] != before[1]


def test_editing_common_script_changes_key(checkout: Path) -> None:
    before = keys(checkout)
    script = checkout / "scripts" / "common" / "seal.sh"
    script.write_text(script.read_text().replace("#!/bin/sh", "#!/bin/sh -e", 1) + "\n")
    after = keys(checkout)
    assert after[0] != before[0] and after[1] != before[1]


def test_editing_unused_common_script_keeps_key(checkout: Path) -> None:
    before = keys(checkout)
    (checkout / "scripts" / "common" / "unused.sh").write_text("#!/bin/sh\n")
    assert keys(checkout) == before


def test_editing_image_toml_changes_key(checkout: Path) -> None:
    before = keys(checkout)
    toml = checkout / "images" / "generic-dev" / "image.toml"
    toml.write_text(toml.read_text().replace('developers_group = "developers"', 'developers_group = "devs"'))
    after = keys(checkout)
    assert after[0] != before[0] and after[1] != before[1]


def test_chmod_minus_x_changes_key(checkout: Path) -> None:
    before = keys(checkout)
    script = checkout / "images" / "generic-dev" / "scripts" / "node" / "sudoers.sh"
    assert os.access(script, os.X_OK)
    script.chmod(0o644)
    after = keys(checkout)
    assert after[0] != before[0] and after[1] != before[1]


def test_tool_version_changes_key(checkout: Path) -> None:
    recipe = load(checkout)
    newer = {**TOOLS, "qemu-img": "qemu-img version 8.2.3"}
    assert cache_key(recipe, newer) != cache_key(recipe, TOOLS)
    assert cache_key(recipe, {**TOOLS, "new-tool": "1.0"}) != cache_key(recipe, TOOLS)


def test_location_changes_key(tmp_path: Path) -> None:
    recipe = load(copy_checkout(tmp_path, "generic-dev-el9"), "generic-dev-el9")
    a = cache_key(recipe, TOOLS, "https://mirror-a.example/rocky/9/BaseOS/x86_64/os/")
    b = cache_key(recipe, TOOLS, "https://mirror-b.example/rocky/9/BaseOS/x86_64/os/")
    default = cache_key(recipe, TOOLS)
    assert len({a, b, default}) == 3
    assert cache_key(recipe, TOOLS, "https://mirror-a.example/rocky/9/BaseOS/x86_64/os/") == a


def test_recipe_hash_independent_of_checkout_path(tmp_path: Path) -> None:
    one = copy_checkout(tmp_path / "one")
    two = copy_checkout(tmp_path / "elsewhere" / "deeper" / "two")
    r1, r2 = load(one), load(two)
    assert r1.dir != r2.dir
    assert recipe_hash(r1) == recipe_hash(r2)
    assert cache_key(r1, TOOLS) == cache_key(r2, TOOLS)


def test_recipe_hash_of_repo_checkout_matches_copy(tmp_path: Path) -> None:
    assert recipe_hash(load(REPO_ROOT)) == recipe_hash(load(copy_checkout(tmp_path)))


def test_kickstart_template_changes_key(tmp_path: Path) -> None:
    root = copy_checkout(tmp_path, "generic-dev-el9")
    before = keys(root, "generic-dev-el9")
    template = root / "images" / "generic-dev-el9" / "generic-dev-el9.ks.j2"
    template.write_text(template.read_text() + "\n# changed\n")
    assert keys(root, "generic-dev-el9")[0] != before[0]


def test_kickstart_root_password_changes_key_bootstrap_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ks = load(copy_checkout(tmp_path / "ks", "generic-dev-el9"), "generic-dev-el9")
    boot = load(copy_checkout(tmp_path / "boot"))
    monkeypatch.delenv("KICKGATE_ROOTPW_HASH", raising=False)
    ks_before, boot_before = cache_key(ks, TOOLS), cache_key(boot, TOOLS)
    monkeypatch.setenv("KICKGATE_ROOTPW_HASH", "$6$salt$hash")
    assert cache_key(ks, TOOLS) != ks_before
    assert cache_key(boot, TOOLS) == boot_before


def test_method_code_hash_differs_per_method() -> None:
    assert method_code_hash("bootstrap") == method_code_hash("bootstrap")
    assert method_code_hash("bootstrap") != method_code_hash("kickstart")


RECORD = BuildRecord(
    recipe="generic-dev", method="bootstrap", family="debian", recipe_hash="a" * 64, cache_key="b" * 64,
    build_id="generic-dev-20250101T000000Z-abcdef", built_at="2025-01-01T00:00:00+00:00",
    kickgate_version="0.1.0", git_repo="https://example.org/kickgate.git", git_revision="c" * 40,
    git_dirty=True, tools=dict(TOOLS), timings={"bootstrap": 12.5, "convert": 3.25}, total_seconds=15.75,
    image_file="generic-dev.qcow2", image_format="qcow2", image_sha256="d" * 64, image_size=123456789,
    virtual_size_mib=3072, serial_log="serial.log", build_mac="52:54:00:ab:cd:ef", domain_type="kvm",
    packages=(("bash", "5.2.15-2+b2"), ("openssh-server", "1:9.2p1-2+deb12u3")),
    extra={"location": "https://mirror.example/os/", "note": "héllo ✓ 'quoted'"})


def test_build_record_json_round_trip() -> None:
    text = RECORD.to_json()
    back = BuildRecord.from_json(text)
    assert back == RECORD
    assert isinstance(back.packages, tuple)
    assert all(isinstance(p, tuple) and len(p) == 2 for p in back.packages)
    assert back.to_json() == text


def test_build_record_json_round_trip_no_packages() -> None:
    record = replace(RECORD, packages=(), extra={}, git_dirty=False)
    assert BuildRecord.from_json(record.to_json()) == record
