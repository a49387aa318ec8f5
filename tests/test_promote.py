"""Promotion to VM templates and rollback, against the oned stand-in (real XML-RPC, unmodified pyone),
and the local registry's `promoted` link."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyone
import pytest

from builder import cli
from builder.errors import GateError, RecipeError, RegistryError
from builder.gate import SpecResults
from builder.pipeline import ImageState, ImageUnderTest
from builder.promote import promote, promote_ref, rollback
from builder.recipe import RecipeBook, promote_spec
from builder.registration import RunFacts, gate_and_register
from builder.registry import onepromote
from builder.registry.base import PromoteTargets, Registered, Registration
from builder.registry.local import LocalRegistry
from builder.registry.opennebula import OpenNebulaConfig, OpenNebulaRegistry, Secret
from builder.report import summary_lines

try:
    from onesim import OneSim, SimDatastore, SimTemplate, SimUser, parse_template
    from onesim.server import ACTION, DELETE, USED
    from onesim.template import template_to_xml
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.onesim import OneSim, SimDatastore, SimTemplate, SimUser, parse_template
    from tests.onesim.server import ACTION, DELETE, USED
    from tests.onesim.template import template_to_xml

PASSWORD = "kick-secret-pw"
SESSION = f"kick:{PASSWORD}"
NAME = "web"
PASSED = "2/2 passed: test_a.py::test_a, test_b.py::test_b"
MakeReg = Callable[..., Registration]


@pytest.fixture
def publish_dir(tmp_path: Path) -> Path:
    return tmp_path / "publish"


@pytest.fixture
def sim(publish_dir: Path) -> Iterator[OneSim]:
    users = [SimUser("oneadmin", "onepass", 0, 0, "oneadmin"), SimUser("kick", PASSWORD, 2, 1, "users")]
    dss = [SimDatastore(0, "system", "SYSTEM"),
           SimDatastore(1, "default", "IMAGE", safe_dirs=[str(publish_dir)])]
    with OneSim(users=users, datastores=dss, copy_delay=0.02, delete_delay=0.02, deploy_delay=0.02) as s:
        yield s


@pytest.fixture
def one(sim: OneSim) -> Any:
    """What a user of OpenNebula does by hand (templates, VMs), as the same user as kickgate."""
    return pyone.OneServer(sim.endpoint, session=SESSION)


@pytest.fixture
def registry(sim: OneSim, publish_dir: Path) -> OpenNebulaRegistry:
    return OpenNebulaRegistry(OpenNebulaConfig(endpoint=sim.endpoint, credentials=Secret(SESSION),
                                               publish_dir=publish_dir, poll_interval=0.02, ready_timeout=5.0))


@pytest.fixture
def make_reg(tmp_path: Path) -> MakeReg:
    counter = iter(range(1000))

    def make(name: str = NAME, specs: str = PASSED) -> Registration:
        n = next(counter)
        path = tmp_path / f"src-{name}-{n}.qcow2"
        # a real qcow2, a different virtual size each time: other bytes
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{16 + n}M"], check=True, timeout=30)
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        attrs = (("NAME", name), ("TYPE", "OS"), ("PUBLIC", "NO"), ("DESCRIPTION", f"{name}. Source: {name}"),
                 ("SHA256", sha), ("SIZE", str(len(data))), ("FORMAT", "qcow2"), ("SPECS", specs),
                 ("KICKGATE_VERSION", "0.1.0"), ("SOURCE", name))
        return Registration(name=name, image_path=path, sha256=sha, size=len(data), format="qcow2", public=False,
                            attributes=attrs)
    return make


def iid(entry: Registered) -> int:
    assert entry.image_id is not None
    return entry.image_id


def template(sim: OneSim, tid: int) -> SimTemplate:
    t = sim.template(tid)
    assert t is not None
    return t


def disks(sim: OneSim, tid: int) -> list[dict[str, str]]:
    return [dict(v) for k, v in template(sim, tid).template if k == "DISK" and isinstance(v, dict)]


def attr(sim: OneSim, image_id: int, key: str) -> str | None:
    img = sim.image(image_id)
    assert img is not None
    return img.tget(key)


def web_base(one: Any, image_id: int, data_id: int, name: str = "web-base", extra: str = "") -> int:
    """A template as people write them: the OS disk, a data disk, CONTEXT, a NIC and the rest."""
    return int(one.template.allocate(
        f'NAME = "{name}"\nCPU = "1"\nMEMORY = "768"\n'
        f'DISK = [ IMAGE_ID = "{image_id}", DEV_PREFIX = "vd", CACHE = "none" ]\n'
        f'DISK = [ IMAGE_ID = "{data_id}", TARGET = "vdb" ]\n'
        'CONTEXT = [ NETWORK = "YES", SSH_PUBLIC_KEY = "$USER[SSH_PUBLIC_KEY]", NOTE = "say \\"hi\\"" ]\n'
        'NIC = [ NETWORK = "public", MODEL = "virtio" ]\n'
        'GRAPHICS = [ TYPE = "VNC", LISTEN = "0.0.0.0" ]\n' + extra))


@pytest.fixture
def data_disk(registry: OpenNebulaRegistry, make_reg: MakeReg) -> int:
    """An image of another family, used as the templates' second disk."""
    return iid(registry.register(make_reg(name="data")))


