"""Install sources for kickstart builds: find, fetch and cache the installer kernel and initrd.

A location is one of

* an ``http(s)://`` (or ``ftp://``) install tree, e.g. a Rocky 9 BaseOS ``.../x86_64/os/`` URL;
* a local install tree directory (or ``file://`` URL): a tree copied or rsynced from a mirror;
* a local ISO file (a DVD or boot ISO), read with pycdlib, never mounted.

The tree's ``.treeinfo`` (``[images-x86_64] kernel=… initrd=…``) names the kernel and initrd;
without one the conventional ``images/pxeboot/vmlinuz`` and ``images/pxeboot/initrd.img`` are used.
When ``.treeinfo`` lists ``[checksums]`` for them, the files are verified, and a file already in
the cache under that checksum is not fetched again. Files are cached by their sha256 as
``<cache_dir>/installers/<sha256>/<file name>``.

How the installer reaches the rest of the tree (``inst.repo=``):

* URL: the URL itself; the guest reaches it through user-mode networking.
* ISO: the ISO is attached to the install domain as a cdrom and ``inst.repo=cdrom`` tells
  Anaconda to use the (only) optical drive; a label is not needed and cannot go stale.
* local tree: a directory on the build host is invisible to the guest, so it must be served over
  HTTP. kickgate does that itself for the length of the install (``serve_tree``: a read-only HTTP
  server bound to 127.0.0.1 on a free port, reached by the guest as ``http://10.0.2.2:PORT/``,
  QEMU user-mode networking's address for the host's loopback). Tools that cannot do that (a
  hand-run ``virt-install``) get a RecipeError asking for an HTTP URL.
"""

from __future__ import annotations

import configparser
import contextlib
import functools
import hashlib
import http.server
import logging
import os
import re
import shutil
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from builder.errors import BuildError, RecipeError
from builder.recipe import Recipe

log = logging.getLogger(__name__)


def has_credentials(url: str) -> bool:
    return urlsplit(url).password is not None or "@" in urlsplit(url).netloc


def mask_url(url: str) -> str:
    """url with any user:password replaced by ***, for logs, errors and records."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit((parts.scheme, "***@" + parts.netloc.rsplit("@", 1)[1], parts.path, parts.query,
                       parts.fragment))

STAGE = "fetch-installer"
DEFAULT_KERNEL = "images/pxeboot/vmlinuz"
DEFAULT_INITRD = "images/pxeboot/initrd.img"
# QEMU user-mode networking: the guest reaches the host's 127.0.0.1 at this address.
SLIRP_HOST_ADDR = "10.0.2.2"
_URL_SCHEMES = ("http", "https", "ftp")
_CHUNK = 1 << 20

SourceKind = Literal["url", "tree", "iso"]


@dataclass(frozen=True)
class Origin:
    """Where a location came from, for error messages: the recipe's image.toml or an override."""

    path: str
    where: str

    @classmethod
    def recipe(cls, recipe: Recipe) -> Origin:
        return cls(str(recipe.path), "kickstart.location")

    @classmethod
    def override(cls) -> Origin:
        return cls("--location", "")

    def error(self, problem: str, hint: str = "") -> RecipeError:
        return RecipeError(self.path, self.where, problem, hint)


@dataclass(frozen=True)
class InstallSource:
    location: str  # as given (URL, or the resolved local path)
    kind: SourceKind
    kernel: Path  # cached copy
    initrd: Path  # cached copy (the original; injection writes a new file)
    kernel_sha256: str
    initrd_sha256: str
    product: str  # e.g. "Rocky Linux 9.5", from .treeinfo; "" when unknown
    treeinfo: bool  # whether .treeinfo was found
    iso: Path | None = None  # attach as a cdrom
    tree: Path | None = None  # serve over HTTP for the install
    volume_id: str | None = None

    @property
    def repo_arg(self) -> str | None:
        """The inst.repo value; None for a local tree (served at install time, see serve_tree)."""
        if self.kind == "url":
            return self.location
        if self.kind == "iso":
            return "cdrom"
        return None


# --------------------------------------------------------------------------- .treeinfo


