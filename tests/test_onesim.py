"""The fake oned answers the unmodified pyone client the way a real oned 6.10.5 does."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyone
import pytest

try:
    from onesim import OneSim, SimDatastore, SimUser, parse_template
    from onesim.server import ACTION, DELETE, ERROR, LOCKED, READY
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.onesim import OneSim, SimDatastore, SimUser, parse_template
    from tests.onesim.server import ACTION, DELETE, ERROR, LOCKED, READY

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


@pytest.fixture
def qcow(safe_dir: Path) -> Path:
    p = safe_dir / "disk.qcow2"
    p.write_bytes(b"QFI\xfb" + os.urandom(3000))
    return p


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
    assert isinstance(img.SIZE, int) and img.SIZE == 1  # MiB, rounded up
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
         "[one.image.allocate] New images can only be allocated in a files or image datastore."),
        ('NAME="a"\nPATH="{qcow}"', 101, pyone.OneActionException,
         "[one.image.allocate] Not enough space in datastore"),
        ('NAME="a"\nPATH="{qcow}"\nSOURCE="/x"\nSIZE="1"', 1, pyone.OneException,
         "[one.image.allocate] PATH and SOURCE cannot be both set."),
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
    assert str(e.value) == "[one.image.allocate] NAME is already taken by IMAGE 0."
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
        one.vm.info(0)


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
