"""OneSim: a small, protocol-faithful stand-in for OpenNebula's ``oned`` XML-RPC API.

It speaks real XML-RPC over HTTP on 127.0.0.1 (path ``/RPC2``) so that the *unmodified* pyone
client can talk to it (``pyone.OneServer(sim.endpoint, session="user:pass")``). Replies are what
oned sends: ``[True, value, 0]`` on success and ``[False, message, code, object_id]`` on failure,
with oned's error codes (pyone maps 0x100 auth, 0x200 authorization, 0x400 no-exists, 0x800
action, 0x1000 api, 0x2000 internal; 0x4000 "allocate" errors become a plain ``OneException``).
Messages follow what a real oned 6.10.5 answered (see DESIGN.md section 4); where DESIGN does not
list one, the wording follows oned's sources (Request::failure_message) as closely as known.

XML bodies (IMAGE, IMAGE_POOL, DATASTORE, DATASTORE_POOL) are laid out like oned's
``Image::to_xml``/``Datastore::to_xml`` (element order of the XSD, integers as integers,
template values in CDATA), which is what pyone's generated bindings parse.

Templates are parsed like oned's flex/bison template parser: ``KEY = "value"`` lines where
only ``\\"`` is an escape (a backslash is otherwise literal), unquoted values,
``KEY = [ A = "1", B = "2" ]`` vector attributes, ``#`` comments; or the XML form
(``<TEMPLATE><KEY><![CDATA[v]]></KEY></TEMPLATE>``) that pyone produces from nested dicts.
Attribute names are upper-cased as oned's Attribute does.

Behaviour modelled for images: allocate checks the datastore (exists, not SYSTEM, enough free
space), stats PATH (must exist; a relative or missing PATH fails the call), enforces NAME
uniqueness per owner and leaves the image LOCKED; a timer thread then plays the datastore ``cp``
driver: PATH outside the datastore's SAFE_DIRS but under RESTRICTED_DIRS -> ERROR with
TEMPLATE/ERROR, otherwise the file really is copied under the sim's work dir and the image becomes
READY with SOURCE, SIZE (MiB) and FORMAT set. ``stuck=True`` keeps new images LOCKED forever.
Delete is asynchronous too (state DELETE, then gone after ``delete_delay``), like oned's rm driver.

Test knobs: users, datastores (type, SAFE_DIRS, RESTRICTED_DIRS, free MB, enabled), copy/delete
delays, stuck mode, and ``inject_failure(method, code, message)`` to make the next call(s) of a
method fail as oned would.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import re
import shutil
import socketserver
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape as _xml_escape
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

# --- oned error codes (include/Request.h) -----------------------------------------------------
SUCCESS = 0x0000
AUTHENTICATION = 0x0100
AUTHORIZATION = 0x0200
NO_EXISTS = 0x0400
ACTION = 0x0800
XML_RPC_API = 0x1000
INTERNAL = 0x2000
ALLOCATE = 0x4000
LOCKED_ERR = 0x8000

# --- image states and types (include/Image.h) -------------------------------------------------
INIT, READY, USED, DISABLED, LOCKED, ERROR, CLONE, DELETE, USED_PERS = range(9)
IMAGE_TYPES = {"OS": 0, "CDROM": 1, "DATABLOCK": 2, "KERNEL": 3, "RAMDISK": 4, "CONTEXT": 5,
               "BACKUP": 6}
FILE_TYPES = {"KERNEL", "RAMDISK", "CONTEXT"}
DS_TYPES = {"IMAGE": 0, "SYSTEM": 1, "FILE": 2}
DS_TYPE_STR = {"IMAGE": "IMAGE_DS", "SYSTEM": "SYSTEM_DS", "FILE": "FILE_DS"}

VERSION = "6.10.5"

TValue = str | dict[str, str]
Template = list[tuple[str, TValue]]


# ---------------------------------------------------------------------------------------------
# Configuration objects
# ---------------------------------------------------------------------------------------------
@dataclass
class SimUser:
    name: str
    password: str
    uid: int
    gid: int = 1
    gname: str = "users"


@dataclass
class SimDatastore:
    id: int
    name: str
    type: str = "IMAGE"  # IMAGE | SYSTEM | FILE
    safe_dirs: list[str] = field(default_factory=lambda: ["/var/tmp"])
    restricted_dirs: list[str] = field(default_factory=lambda: ["/"])
    free_mb: int = 100_000
    total_mb: int = 200_000
    enabled: bool = True
    uid: int = 0
    gid: int = 0
    # OWNER_U..OTHER_A; default lets every user USE it (what the stock ACLs amount to)
    perms: tuple[int, ...] = (1, 1, 0, 1, 0, 0, 1, 0, 0)
    ds_mad: str = "fs"
    tm_mad: str = "local"
    extra_template: dict[str, str] = field(default_factory=dict)


DEFAULT_USERS = (
    SimUser("oneadmin", "onepass", 0, 0, "oneadmin"),
    SimUser("kick", "kick-secret-pw", 2, 1, "users"),
)


def default_datastores() -> list[SimDatastore]:
    return [
        SimDatastore(0, "system", "SYSTEM", free_mb=100_000),
        SimDatastore(1, "default", "IMAGE"),
        SimDatastore(2, "files", "FILE"),
    ]


class OneError(Exception):
    """Internal: becomes a ``[False, message, code, id]`` reply."""

    def __init__(self, code: int, message: str, obj_id: int = -1) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.obj_id = obj_id


# ---------------------------------------------------------------------------------------------
# oned template syntax
# ---------------------------------------------------------------------------------------------
_INITIAL_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("COMMENT", re.compile(r"[ \t]*#[^\n]*(?:\n|\Z)")),
    ("BLANK", re.compile(r"[ \t\n]+")),
    ("VARIABLE", re.compile(r"[A-Za-z0-9_]+")),
    ("EQUAL", re.compile(r"[ \t]*=[ \t]*")),
    ("EQUAL_EMPTY", re.compile(r"[ \t]*=[ \t]*\n")),
    ("COMMA", re.compile(r"[ \t\n]*,[ \t\n]*")),
    ("CBRACKET", re.compile(r"[ \t\n]*\][ \t\n]*")),
]
_VALUE_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("OBRACKET", re.compile(r"[ \t]*\[[ \t\n]*")),
    ("CCDATA", re.compile(r"[^\n]*\]\]>[^\n]*")),
    ("QSTRING", re.compile(r'"(?:\\"|[^"])*"')),
    ("STRING", re.compile(r"[^=# \t\n,\[\]]+")),
]


class TemplateSyntaxError(Exception):
    pass


def _lex(text: str) -> list[tuple[str, str, int]]:
    """Tokenise like oned's template_parser.l (longest match, ties to the first rule)."""
    tokens: list[tuple[str, str, int]] = []
    pos, line, in_value = 0, 1, False
    while pos < len(text):
        rules = _VALUE_RULES if in_value else _INITIAL_RULES
        best: tuple[str, str] | None = None
        for kind, rx in rules:
            m = rx.match(text, pos)
            if m and m.end() > pos and (best is None or len(m.group(0)) > len(best[1])):
                best = (kind, m.group(0))
        if best is None:
            raise TemplateSyntaxError(f"syntax error, unexpected character {text[pos]!r} "
                                      f"at line {line}")
        kind, lexeme = best
        pos += len(lexeme)
        if kind in ("COMMENT", "BLANK"):
            pass
        elif kind == "EQUAL":
            in_value = True
            tokens.append((kind, lexeme, line))
        elif kind in ("OBRACKET", "CCDATA"):
            in_value = False
            tokens.append((kind, lexeme, line))
        elif kind == "QSTRING":
            in_value = False
            tokens.append(("STRING", lexeme[1:-1], line))
        elif kind == "STRING":
            in_value = False
            tokens.append(("STRING", lexeme, line))
        else:
            tokens.append((kind, lexeme, line))
        line += lexeme.count("\n")
    return tokens