@dataclass(frozen=True)
class TreeInfo:
    kernel: str
    initrd: str
    checksums: dict[str, tuple[str, str]]  # relative path -> (algorithm, hex digest)
    product: str


def parse_treeinfo(text: str, arch: str = "x86_64", name: str = ".treeinfo") -> TreeInfo:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        cp.read_string(text, source=name)
    except configparser.Error as exc:
        raise ValueError(f"{name} is not an INI file: {exc}") from None
    section = f"images-{arch}"
    kernel = cp.get(section, "kernel", fallback=DEFAULT_KERNEL).strip()
    initrd = cp.get(section, "initrd", fallback=DEFAULT_INITRD).strip()
    checksums: dict[str, tuple[str, str]] = {}
    if cp.has_section("checksums"):
        for key, value in cp.items("checksums"):
            algo, _, digest = value.strip().partition(":")
            if digest:
                checksums[_norm(key)] = (algo.strip().lower(), digest.strip().lower())
    family = cp.get("general", "family", fallback="")
    version = cp.get("general", "version", fallback="")
    product = " ".join(p for p in (cp.get("release", "name", fallback=family).strip(),
                                   cp.get("release", "version", fallback=version).strip()) if p)
    return TreeInfo(kernel=_norm(kernel), initrd=_norm(initrd), checksums=checksums,
                    product=product)


def _norm(rel: str) -> str:
    parts = [p for p in PurePosixPath(rel.strip()).parts if p not in ("/", ".")]
    if any(p == ".." for p in parts) or not parts:
        raise ValueError(f"bad path in .treeinfo: {rel!r}")
    return "/".join(parts)


# --------------------------------------------------------------------------- readers


class _Missing(Exception):
    pass


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class _Reader:
    """Reads files of an install tree by path relative to its root."""

    kind: SourceKind
    describe: str

    def copy(self, rel: str, out: _Writable) -> None:  # raises _Missing
        raise NotImplementedError

    def read_text(self, rel: str) -> str | None:
        buf = _Collect()
        try:
            self.copy(rel, buf)
        except _Missing:
            return None
        return buf.getvalue().decode("utf-8", errors="replace")

    def close(self) -> None:
        return None


