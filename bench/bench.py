#!/usr/bin/env python3
"""Benchmark the whole pipeline cold and warm; print each stage's time and the totals.

    .venv/bin/python bench/bench.py [--image generic-dev] [--runs-dir DIR]
        [--build-only] [--peer mkosi [--peer-only] [--peer-incremental] [--peer-boot]]

Cold: an empty build cache (mmdebstrap, disk, finish VM, convert, then verify and register).
Warm: the same recipe again with the cache filled (cache hit, boot, specs, register).
Each pass runs the real main job, `pytest specs/`, in a subprocess and reads its artifacts;
with --build-only it runs `kickgate build --json` instead (no verify, no register), so a peer
comparison is build against build.

--peer mkosi builds the same recipe with mkosi 14 in the same run, after kickgate (never at the
same time: the machine has 2 cores), and prints both stage by stage with the ratio (bench/peer_mkosi.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import peer_mkosi  # noqa: E402  (bench/ is scripts, not a package)
from peer_mkosi import PeerRun  # noqa: E402

BUILD_STAGES = ("mmdebstrap", "configure", "disk", "finish-vm", "convert", "checksum")


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a pass; if the bench is interrupted, the pass is stopped too and left time to clean up.

    A bench killed with SIGTERM would otherwise leave its kickgate build running, booting its
    finish VM outside whatever lock the bench was started under.
    """
    with subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            out, err = proc.communicate()
        except BaseException:
            try:
                proc.wait(timeout=2)  # Ctrl-C reached it as well
            except subprocess.TimeoutExpired:
                proc.terminate()  # kickgate and pytest stop their guests and remove their files on SIGTERM
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def run_pass(label: str, image: str, cache: Path, work: Path) -> dict[str, Any]:
    artifacts = work / f"{label}-artifacts"
    registry = work / f"{label}-registry"
    env = {**os.environ, "KICKGATE_CACHE_DIR": str(cache)}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "specs/", "--image", image,
            "--registry-dir", str(registry), "--artifacts-dir", str(artifacts)]
    start = time.monotonic()
    proc = _run(argv, env)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
        raise SystemExit(f"{label} pass failed (pytest exit {proc.returncode})")
    gate = json.loads((artifacts / image / "gate.json").read_text())
    record = json.loads((artifacts / image / "build-record.json").read_text())
    return {"wall": wall, "gate": gate, "record": record}


def run_build(label: str, image: str, cache: Path) -> dict[str, Any]:
    """`kickgate build --json`: the build alone, its record's stage timings, no verify or register."""
    argv = [sys.executable, "-m", "builder.cli", "--cache-dir", str(cache), "build", image, "--json"]
    start = time.monotonic()
    proc = _run(argv, dict(os.environ))
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{label} build failed (kickgate exit {proc.returncode})")
    out = json.loads(proc.stdout)
    timings = {"cached": out["cached"], "image_seconds": out["seconds"]}
    return {"wall": wall, "gate": {"timings": timings}, "record": out["record"], "build_only": True}


def report(label: str, result: dict[str, Any]) -> None:
    t = result["gate"]["timings"]
    rec = result["record"]
    print(f"\n== {label} ==")
    if t["cached"]:
        print(f"  {'build (cache hit)':<22}{t['image_seconds']:8.1f} s")
    else:
        for stage in BUILD_STAGES:
            if stage in rec["timings"]:
                print(f"  {stage:<22}{rec['timings'][stage]:8.1f} s")
        print(f"  {'build total':<22}{rec['total_seconds']:8.1f} s")
    if result.get("build_only"):
        print(f"  {'TOTAL (wall)':<22}{result['wall']:8.1f} s   (kickgate build --json: no verify, no register)")
        return
    boots = t["boot_to_ssh_seconds"]
    print(f"  {'boot-to-SSH':<22}{max(boots) if boots else 0.0:8.1f} s   ({len(boots)} instance(s), in parallel)")
    print(f"  {'specs (test calls)':<22}{t['specs_seconds']:8.1f} s")
    print(f"  {'register':<22}{t['register_seconds']:8.1f} s")
    print(f"  {'TOTAL (wall)':<22}{result['wall']:8.1f} s")