def attribute_name(name: str) -> str:
    """oned's Attribute constructor: upper-case, and prefix ONE_ when not a valid XML name."""
    up = name.upper()
    if up and (not name[0].isalpha() or up.startswith("XML")):
        up = "ONE_" + up
    return up


def _unescape(value: str) -> str:
    return value.replace('\\"', '"')


def parse_template(text: str) -> Template:
    """Parse oned template syntax, or the XML form when the text starts with '<'."""
    if text.lstrip().startswith("<"):
        return _parse_xml_template(text)
    toks = _lex(text)
    out: Template = []
    i = 0

    def expect(kind: str) -> tuple[str, str, int]:
        nonlocal i
        if i >= len(toks):
            raise TemplateSyntaxError(f"syntax error, unexpected end of file, expecting {kind}")
        tok = toks[i]
        if tok[0] != kind:
            raise TemplateSyntaxError(f"syntax error, unexpected {tok[0]}, expecting {kind} "
                                      f"at line {tok[2]}")
        i += 1
        return tok

    while i < len(toks):
        name = expect("VARIABLE")[1]
        if i < len(toks) and toks[i][0] == "EQUAL_EMPTY":
            i += 1
            out.append((attribute_name(name), ""))
            continue
        expect("EQUAL")
        if i >= len(toks):
            raise TemplateSyntaxError("syntax error, unexpected end of file")
        kind = toks[i][0]
        if kind == "STRING":
            out.append((attribute_name(name), _unescape(toks[i][1])))
            i += 1
        elif kind == "CCDATA":
            raise TemplateSyntaxError(f"syntax error, unexpected CCDATA at line {toks[i][2]}")
        elif kind == "OBRACKET":
            i += 1
            vec: dict[str, str] = {}
            if i < len(toks) and toks[i][0] == "CBRACKET":
                i += 1
            else:
                while True:
                    sub = expect("VARIABLE")[1].upper()
                    expect("EQUAL")
                    vec.setdefault(sub, _unescape(expect("STRING")[1]))
                    if i < len(toks) and toks[i][0] == "COMMA":
                        i += 1
                        continue
                    expect("CBRACKET")
                    break
            out.append((attribute_name(name), vec))
        else:
            raise TemplateSyntaxError(f"syntax error, unexpected {kind} at line {toks[i][2]}")
    return out


