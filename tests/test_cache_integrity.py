"""The build cache hands out only bytes this machine built, and never removes bytes a run still uses.

A stand-in build method (no guest) makes a small raw disk, so these run in seconds.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder import build
from builder.build import RECORD_NAME, build_image, in_use
from builder.errors import KickgateError
from builder.method import BuildContext, BuildOptions, Method, MethodResult
from builder.recipe import Recipe, RecipeBook

REPO = Path(__file__).resolve().parent.parent
BUILDS: list[str] = []


def _fake_build(ctx: BuildContext) -> MethodResult:
    disk = ctx.workdir / "disk.raw"
    disk.write_bytes(os.urandom(64 * 1024))  # every build makes other bytes
    BUILDS.append(ctx.recipe.name)
    return MethodResult(disk=disk, disk_format="raw", build_mac="52:54:00:00:00:01", domain_type="qemu")


class NoHypervisor:
    def open(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fake_method(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    method = Method(name="bootstrap", build=_fake_build, code=(), tools=())
    monkeypatch.setattr(build, "get_method", lambda name: method)
    BUILDS.clear()
    yield


@pytest.fixture
def recipe(tmp_path: Path) -> Recipe:
    root = tmp_path / "recipes"
    shutil.copytree(REPO / "images" / "generic-dev", root / "images" / "generic-dev")
    shutil.copytree(REPO / "scripts" / "common", root / "scripts" / "common")
    return RecipeBook(root).load("generic-dev")


def make(recipe: Recipe, cache: Path, **opts: Any) -> build.Artifact:
    return build_image(recipe, NoHypervisor(), BuildOptions(cache_dir=cache, **opts))  # type: ignore[arg-type]


def test_a_cache_hit_rehashes_the_image(recipe: Recipe, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = make(recipe, cache)
    assert make(recipe, cache).cached and BUILDS == ["generic-dev"]
    with open(first.image, "r+b") as f:  # same size, other bytes
        f.write(b"tampered")
    again = make(recipe, cache)
    assert not again.cached and BUILDS == ["generic-dev", "generic-dev"], "changed bytes were served from the cache"


def test_a_record_edited_to_match_other_bytes_is_not_trusted(recipe: Recipe, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = make(recipe, cache)
    first.image.write_bytes(b"other bytes")
    record = first.dir / RECORD_NAME
    record.write_text(record.read_text().replace(first.record.image_sha256,
                                                 build.sha256_file(first.image)))
    assert not make(recipe, cache).cached


def test_a_cache_others_can_write_is_refused(recipe: Recipe, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    with pytest.raises(KickgateError, match=r"writable by group or others.*chmod go-w"):
        make(recipe, cache)
    assert BUILDS == []


def test_a_rebuild_never_removes_bytes_a_run_still_uses(recipe: Recipe, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old = make(recipe, cache)
    with in_use(old):
        new = make(recipe, cache, no_cache=True)
        assert new.dir != old.dir
        assert old.image.is_file(), "the image another run is backed by was removed"
        assert make(recipe, cache).dir == new.dir  # the name points to the new build
    make(recipe, cache)  # the next run tidies what nobody holds any more
    assert not old.dir.exists()
    assert new.image.is_file()
