"""Load and validate recipes (images/<name>/image.toml) before anything boots.

A recipe is immutable data (frozen dataclasses); every problem is a RecipeError that names the
file, the key (and its line when it can be found) and what to do.
"""

from __future__ import annotations

import json
import re
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from builder.errors import RecipeError

Method = Literal["bootstrap", "kickstart"]
Family = Literal["debian", "rhel"]

# Every pattern is matched with fullmatch: "$" alone would accept a trailing newline.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Debian policy 5.6.7 for names; an optional "=version" pin as apt accepts it.
_DEB_PKG_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?")
_SCRIPT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ATTR_RE = re.compile(r"[A-Z][A-Z0-9_]*")
_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODULE_RE = re.compile(r"[a-z0-9_-]+")
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", re.IGNORECASE)
_DURATION_RE = re.compile(r"\s*(\d+)\s*([smh]?)\s*")

# [vars] become shell variables of every post-install script: these names would change how the
# shell or the dynamic loader behaves for the whole script, not just pass a value.
_SHELL_SPECIAL_VARS = frozenset({"PATH", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "CDPATH",
                                 "GLOBIGNORE", "PS4", "HOME", "IMAGE_NAME", "IMAGE_FAMILY"})
_SHELL_SPECIAL_PREFIXES = ("LD_",)
# Bidirectional overrides make a value read differently from what the shell or registry sees.
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

# Attributes the gate computes; a recipe that sets them would lie about provenance.
RESERVED_ATTRIBUTES = frozenset({
    "PATH", "SOURCE", "GITREV", "SHA256", "SIZE", "FORMAT", "BUILT_AT", "BUILD_ID", "SPECS",
    "KICKGATE_VERSION",
})
DEFAULT_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class DiskSpec:
    size_mib: int
    format: Literal["qcow2", "raw"]
    compression: Literal["zstd", "zlib", "none"]


@dataclass(frozen=True)
class VmSpec:
    memory_mib: int
    vcpus: int
    build_timeout_s: int
    idle_timeout_s: int


@dataclass(frozen=True)
class BootstrapSpec:
    suite: str
    mirror: str
    components: tuple[str, ...]
    packages: tuple[str, ...]
    initramfs_modules: tuple[str, ...] = ()  # empty: the distribution's default (MODULES=most)


@dataclass(frozen=True)
class KickstartSpec:
    template: Path
    location: str
    version: str  # pykickstart syntax version, e.g. "RHEL9", "F40"
    extra_args: tuple[str, ...]


@dataclass(frozen=True)
class Script:
    namespace: Literal["common", "node"]
    name: str
    path: Path


@dataclass(frozen=True)
class RegisterSpec:
    name: str
    type: str
    public: bool
    description: str
    attributes: tuple[tuple[str, str], ...]  # custom attributes, recipe order


@dataclass(frozen=True)
class PromoteSpec:
    """The [promote] table: which VM templates follow a verified image, and how many versions to keep.

    Kept out of Recipe (read with promote_spec) so that changing it never changes the image's cache key.
    """

    templates: tuple[str | int, ...]  # names or IDs
    select: tuple[tuple[str, str], ...]  # every VM template carrying all these attributes
    keep: int | None  # None: delete nothing


@dataclass(frozen=True)
class VerifySpec:
    """How verify instances are run. It does not shape the image, so it is not part of the cache key."""

    network: Literal["isolated", "outbound"] = "isolated"
    reason: str = ""  # why the specs need outbound access (required with network = "outbound")


@dataclass(frozen=True)
class Recipe:
    name: str
    dir: Path
    path: Path  # image.toml
    description: str
    method: Method
    family: Family
    disk: DiskSpec
    vm: VmSpec
    bootstrap: BootstrapSpec | None
    kickstart: KickstartSpec | None
    scripts: tuple[Script, ...]  # common first, then node, each in recipe order
    variables: tuple[tuple[str, str], ...]
    register: RegisterSpec
    verify: VerifySpec = VerifySpec()

    @property
    def variables_map(self) -> dict[str, str]:
        return dict(self.variables)

    def input_files(self) -> list[Path]:
        """Every file whose content defines the image (for content hashes and caching)."""
        files = [self.path, *(s.path for s in self.scripts)]
        if self.kickstart is not None:
            files.append(self.kickstart.template)
            files.extend(sorted(p for p in self.dir.glob("*.j2") if p != self.kickstart.template))
        return files


