"""Cache keys: the same inputs give the same key, any change to what shapes the image gives a new one."""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from builder import recipe as recipe_module
from builder.build import BUILD_KEY_NAME, BuildRecord, cache_key, method_code_hash, recipe_hash
from builder.method import PACKAGE_DIR, get_method
from builder.packages import Package
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


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name == "KICKGATE_ROOTPW_HASH" or name.startswith("KICKGATE_SECRET_"):
            monkeypatch.delenv(name)
    return tmp_path / "cache"


def key_of(recipe: Recipe, cache: Path, tools: dict[str, str] = TOOLS, location: str | None = None) -> str:
    return cache_key(recipe, get_method(recipe.method), tools, cache, location)


def keys(root: Path, cache: Path, name: str = "generic-dev") -> tuple[str, str]:
    recipe = load(root, name)
    return recipe_hash(recipe), key_of(recipe, cache)


def test_same_recipe_twice_same_key(checkout: Path, cache_dir: Path) -> None:
    first, second = load(checkout), load(checkout)
    assert recipe_hash(first) == recipe_hash(second)
    assert key_of(first, cache_dir) == key_of(second, cache_dir, dict(reversed(TOOLS.items())))
    assert len(recipe_hash(first)) == 64 and len(key_of(first, cache_dir)) == 64


def test_content_not_mtime_decides(checkout: Path, cache_dir: Path) -> None:
    before = keys(checkout, cache_dir)
    for path in load(checkout).input_files():
        os.utime(path, (1, 1))
    assert keys(checkout, cache_dir) == before


def test_a_comment_or_an_unrelated_file_changes_nothing(checkout: Path, cache_dir: Path) -> None:
    before = keys(checkout, cache_dir)
    toml = checkout / "images" / "generic-dev" / "image.toml"
    toml.write_text("# a comment a reviewer asked for\n" + toml.read_text())
    (checkout / "images" / "generic-dev" / "README.md").write_text("notes\n")
    (checkout / "images" / "other").mkdir()
    assert keys(checkout, cache_dir) == before


def test_a_parsed_value_changes_the_key(checkout: Path, cache_dir: Path) -> None:
    before = keys(checkout, cache_dir)
    toml = checkout / "images" / "generic-dev" / "image.toml"
    toml.write_text(toml.read_text().replace('memory = "1024M"', 'memory = "1536M"'))
    assert keys(checkout, cache_dir)[1] != before[1]


