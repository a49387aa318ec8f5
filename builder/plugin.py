"""pytest plugin: `pytest specs/` builds each selected image, verifies it, and registers what passed.

Thin by design: options, fixtures and hooks here; the work is done by build.py, instance.py,
gate.py and the registries. All run state lives in one KickgateSession registered with the
plugin manager.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from builder.errors import KickgateError
from builder.instance import Instance
from builder.session import ImageUnderTest, KickgateSession

log = logging.getLogger(__name__)

SESSION_KEY = "kickgate-session"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("kickgate", "kickgate: build, verify and register VM images")
    g.addoption("--image", action="append", default=[], metavar="NAME",
                help="recipe to build and verify (repeatable; default: every recipe this machine can build)")
    g.addoption("--image-path", default=None, metavar="PATH",
                help="verify this prebuilt image instead of building (name it with --image)")
    g.addoption("--recipes", default=None, metavar="DIR", help="recipe repository root (holds images/)")
    g.addoption("--cache-dir", default=None, metavar="DIR", help="build cache (default: $KICKGATE_CACHE_DIR or "
                "~/.cache/kickgate)")
    g.addoption("--no-cache", action="store_true", help="rebuild images even when a cached build matches")
    g.addoption("--accel", default="auto", choices=("auto", "kvm", "tcg"), help="hardware acceleration")
    g.addoption("--libvirt-uri", default=None, metavar="URI",
                help="libvirt URI (default: libvirt's embedded QEMU driver, no daemon needed)")
    g.addoption("--location", default=None, metavar="URL|PATH", help="kickstart install source override")
    g.addoption("--console", action="store_true", help="stream guest serial consoles to the log")
    g.addoption("--instance-scope", default="session", choices=("session", "module"),
                help="one instance per image for the whole run (default) or per spec module")
    g.addoption("--keep-instance", default="never", choices=("never", "on-failure", "always"),
                help="keep instances after the run and print how to reach them")
    g.addoption("--boot-timeout", type=float, default=300.0, metavar="S", help="boot-to-SSH timeout")
    g.addoption("--registry", default="local", choices=("local", "opennebula"), help="where verified images go")
    g.addoption("--registry-dir", default=None, metavar="DIR", help="local registry directory "
                "(default: $KICKGATE_REGISTRY_DIR or ~/.local/share/kickgate/registry)")
    g.addoption("--no-register", action="store_true", help="verify only; register nothing")
    g.addoption("--allow-partial", action="store_true",
                help="register even when the run was narrowed (-k, -m, node ids, single files)")
    g.addoption("--artifacts-dir", default=None, metavar="DIR",
                help="copy build records, serial logs and registration records here (for CI artifacts)")
    g.addoption("--one-xmlrpc", default=None, metavar="URL", help="OpenNebula endpoint (default: $ONE_XMLRPC)")
    g.addoption("--one-auth", default=None, metavar="FILE",
                help="file holding user:password (default: $ONE_AUTH or ~/.one/one_auth)")
    g.addoption("--one-datastore", default=None, metavar="NAME|ID", help="OpenNebula image datastore")
    g.addoption("--one-publish-dir", default=None, metavar="DIR",
                help="where images are published for the front-end (must be in the datastore's SAFE_DIRS)")
    g.addoption("--one-name-policy", default=None, choices=("version", "fail", "replace"),
                help="what to do when NAME is taken by other bytes (default: version)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end test that boots real QEMU guests")
    config.addinivalue_line("markers", "family(name): spec applies only to images of this OS family")
    session = KickgateSession(config)
    config.pluginmanager.register(session, SESSION_KEY)


def _session(config: pytest.Config) -> KickgateSession:
    s = config.pluginmanager.get_plugin(SESSION_KEY)
    assert isinstance(s, KickgateSession)
    return s


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every spec that needs an image runs once per selected image."""
    if "built_image" not in metafunc.fixturenames:
        return
    names = _session(metafunc.config).selected_images()
    metafunc.parametrize("built_image", names, indirect=True, ids=names, scope="session")


