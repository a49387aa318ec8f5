"""Install sources: local trees, ISOs, HTTP trees; .treeinfo, checksums, the cache."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pycdlib
import pytest
from standin import make_iso, make_tree, recipe_copy, treeinfo

from builder.errors import BuildError, RecipeError
from builder.installsource import fetch, fetch_for_recipe, guest_url, parse_treeinfo, serve_tree

KERNEL = b"\x7fKERNEL" + os.urandom(70_000)
INITRD = b"\xfd7zXZ" + os.urandom(130_001)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "src").mkdir()
    kernel = tmp_path / "src" / "vmlinuz"
    initrd = tmp_path / "src" / "initrd.img"
    kernel.write_bytes(KERNEL)
    initrd.write_bytes(INITRD)
    return kernel, initrd


@pytest.fixture
def tree(tmp_path: Path, files: tuple[Path, Path]) -> Path:
    return make_tree(tmp_path / "tree", *files)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def http_tree(tree: Path) -> Iterator[str]:
    """The tree on a plain http.server (not kickgate's), like a mirror."""
    handler = functools.partial(_Quiet, directory=str(tree))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_parse_treeinfo() -> None:
    info = parse_treeinfo(treeinfo("images/pxeboot/vmlinuz", "images/pxeboot/initrd.img",
                                   {"images/pxeboot/vmlinuz": "ab" * 32}))
    assert info.kernel == "images/pxeboot/vmlinuz" and info.initrd == "images/pxeboot/initrd.img"
    assert info.checksums == {"images/pxeboot/vmlinuz": ("sha256", "ab" * 32)}
    assert info.product == "Stand-in Linux 9.9"
    # An old-style .treeinfo without [images-x86_64]: the conventional paths.
    old = parse_treeinfo("[general]\nfamily = CentOS\nversion = 6.10\n")
    assert (old.kernel, old.initrd, old.product) == ("images/pxeboot/vmlinuz",
                                                     "images/pxeboot/initrd.img", "CentOS 6.10")


def test_local_tree(tree: Path, cache: Path) -> None:
    src = fetch(str(tree), cache)
    assert src.kind == "tree" and src.tree == tree and src.iso is None
    assert src.repo_arg is None  # served over HTTP by the build (see serve_tree)
    assert src.kernel.read_bytes() == KERNEL and src.initrd.read_bytes() == INITRD
    assert src.kernel == cache / "installers" / sha(KERNEL) / "vmlinuz"
    assert src.initrd == cache / "installers" / sha(INITRD) / "initrd.img"
    assert (src.kernel_sha256, src.initrd_sha256) == (sha(KERNEL), sha(INITRD))
    assert src.treeinfo and src.product == "Stand-in Linux 9.9"
    # No temp files left behind.
    assert not [p for p in (cache / "installers").iterdir() if p.name.startswith(".")]


def test_cached_files_are_not_fetched_again(tree: Path, cache: Path) -> None:
    first = fetch(str(tree), cache)
    (tree / "images" / "pxeboot" / "vmlinuz").unlink()  # the checksum in .treeinfo is enough
    (tree / "images" / "pxeboot" / "initrd.img").unlink()
    second = fetch(str(tree), cache)
    assert (second.kernel, second.initrd) == (first.kernel, first.initrd)


def test_treeinfo_paths_are_followed(tmp_path: Path, files: tuple[Path, Path], cache: Path) -> None:
    tree = make_tree(tmp_path / "t", *files, kernel_rel="boot/x86_64/linux",
                     initrd_rel="boot/x86_64/initrd")
    src = fetch(f"file://{tree}", cache)
    assert src.kernel.read_bytes() == KERNEL and src.kernel.name == "linux"


def test_tree_without_treeinfo_uses_pxeboot(tmp_path: Path, files: tuple[Path, Path],
                                             cache: Path) -> None:
    tree = make_tree(tmp_path / "t", *files, with_treeinfo=False)
    src = fetch(str(tree), cache)
    assert not src.treeinfo and src.initrd.read_bytes() == INITRD


def test_checksum_mismatch_is_a_clear_error(tree: Path, cache: Path) -> None:
    (tree / "images" / "pxeboot" / "initrd.img").write_bytes(INITRD[:-1] + b"!")
    with pytest.raises(BuildError) as exc:
        fetch(str(tree), cache)
    err = exc.value
    assert err.stage == "fetch-installer"
    assert "checksum mismatch for images/pxeboot/initrd.img" in err.reason
    assert sha(INITRD) in err.reason
    # Nothing unverified entered the cache.
    cached = [p.name for p in (cache / "installers").rglob("*") if p.is_file()]
    assert cached == ["vmlinuz"]


def test_not_a_tree(tmp_path: Path, cache: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RecipeError, match="has no images/pxeboot/vmlinuz"):
        fetch(str(empty), cache)


def test_missing_location_names_the_recipe(tmp_path: Path, cache: Path) -> None:
    recipe = recipe_copy(tmp_path / "root", str(tmp_path / "nowhere"))
    with pytest.raises(RecipeError) as exc:
        fetch_for_recipe(recipe, cache)
    assert exc.value.path == str(recipe.path) and exc.value.where == "kickstart.location"
    with pytest.raises(RecipeError) as exc:
        fetch_for_recipe(recipe, cache, override=str(tmp_path / "elsewhere"))
    assert exc.value.path == "--location"


def test_unsupported_scheme(cache: Path) -> None:
    with pytest.raises(RecipeError, match="unsupported install source scheme 'nfs'"):
        fetch("nfs://server/export/tree", cache)


def test_iso(tmp_path: Path, tree: Path, cache: Path) -> None:
    iso = make_iso(tmp_path / "dvd.iso", tree, volume_id="STANDIN-9")
    src = fetch(str(iso), cache)
    assert src.kind == "iso" and src.iso == iso and src.repo_arg == "cdrom"
    assert src.volume_id == "STANDIN-9" and src.treeinfo
    assert src.kernel.read_bytes() == KERNEL and src.initrd.read_bytes() == INITRD


def test_plain_iso9660_without_rock_ridge_or_joliet(tmp_path: Path, cache: Path) -> None:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident="PLAIN")
    iso.add_directory("/IMAGES")
    iso.add_directory("/IMAGES/PXEBOOT")
    iso.add_fp(io.BytesIO(KERNEL), len(KERNEL), "/IMAGES/PXEBOOT/VMLINUZ.;1")
    iso.add_fp(io.BytesIO(INITRD), len(INITRD), "/IMAGES/PXEBOOT/INITRD.IMG;1")
    path = tmp_path / "plain.iso"
    iso.write(str(path))
    iso.close()
    src = fetch(str(path), cache)
    assert not src.treeinfo
    assert src.kernel.read_bytes() == KERNEL and src.initrd.read_bytes() == INITRD