TARGETS = PromoteTargets(templates=("web-base",))


# --- promotion to templates -----------------------------------------------------------------------
def test_promotion_changes_only_the_disk_of_the_previous_version(
        sim: OneSim, one: Any, registry: OpenNebulaRegistry, make_reg: MakeReg, data_disk: int) -> None:
    v1 = registry.register(make_reg())
    tid = web_base(one, iid(v1), data_disk)
    before = template(sim, tid).template
    v2 = registry.register(make_reg())
    assert v2.name == "web-v2"

    done = promote(registry, v2, TARGETS)

    assert done.complete and done.promoted == f"image {iid(v2)}, web-v2" and done.previous is None
    assert [t.outcome for t in done.templates] == ["updated"]
    after = template(sim, tid).template
    # exactly one value changed: the first DISK's IMAGE_ID; everything else as it was, in order
    os_disk = next(i for i, (k, _) in enumerate(before) if k == "DISK")
    assert before[os_disk] == ("DISK", {"IMAGE_ID": str(iid(v1)), "DEV_PREFIX": "vd", "CACHE": "none"})
    expected = [(k, dict(v, IMAGE_ID=str(iid(v2))) if i == os_disk and isinstance(v, dict) else v)
                for i, (k, v) in enumerate(before)]
    # what oned answers (template attributes sorted by name, repeats in order): the same but that value
    assert len(before) == 7 and template_to_xml(after) == template_to_xml(expected)
    assert disks(sim, tid) == [{"IMAGE_ID": str(iid(v2)), "DEV_PREFIX": "vd", "CACHE": "none"},
                               {"IMAGE_ID": str(data_disk), "TARGET": "vdb"}]
    assert attr(sim, iid(v2), onepromote.PROMOTED_AT)
    assert registry.get(NAME, "promoted").image_id == iid(v2)

    v3 = registry.register(make_reg())
    again = promote(registry, v3, TARGETS)
    assert again.previous == f"image {iid(v2)}, web-v2"
    assert attr(sim, iid(v2), onepromote.SUPERSEDED_BY) == str(iid(v3))
    assert attr(sim, iid(v3), onepromote.PREVIOUS) == str(iid(v2))
    assert disks(sim, tid)[0]["IMAGE_ID"] == str(iid(v3))
    assert sim.image(iid(v2)) is not None  # superseded, still there for the VMs that run from it


def test_disk_named_by_image_and_owner_is_pointed_at_the_new_id(
        sim: OneSim, one: Any, registry: OpenNebulaRegistry, make_reg: MakeReg, data_disk: int) -> None:
    registry.register(make_reg())
    tid = int(one.template.allocate('NAME = "by-name"\nDISK = [ IMAGE = "web", IMAGE_UNAME = "kick", SIZE = "4096" ]\n'
                                    'DISK = [ IMAGE = "data", IMAGE_UID = "2" ]\nMEMORY = "512"'))
    v2 = registry.register(make_reg())
    done = promote(registry, v2, PromoteTargets(templates=("by-name",)))
    assert [t.outcome for t in done.templates] == ["updated"]
    assert disks(sim, tid) == [{"IMAGE_ID": str(iid(v2)), "SIZE": "4096"}, {"IMAGE": "data", "IMAGE_UID": "2"}]


