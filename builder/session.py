"""One pytest run's state: options, images under test, instances, spec results, gate and registration.

Registered with pytest's plugin manager by plugin.py, so its pytest_* methods are hooks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from builder import __version__
from builder.build import Artifact, BuildOptions, BuildRecord, build_image, default_cache_dir
from builder.errors import KickgateError, RegistryError
from builder.fsutil import atomic_copy, atomic_write_text
from builder.gate import SpecResults, Verdict, decide, specs_attribute
from builder.hypervisor import Hypervisor
from builder.instance import Instance, InstanceOptions, KeepPolicy
from builder.provenance import git_state, sha256_file
from builder.recipe import Recipe, RecipeBook, find_root
from builder.registry.base import Registered, Registration, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """The command line, resolved once."""

    images: tuple[str, ...]
    image_path: Path | None
    root: Path | None
    cache_dir: Path
    no_cache: bool
    accel: str
    libvirt_uri: str | None
    location: str | None
    console: bool
    keep: KeepPolicy
    boot_timeout: float
    registry: str
    registry_dir: Path | None
    register: bool
    allow_partial: bool
    artifacts_dir: Path | None
    one: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: pytest.Config) -> RunOptions:
        def opt(name: str) -> Any:
            return config.getoption(name, default=None)

        def path(name: str) -> Path | None:
            v = opt(name)
            return Path(v).expanduser() if v else None

        return cls(
            images=tuple(opt("image") or ()), image_path=path("image_path"), root=path("recipes"),
            cache_dir=path("cache_dir") or default_cache_dir(), no_cache=bool(opt("no_cache")),
            accel=opt("accel") or "auto", libvirt_uri=opt("libvirt_uri"), location=opt("location"),
            console=bool(opt("console")), keep=opt("keep_instance") or "never",
            boot_timeout=float(opt("boot_timeout") or 300.0), registry=opt("registry") or "local",
            registry_dir=path("registry_dir"), register=not opt("no_register"),
            allow_partial=bool(opt("allow_partial")), artifacts_dir=path("artifacts_dir"),
            one={"endpoint": opt("one_xmlrpc"), "auth_file": opt("one_auth"), "datastore": opt("one_datastore"),
                 "publish_dir": opt("one_publish_dir"), "name_policy": opt("one_name_policy")})


@dataclass(frozen=True)
class ImageUnderTest:
    """What the specs run against; sha256 is taken when the image is handed to them."""

    name: str
    recipe: Recipe | None
    path: Path
    format: str
    sha256: str
    size: int
    record: BuildRecord | None
    artifact: Artifact | None
    cached: bool
    seconds: float

    @property
    def family(self) -> str | None:
        return self.recipe.family if self.recipe else None

    @property
    def build_mac(self) -> str | None:
        return self.record.build_mac if self.record else None


@dataclass
class ImageState:
    image: ImageUnderTest | None = None
    error: str | None = None
    results: SpecResults = field(default_factory=SpecResults)
    verdict: Verdict | None = None
    registered: Registered | None = None
    register_error: str | None = None
    current: Instance | None = None
    boot_seconds: list[float] = field(default_factory=list)
    spec_seconds: float = 0.0
    register_seconds: float = 0.0


def can_build(recipe: Recipe) -> tuple[bool, str]:
    """Whether this machine can build the recipe now (tools present, install source reachable)."""
    if recipe.method == "bootstrap":
        if shutil.which("mmdebstrap") is None:
            return False, "mmdebstrap is not installed (run ci/setup)"
        return True, ""
    assert recipe.kickstart is not None
    location = recipe.kickstart.location
    if "://" not in location or location.startswith("file://"):
        local = Path(location.removeprefix("file://"))
        if not local.is_absolute():
            local = recipe.dir / local
        return (True, "") if local.exists() else (False, f"install source {location} does not exist")
    try:
        with urllib.request.urlopen(location.rstrip("/") + "/.treeinfo", timeout=5):
            return True, ""
    except Exception as exc:  # any network failure means: not buildable here, now
        return False, f"install tree {location} is not reachable ({type(exc).__name__})"


class KickgateSession:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.opts = RunOptions.from_config(config)
        self.images: dict[str, ImageState] = {}
        self.not_selected: dict[str, str] = {}
        self.collected: dict[str, int] = {}
        self.deselected = 0
        self.not_applicable: set[str] = set()  # node ids of specs for another OS family
        self._selected: list[str] | None = None
        self._book: RecipeBook | None = None
        self._hv: Hypervisor | None = None
        self._kept: list[Instance] = []
        self.wants_spare: set[str] = set()  # images whose specs boot a second instance
        self._spares: dict[str, Instance] = {}
        self.interrupted = False
        self.any_gate_failed = False

    # -- recipes and images ------------------------------------------------------------------

    @property
    def book(self) -> RecipeBook:
        if self._book is None:
            root = self.opts.root or find_root(Path(str(self.config.rootpath)))
            self._book = RecipeBook(root)
        return self._book

    def selected_images(self) -> list[str]:
        if self._selected is not None:
            return self._selected
        if self.opts.image_path is not None:
            if len(self.opts.images) > 1:
                raise pytest.UsageError("--image-path verifies one image: give at most one --image to name it")
            names = [self.opts.images[0] if self.opts.images else self.opts.image_path.name.split(".")[0]]
        elif self.opts.images:
            names = list(dict.fromkeys(self.opts.images))
            for n in names:
                self._recipe(n)  # unknown names fail now, with the list of known ones
        else:
            names = []
            for n in self.book.names():
                ok, why = can_build(self._recipe(n))
                if ok:
                    names.append(n)
                else:
                    self.not_selected[n] = why
        self._selected = names
        for n in names:
            self.images.setdefault(n, ImageState())
        return names

    def _recipe(self, name: str) -> Recipe:
        try:
            return self.book.load(name)
        except KickgateError as exc:
            raise pytest.UsageError(str(exc)) from None

    def family_of(self, name: str) -> str | None:
        with contextlib.suppress(pytest.UsageError, KickgateError):
            if self.opts.image_path is None or name in self.book.names():
                return self._recipe(name).family
        return None

    @property
    def hypervisor(self) -> Hypervisor:
        if self._hv is None:
            self._hv = Hypervisor(self.opts.libvirt_uri, accel=self.opts.accel,  # type: ignore[arg-type]
                                  cache_dir=self.opts.cache_dir)
            self._hv.open()
        return self._hv

    def image(self, name: str) -> ImageUnderTest:
        state = self.images.setdefault(name, ImageState())
        if state.image is not None:
            return state.image
        try:
            state.image = self._make_image(name)
        except KickgateError as exc:
            state.error = str(exc).splitlines()[0]
            raise
        return state.image

    def _make_image(self, name: str) -> ImageUnderTest:
        if self.opts.image_path is not None:
            path = self.opts.image_path
            if not path.is_file():
                raise KickgateError(f"--image-path {path}: no such file")
            recipe = self._recipe(name) if name in self.book.names() else None
            from builder.disk import image_info

            fmt = str(image_info(path).get("format", "qcow2"))
            return ImageUnderTest(name=name, recipe=recipe, path=path.resolve(), format=fmt,
                                  sha256=sha256_file(path), size=path.stat().st_size, record=None, artifact=None,
                                  cached=True, seconds=0.0)
        recipe = self._recipe(name)
        bopts = BuildOptions(cache_dir=self.opts.cache_dir, no_cache=self.opts.no_cache,
                             accel=self.opts.accel, stream_console=self.opts.console,  # type: ignore[arg-type]
                             location=self.opts.location)
        art = build_image(recipe, self.hypervisor, bopts,
                          on_console_line=(lambda line: log.info("[%s] %s", name, line)) if self.opts.console else None)
        digest = sha256_file(art.image)
        if digest != art.record.image_sha256:
            raise KickgateError(f"{art.image}: sha256 {digest[:12]}… differs from its build record "
                                f"({art.record.image_sha256[:12]}…); the cached file was modified — rebuild "
                                "with --no-cache")
        return ImageUnderTest(name=name, recipe=recipe, path=art.image, format=art.record.image_format,
                              sha256=digest, size=art.image.stat().st_size, record=art.record, artifact=art,
                              cached=art.cached, seconds=art.seconds)

    # -- instances ---------------------------------------------------------------------------

    def new_instance(self, image: ImageUnderTest, label: str, **opts: Any) -> Instance:
        options = InstanceOptions(keep=self.opts.keep, boot_timeout_s=self.opts.boot_timeout, **opts)
        return Instance(self.hypervisor, image.path, image.format, label=label, options=options,
                        avoid_mac=image.build_mac, domain_type=self.hypervisor.domain_type(),
                        on_stop=lambda inst: self._save_instance_log(image.name, inst))

    def start_spare(self, image: ImageUnderTest) -> None:
        """Start booting the second instance a clone spec will ask for, so both boot in parallel."""
        if image.name not in self.wants_spare or image.name in self._spares:
            return
        spare = self.new_instance(image, label=image.name + "-extra")
        try:
            spare.start()
        except Exception as exc:  # the spec that needs it will boot one itself and report the error
            log.warning("%s: could not start a spare instance ahead of time: %s", image.name, exc)
            spare.stop()
            return
        self._spares[image.name] = spare

    @contextlib.contextmanager
    def running_instance(self, image: ImageUnderTest, label: str, *, primary: bool = False,
                         **opts: Any) -> Iterator[Instance]:
        spare = None if (primary or opts) else self._spares.pop(image.name, None)
        inst = spare or self.new_instance(image, label, **opts)
        if primary:
            self.start_spare(image)
        state = self.images.setdefault(image.name, ImageState())
        try:
            with inst:
                state.current = inst
                state.boot_seconds.append(inst.boot_seconds)
                yield inst
        except BaseException:
            inst.failed = True
            raise
        finally:
            if state.current is inst:
                state.current = None
            if inst.kept:
                self._kept.append(inst)
            self._check_base_unchanged(image)

    def _save_instance_log(self, name: str, inst: Instance) -> None:
        """A failed instance's serial log goes to --artifacts-dir before its files are removed."""
        if self.opts.artifacts_dir is None or not inst.failed or inst.serial_log is None:
            return
        if inst.serial_log.is_file():
            copy_into(inst.serial_log, self.opts.artifacts_dir / name, f"instance-{inst.name}-serial.log")

    def _check_base_unchanged(self, image: ImageUnderTest) -> None:
        now = sha256_file(image.path)
        if now != image.sha256:
            raise KickgateError(f"{image.path} changed while instances ran (sha256 {image.sha256[:12]}… → "
                                f"{now[:12]}…): the base image must never be written")

    def serial_log_for(self, name: str) -> str | None:
        state = self.images.get(name)
        if state is None or state.current is None:
            return None
        return "\n".join(state.current.serial_tail(60))

    # -- hooks -------------------------------------------------------------------------------

    def count_collected(self, items: list[pytest.Item]) -> None:
        """What each image must pass (after -k/-m deselection), and which images need a spare."""
        for item in items:
            name = dict(item.user_properties).get("kickgate_image")
            if name:
                self.collected[str(name)] = self.collected.get(str(name), 0) + 1
                if "instance_factory" in getattr(item, "fixturenames", ()):
                    self.wants_spare.add(str(name))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        name = dict(report.user_properties).get("kickgate_image")
        if not name:
            return
        state = self.images.setdefault(str(name), ImageState())
        if report.when == "call":
            state.spec_seconds += report.duration
        state.results.record(report.nodeid, report.when or "call", report.outcome, hasattr(report, "wasxfail"))

    def pytest_keyboard_interrupt(self, excinfo: Any) -> None:
        self.interrupted = True

    def narrowed(self) -> str | None:
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
        if self.deselected:
            reasons.append(f"{self.deselected} specs deselected")
        return "; ".join(reasons) or None

    # -- gate and registration ---------------------------------------------------------------

    def finish(self, session: pytest.Session, exitstatus: int) -> bool:
        if hasattr(self.config, "workerinput"):
            return False  # xdist worker: the controller gates on the forwarded reports
        interrupted = self.interrupted or exitstatus == pytest.ExitCode.INTERRUPTED or bool(session.shouldstop)
        narrowed = self.narrowed()
        for name, state in self.images.items():
            if state.image is None and state.error is None and not state.results.total:
                continue
            expected = self.collected.get(name)
            results = state.results
            if expected is not None and results.total < expected:
                state.verdict = Verdict(False, f"only {results.total} of {expected} specs ran")
            elif state.image is None:
                state.verdict = Verdict(False, f"the image was not built: {state.error}")
            else:
                state.verdict = decide(results, narrowed=narrowed, allow_partial=self.opts.allow_partial,
                                       interrupted=interrupted, register=self.opts.register)
            if state.verdict.promote and state.image is not None:
                started = time.monotonic()
                try:
                    state.registered = self._register(state.image, results)
                except KickgateError as exc:
                    state.register_error = str(exc)
                    self.any_gate_failed = True
                state.register_seconds = time.monotonic() - started
            elif self.opts.register and not state.verdict.promote and not narrowed:
                self.any_gate_failed = True
            self._write_artifacts(name, state)
        return self.any_gate_failed

    def registry(self) -> Registry:
        if self.opts.registry == "opennebula":
            from builder.registry.opennebula import OpenNebulaConfig, OpenNebulaRegistry

            one = {k: v for k, v in self.opts.one.items() if v is not None}
            auth_file = one.pop("auth_file", None)
            cfg = OpenNebulaConfig.from_env(auth_file=auth_file, **one)
            return OpenNebulaRegistry(cfg)
        from builder.registry.local import LocalRegistry, default_registry_dir

        return LocalRegistry(self.opts.registry_dir or default_registry_dir())

    def _register(self, image: ImageUnderTest, results: SpecResults) -> Registered:
        now = sha256_file(image.path)
        if now != image.sha256:
            raise RegistryError(f"{image.path}: its sha256 changed after the specs ran ({image.sha256[:12]}… → "
                                f"{now[:12]}…); refusing to register bytes that were not tested")
        reg = registration_for(image, results, self.book.root if image.recipe else image.path.parent)
        return self.registry().register(reg)

    def _write_artifacts(self, name: str, state: ImageState) -> None:
        if self.opts.artifacts_dir is None:
            return
        dst = self.opts.artifacts_dir / name
        dst.mkdir(parents=True, exist_ok=True)
        art = state.image.artifact if state.image else None
        if art is not None:
            copy_into(art.record_path, dst, "build-record.json")
            if art.serial_log.is_file():
                copy_into(art.serial_log, dst, "build-serial.log")
        summary = {"image": name, "verdict": asdict(state.verdict) if state.verdict else None,
                   "specs": state.results.outcomes,
                   "registered": asdict(state.registered) if state.registered else None,
                   "register_error": state.register_error,
                   "timings": {"image_seconds": state.image.seconds if state.image else None,
                               "cached": state.image.cached if state.image else None,
                               "boot_to_ssh_seconds": state.boot_seconds, "specs_seconds": state.spec_seconds,
                               "register_seconds": state.register_seconds},
                   "sha256": state.image.sha256 if state.image else None}
        atomic_write_text(dst / "gate.json", json.dumps(summary, indent=2, default=str) + "\n")

    def summary_lines(self) -> list[str]:
        lines = []
        for name, why in self.not_selected.items():
            lines.append(f"{name}: not selected ({why}); name it with --image to try anyway")
        for name, state in self.images.items():
            img = state.image
            if img is None:
                lines.append(f"{name}: NOT built: {state.error or 'not reached'}")
                continue
            how = "prebuilt" if img.artifact is None else ("cached" if img.cached else "built")
            parts = [f"{name}: {how} ({img.seconds:.1f}s) sha256 {img.sha256[:12]}"]
            if state.boot_seconds:
                parts.append(f"boot-to-SSH {max(state.boot_seconds):.1f}s")
            r = state.results
            parts.append(f"specs {len(r.passed)}/{r.total} passed")
            if state.registered is not None:
                reg = state.registered
                what = "already registered" if reg.reused else "registered"
                parts.append(f"{what}: {reg.registry} {reg.name} version {reg.version} ({reg.location})")
            elif state.register_error:
                parts.append(f"NOT registered: registration failed: {state.register_error}")
            elif state.verdict is not None:
                parts.append(f"NOT registered: {state.verdict.reason}")
            lines.append(" | ".join(parts))
        for inst in self._kept:
            lines.append(f"kept {inst.name}: {inst.ssh_command()}  (serial log {inst.serial_log}); "
                         f"remove it with: kickgate cleanup")
        return lines

    def close(self) -> None:
        for spare in self._spares.values():
            spare.stop()
        self._spares.clear()
        if self._hv is not None:
            for inst in self._kept:
                self._hv.forget(inst.name, inst.workdir)
            self._hv.close()
            self._hv = None


