"""The fake oned answers the unmodified pyone client the way a real oned 6.10.5 does."""

from __future__ import annotations

import os
import re
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyone
import pytest

try:
    from onesim import OneSim, SimDatastore, SimUser, parse_template
    from onesim.server import ACTION, DELETE, ERROR, LOCKED, READY, USED
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.onesim import OneSim, SimDatastore, SimUser, parse_template
    from tests.onesim.server import ACTION, DELETE, ERROR, LOCKED, READY, USED

KICK = "kick:kick-secret-pw"


@pytest.fixture
def safe_dir(tmp_path: Path) -> Path:
    d = tmp_path / "safe"
    d.mkdir()
    return d


@pytest.fixture
def sim(safe_dir: Path) -> Iterator[OneSim]:
    users = [SimUser("oneadmin", "onepass", 0, 0, "oneadmin"),
             SimUser("kick", "kick-secret-pw", 2, 1, "users"),
             SimUser("mate", "mate-pw", 3, 1, "users"),
             SimUser("stranger", "stranger-pw", 4, 100, "others")]
    dss = [SimDatastore(0, "system", "SYSTEM"),
           SimDatastore(1, "default", "IMAGE", safe_dirs=["/var/tmp", str(safe_dir)]),
           SimDatastore(2, "files", "FILE"),
           SimDatastore(100, "strict", "IMAGE"),
           SimDatastore(101, "tiny", "IMAGE", free_mb=0, safe_dirs=[str(safe_dir)])]
    with OneSim(users=users, datastores=dss, copy_delay=0.05, delete_delay=0.05) as s:
        yield s


def client(sim: OneSim, session: str = KICK) -> Any:
    return pyone.OneServer(sim.endpoint, session=session)


@pytest.fixture
def one(sim: OneSim) -> Any:
    return client(sim)


def make_qcow2(path: Path, virtual: str = "10M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), virtual], check=True,
                   timeout=30)
    return path


@pytest.fixture
def qcow(safe_dir: Path) -> Path:
    return make_qcow2(safe_dir / "disk.qcow2")