class _Collect:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class _UrlReader(_Reader):
    kind: SourceKind = "url"

    def __init__(self, base: str, timeout: float) -> None:
        self.base = base if base.endswith("/") else base + "/"
        self.describe = mask_url(self.base)
        self.timeout = timeout

    def copy(self, rel: str, out: _Writable) -> None:
        url = urllib.parse.urljoin(self.base, rel)
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                shutil.copyfileobj(resp, out, _CHUNK)
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404, 410):
                raise _Missing(url) from None
            raise BuildError(STAGE, f"cannot download {url}: HTTP {exc.code} {exc.reason}"
                             ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BuildError(STAGE, f"cannot download {url}: {reason}") from None


class _TreeReader(_Reader):
    kind: SourceKind = "tree"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.describe = str(root)

    def copy(self, rel: str, out: _Writable) -> None:
        path = self.root / rel
        if not path.is_file():
            raise _Missing(str(path))
        with open(path, "rb") as f:
            shutil.copyfileobj(f, out, _CHUNK)


class _IsoReader(_Reader):
    """Files of an ISO image through pycdlib: Rock Ridge, then Joliet, UDF, plain ISO9660 names."""

    kind: SourceKind = "iso"

    def __init__(self, path: Path) -> None:
        import pycdlib
        from pycdlib.pycdlibexception import PyCdlibException

        self._exc: type[Exception] = PyCdlibException
        self.path = path
        self.describe = str(path)
        self.iso: Any = pycdlib.PyCdlib()
        try:
            self.iso.open(str(path))
        except PyCdlibException as exc:
            raise ValueError(f"not a readable ISO image: {exc}") from None
        vol = getattr(self.iso.pvd, "volume_identifier", b"")
        if isinstance(vol, bytes):
            vol = vol.decode("ascii", errors="replace")
        self.volume_id = str(vol).strip()

    def _iso9660_path(self, rel: str) -> str | None:
        """Match each component against ISO9660 identifiers (upper case, ';1' and '.' stripped)."""
        current = "/"
        for part in rel.split("/"):
            want = part.upper().rstrip(".")
            found = None
            try:
                children = list(self.iso.list_children(iso_path=current))
            except self._exc:
                return None
            for child in children:
                ident = child.file_identifier().decode("ascii", errors="replace")
                if ident in (".", "..", "\x00", "\x01"):
                    continue
                if ident.split(";")[0].rstrip(".").upper() == want:
                    found = ident
                    break
            if found is None:
                return None
            current = current.rstrip("/") + "/" + found
        return current

    def copy(self, rel: str, out: _Writable) -> None:
        attempts: list[dict[str, str]] = []
        if self.iso.has_rock_ridge():
            attempts.append({"rr_path": "/" + rel})
        if self.iso.has_joliet():
            attempts.append({"joliet_path": "/" + rel})
        if self.iso.has_udf():
            attempts.append({"udf_path": "/" + rel})
        plain = self._iso9660_path(rel)
        if plain is not None:
            attempts.append({"iso_path": plain})
        for kwargs in attempts:
            try:
                self.iso.get_record(**kwargs)
            except self._exc:
                continue
            self.iso.get_file_from_iso_fp(out, **kwargs)
            return
        raise _Missing(f"{self.path}:/{rel}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.iso.close()


class _HashingWriter:
    def __init__(self, out: _Writable, algos: set[str]) -> None:
        self.out = out
        self.hashes = {a: hashlib.new(a) for a in algos | {"sha256"}}
        self.size = 0

    def write(self, data: bytes) -> int:
        for h in self.hashes.values():
            h.update(data)
        self.size += len(data)
        return self.out.write(data)


# --------------------------------------------------------------------------- fetching


def classify(location: str, base_dir: Path | None,
             origin: Origin) -> tuple[SourceKind, str, Path | None]:
    """(kind, normalized location, local path) for a location string."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme in _URL_SCHEMES:
        if not parsed.netloc:
            raise origin.error(f"{location!r} has no host", "write e.g. https://mirror/…/BaseOS/x86_64/os/")
        return "url", location, None
    if parsed.scheme == "file":
        path = Path(urllib.parse.unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise origin.error(f"unsupported install source scheme {parsed.scheme!r} in {location!r}",
                           "use an http(s) URL, a local tree directory or an ISO file")
    else:
        path = Path(location).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
    path = path.resolve()
    if path.is_dir():
        return "tree", str(path), path
    if path.is_file():
        return "iso", str(path), path
    raise origin.error(f"install source {str(path)!r} does not exist",
                       "give an http(s) install tree URL, a local tree directory or an ISO file")


def fetch(location: str, cache_dir: Path, *, arch: str = "x86_64", timeout: float = 60.0,
          base_dir: Path | None = None, origin: Origin | None = None) -> InstallSource:
    """Find the installer kernel and initrd of location, verify and cache them."""
    origin = origin or Origin.override()
    kind, normalized, local = classify(location, base_dir, origin)
    reader: _Reader
    if kind == "url":
        reader = _UrlReader(normalized, timeout)
    elif kind == "tree":
        assert local is not None
        reader = _TreeReader(local)
    else:
        assert local is not None
        try:
            reader = _IsoReader(local)
        except ValueError as exc:
            raise origin.error(f"{local}: {exc}",
                               "a location that is a file must be an ISO image") from None
    try:
        text = reader.read_text(".treeinfo")
        if text is None:
            log.info("%s has no .treeinfo; using %s and %s", reader.describe, DEFAULT_KERNEL,
                     DEFAULT_INITRD)
            info = TreeInfo(DEFAULT_KERNEL, DEFAULT_INITRD, {}, "")
        else:
            try:
                info = parse_treeinfo(text, arch)
            except ValueError as exc:
                raise origin.error(f"{reader.describe}: {exc}") from None
        store = cache_dir / "installers"
        kernel, kernel_sha = _fetch_file(reader, info.kernel, info, store, origin)
        initrd, initrd_sha = _fetch_file(reader, info.initrd, info, store, origin)
    finally:
        reader.close()
    return InstallSource(
        location=normalized, kind=kind, kernel=kernel, initrd=initrd, kernel_sha256=kernel_sha,
        initrd_sha256=initrd_sha, product=info.product, treeinfo=text is not None,
        iso=local if kind == "iso" else None, tree=local if kind == "tree" else None,
        volume_id=reader.volume_id if isinstance(reader, _IsoReader) else None)


def fetch_for_recipe(recipe: Recipe, cache_dir: Path, override: str | None = None,
                     timeout: float = 60.0) -> InstallSource:
    if recipe.kickstart is None:
        raise RecipeError(recipe.path, "method", "not a kickstart recipe")
    if override:
        return fetch(override, cache_dir, timeout=timeout, base_dir=Path.cwd(),
                     origin=Origin.override())
    return fetch(recipe.kickstart.location, cache_dir, timeout=timeout, base_dir=recipe.dir,
                 origin=Origin.recipe(recipe))


def _fetch_file(reader: _Reader, rel: str, info: TreeInfo, store: Path,
                origin: Origin) -> tuple[Path, str]:
    expected = info.checksums.get(rel)
    name = PurePosixPath(rel).name
    if expected is not None and expected[0] == "sha256":
        cached = store / expected[1] / name
        if cached.is_file() and cached.stat().st_size > 0:
            log.info("installer %s: cached (sha256 %s)", rel, expected[1][:12])
            return cached, expected[1]
    store.mkdir(parents=True, exist_ok=True)
    if expected is not None and expected[0] not in hashlib.algorithms_available:
        raise origin.error(f"{reader.describe}: .treeinfo checksum of {rel} uses unknown algorithm "
                           f"{expected[0]!r}")
    fd, tmp_name = tempfile.mkstemp(dir=store, prefix=f".{name}.")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f, {expected[0]} if expected else set())
            try:
                reader.copy(rel, writer)
            except _Missing:
                raise origin.error(f"{reader.describe} has no {rel}",
                                   "is this the root of an install tree (…/BaseOS/x86_64/os/) "
                                   "or an installer ISO?") from None
        if writer.size == 0:
            raise BuildError(STAGE, f"{reader.describe}: {rel} is empty")
        if expected is not None:
            got = writer.hashes[expected[0]].hexdigest()
            if got != expected[1]:
                raise BuildError(STAGE, f"checksum mismatch for {rel} from {reader.describe}: "
                                        f".treeinfo says {expected[0]}:{expected[1]}, got "
                                        f"{expected[0]}:{got} (a corrupt download or a tree in the "
                                        "middle of a sync; try again or use another mirror)")
        sha = writer.hashes["sha256"].hexdigest()
        final_dir = store / sha
        final_dir.mkdir(exist_ok=True)
        final = final_dir / name
        os.replace(tmp, final)
        log.info("installer %s: %s bytes from %s (sha256 %s%s)", rel, writer.size, reader.describe,
                 sha[:12], ", verified" if expected else ", no checksum in .treeinfo")
        return final, sha
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- serving a local tree


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("install tree http: " + format, *args)


@contextlib.contextmanager
def serve_tree(root: Path, bind: str = "127.0.0.1") -> Iterator[int]:
    """Serve root read-only over HTTP on a free port of bind; yields the port."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer((bind, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="kickgate-tree-http", daemon=True)
    thread.start()
    port = int(server.server_address[1])
    log.info("serving install tree %s on http://%s:%d/ (guest: http://%s:%d/)", root, bind, port,
             SLIRP_HOST_ADDR, port)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def guest_url(port: int) -> str:
    return f"http://{SLIRP_HOST_ADDR}:{port}/"


_REPO_ARG_RE = re.compile(r"^(inst\.)?repo=")


def repo_in_args(args: tuple[str, ...] | list[str]) -> str | None:
    """An inst.repo=… the recipe already gives in extra_args, if any."""
    for arg in args:
        if _REPO_ARG_RE.match(arg):
            return arg.split("=", 1)[1]
    return None