def copy_into(src: Path, dst_dir: Path, name: str) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    atomic_copy(src, dst_dir / name)


def registration_for(image: ImageUnderTest, results: SpecResults, root: Path) -> Registration:
    """The template the article registers, plus provenance: Source, GitRev, checksum, spec results."""
    recipe = image.recipe
    git = git_state(recipe.dir if recipe else root)
    source = recipe.name if recipe else image.path.name
    reg_name = recipe.register.name if recipe else image.name
    desc = recipe.register.description if recipe else image.name
    attrs: list[tuple[str, str]] = [
        ("NAME", reg_name),
        ("TYPE", recipe.register.type if recipe else "OS"),
        ("PUBLIC", "YES" if recipe and recipe.register.public else "NO"),
        ("DESCRIPTION", f"{desc}. Source: {source}, GitRev: {git.gitrev}"),
    ]
    if recipe:
        attrs += list(recipe.register.attributes)
    record = image.record
    attrs += [
        ("SHA256", image.sha256),
        ("SIZE", str(image.size)),
        ("FORMAT", image.format),
        ("BUILT_AT", record.built_at if record else dt.datetime.now(dt.UTC).isoformat(timespec="seconds")),
        ("BUILD_ID", record.build_id if record else f"prebuilt-{image.sha256[:12]}"),
        ("SPECS", specs_attribute(results)),
        ("KICKGATE_VERSION", __version__),
        ("SOURCE", source),
        ("GITREV", git.gitrev),
    ]
    return Registration(name=reg_name, image_path=image.path, sha256=image.sha256, size=image.size,
                        format=image.format, public=bool(recipe and recipe.register.public), attributes=tuple(attrs))