def wait_state(one: Any, image_id: int, state: int, timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        img = one.image.info(image_id)
        if state in (img.STATE,) or time.monotonic() > deadline:
            return img
        time.sleep(0.02)


# --- parsing by pyone's bindings ----------------------------------------------------------------
def test_version_and_datastore_pool_parse(one: Any) -> None:
    assert one.system.version() == "6.10.5"
    pool = one.datastorepool.info()
    by_id = {d.ID: d for d in pool.DATASTORE}
    assert set(by_id) == {0, 1, 2, 100, 101}
    default = by_id[1]
    assert (default.NAME, default.TYPE, default.STATE) == ("default", 0, 0)
    assert isinstance(default.FREE_MB, int) and default.FREE_MB > 0
    assert by_id[0].TYPE == pyone.DATASTORE_TYPES.SYSTEM
    assert by_id[2].TYPE == pyone.DATASTORE_TYPES.FILE
    assert default.TEMPLATE["TYPE"] == "IMAGE_DS"
    assert "/var/tmp" in default.TEMPLATE["SAFE_DIRS"].split()
    assert by_id[100].TEMPLATE["RESTRICTED_DIRS"] == "/"
    assert default.PERMISSIONS.OWNER_U == 1
    assert one.datastore.info(1).NAME == "default"


def test_allocate_locked_then_ready_with_real_copy(sim: OneSim, one: Any, qcow: Path) -> None:
    tmpl = (f'NAME = "img1"\nPATH = "{qcow}"\nTYPE = "OS"\nFORMAT = "qcow2"\n'
            'DESCRIPTION = "first"\nSHA256 = "abc"\nSIZE = "12345"\n')
    image_id = one.image.allocate(tmpl, 1)
    assert image_id == 0
    img = one.image.info(image_id)
    assert img.STATE == LOCKED == pyone.IMAGE_STATES.LOCKED
    assert (img.NAME, img.UNAME, img.UID, img.GID, img.DATASTORE_ID) == ("img1", "kick", 2, 1, 1)
    assert Path(img.PATH) == qcow
    assert img.FORMAT == ""  # the datastore driver fills it in
    img = wait_state(one, image_id, READY)
    assert img.STATE == READY
    assert isinstance(img.SIZE, int) and img.SIZE == 10  # the virtual size in MiB, not the file's
    assert img.FORMAT == "qcow2"
    assert Path(img.SOURCE).read_bytes() == qcow.read_bytes()
    assert Path(img.SOURCE).parent == Path(sim.datastore_dir(1))
    # oned takes NAME, TYPE, PATH, FORMAT, SIZE out of TEMPLATE, adds DEV_PREFIX
    assert dict(img.TEMPLATE) == {"DESCRIPTION": "first", "SHA256": "abc", "DEV_PREFIX": "sd"}
    assert img.PERMISSIONS.OWNER_U == 1 and img.PERMISSIONS.OWNER_M == 1
    assert img.PERMISSIONS.GROUP_U == 0 and img.PERMISSIONS.OTHER_U == 0
    assert img.SNAPSHOTS.ALLOW_ORPHANS == "NO"
    assert img.REGTIME > 0 and img.RUNNING_VMS == 0


def test_imagepool_filters(sim: OneSim, qcow: Path) -> None:
    kick, mate = client(sim), client(sim, "mate:mate-pw")
    stranger, admin = client(sim, "stranger:stranger-pw"), client(sim, "oneadmin:onepass")
    k = kick.image.allocate(f'NAME="k"\nPATH="{qcow}"', 1)
    m = mate.image.allocate(f'NAME="m"\nPATH="{qcow}"', 1)
    s = stranger.image.allocate(f'NAME="s"\nPATH="{qcow}"', 1)

    def ids(c: Any, flag: int) -> list[int]:
        return [i.ID for i in c.imagepool.info(flag, -1, -1).IMAGE]

    assert ids(kick, -3) == [k]
    assert ids(kick, -1) == [k, m]  # mine and my group's
    assert ids(kick, -2) == [k]  # all I may use: nothing shared yet
    assert ids(admin, -2) == [k, m, s]
    stranger.image.chmod(s, -1, -1, -1, -1, -1, -1, 1, -1, -1)
    assert ids(kick, -2) == [k, s]
    assert ids(kick, 4) == [s]
    assert [i.ID for i in admin.imagepool.info(-2, m, m).IMAGE] == [m]


# --- errors as pyone sees them ----------------------------------------------------------------
def test_wrong_password_is_authentication_error(sim: OneSim) -> None:
    with pytest.raises(pyone.OneAuthenticationException) as e:
        client(sim, "kick:wrong").datastorepool.info()
    assert str(e.value) == ("[one.datastorepool.info] User couldn't be authenticated, "
                            "aborting call.")
    with pytest.raises(pyone.OneAuthenticationException):
        client(sim, "nobody:x").image.info(0)


@pytest.mark.parametrize(
    ("template", "ds", "exc", "message"),
    [
        ('NAME="a"\nPATH="{qcow}"', 999, pyone.OneNoExistsException,
         "[one.image.allocate] Error getting datastore [999]."),
        ('NAME="a"\nPATH="/nonexistent/x.qcow2"', 1, pyone.OneInternalException,
         "[one.image.allocate] Cannot parse image SIZE: cannot access '/nonexistent/x.qcow2' "
         "(No such file or directory)"),
        ('NAME="a"\nPATH="relative.qcow2"', 1, pyone.OneInternalException,
         "[one.image.allocate] Cannot parse image SIZE: cannot access 'relative.qcow2' "
         "(No such file or directory)"),
        ('NAME="a"\nPATH="{qcow}"', 0, pyone.OneException,
         "[one.image.allocate] Error allocating a new image. New images can only be allocated in "
         "a files or image datastore."),
        ('NAME="a"\nPATH="{qcow}"', 101, pyone.OneActionException,
         "[one.image.allocate] Not enough space in datastore"),
        ('NAME="a"\nPATH="{qcow}"\nSOURCE="/x"\nSIZE="1"', 1, pyone.OneException,
         "[one.image.allocate] Error allocating a new image. PATH and SOURCE cannot be both set."),
    ],
)
def test_allocate_errors(one: Any, qcow: Path, template: str, ds: int, exc: type,
                         message: str) -> None:
    with pytest.raises(exc) as e:
        one.image.allocate(template.format(qcow=qcow), ds)
    assert type(e.value) is exc
    assert str(e.value) == message


def test_duplicate_name_per_owner(sim: OneSim, one: Any, qcow: Path) -> None:
    one.image.allocate(f'NAME="dup"\nPATH="{qcow}"', 1)
    with pytest.raises(pyone.OneException) as e:
        one.image.allocate(f'NAME="dup"\nPATH="{qcow}"', 1)
    assert type(e.value) is pyone.OneException
    assert str(e.value) == ("[one.image.allocate] Error allocating a new image. NAME is already "
                            "taken by IMAGE 0.")
    # another owner may use the same NAME
    assert client(sim, "mate:mate-pw").image.allocate(
        f'NAME="dup"\nPATH="{qcow}"', 1) == 1


def test_unknown_image(one: Any) -> None:
    with pytest.raises(pyone.OneNoExistsException) as e:
        one.image.info(9999)
    assert str(e.value) == "[one.image.info] Error getting image [9999]."


def test_other_users_get_authorization_errors(sim: OneSim, one: Any, qcow: Path) -> None:
    image_id = one.image.allocate(f'NAME="priv"\nPATH="{qcow}"', 1)
    mate = client(sim, "mate:mate-pw")
    with pytest.raises(pyone.OneAuthorizationException) as e:
        mate.image.info(image_id)
    assert str(e.value) == "[one.image.info] User [3] : Not authorized to perform USE IMAGE [0]."
    with pytest.raises(pyone.OneAuthorizationException):
        mate.image.delete(image_id)
    # group use: mate may look at it but still not delete it
    one.image.chmod(image_id, -1, -1, -1, 1, -1, -1, -1, -1, -1)
    assert mate.image.info(image_id).PERMISSIONS.GROUP_U == 1
    with pytest.raises(pyone.OneAuthorizationException):
        mate.image.delete(image_id)
    with pytest.raises(pyone.OneAuthorizationException):
        client(sim, "stranger:stranger-pw").image.info(image_id)
    # setting ADMIN bits needs ADMIN rights the owner does not have by default
    with pytest.raises(pyone.OneAuthorizationException):
        one.image.chmod(image_id, -1, -1, 1, -1, -1, -1, -1, -1, -1)


def test_safe_dirs_violation_ends_in_error(one: Any, qcow: Path) -> None:
    image_id = one.image.allocate(f'NAME="bad"\nPATH="{qcow}"', 100)
    img = wait_state(one, image_id, ERROR)
    assert img.STATE == ERROR
    err = img.TEMPLATE["ERROR"]
    assert re.match(r"^\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} : Error copying image in the "
                    r"datastore: .*check RESTRICTED_DIRS in your datastore$", err), err
    assert str(qcow) in err


def test_stuck_mode_keeps_images_locked(qcow: Path) -> None:
    with OneSim(datastores=[SimDatastore(1, "default", safe_dirs=[str(qcow.parent)])],
                stuck=True) as sim:
        one = client(sim)
        image_id = one.image.allocate(f'NAME="s"\nPATH="{qcow}"', 1)
        time.sleep(0.4)
        assert one.image.info(image_id).STATE == LOCKED
        one.image.delete(image_id)
        assert sim.wait_for(lambda: sim.image(image_id) is None)


def test_update_rename_enable_delete(sim: OneSim, one: Any, qcow: Path) -> None:
    image_id = one.image.allocate(f'NAME="u"\nPATH="{qcow}"\nA="1"', 1)
    wait_state(one, image_id, READY)
    one.image.update(image_id, 'B = "2"', 1)
    assert dict(one.image.info(image_id).TEMPLATE) == {
        "A": "1", "DEV_PREFIX": "sd", "B": "2"}
    one.image.update(image_id, 'C = "3"', 0)
    assert dict(one.image.info(image_id).TEMPLATE) == {"C": "3"}
    one.image.rename(image_id, "u2")
    assert one.image.info(image_id).NAME == "u2"
    other = one.image.allocate(f'NAME="x"\nPATH="{qcow}"', 1)
    with pytest.raises(pyone.OneActionException):
        one.image.rename(other, "u2")
    one.image.enable(image_id, False)
    assert one.image.info(image_id).STATE == pyone.IMAGE_STATES.DISABLED
    one.image.enable(image_id, True)
    assert one.image.info(image_id).STATE == READY
    source = one.image.info(image_id).SOURCE
    assert one.image.delete(image_id) == image_id
    assert one.image.info(image_id).STATE == DELETE  # async rm
    assert sim.wait_for(lambda: sim.image(image_id) is None)
    assert not os.path.exists(source)
    with pytest.raises(pyone.OneNoExistsException):
        one.image.info(image_id)


def test_inject_failure(sim: OneSim, one: Any) -> None:
    sim.inject_failure("one.system.version", ACTION, "boom")
    with pytest.raises(pyone.OneActionException, match=r"^\[one.system.version\] boom$"):
        one.system.version()
    assert one.system.version() == "6.10.5"


def test_unknown_method_is_a_fault(one: Any) -> None:
    with pytest.raises(pyone.OneException, match="not defined"):
        one.vn.info(0)


# --- templates --------------------------------------------------------------------------------
def test_template_syntax_like_oned() -> None:
    text = ('# comment\nname = "a \\"quoted\\" c:\\\\x"\nUNQUOTED = bare\n'
            'EMPTY =\nVEC = [ a = "1", B = "two words" ]\n'
            'MULTI = "line1\nline2"\n2ND = "x"\n')
    assert parse_template(text) == [
        ("NAME", 'a "quoted" c:\\\\x'),  # only \" is an escape: backslashes stay as sent
        ("UNQUOTED", "bare"),
        ("EMPTY", ""),
        ("VEC", {"A": "1", "B": "two words"}),
        ("MULTI", "line1\nline2"),
        ("ONE_2ND", "x"),
    ]
    assert parse_template("<TEMPLATE><NAME><![CDATA[x]]></NAME><V><A>1</A></V></TEMPLATE>") == [
        ("NAME", "x"), ("V", {"A": "1"})]


def test_pyone_dict_templates_are_understood(one: Any, qcow: Path) -> None:
    # a flat dict becomes KEY="value" lines, a nested one XML with CDATA
    flat = one.image.allocate({"NAME": "flat", "PATH": str(qcow), "X": "1"}, 1)
    nested = one.image.allocate(
        {"TEMPLATE": {"NAME": "nested", "PATH": str(qcow), "Y": "a<b>&c"}}, 1)
    assert one.image.info(flat).TEMPLATE["X"] == "1"
    info = one.image.info(nested)
    assert (info.NAME, info.TEMPLATE["Y"]) == ("nested", "a<b>&c")


def test_syntax_error_is_internal(one: Any) -> None:
    with pytest.raises(pyone.OneInternalException, match="Parse error"):
        one.image.allocate('NAME = "x"\n= oops', 1)


# --- SIZE from the datastore's stat driver ---------------------------------------------------------
def test_size_is_the_virtual_size_in_mib(one: Any, safe_dir: Path) -> None:
    big = make_qcow2(safe_dir / "big.qcow2", "1G")
    assert big.stat().st_size < 1024 * 1024  # a small file...
    image_id = one.image.allocate(f'NAME="big"\nPATH="{big}"', 1)
    assert wait_state(one, image_id, READY).SIZE == 1024  # ...with 1 GiB virtual size
    raw = safe_dir / "disk.raw"
    raw.write_bytes(os.urandom(3 * 1024 * 1024 + 1))
    raw_id = one.image.allocate(f'NAME="raw"\nPATH="{raw}"', 1)
    img = wait_state(one, raw_id, READY)
    assert (img.SIZE, img.FORMAT) == (4, "raw")  # MiB rounded up


def test_capacity_check_counts_the_virtual_size(sim: OneSim, safe_dir: Path) -> None:
    sim.add_datastore(SimDatastore(7, "small", "IMAGE", free_mb=500,
                                   safe_dirs=[str(safe_dir)]))
    sim.monitor()
    one = client(sim)
    big = make_qcow2(safe_dir / "big.qcow2", "1G")
    with pytest.raises(pyone.OneActionException,
                       match=r"^\[one.image.allocate\] Not enough space in datastore$"):
        one.image.allocate(f'NAME="big"\nPATH="{big}"', 7)
    small = make_qcow2(safe_dir / "s.qcow2", "400M")
    assert one.image.allocate(f'NAME="ok"\nPATH="{small}"', 7) == 0


@pytest.mark.parametrize(("content", "reason"), [
    (b"QFI\xfb" + b"\xff" * 3000, "Failed to detect image format"),  # a qcow2 header qemu-img refuses
    (b"", "Runtime error during size estimation"),
])
def test_bytes_the_stat_driver_cannot_read_are_refused(sim: OneSim, one: Any, safe_dir: Path,
                                                       content: bytes, reason: str) -> None:
    bad = safe_dir / "bad.img"
    bad.write_bytes(content)
    with pytest.raises(pyone.OneInternalException) as e:
        one.image.allocate(f'NAME="bad"\nPATH="{bad}"', 1)
    assert str(e.value) == f"[one.image.allocate] Cannot parse image SIZE: {reason}"
    assert not sim.find_images()


# --- names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ch", [*list("&|:\\\";/'#{}$<>"), "\t"])
def test_names_refuse_oneds_characters(one: Any, qcow: Path, ch: str) -> None:
    with pytest.raises(pyone.OneException) as e:
        one.image.allocate({"NAME": f"a{ch}b", "PATH": str(qcow)} if ch in "\"\\" else
                           f'NAME="a{ch}b"\nPATH="{qcow}"', 1)
    assert type(e.value) is pyone.OneException  # ALLOCATE, 0x4000
    assert str(e.value) == (f"[one.image.allocate] Error allocating a new image. Invalid NAME, "
                            f"char '{ch}' is not allowed")


def test_name_length_is_128_bytes(sim: OneSim, one: Any, qcow: Path) -> None:
    assert one.image.allocate(f'NAME="{"n" * 128}"\nPATH="{qcow}"', 1) == 0
    assert one.image.allocate(f'NAME="{"é" * 64}"\nPATH="{qcow}"', 1) == 1  # 128 bytes of UTF-8
    for name in ("n" * 129, "é" * 65):
        with pytest.raises(pyone.OneException, match=r"Invalid NAME, max length is 128 chars$"):
            one.image.allocate(f'NAME="{name}"\nPATH="{qcow}"', 1)
    with pytest.raises(pyone.OneActionException, match=r"^\[one.image.rename\] Invalid NAME, "
                                                       r"char ':' is not allowed$"):
        one.image.rename(0, "a:b")
    with pytest.raises(pyone.OneInternalException, match=r"^\[one.template.allocate\] Invalid "
                                                         r"NAME, char '\$' is not allowed$"):
        one.template.allocate('NAME="t$"')


# --- FREE_MB follows monitoring ------------------------------------------------------------------------
def free_mb(one: Any, ds_id: int) -> int:
    return int(one.datastore.info(ds_id).FREE_MB)


def test_free_mb_drops_on_a_monitoring_tick_not_at_allocate(sim: OneSim, one: Any,
                                                           safe_dir: Path) -> None:
    data = safe_dir / "data.raw"
    data.write_bytes(os.urandom(5 * 1024 * 1024))
    before = free_mb(one, 1)
    image_id = one.image.allocate(f'NAME="d"\nPATH="{data}"', 1)
    img = wait_state(one, image_id, READY)
    assert free_mb(one, 1) == before  # copied, but not monitored yet
    sim.monitor()
    used = -(-os.stat(img.SOURCE).st_blocks * 512 // (1024 * 1024))
    assert used >= 5 and free_mb(one, 1) == before - used
    ds = one.datastore.info(1)
    assert ds.USED_MB == ds.TOTAL_MB - ds.FREE_MB
    one.image.delete(image_id)
    assert sim.wait_for(lambda: sim.image(image_id) is None)
    assert free_mb(one, 1) == before - used
    sim.monitor()
    assert free_mb(one, 1) == before


def test_before_the_first_monitoring_there_is_no_space(safe_dir: Path, qcow: Path) -> None:
    dss = [SimDatastore(1, "default", safe_dirs=[str(safe_dir)])]
    with OneSim(datastores=dss, monitored=False, copy_delay=0.01) as sim:
        one = client(sim)
        ds = one.datastore.info(1)
        assert (ds.TOTAL_MB, ds.FREE_MB, ds.USED_MB) == (0, 0, 0)
        with pytest.raises(pyone.OneActionException, match="Not enough space in datastore"):
            one.image.allocate(f'NAME="early"\nPATH="{qcow}"', 1)
        sim.monitor()
        assert one.datastore.info(1).FREE_MB == 100_000
        assert one.image.allocate(f'NAME="early"\nPATH="{qcow}"', 1) == 0


def test_periodic_monitoring(safe_dir: Path) -> None:
    data = safe_dir / "data.raw"
    data.write_bytes(os.urandom(2 * 1024 * 1024))
    dss = [SimDatastore(1, "default", safe_dirs=[str(safe_dir)])]
    with OneSim(datastores=dss, monitor_interval=0.05, copy_delay=0.01) as sim:
        one = client(sim)
        one.image.allocate(f'NAME="d"\nPATH="{data}"', 1)
        assert sim.wait_for(lambda: free_mb(one, 1) < 100_000)


def test_no_disabled_image_datastore() -> None:
    # oned: only SYSTEM datastores can be disabled; the stand-in has no such knob
    with pytest.raises(TypeError):
        SimDatastore(5, "off", "IMAGE", enabled=False)  # type: ignore[call-arg]


# --- empty values --------------------------------------------------------------------------------------
def test_empty_values_text_form_kept_xml_form_dropped(one: Any, qcow: Path) -> None:
    text_id = one.image.allocate(f'NAME="t"\nPATH="{qcow}"\nA = ""\nB =\nC = "x"\n', 1)
    tmpl = one.image.info(text_id).TEMPLATE
    # kept, as <A><![CDATA[]]></A>, which pyone reads as None
    assert "A" in tmpl and "B" in tmpl
    assert (tmpl["A"], tmpl["B"], tmpl["C"]) == (None, None, "x")
    xml_id = one.image.allocate(f"<TEMPLATE><NAME>x</NAME><PATH>{qcow}</PATH><E></E><F/>"
                                "<V><S></S><T>1</T></V><G><![CDATA[g]]></G></TEMPLATE>", 1)
    tmpl = one.image.info(xml_id).TEMPLATE
    assert "E" not in tmpl and "F" not in tmpl
    assert tmpl["V"] == {"T": "1"} and tmpl["G"] == "g"


def test_values_that_break_the_xml_body_are_refused(sim: OneSim, one: Any, qcow: Path) -> None:
    with pytest.raises(pyone.OneException, match=r"Error allocating a new image\. Error "
                                                 r"transforming the Image to XML\.$"):
        one.image.allocate(f"<TEMPLATE><NAME>x</NAME><PATH>{qcow}</PATH>"
                           "<D>a]]&gt;b</D></TEMPLATE>", 1)
    image_id = one.image.allocate(f'NAME="y"\nPATH="{qcow}"\nD="kept"', 1)
    # oned writes the body to its DB, which refuses it; the call still answers success
    assert one.image.update(image_id, "<TEMPLATE><D>a]]&gt;b</D></TEMPLATE>", 1) == image_id
    assert one.image.info(image_id).TEMPLATE["D"] == "kept"


# --- VM templates ----------------------------------------------------------------------------------------
PROMO = ('NAME = "web"\nCPU = "1"\nMEMORY = "512"\n'
         'DISK = [ IMAGE_ID = "{a}", DEV_PREFIX = "vd" ]\n'
         'DISK = [ IMAGE = "data", IMAGE_UNAME = "kick" ]\n'
         'NIC = [ NETWORK = "public", MODEL = "virtio" ]\n'
         'CONTEXT = [ NETWORK = "YES", SSH_PUBLIC_KEY = "ssh-ed25519 AAAA k@h", '
         'START_SCRIPT = "echo \\"hi\\" > /tmp/x" ]\n'
         'LABELS = "a,b"\n')


def raw_template_xml(sim: OneSim, template_id: int) -> str:
    ok, body, _code = xmlrpc.client.ServerProxy(sim.endpoint).one.template.info(KICK, template_id)
    assert ok
    return str(body)


def attribute_xml(body: str) -> list[str]:
    """The TEMPLATE's attributes as oned wrote them, byte for byte, in order."""
    inner = body.split("<TEMPLATE>", 1)[1].rsplit("</TEMPLATE>", 1)[0]
    return [m.group(0) for m in re.finditer(r"<([A-Z_]+)>.*?</\1>", inner)]


def test_template_merge_update_replaces_every_disk(sim: OneSim, one: Any, qcow: Path) -> None:
    a = one.image.allocate(f'NAME="os"\nPATH="{qcow}"', 1)
    tid = one.template.allocate(PROMO.format(a=a))
    tmpl = one.template.info(tid)
    assert tmpl.NAME == "web" and "NAME" not in tmpl.TEMPLATE
    assert [d.get("IMAGE_ID") or d["IMAGE"] for d in tmpl.TEMPLATE["DISK"]] == [str(a), "data"]
    assert tmpl.TEMPLATE["CONTEXT"]["START_SCRIPT"] == 'echo "hi" > /tmp/x'
    before = attribute_xml(raw_template_xml(sim, tid))
    assert before[0].startswith("<CONTEXT>") and before[-1].startswith("<NIC>")  # sorted names
    assert "<DISK><DEV_PREFIX><![CDATA[vd]]></DEV_PREFIX><IMAGE_ID>" in before[2]  # sorted subs

    # merge one DISK: oned erases all DISKs first, so only the sent one is left
    one.template.update(tid, f'DISK = [ IMAGE_ID = "{a}", DEV_PREFIX = "sd" ]', 1)
    after = attribute_xml(raw_template_xml(sim, tid))
    assert [x for x in after if x.startswith("<DISK>")] == [
        f"<DISK><DEV_PREFIX><![CDATA[sd]]></DEV_PREFIX><IMAGE_ID><![CDATA[{a}]]></IMAGE_ID>"
        "</DISK>"]
    assert [x for x in after if not x.startswith("<DISK>")] == \
        [x for x in before if not x.startswith("<DISK>")]  # the rest byte for byte

    # the promotion pattern: send the whole DISK list back with only the changed disk
    one.template.update(tid, f'DISK = [ IMAGE_ID = "{a}", DEV_PREFIX = "vd" ]\n'
                             'DISK = [ IMAGE = "data", IMAGE_UNAME = "kick" ]', 1)
    assert attribute_xml(raw_template_xml(sim, tid)) == before
    one.template.update(tid, "DISK = [ ]", 1)  # an empty vector only erases
    assert "DISK" not in one.template.info(tid).TEMPLATE
    one.template.update(tid, 'MEMORY = "1024"', 0)  # replace mode: just that
    assert dict(one.template.info(tid).TEMPLATE) == {"MEMORY": "1024"}


def test_template_pool_clone_rename_delete(sim: OneSim, one: Any, qcow: Path) -> None:
    a = one.image.allocate(f'NAME="os"\nPATH="{qcow}"', 1)
    wait_state(one, a, READY)
    tid = one.template.allocate(f'NAME="base"\nDISK=[IMAGE_ID="{a}"]')
    mate = client(sim, "mate:mate-pw")
    mine = mate.template.allocate('NAME="base"')  # names are unique per owner
    with pytest.raises(pyone.OneInternalException,
                       match=r"^\[one.template.allocate\] NAME is already taken by TEMPLATE 0\.$"):
        one.template.allocate('NAME="base"')
    assert [t.ID for t in one.templatepool.info(-3, -1, -1).VMTEMPLATE] == [tid]
    assert [t.ID for t in one.templatepool.info(-1, -1, -1).VMTEMPLATE] == [tid, mine]
    copy_id = one.template.clone(tid, "copy", False)
    assert one.template.info(copy_id).TEMPLATE["DISK"]["IMAGE_ID"] == str(a)
    with pytest.raises(pyone.OneException, match=r"Error allocating a new virtual machine "
                                                 r"template\. NAME is already taken by TEMPLATE"):
        one.template.clone(tid, "copy", False)
    deep = one.template.clone(tid, "deep", True)
    new_img = int(one.template.info(deep).TEMPLATE["DISK"]["IMAGE_ID"])
    assert new_img != a and wait_state(one, new_img, READY).NAME == "deep-disk-0"
    assert Path(one.image.info(new_img).SOURCE).read_bytes() == qcow.read_bytes()
    with pytest.raises(pyone.OneActionException, match="virtual machine template cannot be "
                                                       "renamed to copy because it collides"):
        one.template.rename(tid, "copy")
    one.template.rename(tid, "renamed")
    assert one.template.info(tid).NAME == "renamed"
    one.template.delete(copy_id)
    with pytest.raises(pyone.OneNoExistsException, match=rf"Error getting virtual machine "
                                                         rf"template \[{copy_id}\]\."):
        one.template.info(copy_id)


# --- VMs and images in use --------------------------------------------------------------------------------
def test_vm_lifecycle_holds_images_used(sim: OneSim, one: Any, qcow: Path) -> None:
    a = one.image.allocate(f'NAME="os"\nPATH="{qcow}"', 1)
    wait_state(one, a, READY)
    tid = one.template.allocate('NAME="web"\nMEMORY="512"\nCPU="1"\n'
                                'DISK=[IMAGE="os", IMAGE_UNAME="kick"]\nCONTEXT=[X="1"]')
    vm1 = one.template.instantiate(tid, "vm1", False, "", False)
    vm2 = one.vm.allocate(f'NAME="vm2"\nMEMORY="64"\nDISK=[IMAGE_ID="{a}"]', False)
    assert sim.wait_for(lambda: one.vm.info(vm1).LCM_STATE == 3 and one.vm.info(vm2).STATE == 3)
    info = one.vm.info(vm1)
    assert (info.STATE, info.LCM_STATE, info.NAME) == (3, 3, "vm1")
    disk = info.TEMPLATE["DISK"]
    assert (disk["IMAGE_ID"], disk["IMAGE"], disk["CLONE"], disk["DISK_ID"]) == (str(a), "os",
                                                                                "YES", "0")
    assert info.TEMPLATE["TEMPLATE_ID"] == str(tid)
    img = one.image.info(a)
    assert (img.STATE, img.RUNNING_VMS, sorted(img.VMS.ID)) == (USED, 2, [vm1, vm2])
    assert [v.ID for v in one.vmpool.info(-3, -1, -1, -1).VM] == [vm1, vm2]

    with pytest.raises(pyone.OneInternalException) as e:
        one.image.enable(a, False)
    assert str(e.value) == ("[one.image.enable] Could not disable image: Image cannot be in "
                            "state USED.")
    with pytest.raises(pyone.OneActionException) as e:
        one.image.delete(a)
    assert str(e.value) == "[one.image.delete] Cannot delete image. There are 2 VMs using it."

    one.vm.action("terminate", vm1)
    assert sim.wait_for(lambda: one.vm.info(vm1).STATE == 6)
    img = one.image.info(a)
    assert (img.STATE, img.RUNNING_VMS) == (USED, 1)  # still used by vm2
    one.vm.action("terminate-hard", vm2)
    assert sim.wait_for(lambda: one.image.info(a).STATE == READY)
    assert one.image.info(a).RUNNING_VMS == 0
    assert one.vmpool.info(-3, -1, -1, -1).VM == []
    with pytest.raises(pyone.OneActionException, match='Action "reboot" is not supported'):
        one.vm.action("reboot", vm1)
    one.image.enable(a, False)
    assert one.image.info(a).STATE == pyone.IMAGE_STATES.DISABLED
    with pytest.raises(pyone.OneInternalException, match=r"DISK 0: Cannot acquire image 0, it "
                                                         r"is in state: DISABLED$"):
        one.template.instantiate(tid, "", False, "", False)


def test_disk_names_resolve_per_owner(sim: OneSim, one: Any, qcow: Path) -> None:
    mate = client(sim, "mate:mate-pw")
    mine = one.image.allocate(f'NAME="os"\nPATH="{qcow}"', 1)
    theirs = mate.image.allocate(f'NAME="os"\nPATH="{qcow}"', 1)
    one.image.chmod(mine, -1, -1, -1, 1, -1, -1, -1, -1, -1)
    assert sim.wait_for(lambda: one.image.info(mine).STATE == READY
                        and mate.image.info(theirs).STATE == READY)
    # no IMAGE_UNAME: the VM owner's image; IMAGE_UNAME/IMAGE_UID: that user's
    v1 = mate.vm.allocate('NAME="a"\nDISK=[IMAGE="os"]', True)
    v2 = mate.vm.allocate('NAME="b"\nDISK=[IMAGE="os", IMAGE_UNAME="kick"]', True)
    v3 = mate.vm.allocate('NAME="c"\nDISK=[IMAGE="os", IMAGE_UID="2", IMAGE_UNAME="mate"]', True)
    assert mate.vm.info(v1).TEMPLATE["DISK"]["IMAGE_ID"] == str(theirs)
    assert mate.vm.info(v2).TEMPLATE["DISK"]["IMAGE_ID"] == str(mine)
    assert mate.vm.info(v3).TEMPLATE["DISK"]["IMAGE_ID"] == str(mine)  # IMAGE_UID wins
    assert mate.vm.info(v1).STATE == 2  # held: never deployed
    # renaming an image breaks name references
    one.image.rename(mine, "os-old")
    with pytest.raises(pyone.OneInternalException) as e:
        mate.vm.allocate('NAME="d"\nDISK=[IMAGE="os", IMAGE_UNAME="kick"]', False)
    assert str(e.value) == ("[one.vm.allocate] DISK 0: User 2 does not own an image with name: "
                            "os . Set IMAGE_UNAME or IMAGE_UID of owner in DISK.")
    with pytest.raises(pyone.OneAuthorizationException, match=r"USE IMAGE \[0\]"):
        client(sim, "stranger:stranger-pw").vm.allocate(f'DISK=[IMAGE_ID="{mine}"]', False)
    # a failed VM leaves no image acquired
    with pytest.raises(pyone.OneInternalException, match="DISK 1: Image with ID: 99 does not"):
        mate.vm.allocate(f'NAME="e"\nDISK=[IMAGE_ID="{theirs}"]\nDISK=[IMAGE_ID="99"]', False)
    assert mate.image.info(theirs).RUNNING_VMS == 1  # v1 only


def test_image_rename_is_unique_per_owner(sim: OneSim, one: Any, qcow: Path) -> None:
    k = one.image.allocate(f'NAME="k"\nPATH="{qcow}"', 1)
    one.image.allocate(f'NAME="taken"\nPATH="{qcow}"', 1)
    mate = client(sim, "mate:mate-pw")
    m = mate.image.allocate(f'NAME="m"\nPATH="{qcow}"', 1)
    with pytest.raises(pyone.OneActionException) as e:
        one.image.rename(k, "taken")
    assert str(e.value) == ("[one.image.rename] image cannot be renamed to taken because it "
                            "collides with image 1")
    assert mate.image.rename(m, "taken") == m  # another owner's namespace