def _parse_xml_template(text: str) -> Template:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise TemplateSyntaxError(f"Error parsing XML Template: {e}") from None
    out: Template = []
    for child in root:
        if len(child):
            out.append((attribute_name(child.tag),
                        {sub.tag.upper(): (sub.text or "") for sub in child}))
        else:
            out.append((attribute_name(child.tag), child.text or ""))
    return out


def _tget(tmpl: Template, key: str) -> str | None:
    for k, v in tmpl:
        if k == key and isinstance(v, str):
            return v
    return None


def _terase(tmpl: Template, key: str) -> str:
    """Remove every attribute named key; return the first single value ('' if none)."""
    value = ""
    found = False
    for k, v in list(tmpl):
        if k == key:
            if not found and isinstance(v, str):
                value, found = v, True
            tmpl.remove((k, v))
    return value


def _cdata(value: str) -> str:
    return "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def template_to_xml(tmpl: Template, root: str = "TEMPLATE") -> str:
    parts = [f"<{root}>"]
    for k, v in tmpl:
        if isinstance(v, dict):
            parts.append(f"<{k}>" + "".join(f"<{sk}>{_cdata(sv)}</{sk}>" for sk, sv in v.items())
                         + f"</{k}>")
        else:
            parts.append(f"<{k}>{_cdata(v)}</{k}>")
    parts.append(f"</{root}>")
    return "".join(parts)


def _esc(value: object) -> str:
    return _xml_escape(str(value))


def _perms_xml(p: Iterable[int]) -> str:
    names = ("OWNER_U", "OWNER_M", "OWNER_A", "GROUP_U", "GROUP_M", "GROUP_A",
             "OTHER_U", "OTHER_M", "OTHER_A")
    body = "".join(f"<{n}>{int(v)}</{n}>" for n, v in zip(names, p, strict=True))
    return f"<PERMISSIONS>{body}</PERMISSIONS>"


def _log_time() -> str:
    return time.strftime("%a %b %d %H:%M:%S %Y")


def _is_restricted(path: str, safe: list[str], restricted: list[str]) -> bool:
    """datastore/libfs.sh check_restricted: string-prefix test on the resolved path."""
    real = os.path.realpath(path)
    if any(real.startswith(s) for s in safe if s):
        return False
    return any(real.startswith(r) for r in restricted if r)


def _detect_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return "raw"
    return "qcow2" if magic == b"QFI\xfb" else "raw"


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
@dataclass
class SimImage:
    id: int
    uid: int
    gid: int
    uname: str
    gname: str
    name: str
    perms: list[int]
    type: int
    persistent: int
    regtime: int
    path: str
    source: str
    format: str
    fs: str
    size_mb: int
    state: int
    prev_state: int
    ds_id: int
    ds_name: str
    template: Template
    disk_type: int = 0
    running_vms: int = 0
    timer: threading.Timer | None = field(default=None, repr=False, compare=False)

    def tget(self, key: str) -> str | None:
        return _tget(self.template, key)

    def to_xml(self) -> str:
        return (
            "<IMAGE>"
            f"<ID>{self.id}</ID><UID>{self.uid}</UID><GID>{self.gid}</GID>"
            f"<UNAME>{_esc(self.uname)}</UNAME><GNAME>{_esc(self.gname)}</GNAME>"
            f"<NAME>{_esc(self.name)}</NAME>"
            f"{_perms_xml(self.perms)}"
            f"<TYPE>{self.type}</TYPE><DISK_TYPE>{self.disk_type}</DISK_TYPE>"
            f"<PERSISTENT>{self.persistent}</PERSISTENT><REGTIME>{self.regtime}</REGTIME>"
            f"<SOURCE>{_esc(self.source)}</SOURCE><PATH>{_esc(self.path)}</PATH>"
            f"<FORMAT>{_esc(self.format)}</FORMAT><FS>{_esc(self.fs)}</FS>"
            f"<SIZE>{self.size_mb}</SIZE><STATE>{self.state}</STATE>"
            f"<PREV_STATE>{self.prev_state}</PREV_STATE>"
            f"<RUNNING_VMS>{self.running_vms}</RUNNING_VMS><CLONING_OPS>0</CLONING_OPS>"
            f"<CLONING_ID>-1</CLONING_ID><TARGET_SNAPSHOT>-1</TARGET_SNAPSHOT>"
            f"<DATASTORE_ID>{self.ds_id}</DATASTORE_ID><DATASTORE>{_esc(self.ds_name)}</DATASTORE>"
            "<VMS></VMS><CLONES></CLONES><APP_CLONES></APP_CLONES>"
            f"{template_to_xml(self.template)}"
            "<SNAPSHOTS><ALLOW_ORPHANS><![CDATA[NO]]></ALLOW_ORPHANS>"
            "<CURRENT_BASE><![CDATA[-1]]></CURRENT_BASE>"
            "<NEXT_SNAPSHOT><![CDATA[0]]></NEXT_SNAPSHOT></SNAPSHOTS>"
            "<BACKUP_INCREMENTS></BACKUP_INCREMENTS><BACKUP_DISK_IDS></BACKUP_DISK_IDS>"
            "</IMAGE>"
        )


