"""Progress people can read: the line renderer on a fake clock, the live and plain displays, the
timeline behind the per-stage table, the table in `pytest specs/`'s summary, and `kickgate boot`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.errors import BuildError
from builder.progress import (
    BOOT,
    BUILD,
    ActivityTiming,
    LineRenderer,
    LiveDisplay,
    Progress,
    StageTiming,
    Timeline,
    plain_output,
)
from builder.stages import Stages

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def rewrite(self, text: str) -> None:
        self.calls.append(("rewrite", text))

    def line(self, text: str) -> None:
        self.calls.append(("line", text))

    def lines(self) -> list[str]:
        return [t for kind, t in self.calls if kind == "line"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def fake_build(progress: Progress, clock: FakeClock) -> None:
    with progress.activity("generic-dev", BUILD) as building:
        building.stage("mmdebstrap")
        clock.advance(34.8)
        building.stage("configure")
        clock.advance(1.2)
        building.stage("finish-vm")
        clock.advance(46.9)
        building.outcome = "built"


# -- the renderer ----------------------------------------------------------------------------


def test_live_line_names_image_stage_and_elapsed_times(clock: FakeClock) -> None:
    progress = Progress(clock=clock)
    renderer = LineRenderer()
    progress.add(renderer.feed)
    assert renderer.live(clock()) is None
    progress.begin("generic-dev", BUILD)
    progress.stage("generic-dev", BUILD, "mmdebstrap")
    clock.advance(34.8)
    progress.stage("generic-dev", BUILD, "finish-vm")
    clock.advance(12.3)
    assert renderer.live(clock()) == ("kickgate: generic-dev build | finish-vm 12.3s | total 47.1s | "
                                      "done: mmdebstrap 34.8s")
    clock.advance(2.0)  # the same state later: only the times move
    assert renderer.live(clock()) == ("kickgate: generic-dev build | finish-vm 14.3s | total 49.1s | "
                                      "done: mmdebstrap 34.8s")
    progress.end("generic-dev", BUILD, "built")
    assert renderer.live(clock()) is None


def test_plain_lines_one_per_stage_change_and_a_final_one(clock: FakeClock) -> None:
    renderer = LineRenderer()
    progress = Progress(clock=clock)
    lines: list[str] = []
    progress.add(lambda e: lines.extend(renderer.feed(e)))
    fake_build(progress, clock)
    assert lines == [
        "kickgate: generic-dev build: started",
        "kickgate: generic-dev build: mmdebstrap at 0.0s",
        "kickgate: generic-dev build: configure at 34.8s (mmdebstrap took 34.8s)",
        "kickgate: generic-dev build: finish-vm at 36.0s (configure took 1.2s)",
        "kickgate: generic-dev build: built after 82.9s (finish-vm took 46.9s)",
    ]


def test_a_boot_taken_over_late_counts_from_its_real_start(clock: FakeClock) -> None:
    """A spare instance started booting during earlier specs: its boot time starts then, not when waited for."""
    renderer = LineRenderer()
    progress = Progress(clock=clock)
    lines: list[str] = []
    progress.add(lambda e: lines.extend(renderer.feed(e)))
    started = clock()
    clock.advance(30.0)
    progress.begin("generic-dev", BOOT, "kg-generic-dev-extra-1a2b3c", started=started)
    progress.stage("generic-dev", BOOT, "login prompt", "kg-generic-dev-extra-1a2b3c")
    clock.advance(2.5)
    assert renderer.live(clock()) == ("kickgate: generic-dev boot kg-generic-dev-extra-1a2b3c | login prompt 2.5s | "
                                      "total 32.5s")
    progress.end("generic-dev", BOOT, "SSH login", "kg-generic-dev-extra-1a2b3c")
    assert lines[0] == "kickgate: generic-dev boot kg-generic-dev-extra-1a2b3c: started (started 30.0s ago)"
    assert lines[-1] == ("kickgate: generic-dev boot kg-generic-dev-extra-1a2b3c: SSH login after 32.5s "
                         "(login prompt took 2.5s)")


def test_a_failed_activity_says_in_which_stage(clock: FakeClock) -> None:
    renderer = LineRenderer()
    progress = Progress(clock=clock)
    lines: list[str] = []
    progress.add(lambda e: lines.extend(renderer.feed(e)))
    with pytest.raises(BuildError), progress.activity("generic-dev", BUILD) as building:
        building.stage("disk")
        clock.advance(3.0)
        raise BuildError("disk", "mke2fs failed")
    assert lines[-1] == "kickgate: generic-dev build: failed in disk after 3.0s (disk took 3.0s)"
    [timing] = progress.timeline.activities()
    assert timing.outcome == "failed" and timing.seconds == 3.0


# -- the displays ----------------------------------------------------------------------------


def test_plain_display_writes_finished_lines_only(clock: FakeClock) -> None:
    sink = RecordingSink()
    display = LiveDisplay(sink, live=False, clock=clock)
    fake_build(Progress(display, clock=clock), clock)
    display.close()
    assert [kind for kind, _ in sink.calls] == ["line"] * 5
    assert not any(CONTROL.search(text) for _, text in sink.calls)


def test_live_display_rewrites_one_line_then_leaves_the_final_one(clock: FakeClock) -> None:
    sink = RecordingSink()
    display = LiveDisplay(sink, live=True, clock=clock, tick=0.01)
    progress = Progress(display, clock=clock)
    with progress.activity("generic-dev", BUILD) as building:
        building.stage("mmdebstrap")
        clock.advance(5.0)
        deadline = time.monotonic() + 5
        # The ticker rewrites the line on its own while the stage runs: elapsed time moves.
        while not any("mmdebstrap 5.0s" in t for k, t in sink.calls if k == "rewrite"):
            assert time.monotonic() < deadline, sink.calls
            time.sleep(0.01)
        building.outcome = "built"
    display.close()
    assert sink.lines() == ["kickgate: generic-dev build: built after 5.0s (mmdebstrap took 5.0s)"]
    rewrites = [t for k, t in sink.calls if k == "rewrite"]
    assert rewrites[0] == "kickgate: generic-dev build | total 0.0s"
    count = len(sink.calls)
    time.sleep(0.05)
    assert len(sink.calls) == count, "nothing is rewritten once no activity runs"


def test_a_broken_observer_does_not_stop_the_run(clock: FakeClock) -> None:
    def broken(event: object) -> None:
        raise OSError("terminal gone")

    progress = Progress(broken, clock=clock)
    fake_build(progress, clock)
    assert [a.outcome for a in progress.timeline.activities()] == ["built"]


@pytest.mark.parametrize(("isatty", "env", "plain"), [
    (True, {}, False), (False, {}, True), (True, {"CI": "true"}, True), (True, {"CI": "false"}, False),
])
def test_plain_output_without_a_terminal_or_under_ci(isatty: bool, env: dict[str, str], plain: bool) -> None:
    assert plain_output(isatty, env) is plain


# -- the timeline and the stages that feed it ------------------------------------------------


def test_build_stages_report_to_the_build_activity_running_them(clock: FakeClock) -> None:
    progress = Progress(clock=clock)
    with progress.activity("generic-dev", BUILD) as building:
        stages = Stages("generic-dev")
        with stages("mmdebstrap"):
            clock.advance(30.0)
        with stages("convert"):
            clock.advance(5.0)
        building.outcome = "built"
    outside = Stages("generic-dev")  # no activity running: timings only, nobody told
    with outside("disk"):
        pass
    [build] = progress.timeline.activities("generic-dev")
    assert build == ActivityTiming("generic-dev", BUILD, "generic-dev",
                                   (StageTiming("mmdebstrap", 0.0, 30.0), StageTiming("convert", 30.0, None)),
                                   35.0, "built")
    assert set(stages.timings) == {"mmdebstrap", "convert"}


def test_timeline_travels_between_processes(clock: FakeClock) -> None:
    progress = Progress(clock=clock)
    fake_build(progress, clock)
    other = Timeline()
    other.adopt(progress.timeline.to_wire())
    assert other.activities() == progress.timeline.activities()


# -- in pytest's terminal --------------------------------------------------------------------

SPECS = """
def test_image_is_qcow2(built_image):
    assert built_image.format == "qcow2"

