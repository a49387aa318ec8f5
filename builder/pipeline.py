"""The pytest-free core of a run: which images, their builds, their instances, and each image's state.

A Pipeline is a context manager whose lifetime is the run: it owns the libvirt connection (opened
on first use) and every instance it started, and on exit stops what is not kept and closes the
connection. The pytest plugin, the `kickgate` command and tests all drive a run through it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from builder import runstamp
from builder.build import Artifact, BuildRecord, build_image, in_use, load_artifact
from builder.disk import image_info
from builder.errors import KickgateError
from builder.fsutil import atomic_copy, sha256_file
from builder.gate import SpecResults, Verdict
from builder.hypervisor import Hypervisor
from builder.instance import Instance, InstanceOptions
from builder.method import BuildOptions
from builder.options import RunOptions
from builder.packages import PackageDiff
from builder.progress import BOOT, BUILD, Progress
from builder.recipe import Recipe, RecipeBook, find_root
from builder.registry.base import Promotion, Registered

log = logging.getLogger(__name__)


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
    def build_mac(self) -> str | None:
        return self.record.build_mac if self.record else None

    def to_wire(self) -> dict[str, Any]:
        """What another process of the same run needs to rebuild this (xdist worker → controller)."""
        return {"name": self.name, "recipe": self.recipe.name if self.recipe else None, "path": str(self.path),
                "format": self.format, "sha256": self.sha256, "size": self.size, "cached": self.cached,
                "seconds": self.seconds, "artifact": str(self.artifact.dir) if self.artifact else None}


@dataclass(frozen=True)
class KeptInstance:
    """An instance left running for a person, as the summary names it."""

    name: str
    ssh_command: str
    serial_log: str


@dataclass
class ImageState:
    """Everything a run learns about one image, filled in as the run goes."""

    image: ImageUnderTest | None = None
    error: str | None = None
    results: SpecResults = field(default_factory=SpecResults)
    verdict: Verdict | None = None
    registered: Registered | None = None
    register_error: str | None = None
    promotion: Promotion | None = None
    promote_error: str | None = None
    current: Instance | None = None
    boot_seconds: list[float] = field(default_factory=list)
    spec_seconds: float = 0.0
    register_seconds: float = 0.0
    package_diff: PackageDiff | None = None  # against the version registered before, when there is one
    package_diff_line: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"image": self.image.to_wire() if self.image else None, "error": self.error,
                "boot_seconds": self.boot_seconds}


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


class Pipeline:
    """One run of build → verify over the selected images. Not thread-safe; one per process."""

    def __init__(self, options: RunOptions, start_dir: Path | None = None, progress: Progress | None = None) -> None:
        self.options = options
        self.progress = progress or Progress()  # builds and boots report here, as they go
        self._start_dir = start_dir
        self.images: dict[str, ImageState] = {}
        self.not_selected: dict[str, str] = {}
        self.kept: list[KeptInstance] = []
        self.wants_spare: set[str] = set()  # images whose specs boot a second instance
        self._spares: dict[str, Instance] = {}
        self._spare_started: dict[str, float] = {}  # when each spare began to boot (progress clock)
        self._selected: list[str] | None = None
        self._book: RecipeBook | None = None
        self._hv: Hypervisor | None = None
        self._kept_instances: list[Instance] = []
        self._held = contextlib.ExitStack()

    # -- lifetime ----------------------------------------------------------------------------

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for spare in self._spares.values():
            spare.stop()
        self._spares.clear()
        if self._hv is not None:
            for inst in self._kept_instances:
                self._hv.forget(inst.name, inst.workdir)
            self._hv.close()
            self._hv = None
        self._held.close()

    def hypervisor(self) -> Hypervisor:
        """The run's libvirt connection, opened on first use and closed with the pipeline."""
        if self._hv is None:
            # Before this run makes anything: what runs that died left behind goes first.
            runstamp.sweep(self.options.cache_dir)
            hv = Hypervisor(self.options.libvirt_uri, accel=self.options.accel, cache_dir=self.options.cache_dir)
            hv.open()
            self._hv = hv
        return self._hv

    # -- recipes and selection ---------------------------------------------------------------

    @property
    def book(self) -> RecipeBook:
        if self._book is None:
            self._book = RecipeBook(self.options.recipes or find_root(self._start_dir))
        return self._book

    def recipe(self, name: str) -> Recipe:
        return self.book.load(name)

    def selected_images(self) -> list[str]:
        """The images this run verifies: --image names, the --image-path image, or every buildable recipe."""
        if self._selected is not None:
            return self._selected
        opts = self.options
        if opts.image_path is not None:
            if len(opts.images) > 1:
                raise KickgateError("--image-path verifies one image: give at most one --image to name it")
            names = [opts.images[0] if opts.images else opts.image_path.name.split(".")[0]]
        elif opts.images:
            names = list(dict.fromkeys(opts.images))
            for n in names:
                self.recipe(n)  # unknown names fail now, with the list of known ones
        else:
            names = []
            for n in self.book.names():
                ok, why = can_build(self.recipe(n))
                if ok:
                    names.append(n)
                else:
                    self.not_selected[n] = why
        self._selected = names
        for n in names:
            self.images.setdefault(n, ImageState())
        return names

    def family_of(self, name: str) -> str | None:
        with contextlib.suppress(KickgateError):
            if self.options.image_path is None or name in self.book.names():
                return self.recipe(name).family
        return None

    def state(self, name: str) -> ImageState:
        return self.images.setdefault(name, ImageState())

    # -- images ------------------------------------------------------------------------------

    def image(self, name: str, on_console_line: Callable[[str], None] | None = None) -> ImageUnderTest:
        """The image named name, built (or taken from the cache, or --image-path) once per run."""
        state = self.state(name)
        if state.image is not None:
            return state.image
        try:
            with self.progress.activity(name, BUILD) as building:
                state.image = self._make_image(name, on_console_line)
                building.outcome = "prebuilt" if state.image.artifact is None else \
                    "cached" if state.image.cached else "built"
        except KickgateError as exc:
            state.error = str(exc).splitlines()[0]
            raise
        return state.image

    def _make_image(self, name: str, on_console_line: Callable[[str], None] | None) -> ImageUnderTest:
        opts = self.options
        if opts.image_path is not None:
            path = opts.image_path
            if not path.is_file():
                raise KickgateError(f"--image-path {path}: no such file")
            recipe = self.recipe(name) if name in self.book.names() else None
            fmt = str(image_info(path).get("format", "qcow2"))
            return ImageUnderTest(name=name, recipe=recipe, path=path.resolve(), format=fmt,
                                  sha256=sha256_file(path), size=path.stat().st_size, record=None, artifact=None,
                                  cached=True, seconds=0.0)
        recipe = self.recipe(name)
        bopts = BuildOptions(cache_dir=opts.cache_dir, no_cache=opts.no_cache, accel=opts.accel,
                             console=opts.console, location=opts.location)
        art = build_image(recipe, self.hypervisor(), bopts, on_console_line=on_console_line)
        # build_image hashed the file (a cache hit is re-hashed against its signed record); holding the
        # entry keeps a concurrent rebuild from removing the bytes this run's instances are backed by.
        self._held.enter_context(in_use(art))
        return ImageUnderTest(name=name, recipe=recipe, path=art.image.resolve(), format=art.record.image_format,
                              sha256=art.record.image_sha256, size=art.image.stat().st_size, record=art.record,
                              artifact=art, cached=art.cached, seconds=art.seconds)

    # -- instances ---------------------------------------------------------------------------

    def new_instance(self, image: ImageUnderTest, label: str, **opts: Any) -> Instance:
        if image.recipe is not None and image.recipe.verify.network == "outbound":
            opts.setdefault("isolated", False)
        options = InstanceOptions(keep=self.options.keep, boot_timeout_s=self.options.boot_timeout_s, **opts)
        hv = self.hypervisor()
        return Instance(hv, image.path, image.format, label=label, options=options, avoid_mac=image.build_mac,
                        domain_type=hv.domain_type(), on_stop=lambda inst: self._save_instance_log(image.name, inst))

    def start_spare(self, image: ImageUnderTest) -> None:
        """Start booting the second instance a clone spec will ask for, so both boot in parallel."""
        if image.name not in self.wants_spare or image.name in self._spares:
            return
        spare = self.new_instance(image, label=image.name + "-extra")
        self._spare_started[image.name] = self.progress.clock()
        try:
            spare.start()
            self._spares[image.name] = spare
        except BaseException as exc:
            spare.stop()
            if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM: undo the half-started spare, then stop
                raise
            # The spec that needs it will boot one itself and report the error.
            log.warning("%s: could not start a spare instance ahead of time: %s", image.name, exc)

    @contextlib.contextmanager
    def running_instance(self, image: ImageUnderTest, label: str, *, primary: bool = False,
                         **opts: Any) -> Iterator[Instance]:
        """A booted instance of image; torn down (or kept, by policy) when the block ends."""
        spare = None if (primary or opts) else self._spares.pop(image.name, None)
        started = self._spare_started.pop(image.name, None) if spare is not None else None
        inst = spare or self.new_instance(image, label, **opts)
        state = self.state(image.name)
        entered = False  # until the instance's own context manager owns it, a stop signal is ours to clean up
        try:
            if primary:
                self.start_spare(image)
            with contextlib.ExitStack() as running:
                # Only the boot is an activity people follow: it ends when SSH answers, not with the block.
                with self.progress.activity(image.name, BOOT, inst.name, started=started) as booting:
                    inst.on_phase = booting.stage
                    entered = True  # Instance.__enter__ stops the instance itself when its boot fails
                    running.enter_context(inst)
                    booting.outcome = "SSH login"
                state.current = inst
                state.boot_seconds.append(inst.boot_seconds)
                try:
                    yield inst
                finally:
                    # --keep-instance on-failure keeps the instances of the images whose specs failed,
                    # not every image's as soon as any spec of the run failed.
                    inst.failed = inst.failed or state.results.any_failed
        except BaseException:
            inst.failed = True
            if not entered:
                inst.stop()
            raise
        finally:
            if state.current is inst:
                state.current = None
            if inst.kept:
                self._kept_instances.append(inst)
                self.kept.append(KeptInstance(inst.name, inst.ssh_command(), str(inst.serial_log)))
            self.check_base_unchanged(image)

    def _save_instance_log(self, name: str, inst: Instance) -> None:
        """A failed instance's serial log goes to --artifacts-dir before its files are removed."""
        artifacts = self.options.artifacts_dir
        if artifacts is None or not inst.failed or inst.serial_log is None or not inst.serial_log.is_file():
            return
        copy_into(inst.serial_log, artifacts / name, f"instance-{inst.name}-serial.log")

    def check_base_unchanged(self, image: ImageUnderTest) -> None:
        now = sha256_file(image.path)
        if now != image.sha256:
            raise KickgateError(f"{image.path} changed while instances ran (sha256 {image.sha256[:12]}… → "
                                f"{now[:12]}…): the base image must never be written")

    def adopt(self, name: str, wire: dict[str, Any]) -> None:
        """Take over what another process of this run learned about an image (its build, its boots)."""
        state = self.state(name)
        state.error = wire["error"] or state.error
        state.boot_seconds += list(wire["boot_seconds"])
        img = wire["image"]
        if img is None or state.image is not None:
            return
        artifact = load_artifact(Path(img["artifact"])) if img["artifact"] else None
        state.image = ImageUnderTest(
            name=img["name"], recipe=self.recipe(img["recipe"]) if img["recipe"] else None, path=Path(img["path"]),
            format=img["format"], sha256=img["sha256"], size=int(img["size"]),
            record=artifact.record if artifact else None,
            artifact=replace(artifact, cached=img["cached"], seconds=img["seconds"]) if artifact else None,
            cached=bool(img["cached"]), seconds=float(img["seconds"]))

    def serial_tail(self, name: str, lines: int = 60) -> str | None:
        state = self.images.get(name)
        if state is None or state.current is None:
            return None
        return "\n".join(state.current.serial_tail(lines))


def copy_into(src: Path, dst_dir: Path, name: str) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    atomic_copy(src, dst_dir / name)