# ---------------------------------------------------------------------------------------------
# XML-RPC plumbing
# ---------------------------------------------------------------------------------------------
class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/RPC2",)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    block_on_close = False


class OneSim:
    """A fake oned. Use as a context manager; ``endpoint`` is ``http://127.0.0.1:PORT/RPC2``."""

    def __init__(
        self,
        users: Iterable[SimUser] | None = None,
        datastores: Iterable[SimDatastore] | None = None,
        copy_delay: float = 0.3,
        delete_delay: float = 0.05,
        stuck: bool = False,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.users = {u.name: u for u in (users if users is not None else DEFAULT_USERS)}
        dss = list(datastores) if datastores is not None else default_datastores()
        self.datastores = {d.id: d for d in dss}
        self.copy_delay = copy_delay
        self.delete_delay = delete_delay
        self.stuck = stuck
        self.images: dict[int, SimImage] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []  # (method, params without session)
        self.sessions_seen: list[str] = []
        self._failures: dict[str, list[tuple[int, str]]] = {}
        self._next_image_id = 0
        self._lock = threading.RLock()
        self._own_workdir = workdir is None
        self.workdir = str(workdir) if workdir is not None else tempfile.mkdtemp(prefix="onesim-")
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._timers: set[threading.Timer] = set()
        self._methods: dict[str, Callable[..., Any]] = {
            "one.system.version": self._system_version,
            "one.image.allocate": self._image_allocate,
            "one.image.info": self._image_info,
            "one.image.update": self._image_update,
            "one.image.chmod": self._image_chmod,
            "one.image.rename": self._image_rename,
            "one.image.delete": self._image_delete,
            "one.image.enable": self._image_enable,
            "one.imagepool.info": self._imagepool_info,
            "one.datastore.info": self._datastore_info,
            "one.datastorepool.info": self._datastorepool_info,
        }

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> OneSim:
        server = _Server(("127.0.0.1", 0), requestHandler=_Handler, logRequests=False,
                         allow_none=False, encoding="utf-8")
        server.register_instance(self)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="onesim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            timers = list(self._timers)
            self._timers.clear()
        for t in timers:
            t.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> OneSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "OneSim is not started"
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/RPC2"

    # -- test helpers -----------------------------------------------------------------------
    def inject_failure(self, method: str, code: int, message: str, times: int = 1) -> None:
        """Make the next ``times`` calls of method (e.g. "one.image.chmod") fail with code/message.

        The message gets oned's ``[method] `` prefix."""
        with self._lock:
            self._failures.setdefault(method, []).extend([(code, message)] * times)

    @staticmethod
    def _snapshot(img: SimImage) -> SimImage:
        return dataclasses.replace(img, perms=list(img.perms),
                                   template=copy.deepcopy(img.template), timer=None)

    def image(self, image_id: int) -> SimImage | None:
        """A copy of image image_id as the sim holds it (None once it is gone)."""
        with self._lock:
            img = self.images.get(image_id)
            return self._snapshot(img) if img is not None else None

    def find_images(self, name: str | None = None) -> list[SimImage]:
        """Copies of all images (or those named name), by ID."""
        with self._lock:
            return [self._snapshot(i) for i in sorted(self.images.values(), key=lambda i: i.id)
                    if name is None or i.name == name]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    def datastore_dir(self, ds_id: int) -> str:
        return os.path.join(self.workdir, "datastores", str(ds_id))

    # -- dispatch ---------------------------------------------------------------------------
    def _dispatch(self, method: str, params: tuple[Any, ...]) -> list[Any]:
        import xmlrpc.client

        fn = self._methods.get(method)
        if fn is None:
            raise xmlrpc.client.Fault(-506, f"Method '{method}' not defined")
        if not params or not isinstance(params[0], str):
            raise xmlrpc.client.Fault(-501, "Type error: session string expected")
        session, args = params[0], tuple(params[1:])
        with self._lock:
            self.calls.append((method, args))
            self.sessions_seen.append(session)
        try:
            user = self._authenticate(method, session)
            with self._lock:
                queued = self._failures.get(method)
                if queued:
                    code, msg = queued.pop(0)
                    raise OneError(code, f"[{method}] {msg}")
            try:
                value = fn(method, user, *args)
            except TypeError as e:
                raise xmlrpc.client.Fault(-501, f"Type error: {e}") from None
        except OneError as e:
            return [False, e.message, e.code, e.obj_id]
        return [True, value, SUCCESS]

    def _authenticate(self, method: str, session: str) -> SimUser:
        name, sep, password = session.partition(":")
        user = self.users.get(name)
        if not sep or user is None or user.password != password:
            raise OneError(AUTHENTICATION,
                           f"[{method}] User couldn't be authenticated, aborting call.")
        return user

    # -- authorization ----------------------------------------------------------------------
    @staticmethod
    def _allowed(user: SimUser, uid: int, gid: int, perms: list[int] | tuple[int, ...],
                 right: str) -> bool:
        if user.uid == 0 or user.gid == 0:
            return True
        idx = {"USE": 0, "MANAGE": 1, "ADMIN": 2}[right]
        if user.uid == uid and perms[idx]:
            return True
        if user.gid == gid and perms[3 + idx]:
            return True
        return bool(perms[6 + idx])

    def _authorize_image(self, method: str, user: SimUser, img: SimImage, right: str) -> None:
        if not self._allowed(user, img.uid, img.gid, img.perms, right):
            raise OneError(AUTHORIZATION,
                           f"[{method}] User [{user.uid}] : Not authorized to perform {right} "
                           f"IMAGE [{img.id}].", img.id)

    def _get_image(self, method: str, image_id: int) -> SimImage:
        img = self.images.get(int(image_id))
        if img is None:
            raise OneError(NO_EXISTS, f"[{method}] Error getting image [{image_id}].", image_id)
        return img

    def _get_ds(self, method: str, ds_id: int) -> SimDatastore:
        ds = self.datastores.get(int(ds_id))
        if ds is None:
            raise OneError(NO_EXISTS, f"[{method}] Error getting datastore [{ds_id}].", ds_id)
        return ds

    # -- one.system ---------------------------------------------------------------------------
    def _system_version(self, method: str, user: SimUser) -> str:
        return VERSION

    # -- one.image.allocate -------------------------------------------------------------------
    def _image_allocate(self, method: str, user: SimUser, template: str, ds_id: int,
                        skip_capacity_check: bool = False) -> int:
        try:
            tmpl = parse_template(template)
        except TemplateSyntaxError as e:
            raise OneError(INTERNAL, f"[{method}] Parse error: {e}") from None
        with self._lock:
            ds = self._get_ds(method, ds_id)
            if ds.type == "SYSTEM":
                raise OneError(ALLOCATE, f"[{method}] New images can only be allocated in a "
                                         "files or image datastore.")
            if not ds.enabled:
                # Real oned only lets SYSTEM datastores be disabled; this is a test-only knob.
                raise OneError(ACTION, f"[{method}] Datastore [{ds.id}] is disabled.", ds.id)
            # ---- stat_image: SIZE of the image (datastore "stat" driver) ----
            path = _tget(tmpl, "PATH") or ""
            source = _tget(tmpl, "SOURCE") or ""
            if source:
                size_str = _tget(tmpl, "SIZE") or ""
                if not size_str.strip().isdigit():
                    raise OneError(INTERNAL, f"[{method}] Cannot parse image SIZE: "
                                             "Wrong or missing SIZE")
                size_mb = int(size_str)
            elif path:
                size_mb = self._stat(method, path)
            else:
                size_str = _tget(tmpl, "SIZE") or "0"
                if not size_str.strip().isdigit():
                    raise OneError(INTERNAL, f"[{method}] Cannot parse image SIZE: {size_str}")
                size_mb = int(size_str)
            if not skip_capacity_check and size_mb > ds.free_mb:
                raise OneError(ACTION, f"[{method}] Not enough space in datastore")
            if not self._allowed(user, ds.uid, ds.gid, ds.perms, "USE"):
                raise OneError(AUTHORIZATION, f"[{method}] User [{user.uid}] : Not authorized to "
                                              f"perform USE DATASTORE [{ds.id}].")
            # ---- ImagePool::allocate / Image::insert ----
            name = _terase(tmpl, "NAME")
            if not name:
                raise OneError(ALLOCATE, f"[{method}] NAME cannot be empty.")
            for other in self.images.values():
                if other.name == name and other.uid == user.uid:
                    raise OneError(ALLOCATE, f"[{method}] NAME is already taken by IMAGE "
                                             f"{other.id}.")
            type_str = (_terase(tmpl, "TYPE") or "OS").upper()
            if type_str not in IMAGE_TYPES:
                raise OneError(ALLOCATE, f"[{method}] Unknown type {type_str}")
            if ds.type == "FILE" and type_str not in FILE_TYPES:
                raise OneError(ALLOCATE, f"[{method}] Only IMAGES of type KERNEL, RAMDISK and "
                                         "CONTEXT can be registered in a FILE_DS datastore")
            if ds.type == "IMAGE" and type_str in FILE_TYPES:
                raise OneError(ALLOCATE, f"[{method}] IMAGES of type KERNEL, RAMDISK and CONTEXT "
                                         "cannot be registered in an IMAGE_DS datastore")
            persistent = 1 if _terase(tmpl, "PERSISTENT").upper() == "YES" else 0
            if type_str in ("OS", "DATABLOCK", "CDROM"):
                if not _tget(tmpl, "DEV_PREFIX"):
                    _terase(tmpl, "DEV_PREFIX")
                    tmpl.append(("DEV_PREFIX", "hd" if type_str == "CDROM" else "sd"))
            else:
                _terase(tmpl, "DEV_PREFIX")
            _terase(tmpl, "SIZE")
            fs = _terase(tmpl, "FS")
            _terase(tmpl, "DRIVER")
            path = _terase(tmpl, "PATH")
            source = _terase(tmpl, "SOURCE")
            fmt = _terase(tmpl, "FORMAT")
            _terase(tmpl, "TM_MAD")
            if source and path:
                raise OneError(ALLOCATE, f"[{method}] PATH and SOURCE cannot be both set.")
            if source and not fmt:
                raise OneError(ALLOCATE, f"[{method}] SOURCE needs FORMAT to be set.")
            if path:
                fmt = ""  # filled in by the datastore driver
            elif not source:
                if type_str in ("OS", "DATABLOCK"):
                    fmt = fmt or "raw"
                else:
                    raise OneError(ALLOCATE, f"[{method}] No PATH nor SOURCE in template.")
            image_id = self._next_image_id
            self._next_image_id += 1
            img = SimImage(
                id=image_id, uid=user.uid, gid=user.gid, uname=user.name, gname=user.gname,
                name=name, perms=[1, 1, 0, 0, 0, 0, 0, 0, 0], type=IMAGE_TYPES[type_str],
                persistent=persistent, regtime=int(time.time()), path=path, source=source,
                format=fmt, fs=fs, size_mb=size_mb, state=LOCKED, prev_state=INIT,
                ds_id=ds.id, ds_name=ds.name, template=tmpl,
            )
            self.images[image_id] = img
            if source:
                img.state = READY
            elif not self.stuck:
                img.timer = self._schedule(self.copy_delay, self._finish_copy, image_id)
            return image_id

    def _stat(self, method: str, path: str) -> int:
        def fail(reason: str) -> OneError:
            return OneError(INTERNAL, f"[{method}] Cannot parse image SIZE: cannot access "
                                      f"'{path}' ({reason})")

        if not os.path.isabs(path):
            raise fail("No such file or directory")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise fail("No such file or directory") from None
        except PermissionError:
            raise fail("Permission denied") from None
        except OSError as e:
            raise fail(e.strerror or str(e)) from None
        return max(1, math.ceil(st.st_size / (1024 * 1024)))

    def _schedule(self, delay: float, fn: Callable[[int], None], image_id: int) -> threading.Timer:
        timer: threading.Timer

        def run() -> None:
            with self._lock:
                if timer not in self._timers:  # cancelled (delete, stop)
                    return
                self._timers.discard(timer)
            fn(image_id)

        timer = threading.Timer(delay, run)
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()
        return timer

    def _finish_copy(self, image_id: int) -> None:
        """The datastore 'cp' driver: copy PATH into the datastore or put the image in ERROR."""
        with self._lock:
            img = self.images.get(image_id)
            if img is None or img.state != LOCKED:
                return
            img.timer = None
            ds = self.datastores.get(img.ds_id)
            path = img.path
            if ds is None:
                self._set_error(img, "Error copying image in the datastore: datastore not found")
                return
            if _is_restricted(path, ds.safe_dirs, ds.restricted_dirs):
                self._set_error(img, "Error copying image in the datastore: Not allowed to copy "
                                     f"image file {path}, check RESTRICTED_DIRS in your datastore")
                return
            dest_dir = self.datastore_dir(ds.id)
        try:
            os.makedirs(dest_dir, exist_ok=True)
            digest = hashlib.md5(f"{image_id}-{time.time_ns()}".encode()).hexdigest()
            dest = os.path.join(dest_dir, digest)
            shutil.copyfile(path, dest)
            size_mb = max(1, math.ceil(os.path.getsize(dest) / (1024 * 1024)))
            fmt = _detect_format(dest)
        except OSError as e:
            with self._lock:
                img = self.images.get(image_id)
                if img is not None and img.state == LOCKED:
                    self._set_error(img, "Error copying image in the datastore: Error copying "
                                         f"{path}: {e.strerror or e}")
            return
        with self._lock:
            img = self.images.get(image_id)
            if img is None or img.state != LOCKED:  # deleted meanwhile
                with contextlib.suppress(OSError):
                    os.unlink(dest)
                return
            img.source, img.size_mb, img.format = dest, size_mb, fmt
            img.prev_state, img.state = img.state, READY
            if ds is not None:
                ds.free_mb = max(0, ds.free_mb - size_mb)

    @staticmethod
    def _set_error(img: SimImage, message: str) -> None:
        _terase(img.template, "ERROR")
        img.template.append(("ERROR", f"{_log_time()} : {message}"))
        img.prev_state, img.state = img.state, ERROR

    # -- one.image.* --------------------------------------------------------------------------
    def _image_info(self, method: str, user: SimUser, image_id: int, decrypt: bool = False) -> str:
        with self._lock:
            img = self._get_image(method, image_id)
            self._authorize_image(method, user, img, "USE")
            return img.to_xml()

    def _image_update(self, method: str, user: SimUser, image_id: int, template: str,
                      update_type: int = 0) -> int:
        with self._lock:
            img = self._get_image(method, image_id)
            self._authorize_image(method, user, img, "MANAGE")
            try:
                new = parse_template(template)
            except TemplateSyntaxError as e:
                raise OneError(INTERNAL, f"[{method}] Parse error: {e}", img.id) from None
            if update_type == 1:
                for k, _v in new:
                    _terase(img.template, k)
                img.template.extend(new)
            elif update_type == 0:
                img.template = new
            else:
                raise OneError(XML_RPC_API, f"[{method}] Wrong update type", img.id)
            return img.id

    def _image_chmod(self, method: str, user: SimUser, image_id: int, *bits: int) -> int:
        if len(bits) != 9:
            raise TypeError(f"one.image.chmod takes 9 permission values, got {len(bits)}")
        with self._lock:
            img = self._get_image(method, image_id)
            self._authorize_image(method, user, img, "MANAGE")
            if any(b == 1 for b in (bits[2], bits[5], bits[8])):
                self._authorize_image(method, user, img, "ADMIN")
            img.perms = [old if new == -1 else (1 if new else 0)
                         for old, new in zip(img.perms, bits, strict=True)]
            return img.id

    def _image_rename(self, method: str, user: SimUser, image_id: int, new_name: str) -> int:
        with self._lock:
            img = self._get_image(method, image_id)
            self._authorize_image(method, user, img, "MANAGE")
            if not new_name:
                raise OneError(ACTION, f"[{method}] Invalid NAME: NAME cannot be empty.", img.id)
            for other in self.images.values():
                if other.id != img.id and other.name == new_name and other.uid == img.uid:
                    raise OneError(ACTION, f"[{method}] Name is already taken by IMAGE "
                                           f"{other.id}.", img.id)
            img.name = new_name
            return img.id

    def _image_delete(self, method: str, user: SimUser, image_id: int, force: bool = False) -> int:
        with self._lock:
            img = self._get_image(method, image_id)
            self._authorize_image(method, user, img, "MANAGE")
            if img.running_vms > 0 or img.state in (USED, USED_PERS):
                raise OneError(ACTION, f"[{method}] Cannot delete image [{img.id}]: There are "
                                       f"{img.running_vms} VMs using it.", img.id)
            if img.timer is not None:
                img.timer.cancel()
                self._timers.discard(img.timer)
                img.timer = None
            if img.state == DELETE:
                return img.id
            img.prev_state, img.state = img.state, DELETE
            self._schedule(self.delete_delay, self._finish_delete, img.id)
            return img.id

    def _finish_delete(self, image_id: int) -> None:
        with self._lock:
            img = self.images.pop(image_id, None)
            if img is None:
                return
            if img.source and img.source.startswith(self.workdir):
                with contextlib.suppress(OSError):
                    os.unlink(img.source)
                ds = self.datastores.get(img.ds_id)
                if ds is not None:
                    ds.free_mb += img.size_mb

    def _image_enable(self, method: str, user: SimUser, image_id: int, enable: bool) -> int:
        with self._lock:
            img = self._get_image(method, image_id)
            self._authorize_image(method, user, img, "MANAGE")
            if enable and img.state in (DISABLED, ERROR):
                img.prev_state, img.state = img.state, READY
            elif not enable and img.state == READY:
                img.prev_state, img.state = img.state, DISABLED
            elif not (enable and img.state == READY) and not (not enable and img.state == DISABLED):
                raise OneError(ACTION, f"[{method}] Could not "
                                       f"{'enable' if enable else 'disable'} image, it must be "
                                       "in READY or DISABLED state.", img.id)
            return img.id

    def _imagepool_info(self, method: str, user: SimUser, filter_flag: int = -2,
                        start_id: int = -1, end_id: int = -1) -> str:
        with self._lock:
            out = []
            for img in sorted(self.images.values(), key=lambda i: i.id):
                if not self._pool_visible(method, user, img, filter_flag):
                    continue
                if start_id >= 0 and img.id < start_id:
                    continue
                if end_id >= 0 and img.id > end_id:
                    continue
                out.append(img.to_xml())
            return "<IMAGE_POOL>" + "".join(out) + "</IMAGE_POOL>"

    def _pool_visible(self, method: str, user: SimUser, img: SimImage, flag: int) -> bool:
        admin = user.uid == 0 or user.gid == 0
        if flag == -3:  # MINE
            return img.uid == user.uid
        if flag == -1:  # MINE_GROUP
            return img.uid == user.uid or img.gid == user.gid
        if flag == -4:  # GROUP
            return img.gid == user.gid
        visible = admin or self._allowed(user, img.uid, img.gid, img.perms, "USE")
        if flag == -2:  # ALL
            return visible
        if flag >= 0:  # one user
            return img.uid == flag and visible
        raise OneError(XML_RPC_API, f"[{method}] Incorrect filter_flag.")

    # -- one.datastore* -----------------------------------------------------------------------
    def _ds_xml(self, ds: SimDatastore) -> str:
        images = [i.id for i in self.images.values() if i.ds_id == ds.id]
        tmpl: Template = [
            ("ALLOW_ORPHANS", "NO"),
            ("CLONE_TARGET", "SYSTEM"),
            ("DISK_TYPE", "FILE"),
            ("DS_MAD", ds.ds_mad),
            ("LN_TARGET", "NONE"),
            ("RESTRICTED_DIRS", " ".join(ds.restricted_dirs)),
            ("SAFE_DIRS", " ".join(ds.safe_dirs)),
            ("TM_MAD", ds.tm_mad),
            ("TYPE", DS_TYPE_STR[ds.type]),
        ]
        tmpl.extend(ds.extra_template.items())
        used = max(0, ds.total_mb - ds.free_mb)
        return (
            "<DATASTORE>"
            f"<ID>{ds.id}</ID><UID>{ds.uid}</UID><GID>{ds.gid}</GID>"
            "<UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME>"
            f"<NAME>{_esc(ds.name)}</NAME>{_perms_xml(ds.perms)}"
            f"<DS_MAD>{_cdata(ds.ds_mad)}</DS_MAD><TM_MAD>{_cdata(ds.tm_mad)}</TM_MAD>"
            f"<BASE_PATH>{_cdata(self.datastore_dir(ds.id))}</BASE_PATH>"
            f"<TYPE>{DS_TYPES[ds.type]}</TYPE><DISK_TYPE>0</DISK_TYPE>"
            f"<STATE>{0 if ds.enabled else 1}</STATE>"
            "<CLUSTERS><ID>0</ID></CLUSTERS>"
            f"<TOTAL_MB>{ds.total_mb}</TOTAL_MB><FREE_MB>{ds.free_mb}</FREE_MB>"
            f"<USED_MB>{used}</USED_MB>"
            "<IMAGES>" + "".join(f"<ID>{i}</ID>" for i in sorted(images)) + "</IMAGES>"
            f"{template_to_xml(tmpl)}"
            "</DATASTORE>"
        )

    def _datastore_info(self, method: str, user: SimUser, ds_id: int, decrypt: bool = False) -> str:
        with self._lock:
            ds = self._get_ds(method, ds_id)
            if not self._allowed(user, ds.uid, ds.gid, ds.perms, "USE"):
                raise OneError(AUTHORIZATION, f"[{method}] User [{user.uid}] : Not authorized to "
                                              f"perform USE DATASTORE [{ds.id}].", ds.id)
            return self._ds_xml(ds)

    def _datastorepool_info(self, method: str, user: SimUser) -> str:
        with self._lock:
            visible = [ds for ds in sorted(self.datastores.values(), key=lambda d: d.id)
                       if self._allowed(user, ds.uid, ds.gid, ds.perms, "USE")]
            return "<DATASTORE_POOL>" + "".join(self._ds_xml(d) for d in visible) + \
                "</DATASTORE_POOL>"
