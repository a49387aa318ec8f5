"""The OpenNebula registry: publish a verified image where oned can read it, register it with pyone.

What oned does with an image template (see docs/opennebula.md and oned's Image::insert):

- ``one.image.allocate(template, datastore_id)`` stats PATH at once (a missing or relative PATH
  fails the call), then leaves the image LOCKED while the datastore driver copies PATH; the image
  ends READY, or ERROR with the reason in TEMPLATE/ERROR (a PATH outside the datastore's
  SAFE_DIRS is refused there). So the bytes are first published into ``publish_dir``, which must
  be readable by the front-end at the same path and listed in the datastore's SAFE_DIRS.
- oned *consumes* some template keys instead of keeping them in TEMPLATE: NAME, TYPE, PATH,
  FORMAT, SIZE, SOURCE, FS, PERSISTENT, DRIVER, TM_MAD. Two of kickgate's provenance attributes
  collide with them and would be lost or break the call (SOURCE + PATH is refused: "PATH and
  SOURCE cannot be both set."), so they are stored as ``KICKGATE_SOURCE`` and ``KICKGATE_SIZE``.
- oned's template parser knows a single escape, ``\\"`` inside a double-quoted value; a backslash
  is otherwise kept literally (doubling it would store two). Values oned's ``KEY = "value"`` syntax
  cannot carry (a trailing backslash, ``]]>``) are sent in oned's XML template form instead.
- Visibility is not a template key: PUBLIC=YES becomes ``one.image.chmod`` with GROUP_U and
  OTHER_U set.

Trust: the publish directory must belong to this user or root and be writable by nobody else
(between kickgate's checksum and oned's copy nobody else may swap the bytes); kickgate creates it
0755. The published copy is removed once oned reports READY (oned then works from its own SOURCE)
and on every failure path. Listings, lookups and promotions consider only images owned by the
authenticated user (or the owner named by ``--one-owner``): an image of another member of the
group carrying KICKGATE_VERSION is not kickgate's to trust.

Versions: a new version of NAME is registered as NAME-v2, NAME-v3… (name policy ``version``) and
carries ``KICKGATE_IMAGE = NAME``, so it stays in NAME's family whatever it is renamed to.
Promotion to VM templates lives in ``registry/onepromote.py``.

Credentials are wrapped in :class:`Secret` and scrubbed from every message this module produces,
including the text of pyone/xmlrpc/socket exceptions it wraps.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import re
import stat
import time
import uuid
import xmlrpc.client
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit, urlunsplit
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape as xml_escape

import pyone
import requests
from pyone.server_xrpc import RequestsTransport

from builder.errors import IntegrityError, RegistryError
from builder.fsutil import atomic_copy
from builder.registry import onepromote
from builder.registry.base import PromoteTargets, Promotion, Registered, Registration, TemplateChange
from builder.versions import LATEST, PROMOTED, one_base, one_name, one_version, parse_version

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://localhost:2633/RPC2"
DEFAULT_PUBLISH_DIR = Path("/var/tmp/kickgate")  # the stock SAFE_DIRS is /var/tmp
NamePolicy = Literal["version", "fail", "replace"]
NAME_POLICIES: tuple[str, ...] = ("version", "fail", "replace")

# Image states (include/Image.h)
STATE_NAMES = {0: "INIT", 1: "READY", 2: "USED", 3: "DISABLED", 4: "LOCKED", 5: "ERROR",
               6: "CLONE", 7: "DELETE", 8: "USED_PERS", 9: "LOCKED_USED",
               10: "LOCKED_USED_PERS"}
_PENDING = {0, 4}  # INIT, LOCKED: the datastore is still copying
_AVAILABLE = {1, 2, 8}  # READY, and READY but in use by VMs
_IN_USE = {2, 8, 9, 10}  # USED, USED_PERS, LOCKED_USED, LOCKED_USED_PERS: oned refuses to delete or disable
# Datastore types and states

# Template keys oned takes out of TEMPLATE (Image::insert); provenance keys colliding with them
# are renamed. NAME, TYPE, PATH, FORMAT are set by us; PERSISTENT, DRIVER, DEV_PREFIX are real
# image settings a recipe may choose and pass through unchanged.
_RENAMED_KEYS = {"SIZE", "SOURCE", "FS", "TM_MAD", "PATH"}
_OWN_KEYS = {"NAME", "TYPE", "PATH", "FORMAT", "DEV_PREFIX", "DESCRIPTION", "PUBLIC", "SHA256"}
_KEY_RE = re.compile(r"[A-Z][A-Z0-9_]*")
_ONED_TIMESTAMP = re.compile(r"^\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} : ")
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


# ---------------------------------------------------------------------------------------------
# Credentials and configuration
# ---------------------------------------------------------------------------------------------
class Secret:
    """A credential that never shows itself in repr/str/format."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("Secret is not picklable")


def _parse_credentials(text: str) -> Secret | None:
    """``user:password`` (one line, both parts non-empty) or None."""
    line = text.strip()
    if "\n" in line or "\r" in line:
        return None
    user, sep, password = line.partition(":")
    if not sep or not user.strip() or not password:
        return None
    return Secret(line)


def read_auth_file(path: str | os.PathLike[str]) -> Secret:
    """Read an ONE_AUTH style file (``user:password``). Errors name the file, never its content."""
    p = Path(path).expanduser()
    fix = ("put one line 'user:password' in it (chmod 600), point ONE_AUTH at the right file, "
           "or pass --one-auth")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(f"OpenNebula credentials file {p} does not exist: {fix}") from None
    except IsADirectoryError:
        raise RegistryError(f"OpenNebula credentials file {p} is a directory: {fix}") from None
    except PermissionError:
        raise RegistryError(f"cannot read OpenNebula credentials file {p} (permission denied): "
                            "make it readable by this user, or point ONE_AUTH elsewhere") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise RegistryError(f"cannot read OpenNebula credentials file {p} ({reason}): "
                            f"{fix}") from None
    secret = _parse_credentials(text)
    if secret is None:
        raise RegistryError(f"OpenNebula credentials file {p} is malformed: expected a single "
                            "line 'user:password' with a non-empty user and password")
    with contextlib.suppress(OSError):
        mode = p.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("OpenNebula credentials file %s is accessible by other users "
                        "(mode %o): chmod 600 it", p, stat.S_IMODE(mode))
    return secret