def _instance_scope(fixture_name: str, config: pytest.Config) -> str:
    scope: str = config.getoption("instance_scope")
    return scope


@pytest.fixture(scope="session")
def kickgate(request: pytest.FixtureRequest) -> KickgateSession:
    """The run's state: hypervisor, builds, instances, results."""
    return _session(request.config)


@pytest.fixture(scope="session")
def built_image(request: pytest.FixtureRequest, kickgate: KickgateSession) -> ImageUnderTest:
    """The built (or cached, or --image-path) image for this parameter, with its sha256 taken now."""
    return kickgate.image(str(request.param))


@pytest.fixture(scope=_instance_scope)  # type: ignore[arg-type]
def instance(request: pytest.FixtureRequest, kickgate: KickgateSession,
             built_image: ImageUnderTest) -> Iterator[Instance]:
    """A throwaway instance of built_image, booted with a context CD; reused by the specs of one image."""
    with kickgate.running_instance(built_image, label=built_image.name, primary=True) as inst:
        yield inst
        failed = getattr(request.node, "_kickgate_failed", False) or request.session.testsfailed > 0
        inst.failed = inst.failed or bool(failed)


@pytest.fixture(scope=_instance_scope)  # type: ignore[arg-type]
def host(instance: Instance) -> Any:
    """testinfra Host (paramiko backend) of the instance: specs are plain testinfra tests."""
    return instance.host


@pytest.fixture
def instance_factory(kickgate: KickgateSession, built_image: ImageUnderTest) -> Iterator[Callable[..., Instance]]:
    """Boot more instances of the same image (e.g. to compare clones); all torn down after the test."""
    with ExitStack() as stack:
        def make(**opts: Any) -> Instance:
            return stack.enter_context(kickgate.running_instance(built_image, label=built_image.name + "-extra",
                                                                 **opts))
        yield make


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    ks = _session(config)
    not_applicable: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "built_image" not in callspec.params:
            continue
        name = str(callspec.params["built_image"])
        item.user_properties.append(("kickgate_image", name))
        fam = item.get_closest_marker("family")
        if fam is not None and ks.family_of(name) not in (None, *fam.args):
            # A spec for another OS family does not apply: leaving it out is not a narrowed run.
            not_applicable.append(item)
    if not_applicable:
        ks.not_applicable = {i.nodeid for i in not_applicable}
        items[:] = [i for i in items if i.nodeid not in ks.not_applicable]
        config.hook.pytest_deselected(items=not_applicable)
    ks.count_collected(items)


def pytest_deselected(items: list[pytest.Item]) -> None:
    if not items:
        return
    ks = _session(items[0].config)
    for i in items:
        if "kickgate_image" in dict(getattr(i, "user_properties", [])) and i.nodeid not in ks.not_applicable:
            ks.deselected += 1


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    name = dict(item.user_properties).get("kickgate_image")
    if name and report.when == "teardown":
        # junitxml takes properties from the teardown report: which bytes this spec judged.
        state = _session(item.config).images.get(str(name))
        if state is not None and state.image is not None:
            report.user_properties.append(("image_sha256", state.image.sha256))
    if report.failed:
        item._kickgate_failed = True  # type: ignore[attr-defined]
        ks = _session(item.config)
        excinfo = call.excinfo
        if excinfo is not None and isinstance(excinfo.value, KickgateError):
            # A user wants the story, not a Python traceback through the harness.
            report.longrepr = f"{type(excinfo.value).__name__}: {excinfo.value}"
        for props in (dict(item.user_properties),):
            name = props.get("kickgate_image")
            if name:
                serial = ks.serial_log_for(str(name))
                if serial:
                    report.sections.append(("kickgate serial log (last 60 lines)", serial))
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    ks = _session(session.config)
    failed_gate = ks.finish(session, exitstatus)
    if failed_gate and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    lines = _session(config).summary_lines()
    if lines:
        terminalreporter.section("kickgate")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    ks = config.pluginmanager.get_plugin(SESSION_KEY)
    if isinstance(ks, KickgateSession):
        ks.close()
        config.pluginmanager.unregister(ks, SESSION_KEY)