def test_templates_by_id_and_by_attribute(sim: OneSim, one: Any, registry: OpenNebulaRegistry,
                                          make_reg: MakeReg, data_disk: int) -> None:
    v1 = registry.register(make_reg())
    by_id = web_base(one, iid(v1), data_disk, name="by-id")
    tagged = web_base(one, iid(v1), data_disk, name="tagged", extra='KICKGATE_IMAGE = "web"\n')
    other = web_base(one, iid(v1), data_disk, name="other", extra='KICKGATE_IMAGE = "db"\n')
    unrelated = int(one.template.allocate(f'NAME = "no-web"\nDISK = [ IMAGE_ID = "{data_disk}" ]'))
    v2 = registry.register(make_reg())

    done = promote(registry, v2, PromoteTargets(templates=(by_id, unrelated, "missing"),
                                                select=(("KICKGATE_IMAGE", "web"),)))

    outcomes = {t.template: t.outcome for t in done.templates}
    assert outcomes == {f"by-id (template {by_id})": "updated", f"no-web (template {unrelated})": "no-disk",
                        f"tagged (template {tagged})": "updated", "template 'missing'": "failed"}
    assert not done.complete  # a template named in [promote] does not exist
    assert disks(sim, other)[0]["IMAGE_ID"] == str(iid(v1))  # not selected: untouched
    assert disks(sim, unrelated) == [{"IMAGE_ID": str(data_disk)}]


def test_keep_deletes_old_versions_but_not_used_ones(sim: OneSim, one: Any, registry: OpenNebulaRegistry,
                                                     make_reg: MakeReg, data_disk: int) -> None:
    v1 = registry.register(make_reg())
    tid = web_base(one, iid(v1), data_disk)
    vm = int(one.vm.allocate(f'NAME = "running"\nDISK = [ IMAGE_ID = "{iid(v1)}" ]', False))
    assert sim.wait_for(lambda: (img := sim.image(iid(v1))) is not None and img.state == USED)
    v2 = registry.register(make_reg())
    v3 = registry.register(make_reg())
    pinned = int(one.template.allocate(f'NAME = "pinned"\nDISK = [ IMAGE_ID = "{iid(v2)}" ]'))
    v4 = registry.register(make_reg())
    v5 = registry.register(make_reg())

    done = promote(registry, v5, PromoteTargets(templates=("web-base",), keep=2))

    assert done.complete
    assert disks(sim, tid)[0]["IMAGE_ID"] == str(iid(v5))
    assert done.deleted == (f"image {iid(v3)}, web-v3",)
    assert done.kept == (f"image {iid(v1)}, web: USED, 1 VM(s) run from it",
                         f"image {iid(v2)}, web-v2: VM template pinned (template {pinned}) uses it")
    assert sim.wait_for(lambda: sim.image(iid(v3)) is None)
    assert {i.id for i in sim.find_images() if i.state != DELETE} == {data_disk, iid(v1), iid(v2), iid(v4), iid(v5)}
    assert sim.vm(vm) is not None and sim.image(iid(v1)) is not None  # the running VM keeps its disk
    assert "kept image" in done.summary() and "deleted image" in done.summary()


def test_delete_refused_by_oned_is_reported_not_fatal(sim: OneSim, registry: OpenNebulaRegistry,
                                                      make_reg: MakeReg) -> None:
    v1 = registry.register(make_reg())
    v2 = registry.register(make_reg())
    sim.inject_failure("one.image.delete", ACTION, "Cannot delete image. There are 1 VMs using it.")
    done = promote(registry, v2, PromoteTargets(keep=1))
    assert done.complete and done.deleted == ()
    assert done.kept == (f"image {iid(v1)}, web: [one.image.delete] Cannot delete image. There are 1 VMs using it.",)