# --------------------------------------------------------------------------- helpers


class _Ctx:
    """Carries the file and its text so errors can name the line of a key."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, section: str | None, key: str | None) -> int | None:
        in_section = section is None
        for i, raw in enumerate(self.lines, 1):
            line = raw.split("#", 1)[0].strip() if raw.lstrip().startswith("[") else raw.strip()
            if line.startswith("["):
                header = line.strip("[] ")
                in_section = section is not None and header == section
                if key is None and in_section:
                    return i
                # A key can be written as a table of its own: [key] or [section.key].
                if key is not None and header == (f"{section}.{key}" if section else key):
                    return i
                continue
            if in_section and key is not None and any(
                    re.match(rf"^[\"']?{re.escape(k)}[\"']?\s*=", line) for k in _key_spellings(key)):
                return i
        return None

    def error(self, section: str | None, key: str | None, problem: str, hint: str = "") -> RecipeError:
        where = ".".join(p for p in (section, key) if p)
        line = self.line_of(section, key) if (section or key) else None
        if line is not None:
            where = f"line {line}: {where}" if where else f"line {line}"
        return RecipeError(self.path, where, problem, hint)


def _key_spellings(key: str) -> tuple[str, ...]:
    """How a key can appear in the file: as is, or with escapes in a quoted key ("a\\nb")."""
    return (key, json.dumps(key)[1:-1])


def forbidden_char(text: str) -> str | None:
    """The first character that has no place in a one-line value: a line break (as any of
    Python's or pykickstart's line splitting sees one), another control character, or a
    bidirectional override."""
    for c in text:
        if c in _BIDI_CONTROLS or unicodedata.category(c) in ("Cc", "Zl", "Zp"):
            return c
    return None


def describe_char(c: str) -> str:
    kind = "a line break" if c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029" else "a control character"
    return f"{kind} (U+{ord(c):04X})"


_ONE_LINE_HINT = ("every recipe key and value is one line of printable text, because values end up in "
                  "shell lines, kickstart commands and registry templates: remove it (multi-line text "
                  "belongs in a script under scripts/node/)")


def _check_one_line(ctx: _Ctx, data: Mapping[str, Any]) -> None:
    """Refuse line breaks and control characters in every key and string of the recipe."""

    def check(section: str | None, key: str, value: object, label: str) -> None:
        if isinstance(value, str):
            bad = forbidden_char(value)
            if bad is not None:
                raise ctx.error(section, key, f"{label}{value!r} contains {describe_char(bad)}", _ONE_LINE_HINT)
        elif isinstance(value, list):
            for i, item in enumerate(value, 1):
                check(section, key, item, f"{label}item {i}: ")
        elif isinstance(value, dict):
            for k, v in value.items():
                check_key(section, key, k, label)
                check(section, key, v, f"{label}{k}: ")

    def check_key(section: str | None, key: str, k: str, label: str = "") -> None:
        bad = forbidden_char(k)
        if bad is not None:
            raise ctx.error(section, key, f"{label}the key {k!r} contains {describe_char(bad)}", _ONE_LINE_HINT)

    for top, value in data.items():
        check_key(None, top, top)
        if isinstance(value, dict):
            for k, v in value.items():
                check_key(top, k, k)
                check(top, k, v, "")
        else:
            check(None, top, value, "")


def parse_size_mib(value: object) -> int:
    """'3G', '512M', '3GiB', 2048 (MiB) → MiB. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        mib = value
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if not m:
            raise ValueError("not a size")
        num = float(m.group(1))
        factor = {"": 1 / (1024 * 1024), "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
        if not m.group(2) and not m.group(3):
            raise ValueError("a size string needs a unit")  # "2048" could mean bytes or MiB
        mib = int(num * factor[m.group(2).upper()])
    else:
        raise ValueError("not a size")
    if mib <= 0:
        raise ValueError("size must be positive")
    return mib


def parse_duration_s(value: object) -> int:
    """'15m', '90s', '1h', 600 (seconds) → seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int):
        secs = value
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if not m:
            raise ValueError("not a duration")
        secs = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    else:
        raise ValueError("not a duration")
    if secs <= 0:
        raise ValueError("duration must be positive")
    return secs


def _table(ctx: _Ctx, data: Mapping[str, Any], key: str, allowed: Iterable[str]) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ctx.error(None, key, f"must be a table [{key}], not {type(value).__name__}")
    allowed_set = set(allowed)
    for k in value:
        if k not in allowed_set:
            raise ctx.error(key, k, "unknown key", f"allowed in [{key}]: {', '.join(sorted(allowed_set))}")
    return dict(value)


def _str(ctx: _Ctx, section: str | None, key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(section, key, f"must be a non-empty string, got {value!r}")
    return value


def _str_list(ctx: _Ctx, section: str, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ctx.error(section, key, "must be a list of strings")
    return tuple(value)


# --------------------------------------------------------------------------- loading

_TOP_KEYS = {"name", "description", "method", "family", "disk", "vm", "bootstrap", "kickstart",
             "scripts", "vars", "register", "promote", "verify"}


def load_recipe(recipe_dir: Path, common_scripts_dir: Path) -> Recipe:
    """Load images/<name>/ and validate it completely; raise RecipeError on the first problem."""
    recipe_dir = recipe_dir.resolve()
    path = recipe_dir / "image.toml"
    if not path.is_file():
        raise RecipeError(path, "", "no image.toml", "every recipe folder needs one; see images/generic-dev")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(path, "", f"not valid TOML: {exc}") from None
    ctx = _Ctx(path, text)
    _check_one_line(ctx, data)

    for k in data:
        if k not in _TOP_KEYS:
            raise ctx.error(None, k, "unknown key", f"allowed: {', '.join(sorted(_TOP_KEYS))}")

    folder_name = recipe_dir.name
    name = _str(ctx, None, "name", data.get("name", folder_name))
    if not _NAME_RE.fullmatch(name):
        raise ctx.error(None, "name", f"invalid image name {name!r}", "use lower-case letters, digits, '.', '_', '-'")
    if name != folder_name:
        raise ctx.error(None, "name", f"{name!r} differs from the folder name {folder_name!r}",
                        "rename one so they match")
    description = _str(ctx, None, "description", data.get("description", name))

    method = data.get("method")
    if method not in ("bootstrap", "kickstart"):
        raise ctx.error(None, "method", f"must be 'bootstrap' or 'kickstart', got {method!r}")
    family = data.get("family", "debian" if method == "bootstrap" else "rhel")
    if family not in ("debian", "rhel"):
        raise ctx.error(None, "family", f"must be 'debian' or 'rhel', got {family!r}")

    disk = _load_disk(ctx, data)
    vm = _load_vm(ctx, data)
    bootstrap = _load_bootstrap(ctx, data) if method == "bootstrap" else None
    if method != "bootstrap" and "bootstrap" in data:
        raise ctx.error(None, "bootstrap", "given, but method is not 'bootstrap'",
                        "remove the table or set method = \"bootstrap\"")
    kickstart = _load_kickstart(ctx, data, recipe_dir) if method == "kickstart" else None
    if method != "kickstart" and "kickstart" in data:
        raise ctx.error(None, "kickstart", "given, but method is not 'kickstart'",
                        "remove the table or set method = \"kickstart\"")
    scripts = _load_scripts(ctx, data, recipe_dir, common_scripts_dir)
    variables = _load_vars(ctx, data)
    register = _load_register(ctx, data, name, description)
    _load_promote(ctx, data)  # checked now, before anything boots; read again by promote_spec
    verify = _load_verify(ctx, data)

    return Recipe(name=name, dir=recipe_dir, path=path, description=description, method=method,
                  family=family, disk=disk, vm=vm, bootstrap=bootstrap, kickstart=kickstart,
                  scripts=scripts, variables=variables, register=register, verify=verify)


def _load_verify(ctx: _Ctx, data: Mapping[str, Any]) -> VerifySpec:
    t = _table(ctx, data, "verify", ("network", "reason"))
    network = t.get("network", "isolated")
    if network not in ("isolated", "outbound"):
        raise ctx.error("verify", "network", f"must be 'isolated' or 'outbound', got {network!r}")
    reason = _str(ctx, "verify", "reason", t["reason"]) if "reason" in t else ""
    if network == "outbound" and not reason.strip():
        raise ctx.error("verify", "network", "outbound access for the guest under test needs a reason",
                        'add reason = "..." saying what the specs must reach')
    return VerifySpec(network=network, reason=reason)


def _load_disk(ctx: _Ctx, data: Mapping[str, Any]) -> DiskSpec:
    t = _table(ctx, data, "disk", ("size", "format", "compression"))
    try:
        size = parse_size_mib(t.get("size", "3G"))
    except ValueError:
        raise ctx.error("disk", "size", f"bad size {t.get('size')!r}", "write e.g. \"3G\" or \"2048M\"") from None
    if size < 512:
        raise ctx.error("disk", "size", f"{size} MiB is too small for a bootable image", "use at least 512M")
    fmt = t.get("format", "qcow2")
    if fmt not in ("qcow2", "raw"):
        raise ctx.error("disk", "format", f"must be 'qcow2' or 'raw', got {fmt!r}")
    comp = t.get("compression", "zstd" if fmt == "qcow2" else "none")
    if comp not in ("zstd", "zlib", "none"):
        raise ctx.error("disk", "compression", f"must be 'zstd', 'zlib' or 'none', got {comp!r}")
    if fmt == "raw" and comp != "none":
        raise ctx.error("disk", "compression", "raw images cannot be compressed", "use format = \"qcow2\"")
    return DiskSpec(size_mib=size, format=fmt, compression=comp)


def _load_vm(ctx: _Ctx, data: Mapping[str, Any]) -> VmSpec:
    t = _table(ctx, data, "vm", ("memory", "vcpus", "build_timeout", "idle_timeout"))
    try:
        memory = parse_size_mib(t.get("memory", "1024M"))
    except ValueError:
        raise ctx.error("vm", "memory", f"bad size {t.get('memory')!r}", "write e.g. \"1024M\"") from None
    vcpus = t.get("vcpus", 1)
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= 64:
        raise ctx.error("vm", "vcpus", f"must be an integer from 1 to 64, got {vcpus!r}")
    durations = {}
    for key, default in (("build_timeout", "20m"), ("idle_timeout", "4m")):
        try:
            durations[key] = parse_duration_s(t.get(key, default))
        except ValueError:
            raise ctx.error("vm", key, f"bad duration {t.get(key)!r}", "write e.g. \"15m\" or \"90s\"") from None
    return VmSpec(memory_mib=memory, vcpus=vcpus, build_timeout_s=durations["build_timeout"],
                  idle_timeout_s=durations["idle_timeout"])


def _load_bootstrap(ctx: _Ctx, data: Mapping[str, Any]) -> BootstrapSpec:
    if "bootstrap" not in data:
        raise ctx.error(None, "bootstrap", "missing [bootstrap] table", "method 'bootstrap' needs suite and packages")
    t = _table(ctx, data, "bootstrap", ("suite", "mirror", "components", "packages", "initramfs_modules"))
    suite = _str(ctx, "bootstrap", "suite", t.get("suite", "bookworm"))
    mirror = _str(ctx, "bootstrap", "mirror", t.get("mirror", DEFAULT_MIRROR))
    if not re.match(r"^(https?|file)://", mirror):
        raise ctx.error("bootstrap", "mirror", f"not a URL: {mirror!r}", "use http://, https:// or file://")
    components = _str_list(ctx, "bootstrap", "components", t.get("components", ["main"]))
    packages = _str_list(ctx, "bootstrap", "packages", t.get("packages", []))
    for i, pkg in enumerate(packages):
        if not _DEB_PKG_RE.fullmatch(pkg):
            raise ctx.error("bootstrap", "packages", f"item {i + 1}: {pkg!r} is not a valid Debian package name",
                            "names are lower-case letters, digits and + . -")
    if len(set(packages)) != len(packages):
        dup = sorted({p for p in packages if packages.count(p) > 1})
        raise ctx.error("bootstrap", "packages", f"listed twice: {', '.join(dup)}", "remove the duplicate")
    modules = _str_list(ctx, "bootstrap", "initramfs_modules", t.get("initramfs_modules", []))
    for mod in modules:
        if not _MODULE_RE.fullmatch(mod):
            raise ctx.error("bootstrap", "initramfs_modules", f"{mod!r} is not a kernel module name",
                            "use the module's file name without .ko: lower-case letters, digits, _ and -")
    return BootstrapSpec(suite=suite, mirror=mirror.rstrip("/"), components=components, packages=packages,
                         initramfs_modules=modules)


def _load_kickstart(ctx: _Ctx, data: Mapping[str, Any], recipe_dir: Path) -> KickstartSpec:
    if "kickstart" not in data:
        raise ctx.error(None, "kickstart", "missing [kickstart] table",
                        "method 'kickstart' needs template, location and version")
    t = _table(ctx, data, "kickstart", ("template", "location", "version", "extra_args"))
    template_name = _str(ctx, "kickstart", "template", t.get("template"))
    template = (recipe_dir / template_name).resolve()
    if not template.is_file() or recipe_dir not in template.parents:
        raise ctx.error("kickstart", "template", f"{template_name!r} not found in {recipe_dir}")
    location = _str(ctx, "kickstart", "location", t.get("location"))
    version = _str(ctx, "kickstart", "version", t.get("version", "RHEL9"))
    extra = _str_list(ctx, "kickstart", "extra_args", t.get("extra_args", []))
    return KickstartSpec(template=template, location=location, version=version, extra_args=extra)


def _load_scripts(ctx: _Ctx, data: Mapping[str, Any], recipe_dir: Path, common_dir: Path) -> tuple[Script, ...]:
    t = _table(ctx, data, "scripts", ("common", "node"))
    out: list[Script] = []
    namespaces: tuple[tuple[Literal["common", "node"], Path], ...] = (
        ("common", common_dir), ("node", recipe_dir / "scripts" / "node"))
    for ns, folder in namespaces:
        names = _str_list(ctx, "scripts", ns, t.get(ns, []))
        for name in names:
            if not _SCRIPT_RE.fullmatch(name):
                raise ctx.error("scripts", ns, f"{name!r} is not a plain file name", "name a file inside the folder")
            path = folder / name
            if not path.is_file():
                raise ctx.error("scripts", ns, f"script {name!r} not found: {path}",
                                f"create it or remove it from scripts.{ns}")
            out.append(Script(namespace=ns, name=name, path=path))
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ctx.error("scripts", ns, f"listed twice: {', '.join(dup)}", "remove the duplicate")
    return tuple(out)


def _load_vars(ctx: _Ctx, data: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    t = data.get("vars", {})
    if not isinstance(t, dict):
        raise ctx.error(None, "vars", "must be a table [vars]")
    out = []
    for k, v in t.items():
        if not _VAR_RE.fullmatch(k):
            raise ctx.error("vars", k, f"{k!r} is not a shell variable name",
                            "use letters, digits and _, not starting with a digit")
        if k in _SHELL_SPECIAL_VARS or k.startswith(_SHELL_SPECIAL_PREFIXES):
            raise ctx.error("vars", k, f"{k!r} would change how the post-install scripts' shell runs",
                            "rename it; PATH, IFS, ENV, BASH_ENV, HOME, LD_* and kickgate's IMAGE_NAME and "
                            "IMAGE_FAMILY are not recipe variables")
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, int | float):
            v = str(v)
        elif not isinstance(v, str):
            raise ctx.error("vars", k, f"must be a string, number or boolean, got {type(v).__name__}")
        out.append((k, v))
    return tuple(out)


def _load_register(ctx: _Ctx, data: Mapping[str, Any], name: str, description: str) -> RegisterSpec:
    t = data.get("register", {})
    if not isinstance(t, dict):
        raise ctx.error(None, "register", "must be a table [register]")
    attrs: list[tuple[str, str]] = []
    reg_name, typ, public, desc = name, "OS", False, description
    for k, v in t.items():
        if not _ATTR_RE.fullmatch(k):
            raise ctx.error("register", k, "attribute names are upper-case (OpenNebula template keys)",
                            f"write {k.upper()}")
        if k in RESERVED_ATTRIBUTES:
            raise ctx.error("register", k, "is computed by kickgate at registration", "remove it from [register]")
        if isinstance(v, bool):
            sval = "YES" if v else "NO"
        elif isinstance(v, int | float | str):
            sval = str(v)
        else:
            raise ctx.error("register", k, f"must be a string, number or boolean, got {type(v).__name__}")
        if k == "NAME":
            if not _NAME_RE.fullmatch(sval):
                raise ctx.error("register", k, f"invalid image name {sval!r}",
                                "use lower-case letters, digits, '.', '_', '-'")
            reg_name = sval
        elif k == "TYPE":
            if sval not in ("OS", "CDROM", "DATABLOCK"):
                raise ctx.error("register", k, f"must be OS, CDROM or DATABLOCK, got {sval!r}")
            typ = sval
        elif k == "PUBLIC":
            if sval.upper() not in ("YES", "NO"):
                raise ctx.error("register", k, f"must be YES/NO or true/false, got {sval!r}")
            public = sval.upper() == "YES"
        elif k == "DESCRIPTION":
            desc = sval
        else:
            attrs.append((k, sval))
    return RegisterSpec(name=reg_name, type=typ, public=public, description=desc, attributes=tuple(attrs))


def _load_promote(ctx: _Ctx, data: Mapping[str, Any]) -> PromoteSpec | None:
    if "promote" not in data:
        return None
    t = _table(ctx, data, "promote", ("templates", "select", "keep"))
    templates = t.get("templates", [])
    if not isinstance(templates, list):
        raise ctx.error("promote", "templates", "must be a list of VM template names or IDs",
                        'write e.g. templates = ["web-base", 42]')
    for i, item in enumerate(templates):
        ok_id = isinstance(item, int) and not isinstance(item, bool) and item >= 0
        if not ok_id and not (isinstance(item, str) and item.strip()):
            raise ctx.error("promote", "templates", f"item {i + 1}: {item!r} is neither a template name nor an ID",
                            "names are non-empty strings, IDs non-negative integers")
    select = t.get("select", {})
    if not isinstance(select, dict):
        raise ctx.error("promote", "select", "must be a table of template attributes",
                        'write e.g. select = { KICKGATE_IMAGE = "generic-dev" }')
    for k, v in select.items():
        if not _ATTR_RE.match(k) or not isinstance(v, str) or not v:
            raise ctx.error("promote", "select", f"{k} = {v!r}: keys are upper-case template attributes and "
                            "values non-empty strings")
    keep = t.get("keep")
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise ctx.error("promote", "keep", f"must be a whole number of versions, at least 1, got {keep!r}",
                        "the promoted version is always kept")
    return PromoteSpec(templates=tuple(templates), select=tuple(select.items()), keep=keep)


def promote_spec(recipe: Recipe) -> PromoteSpec | None:
    """The recipe's [promote] table (None when it has none), validated like the rest of the recipe."""
    try:
        text = recipe.path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(recipe.path, "promote", f"cannot read it again: {exc}") from None
    return _load_promote(_Ctx(recipe.path, text), data)


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class RecipeBook:
    """Where recipes live: <root>/images/<name>/ and <root>/scripts/common/."""

    root: Path

    @property
    def images_dir(self) -> Path:
        return self.root.resolve() / "images"

    @property
    def common_dir(self) -> Path:
        return self.root.resolve() / "scripts" / "common"

    def names(self) -> list[str]:
        if not self.images_dir.is_dir():
            return []
        return sorted(p.name for p in self.images_dir.iterdir() if (p / "image.toml").is_file())

    def load(self, name: str) -> Recipe:
        folder = self.images_dir / name
        if not (folder / "image.toml").is_file():
            known = ", ".join(self.names()) or "none"
            raise RecipeError(folder / "image.toml", "", f"no recipe named {name!r}", f"known recipes: {known}")
        return load_recipe(folder, self.common_dir)


def find_root(start: Path | None = None) -> Path:
    """The nearest directory at or above start that holds an images/ folder."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "images").is_dir():
            return candidate
    raise RecipeError(here, "", "no images/ folder here or above",
                      "run kickgate inside a recipe repository or pass --root")
