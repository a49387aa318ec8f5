#!/usr/bin/env python3
"""Benchmark the whole pipeline cold and warm; print each stage's time and the totals.

    .venv/bin/python bench/bench.py [--image generic-dev] [--runs-dir DIR]

Cold: an empty build cache (mmdebstrap, disk, finish VM, convert, then verify and register).
Warm: the same recipe again with the cache filled (cache hit, boot, specs, register).
Each pass runs the real main job, `pytest specs/`, in a subprocess and reads its artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUILD_STAGES = ("mmdebstrap", "configure", "disk", "finish-vm", "convert", "checksum")


def run_pass(label: str, image: str, cache: Path, work: Path) -> dict[str, Any]:
    artifacts = work / f"{label}-artifacts"
    registry = work / f"{label}-registry"
    env = {**os.environ, "KICKGATE_CACHE_DIR": str(cache)}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "specs/", "--image", image,
            "--registry-dir", str(registry), "--artifacts-dir", str(artifacts)]
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
        raise SystemExit(f"{label} pass failed (pytest exit {proc.returncode})")
    gate = json.loads((artifacts / image / "gate.json").read_text())
    record = json.loads((artifacts / image / "build-record.json").read_text())
    return {"wall": wall, "gate": gate, "record": record}


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
    boots = t["boot_to_ssh_seconds"]
    print(f"  {'boot-to-SSH':<22}{max(boots) if boots else 0.0:8.1f} s   ({len(boots)} instance(s), in parallel)")
    print(f"  {'specs (test calls)':<22}{t['specs_seconds']:8.1f} s")
    print(f"  {'register':<22}{t['register_seconds']:8.1f} s")
    print(f"  {'TOTAL (wall)':<22}{result['wall']:8.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="generic-dev")
    p.add_argument("--runs-dir", help="keep the caches and registries here (default: a temp dir, removed)")
    args = p.parse_args()
    work = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="kickgate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    try:
        cold = run_pass("cold", args.image, cache, work)
        warm = run_pass("warm", args.image, cache, work)
        print(f"kickgate benchmark: {args.image}, {os.cpu_count()} cores, "
              f"{'KVM' if cold['record']['domain_type'] == 'kvm' else 'TCG'}")
        report("cold (empty cache)", cold)
        report("warm (cached image)", warm)
    finally:
        if not args.runs_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