def test_half_done_promotion_is_finished_by_a_rerun(sim: OneSim, one: Any, registry: OpenNebulaRegistry,
                                                    make_reg: MakeReg, data_disk: int) -> None:
    v1 = registry.register(make_reg())
    first = web_base(one, iid(v1), data_disk, name="a-first")
    second = web_base(one, iid(v1), data_disk, name="b-second")
    promote(registry, v1, PromoteTargets(templates=("a-first", "b-second")))
    v2 = registry.register(make_reg())
    targets = PromoteTargets(templates=("a-first", "b-second"), keep=1)

    # oned fails the second template's update: the first is done, the run says so and fails
    real_call = registry._call

    def second_fails(method: str, *args: Any) -> Any:
        if method == "template.update" and args[0] == second:
            raise RegistryError(f"OpenNebula at {sim.endpoint} refused one.template.update: transient")
        return real_call(method, *args)

    registry._call = second_fails  # type: ignore[method-assign]
    half = promote(registry, v2, targets)
    del registry._call
    assert [t.outcome for t in half.templates] == ["updated", "failed"] and not half.complete
    assert "transient" in half.summary() and half.summary().startswith("promotion INCOMPLETE")
    assert half.deleted == ()  # nothing deleted while templates may still use old versions
    assert disks(sim, first)[0]["IMAGE_ID"] == str(iid(v2)) and disks(sim, second)[0]["IMAGE_ID"] == str(iid(v1))

    rerun = promote(registry, v2, targets)
    assert rerun.complete and [t.outcome for t in rerun.templates] == ["unchanged", "updated"]
    assert disks(sim, second)[0]["IMAGE_ID"] == str(iid(v2))
    assert rerun.previous == f"image {iid(v1)}, web"
    assert attr(sim, iid(v1), onepromote.SUPERSEDED_BY) == str(iid(v2))
    assert registry.get(NAME, "promoted").image_id == iid(v2)
    # v1 is referenced by nothing now and older than keep = 1: gone
    assert rerun.deleted == (f"image {iid(v1)}, web",)


def test_interrupted_marking_is_finished_by_a_rerun(sim: OneSim, registry: OpenNebulaRegistry,
                                                    make_reg: MakeReg) -> None:
    v1 = registry.register(make_reg())
    promote(registry, v1, PromoteTargets())
    v2 = registry.register(make_reg())
    # the new version's mark goes through, the previous version's does not
    real_call = registry._call

    def flaky(method: str, *args: Any) -> Any:
        if method == "image.update" and args[0] == iid(v1):
            raise RegistryError("OpenNebula at ... refused one.image.update: oned went away")
        return real_call(method, *args)

    registry._call = flaky  # type: ignore[method-assign]
    with pytest.raises(RegistryError, match="oned went away"):
        promote(registry, v2, PromoteTargets())
    del registry._call
    assert registry.get(NAME, "promoted").image_id == iid(v2)  # the later promotion wins meanwhile
    assert not attr(sim, iid(v1), onepromote.SUPERSEDED_BY)

    rerun = promote(registry, v2, PromoteTargets())
    assert rerun.previous == f"image {iid(v1)}, web"
    assert attr(sim, iid(v1), onepromote.SUPERSEDED_BY) == str(iid(v2))
    assert attr(sim, iid(v2), onepromote.PREVIOUS) == str(iid(v1))


def test_template_changed_underneath_is_not_overwritten(sim: OneSim, one: Any, registry: OpenNebulaRegistry,
                                                        make_reg: MakeReg, data_disk: int) -> None:
    v1 = registry.register(make_reg())
    tid = web_base(one, iid(v1), data_disk)
    v2 = registry.register(make_reg())
    real_templates = registry._templates

    def read_then_someone_edits() -> Any:
        read = real_templates()
        # someone else changes the template after kickgate read it: another disk, more memory
        one.template.update(tid, f'DISK = [ IMAGE_ID = "{iid(v1)}" ]\nDISK = [ IMAGE_ID = "{data_disk}" ]\n'
                                 'MEMORY = "2048"', 1)
        return read

    registry._templates = read_then_someone_edits  # type: ignore[method-assign]
    done = promote(registry, v2, TARGETS)
    del registry._templates
    assert [t.outcome for t in done.templates] == ["conflict"] and not done.complete
    assert "changed since kickgate read it" in done.summary()
    # their change stands, nothing of kickgate's was written
    assert disks(sim, tid) == [{"IMAGE_ID": str(iid(v1))}, {"IMAGE_ID": str(data_disk)}]
    assert dict((k, v) for k, v in template(sim, tid).template if k == "MEMORY") == {"MEMORY": "2048"}

    rerun = promote(registry, v2, TARGETS)  # read afresh: now it can be updated
    assert rerun.complete and disks(sim, tid) == [{"IMAGE_ID": str(iid(v2))}, {"IMAGE_ID": str(data_disk)}]


