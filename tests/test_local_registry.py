"""LocalRegistry on real files: layout, idempotence, integrity, interruption and concurrent writers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from builder.errors import RegistryError
from builder.registry.base import Registration
from builder.registry.local import LocalRegistry, default_registry_dir

MakeReg = Callable[..., Registration]
ATTRS = (("NAME", "web"), ("TYPE", "OS"), ("PUBLIC", "NO"), ("DESCRIPTION", "Source: web, GitRev: kg@abc1234"),
         ("ZEBRA", "z"), ("ALPHA", "a"), ("SHA256", "filled-in"))


def _image(path: Path, seed: str, size: int = 4096) -> Path:
    block = hashlib.sha256(seed.encode()).digest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((block * (size // len(block) + 1))[:size])
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def make_reg(tmp_path: Path) -> MakeReg:
    def make(name: str = "web", seed: str = "one", size: int = 4096, sha256: str | None = None,
             attributes: tuple[tuple[str, str], ...] = ATTRS, fmt: str = "qcow2") -> Registration:
        img = _image(tmp_path / "src" / f"{name}-{seed}.{fmt}", seed, size)
        return Registration(name=name, image_path=img, sha256=sha256 or _sha(img), size=size, format=fmt,
                            public=False, attributes=attributes)
    return make


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


def _entries(name_dir: Path) -> list[str]:
    """Everything in a NAME dir but the lock file (which filelock may or may not remove on release)."""
    return sorted(p.name for p in name_dir.iterdir() if p.name != ".lock")


def _leftovers(name_dir: Path) -> list[str]:
    return sorted(p.name for p in name_dir.iterdir() if p.name.startswith(".tmp-"))


# -- register ---------------------------------------------------------------------------------------
def test_first_registration(root: Path, make_reg: MakeReg) -> None:
    reg = make_reg()
    out = LocalRegistry(root).register(reg)

    vdir = root / "web" / "1"
    assert (out.registry, out.name, out.version, out.reused) == ("local", "web", "1", False)
    assert out.location == str(vdir / "web.qcow2")
    assert out.sha256 == reg.sha256
    assert (vdir / "web.qcow2").read_bytes() == reg.image_path.read_bytes()
    latest = root / "web" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == "1"  # relative, survives moving the registry
    assert latest.resolve() == vdir.resolve()

    rec = json.loads((vdir / "record.json").read_text())
    assert rec["name"] == "web" and rec["version"] == 1 and rec["sha256"] == reg.sha256
    assert rec["size"] == 4096 and rec["format"] == "qcow2" and rec["public"] is False
    assert rec["image"] == "web.qcow2"
    assert rec["attributes"] == [list(p) for p in ATTRS]  # order kept, nothing added or dropped
    assert rec["registered_at"].endswith("+00:00")
    assert dict(out.attributes) == dict(ATTRS)
    assert _leftovers(root / "web") == []


def test_same_sha256_is_a_noop_that_says_so(root: Path, make_reg: MakeReg,
                                            caplog: pytest.LogCaptureFixture) -> None:
    registry = LocalRegistry(root)
    first = registry.register(make_reg())
    caplog.set_level(logging.INFO, logger="builder.registry.local")
    again = registry.register(make_reg())
    assert again.reused and again.version == "1" and again.location == first.location
    assert not (root / "web" / "2").exists()
    assert "already registered" in caplog.text and "version 1" in caplog.text


def test_new_sha256_is_version_2_and_latest_moves(root: Path, make_reg: MakeReg) -> None:
    registry = LocalRegistry(root)
    registry.register(make_reg(seed="one"))
    reg2 = make_reg(seed="two")
    out = registry.register(reg2)
    assert (out.version, out.reused) == ("2", False)
    assert os.readlink(root / "web" / "latest") == "2"
    assert (root / "web" / "1" / "web.qcow2").read_bytes() != (root / "web" / "2" / "web.qcow2").read_bytes()
    assert registry.get("web").sha256 == reg2.sha256
    # the older bytes stay registered under their version
    assert registry.register(make_reg(seed="one")).version == "1"
    assert os.readlink(root / "web" / "latest") == "2"


def test_bytes_changed_after_test(root: Path, make_reg: MakeReg) -> None:
    tested = make_reg(seed="tested")
    reg = make_reg(seed="tampered", sha256=tested.sha256)
    with pytest.raises(RegistryError, match="changed since they were tested") as exc:
        LocalRegistry(root).register(reg)
    assert str(reg.image_path) in str(exc.value)
    assert _entries(root / "web") == []


def test_keyboard_interrupt_mid_copy_leaves_nothing(root: Path, make_reg: MakeReg,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(path: Path) -> str:
        # Called on the freshly written temp copy, before it is renamed into place.
        assert Path(path).stat().st_size > 0
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("builder.fsutil.sha256_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            LocalRegistry(root).register(make_reg())
    assert _entries(root / "web") == []
    assert LocalRegistry(root).list() == []
    # the lock was released: the next run registers normally
    assert LocalRegistry(root).register(make_reg()).version == "1"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem, so a full disk is the kernel's ENOSPC, not a simulation."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_is_one_clear_error_and_leaves_the_registry_as_it_was(small_fs: Path, tmp_path: Path) -> None:
    def registration(seed: str, size: int) -> Registration:
        img = _image(tmp_path / f"{seed}.qcow2", seed, size)
        return Registration(name="web", image_path=img, sha256=_sha(img), size=size, format="qcow2",
                            public=False, attributes=ATTRS)

    registry = LocalRegistry(small_fs / "registry")
    first = registry.register(registration("small", 64 * 1024))
    before = sorted(p.relative_to(small_fs) for p in small_fs.rglob("*"))
    with pytest.raises(RegistryError, match="No space left on device") as err:
        registry.register(registration("big", 2 * 1024 * 1024))
    assert len(str(err.value).splitlines()) == 1
    assert sorted(p.relative_to(small_fs) for p in small_fs.rglob("*")) == before
    assert [(e.name, e.version) for e in registry.list()] == [("web", first.version)]


def test_leftovers_of_a_killed_run_are_removed(root: Path, make_reg: MakeReg) -> None:
    (root / "web" / ".tmp-dead").mkdir(parents=True)
    (root / "web" / ".tmp-dead" / "web.qcow2").write_bytes(b"half")
    (root / "web" / ".tmp-latest-dead").symlink_to("1")
    assert LocalRegistry(root).list() == []  # readers ignore them
    assert LocalRegistry(root).register(make_reg()).version == "1"
    assert _leftovers(root / "web") == []


def test_missing_image_and_bad_names(root: Path, make_reg: MakeReg, tmp_path: Path) -> None:
    reg = make_reg()
    gone = Registration(name="web", image_path=tmp_path / "nope.qcow2", sha256=reg.sha256, size=1,
                        format="qcow2", public=False, attributes=())
    with pytest.raises(RegistryError, match="does not exist"):
        LocalRegistry(root).register(gone)
    for bad in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(RegistryError, match="invalid image name"):
            LocalRegistry(root).register(Registration(bad, reg.image_path, reg.sha256, 1, "qcow2", False, ()))
    with pytest.raises(RegistryError, match="invalid image format"):
        LocalRegistry(root).register(Registration("web", reg.image_path, reg.sha256, 1, "../x", False, ()))
    assert not root.exists() or list(root.iterdir()) == []


# -- concurrent writers (real processes) --------------------------------------------------------------
_WORKER = """
import json, sys, time
from pathlib import Path
from builder.registry.base import Registration
from builder.registry.local import LocalRegistry
a = json.loads(sys.argv[1])
go = Path(a["go"])
deadline = time.monotonic() + 20
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.002)
reg = Registration(name=a["name"], image_path=Path(a["image"]), sha256=a["sha256"], size=a["size"],
                   format="qcow2", public=False, attributes=tuple(tuple(p) for p in a["attributes"]))
