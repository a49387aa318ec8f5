"""The build method contract: what a method is given, what it hands back, and the table of methods.

A method (builder/methods/<name>.py) turns a recipe into a raw or qcow2 disk inside a private work
directory. Everything common to all methods (cache, conversion, checksum, record) is build.py's job.
This module imports no method, and methods import nothing from build.py: no cycle either way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from builder.errors import KickgateError
from builder.hypervisor import Hypervisor
from builder.options import Accel
from builder.packages import Package
from builder.recipe import Recipe
from builder.stages import Stages


@dataclass(frozen=True)
class BuildOptions:
    cache_dir: Path
    no_cache: bool = False
    accel: Accel = Accel.AUTO
    console: bool = False  # every serial line of a build domain at INFO on logger kickgate.serial
    location: str | None = None  # kickstart: install source override


@dataclass(frozen=True)
class BuildContext:
    """What a build method gets. workdir is private and removed after the build."""

    recipe: Recipe
    workdir: Path
    hypervisor: Hypervisor
    serial_log: Path
    stages: Stages
    options: BuildOptions
    on_console_line: Callable[[str], None] | None = None  # an observer of every serial line


@dataclass(frozen=True)
class MethodResult:
    disk: Path
    disk_format: Literal["raw", "qcow2"]
    build_mac: str
    domain_type: str
    packages: tuple[Package, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One build method: its entry point, the code that shapes its images, the tools it runs."""

    name: str
    build: Callable[[BuildContext], MethodResult]
    # builder/ modules and data files (relative to the package) besides the method's own module whose
    # change changes the images it makes: all of them go into the cache key.
    code: tuple[str, ...]
    tools: tuple[str, ...]  # external tools whose version goes into the cache key
    uses_secrets: bool = False  # reads KICKGATE_ROOTPW_HASH / KICKGATE_SECRET_* (keyed into the cache)


# The build machinery every method shares: a change here changes every image.
SHARED_CODE = ("build.py", "method.py", "domain.py", "domainrun.py", "console.py", "recipe.py", "packages.py")


def get_method(name: str) -> Method:
    """The method of that name, from builder/methods/<name>.py (its module-level METHOD)."""
    try:
        module = importlib.import_module(f"builder.methods.{name}")
    except ModuleNotFoundError:
        raise KickgateError(f"no build method named {name!r} (builder/methods/ has none)") from None
    method = getattr(module, "METHOD", None)
    if not isinstance(method, Method) or method.name != name:
        raise KickgateError(f"builder/methods/{name}.py does not define METHOD = Method(name={name!r}, ...)")
    return method


PACKAGE_DIR = Path(__file__).parent


def code_files(method: Method, package: Path = PACKAGE_DIR) -> list[Path]:
    """Every file of the package whose content shapes this method's images, sorted."""
    names = {*SHARED_CODE, *method.code, f"methods/{method.name}.py"}
    files = {package / n for n in names}
    files.update((package / "data").glob(f"{method.name}*"))
    missing = sorted(str(p) for p in files if not p.is_file())
    if missing:
        raise KickgateError(f"build method {method.name}: code files missing: {', '.join(missing)}")
    return sorted(files)