def test_rollback_restores_the_previous_image_id(sim: OneSim, one: Any, registry: OpenNebulaRegistry,
                                                 make_reg: MakeReg, data_disk: int) -> None:
    v1 = registry.register(make_reg())
    tid = web_base(one, iid(v1), data_disk)
    promote(registry, v1, TARGETS)
    v2 = registry.register(make_reg())
    promote(registry, v2, TARGETS)
    v3 = registry.register(make_reg())
    promote(registry, v3, TARGETS)
    assert disks(sim, tid)[0]["IMAGE_ID"] == str(iid(v3))

    back = rollback(registry, NAME, TARGETS)
    assert back.complete and back.promoted == f"image {iid(v2)}, web-v2" and back.previous == f"image {iid(v3)}, web-v3"
    assert disks(sim, tid) == [{"IMAGE_ID": str(iid(v2)), "DEV_PREFIX": "vd", "CACHE": "none"},
                               {"IMAGE_ID": str(data_disk), "TARGET": "vdb"}]
    assert registry.get(NAME, "promoted").image_id == iid(v2)
    assert not attr(sim, iid(v2), onepromote.SUPERSEDED_BY) and attr(sim, iid(v3), onepromote.ROLLED_BACK_AT)

    rollback(registry, NAME, TARGETS)
    assert disks(sim, tid)[0]["IMAGE_ID"] == str(iid(v1))
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(registry, NAME, TARGETS)
    again = promote(registry, v3, TARGETS)  # forward again after rollbacks
    assert again.previous == f"image {iid(v1)}, web" and disks(sim, tid)[0]["IMAGE_ID"] == str(iid(v3))


def test_rollback_without_a_promotion_is_refused(registry: OpenNebulaRegistry, make_reg: MakeReg) -> None:
    registry.register(make_reg())
    with pytest.raises(RegistryError, match="no version of web has been promoted"):
        rollback(registry, NAME, TARGETS)


def test_a_version_that_did_not_pass_is_not_promoted(sim: OneSim, registry: OpenNebulaRegistry,
                                                     make_reg: MakeReg) -> None:
    bad = registry.register(make_reg(specs="1/2 passed: test_a.py::test_a"))
    before = len(sim.calls)
    with pytest.raises(GateError, match=r"did not pass its gate \(SPECS = '1/2 passed"):
        promote_ref(registry, f"{NAME}@1", TARGETS)
    assert not [m for m, _ in sim.calls[before:] if m.endswith(".update")]
    assert not attr(sim, iid(bad), onepromote.PROMOTED_AT)


def test_version_references(sim: OneSim, registry: OpenNebulaRegistry, make_reg: MakeReg) -> None:
    data = [registry.register(make_reg(name=f"filler{i}")) for i in range(3)]  # image IDs 0, 1, 2
    v1, v2, v3 = (registry.register(make_reg()) for _ in range(3))  # IDs 3, 4, 5
    assert [iid(d) for d in data] == [0, 1, 2] and [iid(v) for v in (v1, v2, v3)] == [3, 4, 5]
    assert registry.get(NAME, "v3").image_id == 5 and registry.get(NAME, "2").image_id == 4
    assert registry.get(NAME, "id:4").image_id == 4 and registry.get(NAME, "5").image_id == 5  # only an ID
    assert registry.get(NAME).image_id == 5 and registry.get("web-v2").image_id == 4
    with pytest.raises(RegistryError, match=r"web@3 is ambiguous: version 3 is image 5, web-v3 but image ID 3 is "
                                            r"image 3, web; write web@v3 .* or web@id:3"):
        registry.get(NAME, "3")
    with pytest.raises(RegistryError, match="web has no version v7"):
        registry.get(NAME, "v7")
    assert registry.get(NAME, "v2").label == "image 4, web-v2" and registry.get(NAME, "v2").version == "2"


