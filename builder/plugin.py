"""pytest plugin: `pytest specs/` builds each selected image, verifies it, and registers what passed.

Thin by design: the options come from builder.options, the work from the Pipeline (builds and
instances), builder.registration (gate and register) and builder.report (summary, artifacts).
Every hook lives on one KickgatePlugin object registered with pytest's plugin manager; the fixtures
below reach it through the plugin manager.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path
from typing import Any

import pytest
from _pytest import junitxml

from builder.errors import KickgateError
from builder.instance import Instance
from builder.options import add_options, run_options
from builder.pipeline import ImageUnderTest, KeptInstance, Pipeline
from builder.progress import LiveDisplay, plain_output
from builder.registration import RunFacts, gate_and_register
from builder.registry import open_registry
from builder.report import (
    html_summary,
    junit_properties,
    stage_rows,
    stage_table,
    suite_properties,
    summary_lines,
    write_artifacts,
)
from builder.scheduling import ImageScheduling
from builder.signals import received, stop_signals_interrupt

log = logging.getLogger(__name__)

PLUGIN_NAME = "kickgate-run"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kickgate", "kickgate: build, verify and register VM images")
    add_options(group.addoption, "pytest")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "family(name): spec applies only to images of this OS family")
    config.pluginmanager.register(KickgatePlugin(config), PLUGIN_NAME)


def _plugin(config: pytest.Config) -> KickgatePlugin:
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    assert isinstance(plugin, KickgatePlugin)
    return plugin


def _image_of(item_or_report: Any) -> str | None:
    name = dict(getattr(item_or_report, "user_properties", ())).get("kickgate_image")
    if not name:  # an item before kickgate's collection hook labelled it (deselected early)
        name = getattr(getattr(item_or_report, "callspec", None), "params", {}).get("built_image")
    return str(name) if name else None


# Plugins whose absence changes no spec's collection, selection or fixtures: `-p no:` of any other
# plugin may drop specs (one that collects them, a conftest with their fixtures) and narrows the run.
HARMLESS_WHEN_DISABLED = frozenset({
    "cacheprovider", "warnings", "faulthandler", "pastebin", "doctest", "html", "cov", "randomly", "sugar",
    "xdist", "xdist.looponfail",
})


class TerminalSink:
    """Progress lines in pytest's terminal, between whatever pytest itself writes.

    Builds and boots run inside fixtures, while pytest holds a half-written line (the spec file's
    name and its dots, or a verbose test id) and captures stdout: the lines are written with capture
    suspended, on a line of their own, and pytest's line is taken up again before pytest writes its
    next result.
    """

    def __init__(self, config: pytest.Config, terminalreporter: Any) -> None:
        self.tr = terminalreporter
        self.capman = config.pluginmanager.get_plugin("capturemanager")
        self.width = config.get_terminal_writer().fullwidth
        self._interrupted: Any = None  # pytest's line (its currentfspath) that our lines broke into
        self._ours = False  # our lines are the last thing on the terminal
        self._live = False  # the cursor is on a line we rewrite

    def _uncaptured(self) -> AbstractContextManager[None]:
        return self.capman.global_and_fixture_disabled() if self.capman is not None else nullcontext()

    def _take_over(self) -> None:
        if not self._ours:
            self._interrupted = self.tr.currentfspath
            self.tr.ensure_newline()
            self._ours = True

    def _fit(self, text: str) -> str:
        return text if len(text) < self.width else text[:max(self.width - 4, 10)] + "..."

    def rewrite(self, text: str) -> None:
        with self._uncaptured():
            self._take_over()
            self.tr.rewrite(self._fit(text), erase=True)
            self.tr.flush()
            self._live = True

    def line(self, text: str) -> None:
        with self._uncaptured():
            self._take_over()
            if self._live:
                self.tr.rewrite(self._fit(text), erase=True)
                self.tr.write("\n", flush=True)
                self._live = False
            else:
                self.tr.write(text + "\n", flush=True)

    def give_back(self) -> None:
        """Before pytest writes a result: end a live line, and put back the spec file pytest was on."""
        if not self._ours:
            return
        if self._live:
            self.tr.write("\n")
            self._live = False
        self._ours = False
        if isinstance(self._interrupted, Path):  # default verbosity: "specs/test_x.py ..", dots follow
            self.tr.write(os.path.relpath(self._interrupted, self.tr.startpath) + " ")
            self.tr.currentfspath = self._interrupted
        elif isinstance(self._interrupted, str):  # -v: the test id, its outcome follows
            self.tr.write(self._interrupted)
            self.tr.currentfspath = self._interrupted
        self._interrupted = None
        self.tr.flush()


class KickgatePlugin:
    """One run's hooks and the state they share."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.options = run_options(lambda name: config.getoption(name, default=None))
        self._stack = ExitStack()
        self._stack.enter_context(stop_signals_interrupt())
        # The pipeline (and the libvirt connection it opens) lives exactly as long as this run.
        self.pipeline = self._stack.enter_context(Pipeline(self.options, start_dir=Path(str(config.rootpath))))
        self.collected: dict[str, int] = {}
        self.deselected = 0
        self.not_applicable: set[str] = set()  # node ids of specs for another OS family
        self.collection_errors: list[str] = []  # node ids of collectors that failed (modules that did not import)
        self.module_paths: dict[str, str] = {}  # node id → absolute path of every module pytest found
        self.spec_dirs: set[str] = set()  # absolute folders holding spec modules of an image
        self.interrupted = False
        self._stopped_by: str | None = None
        self.sink: TerminalSink | None = None

    # -- progress ----------------------------------------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Builds and boots show live progress in the terminal (not under -q, not on xdist workers)."""
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is None or hasattr(self.config, "workerinput") or self.config.get_verbosity() < 0:
            return
        self.sink = TerminalSink(self.config, tr)
        display = LiveDisplay(self.sink, live=not plain_output(bool(tr.isatty)))
        self.pipeline.progress.add(display)
        self._stack.callback(display.close)

    # -- collection --------------------------------------------------------------------------

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collection_errors.append(report.nodeid or "(session)")
        for child in report.result or ():
            if isinstance(child, pytest.Module):
                self.module_paths[child.nodeid] = str(child.path)

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Every spec that needs an image runs once per selected image."""
        if "built_image" not in metafunc.fixturenames:
            return
        try:
            names = self.pipeline.selected_images()
        except KickgateError as exc:
            raise pytest.UsageError(str(exc)) from None
        metafunc.parametrize("built_image", names, indirect=True, ids=names, scope="session")

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """With pytest-xdist every image's specs go to one worker: it builds the image once and boots
        its instances once, however many workers there are."""
        dist = config.getoption("dist", "load")
        if dist not in ("load", "loadscope", "loadgroup", "loadfile", "worksteal"):
            logging.getLogger(__name__).warning("kickgate: --dist %s replaced by one worker per image", dist)
        try:
            images = self.pipeline.selected_images()
        except KickgateError:  # the workers report the selection error when they collect
            images = []
        return ImageScheduling(config, log, images)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        not_applicable: list[pytest.Item] = []
        for item in items:
            callspec = getattr(item, "callspec", None)
            if callspec is None or "built_image" not in callspec.params:
                continue
            name = str(callspec.params["built_image"])
            item.user_properties.append(("kickgate_image", name))
            self.spec_dirs.add(str(item.path.parent))
            fam = item.get_closest_marker("family")
            if fam is not None and self.pipeline.family_of(name) not in (None, *fam.args):
                # A spec for another OS family does not apply: leaving it out is not a narrowed run.
                not_applicable.append(item)
        if not_applicable:
            self.not_applicable = {i.nodeid for i in not_applicable}
            items[:] = [i for i in items if i.nodeid not in self.not_applicable]
            config.hook.pytest_deselected(items=not_applicable)
        for item in items:
            image = _image_of(item)
            if image:
                self.collected[image] = self.collected.get(image, 0) + 1
                if "instance_factory" in getattr(item, "fixturenames", ()):
                    self.pipeline.wants_spare.add(image)

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.deselected += sum(1 for i in items if _image_of(i) and i.nodeid not in self.not_applicable)

    # -- running -----------------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item,
                                  call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        name = _image_of(item)
        if name is None:
            return report
        if report.when == "teardown":
            # junitxml takes properties from the teardown report: which bytes this spec judged.
            report.user_properties.extend(junit_properties(self.pipeline.images.get(name)))
        if report.failed:
            excinfo = call.excinfo
            if excinfo is not None and isinstance(excinfo.value, KickgateError):
                # A user wants the story, not a Python traceback through the harness.
                report.longrepr = f"{type(excinfo.value).__name__}: {excinfo.value}"
            serial = self.pipeline.serial_tail(name)
            if serial:
                report.sections.append(("kickgate serial log (last 60 lines)", serial))
        return report

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.sink is not None:
            self.sink.give_back()
        name = _image_of(report)
        if name is None:
            return
        state = self.pipeline.state(name)
        if report.when == "call":
            state.spec_seconds += report.duration
        state.results.record(report.nodeid, report.when or "call", report.outcome, hasattr(report, "wasxfail"))

    def pytest_keyboard_interrupt(self, excinfo: Any) -> None:
        self.interrupted = True
        # pytest stops a session with its own Interrupted (collection errors, -x): not a person or a signal.
        self._stopped_by = str(excinfo.value) if isinstance(excinfo.value, pytest.Session.Interrupted) else None

    def interrupted_by(self) -> str | None:
        if not self.interrupted:
            return None
        return self._stopped_by or received() or "Ctrl-C"

    # -- gate --------------------------------------------------------------------------------

    def narrowed(self) -> str | None:
        """Why this run does not judge every spec of an image, or None."""
        o = self.config.option
        reasons = []
        if getattr(o, "keyword", ""):
            reasons.append(f"-k {o.keyword}")
        if getattr(o, "markexpr", ""):
            reasons.append(f"-m {o.markexpr}")
        if getattr(o, "lf", False):
            reasons.append("--lf")
        for arg in self.config.args:
            path = arg.split("::", 1)[0]
            if "::" in arg:
                reasons.append(f"node id {arg}")
            elif Path(path).is_file():
                reasons.append(f"single file {arg}")
        if getattr(o, "stepwise", False):
            reasons.append("--sw")
        for flag in ("ignore", "ignore_glob", "deselect"):
            values = getattr(o, flag, None)
            reasons += [f"--{flag.replace('_', '-')} {v}" for v in values or ()]
        disabled = [p[3:] for p in getattr(o, "plugins", None) or () if p.startswith("no:")]
        reasons += [f"-p no:{p}" for p in disabled if p not in HARMLESS_WHEN_DISABLED]
        if self.deselected:
            reasons.append(f"{self.deselected} specs deselected")
        missing = self.uncollected_spec_files()
        if missing:
            reasons.append(f"spec files not collected: {', '.join(missing)}")
        return "; ".join(reasons) or None

    def uncollected_spec_files(self) -> list[str]:
        """Spec modules in the spec folders (by pytest's python_files patterns) that this run never collected."""
        patterns = self.config.getini("python_files") or ["test_*.py"]
        skip = self.config.getini("norecursedirs") or []
        found = set(self.module_paths.values())
        missing = []
        for folder in sorted(self.spec_dirs):
            base = Path(folder)
            for path in sorted(base.rglob("*.py")):
                parts = path.relative_to(base).parts[:-1]
                if any(p.startswith(".") or p == "__pycache__" or any(fnmatch.fnmatch(p, s) for s in skip)
                       for p in parts):
                    continue
                if any(fnmatch.fnmatch(path.name, p) for p in patterns) and str(path) not in found:
                    missing.append(os.path.relpath(path, self.config.invocation_params.dir))
        return missing

    def count_collection_errors(self) -> None:
        """A spec module that failed to collect is an errored spec of every image: no --allow-partial
        registers past it (--continue-on-collection-errors runs the rest, it does not excuse them)."""
        for state in self.pipeline.images.values():
            for nodeid in self.collection_errors:
                state.results.outcomes[nodeid] = "error"

    # -- pytest-xdist: workers build and boot, the controller gates --------------------------

    def _worker_output(self) -> dict[str, Any]:
        return {"collected": self.collected, "deselected": self.deselected,
                "collection_errors": self.collection_errors, "module_paths": self.module_paths,
                "spec_dirs": sorted(self.spec_dirs),
                "images": {name: state.to_wire() for name, state in self.pipeline.images.items()},
                "kept": [vars(k) for k in self.pipeline.kept],
                "timeline": self.pipeline.progress.timeline.to_wire()}

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """Controller: take over what a worker learned (its images' builds and boots, its counts)."""
        data = getattr(node, "workeroutput", {}).get("kickgate")
        if not data:
            return
        for name, count in data["collected"].items():
            self.collected[name] = max(self.collected.get(name, 0), int(count))
        self.deselected = max(self.deselected, int(data["deselected"]))
        # Failed collect reports reach the controller's hook already; a worker's own list adds nothing new.
        self.collection_errors += [e for e in data["collection_errors"] if e not in self.collection_errors]
        self.module_paths.update(data["module_paths"])
        self.spec_dirs.update(data["spec_dirs"])
        for name, wire in data["images"].items():
            self.pipeline.adopt(name, wire)
        self.pipeline.kept += [KeptInstance(**k) for k in data["kept"]]
        self.pipeline.progress.timeline.adopt(data.get("timeline", []))

    @pytest.hookimpl(tryfirst=True)  # before junitxml writes its report: the gate adds properties to it
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:
            # xdist worker: the controller gates on the forwarded reports and on this.
            workeroutput["kickgate"] = self._worker_output()
            return
        interrupted = self.interrupted or exitstatus == pytest.ExitCode.INTERRUPTED or bool(session.shouldstop)
        self.count_collection_errors()
        facts = RunFacts(narrowed=self.narrowed(), interrupted=interrupted, register=self.options.register,
                         allow_partial=self.options.allow_partial)
        failed = gate_and_register(self.pipeline.images, self.collected, facts,
                                   lambda: open_registry(self.options.registry))
        if self.options.artifacts_dir is not None:
            for name, state in self.pipeline.images.items():
                if state.verdict is not None:
                    write_artifacts(self.options.artifacts_dir, name, state)
        junit = self.config.stash.get(junitxml.xml_key, None)
        if junit is not None:
            for name, state in self.pipeline.images.items():
                for key, value in suite_properties(name, state):
                    junit.add_global_property(key, value)
        if failed and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _summary(self) -> tuple[list[str], list[str]]:
        """The summary lines and the per-stage table."""
        lines = summary_lines(self.pipeline.images, self.pipeline.not_selected, self.pipeline.kept,
                              interrupted=self.interrupted_by())
        return lines, stage_table(stage_rows(self.pipeline.images, self.pipeline.progress.timeline.activities()))

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if self.sink is not None:
            self.sink.give_back()
        lines, table = self._summary()
        if lines or table:
            terminalreporter.section("kickgate")
            for line in lines:
                terminalreporter.write_line(line)
            if table:
                terminalreporter.write_line("")
                for line in table:
                    terminalreporter.write_line(line)

    @pytest.hookimpl(optionalhook=True)
    def pytest_html_results_summary(self, prefix: list[str], summary: list[str], postfix: list[str],
                                    session: pytest.Session) -> None:
        """pytest-html (when installed): the summary lines and the stage table above the results."""
        lines = summary_lines(self.pipeline.images, self.pipeline.not_selected, self.pipeline.kept,
                              interrupted=self.interrupted_by())
        prefix.append(html_summary(lines, stage_rows(self.pipeline.images,
                                                     self.pipeline.progress.timeline.activities())))

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self._stack.close()
        config.pluginmanager.unregister(self, PLUGIN_NAME)


# -- fixtures ---------------------------------------------------------------------------------


def _instance_scope(fixture_name: str, config: pytest.Config) -> str:
    return _plugin(config).options.instance_scope


@pytest.fixture(scope="session")
def kickgate(request: pytest.FixtureRequest) -> Pipeline:
    """The run's pipeline: hypervisor, builds, instances, results."""
    return _plugin(request.config).pipeline


@pytest.fixture(scope="session")
def built_image(request: pytest.FixtureRequest, kickgate: Pipeline) -> ImageUnderTest:
    """The built (or cached, or --image-path) image for this parameter, with its sha256 taken now."""
    return kickgate.image(str(request.param))


@pytest.fixture(scope=_instance_scope)  # type: ignore[arg-type]
def instance(kickgate: Pipeline, built_image: ImageUnderTest) -> Iterator[Instance]:
    """A throwaway instance of built_image, booted with a context CD; reused by the specs of one image."""
    with kickgate.running_instance(built_image, label=built_image.name, primary=True) as inst:
        yield inst


@pytest.fixture(scope=_instance_scope)  # type: ignore[arg-type]
def host(instance: Instance) -> Any:
    """testinfra Host (paramiko backend) of the instance: specs are plain testinfra tests."""
    return instance.host


@pytest.fixture(scope=_instance_scope)  # type: ignore[arg-type]
def pristine(instance: Instance) -> Iterator[str]:
    """Guest path (in the instance) of the image as built, mounted read-only: what no boot has touched."""
    yield instance.pristine_root()
    instance.release_pristine()


@pytest.fixture
def instance_factory(kickgate: Pipeline, built_image: ImageUnderTest) -> Iterator[Callable[..., Instance]]:
    """Boot more instances of the same image (e.g. to compare clones); all torn down after the test."""
    with ExitStack() as stack:
        def make(**opts: Any) -> Instance:
            return stack.enter_context(kickgate.running_instance(built_image, label=built_image.name + "-extra",
                                                                 **opts))
        yield make