def _display_endpoint(endpoint: str) -> str:
    """The endpoint without any user:password@ part."""
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        return endpoint
    if parts.username is None and parts.password is None:
        return endpoint
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class OpenNebulaConfig:
    """Where and how to register. ``credentials`` holds ``user:password`` and prints as ``***``."""

    endpoint: str
    credentials: Secret
    datastore: str | int = "default"
    publish_dir: Path = DEFAULT_PUBLISH_DIR
    name_policy: NamePolicy = "version"
    owner: str | None = None  # whose images to trust (name or UID); None: the authenticated user
    ready_timeout: float = 600.0
    poll_interval: float = 1.0
    request_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.credentials, Secret):
            raise TypeError("credentials must be a Secret (use OpenNebulaConfig.from_env)")
        if _parse_credentials(self.credentials.reveal()) is None:
            raise RegistryError("OpenNebula credentials must have the form 'user:password'")
        if self.name_policy not in NAME_POLICIES:
            raise RegistryError(f"unknown OpenNebula name policy {self.name_policy!r}: "
                                f"use one of {', '.join(NAME_POLICIES)}")
        for attr in ("ready_timeout", "poll_interval", "request_timeout"):
            if not getattr(self, attr) > 0:
                raise RegistryError(f"OpenNebula {attr} must be positive")
        if not self.endpoint.startswith(("http://", "https://")):
            raise RegistryError(f"OpenNebula endpoint {_display_endpoint(self.endpoint)!r} is "
                                "not an http(s) URL (expected e.g. http://host:2633/RPC2)")
        if _display_endpoint(self.endpoint) != self.endpoint:
            raise RegistryError(f"OpenNebula endpoint {_display_endpoint(self.endpoint)!r} must "
                                "not carry user:password@ (oned takes credentials from ONE_AUTH "
                                "or --one-auth only)")
        object.__setattr__(self, "publish_dir", Path(self.publish_dir))

    @property
    def user(self) -> str:
        return self.credentials.reveal().partition(":")[0]

    @property
    def display_endpoint(self) -> str:
        return _display_endpoint(self.endpoint)

    @property
    def trusted_owner(self) -> str:
        return self.owner or self.user

    @classmethod
    def from_env(
        cls,
        endpoint: str | None = None,
        auth: str | None = None,
        datastore: str | int | None = None,
        publish_dir: str | os.PathLike[str] | None = None,
        *,
        auth_file: str | os.PathLike[str] | None = None,
        name_policy: str | None = None,
        owner: str | None = None,
        ready_timeout: float | None = None,
        poll_interval: float | None = None,
        request_timeout: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> OpenNebulaConfig:
        """Build a config the way OpenNebula's own tools find their settings.

        endpoint: argument, else ``$ONE_XMLRPC``, else ``http://localhost:2633/RPC2``.
        credentials: ``auth`` ("user:password"; a value without ':' naming an existing file is
        read as a credentials file), else ``auth_file``, else the file named by ``$ONE_AUTH``,
        else ``~/.one/one_auth``.
        """
        env = os.environ if environ is None else environ
        ep = endpoint or env.get("ONE_XMLRPC") or DEFAULT_ENDPOINT
        secret: Secret
        if auth is not None:
            parsed = _parse_credentials(auth)
            if parsed is not None:
                secret = parsed
            elif ":" not in auth and Path(auth).expanduser().is_file():
                secret = read_auth_file(auth)
            else:
                raise RegistryError("OpenNebula credentials given on the command line are "
                                    "malformed: expected 'user:password' or a credentials file")
        else:
            if auth_file is not None:
                path = Path(auth_file)
            elif env.get("ONE_AUTH"):
                path = Path(env["ONE_AUTH"])
            else:
                path = Path(env.get("HOME") or Path.home()) / ".one" / "one_auth"
            secret = read_auth_file(path)
        policy = name_policy or "version"
        if policy not in NAME_POLICIES:
            raise RegistryError(f"unknown OpenNebula name policy {policy!r}: "
                                f"use one of {', '.join(NAME_POLICIES)}")
        ds: str | int = "default" if datastore is None else datastore
        return cls(
            endpoint=ep,
            credentials=secret,
            datastore=ds,
            publish_dir=Path(publish_dir) if publish_dir is not None else DEFAULT_PUBLISH_DIR,
            name_policy=cast(NamePolicy, policy),
            owner=owner.strip() if owner and owner.strip() else None,
            ready_timeout=600.0 if ready_timeout is None else ready_timeout,
            poll_interval=1.0 if poll_interval is None else poll_interval,
            request_timeout=60.0 if request_timeout is None else request_timeout,
        )


# ---------------------------------------------------------------------------------------------
# Template text
# ---------------------------------------------------------------------------------------------
def _oned_value_ok(value: str) -> bool:
    """Can oned's ``KEY = "value"`` syntax carry value unchanged?"""
    return not value.endswith("\\") and "]]>" not in value


def _escape_quotes(value: str) -> str:
    """oned unescapes only \\" (template_syntax.y); backslashes must not be doubled."""
    return value.replace('"', '\\"')


def render_template(items: list[tuple[str, str]]) -> str:
    """oned template text: ``KEY = "value"`` lines, or the XML form when a value needs it."""
    if all(_oned_value_ok(v) for _, v in items):
        return "".join(f'{k} = "{_escape_quotes(v)}"\n' for k, v in items)
    return "<TEMPLATE>" + "".join(f"<{k}>{xml_escape(v)}</{k}>" for k, v in items) + "</TEMPLATE>"


def template_items(reg: Registration, name: str, path: Path) -> list[tuple[str, str]]:
    """The image template for reg, in order, with oned-reserved provenance keys renamed."""
    items: list[tuple[str, str]] = [
        ("NAME", name),
        ("TYPE", (reg.attr("TYPE") or "OS").upper()),
        ("PATH", str(path)),
        ("FORMAT", reg.format),
        ("DEV_PREFIX", reg.attr("DEV_PREFIX") or "vd"),
        ("DESCRIPTION", reg.attr("DESCRIPTION")),
        ("KICKGATE_IMAGE", reg.name),  # the family, whatever NAME-vN or parked name the image gets
    ]
    seen = {k for k, _ in items}
    sha_added = False
    for raw_key, value in reg.attributes:
        key = raw_key.strip().upper()
        if not _KEY_RE.fullmatch(key):
            raise RegistryError(f"image attribute {raw_key!r} of {reg.name} is not a valid "
                                "OpenNebula template key (letters, digits and '_', starting with "
                                "a letter)")
        if key == "SHA256":
            if value and value.lower() != reg.sha256.lower():
                raise RegistryError(f"image {reg.name}: attribute SHA256 {value} does not match "
                                    f"the image's sha256 {reg.sha256}")
            value = reg.sha256
            sha_added = True
        elif key in _OWN_KEYS:
            continue
        if key in _RENAMED_KEYS:
            key = "KICKGATE_" + key
        if key in seen:
            continue
        seen.add(key)
        items.append((key, value))
    if not sha_added:
        items.append(("SHA256", reg.sha256))
    return items


def _publish_filename(name: str, sha256: str, fmt: str) -> str:
    """Unique per registration: a concurrent run failing must never remove the file oned is copying for another."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "image"
    ext = re.sub(r"[^A-Za-z0-9]", "", fmt) or "img"
    return f"{safe}-{sha256[:12]}-{uuid.uuid4().hex[:8]}.{ext}"


def check_publish_dir(pdir: Path) -> None:
    """Create pdir 0755, or make sure nobody but this user or root can change what is published in it.

    Between kickgate's checksum of the published copy and oned's copy into the datastore, anyone
    who can write the directory could swap the bytes oned registers.
    """
    me = os.geteuid()
    fix = (f"use a directory owned by this user (uid {me}) or root with mode 0755 "
           f"(chown {me} {pdir} && chmod 755 {pdir}), or let kickgate create it by naming a new one "
           "with --one-publish-dir")
    try:
        pdir.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(pdir, 0o755)
        os.chmod(pdir, 0o755)  # mkdir's mode is filtered by the umask
        log.info("created the OpenNebula publish dir %s (0755)", pdir)
        return
    except FileExistsError:
        pass
    except OSError as e:
        raise RegistryError(f"cannot create the OpenNebula publish dir {pdir}: {e.strerror or e}") from None
    try:
        link = os.lstat(pdir)
        st = os.stat(pdir)
    except OSError as e:
        raise RegistryError(f"cannot check the OpenNebula publish dir {pdir}: {e.strerror or e}") from None
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (0, me):
        raise RegistryError(f"OpenNebula publish dir {pdir} is a symbolic link owned by uid {link.st_uid}, "
                            f"who could point it elsewhere: {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise RegistryError(f"OpenNebula publish dir {pdir} is not a directory: {fix}")
    if st.st_uid not in (0, me):
        raise RegistryError(f"OpenNebula publish dir {pdir} belongs to uid {st.st_uid}, not to this user or "
                            f"root: its owner could swap an image between kickgate's checksum and oned's copy; {fix}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RegistryError(f"OpenNebula publish dir {pdir} is writable by its group or others "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}): anyone who can write it could swap an image "
                            f"between kickgate's checksum and oned's copy; chmod go-w {pdir}, or {fix}")


def _restricted(path: Path, template: Mapping[str, str]) -> bool | None:
    """datastore/libfs.sh check_restricted on the datastore's template; None when unknown."""
    safe = template.get("SAFE_DIRS")
    restricted = template.get("RESTRICTED_DIRS")
    if safe is None and restricted is None:
        return None
    real = os.path.realpath(path)
    if any(real.startswith(s) for s in (safe or "").split()):
        return False
    return any(real.startswith(r) for r in (restricted or "").split())


# ---------------------------------------------------------------------------------------------
# pyone plumbing
# ---------------------------------------------------------------------------------------------
class _TimeoutTransport(RequestsTransport):  # type: ignore[misc]
    """pyone's requests transport with a per-request timeout.

    ``OneServer(timeout=...)`` would call socket.setdefaulttimeout() for the whole process."""

    def __init__(self, timeout: float, https: bool) -> None:
        super().__init__()
        self.set_https(https)
        self.set_https_verify(True)
        self._timeout = timeout

    def request(self, host: str, handler: str, request_body: bytes,
                verbose: bool = False) -> Any:
        url = self._build_url(host, handler)
        resp = requests.post(url, data=request_body, headers=self.headers,
                             verify=self.https_verify, timeout=self._timeout)
        try:
            resp.raise_for_status()
        except requests.RequestException as e:
            raise xmlrpc.client.ProtocolError(url, resp.status_code, resp.reason or str(e),
                                              dict(resp.headers)) from None
        return self.parse_response(resp)


class _OneCallError(RegistryError):
    """oned answered a call with an error (already scrubbed, one line)."""

    def __init__(self, message: str, kind: str, one_message: str) -> None:
        super().__init__(message)
        self.kind = kind  # pyone exception class name, e.g. "OneNoExistsException"
        self.one_message = one_message


@dataclass
class _Image:
    """The parts of a pyone IMAGE kickgate looks at."""

    id: int
    name: str
    state: int
    uid: int
    uname: str
    datastore: str
    datastore_id: int
    format: str
    running_vms: int
    perms: tuple[int, ...]
    template: dict[str, str] = field(default_factory=dict)

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, str(self.state))

    @property
    def sha256(self) -> str:
        return self.template.get("SHA256", "")

    @property
    def family(self) -> str:
        """The kickgate image NAME this image is a version of."""
        return self.template.get("KICKGATE_IMAGE") or one_base(self.name)

    @property
    def version(self) -> int | None:
        return one_version(self.name, self.family)

    @property
    def label(self) -> str:
        return f"image {self.id}, {self.name}"


