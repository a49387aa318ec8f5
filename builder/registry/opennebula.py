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

Credentials are wrapped in :class:`Secret` and scrubbed from every message this module produces,
including the text of pyone/xmlrpc/socket exceptions it wraps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
import xmlrpc.client
from collections.abc import Mapping
from dataclasses import dataclass, field
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
from builder.registry.base import Registered, Registration

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
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "image"
    ext = re.sub(r"[^A-Za-z0-9]", "", fmt) or "img"
    return f"{safe}-{sha256[:12]}.{ext}"


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
        uid=int(obj.UID if obj.UID is not None else -1), datastore=str(obj.DATASTORE or ""),
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
        family = [i for i in mine if i.name == reg.name or _version_of(i.name, reg.name)]

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
                while f"{reg.name}-v{n}" in taken:
                    n += 1
                target = f"{reg.name}-v{n}"
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
        try:
            pdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryError(f"cannot create the OpenNebula publish dir {pdir}: "
                                f"{e.strerror or e}") from None
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

    def _registered(self, img: _Image, reused: bool) -> Registered:
        attrs = dict(img.template)
        attrs["STATE"] = img.state_name
        if img.format:
            attrs.setdefault("FORMAT", img.format)
        if img.datastore:
            attrs.setdefault("DATASTORE", img.datastore)
        return Registered(registry=self.kind, name=img.name, version=str(img.id),
                          location=f"{self._ep}#image/{img.id}", sha256=img.sha256,
                          reused=reused, attributes=attrs,
                          details={"id": img.id, "name": img.name, "state": img.state_name,
                                   "template": dict(img.template)})

    # -- list -----------------------------------------------------------------------------------
    def list(self) -> list[Registered]:
        pool = self._call("imagepool.info", -1, -1, -1)
        images = [_to_image(i) for i in pool.IMAGE or []]
        return [self._registered(i, reused=False) for i in images
                if "KICKGATE_VERSION" in i.template]

    def get(self, name: str, version: str = "latest") -> Registered:
        """name (or one of its versioned names, name-vN) at an image ID, or the newest of them."""
        family = [e for e in self.list() if e.name == name or _version_of(e.name, name)]
        if version != "latest":
            family = [e for e in family if e.version == version]
        if not family:
            at = "" if version == "latest" else f" with image ID {version}"
            raise RegistryError(f"no image {name}{at} registered by kickgate in OpenNebula at {self._ep}")
        return max(family, key=lambda e: int(e.version))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(text.split())


def _version_of(candidate: str, base: str) -> bool:
    return re.fullmatch(re.escape(base) + r"-v\d+", candidate) is not None


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
