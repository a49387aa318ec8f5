"""OpenNebulaRegistry against the fake oned (real XML-RPC over loopback, unmodified pyone)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pyone
import pytest

from builder.errors import RegistryError
from builder.gate import SpecResults
from builder.pipeline import ImageState, ImageUnderTest
from builder.recipe import RecipeBook
from builder.registration import register_image
from builder.registry.base import Registered, Registration
from builder.registry.opennebula import (
    OpenNebulaConfig,
    OpenNebulaRegistry,
    Secret,
    read_auth_file,
    render_template,
)

try:
    from onesim import OneSim, SimDatastore, SimUser, parse_template
    from onesim.server import ACTION, AUTHORIZATION, DELETE, ERROR, READY
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.onesim import OneSim, SimDatastore, SimUser, parse_template
    from tests.onesim.server import ACTION, AUTHORIZATION, DELETE, ERROR, READY

PASSWORD = "kick-secret-pw"
VIRTUAL_MB = 16  # virtual size of the first qcow2 make_reg creates
SESSION = f"kick:{PASSWORD}"
MakeReg = Callable[..., Registration]


@pytest.fixture
def publish_dir(tmp_path: Path) -> Path:
    return tmp_path / "publish"


@pytest.fixture
def sim(publish_dir: Path) -> Iterator[OneSim]:
    users = [SimUser("oneadmin", "onepass", 0, 0, "oneadmin"),
             SimUser("kick", PASSWORD, 2, 1, "users")]
    dss = [SimDatastore(0, "system", "SYSTEM"),
           SimDatastore(1, "default", "IMAGE", safe_dirs=["/var/tmp", str(publish_dir)]),
           SimDatastore(2, "files", "FILE"),
           SimDatastore(100, "stock", "IMAGE"),  # stock SAFE_DIRS: /var/tmp only
           SimDatastore(101, "tiny", "IMAGE", free_mb=0, safe_dirs=[str(publish_dir)])]
    with OneSim(users=users, datastores=dss, copy_delay=0.05, delete_delay=0.05) as s:
        yield s


@pytest.fixture
def make_config(sim: OneSim, publish_dir: Path) -> Callable[..., OpenNebulaConfig]:
    def make(**kw: object) -> OpenNebulaConfig:
        args: dict[str, object] = {
            "endpoint": sim.endpoint, "credentials": Secret(SESSION), "datastore": "default",
            "publish_dir": publish_dir, "poll_interval": 0.02, "ready_timeout": 5.0,
            "request_timeout": 5.0}
        args.update(kw)
        return OpenNebulaConfig(**args)  # type: ignore[arg-type]
    return make


@pytest.fixture
def registry(make_config: Callable[..., OpenNebulaConfig]) -> OpenNebulaRegistry:
    return OpenNebulaRegistry(make_config())


@pytest.fixture
def make_reg(tmp_path: Path) -> MakeReg:
    counter = iter(range(1000))

    def make(name: str = "debian12-node", content: bytes | None = None, public: bool = True,
             extra: tuple[tuple[str, str], ...] = (), description: str = "Debian 12 node. "
             "Source: images/debian12-node, GitRev: repo@abc123") -> Registration:
        if content is None:
            # a real qcow2; each call a different virtual size (VIRTUAL_MB + n MiB), so other bytes
            n = next(counter)
            made = tmp_path / f"made-{n}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(made),
                            f"{VIRTUAL_MB + n}M"], check=True, timeout=30)
            data = made.read_bytes()
            made.unlink()
        else:
            data = content
        path = tmp_path / f"src-{hashlib.sha256(data).hexdigest()[:8]}.qcow2"
        path.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        attrs = (("NAME", name), ("TYPE", "OS"), ("PUBLIC", "YES" if public else "NO"),
                 ("DESCRIPTION", description), ("ROLE", "node"), *extra,
                 ("SHA256", sha), ("SIZE", str(len(data))), ("FORMAT", "qcow2"),
                 ("BUILT_AT", "2025-01-01T00:00:00Z"), ("BUILD_ID", "b-1"),
                 ("SPECS", "test_noswap.py,test_udev.py"), ("KICKGATE_VERSION", "0.1.0"),
                 ("SOURCE", "images/debian12-node"), ("GITREV", "repo@abc123"))
        return Registration(name=name, image_path=path, sha256=sha, size=len(data),
                            format="qcow2", public=public, attributes=attrs)
    return make


def iid(entry: Registered) -> int:
    """The OpenNebula image ID of a registration."""
    assert entry.image_id is not None
    return entry.image_id


def images_named(sim: OneSim, name: str) -> list[int]:
    return [i.id for i in sim.find_images(name) if i.state != DELETE]


def allocations(sim: OneSim) -> int:
    return sum(1 for m, _ in sim.calls if m == "one.image.allocate")


# --- success and idempotency ------------------------------------------------------------------
def test_register_success(sim: OneSim, registry: OpenNebulaRegistry, make_reg: MakeReg,
                          publish_dir: Path) -> None:
    reg = make_reg()
    out = registry.register(reg)
    assert (out.registry, out.name, out.sha256, out.reused) == ("opennebula", reg.name,
                                                               reg.sha256, False)
    img = sim.image(iid(out))
    assert img is not None and img.state == READY and img.name == reg.name
    assert out.location == f"{sim.endpoint}#image/{img.id}"
    t = dict(img.template)  # type: ignore[arg-type]
    assert t["SHA256"] == reg.sha256
    assert t["DESCRIPTION"] == reg.attr("DESCRIPTION")
    assert t["DEV_PREFIX"] == "vd"
    assert t["ROLE"] == "node" and t["GITREV"] == "repo@abc123" and t["BUILD_ID"] == "b-1"
    assert t["KICKGATE_VERSION"] == "0.1.0" and t["SPECS"] == "test_noswap.py,test_udev.py"
    # oned would eat SOURCE/SIZE (and refuse SOURCE next to PATH): kept under KICKGATE_*
    assert t["KICKGATE_SOURCE"] == "images/debian12-node"
    assert t["KICKGATE_SIZE"] == str(reg.size)
    assert "PUBLIC" not in t
    assert img.type == 0 and img.format == "qcow2"
    assert img.size_mb == VIRTUAL_MB  # oned's SIZE: the virtual size, not the file's bytes
    assert img.perms[3] == 1 and img.perms[6] == 1  # PUBLIC: group and other USE
    # oned copied the published file into its datastore (SOURCE) while LOCKED; after READY the
    # published copy is gone
    published = Path(img.path)
    assert published.parent == publish_dir and published.name.startswith(f"{reg.name}-{reg.sha256[:12]}-")
    assert not published.exists() and list(publish_dir.iterdir()) == []
    assert Path(img.source).read_bytes() == reg.image_path.read_bytes()
    assert out.label == f"image {img.id}, {reg.name}" and out.version == "1"
    assert out.attributes["STATE"] == "READY" and out.attributes["SHA256"] == reg.sha256


def test_private_image_keeps_default_permissions(sim: OneSim, registry: OpenNebulaRegistry,
                                                 make_reg: MakeReg) -> None:
    out = registry.register(make_reg(public=False))
    img = sim.image(iid(out))
    assert img is not None and img.perms == [1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert not any(m == "one.image.chmod" for m, _ in sim.calls)


def test_rerun_reuses_the_image(sim: OneSim, registry: OpenNebulaRegistry,
                                make_reg: MakeReg) -> None:
    reg = make_reg()
    first = registry.register(reg)
    second = registry.register(reg)
    assert second.reused and iid(second) == iid(first)
    assert allocations(sim) == 1
    assert images_named(sim, reg.name) == [iid(first)]


def test_awkward_values_survive_oned_template_syntax(sim: OneSim, registry: OpenNebulaRegistry,
                                                     make_reg: MakeReg) -> None:
    desc = 'says "hi" in C:\\temp\\ and \\"quoted\\"; Source: x, GitRev: y'
    out = registry.register(make_reg(description=desc, extra=(("NOTE", "ends with \\"),)))
    img = sim.image(iid(out))
    assert img is not None
    assert img.tget("DESCRIPTION") == desc
    assert img.tget("NOTE") == "ends with \\"


def test_render_template_escapes_like_oned() -> None:
    items = [("NAME", "n"), ("D", 'a "b" c\\d')]
    text = render_template(items)
    assert text == 'NAME = "n"\nD = "a \\"b\\" c\\d"\n'
    assert parse_template(text) == items
    # oned's syntax cannot end a value in a backslash: the XML form carries it
    tricky = [("NAME", "n"), ("D", "x\\"), ("E", "a]]>b <&>")]
    assert render_template(tricky).startswith("<TEMPLATE>")
    assert parse_template(render_template(tricky)) == tricky


# --- name collisions ----------------------------------------------------------------------------
def test_name_policy_version(sim: OneSim, registry: OpenNebulaRegistry, make_reg: MakeReg,
                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="builder.registry.opennebula")
    first = registry.register(make_reg())
    second_reg = make_reg()
    second = registry.register(second_reg)
    assert second.name == "debian12-node-v2" and not second.reused
    assert "registering the new one as debian12-node-v2" in caplog.text
    third = registry.register(make_reg())
    assert third.name == "debian12-node-v3"
    again = registry.register(second_reg)  # same bytes as v2: reused, not v4
    assert again.reused and iid(again) == iid(second)
    assert images_named(sim, "debian12-node") == [iid(first)]
    assert allocations(sim) == 3


def test_name_policy_fail(sim: OneSim, make_config: Callable[..., OpenNebulaConfig],
                          make_reg: MakeReg, publish_dir: Path) -> None:
    registry = OpenNebulaRegistry(make_config(name_policy="fail"))
    registry.register(make_reg())
    published_before = sorted(publish_dir.iterdir())
    with pytest.raises(RegistryError) as e:
        registry.register(make_reg())
    msg = str(e.value)
    assert "debian12-node already exists in OpenNebula as image 0" in msg
    assert "'version'" in msg and "'replace'" in msg and "oneimage delete 0" in msg
    assert "\n" not in msg
    assert allocations(sim) == 1
    assert sorted(publish_dir.iterdir()) == published_before


def test_name_policy_replace(sim: OneSim, make_config: Callable[..., OpenNebulaConfig],
                             make_reg: MakeReg) -> None:
    registry = OpenNebulaRegistry(make_config(name_policy="replace"))
    old = registry.register(make_reg())
    new_reg = make_reg()
    new = registry.register(new_reg)
    assert new.name == "debian12-node" and iid(new) != iid(old) and not new.reused
    assert new.sha256 == new_reg.sha256
    assert sim.wait_for(lambda: sim.image(iid(old)) is None)
    live = [i for i in sim.find_images() if i.state != DELETE]
    assert [(i.id, i.name) for i in live] == [(iid(new), "debian12-node")]
    assert registry.register(new_reg).reused


def test_name_policy_replace_keeps_an_old_image_in_use(
        sim: OneSim, make_config: Callable[..., OpenNebulaConfig], make_reg: MakeReg,
        caplog: pytest.LogCaptureFixture) -> None:
    registry = OpenNebulaRegistry(make_config(name_policy="replace"))
    old = registry.register(make_reg())
    # a running VM uses it: oned refuses the delete
    pyone.OneServer(sim.endpoint, session=SESSION).vm.allocate(
        f'NAME="user"\nDISK=[IMAGE_ID="{iid(old)}"]', False)
    new = registry.register(make_reg())
    assert new.name == "debian12-node"
    parked = sim.image(iid(old))
    assert parked is not None and parked.name == f"debian12-node-replaced-{iid(old)}"
    assert "could not be deleted" in caplog.text


# --- failures after allocate ----------------------------------------------------------------------
def test_copy_error_safe_dirs(sim: OneSim, make_config: Callable[..., OpenNebulaConfig],
                              make_reg: MakeReg, publish_dir: Path) -> None:
    registry = OpenNebulaRegistry(make_config(datastore="stock"))
    reg = make_reg()
    with pytest.raises(RegistryError) as e:
        registry.register(reg)
    msg = str(e.value)
    assert "could not copy image debian12-node" in msg and "stock (ID 100)" in msg
    assert "RESTRICTED_DIRS" in msg and "SAFE_DIRS" in msg and str(publish_dir) in msg
    assert allocations(sim) == 1
    assert sim.wait_for(lambda: not sim.find_images())  # the ERROR image was deleted
    assert list(publish_dir.iterdir()) == []  # and the published copy removed


def test_timeout_deletes_the_image(make_reg: MakeReg, publish_dir: Path) -> None:
    ds = SimDatastore(1, "default", safe_dirs=[str(publish_dir)])
    with OneSim(datastores=[ds], stuck=True, delete_delay=0.01) as sim:
        config = OpenNebulaConfig(endpoint=sim.endpoint, credentials=Secret(SESSION),
                                  publish_dir=publish_dir, ready_timeout=0.3,
                                  poll_interval=0.05)
        with pytest.raises(RegistryError, match=r"still LOCKED after 0.3s.*deleted it"):
            OpenNebulaRegistry(config).register(make_reg())
        assert sim.wait_for(lambda: not sim.find_images())
        assert list(publish_dir.iterdir()) == []


def test_failure_after_allocate_deletes_it(sim: OneSim, registry: OpenNebulaRegistry,
                                           make_reg: MakeReg, publish_dir: Path) -> None:
    sim.inject_failure("one.image.chmod", ACTION, "chmod went wrong")
    with pytest.raises(RegistryError, match=r"refused one.image.chmod: .*chmod went wrong"):
        registry.register(make_reg())
    assert sim.wait_for(lambda: not sim.find_images())
    assert list(publish_dir.iterdir()) == []


def test_keyboard_interrupt_cleans_up(sim: OneSim, registry: OpenNebulaRegistry,
                                      make_reg: MakeReg, publish_dir: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(OpenNebulaRegistry, "_wait_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registry.register(make_reg())
    assert allocations(sim) == 1
    assert sim.wait_for(lambda: not sim.find_images())
    assert list(publish_dir.iterdir()) == []


def test_leftover_error_image_with_same_bytes_is_replaced(
        sim: OneSim, registry: OpenNebulaRegistry, make_reg: MakeReg) -> None:
    reg = make_reg()
    one = pyone.OneServer(sim.endpoint, session=SESSION)
    left = one.image.allocate(f'NAME="{reg.name}"\nPATH="{reg.image_path}"\n'
                              f'SHA256="{reg.sha256}"\nKICKGATE_VERSION="0.1.0"', 100)
    assert sim.wait_for(lambda: (img := sim.image(left)) is not None and img.state == ERROR)
    out = registry.register(reg)
    assert out.name == reg.name and iid(out) != left and not out.reused
    assert sim.image(left) is None


def test_changed_source_is_refused(sim: OneSim, registry: OpenNebulaRegistry,
                                   make_reg: MakeReg, publish_dir: Path) -> None:
    reg = make_reg()
    reg.image_path.write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="changed since it was verified"):
        registry.register(reg)
    assert allocations(sim) == 0
    assert list(publish_dir.iterdir()) == []


# --- datastores ------------------------------------------------------------------------------
@pytest.mark.parametrize("datastore", ["nosuch", 999, "999"])
def test_unknown_datastore(sim: OneSim, make_config: Callable[..., OpenNebulaConfig],
                           make_reg: MakeReg, datastore: object) -> None:
    with pytest.raises(RegistryError) as e:
        OpenNebulaRegistry(make_config(datastore=datastore)).register(make_reg())
    msg = str(e.value)
    assert f"no datastore {datastore!r}" in msg
    assert "image datastores: default (ID 1), stock (ID 100), tiny (ID 101)" in msg
    assert allocations(sim) == 0


@pytest.mark.parametrize(("datastore", "expected"), [
    ("system", "system (ID 0) is a SYSTEM datastore"),
    (2, "files (ID 2) is a FILES datastore"),
])
def test_unusable_datastores(sim: OneSim, make_config: Callable[..., OpenNebulaConfig],
                             make_reg: MakeReg, datastore: object, expected: str) -> None:
    with pytest.raises(RegistryError, match=re.escape(expected)):
        OpenNebulaRegistry(make_config(datastore=datastore)).register(make_reg())
    assert allocations(sim) == 0


def test_datastore_full(sim: OneSim, make_config: Callable[..., OpenNebulaConfig],
                        make_reg: MakeReg, publish_dir: Path) -> None:
    with pytest.raises(RegistryError, match=r"tiny \(ID 101\) has not enough free space"):
        OpenNebulaRegistry(make_config(datastore="tiny")).register(make_reg())
    assert not sim.find_images()
    assert list(publish_dir.iterdir()) == []


def test_authorization_error_on_allocate(sim: OneSim, registry: OpenNebulaRegistry,
                                         make_reg: MakeReg, publish_dir: Path) -> None:
    sim.inject_failure("one.image.allocate", AUTHORIZATION,
                       "User [2] : Not authorized to perform USE DATASTORE [1].")
    with pytest.raises(RegistryError) as e:
        registry.register(make_reg())
    assert str(e.value) == (
        "OpenNebula refused to register debian12-node in datastore default (ID 1): "
        "[one.image.allocate] User [2] : Not authorized to perform USE DATASTORE [1].")
    assert not sim.find_images() and list(publish_dir.iterdir()) == []


def test_datastore_by_id(sim: OneSim, make_config: Callable[..., OpenNebulaConfig],
                         make_reg: MakeReg) -> None:
    out = OpenNebulaRegistry(make_config(datastore="1")).register(make_reg())
    img = sim.image(iid(out))
    assert img is not None and img.ds_id == 1


# --- connection and credentials ------------------------------------------------------------------
def test_bad_credentials(sim: OneSim, make_config: Callable[..., OpenNebulaConfig],
                         make_reg: MakeReg) -> None:
    registry = OpenNebulaRegistry(make_config(credentials=Secret("kick:not-the-password")))
    with pytest.raises(RegistryError) as e:
        registry.register(make_reg())
    assert str(e.value) == (f"OpenNebula at {sim.endpoint} rejected the credentials of user "
                            "kick (check ONE_AUTH / --one-auth)")
    assert "not-the-password" not in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_endpoint(make_config: Callable[..., OpenNebulaConfig],
                              make_reg: MakeReg) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/RPC2"
    registry = OpenNebulaRegistry(make_config(endpoint=endpoint))
    with pytest.raises(RegistryError) as e:
        registry.register(make_reg())
    assert str(e.value) == (f"cannot reach OpenNebula at {endpoint}: connection refused "
                            "(is oned running and listening there?)")
    with pytest.raises(RegistryError, match="cannot reach OpenNebula"):
        registry.list()


def test_silent_endpoint_times_out(make_config: Callable[..., OpenNebulaConfig],
                                   make_reg: MakeReg) -> None:
    with socket.socket() as listener:  # accepts connections (backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}/RPC2"
        registry = OpenNebulaRegistry(make_config(endpoint=endpoint, request_timeout=0.3))
        with pytest.raises(RegistryError) as e:
            registry.list()
    assert str(e.value) == f"cannot reach OpenNebula at {endpoint}: no answer within 0.3s"
    assert socket.getdefaulttimeout() is None  # no process-wide side effect


def test_wrong_path_on_a_live_server(sim: OneSim, make_config: Callable[..., OpenNebulaConfig],
                                     make_reg: MakeReg) -> None:
    endpoint = sim.endpoint.replace("/RPC2", "/nope")
    with pytest.raises(RegistryError) as e:
        OpenNebulaRegistry(make_config(endpoint=endpoint)).register(make_reg())
    assert str(e.value).startswith(f"cannot reach OpenNebula at {endpoint}: HTTP 404 Not Found "
                                   "(is this oned's XML-RPC endpoint")


def test_credentials_never_leak(sim: OneSim, make_config: Callable[..., OpenNebulaConfig],
                                make_reg: MakeReg, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config = make_config()
    texts = [repr(config), str(config), repr(config.credentials), f"{config.credentials}",
             repr(OpenNebulaRegistry(config))]
    OpenNebulaRegistry(config).register(make_reg())
    OpenNebulaRegistry(config).list()
    with pytest.raises(RegistryError, match="must not carry user:password@") as e:
        make_config(endpoint=f"http://kick:{PASSWORD}@127.0.0.1:{free_port()}/RPC2")
    texts.append(str(e.value))
    failing = [
        make_config(credentials=Secret(f"kick:{PASSWORD}-wrong")),
        make_config(endpoint=f"http://127.0.0.1:{free_port()}/RPC2"),
        make_config(datastore="stock"),
        make_config(datastore="nosuch"),
    ]
    for cfg in failing:
        with pytest.raises(RegistryError) as e:
            OpenNebulaRegistry(cfg).register(make_reg())
        texts += [str(e.value), repr(e.value), repr(cfg)]
    texts.append(caplog.text)
    for text in texts:
        assert PASSWORD not in text


def test_list_shows_only_kickgate_images(sim: OneSim, registry: OpenNebulaRegistry,
                                         make_reg: MakeReg) -> None:
    out = registry.register(make_reg())
    one = pyone.OneServer(sim.endpoint, session=SESSION)
    one.image.allocate(f'NAME="handmade"\nPATH="{make_reg().image_path}"', 1)
    listed = registry.list()
    assert [(r.name, r.version, r.sha256) for r in listed] == [(out.name, out.version,
                                                                out.sha256)]
    entry = listed[0]
    assert entry.registry == "opennebula"
    assert entry.location == f"{sim.endpoint}#image/{iid(out)}"
    assert entry.attributes["STATE"] == "READY" and entry.attributes["KICKGATE_VERSION"] == "0.1.0"


# --- configuration --------------------------------------------------------------------------------
def test_from_env_reads_one_auth(tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    auth.write_text(f"kick:{PASSWORD}\n")
    auth.chmod(0o600)
    env = {"ONE_AUTH": str(auth), "ONE_XMLRPC": "http://one.example:2633/RPC2"}
    cfg = OpenNebulaConfig.from_env(environ=env)
    assert cfg.endpoint == "http://one.example:2633/RPC2"
    assert cfg.credentials.reveal() == f"kick:{PASSWORD}" and cfg.user == "kick"
    assert (cfg.datastore, cfg.name_policy, cfg.ready_timeout) == ("default", "version", 600.0)
    assert cfg.publish_dir == Path("/var/tmp/kickgate")
    assert PASSWORD not in repr(cfg)
    # arguments win over the environment
    cfg = OpenNebulaConfig.from_env(endpoint="http://x:1/RPC2", auth="other:pw2", environ=env,
                                    datastore=7, publish_dir=tmp_path, name_policy="replace")
    assert (cfg.endpoint, cfg.user, cfg.datastore, cfg.name_policy) == (
        "http://x:1/RPC2", "other", 7, "replace")
    # an auth argument naming a file is read as one
    assert OpenNebulaConfig.from_env(auth=str(auth), environ={}).user == "kick"


def test_from_env_defaults_to_home_one_auth(tmp_path: Path) -> None:
    (tmp_path / ".one").mkdir()
    (tmp_path / ".one" / "one_auth").write_text("oneadmin:pw\n")
    cfg = OpenNebulaConfig.from_env(environ={"HOME": str(tmp_path)})
    assert cfg.endpoint == "http://localhost:2633/RPC2" and cfg.user == "oneadmin"


@pytest.mark.parametrize(("content", "expected"), [
    (None, "does not exist"),
    ("", "is malformed"),
    (f"no-colon-{PASSWORD}\n", "is malformed"),
    (f":{PASSWORD}\n", "is malformed"),
    ("kick:\n", "is malformed"),
    (f"kick:{PASSWORD}\nsecond:line\n", "is malformed"),
])
def test_bad_one_auth_files(tmp_path: Path, content: str | None, expected: str) -> None:
    auth = tmp_path / "one_auth"
    if content is not None:
        auth.write_text(content)
    with pytest.raises(RegistryError) as e:
        OpenNebulaConfig.from_env(environ={"ONE_AUTH": str(auth)})
    assert str(auth) in str(e.value) and expected in str(e.value)
    assert PASSWORD not in str(e.value)


def test_unreadable_one_auth(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        auth = tmp_path  # a directory: unreadable as a file even for root
        with pytest.raises(RegistryError, match="is a directory"):
            read_auth_file(auth)
        return
    auth = tmp_path / "one_auth"
    auth.write_text("kick:pw")
    auth.chmod(0)
    with pytest.raises(RegistryError, match="permission denied"):
        read_auth_file(auth)


def test_world_readable_auth_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    auth = tmp_path / "one_auth"
    auth.write_text(f"kick:{PASSWORD}")
    auth.chmod(0o644)
    read_auth_file(auth)
    assert "chmod 600" in caplog.text and PASSWORD not in caplog.text


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="unknown OpenNebula name policy"):
        OpenNebulaConfig.from_env(auth="a:b", name_policy="rename", environ={})
    with pytest.raises(RegistryError, match="user:password"):
        OpenNebulaConfig(endpoint="http://x/RPC2", credentials=Secret("nopassword"))
    with pytest.raises(RegistryError, match="not an http"):
        OpenNebulaConfig(endpoint="localhost:2633", credentials=Secret("a:b"))
    with pytest.raises(RegistryError, match="malformed"):
        OpenNebulaConfig.from_env(auth=f"{tmp_path}/missing", environ={})


def test_invalid_attribute_key_is_refused_before_publishing(
        sim: OneSim, registry: OpenNebulaRegistry, make_reg: MakeReg, publish_dir: Path) -> None:
    with pytest.raises(RegistryError, match="'BAD KEY' of debian12-node is not a valid"):
        registry.register(make_reg(extra=(("BAD KEY", "x"),)))
    assert allocations(sim) == 0 and not publish_dir.exists()


# --- trust ------------------------------------------------------------------------------------------
def test_publish_dir_is_created_0755(registry: OpenNebulaRegistry, make_reg: MakeReg, publish_dir: Path) -> None:
    old = os.umask(0o077)  # whatever the caller's umask, oned's user must be able to enter it
    try:
        registry.register(make_reg())
    finally:
        os.umask(old)
    assert publish_dir.is_dir() and stat.S_IMODE(publish_dir.stat().st_mode) == 0o755


@pytest.mark.parametrize("setup", ["foreign owner", "group writable", "world writable", "foreign symlink"])
def test_untrusted_publish_dir_is_refused(sim: OneSim, registry: OpenNebulaRegistry, make_reg: MakeReg,
                                          publish_dir: Path, tmp_path: Path, setup: str) -> None:
    if setup == "foreign symlink":
        real = tmp_path / "real"
        real.mkdir(mode=0o755)
        publish_dir.symlink_to(real)
        os.lchown(publish_dir, 4242, 4242)
    else:
        publish_dir.mkdir()
        os.chmod(publish_dir, {"group writable": 0o775, "world writable": 0o777}.get(setup, 0o755))
        if setup == "foreign owner":
            os.chown(publish_dir, 4242, 4242)
    with pytest.raises(RegistryError) as e:
        registry.register(make_reg())
    msg = str(e.value)
    assert msg.startswith(f"OpenNebula publish dir {publish_dir} ") and "\n" not in msg
    expected = {"foreign owner": "belongs to uid 4242", "group writable": "writable by its group or others (mode 0775)",
                "world writable": "chmod go-w", "foreign symlink": "symbolic link owned by uid 4242"}[setup]
    assert expected in msg and f"chown {os.geteuid()} {publish_dir}" in msg
    assert allocations(sim) == 0
    assert list(publish_dir.iterdir()) == []  # nothing published


@pytest.fixture
def mate_image(sim: OneSim, make_reg: MakeReg, publish_dir: Path) -> int:
    """An image a member of kick's group registered, carrying kickgate's attributes."""
    sim.add_user(SimUser("mate", "mate-pw", 3, 1, "users"))
    publish_dir.mkdir(mode=0o755, exist_ok=True)
    reg = make_reg(name="debian12-node")
    path = publish_dir / "mate.qcow2"
    path.write_bytes(reg.image_path.read_bytes())
    mate = pyone.OneServer(sim.endpoint, session="mate:mate-pw")
    image_id = int(mate.image.allocate(f'NAME="debian12-node"\nPATH="{path}"\nSHA256="{reg.sha256}"\n'
                                       'KICKGATE_VERSION="0.1.0"\nKICKGATE_IMAGE="debian12-node"', 1))
    mate.image.chmod(image_id, -1, -1, -1, 1, -1, -1, -1, -1, -1)  # group may use it
    assert sim.wait_for(lambda: (img := sim.image(image_id)) is not None and img.state == READY)
    return image_id


def test_only_the_trusted_owners_images_are_listed(sim: OneSim, registry: OpenNebulaRegistry, make_reg: MakeReg,
                                                   mate_image: int, make_config: Callable[..., OpenNebulaConfig]
                                                   ) -> None:
    with pytest.raises(RegistryError, match=r"no image debian12-node registered by kickgate .* owned by kick"):
        registry.get("debian12-node")
    assert registry.list() == []
    mine = registry.register(make_reg())
    assert mine.name == "debian12-node" and iid(mine) != mate_image  # names are unique per owner only
    assert [iid(e) for e in registry.list()] == [iid(mine)]
    assert iid(registry.get("debian12-node")) == iid(mine)
    # --one-owner: trust that user's images instead
    theirs = OpenNebulaRegistry(make_config(owner="mate"))
    assert [iid(e) for e in theirs.list()] == [mate_image]
    assert iid(theirs.get("debian12-node")) == mate_image
    assert [iid(e) for e in OpenNebulaRegistry(make_config(owner="3")).list()] == [mate_image]


def test_prebuilt_image_registers_without_a_gitrev(sim: OneSim, registry: OpenNebulaRegistry, repo_root: Path,
                                                   tmp_path: Path) -> None:
    path = tmp_path / "from-elsewhere.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True, timeout=30)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    image = ImageUnderTest(name="generic-dev", recipe=RecipeBook(repo_root).load("generic-dev"), path=path,
                           format="qcow2", sha256=sha, size=path.stat().st_size, record=None, artifact=None,
                           cached=True, seconds=0.0)
    results = SpecResults({"specs/test_swap.py::test_no_swap[generic-dev]": "passed"})
    out = register_image(ImageState(image=image, results=results), registry)
    img = sim.image(iid(out))
    assert img is not None
    assert img.tget("DESCRIPTION") == "generic-dev image. Source: prebuilt from-elsewhere.qcow2"
    assert img.tget("KICKGATE_SOURCE") == "prebuilt from-elsewhere.qcow2"
    assert img.tget("GITREV") is None and "GitRev" not in (img.tget("DESCRIPTION") or "")
    assert img.tget("BUILD_ID") == f"prebuilt-{sha[:12]}"