def _ratio(kg: float | None, peer: float | None) -> str:
    if kg is None or peer is None or peer < 0.05 or kg < 0.05:
        return "-"
    return f"{kg / peer:.3g}x"


def _cell(v: float | None) -> str:
    return f"{v:10.1f}" if v is not None else f"{'-':>10}"


def side_by_side(cold: dict[str, Any] | None, warm: dict[str, Any] | None, peer: dict[str, PeerRun]) -> None:
    """Build stage by stage: kickgate's build record against mkosi's timed steps, ratio kickgate/mkosi."""
    print("\n== side by side: build, kickgate vs mkosi (ratio = kickgate / mkosi; below 1: kickgate faster) ==")
    extra = [k for k in ("warm", "incremental") if k in peer]  # mkosi's other passes, stage by stage
    heads = {"warm": "mk warm*", "incremental": "mk incr"}
    print(f"  {'stage':<34}{'kickgate s':>10}{'mkosi s':>10}{'ratio':>9}"
          + "".join(f"{heads[k]:>10}" for k in extra))
    rec = cold["record"] if cold else None
    names = {"mmdebstrap": "packages (+ initramfs)", "configure": "configure", "disk": "disk",
             "finish-vm": "finish (VM / chroot)", "convert": "convert (qcow2)", "checksum": "checksum",
             "other": "other (tool overhead)"}
    for stage in (*BUILD_STAGES, "other"):
        kg: float | None = None
        if rec is not None:
            kg = (rec["total_seconds"] - sum(rec["timings"].values()) if stage == "other"
                  else rec["timings"].get(stage, 0.0))
        print(f"  {names[stage][:33]:<34}{_cell(kg)}{_cell(peer['cold'].stages.get(stage, 0.0))}"
              f"{_ratio(kg, peer['cold'].stages.get(stage, 0.0)):>9}"
              + "".join(_cell(peer[k].stages.get(stage, 0.0)) for k in extra))
    kg_cold = rec["total_seconds"] if rec is not None else None
    print(f"  {'COLD build total':<34}{_cell(kg_cold)}{_cell(peer['cold'].wall)}"
          f"{_ratio(kg_cold, peer['cold'].wall):>9}")
    if cold is not None and cold.get("build_only"):
        print(f"  {'COLD wall (whole command)':<34}{_cell(cold['wall'])}{_cell(peer['cold'].wall)}"
              f"{_ratio(cold['wall'], peer['cold'].wall):>9}")
    kg_warm = warm["gate"]["timings"]["image_seconds"] if warm else None
    print(f"  {'WARM build (same command again)':<34}{_cell(kg_warm)}{_cell(peer['warm'].wall)}"
          f"{_ratio(kg_warm, peer['warm'].wall):>9}")
    if warm is not None and warm.get("build_only"):
        print(f"  {'WARM wall (whole command)':<34}{_cell(warm['wall'])}{_cell(peer['warm'].wall)}"
              f"{_ratio(warm['wall'], peer['warm'].wall):>9}")
    if "incremental" in peer:
        print(f"  {'mkosi --incremental (2nd run)':<34}{_cell(None)}{_cell(peer['incremental'].wall)}{'-':>9}")
    print("\n  (* mk warm: mkosi's second build, with the kept package cache; mk incr: --incremental, 2nd run)")
    print("  cold, kickgate: an empty --cache-dir (no image, no mmdebstrap tree); mmdebstrap downloads every")
    print("        package (kickgate keeps no package cache).")
    print("  cold, mkosi:    empty Cache= and output; debootstrap and apt download every package.")
    print("  warm, kickgate: the same recipe again: the cached image (content-addressed key) is reused.")
    print("  warm, mkosi:    the same command again: mkosi 14 keeps no image without --incremental, so it")
    print("        rebuilds everything, reusing the KEPT PACKAGE CACHE (no downloads): a separate figure.")
    if "incremental" in peer:
        print("  --incremental:  mkosi's cached tree (packages installed) reused; finalize, disk and convert rerun.")
    pk = peer["cold"]
    kg_pk = len(rec["packages"]) if rec is not None else None
    print(f"  packages: kickgate {kg_pk if kg_pk is not None else '-'}, mkosi {pk.packages}"
          " (mkosi adds systemd-resolved, libpam-systemd and their dependencies itself)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="generic-dev")
    p.add_argument("--runs-dir", help="keep the caches and registries here (default: a temp dir, removed)")
    p.add_argument("--build-only", action="store_true",
                   help="kickgate build --json instead of pytest specs/ (no verify, no register)")
    p.add_argument("--peer", choices=("mkosi",), help="also build the same recipe with this tool, same run")
    p.add_argument("--peer-only", action="store_true", help="measure only the peer (no kickgate passes)")
    p.add_argument("--peer-incremental", action="store_true", help="also time mkosi --incremental (2 more builds)")
    p.add_argument("--peer-boot", action="store_true", help="boot the peer's image once to a login prompt")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _sigterm)  # stop the running pass and clean up, as Ctrl-C does
    if (args.peer_only or args.peer_incremental or args.peer_boot) and not args.peer:
        p.error("--peer-only, --peer-incremental and --peer-boot need --peer mkosi")
    if args.peer:
        # Checked before any kickgate pass: a missing peer must not cost a cold build first.
        version = peer_mkosi.mkosi_version()
        if version is None:
            raise SystemExit("--peer mkosi: mkosi is not installed; apt-get install mkosi "
                             "(it is not part of ci/setup)")
        if os.geteuid() != 0:
            raise SystemExit("--peer mkosi needs root (loop devices, mounts, chroot)")
        peer_mkosi.load_recipe(args.image)
    work = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="kickgate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    cold = warm = None
    try:
        if not args.peer_only:
            if args.build_only:
                cold = run_build("cold", args.image, cache)
                warm = run_build("warm", args.image, cache)
            else:
                cold = run_pass("cold", args.image, cache, work)
                warm = run_pass("warm", args.image, cache, work)
        peer: dict[str, PeerRun] = {}
        boot = None
        boot_failure = ""
        if args.peer:
            with peer_mkosi.workspace(work / "mkosi" if args.runs_dir else None) as root:
                peer = peer_mkosi.measure(args.image, root, incremental=args.peer_incremental)
                if args.peer_boot:
                    image = peer["warm"].image
                    assert image is not None
                    serial = work / "mkosi-boot-serial.log" if args.runs_dir else None
                    kvm = cold is not None and cold["record"]["domain_type"] == "kvm"
                    try:
                        boot = peer_mkosi.boot_to_login(image, keep_serial=serial, accel="kvm" if kvm else "tcg")
                    except SystemExit as exc:  # the build figures are still worth printing
                        boot_failure = str(exc)
        accel = "KVM" if cold and cold["record"]["domain_type"] == "kvm" else "TCG"
        print(f"kickgate benchmark: {args.image}, {os.cpu_count()} cores, "
              f"{accel if cold else 'kickgate not run'}{f', peer mkosi {version}' if args.peer else ''}")
        if cold and warm:
            report("cold (empty cache)", cold)
            report("warm (cached image)", warm)
        if peer:
            peer_mkosi.print_runs(peer)
            side_by_side(cold, warm, peer)
            if boot_failure:
                print(f"\n  mkosi image boot FAILED: {boot_failure}")
            if boot is not None:
                print(f"\n  mkosi image boot to login prompt: {boot:.1f} s (one boot, QEMU {accel if cold else 'TCG'})")
    finally:
        if not args.runs_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
