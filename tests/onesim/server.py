"""OneSim: a small, protocol-faithful stand-in for OpenNebula's ``oned`` XML-RPC API.

It speaks real XML-RPC over HTTP on 127.0.0.1 (path ``/RPC2``) so that the *unmodified* pyone
client can talk to it (``pyone.OneServer(sim.endpoint, session="user:pass")``). Replies are what
oned sends: ``[True, value, 0]`` on success and ``[False, message, code, object_id]`` on failure,
with oned's error codes and messages (src/rm/Request.cc failure_message: ALLOCATE errors read
``Error allocating a new <object>. <reason>``; pyone maps 0x100 auth, 0x200 authorization, 0x400
no-exists, 0x800 action, 0x1000 api, 0x2000 internal; 0x4000 becomes a plain ``OneException``).

XML bodies (IMAGE, VMTEMPLATE, VM, DATASTORE and their pools) are laid out like oned's
``to_xml`` (element order of the XSD, integers as integers, template values in CDATA, template
attributes sorted by name), which is what pyone's generated bindings parse. The template
language lives in :mod:`onesim.template`, the datastore drivers in :mod:`onesim.stat`.

Modelled, each next to the oned source it follows:

- images: allocate (datastore checks, SIZE from the ``stat`` driver = qemu-img virtual size,
  capacity against the last monitored FREE_MB, name rules, LOCKED until the ``cp`` driver copied
  PATH, then READY or ERROR), info, pool info, update (replace/merge), chmod, rename, enable,
  delete (asynchronous, like the ``rm`` driver);
- datastores: FREE_MB/TOTAL_MB/USED_MB change only on a monitoring tick (``monitor()``, or
  every ``monitor_interval`` seconds); before the first tick they are 0 and allocate answers
  "Not enough space in datastore", as a fresh oned does;
- VM templates: allocate, info, pool info, update, clone (recursive clones the images),
  delete, rename;
- VMs with oned's dummy drivers: allocate / instantiate, PENDING then RUNNING after
  ``deploy_delay``; DISKs acquire their images (USED, RUNNING_VMS) and terminate releases them.

Test knobs (see :class:`OneSim`): users, datastores, copy/delete/deploy delays, ``stuck``
(new images stay LOCKED), ``monitored`` (whether the first tick happens at start),
``monitor()``, ``inject_failure(method, code, message)``, and read-only snapshots of the state
(``image()``, ``find_images()``, ``template()``, ``vm()``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os
import shutil
import socketserver
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape as _xml_escape
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

from .stat import StatError, allocated_bytes, fs_size_mb, image_format
from .template import (
    Template,
    TemplateSyntaxError,
    TValue,
    attribute_name,
    cdata,
    merge,
    name_error,
    parse_template,
    template_to_xml,
    terase,
    tget,
    vectors,
    xml_safe,
)

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
INIT, READY, USED, DISABLED, LOCKED, ERROR, CLONE, DELETE, USED_PERS, LOCKED_USED, \
    LOCKED_USED_PERS = range(11)
IMAGE_STATE_STR = {INIT: "INIT", READY: "READY", USED: "USED", DISABLED: "DISABLED",
                   LOCKED: "LOCKED", ERROR: "ERROR", CLONE: "CLONE", DELETE: "DELETE",
                   USED_PERS: "USED", LOCKED_USED: "LOCKED_USED",
                   LOCKED_USED_PERS: "LOCKED_USED"}  # Image::state_to_str
IMAGE_TYPES = {"OS": 0, "CDROM": 1, "DATABLOCK": 2, "KERNEL": 3, "RAMDISK": 4, "CONTEXT": 5,
               "BACKUP": 6}
IMAGE_TYPE_STR = {v: k for k, v in IMAGE_TYPES.items()}
FILE_TYPES = {"KERNEL", "RAMDISK", "CONTEXT"}
DS_TYPES = {"IMAGE": 0, "SYSTEM": 1, "FILE": 2}
DS_TYPE_STR = {"IMAGE": "IMAGE_DS", "SYSTEM": "SYSTEM_DS", "FILE": "FILE_DS"}

# --- VM states (include/VirtualMachine.h) -----------------------------------------------------
VM_INIT, VM_PENDING, VM_HOLD, VM_ACTIVE, VM_STOPPED, VM_SUSPENDED, VM_DONE = range(7)
VM_POWEROFF, VM_UNDEPLOYED = 8, 9
LCM_LCM_INIT, LCM_PROLOG, LCM_BOOT, LCM_RUNNING = range(4)
VM_STATE_STR = {VM_INIT: "INIT", VM_PENDING: "PENDING", VM_HOLD: "HOLD", VM_ACTIVE: "ACTIVE",
                VM_STOPPED: "STOPPED", VM_SUSPENDED: "SUSPENDED", VM_DONE: "DONE",
                VM_POWEROFF: "POWEROFF", VM_UNDEPLOYED: "UNDEPLOYED"}

# VM template attributes oned keeps in the VM's TEMPLATE; the rest goes to USER_TEMPLATE
# (oned: src/vm/VirtualMachine.cc insert moves the known ones out of the user template).
VM_TEMPLATE_KEYS = {"AS_GID", "AS_UID", "AUTOMATIC_DS_REQUIREMENTS", "AUTOMATIC_NIC_REQUIREMENTS",
                    "AUTOMATIC_REQUIREMENTS", "CONTEXT", "CPU", "CPU_COST", "CPU_MODEL", "DISK",
                    "DISK_COST", "FEATURES", "GRAPHICS", "INPUT", "MEMORY", "MEMORY_COST", "NIC",
                    "NIC_ALIAS", "NUMA_NODE", "OS", "PCI", "RAW", "SECURITY_GROUP_RULE",
                    "SPICE_OPTIONS", "TEMPLATE_ID", "TM_MAD_SYSTEM", "TOPOLOGY", "VCPU", "VMGROUP",
                    "VMID", "VROUTER_ID"}

VERSION = "6.10.5"
MIB = 1024 * 1024

__all__ = [
    "ACTION", "ALLOCATE", "AUTHENTICATION", "AUTHORIZATION", "CLONE", "DELETE", "DISABLED",
    "ERROR", "INIT", "INTERNAL", "LOCKED", "LOCKED_USED", "LOCKED_USED_PERS", "NO_EXISTS",
    "READY", "USED", "USED_PERS", "XML_RPC_API", "OneError", "OneSim", "SimDatastore",
    "SimImage", "SimTemplate", "SimUser", "SimVM", "TValue", "Template", "TemplateSyntaxError",
    "attribute_name", "parse_template", "template_to_xml",
]


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
    """A datastore. total_mb/free_mb describe the filesystem under it before any image is
    stored; what the pool reports comes from the last monitoring tick (see OneSim.monitor).

    There is no "disabled" knob: oned lets only SYSTEM datastores be disabled
    (src/datastore/Datastore.cc Datastore::enable), and kickgate never uses one."""

    id: int
    name: str
    type: str = "IMAGE"  # IMAGE | SYSTEM | FILE
    safe_dirs: list[str] = field(default_factory=lambda: ["/var/tmp"])
    restricted_dirs: list[str] = field(default_factory=lambda: ["/"])
    free_mb: int = 100_000
    total_mb: int = 200_000
    uid: int = 0
    gid: int = 0
    # OWNER_U..OTHER_A; default lets every user USE it (what the stock ACLs amount to)
    perms: tuple[int, ...] = (1, 1, 0, 1, 0, 0, 1, 0, 0)
    ds_mad: str = "fs"
    tm_mad: str = "local"
    extra_template: dict[str, str] = field(default_factory=dict)
    # as last monitored (oned: Datastore starts at 0/0/0 until the first monitoring)
    mon_total_mb: int = 0
    mon_free_mb: int = 0
    mon_used_mb: int = 0


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
    """oned: src/datastore_mad/remotes/libfs.sh check_restricted (prefix test on readlink -f)."""
    real = os.path.realpath(path)
    if any(real.startswith(s) for s in safe if s):
        return False
    return any(real.startswith(r) for r in restricted if r)


def _ids_xml(tag: str, ids: Iterable[int]) -> str:
    return f"<{tag}>" + "".join(f"<ID>{i}</ID>" for i in sorted(ids)) + f"</{tag}>"


# ---------------------------------------------------------------------------------------------
# Pool objects
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
    vms: list[int] = field(default_factory=list)
    clone_of: int | None = None  # set while a clone waits for its copy
    timer: threading.Timer | None = field(default=None, repr=False, compare=False)

    @property
    def running_vms(self) -> int:
        return len(self.vms)

    def tget(self, key: str) -> str | None:
        return tget(self.template, key)

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
            f"{_ids_xml('VMS', self.vms)}<CLONES></CLONES><APP_CLONES></APP_CLONES>"
            f"{template_to_xml(self.template)}"
            "<SNAPSHOTS><ALLOW_ORPHANS><![CDATA[NO]]></ALLOW_ORPHANS>"
            "<CURRENT_BASE><![CDATA[-1]]></CURRENT_BASE>"
            "<NEXT_SNAPSHOT><![CDATA[0]]></NEXT_SNAPSHOT></SNAPSHOTS>"
            "<BACKUP_INCREMENTS></BACKUP_INCREMENTS><BACKUP_DISK_IDS></BACKUP_DISK_IDS>"
            "</IMAGE>"
        )


@dataclass
class SimTemplate:
    """A VM template (oned: src/vm_template/VMTemplate.cc)."""

    id: int
    uid: int
    gid: int
    uname: str
    gname: str
    name: str
    perms: list[int]
    regtime: int
    template: Template

    def to_xml(self) -> str:
        return (
            "<VMTEMPLATE>"
            f"<ID>{self.id}</ID><UID>{self.uid}</UID><GID>{self.gid}</GID>"
            f"<UNAME>{_esc(self.uname)}</UNAME><GNAME>{_esc(self.gname)}</GNAME>"
            f"<NAME>{_esc(self.name)}</NAME>{_perms_xml(self.perms)}"
            f"<REGTIME>{self.regtime}</REGTIME>{template_to_xml(self.template)}"
            "</VMTEMPLATE>"
        )


@dataclass
class SimVM:
    id: int
    uid: int
    gid: int
    uname: str
    gname: str
    name: str
    perms: list[int]
    state: int
    lcm_state: int
    prev_state: int
    prev_lcm_state: int
    stime: int
    etime: int
    template: Template
    user_template: Template
    image_ids: list[int] = field(default_factory=list)

    def to_xml(self) -> str:
        deploy_id = f"one-{self.id}" if self.state == VM_ACTIVE else ""
        return (
            "<VM>"
            f"<ID>{self.id}</ID><UID>{self.uid}</UID><GID>{self.gid}</GID>"
            f"<UNAME>{_esc(self.uname)}</UNAME><GNAME>{_esc(self.gname)}</GNAME>"
            f"<NAME>{_esc(self.name)}</NAME>{_perms_xml(self.perms)}"
            f"<LAST_POLL>0</LAST_POLL><STATE>{self.state}</STATE>"
            f"<LCM_STATE>{self.lcm_state}</LCM_STATE><PREV_STATE>{self.prev_state}</PREV_STATE>"
            f"<PREV_LCM_STATE>{self.prev_lcm_state}</PREV_LCM_STATE><RESCHED>0</RESCHED>"
            f"<STIME>{self.stime}</STIME><ETIME>{self.etime}</ETIME>"
            f"<DEPLOY_ID>{deploy_id}</DEPLOY_ID><MONITORING></MONITORING>"
            "<SCHED_ACTIONS></SCHED_ACTIONS>"
            f"{template_to_xml(self.template)}{template_to_xml(self.user_template, 'USER_TEMPLATE')}"
            "<HISTORY_RECORDS></HISTORY_RECORDS>"
            "<BACKUPS><BACKUP_CONFIG></BACKUP_CONFIG><BACKUP_IDS></BACKUP_IDS></BACKUPS>"
            "</VM>"
        )


class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/RPC2",)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    block_on_close = False


class OneSim:
    """A fake oned. Use as a context manager; ``endpoint`` is ``http://127.0.0.1:PORT/RPC2``.

    users, datastores: the accounts and datastores oned knows (defaults: oneadmin, kick;
    system/default/files). copy_delay, delete_delay, deploy_delay, terminate_delay: seconds the
    cp/rm drivers and the dummy VM drivers take. stuck: new images stay LOCKED. monitored: run
    the first datastore monitoring at start (False: FREE_MB stays 0 until ``monitor()``, as
    right after oned starts). monitor_interval: also monitor every that many seconds.
    """

    def __init__(
        self,
        users: Iterable[SimUser] | None = None,
        datastores: Iterable[SimDatastore] | None = None,
        copy_delay: float = 0.3,
        delete_delay: float = 0.05,
        stuck: bool = False,
        workdir: str | os.PathLike[str] | None = None,
        *,
        deploy_delay: float = 0.05,
        terminate_delay: float = 0.05,
        monitored: bool = True,
        monitor_interval: float | None = None,
    ) -> None:
        self.users = {u.name: u for u in (users if users is not None else DEFAULT_USERS)}
        dss = list(datastores) if datastores is not None else default_datastores()
        self.datastores = {d.id: d for d in dss}
        self.copy_delay = copy_delay
        self.delete_delay = delete_delay
        self.deploy_delay = deploy_delay
        self.terminate_delay = terminate_delay
        self.stuck = stuck
        self.monitored = monitored
        self.monitor_interval = monitor_interval
        self.images: dict[int, SimImage] = {}
        self.templates: dict[int, SimTemplate] = {}
        self.vms: dict[int, SimVM] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []  # (method, params without session)
        self.sessions_seen: list[str] = []
        self._failures: dict[str, list[tuple[int, str]]] = {}
        self._next_image_id = 0
        self._next_template_id = 0
        self._next_vm_id = 0
        self._lock = threading.RLock()
        self._own_workdir = workdir is None
        self.workdir = str(workdir) if workdir is not None else tempfile.mkdtemp(prefix="onesim-")
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._timers: set[threading.Timer] = set()
        self._stop = threading.Event()
        self._monitor_thread: threading.Thread | None = None
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
            "one.template.allocate": self._template_allocate,
            "one.template.info": self._template_info,
            "one.template.update": self._template_update,
            "one.template.clone": self._template_clone,
            "one.template.delete": self._template_delete,
            "one.template.rename": self._template_rename,
            "one.template.instantiate": self._template_instantiate,
            "one.templatepool.info": self._templatepool_info,
            "one.vm.allocate": self._vm_allocate,
            "one.vm.info": self._vm_info,
            "one.vm.action": self._vm_action,
            "one.vmpool.info": self._vmpool_info,
        }

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> OneSim:
        if self.monitored:
            self.monitor()
        server = _Server(("127.0.0.1", 0), requestHandler=_Handler, logRequests=False,
                         allow_none=False, encoding="utf-8")
        server.register_instance(self)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="onesim", daemon=True)
        self._thread.start()
        if self.monitor_interval:
            self._monitor_thread = threading.Thread(target=self._monitor_loop,
                                                    name="onesim-monitor", daemon=True)
            self._monitor_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
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
        if self._monitor_thread is not None:
            self._monitor_thread.join(timeout=5)
            self._monitor_thread = None
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

    def add_user(self, user: SimUser) -> None:
        with self._lock:
            self.users[user.name] = user

    def add_datastore(self, ds: SimDatastore) -> None:
        """A new datastore reports 0 MB until the next monitoring tick, as in oned."""
        with self._lock:
            self.datastores[ds.id] = ds

    def monitor(self) -> None:
        """One datastore monitoring tick: every datastore's TOTAL/FREE/USED_MB become what df
        would say now (the fs ``monitor`` driver: src/datastore_mad/remotes/fs/monitor)."""
        with self._lock:
            for ds in self.datastores.values():
                stored = 0
                for img in self.images.values():
                    if img.ds_id == ds.id and img.source.startswith(self.workdir):
                        stored += allocated_bytes(img.source)
                free = max(0, ds.free_mb - (stored + MIB - 1) // MIB)
                ds.mon_total_mb, ds.mon_free_mb = ds.total_mb, free
                ds.mon_used_mb = max(0, ds.total_mb - free)

    def _monitor_loop(self) -> None:
        assert self.monitor_interval
        while not self._stop.wait(self.monitor_interval):
            self.monitor()

    @staticmethod
    def _snapshot(img: SimImage) -> SimImage:
        return dataclasses.replace(img, perms=list(img.perms), vms=list(img.vms),
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

    def template(self, template_id: int) -> SimTemplate | None:
        """A copy of VM template template_id (None if there is none)."""
        with self._lock:
            t = self.templates.get(template_id)
            return copy.deepcopy(t) if t is not None else None

    def vm(self, vm_id: int) -> SimVM | None:
        """A copy of VM vm_id (None if there is none)."""
        with self._lock:
            v = self.vms.get(vm_id)
            return copy.deepcopy(v) if v is not None else None

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

    def _schedule(self, delay: float, fn: Callable[[int], None], obj_id: int) -> threading.Timer:
        timer: threading.Timer

        def run() -> None:
            with self._lock:
                if timer not in self._timers:  # cancelled (delete, stop)
                    return
                self._timers.discard(timer)
            fn(obj_id)

        timer = threading.Timer(delay, run)
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()
        return timer

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

    def _authorize(self, method: str, user: SimUser, obj: SimImage | SimTemplate | SimVM,
                   right: str) -> None:
        kind = {SimImage: "IMAGE", SimTemplate: "TEMPLATE", SimVM: "VM"}[type(obj)]
        if not self._allowed(user, obj.uid, obj.gid, obj.perms, right):
            raise OneError(AUTHORIZATION,
                           f"[{method}] User [{user.uid}] : Not authorized to perform {right} "
                           f"{kind} [{obj.id}].", obj.id)

    def _authorize_image(self, method: str, user: SimUser, img: SimImage, right: str) -> None:
        self._authorize(method, user, img, right)

    def _get_image(self, method: str, image_id: int) -> SimImage:
        img = self.images.get(int(image_id))
        if img is None:
            raise OneError(NO_EXISTS, f"[{method}] Error getting image [{image_id}].", image_id)
        return img

    def _get_template(self, method: str, template_id: int) -> SimTemplate:
        t = self.templates.get(int(template_id))
        if t is None:
            raise OneError(NO_EXISTS, f"[{method}] Error getting virtual machine template "
                                      f"[{template_id}].", template_id)
        return t

    def _get_vm(self, method: str, vm_id: int) -> SimVM:
        v = self.vms.get(int(vm_id))
        if v is None:
            raise OneError(NO_EXISTS, f"[{method}] Error getting virtual machine [{vm_id}].",
                           vm_id)
        return v

    def _get_ds(self, method: str, ds_id: int) -> SimDatastore:
        ds = self.datastores.get(int(ds_id))
        if ds is None:
            raise OneError(NO_EXISTS, f"[{method}] Error getting datastore [{ds_id}].", ds_id)
        return ds

    @staticmethod
    def _parse(method: str, text: str, code: int = INTERNAL, prefix: str = "",
               obj_id: int = -1) -> Template:
        """oned: Template::parse_str_or_xml error messages."""
        try:
            return parse_template(text)
        except TemplateSyntaxError as e:
            raise OneError(code, f"[{method}] {prefix}Parse error: {e}", obj_id) from None

    # -- one.system ---------------------------------------------------------------------------
    def _system_version(self, method: str, user: SimUser) -> str:
        return VERSION

    # -- one.image.allocate -------------------------------------------------------------------
    def _image_allocate(self, method: str, user: SimUser, template: str, ds_id: int,
                        skip_capacity_check: bool = False) -> int:
        # oned: src/rm/RequestManagerAllocate.cc ImageAllocate::request_execute
        tmpl = self._parse(method, template)

        def refused(msg: str) -> OneError:
            return OneError(ALLOCATE, f"[{method}] Error allocating a new image. {msg}")

        with self._lock:
            ds = self._get_ds(method, ds_id)
            if ds.type == "SYSTEM":
                raise refused("New images can only be allocated in a files or image datastore.")
            type_str = (tget(tmpl, "TYPE") or "OS").upper()
            path = tget(tmpl, "PATH") or ""
            source = tget(tmpl, "SOURCE") or ""
        # ---- stat_image (src/image/ImageManagerActions.cc): SIZE, outside the lock (qemu-img)
        if source or (not path and type_str in ("OS", "DATABLOCK")):
            size_str = tget(tmpl, "SIZE") or ""
            if not size_str.strip().isdigit():
                raise OneError(INTERNAL, f"[{method}] Cannot parse image SIZE: Wrong number or "
                                         "missing SIZE attribute.")
            size_mb = int(size_str)
        elif not path:
            raise OneError(INTERNAL, f"[{method}] Cannot parse image SIZE: Either PATH or SOURCE "
                                     f"are required for {type_str}")
        else:
            try:
                size_mb = fs_size_mb(path)
            except StatError as e:
                msg = str(e) or f"Cannot determine size for {path}"
                raise OneError(INTERNAL, f"[{method}] Cannot parse image SIZE: {msg}") from None
        with self._lock:
            ds = self._get_ds(method, ds_id)
            # Datastore::get_avail_mb: FREE_MB as last monitored
            if not (skip_capacity_check and user.uid == 0) and size_mb > ds.mon_free_mb:
                raise OneError(ACTION, f"[{method}] Not enough space in datastore")
            if not self._allowed(user, ds.uid, ds.gid, ds.perms, "USE"):
                raise OneError(AUTHORIZATION, f"[{method}] User [{user.uid}] : Not authorized to "
                                              f"perform USE DATASTORE [{ds.id}].")
            # ---- ImagePool::allocate (src/image/ImagePool.cc) ----
            name = terase(tmpl, "NAME")
            problem = name_error(name)
            if problem:
                raise refused(problem)
            if type_str not in IMAGE_TYPES:
                type_str = "OS"  # Image::str_to_type falls back to OS
            if type_str in ("OS", "DATABLOCK", "CDROM") and ds.type != "IMAGE":
                raise refused("Only IMAGES of type KERNEL, RAMDISK and CONTEXT can be registered "
                              "in a FILE_DS datastore")
            if type_str in FILE_TYPES and ds.type != "FILE":
                raise refused("IMAGES of type KERNEL, RAMDISK and CONTEXT cannot be registered "
                              "in an IMAGE_DS datastore")
            for other in self.images.values():
                if other.name == name and other.uid == user.uid:
                    raise refused(f"NAME is already taken by IMAGE {other.id}.")
            # ---- Image::insert (src/image/Image.cc) ----
            terase(tmpl, "TYPE")
            persistent = 1 if terase(tmpl, "PERSISTENT").upper() == "YES" else 0
            if type_str in ("OS", "DATABLOCK", "CDROM"):
                if not tget(tmpl, "DEV_PREFIX"):
                    terase(tmpl, "DEV_PREFIX")
                    tmpl.append(("DEV_PREFIX", "hd" if type_str == "CDROM" else "sd"))
            else:
                terase(tmpl, "DEV_PREFIX")
            terase(tmpl, "SIZE")
            fs = terase(tmpl, "FS")
            terase(tmpl, "DRIVER")
            terase(tmpl, "PATH")
            terase(tmpl, "SOURCE")
            fmt = terase(tmpl, "FORMAT")
            terase(tmpl, "TM_MAD")
            if source and path:
                raise refused("PATH and SOURCE cannot be both set.")
            if source and not fmt:
                raise refused("SOURCE needs FORMAT to be set.")
            if path:
                fmt = ""  # filled in by the datastore driver
            elif not source:
                fmt = fmt or "raw"
            if not xml_safe(tmpl):
                raise refused("Error transforming the Image to XML.")
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

    def _finish_copy(self, image_id: int) -> None:
        """The datastore ``cp`` driver (src/datastore_mad/remotes/fs/cp): copy PATH into the
        datastore or put the image in ERROR."""
        with self._lock:
            img = self.images.get(image_id)
            if img is None or img.state not in (LOCKED, LOCKED_USED, LOCKED_USED_PERS):
                return
            img.timer = None
            ds = self.datastores.get(img.ds_id)
            path, src_id = img.path, img.clone_of
            if src_id is not None:  # a clone copies the source image's file
                src = self.images.get(src_id)
                path = src.source if src is not None else ""
                img.clone_of = None
            if ds is None:
                self._set_error(img, "Error copying image in the datastore: datastore not found")
                return
            if src_id is None and _is_restricted(path, ds.safe_dirs, ds.restricted_dirs):
                self._set_error(img, "Error copying image in the datastore: Not allowed to copy "
                                     f"image from {path}, check RESTRICTED_DIRS in your datastore")
                return
            dest_dir = self.datastore_dir(ds.id)
        try:
            os.makedirs(dest_dir, exist_ok=True)
            digest = hashlib.md5(f"{image_id}-{time.time_ns()}".encode()).hexdigest()
            dest = os.path.join(dest_dir, digest)
            shutil.copyfile(path, dest)
            fmt = image_format(dest)
        except OSError as e:
            with self._lock:
                img = self.images.get(image_id)
                if img is not None and img.state == LOCKED:
                    self._set_error(img, "Error copying image in the datastore: Error copying "
                                         f"{path} to {dest_dir}: {e.strerror or e}")
            return
        with self._lock:
            img = self.images.get(image_id)
            if img is None or img.state not in (LOCKED, LOCKED_USED, LOCKED_USED_PERS):
                os.unlink(dest)  # deleted meanwhile
                return
            if fmt is None:
                os.unlink(dest)
                self._set_error(img, f"Error copying image in the datastore: Unknown image "
                                     f"format src={path}")
                return
            img.source, img.format = dest, fmt
            # Image::set_state_unlock
            new = {LOCKED: READY, LOCKED_USED: USED, LOCKED_USED_PERS: USED_PERS}[img.state]
            img.prev_state, img.state = img.state, new

    @staticmethod
    def _set_error(img: SimImage, message: str) -> None:
        terase(img.template, "ERROR")
        img.template.append(("ERROR", f"{_log_time()} : {message}"))
        img.prev_state, img.state = img.state, ERROR

    # -- one.image.* --------------------------------------------------------------------------
    def _image_info(self, method: str, user: SimUser, image_id: int, decrypt: bool = False) -> str:
        with self._lock:
            img = self._get_image(method, image_id)
            self._authorize(method, user, img, "USE")
            return img.to_xml()

    def _update(self, method: str, obj: SimImage | SimTemplate, template: str,
                update_type: int) -> int:
        """oned: src/rm/RequestManagerUpdateTemplate.cc and PoolObjectSQL replace/append_template.
        A body that is no longer valid XML fails to reach the DB; oned does not check that
        result, so the call succeeds and the object keeps its old template."""
        if update_type not in (0, 1):
            raise OneError(XML_RPC_API, f"[{method}] Wrong update type", obj.id)
        new = self._parse(method, template, INTERNAL, "Cannot update template. ", obj.id)
        result = new if update_type == 0 else merge(obj.template, new)
        if isinstance(obj, SimTemplate):
            terase(result, "NAME")  # VMTemplate::post_update_template keeps NAME out
        if xml_safe(result):
            obj.template = result
        return obj.id

    def _image_update(self, method: str, user: SimUser, image_id: int, template: str,
                      update_type: int = 0) -> int:
        with self._lock:
            img = self._get_image(method, image_id)
            self._authorize(method, user, img, "MANAGE")
            return self._update(method, img, template, update_type)

    def _image_chmod(self, method: str, user: SimUser, image_id: int, *bits: int) -> int:
        if len(bits) != 9:
            raise TypeError(f"one.image.chmod takes 9 permission values, got {len(bits)}")
        with self._lock:
            img = self._get_image(method, image_id)
            self._authorize(method, user, img, "MANAGE")
            if any(b == 1 for b in (bits[2], bits[5], bits[8])):
                self._authorize(method, user, img, "ADMIN")
            img.perms = [old if new == -1 else (1 if new else 0)
                         for old, new in zip(img.perms, bits, strict=True)]
            return img.id

    def _rename(self, method: str, user: SimUser, obj: SimImage | SimTemplate, new_name: str,
                pool: Iterable[SimImage | SimTemplate], what: str) -> int:
        """oned: src/rm/RequestManagerRename.cc -- uniqueness per owner, then the name rules."""
        if obj.name == new_name:
            return obj.id
        self._authorize(method, user, obj, "MANAGE")
        for other in pool:
            if other.name == new_name and other.uid == obj.uid:
                raise OneError(ACTION, f"[{method}] {what} cannot be renamed to {new_name} "
                                       f"because it collides with {what} {other.id}", obj.id)
        problem = name_error(new_name)
        if problem:
            raise OneError(ACTION, f"[{method}] {problem}", obj.id)
        obj.name = new_name
        return obj.id

    def _image_rename(self, method: str, user: SimUser, image_id: int, new_name: str) -> int:
        with self._lock:
            img = self._get_image(method, image_id)
            return self._rename(method, user, img, new_name, self.images.values(), "image")

    def _image_delete(self, method: str, user: SimUser, image_id: int, force: bool = False) -> int:
        # oned: src/rm/RequestManagerDelete.cc, ImageManager::delete_image
        with self._lock:
            img = self._get_image(method, image_id)
            self._authorize(method, user, img, "MANAGE")
            if img.state in (USED, USED_PERS, LOCKED_USED, LOCKED_USED_PERS) or (
                    img.state == READY and img.running_vms):
                raise OneError(ACTION, f"[{method}] Cannot delete image. There are "
                                       f"{img.running_vms} VMs using it.", img.id)
            if img.timer is not None:
                img.timer.cancel()
                self._timers.discard(img.timer)
                img.timer = None
            if not img.source:  # nothing in the datastore: dropped at once
                self.images.pop(img.id, None)
                return img.id
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
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(img.source)

    def _image_enable(self, method: str, user: SimUser, image_id: int, enable: bool) -> int:
        # oned: src/rm/RequestManagerImage.cc ImageEnable, ImageManager::enable_image
        with self._lock:
            img = self._get_image(method, image_id)
            self._authorize(method, user, img, "MANAGE")
            if enable:
                ok = {DISABLED: READY, READY: READY,
                      ERROR: READY if not img.running_vms else (USED_PERS if img.persistent
                                                                else USED)}
            else:
                ok = {READY: DISABLED, ERROR: DISABLED, DISABLED: DISABLED}
            if img.state not in ok:
                raise OneError(INTERNAL, f"[{method}] Could not {'enable' if enable else 'disable'}"
                                         f" image: Image cannot be in state "
                                         f"{IMAGE_STATE_STR[img.state]}.", img.id)
            if ok[img.state] != img.state:
                img.prev_state, img.state = img.state, ok[img.state]
            return img.id

    def _imagepool_info(self, method: str, user: SimUser, filter_flag: int = -2,
                        start_id: int = -1, end_id: int = -1) -> str:
        with self._lock:
            body = self._pool_xml(method, user, self.images.values(), filter_flag, start_id,
                                  end_id)
            return "<IMAGE_POOL>" + body + "</IMAGE_POOL>"

    def _pool_xml(self, method: str, user: SimUser, objs: Iterable[SimImage | SimTemplate | SimVM],
                  filter_flag: int, start_id: int, end_id: int) -> str:
        out = []
        for obj in sorted(objs, key=lambda o: o.id):
            if not self._pool_visible(method, user, obj, filter_flag):
                continue
            if start_id >= 0 and obj.id < start_id:
                continue
            if end_id >= 0 and obj.id > end_id:
                continue
            out.append(obj.to_xml())
        return "".join(out)

    def _pool_visible(self, method: str, user: SimUser, obj: SimImage | SimTemplate | SimVM,
                      flag: int) -> bool:
        admin = user.uid == 0 or user.gid == 0
        if flag == -3:  # MINE
            return obj.uid == user.uid
        if flag == -1:  # MINE_GROUP
            return obj.uid == user.uid or obj.gid == user.gid
        if flag == -4:  # GROUP
            return obj.gid == user.gid
        visible = admin or self._allowed(user, obj.uid, obj.gid, obj.perms, "USE")
        if flag == -2:  # ALL
            return visible
        if flag >= 0:  # one user
            return obj.uid == flag and visible
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
        return (
            "<DATASTORE>"
            f"<ID>{ds.id}</ID><UID>{ds.uid}</UID><GID>{ds.gid}</GID>"
            "<UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME>"
            f"<NAME>{_esc(ds.name)}</NAME>{_perms_xml(ds.perms)}"
            f"<DS_MAD>{cdata(ds.ds_mad)}</DS_MAD><TM_MAD>{cdata(ds.tm_mad)}</TM_MAD>"
            f"<BASE_PATH>{cdata(self.datastore_dir(ds.id))}</BASE_PATH>"
            f"<TYPE>{DS_TYPES[ds.type]}</TYPE><DISK_TYPE>0</DISK_TYPE>"
            "<STATE>0</STATE>"
            "<CLUSTERS><ID>0</ID></CLUSTERS>"
            f"<TOTAL_MB>{ds.mon_total_mb}</TOTAL_MB><FREE_MB>{ds.mon_free_mb}</FREE_MB>"
            f"<USED_MB>{ds.mon_used_mb}</USED_MB>"
            f"{_ids_xml('IMAGES', images)}"
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

    # -- one.template.* (src/rm/RequestManagerAllocate.cc TemplateAllocate,
    #    src/vm_template/VMTemplatePool.cc, RequestManagerVMTemplate.cc, RequestManagerClone.cc) --
    def _new_template(self, method: str, user: SimUser, tmpl: Template) -> int:
        name = terase(tmpl, "NAME")
        problem = name_error(name)
        if problem:  # TemplateAllocate::pool_allocate answers INTERNAL
            raise OneError(INTERNAL, f"[{method}] {problem}")
        for other in self.templates.values():
            if other.name == name and other.uid == user.uid:
                raise OneError(INTERNAL, f"[{method}] NAME is already taken by TEMPLATE "
                                         f"{other.id}.")
        if not xml_safe(tmpl):
            raise OneError(INTERNAL, f"[{method}] Error transforming the Template to XML.")
        tid = self._next_template_id
        self._next_template_id += 1
        self.templates[tid] = SimTemplate(
            id=tid, uid=user.uid, gid=user.gid, uname=user.name, gname=user.gname, name=name,
            perms=[1, 1, 0, 0, 0, 0, 0, 0, 0], regtime=int(time.time()), template=tmpl)
        return tid

    def _template_allocate(self, method: str, user: SimUser, template: str) -> int:
        tmpl = self._parse(method, template)
        with self._lock:
            return self._new_template(method, user, tmpl)

    def _template_info(self, method: str, user: SimUser, template_id: int,
                       extended: bool = False, decrypt: bool = False) -> str:
        with self._lock:
            t = self._get_template(method, template_id)
            self._authorize(method, user, t, "USE")
            return t.to_xml()

    def _templatepool_info(self, method: str, user: SimUser, filter_flag: int = -2,
                           start_id: int = -1, end_id: int = -1) -> str:
        with self._lock:
            body = self._pool_xml(method, user, self.templates.values(), filter_flag, start_id,
                                  end_id)
            return "<VMTEMPLATE_POOL>" + body + "</VMTEMPLATE_POOL>"

    def _template_update(self, method: str, user: SimUser, template_id: int, template: str,
                         update_type: int = 0) -> int:
        with self._lock:
            t = self._get_template(method, template_id)
            self._authorize(method, user, t, "MANAGE")
            return self._update(method, t, template, update_type)

    def _template_rename(self, method: str, user: SimUser, template_id: int, new_name: str) -> int:
        with self._lock:
            t = self._get_template(method, template_id)
            return self._rename(method, user, t, new_name, self.templates.values(),
                                "virtual machine template")

    def _template_delete(self, method: str, user: SimUser, template_id: int,
                         recursive: bool = False) -> int:
        with self._lock:
            t = self._get_template(method, template_id)
            self._authorize(method, user, t, "MANAGE")
            if recursive:  # TemplateDelete::drop deletes the images its DISKs name
                for disk in vectors(t.template, "DISK"):
                    iid = self._disk_image_id(disk, user.uid)
                    if iid is not None and iid in self.images:
                        self._image_delete("one.image.delete", user, iid)
            del self.templates[t.id]
            return t.id

    def _disk_image_id(self, disk: dict[str, str], uid: int) -> int | None:
        """VirtualMachineDisk::get_image_id: IMAGE_ID, or IMAGE looked up for its owner."""
        if disk.get("IMAGE_ID", "").strip().lstrip("-").isdigit():
            return int(disk["IMAGE_ID"])
        if "IMAGE" in disk:
            owner = self._disk_owner(disk, uid)
            for img in self.images.values():
                if img.name == disk["IMAGE"] and img.uid == owner:
                    return img.id
        return None

    def _disk_owner(self, disk: dict[str, str], uid: int) -> int:
        """VirtualMachineDisk::get_uid: IMAGE_UID, else IMAGE_UNAME's user, else the VM owner."""
        if disk.get("IMAGE_UID"):
            try:
                return int(disk["IMAGE_UID"])
            except ValueError:
                return -1
        if disk.get("IMAGE_UNAME"):
            owner = self.users.get(disk["IMAGE_UNAME"])
            return owner.uid if owner is not None else -1
        return uid

    def _template_clone(self, method: str, user: SimUser, template_id: int, name: str,
                        recursive: bool = False) -> int:
        with self._lock:
            src = self._get_template(method, template_id)
            self._authorize(method, user, src, "USE")
            tmpl = copy.deepcopy(src.template)
            tmpl.append(("NAME", name))
            try:
                new_id = self._new_template(method, user, tmpl)
            except OneError as e:  # RequestManagerClone::clone answers ALLOCATE
                reason = e.message.split("] ", 1)[1]
                raise OneError(ALLOCATE, f"[{method}] Error allocating a new virtual machine "
                                         f"template. {reason}") from None
            if not recursive:
                return new_id
            # VMTemplateClone::clone: each image DISK gets a copy named NAME-disk-N
            new = self.templates[new_id]
            ndisk = 0
            for k, disk in new.template:
                if k != "DISK" or not isinstance(disk, dict):
                    continue
                iid = self._disk_image_id(disk, user.uid)
                if iid is not None:
                    clone_id = self._image_clone(user, iid, f"{name}-disk-{ndisk}")
                    for attr in ("IMAGE", "IMAGE_UNAME", "IMAGE_UID", "OPENNEBULA_MANAGED"):
                        disk.pop(attr, None)
                    disk["IMAGE_ID"] = str(clone_id)
                ndisk += 1
            return new_id

    def _image_clone(self, user: SimUser, image_id: int, name: str) -> int:
        """ImageClone: a new image in the source's datastore, LOCKED while its file is copied."""
        src = self._get_image("one.image.clone", image_id)
        self._authorize("one.image.clone", user, src, "USE")
        problem = name_error(name)
        if problem is None:
            for other in self.images.values():
                if other.name == name and other.uid == user.uid:
                    problem = f"NAME is already taken by IMAGE {other.id}."
        if problem:
            raise OneError(ACTION, f"[one.template.clone] Failed to clone images: {problem}")
        new_id = self._next_image_id
        self._next_image_id += 1
        self.images[new_id] = SimImage(
            id=new_id, uid=user.uid, gid=user.gid, uname=user.name, gname=user.gname, name=name,
            perms=[1, 1, 0, 0, 0, 0, 0, 0, 0], type=src.type, persistent=0,
            regtime=int(time.time()), path="", source="", format=src.format, fs=src.fs,
            size_mb=src.size_mb, state=LOCKED, prev_state=INIT, ds_id=src.ds_id,
            ds_name=src.ds_name, template=copy.deepcopy(src.template), clone_of=src.id)
        terase(self.images[new_id].template, "ERROR")
        if not self.stuck:
            self.images[new_id].timer = self._schedule(self.copy_delay, self._finish_copy, new_id)
        return new_id

    def _template_instantiate(self, method: str, user: SimUser, template_id: int, name: str = "",
                              hold: bool = False, extra: str = "",
                              persistent: bool = False) -> int:
        with self._lock:
            t = self._get_template(method, template_id)
            if persistent:
                clone_name = name or f"{t.name}-copy"
                template_id = self._template_clone("one.template.clone", user, t.id, clone_name,
                                                   True)
                t = self.templates[template_id]
            tmpl = copy.deepcopy(t.template)
            if extra:
                tmpl = merge(tmpl, self._parse(method, extra))
            self._authorize(method, user, t, "USE")
            for k in ("NAME", "TEMPLATE_NAME", "TEMPLATE_ID"):
                terase(tmpl, k)
            tmpl.append(("TEMPLATE_NAME", t.name))
            tmpl.append(("TEMPLATE_ID", str(t.id)))
            if name:
                tmpl.append(("NAME", name))
            return self._new_vm(method, user, tmpl, hold)

    # -- one.vm.* -------------------------------------------------------------------------------
    def _vm_allocate(self, method: str, user: SimUser, template: str, hold: bool = False) -> int:
        tmpl = self._parse(method, template)
        with self._lock:
            return self._new_vm(method, user, tmpl, hold)

    def _new_vm(self, method: str, user: SimUser, tmpl: Template, hold: bool) -> int:
        """VirtualMachine::insert with the dummy drivers: DISKs acquire their images
        (src/image/ImagePool.cc acquire_disk, ImageManagerActions.cc acquire_image)."""
        vm_id = self._next_vm_id
        disks = vectors(tmpl, "DISK")
        images: list[SimImage] = []
        for disk in disks:  # VirtualMachine::set_auth_request: USE on every image
            iid = self._disk_image_id(disk, user.uid)
            if iid is not None and iid in self.images:
                self._authorize(method, user, self.images[iid], "USE")
        if vectors(tmpl, "NIC"):
            raise OneError(INTERNAL, f"[{method}] NIC 0: this stand-in has no virtual networks; "
                                     "leave NICs out of VMs")
        prefix = terase(tmpl, "TEMPLATE_NAME") or "one"
        name = terase(tmpl, "NAME") or f"{prefix}-{vm_id}"
        problem = name_error(name)
        if problem:
            raise OneError(INTERNAL, f"[{method}] {problem}")
        if tget(tmpl, "TEMPLATE_ID") is not None or prefix != "one":
            tmpl.append(("TEMPLATE_NAME", prefix))
        try:
            for disk_id, disk in enumerate(disks):
                img = self._acquire_disk(vm_id, disk, user.uid, disk_id)
                if img is not None:
                    images.append(img)
                disk["DISK_ID"] = str(disk_id)
        except OneError as e:
            for img in images:
                self._release(img, vm_id)
            raise OneError(INTERNAL, f"[{method}] DISK {disk_id}: {e.message}") from None
        self._next_vm_id += 1
        keep = [(k, v) for k, v in tmpl if k in VM_TEMPLATE_KEYS]
        user_tmpl = [(k, v) for k, v in tmpl if k not in VM_TEMPLATE_KEYS]
        keep.append(("VMID", str(vm_id)))
        vm = SimVM(id=vm_id, uid=user.uid, gid=user.gid, uname=user.name, gname=user.gname,
                   name=name, perms=[1, 1, 0, 0, 0, 0, 0, 0, 0],
                   state=VM_HOLD if hold else VM_PENDING, lcm_state=LCM_LCM_INIT, prev_state=0,
                   prev_lcm_state=0, stime=int(time.time()), etime=0, template=keep,
                   user_template=user_tmpl, image_ids=[i.id for i in images])
        self.vms[vm_id] = vm
        if not hold:
            self._schedule(self.deploy_delay, self._deploy, vm_id)
        return vm_id

    def _acquire_disk(self, vm_id: int, disk: dict[str, str], uid: int,
                      disk_id: int) -> SimImage | None:
        img: SimImage | None
        if "IMAGE_ID" in disk:
            try:
                img = self.images.get(int(disk["IMAGE_ID"]))
            except ValueError:
                img = None
            if img is None:
                raise OneError(INTERNAL, f"Image with ID: {disk['IMAGE_ID']} does not exist")
        elif "IMAGE" in disk:
            owner = self._disk_owner(disk, uid)
            img = next((i for i in self.images.values()
                        if i.name == disk["IMAGE"] and i.uid == owner), None)
            if img is None:
                raise OneError(INTERNAL, f"User {owner if owner != -1 else uid} does not own an "
                                         f"image with name: {disk['IMAGE']} . Set IMAGE_UNAME or "
                                         "IMAGE_UID of owner in DISK.")
        else:  # volatile disk
            dtype = disk.get("TYPE", "").upper()
            if dtype not in ("SWAP", "FS"):
                raise OneError(INTERNAL, f"Unknown disk type {dtype}")
            if not disk.get("SIZE", "").isdigit() or int(disk["SIZE"]) <= 0:
                raise OneError(INTERNAL, "SIZE attribute must be a positive integer value.")
            return None
        if img.type not in (IMAGE_TYPES["OS"], IMAGE_TYPES["DATABLOCK"], IMAGE_TYPES["CDROM"]):
            raise OneError(INTERNAL, f"Image {img.id} ({img.name}) of type "
                                     f"{IMAGE_TYPE_STR[img.type]} cannot be used as DISK.")
        shareable = (img.tget("PERSISTENT_TYPE") or "").upper() == "SHAREABLE"
        if img.state == READY:
            img.prev_state, img.state = img.state, USED_PERS if img.persistent else USED
        elif img.state == LOCKED:
            img.prev_state, img.state = img.state, (LOCKED_USED_PERS if img.persistent
                                                    else LOCKED_USED)
        elif img.state in (USED_PERS, LOCKED_USED_PERS) and not shareable:
            raise OneError(INTERNAL, f"Cannot acquire image {img.id}, it is persistent and "
                                     "already in use")
        elif img.state not in (USED, USED_PERS, LOCKED_USED, LOCKED_USED_PERS):
            raise OneError(INTERNAL, f"Cannot acquire image {img.id}, it is in state: "
                                     f"{IMAGE_STATE_STR[img.state]}")
        img.vms.append(vm_id)
        # Image::disk_attribute
        disk.update({
            "IMAGE": img.name, "IMAGE_ID": str(img.id), "IMAGE_UID": str(img.uid),
            "IMAGE_UNAME": img.uname, "IMAGE_STATE": str(img.state), "SOURCE": img.source,
            "ORIGINAL_SIZE": str(img.size_mb), "DATASTORE": img.ds_name,
            "DATASTORE_ID": str(img.ds_id), "DEV_PREFIX": disk.get("DEV_PREFIX") or
            img.tget("DEV_PREFIX") or "sd", "READONLY": "NO", "TYPE": "FILE",
            "CLONE": "NO" if img.persistent else "YES", "SAVE": "YES" if img.persistent else "NO",
        })
        disk.setdefault("SIZE", str(img.size_mb))
        if img.format:
            disk["DRIVER"] = disk["FORMAT"] = img.format
        if img.persistent:
            disk["PERSISTENT"] = "YES"
        return img

    def _release(self, img: SimImage, vm_id: int) -> None:
        """ImageManager::release_image: the last VM gone puts the image back to READY."""
        if vm_id in img.vms:
            img.vms.remove(vm_id)
        if not img.vms:
            back = {USED: READY, USED_PERS: READY, LOCKED_USED: LOCKED,
                    LOCKED_USED_PERS: LOCKED}
            if img.state in back:
                img.prev_state, img.state = img.state, back[img.state]

    def _deploy(self, vm_id: int) -> None:
        """The scheduler deploys on a dummy host: PENDING -> ACTIVE/RUNNING."""
        with self._lock:
            vm = self.vms.get(vm_id)
            if vm is None or vm.state != VM_PENDING:
                return
            vm.prev_state, vm.prev_lcm_state = vm.state, vm.lcm_state
            vm.state, vm.lcm_state = VM_ACTIVE, LCM_RUNNING

    def _done(self, vm_id: int) -> None:
        with self._lock:
            vm = self.vms.get(vm_id)
            if vm is None or vm.state == VM_DONE:
                return
            vm.prev_state, vm.prev_lcm_state = vm.state, vm.lcm_state
            vm.state, vm.lcm_state, vm.etime = VM_DONE, LCM_LCM_INIT, int(time.time())
            for iid in vm.image_ids:
                img = self.images.get(iid)
                if img is not None:
                    self._release(img, vm_id)

    def _vm_info(self, method: str, user: SimUser, vm_id: int, decrypt: bool = False) -> str:
        with self._lock:
            vm = self._get_vm(method, vm_id)
            self._authorize(method, user, vm, "USE")
            return vm.to_xml()

    def _vmpool_info(self, method: str, user: SimUser, filter_flag: int = -2,
                     start_id: int = -1, end_id: int = -1, state: int = -1) -> str:
        with self._lock:
            # state -1: every VM but DONE; -2: all
            vms = [v for v in self.vms.values()
                   if (state == -2) or (state == -1 and v.state != VM_DONE) or v.state == state]
            body = self._pool_xml(method, user, vms, filter_flag, start_id, end_id)
            return "<VM_POOL>" + body + "</VM_POOL>"

    def _vm_action(self, method: str, user: SimUser, action: str, vm_id: int) -> int:
        # oned: src/rm/RequestManagerVirtualMachine.cc VirtualMachineAction,
        # src/dm/DispatchManagerActions.cc DispatchManager::terminate
        with self._lock:
            vm = self._get_vm(method, vm_id)
            self._authorize(method, user, vm, "MANAGE")
            if action not in ("terminate", "terminate-hard"):
                raise OneError(ACTION, f'[{method}] Action "{action}" is not supported', vm_id)
            if vm.state in (VM_PENDING, VM_HOLD, VM_INIT):
                self._done(vm_id)
            elif vm.state == VM_ACTIVE and vm.lcm_state == LCM_RUNNING:
                self._schedule(self.terminate_delay, self._done, vm_id)
            elif vm.state != VM_DONE:
                raise OneError(ACTION, f'[{method}] Error performing action "{action}": Could '
                                       f"not terminate VM {vm_id}, wrong state "
                                       f"{VM_STATE_STR.get(vm.state, vm.state)}.", vm_id)
            return vm_id