def _template_dict(raw: Any) -> dict[str, str]:
    """pyone exposes TEMPLATE as an OrderedDict of str (vectors: nested dicts; repeats: lists)."""
    out: dict[str, str] = {}
    if not isinstance(raw, Mapping):
        return out
    for k, v in raw.items():
        if isinstance(v, str):
            out[str(k)] = v
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            out[str(k)] = str(v[0])
    return out


def _to_image(obj: Any) -> _Image:
    p = obj.PERMISSIONS
    perms = tuple(int(getattr(p, n) or 0) for n in (
        "OWNER_U", "OWNER_M", "OWNER_A", "GROUP_U", "GROUP_M", "GROUP_A",
        "OTHER_U", "OTHER_M", "OTHER_A")) if p is not None else (0,) * 9
    return _Image(
        id=int(obj.ID), name=str(obj.NAME or ""), state=int(obj.STATE or 0),
        uid=int(obj.UID if obj.UID is not None else -1), uname=str(obj.UNAME or ""),
        datastore=str(obj.DATASTORE or ""),
        datastore_id=int(obj.DATASTORE_ID if obj.DATASTORE_ID is not None else -1),
        format=str(obj.FORMAT or ""), running_vms=int(obj.RUNNING_VMS or 0), perms=perms,
        template=_template_dict(obj.TEMPLATE),
    )


