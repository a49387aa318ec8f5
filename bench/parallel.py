#!/usr/bin/env python3
"""Two images verified one after the other against the same two with pytest-xdist (-n 2).

    .venv/bin/python bench/parallel.py [--images generic-dev generic-dev-trixie] [--cold]

Each pass runs the real main job, `pytest specs/ --image A --image B`, in a subprocess: first in one
process (the images one after the other), then with `-n 2` (one worker per image). Both use the same
build cache, warmed before the first pass unless --cold, so the figures compare verify time; with
--cold each pass starts from an empty cache and builds both images too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_pass(images: list[str], cache: Path, work: Path, label: str, extra: list[str]) -> float:
    env = {**os.environ, "KICKGATE_CACHE_DIR": str(cache)}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "specs/", *extra,
            "--registry-dir", str(work / f"{label}-registry")]
    for image in images:
        argv += ["--image", image]
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
        raise SystemExit(f"{label} pass failed (pytest exit {proc.returncode})")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs=2, default=["generic-dev", "generic-dev-trixie"])
    parser.add_argument("--cold", action="store_true", help="empty build cache for each pass")
    parser.add_argument("--cache-dir", type=Path, help="build cache for warm passes (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kg-bench-parallel-") as tmp:
        work = Path(tmp)
        shared = args.cache_dir or work / "cache"

        def cache_for(label: str) -> Path:
            return work / f"{label}-cache" if args.cold else shared

        if not args.cold:
            for image in args.images:  # build once, outside the timed passes
                subprocess.run([sys.executable, "-m", "builder.cli", "--cache-dir", str(shared), "build", image],
                               cwd=REPO, check=True, capture_output=True)
        sequential = run_pass(args.images, cache_for("sequential"), work, "sequential", [])
        parallel = run_pass(args.images, cache_for("parallel"), work, "parallel", ["-n", "2"])
    kind = "cold (builds included)" if args.cold else "warm (cached builds)"
    print(f"two images, {kind}: {', '.join(args.images)}")
    print(f"  {'one after the other':<24}{sequential:8.1f} s")
    print(f"  {'pytest-xdist -n 2':<24}{parallel:8.1f} s   ({sequential / parallel:.2f}x)")


if __name__ == "__main__":
    main()
