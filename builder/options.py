"""Run options, declared once: the pytest plugin and the `kickgate` command read the same table.

Each option names the surfaces it appears on; `add_options` feeds pytest's parser or argparse alike
(both take argparse's add_argument keywords), and `run_options` turns parsed values into the typed,
frozen RunOptions the core uses.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

KeepPolicy = Literal["never", "on-failure", "always"]
InstanceScope = Literal["session", "module"]
RegistryKind = Literal["local", "opennebula"]
NamePolicy = Literal["version", "fail", "replace"]

DEFAULT_BOOT_TIMEOUT_S = 300.0


class Accel(enum.StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


def default_cache_dir() -> Path:
    env = os.environ.get("KICKGATE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kickgate"


@dataclass(frozen=True)
class OpenNebulaOptions:
    """Command-line settings of the OpenNebula registry; unset ones come from the environment."""

    endpoint: str | None = None
    auth_file: Path | None = None
    datastore: str | None = None
    publish_dir: Path | None = None
    name_policy: NamePolicy | None = None
    owner: str | None = None  # whose images to trust; None: the authenticated user


@dataclass(frozen=True)
class RegistryOptions:
    kind: RegistryKind = "local"
    directory: Path | None = None  # local registry; default $KICKGATE_REGISTRY_DIR or ~/.local/share/...
    one: OpenNebulaOptions = field(default_factory=OpenNebulaOptions)


@dataclass(frozen=True)
class RunOptions:
    """One run, resolved once from the command line."""

    images: tuple[str, ...] = ()
    image_path: Path | None = None
    recipes: Path | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    no_cache: bool = False
    accel: Accel = Accel.AUTO
    libvirt_uri: str | None = None
    location: str | None = None
    console: bool = False
    keep: KeepPolicy = "never"
    instance_scope: InstanceScope = "session"
    boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    register: bool = True
    allow_partial: bool = False
    artifacts_dir: Path | None = None


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    surfaces: frozenset[str]  # "pytest", and CLI groups: "global", "build", "registry"
    kwargs: dict[str, Any]

    @property
    def dest(self) -> str:
        return str(self.kwargs.get("dest") or self.flags[0].lstrip("-").replace("-", "_"))


def _opt(*flags: str, on: str, **kwargs: Any) -> Option:
    return Option(flags, frozenset(on.split()), kwargs)


OPTIONS: tuple[Option, ...] = (
    _opt("--image", on="pytest", action="append", default=[], metavar="NAME",
         help="recipe to build and verify (repeatable; default: every recipe this machine can build)"),
    _opt("--image-path", on="pytest", metavar="PATH",
         help="verify this prebuilt image instead of building (name it with --image)"),
    _opt("--recipes", "--root", on="pytest global", dest="recipes", metavar="DIR",
         help="recipe repository root (holds images/; default: the nearest folder with images/)"),
    _opt("--cache-dir", on="pytest global", metavar="DIR",
         help="build cache (default: $KICKGATE_CACHE_DIR or ~/.cache/kickgate)"),
    _opt("--no-cache", on="pytest build", action="store_true",
         help="rebuild images even when a cached build matches"),
    _opt("--accel", on="pytest build", default=Accel.AUTO.value, choices=[a.value for a in Accel],
         help="hardware acceleration (auto: KVM when a probe boot works, else TCG)"),
    _opt("--libvirt-uri", on="pytest build", metavar="URI",
         help="libvirt URI (default: libvirt's embedded QEMU driver, no daemon needed)"),
    _opt("--location", on="pytest build", metavar="URL|PATH", help="kickstart install source override"),
    _opt("--console", on="pytest build", action="store_true",
         help="stream guest serial consoles to the log (each line once)"),
    _opt("--instance-scope", on="pytest", default="session", choices=list(get_args(InstanceScope)),
         help="one instance per image for the whole run (default) or per spec module"),
    _opt("--keep-instance", on="pytest", dest="keep_instance", default="never",
         choices=list(get_args(KeepPolicy)),
         help="keep an image's instances after the run (on-failure: only images with a failed spec)"),
    _opt("--boot-timeout", on="pytest", type=float, default=DEFAULT_BOOT_TIMEOUT_S, metavar="S",
         help=f"boot-to-SSH timeout in seconds (default {DEFAULT_BOOT_TIMEOUT_S:.0f})"),
    _opt("--registry", on="pytest registry", default="local", choices=list(get_args(RegistryKind)),
         help="where verified images go"),
    _opt("--registry-dir", on="pytest registry", metavar="DIR",
         help="local registry directory (default: $KICKGATE_REGISTRY_DIR or ~/.local/share/kickgate/registry)"),
    _opt("--no-register", on="pytest", action="store_true", help="verify only; register nothing"),
    _opt("--allow-partial", on="pytest", action="store_true",
         help="register even when the run was narrowed (-k, -m, node ids, single files)"),
    _opt("--artifacts-dir", on="pytest", metavar="DIR",
         help="copy build records, serial logs and registration records here (for CI artifacts)"),
    _opt("--one-xmlrpc", on="pytest registry", metavar="URL", help="OpenNebula endpoint (default: $ONE_XMLRPC)"),
    _opt("--one-auth", on="pytest registry", metavar="FILE",
         help="file holding user:password (default: $ONE_AUTH or ~/.one/one_auth)"),
    _opt("--one-datastore", on="pytest registry", metavar="NAME|ID", help="OpenNebula image datastore"),
    _opt("--one-publish-dir", on="pytest registry", metavar="DIR",
         help="where images are published for the front-end (must be in the datastore's SAFE_DIRS)"),
    _opt("--one-name-policy", on="pytest registry", choices=list(get_args(NamePolicy)),
         help="what to do when NAME is taken by other bytes (default: version)"),
    _opt("--one-owner", on="pytest registry", metavar="USER",
         help="trust the kickgate images of this OpenNebula user (name or ID; default: the authenticated user)"),
)


def add_options(add: Callable[..., Any], surface: str) -> None:
    """Declare every option of one surface through add (pytest's group.addoption or add_argument)."""
    for o in OPTIONS:
        if surface in o.surfaces:
            add(*o.flags, **o.kwargs)


Getter = Callable[[str], Any]


def _path(get: Getter, name: str) -> Path | None:
    value = get(name)
    return Path(value).expanduser() if value else None


def registry_options(get: Getter) -> RegistryOptions:
    one = OpenNebulaOptions(endpoint=get("one_xmlrpc"), auth_file=_path(get, "one_auth"),
                            datastore=get("one_datastore"), publish_dir=_path(get, "one_publish_dir"),
                            name_policy=cast(NamePolicy | None, get("one_name_policy")), owner=get("one_owner"))
    return RegistryOptions(kind=cast(RegistryKind, get("registry") or "local"),
                           directory=_path(get, "registry_dir"), one=one)


def run_options(get: Getter) -> RunOptions:
    """RunOptions from parsed values; get(dest) returns None for an option a surface lacks."""
    timeout = get("boot_timeout")
    return RunOptions(
        images=tuple(get("image") or ()), image_path=_path(get, "image_path"), recipes=_path(get, "recipes"),
        cache_dir=_path(get, "cache_dir") or default_cache_dir(), no_cache=bool(get("no_cache")),
        accel=Accel(get("accel") or Accel.AUTO.value), libvirt_uri=get("libvirt_uri"), location=get("location"),
        console=bool(get("console")), keep=cast(KeepPolicy, get("keep_instance") or "never"),
        instance_scope=cast(InstanceScope, get("instance_scope") or "session"),
        boot_timeout_s=float(timeout) if timeout is not None else DEFAULT_BOOT_TIMEOUT_S,
        registry=registry_options(get), register=not get("no_register"),
        allow_partial=bool(get("allow_partial")), artifacts_dir=_path(get, "artifacts_dir"))