def test_boot_reported(built_image, kickgate):
    # What Pipeline.running_instance reports for a real boot, without booting anything.
    with kickgate.progress.activity(built_image.name, "boot", "kg-generic-dev-0abc12") as booting:
        booting.stage("kernel")
        booting.stage("login prompt")
        booting.outcome = "SSH login"
"""


def run_specs(pytester: pytest.Pytester, repo_root: Path, image: Path, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_specs=SPECS)
    return pytester.runpytest_subprocess("--image-path", str(image), "--image", "generic-dev", "--recipes",
                                         str(repo_root), "--registry-dir", str(pytester.path / "registry"), *args)


def test_summary_has_a_stage_table_and_no_control_characters_without_a_tty(
        pytester: pytest.Pytester, repo_root: Path, fake_image: Path) -> None:
    result = run_specs(pytester, repo_root, fake_image)
    result.assert_outcomes(passed=2)
    # The raw bytes pytest wrote (result.outlines would have split a \r away).
    raw = (pytester.path / "stdout").read_bytes().decode()  # bytes: read_text() would turn \r into \n
    assert not CONTROL.search(raw), [ln for ln in raw.split("\n") if CONTROL.search(ln)]
    result.stdout.fnmatch_lines([
        "kickgate: generic-dev build: started",
        "kickgate: generic-dev build: prebuilt after *s",
        # pytest's line of the spec file is taken up again after the progress lines.
        "*test_specs.py .",
        "kickgate: generic-dev boot kg-generic-dev-0abc12: kernel at *s",
        "kickgate: generic-dev boot kg-generic-dev-0abc12: login prompt at *s (kernel took *s)",
        "kickgate: generic-dev boot kg-generic-dev-0abc12: SSH login after *s (login prompt took *s)",
        "*test_specs.py . * [[]100%[]]",
    ])
    result.stdout.fnmatch_lines([
        "*= kickgate =*",
        "generic-dev: prebuilt*specs 2/2 passed*registered*",
        "",
        "image        stage     * seconds",
        "generic-dev  build     * -  prebuilt (--image-path)",
        "generic-dev  boot-to-SSH kg-generic-dev-0abc12  * kernel *.* -> login prompt *.* -> SSH *.*",
        "generic-dev  specs     * *.*  2/2 passed",
        "generic-dev  register  * *.*  registered: version 1",
    ])


def test_quiet_run_shows_no_progress_lines_but_the_table(pytester: pytest.Pytester, repo_root: Path,
                                                         fake_image: Path) -> None:
    result = run_specs(pytester, repo_root, fake_image, "-q")
    result.assert_outcomes(passed=2)
    assert not any(line.startswith("kickgate: ") for line in result.outlines)
    result.stdout.fnmatch_lines(["generic-dev  specs  *  2/2 passed"])


def test_verbose_run_writes_the_test_id_again_after_progress_lines(pytester: pytest.Pytester, repo_root: Path,
                                                                   fake_image: Path) -> None:
    result = run_specs(pytester, repo_root, fake_image, "-v")
    result.stdout.fnmatch_lines([
        "kickgate: generic-dev boot kg-generic-dev-0abc12: SSH login after *",
        "*test_specs.py::test_boot_reported[[]generic-dev[]] PASSED*",
    ])


# -- kickgate boot -----------------------------------------------------------------------------


def _qemu_guests() -> str:
    return subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True, check=False).stdout


@pytest.fixture
def boot_process(repo_root: Path, shared_cache_dir: Path) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:  # a failed assertion must not leave the command (and its guest) running
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=120)


@pytest.mark.slow
def test_kickgate_boot_for_a_while_then_cleans_up(repo_root: Path, shared_cache_dir: Path,
                                                  boot_process: list[subprocess.Popen[str]]) -> None:
    env = {**os.environ, "KICKGATE_CACHE_DIR": str(shared_cache_dir)}
    env.pop("CI", None)  # plain lines come from stderr not being a terminal alone
    # 20s, not less: the first login lands while the guest still makes its extra host keys on its one
    # emulated CPU, and must be done before the instance goes away.
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "boot", "generic-dev", "--for", "20s"],
                            cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    boot_process.append(proc)
    assert proc.stdout is not None
    ssh_line = proc.stdout.readline().strip()  # printed once the instance answers SSH
    serial_line = proc.stdout.readline().strip()
    assert ssh_line.startswith("ssh -F "), ssh_line + (proc.stderr.read() if proc.stderr else "")
    assert serial_line.startswith("serial log: ")
    serial_log = Path(serial_line.removeprefix("serial log: "))
    workdir = serial_log.parent
    assert serial_log.is_file() and workdir.name.startswith("kg-inst-")

    argv = shlex.split(ssh_line)
    argv[1:1] = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=4", "-o", "LogLevel=INFO"]
    started = time.monotonic()
    login = subprocess.run([*argv, "cat /var/run/kickgate-context-init.done"], capture_output=True, text=True,
                           timeout=30, check=False)
    took = time.monotonic() - started
    # The context CD's init script ran: the instance is the one the specs get.
    assert login.returncode == 0, f"ssh failed after {took:.1f}s: {login.stderr}"
    assert login.stdout.startswith("init.sh ran for kg-")

    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    name = ssh_line.split()[-1]
    assert f"kickgate: {name} destroyed and removed" in stderr
    assert not workdir.exists()
    assert f"guest={name}" not in _qemu_guests()
    # The boot's progress on stderr: plain lines (no terminal), phases in order, no control characters.
    assert not CONTROL.search(stderr)
    phases = [m.group(1) for m in re.finditer(rf"kickgate: generic-dev boot {name}: (\w[\w ]*?) at ", stderr)]
    assert phases and phases == [p for p in ("bootloader", "kernel", "init", "login prompt") if p in phases]
    assert "kernel" in phases
    assert re.search(rf"kickgate: generic-dev boot {name}: SSH login after \d+\.\ds", stderr)
