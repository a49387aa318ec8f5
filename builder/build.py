"""Build one recipe into a cached artifact: cache lookup, method, convert, checksum, record.

A build method (builder/methods/*.py, contract in builder/method.py) only turns a recipe into a raw
or qcow2 disk inside a private work directory; everything common to all methods lives here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from builder import __version__, runstamp
from builder.errors import BuildError, KickgateError
from builder.fsutil import atomic_write_text, check_private_dir, fsync_dir, private_key_file, sha256_file
from builder.hypervisor import Hypervisor
from builder.method import PACKAGE_DIR, BuildContext, BuildOptions, Method, code_files, get_method
from builder.packages import Package, packages_from_json, packages_from_pairs
from builder.provenance import git_state
from builder.recipe import Recipe
from builder.run import run
from builder.stages import Stages

log = logging.getLogger(__name__)

RECORD_NAME = "record.json"


@dataclass(frozen=True)
class BuildRecord:
    recipe: str
    method: str
    family: str
    recipe_hash: str
    cache_key: str
    build_id: str
    built_at: str
    kickgate_version: str
    git_repo: str
    git_revision: str
    git_dirty: bool
    tools: Mapping[str, str]
    timings: Mapping[str, float]
    total_seconds: float
    image_file: str  # name inside the artifact directory
    image_format: str
    image_sha256: str
    image_size: int
    virtual_size_mib: int
    serial_log: str  # name inside the artifact directory
    build_mac: str
    domain_type: str
    packages: tuple[Package, ...]
    extra: Mapping[str, str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BuildRecord:
        data = json.loads(text)
        listed = data.get("packages", ())
        if listed and not isinstance(listed[0], dict):  # records before package metadata: (name, version)
            data["packages"] = packages_from_pairs(listed, "rpm" if data.get("family") == "rhel" else "deb")
        else:
            data["packages"] = packages_from_json(listed)
        return cls(**data)


@dataclass(frozen=True)
class Artifact:
    """A built image in the cache: image file, its record, its serial log."""

    dir: Path
    record: BuildRecord
    cached: bool
    seconds: float  # wall time of this request (build, or cache lookup)

    @property
    def image(self) -> Path:
        return self.dir / self.record.image_file

    @property
    def record_path(self) -> Path:
        return self.dir / RECORD_NAME

    @property
    def serial_log(self) -> Path:
        return self.dir / self.record.serial_log


# --------------------------------------------------------------------------- cache keys


def _file_facts(path: Path, root: Path) -> dict[str, Any]:
    try:
        rel = str(path.relative_to(root))
    except ValueError:
        rel = path.name
    return {"path": rel, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "exec": os.access(path, os.X_OK)}


def recipe_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """The parsed recipe, defaults included, with every file it names replaced by its content facts.

    Only what shapes the image is in it: a comment in image.toml, a file's mtime or where the
    repository is checked out change nothing; a default in recipe.py, a script's content or exec
    bit do.
    """
    root = recipe.dir.parent.parent

    def norm(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: norm(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return _file_facts(value, root) if value.is_file() else "<dir>"
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [norm(v) for v in value]
        return value

    # image.toml's path is where the checkout is; [verify] says how instances run, not what is built.
    data = {f.name: norm(getattr(recipe, f.name)) for f in dataclasses.fields(recipe)
            if f.name not in ("path", "verify")}
    # Files a kickstart template may include, beside the template itself.
    data["includes"] = [_file_facts(p, root) for p in recipe.input_files() if p != recipe.path]
    return data


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe_fingerprint(recipe), sort_keys=True).encode()).hexdigest()


_VERSION_ARGV = {"mke2fs": ["mke2fs", "-V"]}


def tool_versions(method: Method) -> dict[str, str]:
    out = {}
    for name in ("qemu-img", "qemu-system-x86_64", *method.tools):
        res = run(_VERSION_ARGV.get(name, [name, "--version"]), timeout=20, check=False)
        # Some tools (mke2fs -V) print their version on stderr.
        text = res.stdout if res.stdout.strip() else res.stderr
        out[name] = next((ln.strip() for ln in text.splitlines() if ln.strip()), "missing")
    return out


def method_code_hash(method: Method, package: Path = PACKAGE_DIR) -> str:
    """The method's code and data: a change to how images are made invalidates the cache."""
    h = hashlib.sha256()
    for path in code_files(method, package):
        h.update(str(path.relative_to(package)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


SECRET_ENV_PREFIX = "KICKGATE_SECRET_"
SECRET_ENV = ("KICKGATE_ROOTPW_HASH",)
BUILD_KEY_NAME = "build-secret.key"


def _secret_inputs(method: Method, cache_dir: Path, location: str | None) -> bytes:
    """Secrets shape the image but must not be recoverable from the record: an HMAC under a key
    that never leaves the build machine (0600 in the cache), not a bare hash open to a dictionary."""
    items = sorted((k, v) for k, v in os.environ.items()
                   if method.uses_secrets and (k in SECRET_ENV or k.startswith(SECRET_ENV_PREFIX)))
    key = private_key_file(cache_dir / BUILD_KEY_NAME)
    # The install source override can carry credentials in its URL: keyed the same way.
    return hmac.new(key, json.dumps([items, location or ""]).encode(), hashlib.sha256).digest()


def cache_key(recipe: Recipe, method: Method, tools: Mapping[str, str], cache_dir: Path,
              location: str | None = None) -> str:
    h = hashlib.sha256()
    h.update(recipe_hash(recipe).encode())
    h.update(_secret_inputs(method, cache_dir, location))
    h.update(method_code_hash(method).encode())
    h.update(json.dumps(dict(tools), sort_keys=True).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- building


def convert(src: Path, src_format: str, dst: Path, recipe: Recipe) -> None:
    argv: list[str] = ["qemu-img", "convert", "-f", src_format, "-O", recipe.disk.format]
    if recipe.disk.format == "qcow2" and recipe.disk.compression != "none":
        # -W: clusters are compressed on every core and written as they finish (4.8 s -> 3.0 s on
        # 2 cores for generic-dev); only their order in the file differs, never the disk's content.
        argv += ["-c", "-W", "-o", f"compression_type={recipe.disk.compression}"]
    run([*argv, str(src), str(dst)], timeout=900)


def load_artifact(directory: Path) -> Artifact:
    record = BuildRecord.from_json((directory / RECORD_NAME).read_text())
    return Artifact(dir=directory, record=record, cached=True, seconds=0.0)


RECORD_MAC_NAME = "record.hmac"
IN_USE_NAME = ".in-use"


def _record_mac(cache_dir: Path, record_text: str) -> str:
    """A record's own integrity: an HMAC under the machine's build key, so a record edited to match
    swapped image bytes is not taken for the build's."""
    key = private_key_file(cache_dir / BUILD_KEY_NAME)
    return hmac.new(key, record_text.encode(), hashlib.sha256).hexdigest()


def check_cache_dir(cache_dir: Path) -> None:
    """The cache decides which bytes get verified and registered: only its owner may write to it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    check_private_dir(cache_dir, "the build cache", "--cache-dir or KICKGATE_CACHE_DIR")


def _verified(entry: Path, cache_dir: Path) -> Artifact | None:
    """The artifact in entry if its record is the one this machine wrote and the image has its bytes."""
    try:
        text = (entry / RECORD_NAME).read_text()
        mac = (entry / RECORD_MAC_NAME).read_text().strip()
    except OSError:
        return None
    if not hmac.compare_digest(mac, _record_mac(cache_dir, text)):
        log.warning("%s: its record does not carry this machine's signature; rebuilding", entry)
        return None
    art = Artifact(dir=entry, record=BuildRecord.from_json(text), cached=True, seconds=0.0)
    if not art.image.is_file() or sha256_file(art.image) != art.record.image_sha256:
        log.warning("%s: the image's bytes differ from its build record; rebuilding", entry)
        return None
    return art


@contextlib.contextmanager
def in_use(artifact: Artifact) -> Iterator[None]:
    """Hold artifact for the lifetime of the block: a concurrent rebuild then leaves its files alone."""
    fd = os.open(artifact.dir / IN_USE_NAME, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _remove_unused(images_dir: Path) -> None:
    """Remove entries no name points to and no run holds (a replaced build, once its last user ended)."""
    entries = list(images_dir.iterdir())
    keep = {e.resolve() for e in entries if e.is_symlink()}
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir() or entry.resolve() in keep or entry.name.startswith("."):
            continue
        marker = entry / IN_USE_NAME
        try:
            fd = os.open(marker, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a run still uses it
        else:
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed the replaced build %s", entry)
        finally:
            os.close(fd)


def build_image(recipe: Recipe, hypervisor: Hypervisor, options: BuildOptions,
                on_console_line: Callable[[str], None] | None = None) -> Artifact:
    """Return the cached artifact for recipe, building it first if needed. xdist- and process-safe.

    images/<recipe>/<key> is a symlink to the entry holding the build; a rebuild makes a new entry and
    switches the link atomically, so a file an instance of another run is backed by is never removed
    under it (the old entry goes once no run holds it: see in_use).
    """
    started = time.monotonic()
    check_cache_dir(options.cache_dir)
    method = get_method(recipe.method)
    tools = tool_versions(method)
    key = cache_key(recipe, method, tools, options.cache_dir, options.location)
    images_dir = options.cache_dir / "images" / recipe.name
    link = images_dir / key[:16]
    images_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(images_dir / f".{key[:16]}.lock")):
        current = link.resolve() if link.exists() else None
        if current is not None and not options.no_cache:
            art = _verified(current, options.cache_dir)
            if art is not None:
                _remove_unused(images_dir)
                elapsed = time.monotonic() - started
                log.info("%s: cached %s (%.2fs)", recipe.name, art.image, elapsed)
                return replace(art, seconds=elapsed)
        art = _build_uncached(recipe, method, hypervisor, options, tools, key, images_dir, started, on_console_line)
        if link.is_dir() and not link.is_symlink():  # an entry of the older layout (a plain directory)
            link.rename(images_dir / f"{key[:16]}.old-{uuid.uuid4().hex[:6]}")
        tmp_link = images_dir / f".{key[:16]}.{uuid.uuid4().hex}"
        os.symlink(art.dir.name, tmp_link)
        os.replace(tmp_link, link)
        fsync_dir(images_dir)
        _remove_unused(images_dir)
        return art


def _build_uncached(recipe: Recipe, method: Method, hypervisor: Hypervisor, options: BuildOptions,
                    tools: Mapping[str, str],
                    key: str, images_dir: Path, started: float,
                    on_console_line: Callable[[str], None] | None) -> Artifact:
    tmp_root = options.cache_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{recipe.name}-", dir=tmp_root))
    runstamp.stamp(staging)
    workdir = staging / "work"
    workdir.mkdir()
    out = staging / "out"
    out.mkdir()
    stages = Stages(recipe.name)
    serial = out / "serial.log"
    git = git_state(recipe.dir)
    try:
        hypervisor.open()
        ctx = BuildContext(recipe=recipe, workdir=workdir, hypervisor=hypervisor, serial_log=serial,
                           stages=stages, options=options, on_console_line=on_console_line)
        result = method.build(ctx)
        image_name = f"{recipe.name}.{recipe.disk.format}"
        with stages("convert"):
            convert(result.disk, result.disk_format, out / image_name, recipe)
        shutil.rmtree(workdir)
        with stages("checksum"):
            digest = sha256_file(out / image_name)
        total = round(time.monotonic() - started, 3)
        record = BuildRecord(
            recipe=recipe.name, method=recipe.method, family=recipe.family, recipe_hash=recipe_hash(recipe),
            cache_key=key, build_id=f"{recipe.name}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}",
            built_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), kickgate_version=__version__,
            git_repo=git.repo, git_revision=git.revision, git_dirty=git.dirty, tools=dict(tools),
            timings=dict(stages.timings), total_seconds=total, image_file=image_name,
            image_format=recipe.disk.format, image_sha256=digest, image_size=(out / image_name).stat().st_size,
            virtual_size_mib=recipe.disk.size_mib, serial_log=serial.name, build_mac=result.build_mac,
            domain_type=result.domain_type, packages=result.packages, extra=dict(result.extra))
        text = record.to_json()
        atomic_write_text(out / RECORD_NAME, text)
        atomic_write_text(out / RECORD_MAC_NAME, _record_mac(options.cache_dir, text) + "\n")
        final = images_dir / f"{key[:16]}.{record.build_id.rsplit('-', 1)[-1]}"
        os.replace(out, final)
        log.info("%s: built %s in %.1fs (sha256 %s)", recipe.name, final / image_name, total, digest[:12])
        return Artifact(dir=final, record=record, cached=False, seconds=total)
    except (KeyboardInterrupt, SystemExit):
        log.warning("%s: build interrupted in stage %s; cleaning up", recipe.name, stages.current)
        _keep_failed_log(serial, options.cache_dir, recipe.name)
        raise
    except KickgateError as exc:
        kept = _keep_failed_log(serial, options.cache_dir, recipe.name)
        if isinstance(exc, BuildError) and kept is not None:
            exc.serial_log = str(kept)
        raise
    except Exception as exc:
        kept = _keep_failed_log(serial, options.cache_dir, recipe.name)
        raise BuildError(stages.current or "build", f"{type(exc).__name__}: {exc}",
                         serial_log=str(kept) if kept else None) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _keep_failed_log(serial: Path, cache_dir: Path, name: str) -> Path | None:
    """A failed build's serial log outlives its staging dir, for the user to read."""
    if not serial.is_file():
        return None
    logs = cache_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    kept = logs / f"{name}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-serial.log"
    shutil.copyfile(serial, kept)
    return kept