def test_a_file_that_is_not_an_iso(tmp_path: Path, cache: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello\n")
    with pytest.raises(RecipeError, match="not a readable ISO image"):
        fetch(str(bogus), cache)


def test_http_tree(http_tree: str, cache: Path) -> None:
    src = fetch(http_tree.rstrip("/"), cache)  # a missing trailing slash is fine
    assert src.kind == "url" and src.repo_arg == http_tree.rstrip("/")
    assert src.kernel.read_bytes() == KERNEL and src.initrd.read_bytes() == INITRD
    assert src.product == "Stand-in Linux 9.9"


def test_http_checksum_mismatch(http_tree: str, tree: Path, cache: Path) -> None:
    (tree / "images" / "pxeboot" / "vmlinuz").write_bytes(b"truncated")
    with pytest.raises(BuildError, match="checksum mismatch for images/pxeboot/vmlinuz"):
        fetch(http_tree, cache)


def test_http_unreachable(cache: Path) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Quiet)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    with pytest.raises(BuildError, match=f"cannot download http://127.0.0.1:{port}/"):
        fetch(f"http://127.0.0.1:{port}/os/", cache, timeout=5)


def test_serve_tree(tree: Path) -> None:
    with serve_tree(tree) as port:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/.treeinfo", timeout=5) as resp:
            assert b"[images-x86_64]" in resp.read()
        assert guest_url(port) == f"http://10.0.2.2:{port}/"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/.treeinfo", timeout=2)