def test_a_default_in_recipe_code_changes_the_key(checkout: Path, cache_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # generic-dev names no mirror: the default one shapes the image, so it is part of the key.
    assert "mirror" not in (checkout / "images" / "generic-dev" / "image.toml").read_text()
    before = keys(checkout, cache_dir)
    monkeypatch.setattr(recipe_module, "DEFAULT_MIRROR", "http://mirror.example/debian")
    assert load(checkout).bootstrap.mirror == "http://mirror.example/debian"  # type: ignore[union-attr]
    assert keys(checkout, cache_dir)[1] != before[1]


def test_editing_node_script_changes_key(checkout: Path, cache_dir: Path) -> None:
    before = keys(checkout, cache_dir)
    script = checkout / "images" / "generic-dev" / "scripts" / "node" / "motd.sh"
    script.write_text(script.read_text() + "echo changed\n")
    after = keys(checkout, cache_dir)
    assert after[0] != before[0] and after[1] != before[1]


def test_chmod_minus_x_changes_key(checkout: Path, cache_dir: Path) -> None:
    before = keys(checkout, cache_dir)
    script = checkout / "images" / "generic-dev" / "scripts" / "node" / "sudoers.sh"
    assert os.access(script, os.X_OK)
    script.chmod(0o644)
    after = keys(checkout, cache_dir)
    assert after[0] != before[0] and after[1] != before[1]


def test_tool_version_changes_key(checkout: Path, cache_dir: Path) -> None:
    recipe = load(checkout)
    newer = {**TOOLS, "qemu-img": "qemu-img version 8.2.3"}
    assert key_of(recipe, cache_dir, newer) != key_of(recipe, cache_dir)
    assert key_of(recipe, cache_dir, {**TOOLS, "new-tool": "1.0"}) != key_of(recipe, cache_dir)


def test_location_changes_key(tmp_path: Path, cache_dir: Path) -> None:
    recipe = load(copy_checkout(tmp_path, "generic-dev-el9"), "generic-dev-el9")
    a = key_of(recipe, cache_dir, location="https://mirror-a.example/rocky/9/BaseOS/x86_64/os/")
    b = key_of(recipe, cache_dir, location="https://mirror-b.example/rocky/9/BaseOS/x86_64/os/")
    default = key_of(recipe, cache_dir)
    assert len({a, b, default}) == 3
    assert key_of(recipe, cache_dir, location="https://mirror-a.example/rocky/9/BaseOS/x86_64/os/") == a


def test_recipe_hash_independent_of_checkout_path(tmp_path: Path, cache_dir: Path) -> None:
    one = copy_checkout(tmp_path / "one")
    two = copy_checkout(tmp_path / "elsewhere" / "deeper" / "two")
    r1, r2 = load(one), load(two)
    assert r1.dir != r2.dir
    assert recipe_hash(r1) == recipe_hash(r2)
    assert key_of(r1, cache_dir) == key_of(r2, cache_dir)


def test_recipe_hash_of_repo_checkout_matches_copy(tmp_path: Path) -> None:
    assert recipe_hash(load(REPO_ROOT)) == recipe_hash(load(copy_checkout(tmp_path)))


def test_kickstart_template_changes_key(tmp_path: Path, cache_dir: Path) -> None:
    root = copy_checkout(tmp_path, "generic-dev-el9")
    before = keys(root, cache_dir, "generic-dev-el9")
    template = root / "images" / "generic-dev-el9" / "generic-dev-el9.ks.j2"
    template.write_text(template.read_text() + "\n# changed\n")
    assert keys(root, cache_dir, "generic-dev-el9")[0] != before[0]


def test_kickstart_root_password_changes_key_bootstrap_not(tmp_path: Path, cache_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ks = load(copy_checkout(tmp_path / "ks", "generic-dev-el9"), "generic-dev-el9")
    boot = load(copy_checkout(tmp_path / "boot"))
    ks_before, boot_before = key_of(ks, cache_dir), key_of(boot, cache_dir)
    monkeypatch.setenv("KICKGATE_ROOTPW_HASH", "$6$salt$hash")
    assert key_of(ks, cache_dir) != ks_before
    assert key_of(boot, cache_dir) == boot_before


def test_secrets_are_keyed_by_a_private_per_machine_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same secret gives different keys on machines with different build keys: the record's cache
    key cannot be checked against a dictionary of candidate passwords without the 0600 key file."""
    ks = load(copy_checkout(tmp_path / "ks", "generic-dev-el9"), "generic-dev-el9")
    monkeypatch.setenv("KICKGATE_ROOTPW_HASH", "$6$salt$hash")
    one, two = tmp_path / "machine-one", tmp_path / "machine-two"
    assert key_of(ks, one) != key_of(ks, two)
    assert key_of(ks, one) == key_of(ks, one)
    key_file = one / BUILD_KEY_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key_file.chmod(0o644)
    with pytest.raises(Exception, match="0600"):
        key_of(ks, one)


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(PACKAGE_DIR, tmp_path / "builder", ignore=shutil.ignore_patterns("__pycache__")))


def test_method_code_changes_its_key_and_only_its_own(package_copy: Path) -> None:
    bootstrap, kickstart = get_method("bootstrap"), get_method("kickstart")
    assert method_code_hash(bootstrap, package_copy) == method_code_hash(bootstrap)
    assert method_code_hash(bootstrap) != method_code_hash(kickstart)
    before = {m.name: method_code_hash(m, package_copy) for m in (bootstrap, kickstart)}
    with (package_copy / "methods" / "bootstrap.py").open("a") as f:
        f.write("\n# a change to how images are made\n")
    assert method_code_hash(bootstrap, package_copy) != before["bootstrap"]
    assert method_code_hash(kickstart, package_copy) == before["kickstart"]
    (package_copy / "cli.py").write_text("# the command line does not shape images\n")
    assert method_code_hash(bootstrap, package_copy) != before["bootstrap"]  # unchanged since the edit above
    after_cli = method_code_hash(kickstart, package_copy)
    assert after_cli == before["kickstart"]
    with (package_copy / "recipe.py").open("a") as f:
        f.write("\n# recipe defaults shape every image\n")
    assert method_code_hash(kickstart, package_copy) != before["kickstart"]


RECORD = BuildRecord(
    recipe="generic-dev", method="bootstrap", family="debian", recipe_hash="a" * 64, cache_key="b" * 64,
    build_id="generic-dev-20250101T000000Z-abcdef", built_at="2025-01-01T00:00:00+00:00",
    kickgate_version="0.1.0", git_repo="https://example.org/kickgate.git", git_revision="c" * 40,
    git_dirty=True, tools=dict(TOOLS), timings={"bootstrap": 12.5, "convert": 3.25}, total_seconds=15.75,
    image_file="generic-dev.qcow2", image_format="qcow2", image_sha256="d" * 64, image_size=123456789,
    virtual_size_mib=3072, serial_log="serial.log", build_mac="52:54:00:ab:cd:ef", domain_type="kvm",
    packages=(Package("deb", "bash", "5.2.15-2+b2", "amd64", "bash", "5.2.15-2", ("GPL-3+",)),
              Package("deb", "openssh-server", "1:9.2p1-2+deb12u3", "amd64", "openssh", "1:9.2p1-2+deb12u3", None)),
    extra={"location": "https://mirror.example/os/", "note": "héllo ✓ 'quoted'"})


def test_build_record_json_round_trip() -> None:
    text = RECORD.to_json()
    back = BuildRecord.from_json(text)
    assert back == RECORD
    assert isinstance(back.packages, tuple)
    assert all(isinstance(p, Package) for p in back.packages)
    assert back.to_json() == text


def test_a_record_from_before_package_metadata_still_reads() -> None:
    """Records in existing caches list (name, version) pairs: they read back as packages of the family's kind."""
    data = json.loads(RECORD.to_json())
    data["packages"] = [["bash", "5.2.15-2+b2"], ["openssh-server", "1:9.2p1-2+deb12u3"]]
    back = BuildRecord.from_json(json.dumps(data))
    assert [(p.kind, p.name, p.version) for p in back.packages] == [
        ("deb", "bash", "5.2.15-2+b2"), ("deb", "openssh-server", "1:9.2p1-2+deb12u3")]


def test_build_record_json_round_trip_no_packages() -> None:
    record = replace(RECORD, packages=(), extra={}, git_dirty=False)
    assert BuildRecord.from_json(record.to_json()) == record