# --- wired after registration ------------------------------------------------------------------------
RECIPE = """name = "web"
method = "bootstrap"
[bootstrap]
packages = ["openssh-server"]
[promote]
templates = ["web-base"]
keep = 5
"""


def test_registration_promotes_when_the_recipe_asks(tmp_path: Path, sim: OneSim, one: Any,
                                                   registry: OpenNebulaRegistry, make_reg: MakeReg,
                                                   data_disk: int) -> None:
    (tmp_path / "repo" / "images" / "web").mkdir(parents=True)
    (tmp_path / "repo" / "images" / "web" / "image.toml").write_text(RECIPE)
    recipe = RecipeBook(tmp_path / "repo").load("web")
    v1 = registry.register(make_reg())
    tid = web_base(one, iid(v1), data_disk)
    path = tmp_path / "tested.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "40M"], check=True, timeout=30)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    state = ImageState(image=ImageUnderTest(name="web", recipe=recipe, path=path, format="qcow2", sha256=sha,
                                            size=path.stat().st_size, record=None, artifact=None, cached=True,
                                            seconds=0.0))
    state.results = SpecResults({"specs/test_a.py::test_a[web]": "passed", "specs/test_b.py::test_b[web]": "passed"})

    failed = gate_and_register({"web": state}, {"web": 2}, RunFacts(None, False, True, False), lambda: registry)

    assert not failed and state.registered is not None and state.promotion is not None
    new = iid(state.registered)
    assert disks(sim, tid)[0]["IMAGE_ID"] == str(new)
    line = summary_lines({"web": state}, {}, [])[0]
    assert f"registered: opennebula image {new}, web-v2 ({sim.endpoint}#image/{new})" in line
    assert f"promoted: image {new}, web-v2; templates updated: web-base (template {tid})" in line


def test_failed_promotion_fails_the_run_but_keeps_the_registration(
        tmp_path: Path, sim: OneSim, registry: OpenNebulaRegistry) -> None:
    (tmp_path / "repo" / "images" / "web").mkdir(parents=True)
    (tmp_path / "repo" / "images" / "web" / "image.toml").write_text(RECIPE)
    recipe = RecipeBook(tmp_path / "repo").load("web")
    path = tmp_path / "tested.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "40M"], check=True, timeout=30)
    state = ImageState(image=ImageUnderTest(name="web", recipe=recipe, path=path, format="qcow2",
                                            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                            size=path.stat().st_size, record=None, artifact=None, cached=True,
                                            seconds=0.0))
    state.results = SpecResults({"specs/test_a.py::test_a[web]": "passed"})
    failed = gate_and_register({"web": state}, {"web": 1}, RunFacts(None, False, True, False), lambda: registry)
    assert failed and state.registered is not None  # no template web-base exists
    assert "promotion INCOMPLETE" in summary_lines({"web": state}, {}, [])[0]


# --- the [promote] table ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("table", "problem"), [
    ('templates = "web-base"', "promote.templates: must be a list"),
    ("templates = [true]", "promote.templates: item 1: True is neither a template name nor an ID"),
    ("templates = [-1]", "promote.templates: item 1: -1 is neither"),
    ('select = { image = "x" }', "promote.select: image = 'x': keys are upper-case template attributes"),
    ("keep = 0", "promote.keep: must be a whole number of versions, at least 1"),
    ('tmpl = ["x"]', "promote.tmpl: unknown key"),
])
def test_promote_table_is_checked_with_the_recipe(tmp_path: Path, table: str, problem: str) -> None:
    (tmp_path / "images" / "web").mkdir(parents=True)
    text = RECIPE.replace("keep = 5", table) if table.startswith("keep") else RECIPE.replace('templates = ["web-base"]',
                                                                                             table)
    (tmp_path / "images" / "web" / "image.toml").write_text(text)
    line = 7 if table.startswith("keep") else 6
    with pytest.raises(RecipeError, match=f"image.toml: line {line}: " + problem):
        RecipeBook(tmp_path).load("web")