@dataclass
class _Datastore:
    id: int
    name: str
    type: int
    state: int
    free_mb: int
    template: dict[str, str]

    def label(self) -> str:
        return f"{self.name} (ID {self.id})"


@dataclass
class _VMTemplate:
    id: int
    name: str
    uid: int
    uname: str
    raw: Any  # TEMPLATE as pyone parsed it, compared whole to notice changes


def _to_vmtemplate(obj: Any) -> _VMTemplate:
    return _VMTemplate(id=int(obj.ID), name=str(obj.NAME or ""), uid=int(obj.UID if obj.UID is not None else -1),
                       uname=str(obj.UNAME or ""), raw=obj.TEMPLATE)


_Images = list[_Image]
_Templates = list[_VMTemplate]
_Changes = list[TemplateChange]


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------
class OpenNebulaRegistry:
    """Registers verified images into an OpenNebula image datastore through pyone."""

    kind = "opennebula"

    def __init__(self, config: OpenNebulaConfig) -> None:
        self.config = config
        self._server: Any = None

    def __repr__(self) -> str:
        return f"OpenNebulaRegistry(endpoint={self.config.display_endpoint!r}, " \
               f"user={self.config.user!r}, datastore={self.config.datastore!r})"

    # -- plumbing -----------------------------------------------------------------------------
    @property
    def _ep(self) -> str:
        return self.config.display_endpoint

    def _scrub(self, text: str) -> str:
        session = self.config.credentials.reveal()
        password = session.partition(":")[2]
        text = text.replace(session, "***")
        if len(password) >= 4:
            text = text.replace(password, "***")
        if self.config.endpoint != self._ep:
            text = text.replace(self.config.endpoint, self._ep)
        return text

    def _client(self) -> Any:
        if self._server is None:
            server = pyone.OneServer(self.config.endpoint, session=self.config.credentials.reveal())
            if hasattr(server, "_ServerProxy__transport"):
                server._ServerProxy__transport = _TimeoutTransport(
                    self.config.request_timeout, self.config.endpoint.startswith("https"))
            self._server = server
        return self._server

    def _network_reason(self, e: BaseException) -> str:
        if isinstance(e, requests.Timeout | TimeoutError):
            return f"no answer within {self.config.request_timeout:g}s"
        if isinstance(e, xmlrpc.client.ProtocolError):
            reason = re.sub(r"^\d+\s+", "", str(e.errmsg).split(" for url:")[0]).strip()
            status = f"HTTP {e.errcode} {reason}".strip()
            return f"{status} (is this oned's XML-RPC endpoint, usually http://host:2633/RPC2?)"
        if isinstance(e, ExpatError):
            return "the answer is not XML-RPC (is this oned's XML-RPC endpoint?)"
        chain: BaseException | None = e
        while chain is not None:
            if isinstance(chain, ConnectionRefusedError):
                return "connection refused (is oned running and listening there?)"
            chain = chain.__cause__ or chain.__context__
        m = _ERRNO_TEXT.search(str(e))
        if m:
            return m.group(1).strip().rstrip(".")
        text = _one_line(self._scrub(str(e)))
        return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__

    def _call(self, method: str, *args: Any) -> Any:
        """Call one.<method>; every failure becomes a one-line, scrubbed RegistryError."""
        try:
            target = self._client()
            for part in method.split("."):
                target = getattr(target, part)
            return target(*args)
        except pyone.OneAuthenticationException:
            raise RegistryError(
                f"OpenNebula at {self._ep} rejected the credentials of user {self.config.user} "
                "(check ONE_AUTH / --one-auth)") from None
        except pyone.OneException as e:
            kind = type(e).__name__
            msg = _one_line(self._scrub(str(e)))
            if isinstance(e, pyone.OneAuthorizationException):
                text = (f"OpenNebula at {self._ep} did not authorize user {self.config.user} "
                        f"for one.{method}: {msg}")
            else:
                text = f"OpenNebula at {self._ep} refused one.{method}: {msg}"
            raise _OneCallError(text, kind, msg) from None
        except (OSError, xmlrpc.client.ProtocolError, ExpatError) as e:
            raise RegistryError(f"cannot reach OpenNebula at {self._ep}: "
                                f"{self._network_reason(e)}") from None
        except RegistryError:
            raise
        except Exception as e:  # pyone binding/parse errors and the like: still one clear line
            raise RegistryError(f"unexpected answer from OpenNebula at {self._ep} to one.{method}: "
                                f"{type(e).__name__}: {_one_line(self._scrub(str(e)))[:300]}") \
                from None

    # -- datastores and images ------------------------------------------------------------------
    def _datastores(self) -> list[_Datastore]:
        pool = self._call("datastorepool.info")
        out = []
        for d in pool.DATASTORE or []:
            out.append(_Datastore(id=int(d.ID), name=str(d.NAME or ""), type=int(d.TYPE or 0),
                                  state=int(d.STATE or 0), free_mb=int(d.FREE_MB or 0),
                                  template=_template_dict(d.TEMPLATE)))
        return out

    def _resolve_datastore(self) -> _Datastore:
        want = self.config.datastore
        dss = self._datastores()
        image_dss = [d for d in dss if d.type == 0]
        available = ", ".join(d.label() for d in image_dss) or "none visible to this user"
        want_id: int | None = None
        if isinstance(want, int):
            want_id = want
        elif want.strip().isdigit():
            want_id = int(want.strip())
        found = [d for d in dss if d.id == want_id] if want_id is not None else [d for d in dss if d.name == want]
        if not found:
            raise RegistryError(f"OpenNebula at {self._ep} has no datastore {want!r} visible to "
                                f"user {self.config.user}; image datastores: {available}")
        ds = found[0]
        if ds.type != 0:
            kind = {1: "a SYSTEM datastore (disks of running VMs)",
                    2: "a FILES datastore (kernels and context files)"}.get(ds.type, "not an "
                                                                              "image datastore")
            raise RegistryError(f"OpenNebula datastore {ds.label()} is {kind}; images go to an "
                                f"image datastore: {available}")
        if ds.state == 1:
            raise RegistryError(f"OpenNebula datastore {ds.label()} is disabled: enable it "
                                f"(onedatastore enable {ds.id}) or choose another one: "
                                f"{available}")
        return ds

    def _my_images(self) -> list[_Image]:
        pool = self._call("imagepool.info", -3, -1, -1)
        return [_to_image(i) for i in pool.IMAGE or []]

    def _trusted_images(self) -> list[_Image]:
        """kickgate's images owned by the trusted owner: the authenticated user, or --one-owner."""
        owner = self.config.owner
        if owner is None:
            images = self._my_images()
        else:
            pool = self._call("imagepool.info", -2, -1, -1)
            images = [i for i in (_to_image(x) for x in pool.IMAGE or [])
                      if i.uname == owner or (owner.isdigit() and i.uid == int(owner))]
        return [i for i in images if "KICKGATE_VERSION" in i.template and i.state != 7]

    def _family(self, name: str) -> list[_Image]:
        """Every trusted version of the kickgate image name, by ID."""
        return sorted((i for i in self._trusted_images() if i.family == name), key=lambda i: i.id)

    def _info(self, image_id: int) -> _Image:
        return _to_image(self._call("image.info", image_id))

    def _delete_quietly(self, image_id: int, why: str) -> None:
        try:
            self._call("image.delete", image_id)
            log.info("deleted OpenNebula image %d (%s)", image_id, why)
        except RegistryError as e:
            log.error("could not delete OpenNebula image %d (%s): %s; delete it by hand "
                      "(oneimage delete %d)", image_id, why, e, image_id)

    def _wait_gone(self, image_id: int, timeout: float) -> bool:
        """Wait until oned's rm driver dropped the image (its NAME stays taken until then)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._info(image_id)
            except _OneCallError as e:
                if e.kind == "OneNoExistsException":
                    return True
                raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(self.config.poll_interval, 0.5))

    # -- register -------------------------------------------------------------------------------
    def register(self, reg: Registration) -> Registered:
        if not reg.name.strip() or any(c in reg.name for c in "\n\r\t"):
            raise RegistryError(f"invalid OpenNebula image name {reg.name!r}")
        ds = self._resolve_datastore()
        mine = self._my_images()
        family = [i for i in mine if one_version(i.name, reg.name) is not None]

        gone: set[int] = set()
        reused = self._try_reuse(reg, family, gone)
        if reused is not None:
            return reused
        for i in mine:  # a same-named image on its way out still holds the NAME in oned
            if i.name == reg.name and i.state == 7 and self._wait_gone(i.id, 30.0):
                gone.add(i.id)
        mine = [i for i in mine if i.id not in gone]

        existing = next((i for i in mine if i.name == reg.name and i.state != 7), None)
        taken = {i.name for i in mine}
        replacing: _Image | None = None
        target = reg.name
        if existing is not None:
            what = (f"image {reg.name} already exists in OpenNebula as image {existing.id} "
                    f"(state {existing.state_name}, SHA256 {existing.sha256[:12] or 'unknown'}) "
                    f"with other bytes than {reg.sha256[:12]}")
            policy = self.config.name_policy
            if policy == "fail":
                raise RegistryError(f"{what}; change NAME in the recipe, delete the old image "
                                    f"(oneimage delete {existing.id}), or choose the name policy "
                                    "'version' (register as NAME-vN) or 'replace'")
            if policy == "version":
                n = 2
                while one_name(reg.name, n) in taken:
                    n += 1
                target = one_name(reg.name, n)
                log.info("%s; registering the new one as %s (name policy 'version')", what, target)
            else:
                replacing = existing
                target = _free_name(f"{reg.name}-kickgate-new-{reg.sha256[:12]}", taken)
                log.info("%s; registering the new one as %s, then swapping names "
                         "(name policy 'replace')", what, target)

        final_name = replacing.name if replacing is not None else target
        published = self.config.publish_dir / _publish_filename(final_name, reg.sha256,
                                                                reg.format)
        items = template_items(reg, target, published)  # validates before anything is written
        if _restricted(published, ds.template):
            log.warning("publish dir %s is not in SAFE_DIRS of OpenNebula datastore %s "
                        "(SAFE_DIRS=%r, RESTRICTED_DIRS=%r): oned will refuse to copy it",
                        self.config.publish_dir, ds.label(), ds.template.get("SAFE_DIRS", ""),
                        ds.template.get("RESTRICTED_DIRS", ""))
        self._publish(reg, published)
        image_id: int | None = None
        parked: tuple[int, str] | None = None  # (id, original name) of a replaced image
        done = False
        try:
            image_id = self._allocate(items, ds, target, published)
            log.info("allocated OpenNebula image %d (%s) in datastore %s", image_id, target,
                     ds.label())
            if reg.public:
                self._call("image.chmod", image_id, -1, -1, -1, 1, -1, -1, 1, -1, -1)
                log.info("image %d: use granted to group and others (PUBLIC)", image_id)
            img = self._wait_ready(image_id, target, ds, published)
            # READY: oned copied PATH into the datastore and works from its SOURCE from now on
            _unlink_quietly(published)
            if replacing is not None:
                parked = self._swap(replacing, image_id, taken)
                img = self._info(image_id)
            done = True
        finally:
            if not done:
                if parked is not None:
                    self._restore_parked(*parked)
                if image_id is not None:
                    self._delete_quietly(image_id, "registration did not complete")
                _unlink_quietly(published)
        if parked is not None:
            self._retire(parked[0], img.name)
        log.info("registered %s as OpenNebula image %d in datastore %s (%s)", img.name, img.id,
                 ds.label(), img.state_name)
        return self._registered(img, reused=False)

    def _try_reuse(self, reg: Registration, family: list[_Image],
                   gone: set[int]) -> Registered | None:
        """Reuse an image of the family holding reg's bytes; add leftovers deleted to gone."""
        same = [i for i in family if i.sha256.lower() == reg.sha256.lower() and i.state != 7]
        same.sort(key=lambda i: (i.name != reg.name, i.id))
        for img in same:
            if img.state in _AVAILABLE:
                log.info("OpenNebula image %d (%s) already holds sha256 %s: reusing it", img.id,
                         img.name, reg.sha256[:12])
                if reg.public and not (img.perms[3] and img.perms[6]):
                    self._call("image.chmod", img.id, -1, -1, -1, 1, -1, -1, 1, -1, -1)
                return self._registered(img, reused=True)
            if img.state in _PENDING:
                log.info("OpenNebula image %d (%s) with the same bytes is still %s (another "
                         "run?): waiting for it", img.id, img.name, img.state_name)
                ready = self._wait_state(img.id, img.name)
                if ready.state in _AVAILABLE:
                    return self._registered(ready, reused=True)
                raise RegistryError(f"OpenNebula image {img.id} ({img.name}) with the same bytes "
                                    f"is {ready.state_name} (waited up to "
                                    f"{self.config.ready_timeout:g}s); delete it (oneimage delete "
                                    f"{img.id}) and run again")
            if img.state == 5 and "KICKGATE_VERSION" in img.template:
                log.warning("OpenNebula image %d (%s) with the same bytes is in ERROR from an "
                            "earlier run: deleting it", img.id, img.name)
                self._call("image.delete", img.id)
                if self._wait_gone(img.id, max(30.0, self.config.poll_interval * 10)):
                    gone.add(img.id)
                continue
            raise RegistryError(f"OpenNebula image {img.id} ({img.name}) already holds these "
                                f"bytes but is {img.state_name}: enable it (oneimage enable "
                                f"{img.id}) or delete it (oneimage delete {img.id}), then run "
                                "again")
        return None

    def _allocate(self, items: list[tuple[str, str]], ds: _Datastore, name: str,
                  published: Path) -> int:
        try:
            return int(self._call("image.allocate", render_template(items), ds.id))
        except _OneCallError as e:
            msg = e.one_message
            if "Not enough space in datastore" in msg:
                raise RegistryError(
                    f"OpenNebula datastore {ds.label()} has not enough free space for {name} "
                    f"({ds.free_mb} MB free): free some space or choose another datastore "
                    "(right after oned starts it reports no space until its first datastore "
                    "monitoring, about 12 s: then just retry)") from None
            if "Cannot parse image SIZE" in msg or "Cannot determine" in msg:
                raise RegistryError(
                    f"OpenNebula could not read the published image {published} ({msg}): the "
                    "publish dir must be readable by oned on the front-end at the same path") \
                    from None
            if "already taken" in msg:
                raise RegistryError(f"image name {name} was taken in OpenNebula meanwhile "
                                    f"({msg}): run again") from None
            if e.kind == "OneNoExistsException":
                raise RegistryError(f"OpenNebula datastore {ds.label()} vanished: {msg}") from None
            raise RegistryError(f"OpenNebula refused to register {name} in datastore "
                                f"{ds.label()}: {msg}") from None

    def _wait_state(self, image_id: int, name: str) -> _Image:
        """Poll until the image leaves INIT/LOCKED or ready_timeout passes (returns it anyway)."""
        start = time.monotonic()
        next_report = start + 10.0
        while True:
            img = self._info(image_id)
            if img.state not in _PENDING:
                return img
            now = time.monotonic()
            waited = now - start
            if waited >= self.config.ready_timeout:
                return img
            if now >= next_report:
                log.info("OpenNebula image %d (%s) still %s after %.0fs (timeout %.0fs)",
                         image_id, name, img.state_name, waited, self.config.ready_timeout)
                next_report = now + 10.0
            else:
                log.debug("OpenNebula image %d (%s) %s", image_id, name, img.state_name)
            time.sleep(min(self.config.poll_interval,
                           max(0.0, self.config.ready_timeout - waited)))

    def _wait_ready(self, image_id: int, name: str, ds: _Datastore, published: Path) -> _Image:
        log.info("waiting for OpenNebula to copy image %d (%s) into datastore %s", image_id, name,
                 ds.label())
        img = self._wait_state(image_id, name)
        if img.state in _AVAILABLE:
            return img
        if img.state in _PENDING:
            raise RegistryError(
                f"OpenNebula image {image_id} ({name}) was still {img.state_name} after "
                f"{self.config.ready_timeout:g}s in datastore {ds.label()}; deleted it (raise the "
                "ready timeout if the datastore is just slow)")
        if img.state == 5:
            reason = _one_line(_ONED_TIMESTAMP.sub("", img.template.get("ERROR", ""))) or \
                "no reason given in TEMPLATE/ERROR"
            hint = ""
            if "RESTRICTED_DIRS" in reason or "SAFE_DIRS" in reason:
                safe = ds.template.get("SAFE_DIRS", "")
                hint = (f"; the publish dir {self.config.publish_dir} must be listed in SAFE_DIRS "
                        f"of datastore {ds.label()} (now SAFE_DIRS=\"{safe}\"; e.g. onedatastore "
                        f"update {ds.id}) or be under one of those dirs")
            raise RegistryError(f"OpenNebula could not copy image {name} (ID {image_id}) into "
                                f"datastore {ds.label()}: {self._scrub(reason)}{hint}")
        raise RegistryError(f"OpenNebula image {image_id} ({name}) ended {img.state_name} "
                            "instead of READY")

    def _swap(self, old: _Image, new_id: int, taken: set[str]) -> tuple[int, str]:
        """replace policy: park the old image's name, give its name to the new one."""
        parked_name = _free_name(f"{old.name}-replaced-{old.id}", taken)
        self._call("image.rename", old.id, parked_name)
        parked = (old.id, old.name)
        try:
            self._call("image.rename", new_id, old.name)
        except BaseException:
            self._restore_parked(*parked)
            raise
        log.info("image name %s now points to image %d (was image %d)", old.name, new_id, old.id)
        return parked

    def _restore_parked(self, image_id: int, name: str) -> None:
        try:
            self._call("image.rename", image_id, name)
        except RegistryError as e:
            log.error("could not give OpenNebula image %d its name %s back: %s; rename it by "
                      "hand (oneimage rename %d %s)", image_id, name, e, image_id, name)

    def _retire(self, old_id: int, name: str) -> None:
        try:
            self._call("image.delete", old_id)
            log.info("deleted the replaced OpenNebula image %d (old %s)", old_id, name)
        except RegistryError as e:
            log.warning("the replaced OpenNebula image %d (old %s) could not be deleted (%s); "
                        "it keeps its parked name: delete it once no VM uses it", old_id, name, e)

    def _publish(self, reg: Registration, dest: Path) -> None:
        """Copy the image atomically to dest (in publish_dir) and check the copy's sha256."""
        pdir = dest.parent
        check_publish_dir(pdir)
        try:
            # 0644: oned's user must be able to read it.
            atomic_copy(reg.image_path, dest, mode=0o644, expect_sha256=reg.sha256)
        except IntegrityError as e:
            what = "changed since it was verified" if e.path == str(reg.image_path) else "was corrupted on publishing"
            raise RegistryError(f"{e.path} {what}: sha256 {e.actual}, expected {e.expected}") from None
        except OSError as e:
            raise RegistryError(f"cannot publish {reg.image_path} to {pdir}: "
                                f"{e.strerror or e}") from None
        log.info("published %s to %s (sha256 %s verified)", reg.image_path, dest, reg.sha256[:12])

    def _registered(self, img: _Image, reused: bool, promoted: bool = False) -> Registered:
        attrs = dict(img.template)
        attrs["STATE"] = img.state_name
        if img.format:
            attrs.setdefault("FORMAT", img.format)
        if img.datastore:
            attrs.setdefault("DATASTORE", img.datastore)
        version = img.version
        return Registered(registry=self.kind, name=img.name, version=str(version) if version else "",
                          location=f"{self._ep}#image/{img.id}", sha256=img.sha256,
                          reused=reused, attributes=attrs,
                          details={"id": img.id, "name": img.name, "family": img.family,
                                   "version": version, "owner": img.uname, "state": img.state_name,
                                   "promoted": promoted, "template": dict(img.template)},
                          image_id=img.id, promoted=promoted)

    # -- list -----------------------------------------------------------------------------------
    def list(self) -> list[Registered]:
        """kickgate's images owned by the trusted owner, by family then ID."""
        images = self._trusted_images()
        families: dict[str, list[_Image]] = {}
        for i in images:
            families.setdefault(i.family, []).append(i)
        out: list[Registered] = []
        for name in sorted(families):
            members = sorted(families[name], key=lambda i: i.id)
            current = onepromote.current_promoted(members)
            out += [self._registered(i, reused=False, promoted=i is current) for i in members]
        return out

    def get(self, name: str, version: str = "latest") -> Registered:
        """A version of name: latest, promoted, N or vN (NAME-vN), id:N, or a bare N meaning either when
        unambiguous. A name that is itself a versioned image name (generic-dev-v3) finds that image."""
        ref = parse_version(version, name)
        family = self._family(name)
        if not family:
            family = [i for i in self._trusted_images() if i.name == name]
        where = f"in OpenNebula at {self._ep} owned by {self.config.trusted_owner}"
        if not family:
            raise RegistryError(f"no image {name} registered by kickgate {where}")
        found = self._pick(name, ref.kind, ref.n, family)
        if found is None:
            have = ", ".join(i.label for i in family)
            raise RegistryError(f"{name} has no version {version} {where}; it has: {have}")
        current = onepromote.current_promoted(family)
        return self._registered(found, reused=False, promoted=found is current)

    def _pick(self, name: str, kind: str, n: int, family: builtins.list[_Image]) -> _Image | None:
        if kind == LATEST:
            return family[-1]
        if kind == PROMOTED:
            current = onepromote.current_promoted(family)
            if current is None:
                raise RegistryError(f"no version of {name} has been promoted in OpenNebula at {self._ep}")
            return next(i for i in family if i is current)
        by_version = [i for i in family if i.version == n]
        by_id = [i for i in family if i.id == n]
        if kind == "number":
            return by_version[-1] if by_version else None
        if kind == "id":
            return by_id[0] if by_id else None
        if by_version and by_id and by_version[-1] is not by_id[0]:
            raise RegistryError(f"{name}@{n} is ambiguous: version {n} is {by_version[-1].label} but image ID {n} "
                                f"is {by_id[0].label}; write {name}@v{n} for the version or {name}@id:{n} "
                                "for the image ID")
        found = by_version or by_id
        return found[-1] if found else None

    # -- promotion to VM templates ------------------------------------------------------------------
    def promote(self, entry: Registered, targets: PromoteTargets) -> Promotion:
        """Point the target templates' DISKs at entry's image, mark it promoted, then apply keep.

        Every step can be re-run: DISKs already pointing at it are left alone, the marks are set
        by merge, and the promoted version is read back from the marks (see registry/onepromote.py).
        """
        if entry.image_id is None:
            raise RegistryError(f"{entry.label} is not an OpenNebula image")
        first = self._info(entry.image_id)
        family = self._family(first.family)
        new = next((i for i in family if i.id == first.id), None)
        if new is None:
            raise RegistryError(f"{first.label} is not a kickgate image owned by {self.config.trusted_owner}: "
                                "kickgate promotes only images it trusts (see --one-owner)")
        if new.state not in _AVAILABLE:
            raise RegistryError(f"{new.label} is {new.state_name}: only a READY image can be promoted")
        current = onepromote.current_promoted(family)
        if current is new:  # a re-run: finish what an earlier run started
            previous = self._first_available(onepromote.history(new), family)
            chain = new.template.get(onepromote.PREVIOUS, "")
            promoted_at = new.template[onepromote.PROMOTED_AT]
        else:
            previous = cast("_Image | None", current)
            chain = onepromote.history_after(current, new.id)
            promoted_at = _now()
        changes = self._repoint(targets, family, new)
        self._mark(new, {onepromote.PROMOTED_AT: promoted_at, onepromote.PREVIOUS: chain,
                         onepromote.SUPERSEDED_BY: "", onepromote.ROLLED_BACK_AT: ""})
        if previous is not None and previous.template.get(onepromote.SUPERSEDED_BY) != str(new.id):
            # the previous version keeps serving the VMs that run from it; it is only marked
            self._mark(previous, {onepromote.SUPERSEDED_BY: str(new.id)})
        promotion = Promotion(registry=self.kind, promoted=new.label,
                              previous=previous.label if previous is not None else None, templates=tuple(changes))
        if promotion.complete and targets.keep is not None:
            deleted, kept = self._keep(family, targets.keep, protect={new.id})
            promotion = Promotion(registry=self.kind, promoted=new.label, previous=promotion.previous,
                                  templates=promotion.templates, deleted=tuple(deleted), kept=tuple(kept))
        log.info("%s", promotion.summary())
        return promotion

    def rollback(self, name: str, targets: PromoteTargets) -> Promotion:
        """Point the target templates back at the version promoted before the current one."""
        family = self._family(name)
        if not family:
            raise RegistryError(f"no image {name} registered by kickgate in OpenNebula at {self._ep} owned by "
                                f"{self.config.trusted_owner}")
        current = onepromote.current_promoted(family)
        if current is None:
            raise RegistryError(f"no version of {name} has been promoted in OpenNebula at {self._ep}: nothing to "
                                "roll back")
        cur = next(i for i in family if i is current)
        target = self._first_available(onepromote.history(cur), family)
        if target is None:
            raise RegistryError(f"{cur.label} is the only promoted version of {name} still available in OpenNebula "
                                f"at {self._ep}: nothing to roll back to")
        changes = self._repoint(targets, family, target)
        # Order matters for a re-run: while cur still carries PROMOTED_AT it stays the promoted one.
        marks = {onepromote.SUPERSEDED_BY: ""}
        if not target.template.get(onepromote.PROMOTED_AT):
            marks[onepromote.PROMOTED_AT] = _now()
        self._mark(target, marks)
        self._mark(cur, {onepromote.PROMOTED_AT: "", onepromote.ROLLED_BACK_AT: _now()})
        promotion = Promotion(registry=self.kind, promoted=target.label, previous=cur.label,
                              templates=tuple(changes))
        log.info("rolled back: %s", promotion.summary())
        return promotion

    def _first_available(self, ids: builtins.list[int], family: builtins.list[_Image]) -> _Image | None:
        by_id = {i.id: i for i in family}
        return next((by_id[i] for i in ids if i in by_id and by_id[i].state in _AVAILABLE), None)

    def _mark(self, img: _Image, attrs: dict[str, str]) -> None:
        self._call("image.update", img.id, render_template(list(attrs.items())), 1)

    def _templates(self) -> builtins.list[_VMTemplate]:
        pool = self._call("templatepool.info", -2, -1, -1)
        return [_to_vmtemplate(t) for t in pool.VMTEMPLATE or []]

    def _resolve_templates(self, targets: PromoteTargets, pool: _Templates) -> tuple[_Templates, _Changes]:
        """The templates named (strings: names, integers: IDs) or selected by attributes, each once."""
        chosen: dict[int, _VMTemplate] = {}
        problems: builtins.list[TemplateChange] = []
        user = self.config.user
        for want in targets.templates:
            if isinstance(want, int):
                found = [t for t in pool if t.id == want]
                what = f"template {want}"
            else:
                named = [t for t in pool if t.name == want]
                found = [t for t in named if t.uname == user] or named
                what = f"template {want!r}"
            if len(found) == 1:
                chosen.setdefault(found[0].id, found[0])
            elif not found:
                problems.append(TemplateChange(what, "failed", f"no VM template {want!r} visible to user {user}"))
            else:
                ids = ", ".join(str(t.id) for t in found)
                problems.append(TemplateChange(what, "failed", f"several VM templates are named {want!r} (IDs {ids}, "
                                                               "other owners): name it by ID in [promote] templates"))
        for t in pool:
            if onepromote.matches_select(t.raw, targets.select):
                chosen.setdefault(t.id, t)
        return list(chosen.values()), problems

    def _repoint(self, targets: PromoteTargets, family: _Images, to: _Image) -> _Changes:
        if not targets.templates and not targets.select:
            return []
        templates, changes = self._resolve_templates(targets, self._templates())
        others = [i for i in family if i.id != to.id]
        for t in templates:
            changes.append(self._repoint_one(t, others, to))
        return changes

    def _repoint_one(self, read: _VMTemplate, others: builtins.list[_Image], to: _Image) -> TemplateChange:
        label = f"{read.name} (template {read.id})"
        plan = onepromote.plan_disks(onepromote.disks_of(read.raw), others, to, read.uid)
        if not plan.changed:
            if plan.already:
                return TemplateChange(label, "unchanged", f"already uses {to.label}")
            return TemplateChange(label, "no-disk", f"no DISK uses a version of {to.family}; left alone")
        try:
            text = onepromote.render_disks(plan.disks)
        except ValueError as e:
            return TemplateChange(label, "failed", f"{e}; left alone")
        try:
            # oned has no compare-and-swap: re-read just before writing, so that a change made since
            # the plan was computed is noticed and not overwritten
            now = _to_vmtemplate(self._call("template.info", read.id))
            if (now.name, now.raw) != (read.name, read.raw):
                return TemplateChange(label, "conflict", "changed since kickgate read it, so it was not updated; "
                                                         "check it and run the promotion again")
            self._call("template.update", read.id, text, 1)  # merge: replaces every DISK, nothing else
        except RegistryError as e:
            return TemplateChange(label, "failed", str(e))
        moved = ", ".join(f"DISK {i} image {old} -> {to.id}" for i, old in plan.changed)
        log.info("VM template %s: %s", label, moved)
        return TemplateChange(label, "updated", moved)

    def _keep(self, family: _Images, keep: int, protect: set[int]) -> tuple[builtins.list[str], builtins.list[str]]:
        """Delete versions older than the newest keep ones, unless promoted, named by a VM template or in use."""
        newest = {i.id for i in family[-keep:]} if keep > 0 else set()
        old = [i for i in family if i.id not in newest and i.id not in protect]
        if not old:
            return [], []
        users: dict[int, builtins.list[str]] = {}
        for t in self._templates():
            for disk in onepromote.disks_of(t.raw):
                for img in old:
                    if onepromote.points_to(disk, img, t.uid):
                        users.setdefault(img.id, []).append(f"{t.name} (template {t.id})")
        deleted: builtins.list[str] = []
        kept: builtins.list[str] = []
        for img in old:
            if img.id in users:
                kept.append(f"{img.label}: VM template {', '.join(users[img.id])} uses it")
                continue
            fresh = self._info(img.id)
            if fresh.running_vms or fresh.state in _IN_USE:
                kept.append(f"{img.label}: {fresh.state_name}, {fresh.running_vms} VM(s) run from it")
                continue
            if fresh.state not in (1, 3, 5):  # READY, DISABLED, ERROR: the states oned deletes from
                kept.append(f"{img.label}: {fresh.state_name}")
                continue
            try:
                self._call("image.delete", img.id)
            except _OneCallError as e:  # e.g. a VM started meanwhile: oned refuses, and that is fine
                kept.append(f"{img.label}: {e.one_message}")
                continue
            deleted.append(img.label)
            log.info("deleted %s (keep = %d)", img.label, keep)
        for line in kept:
            log.info("kept %s", line)
        return deleted, kept


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(text.split())


def _now() -> str:
    """Promotion times compare as text: one format, to the microsecond."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _free_name(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name}-{n}" in taken:
        n += 1
    return f"{name}-{n}"


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not remove %s: %s", path, e.strerror or e)


__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_PUBLISH_DIR",
    "NAME_POLICIES",
    "STATE_NAMES",
    "NamePolicy",
    "OpenNebulaConfig",
    "OpenNebulaRegistry",
    "Secret",
    "read_auth_file",
    "render_template",
    "template_items",
]