out = LocalRegistry(a["root"]).register(reg)
print(json.dumps({"name": out.name, "version": out.version, "reused": out.reused}))
"""


def _register_concurrently(root: Path, regs: list[Registration], go: Path) -> list[dict[str, object]]:
    """Start one process per registration, release them together, and watch the registry meanwhile."""
    procs = [subprocess.Popen(
        [sys.executable, "-c", _WORKER, json.dumps({
            "go": str(go), "root": str(root), "name": r.name, "image": str(r.image_path), "sha256": r.sha256,
            "size": r.size, "attributes": [list(p) for p in r.attributes]})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in regs]
    time.sleep(0.3)  # let the interpreters start so that they really race
    go.touch()
    seen: set[tuple[str, str]] = set()
    reader = LocalRegistry(root)
    while any(p.poll() is None for p in procs):
        for entry in reader.list():  # lock-free reader: never a half-written version
            assert _sha(Path(entry.location)) == entry.sha256
            seen.add((entry.name, entry.version))
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=30)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout))
    return results


def _check_all_intact(root: Path) -> None:
    registry = LocalRegistry(root)
    for entry in registry.list():
        assert _sha(Path(entry.location)) == entry.sha256
        assert registry.get(entry.name, entry.version).details["version"] == int(entry.version)
    for name_dir in root.iterdir():
        assert _leftovers(name_dir) == []


def test_two_processes_two_images(root: Path, make_reg: MakeReg, tmp_path: Path) -> None:
    regs = [make_reg(name="web", seed="w", size=512 * 1024), make_reg(name="db", seed="d", size=512 * 1024)]
    results = _register_concurrently(root, regs, tmp_path / "go")
    assert sorted((r["name"], r["version"]) for r in results) == [("db", "1"), ("web", "1")]
    listed = LocalRegistry(root).list()
    assert [(e.name, e.version) for e in listed] == [("db", "1"), ("web", "1")]
    assert {e.name: e.sha256 for e in listed} == {r.name: r.sha256 for r in regs}
    _check_all_intact(root)


def test_many_processes_same_name(root: Path, make_reg: MakeReg, tmp_path: Path) -> None:
    n = 5
    regs = [make_reg(name="web", seed=f"s{i}", size=256 * 1024) for i in range(n)]
    results = _register_concurrently(root, regs, tmp_path / "go")
    assert sorted(int(str(r["version"])) for r in results) == list(range(1, n + 1))
    assert not any(r["reused"] for r in results)
    registry = LocalRegistry(root)
    listed = registry.list()
    assert [e.version for e in listed] == [str(v) for v in range(1, n + 1)]
    assert sorted(e.sha256 for e in listed) == sorted(r.sha256 for r in regs)
    assert os.readlink(root / "web" / "latest") == str(n)
    assert registry.get("web").version == str(n)
    _check_all_intact(root)


def test_processes_racing_with_the_same_bytes_register_once(root: Path, make_reg: MakeReg, tmp_path: Path) -> None:
    reg = make_reg(seed="same", size=256 * 1024)
    results = _register_concurrently(root, [reg, reg, reg], tmp_path / "go")
    assert {r["version"] for r in results} == {"1"}
    assert sorted(bool(r["reused"]) for r in results) == [False, True, True]
    assert [e.version for e in LocalRegistry(root).list() if e.name == "web"] == ["1"]


# -- list / get / record --------------------------------------------------------------------------------
def test_list_get_record(root: Path, make_reg: MakeReg) -> None:
    registry = LocalRegistry(root)
    assert registry.list() == []  # the root does not even exist yet
    registry.register(make_reg(name="web", seed="a"))
    registry.register(make_reg(name="web", seed="b"))
    registry.register(make_reg(name="base", seed="c", attributes=(("NAME", "base"), ("X", "1"))))

    listed = registry.list()
    assert [(e.name, e.version) for e in listed] == [("base", "1"), ("web", "1"), ("web", "2")]
    assert all(e.registry == "local" and not e.reused for e in listed)
    assert dict(listed[0].attributes) == {"NAME": "base", "X": "1"}  # the record's attributes, nothing else

    assert registry.get("web") == listed[2]
    assert registry.get("web", "1") == listed[1]
    rec = registry.get("web", "1").details
    assert rec["version"] == 1 and rec["sha256"] == listed[1].sha256 and rec["image"] == "web.qcow2"
    assert registry.get("web").details["version"] == 2

    with pytest.raises(RegistryError, match=f"no image nothere in {root}"):
        registry.get("nothere")
    with pytest.raises(RegistryError, match="web has no version 7; versions: 1, 2"):
        registry.get("web", "7")
    assert registry.get("web", "v1") == listed[1]  # vN reads the same in every registry
    with pytest.raises(RegistryError, match="web@x1: VERSION must be latest, promoted, a version number"):
        registry.get("web", "x1")
    with pytest.raises(RegistryError, match="image IDs are OpenNebula's"):
        registry.get("web", "id:1")


def test_corrupt_record(root: Path, make_reg: MakeReg, caplog: pytest.LogCaptureFixture) -> None:
    registry = LocalRegistry(root)
    registry.register(make_reg(seed="a"))
    registry.register(make_reg(seed="b"))
    broken = root / "web" / "1" / "record.json"
    broken.write_text('{"name": "web", "vers')

    assert [e.version for e in registry.list()] == ["2"]
    assert str(broken) in caplog.text and "WARNING" in caplog.text
    with pytest.raises(RegistryError, match=str(broken)):
        registry.get("web", "1")
    with pytest.raises(RegistryError, match=str(broken)):
        registry.get("web", "1")
    assert registry.get("web").version == "2"

    # a well-formed record describing another version is corrupt as well
    rec = json.loads((root / "web" / "2" / "record.json").read_text())
    rec["version"] = 5
    (root / "web" / "2" / "record.json").write_text(json.dumps(rec))
    with pytest.raises(RegistryError, match="not web version 2"):
        registry.get("web")
    # a broken version still holds its number: new bytes become version 3
    assert registry.register(make_reg(seed="c")).version == "3"


def test_get_with_the_image_file_gone(root: Path, make_reg: MakeReg) -> None:
    registry = LocalRegistry(root)
    out = registry.register(make_reg())
    Path(out.location).unlink()
    with pytest.raises(RegistryError, match="missing"):
        registry.get("web")
    # re-registering the same bytes does not point at the missing file
    again = registry.register(make_reg())
    assert (again.version, again.reused) == ("2", False)


def test_latest_is_repaired_by_the_next_registration(root: Path, make_reg: MakeReg) -> None:
    registry = LocalRegistry(root)
    registry.register(make_reg(seed="a"))
    registry.register(make_reg(seed="b"))
    (root / "web" / "latest").unlink()  # as if a run died between the rename and the symlink
    assert registry.get("web").version == "2"
    assert registry.register(make_reg(seed="a")).reused
    assert os.readlink(root / "web" / "latest") == "2"


# -- default_registry_dir ---------------------------------------------------------------------------------
def test_default_registry_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = str(tmp_path / "home")
    assert default_registry_dir({"KICKGATE_REGISTRY_DIR": "/srv/reg", "XDG_DATA_HOME": "/x", "HOME": home}) \
        == Path("/srv/reg")
    assert default_registry_dir({"KICKGATE_REGISTRY_DIR": "~/reg", "HOME": home}) == Path(home) / "reg"
    assert default_registry_dir({"XDG_DATA_HOME": "/x/data", "HOME": home}) == Path("/x/data/kickgate/registry")
    assert default_registry_dir({"XDG_DATA_HOME": "rel", "HOME": home}) \
        == Path(home) / ".local/share/kickgate/registry"
    assert default_registry_dir({"KICKGATE_REGISTRY_DIR": "", "HOME": home}) \
        == Path(home) / ".local/share/kickgate/registry"

    monkeypatch.setenv("KICKGATE_REGISTRY_DIR", str(tmp_path / "env"))
    assert default_registry_dir() == tmp_path / "env"
    monkeypatch.delenv("KICKGATE_REGISTRY_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_registry_dir() == tmp_path / "xdg" / "kickgate" / "registry"