def test_promote_table_read(tmp_path: Path) -> None:
    (tmp_path / "images" / "web").mkdir(parents=True)
    (tmp_path / "images" / "web" / "image.toml").write_text(
        RECIPE.replace('templates = ["web-base"]', 'templates = ["web-base", 42]\nselect = { KICKGATE_IMAGE = "web" }'))
    spec = promote_spec(RecipeBook(tmp_path).load("web"))
    assert spec is not None
    assert (spec.templates, spec.select, spec.keep) == (("web-base", 42), (("KICKGATE_IMAGE", "web"),), 5)


# --- the local registry -----------------------------------------------------------------------------------
def local_reg(tmp_path: Path, seed: str, specs: str = PASSED) -> Registration:
    path = tmp_path / "src" / f"{seed}.qcow2"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(hashlib.sha256(seed.encode()).digest() * 64)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Registration(name=NAME, image_path=path, sha256=sha, size=path.stat().st_size, format="qcow2",
                        public=False, attributes=(("NAME", NAME), ("SHA256", sha), ("SPECS", specs)))


def test_local_promote_and_rollback_move_the_promoted_link(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "registry")
    name_dir = tmp_path / "registry" / NAME
    v1, v2, v3 = (reg.register(local_reg(tmp_path, s)) for s in "abc")
    assert not (name_dir / "promoted").exists()
    promote(reg, v1, PromoteTargets())
    promote(reg, v3, PromoteTargets())
    assert os.readlink(name_dir / "promoted") == "3" and os.readlink(name_dir / "latest") == "3"
    assert reg.get(NAME, "promoted").version == "3" and [e.promoted for e in reg.list()] == [False, False, True]
    again = promote(reg, v3, PromoteTargets())  # idempotent
    assert again.promoted == "web version 3" and again.previous == "web version 1"

    back = rollback(reg, NAME, PromoteTargets())
    assert (back.promoted, back.previous) == ("web version 1", "web version 3")
    assert os.readlink(name_dir / "promoted") == "1" and reg.get(NAME, "promoted").version == "1"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(reg, NAME, PromoteTargets())
    assert not [p for p in name_dir.iterdir() if p.name.startswith(".tmp-")]
    assert v2.version == "2"


def test_local_keep_spares_the_promoted_version(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "registry")
    for s in "abcd":
        reg.register(local_reg(tmp_path, s))
    done = promote(reg, reg.get(NAME, "1"), PromoteTargets(keep=2))
    assert done.deleted == ("web version 2",)  # not 1: it is the promoted one, though not among the newest 2
    assert [e.version for e in reg.list()] == ["1", "3", "4"]
    done = promote(reg, reg.get(NAME, "4"), PromoteTargets(keep=1))
    assert done.deleted == ("web version 1", "web version 3") and done.previous == "web version 1"
    assert [e.version for e in reg.list()] == ["4"] and reg.get(NAME, "promoted").version == "4"
    assert not [p for p in (tmp_path / "registry" / NAME).iterdir() if p.name.startswith(".tmp-")]


def test_local_refuses_a_version_that_did_not_pass(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "registry")
    reg.register(local_reg(tmp_path, "a", specs="0/2 passed: "))
    with pytest.raises(GateError, match="web version 1 did not pass its gate"):
        promote_ref(reg, "web@1", PromoteTargets())
    assert not (tmp_path / "registry" / NAME / "promoted").exists()


