"""The local registry (the default): a directory of verified images, one numbered version per distinct sha256.

Layout::

    <root>/<NAME>/.lock            exclusive lock of writers of NAME (filelock)
    <root>/<NAME>/1/<NAME>.qcow2   the exact bytes that passed the gate
    <root>/<NAME>/1/record.json    name, version, sha256, size, format, public, registered_at,
                                   image, attributes (the full template as ordered [key, value] pairs)
    <root>/<NAME>/2/...
    <root>/<NAME>/latest -> 2      relative symlink to the newest version
    <root>/<NAME>/promotions.json  promotion history, oldest first: [{"version": 1, "promoted_at": …}, …];
                                   the last entry is the promoted version, rollback drops it
    <root>/<NAME>/promoted -> 1    relative symlink to the promoted version

Writers build a version in ``<root>/<NAME>/.tmp-*`` and ``os.rename`` it into place, so a version
dir either does not exist or is complete; readers take no lock and skip dot-entries. Version
numbers are allocated under the lock, so concurrent runs (even for the same NAME) never collide.
Promotion and rollback rewrite promotions.json atomically under the same lock, then swap the
``promoted`` link like ``latest``; the links are for people and tools, the files are the truth.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from builder.errors import IntegrityError, KickgateError, RegistryError
from builder.fsutil import (
    atomic_copy,
    atomic_write_bytes,
    atomic_write_json,
    check_private_dir,
    fsync_dir,
    sha256_file,
)
from builder.registry.base import PromoteTargets, Promotion, Registered, Registration
from builder.versions import LATEST as LATEST_REF
from builder.versions import PROMOTED as PROMOTED_REF
from builder.versions import parse_version

log = logging.getLogger(__name__)

RECORD = "record.json"
LATEST = "latest"
PROMOTED = "promoted"
PROMOTIONS = "promotions.json"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
DEFAULT_LOCK_TIMEOUT = 1800.0  # copying a multi-GiB image can take a while; a dead holder frees the lock at once

# Names and formats become path components: no separators, no leading dot (dot-entries are ours).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_FORMAT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_RECORD_KEYS = ("name", "version", "sha256", "size", "format", "public", "registered_at", "image", "attributes")


def default_registry_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the local registry lives unless --registry-dir says otherwise.

    ``$KICKGATE_REGISTRY_DIR``, else ``$XDG_DATA_HOME/kickgate/registry``, else
    ``~/.local/share/kickgate/registry``.
    """
    env = os.environ if environ is None else environ
    home = Path(env.get("HOME") or Path.home())
    explicit = env.get("KICKGATE_REGISTRY_DIR", "").strip()
    if explicit:
        # "~" expanded against env, not os.environ, so that a given environ is honoured throughout
        if explicit == "~" or explicit.startswith("~/"):
            return home / explicit[2:]
        return Path(explicit)
    xdg = env.get("XDG_DATA_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative values
        return Path(xdg) / "kickgate" / "registry"
    return home / ".local" / "share" / "kickgate" / "registry"


class LocalRegistry:
    """Registers verified images into a directory; safe for concurrent runs on one host."""

    kind = "local"

    def __init__(self, root: str | os.PathLike[str], *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        # absolute, so that locations handed out stay valid whatever the caller's cwd becomes
        self.root = Path(root).expanduser().absolute()
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"LocalRegistry({str(self.root)!r})"

    # -- register -------------------------------------------------------------------------------
    def register(self, reg: Registration) -> Registered:
        name_dir = self._name_dir(reg.name)
        if not _FORMAT_RE.fullmatch(reg.format):
            raise RegistryError(f"invalid image format {reg.format!r} for {reg.name}")
        sha = reg.sha256.lower()
        if not _SHA256_RE.fullmatch(sha):
            raise RegistryError(f"invalid sha256 {reg.sha256!r} for {reg.name}")
        if not reg.image_path.is_file():
            raise RegistryError(f"cannot register {reg.name}: image file {reg.image_path} does not exist")
        try:
            name_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryError(f"cannot create registry dir {name_dir}: {e.strerror or e}") from None
        try:
            check_private_dir(self.root, "the local registry", "--registry-dir or KICKGATE_REGISTRY_DIR")
        except KickgateError as e:
            raise RegistryError(str(e)) from None
        with self._locked(name_dir, f"registering {reg.name}"):
            return self._register_locked(reg, sha, name_dir)

    @contextlib.contextmanager
    def _locked(self, name_dir: Path, doing: str) -> Iterator[None]:
        """Hold the writers' lock of one name."""
        lock = FileLock(str(name_dir / LOCK))
        try:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("another run is %s in %s: waiting for it (up to %.0fs)", doing, self.root,
                         self.lock_timeout)
                lock.acquire(timeout=self.lock_timeout)
        except Timeout:
            raise RegistryError(f"another run has held the lock {name_dir / LOCK} for {self.lock_timeout:.0f}s "
                                f"while {doing}; is a kickgate run stuck?") from None
        except OSError as e:
            raise RegistryError(f"cannot lock {name_dir / LOCK}: {e.strerror or e}") from None
        try:
            yield
        finally:
            lock.release()

    def _register_locked(self, reg: Registration, sha: str, name_dir: Path) -> Registered:
        self._remove_leftovers(name_dir)
        versions = _versions(name_dir)
        for v in versions:
            try:
                rec = _read_record(name_dir / str(v) / RECORD, reg.name, v)
            except RegistryError as e:
                log.warning("ignoring %s", e)
                continue
            stored = name_dir / str(v) / rec["image"]
            if rec["sha256"].lower() == sha and stored.is_file():
                if sha256_file(stored) != sha:
                    raise RegistryError(f"{stored} no longer has the sha256 its record names ({sha}): the registry "
                                        f"copy was modified; remove {name_dir / str(v)} and register again")
                log.info("%s is already registered with sha256 %s as local version %d in %s: nothing to do",
                         reg.name, sha[:12], v, self.root)
                self._point_latest(name_dir, max(versions))  # repair it if an earlier run died before
                return self._registered(name_dir / str(v), rec, reused=True)

        version = max(versions, default=0) + 1
        image_name = f"{reg.name}.{reg.format}"
        try:
            tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=name_dir))
        except OSError as e:
            raise RegistryError(f"cannot create a temporary dir in {name_dir}: {e.strerror or e}") from None
        final = name_dir / str(version)
        # Readable by others only when the image is PUBLIC; otherwise the owner and its group (which
        # is how a front-end's service account is given access).
        file_mode, dir_mode = (0o644, 0o755) if reg.public else (0o640, 0o750)
        try:
            stored = tmp / image_name
            try:
                atomic_copy(reg.image_path, stored, mode=file_mode, expect_sha256=sha)
            except IntegrityError as e:
                raise RegistryError(f"the bytes of {reg.image_path} changed since they were tested ({e}); nothing "
                                    "was registered (run the gate again)") from None
            except OSError as e:
                raise RegistryError(f"cannot copy {reg.image_path} into {name_dir}: {e.strerror or e}") from None
            record: dict[str, Any] = {
                "name": reg.name,
                "version": version,
                "sha256": sha,
                "size": stored.stat().st_size,
                "format": reg.format,
                "public": reg.public,
                "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "image": image_name,
                "attributes": [[k, v] for k, v in reg.attributes],
            }
            for file_name, data in reg.files:
                if "/" in file_name or file_name.startswith(".") or file_name in (RECORD, image_name):
                    raise RegistryError(f"cannot store {file_name!r} beside {reg.name}: not a plain file name")
                atomic_write_bytes(tmp / file_name, data, mode=file_mode)
            atomic_write_json(tmp / RECORD, record, mode=file_mode)
            os.chmod(tmp, dir_mode)  # mkdtemp makes it 0700
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(name_dir)
        except OSError as e:
            raise RegistryError(f"cannot register {reg.name} in {name_dir}: {e.strerror or e}") from None
        finally:
            # also on KeyboardInterrupt: a temp dir is never left behind (after the rename it is gone)
            shutil.rmtree(tmp, ignore_errors=True)
        self._point_latest(name_dir, version)
        log.info("registered %s as local version %d in %s (sha256 %s)", reg.name, version, self.root, sha[:12])
        return self._registered(final, record, reused=False)

    def _remove_leftovers(self, name_dir: Path) -> None:
        """Temp entries only exist while their writer holds the lock, so under it they are a dead run's."""
        try:
            entries = builtins.list(name_dir.iterdir())
        except OSError as e:
            raise RegistryError(f"cannot read registry dir {name_dir}: {e.strerror or e}") from None
        for entry in entries:
            if entry.name.startswith(TMP_PREFIX):
                log.info("removing %s left by an interrupted registration", entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()

    def _point_latest(self, name_dir: Path, version: int) -> None:
        self._point(name_dir, LATEST, version)

    def _point(self, name_dir: Path, which: str, version: int | None) -> None:
        """Make ``which`` a relative symlink to version (None: remove it), replacing the old one atomically."""
        link = name_dir / which
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            return
        target = str(version)
        with contextlib.suppress(OSError):
            if os.readlink(link) == target:
                return
        tmp_link = name_dir / f"{TMP_PREFIX}{which}-{uuid.uuid4().hex}"
        try:
            os.symlink(target, tmp_link)
            os.replace(tmp_link, link)
            fsync_dir(name_dir)
        except OSError as e:
            # the version itself is complete and registered; readers resolve "latest" without the link
            log.warning("could not point %s at version %s: %s", link, target, e.strerror or e)
            with contextlib.suppress(OSError):
                tmp_link.unlink()

    # -- read -----------------------------------------------------------------------------------
    def list(self) -> builtins.list[Registered]:
        """Every readable version of every image, sorted by name then version."""
        out: builtins.list[Registered] = []
        try:
            entries = sorted(self.root.iterdir())
        except FileNotFoundError:
            return out
        except OSError as e:
            raise RegistryError(f"cannot read registry dir {self.root}: {e.strerror or e}") from None
        for name_dir in entries:
            if name_dir.name.startswith(".") or not name_dir.is_dir() or not _NAME_RE.fullmatch(name_dir.name):
                continue
            promoted = _promoted_version(name_dir)
            for v in _versions(name_dir):
                try:
                    rec = _read_record(name_dir / str(v) / RECORD, name_dir.name, v)
                except RegistryError as e:
                    log.warning("skipping %s", e)
                    continue
                out.append(self._registered(name_dir / str(v), rec, reused=False, promoted=v == promoted))
        return out

    def get(self, name: str, version: str = "latest") -> Registered:
        """One version of name: latest (the newest), promoted, or a number (3 or v3).

        Raises RegistryError if absent or unreadable."""
        vdir, rec = self._lookup(name, version)
        image = vdir / rec["image"]
        if not image.is_file():
            raise RegistryError(f"the image file {image} of {name} version {vdir.name} is missing")
        return self._registered(vdir, rec, reused=False, promoted=rec["version"] == _promoted_version(vdir.parent))

    def _lookup(self, name: str, version: str) -> tuple[Path, dict[str, Any]]:
        name_dir = self._name_dir(name)
        versions = _versions(name_dir)
        if not versions:
            raise RegistryError(f"no image {name} in {self.root}")
        ref = parse_version(version, name)
        if ref.kind == LATEST_REF:
            v = max(versions)  # the symlink is for humans; the dirs are the truth
        elif ref.kind == PROMOTED_REF:
            promoted = _promoted_version(name_dir)
            if promoted is None:
                raise RegistryError(f"no version of {name} has been promoted in {self.root} "
                                    f"(kickgate promote {name}@VERSION)")
            v = promoted
        elif ref.kind == "id":
            raise RegistryError(f"{name}@{version}: image IDs are OpenNebula's; the local registry numbers versions "
                                f"(versions of {name}: {', '.join(map(str, versions))})")
        elif ref.n in versions:
            v = ref.n
        else:
            raise RegistryError(f"{name} has no version {version}; versions: {', '.join(map(str, versions))}")
        return name_dir / str(v), _read_record(name_dir / str(v) / RECORD, name, v)

    def _name_dir(self, name: str) -> Path:
        if not _NAME_RE.fullmatch(name):
            raise RegistryError(f"invalid image name {name!r} (letters, digits, '.', '_', '+', '-'; not starting "
                                "with a dot)")
        path = self.root / name
        # A symlinked or foreign name dir would let another user redirect or swap registered bytes.
        if path.is_symlink():
            raise RegistryError(f"{path} is a symbolic link; a registry name directory must be a real directory "
                                "(remove the link)")
        with contextlib.suppress(FileNotFoundError):
            owner = path.stat().st_uid
            if owner != os.getuid():
                raise RegistryError(f"{path} belongs to uid {owner}, not to this user ({os.getuid()}); "
                                    "register into a registry directory you own (--registry-dir)")
        return path

    def _registered(self, vdir: Path, rec: Mapping[str, Any], reused: bool, promoted: bool = False) -> Registered:
        return Registered(registry=self.kind, name=rec["name"], version=str(rec["version"]),
                          location=str(vdir / rec["image"]), sha256=rec["sha256"], reused=reused,
                          attributes={k: v for k, v in rec["attributes"]}, details={**rec, "promoted": promoted},
                          promoted=promoted)

    # -- promote --------------------------------------------------------------------------------
    def promote(self, entry: Registered, targets: PromoteTargets) -> Promotion:
        """Make entry's version the promoted one (the ``promoted`` link), then apply keep. Re-runnable."""
        name_dir = self._name_dir(entry.name)
        with self._locked(name_dir, f"promoting {entry.name}"):
            _, rec = self._lookup(entry.name, entry.version)
            version = int(rec["version"])
            history = _read_promotions(name_dir)
            if not history or history[-1]["version"] != version:
                history.append({"version": version, "promoted_at": datetime.now(UTC).isoformat(timespec="seconds")})
                self._write_promotions(name_dir, history)
            self._point(name_dir, PROMOTED, version)
            previous = next((h["version"] for h in reversed(history) if h["version"] != version), None)
            deleted = self._keep(name_dir, entry.name, targets.keep, version) if targets.keep is not None else []
        promotion = Promotion(registry=self.kind, promoted=f"{entry.name} version {version}",
                              previous=f"{entry.name} version {previous}" if previous is not None else None,
                              deleted=tuple(deleted))
        log.info("%s", promotion.summary())
        return promotion

    def rollback(self, name: str, targets: PromoteTargets) -> Promotion:
        """Make the version promoted before the current one the promoted one again."""
        name_dir = self._name_dir(name)
        if not name_dir.is_dir():
            raise RegistryError(f"no image {name} in {self.root}")
        with self._locked(name_dir, f"rolling back {name}"):
            history = _read_promotions(name_dir)
            if not history:
                raise RegistryError(f"no version of {name} has been promoted in {self.root}: nothing to roll back")
            current = history[-1]["version"]
            present = set(_versions(name_dir))
            earlier = list(history)
            while earlier and (earlier[-1]["version"] == current or earlier[-1]["version"] not in present):
                earlier.pop()
            if not earlier:
                raise RegistryError(f"{name} version {current} is the only promoted version of {name} still in "
                                    f"{self.root}: nothing to roll back to")
            self._write_promotions(name_dir, earlier)
            target = earlier[-1]["version"]
            self._point(name_dir, PROMOTED, target)
        promotion = Promotion(registry=self.kind, promoted=f"{name} version {target}",
                              previous=f"{name} version {current}")
        log.info("rolled back: %s", promotion.summary())
        return promotion

    def _write_promotions(self, name_dir: Path, history: builtins.list[dict[str, Any]]) -> None:
        try:
            atomic_write_json(name_dir / PROMOTIONS, history, mode=0o644)
        except OSError as e:
            raise RegistryError(f"cannot write {name_dir / PROMOTIONS}: {e.strerror or e}") from None

    def _keep(self, name_dir: Path, name: str, keep: int, promoted: int) -> builtins.list[str]:
        """Remove versions older than the newest keep ones, never the promoted one (under the lock)."""
        versions = _versions(name_dir)
        newest = set(versions[-keep:]) if keep > 0 else set()
        deleted: builtins.list[str] = []
        for v in versions:
            if v in newest or v == promoted:
                continue
            # out of readers' sight first (they skip dot-entries), then removed
            doomed = name_dir / f"{TMP_PREFIX}deleted-{v}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(name_dir / str(v), doomed)
            except OSError as e:
                log.warning("could not remove %s version %d: %s", name, v, e.strerror or e)
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            deleted.append(f"{name} version {v}")
            log.info("deleted %s version %d (keep = %d)", name, v, keep)
        if deleted:
            fsync_dir(name_dir)
        return deleted


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _versions(name_dir: Path) -> list[int]:
    """Numbered version dirs, ascending; temp dirs, the lock and ``latest`` are not versions."""
    try:
        entries = builtins.list(name_dir.iterdir())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise RegistryError(f"cannot read registry dir {name_dir}: {e.strerror or e}") from None
    # canonical numbers only ("1", not "01"): the number is how a version dir is found again
    return sorted(int(e.name) for e in entries
                  if e.name.isascii() and e.name.isdigit() and e.name == str(int(e.name))
                  and not e.is_symlink() and e.is_dir())


def _read_promotions(name_dir: Path) -> list[dict[str, Any]]:
    """The promotion history of a name, oldest first; entries that are not {"version": int, …} are dropped."""
    path = name_dir / PROMOTIONS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistryError(f"cannot read the promotion history {path}: {e}; fix or remove it "
                            "(then promote again)") from None
    if not isinstance(data, list):
        raise RegistryError(f"{path} is not a list of promotions; fix or remove it (then promote again)")
    return [h for h in data if isinstance(h, dict) and type(h.get("version")) is int]


def _promoted_version(name_dir: Path) -> int | None:
    try:
        history = _read_promotions(name_dir)
    except RegistryError as e:
        log.warning("%s", e)
        return None
    return history[-1]["version"] if history else None


def _read_record(path: Path, name: str, version: int) -> dict[str, Any]:
    """Parse and check one record.json; any problem is a RegistryError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{path} is missing") from None
    except OSError as e:
        raise RegistryError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path} is corrupt: {e}") from None
    problem = _record_problem(data, name, version)
    if problem:
        raise RegistryError(f"{path} is corrupt: {problem}")
    assert isinstance(data, dict)
    return data


def _record_problem(data: object, name: str, version: int) -> str:
    if not isinstance(data, dict):
        return "not a JSON object"
    missing = [k for k in _RECORD_KEYS if k not in data]
    if missing:
        return f"missing {', '.join(missing)}"
    if data["name"] != name or type(data["version"]) is not int or data["version"] != version:
        return f"it describes {data['name']!r} version {data['version']!r}, not {name} version {version}"
    if not isinstance(data["sha256"], str) or not _SHA256_RE.fullmatch(data["sha256"].lower()):
        return "sha256 is not a sha256"
    image = data["image"]
    if not isinstance(image, str) or not image or "/" in image or image.startswith("."):
        return "image is not a file name"
    attrs = data["attributes"]
    if not isinstance(attrs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in attrs):
        return "attributes is not a list of [key, value] strings"
    return ""


__all__ = ["LATEST", "RECORD", "LocalRegistry", "default_registry_dir"]
