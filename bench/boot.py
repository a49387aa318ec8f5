#!/usr/bin/env python3
"""Boot-to-SSH of a reference image: one instance alone, then two in parallel, and where the guest's
time went (systemd's critical chain to sshd and the slowest units).

    .venv/bin/python bench/boot.py [--image generic-dev] [--cache-dir DIR] [--runs N]

The image is built first if the cache does not hold it (not timed). Each instance is booted exactly
as the specs get it (overlay, context CD, fresh MAC, SSH with the context key); boot-to-SSH is the
time from starting the domain to the first accepted login. "Settled" is when systemd reports the
boot finished (`systemctl is-system-running --wait`), which includes first-boot work after sshd.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.instance import Instance  # noqa: E402
from builder.options import RunOptions, default_cache_dir  # noqa: E402
from builder.pipeline import ImageUnderTest, Pipeline  # noqa: E402

PHASES: dict[str, list[tuple[str, float]]] = {}  # instance name → (milestone seen on its console, seconds)
# Console milestones, in boot order, timed by reading the serial log every 50 ms.
MILESTONES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("GRUB entry", re.compile(r"Booting `")),
    ("GRUB loads initrd", re.compile(r"Loading initial ramdisk")),
    ("kernel", re.compile(r"Linux version \d")),
    ("initramfs", re.compile(r"Run /init as init process")),
    ("root mounted", re.compile(r"EXT4-fs \(\w+\): mounted")),
    ("systemd", re.compile(r"systemd \d+[.\d~\w-]* running in system mode|Welcome to")),
    ("rc-local done", re.compile(r"Started .*rc-local\.service")),
    ("sshd started", re.compile(r"Started .*ssh\.service")),
    ("login prompt", re.compile(r"login:")),
)


def watch_console(inst: Instance, t0: float, done: threading.Event) -> None:
    """Record when each console milestone first appears, until done is set."""
    seen = PHASES.setdefault(inst.name, [])
    pending = list(MILESTONES)
    while pending and not done.is_set():
        text = ""
        if inst.serial_log is not None and inst.serial_log.exists():
            text = inst.serial_log.read_text(errors="replace")
        now = time.monotonic() - t0
        for name, rx in [m for m in pending if m[1].search(text)]:
            seen.append((name, now))
            pending.remove((name, rx))
        done.wait(0.05)


def boot(pipeline: Pipeline, image: ImageUnderTest, count: int, vcpus: int = 1) -> list[tuple[Instance, float, float]]:
    """Boot count instances at once; (instance, seconds to SSH, seconds to settled) for each."""
    instances = [pipeline.new_instance(image, label=f"{image.name}-bench{i}", vcpus=vcpus) for i in range(count)]
    results: list[tuple[Instance, float, float]] = []
    errors: list[BaseException] = []
    started: dict[str, float] = {}
    done = threading.Event()
    watchers = []
    for inst in instances:
        started[inst.name] = time.monotonic()
        inst.start()
        watchers.append(threading.Thread(target=watch_console, args=(inst, started[inst.name], done), daemon=True))
        watchers[-1].start()

    def wait(inst: Instance) -> None:
        try:
            inst.wait_ready()
            ssh = time.monotonic() - started[inst.name]
            inst.run("systemctl is-system-running --wait", timeout=300)
            settled = time.monotonic() - started[inst.name]
            results.append((inst, ssh, settled))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=(inst,)) for inst in instances]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in watchers:
        t.join()
    if errors:
        for inst in instances:
            inst.stop()
        raise errors[0]
    return sorted(results, key=lambda r: r[0].name)


def phases(inst: Instance) -> str:
    return ", ".join(f"{phase} {t:.1f}" for phase, t in PHASES.get(inst.name, []))


def command_overhead(inst: Instance, n: int = 20) -> None:
    """What one trivial command costs through a new SSH session each against the one shell."""
    started = time.monotonic()
    for _ in range(n):
        inst.run("true")
    per_session = (time.monotonic() - started) / n
    inst.host.run("true")  # the shell starts
    started = time.monotonic()
    for _ in range(n):
        inst.host.run("true")
    per_shell = (time.monotonic() - started) / n
    print(f"  -- one command: {per_session * 1000:.0f} ms over a new SSH session, "
          f"{per_shell * 1000:.0f} ms through the shell backend")


def describe(inst: Instance) -> None:
    print(f"  -- console milestones (s from domain start): {phases(inst)}")
    command_overhead(inst)
    for title, command in (("systemd-analyze", "systemd-analyze time"),
                           ("critical chain to sshd", "systemd-analyze critical-chain ssh.service --no-pager"),
                           ("critical chain (whole boot)", "systemd-analyze critical-chain --no-pager"),
                           ("slowest units", "systemd-analyze blame --no-pager | head -n 12"),
                           ("contextualization (rc-local, monotonic s)",
                            "journalctl -b -o short-monotonic --no-pager -u rc-local.service -u ssh.service "
                            "-u ssh-hostkeys.service | tail -n 12")):
        _, out = inst.run(command)
        print(f"  -- {title}")
        for line in out.strip().splitlines():
            print(f"     {line}")


def keep_serial(inst: Instance, where: Path | None) -> None:
    if where is not None and inst.serial_log is not None:
        where.mkdir(parents=True, exist_ok=True)
        shutil.copy(inst.serial_log, where / f"{inst.name}.log")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="generic-dev")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--runs", type=int, default=1, help="repeat each measurement this many times")
    p.add_argument("--no-parallel", action="store_true", help="only the single-instance boot")
    p.add_argument("--serial-dir", type=Path, help="keep each instance's serial console log here")
    p.add_argument("--vcpus", type=int, default=1, help="vCPUs of each instance (under TCG, one host thread each)")
    args = p.parse_args()
    options = RunOptions(images=(args.image,), cache_dir=args.cache_dir or default_cache_dir(), register=False)
    with Pipeline(options, start_dir=REPO) as pipeline:
        image = pipeline.image(args.image)
        accel = pipeline.hypervisor().domain_type()
        print(f"kickgate boot benchmark: {args.image} ({image.sha256[:12]}), {accel.upper()}, "
              f"{args.vcpus} vCPU(s) per instance")
        for run in range(args.runs):
            (inst, ssh, settled), = boot(pipeline, image, 1, args.vcpus)
            print(f"\n== one instance (run {run + 1}): SSH login after {ssh:.1f} s, settled after {settled:.1f} s")
            describe(inst)
            keep_serial(inst, args.serial_dir)
            inst.stop()
            if args.no_parallel:
                continue
            pair = boot(pipeline, image, 2, args.vcpus)
            times = ", ".join(f"{ssh:.1f} s (settled {settled:.1f} s)" for _, ssh, settled in pair)
            print(f"\n== two instances in parallel (run {run + 1}): SSH login after {times}; "
                  f"slowest {max(ssh for _, ssh, _ in pair):.1f} s")
            for inst, _, _ in pair:
                print(f"  -- {inst.name} console milestones (s): {phases(inst)}")
                keep_serial(inst, args.serial_dir)
                inst.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