def test_cli_promote_and_rollback_local(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no recipe repository here: the local registry needs none
    registry_dir = tmp_path / "registry"
    reg = LocalRegistry(registry_dir)
    for s in "ab":
        reg.register(local_reg(tmp_path, s))
    assert cli.main(["promote", "web@v1", "--registry-dir", str(registry_dir)]) == 0
    assert cli.main(["promote", "web@2", "--registry-dir", str(registry_dir)]) == 0
    assert "promoted: web version 2 (was web version 1)" in capsys.readouterr().out
    assert cli.main(["images", "--registry-dir", str(registry_dir)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("web\tversion 1\t") and listing[1].endswith("\tpromoted")
    assert cli.main(["rollback", "web", "--registry-dir", str(registry_dir)]) == 0
    assert "promoted: web version 1 (was web version 2)" in capsys.readouterr().out
    assert cli.main(["show", "web@promoted", "--registry-dir", str(registry_dir)]) == 0
    assert '"version": 1' in capsys.readouterr().out


def test_cli_promote_opennebula(tmp_path: Path, sim: OneSim, one: Any, registry: OpenNebulaRegistry,
                                make_reg: MakeReg, data_disk: int, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "repo" / "images" / "web").mkdir(parents=True)
    (tmp_path / "repo" / "images" / "web" / "image.toml").write_text(RECIPE)
    auth = tmp_path / "one_auth"
    auth.write_text(SESSION)
    auth.chmod(0o600)
    v1 = registry.register(make_reg())
    tid = web_base(one, iid(v1), data_disk)
    v2 = registry.register(make_reg())
    args = ["--registry", "opennebula", "--one-xmlrpc", sim.endpoint, "--one-auth", str(auth)]
    assert cli.main(["--recipes", str(tmp_path / "repo"), "promote", "web@v2", *args]) == 0
    out = capsys.readouterr().out
    assert f"promoted: image {iid(v2)}, web-v2; templates updated: web-base (template {tid})" in out
    assert disks(sim, tid)[0]["IMAGE_ID"] == str(iid(v2))
    assert cli.main(["images", *args]) == 0
    listing = capsys.readouterr().out
    assert f"image {iid(v2)}, web-v2\tsha256 " in listing and f"image {iid(v1)}, web\tsha256" in listing
    assert cli.main(["--recipes", str(tmp_path / "repo"), "rollback", "web", *args]) == 2  # nothing before v2
    assert "nothing to roll back" in capsys.readouterr().err


def test_pytest_specs_registers_and_promotes_in_opennebula(
        pytester: pytest.Pytester, tmp_path: Path, sim: OneSim, one: Any, registry: OpenNebulaRegistry,
        make_reg: MakeReg, data_disk: int, publish_dir: Path) -> None:
    """The main job with --registry opennebula: gate, register, promote, summary (specs need no guest)."""
    repo = tmp_path / "repo"
    (repo / "images" / "web").mkdir(parents=True)
    (repo / "images" / "web" / "image.toml").write_text(RECIPE)
    auth = tmp_path / "one_auth"
    auth.write_text(SESSION)
    auth.chmod(0o600)
    v1 = registry.register(make_reg())
    tid = web_base(one, iid(v1), data_disk)
    image = tmp_path / "web.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True, timeout=30)
    pytester.makepyfile(test_specs="def test_qcow2(built_image):\n    assert built_image.format == 'qcow2'\n")

    result = pytester.runpytest_subprocess(
        "--image-path", str(image), "--image", "web", "--recipes", str(repo), "--registry", "opennebula",
        "--one-xmlrpc", sim.endpoint, "--one-auth", str(auth), "--one-publish-dir", str(publish_dir))

    assert result.ret == 0, result.stdout.str()
    new = max(i.id for i in sim.find_images("web-v2"))
    result.stdout.fnmatch_lines([f"*registered: opennebula image {new}, web-v2 ({sim.endpoint}#image/{new})"
                                 f" | promoted: image {new}, web-v2; templates updated: web-base (template {tid})*"])
    assert disks(sim, tid)[0]["IMAGE_ID"] == str(new)
    assert list(publish_dir.iterdir()) == []


def test_disk_list_survives_oned_template_syntax() -> None:
    disks_ = [{"IMAGE_ID": "7", "NOTE": 'say "hi"', "EMPTY": ""}, {"IMAGE_ID": "3", "TARGET": "vdb"}]
    text = onepromote.render_disks(disks_)
    assert [v for _, v in parse_template(text)] == disks_  # order, empty values and quotes kept
    # oned's text syntax cannot end a value in a backslash: the XML form carries it
    tricky = [{"IMAGE_ID": "7", "PATH": "C:\\disks\\"}, {"IMAGE_ID": "3"}]
    assert onepromote.render_disks(tricky).startswith("<TEMPLATE>")
    assert [v for _, v in parse_template(onepromote.render_disks(tricky))] == tricky
    with pytest.raises(ValueError, match="neither of oned's template forms"):
        onepromote.render_disks([{"IMAGE_ID": "7", "PATH": "x\\", "EMPTY": ""}])
