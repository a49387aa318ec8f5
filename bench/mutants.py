#!/usr/bin/env python3
"""The full mutant table: every shipped mutant against one image, with the time each took.

    .venv/bin/python bench/mutants.py [--image generic-dev] [--cache-dir DIR] [--jobs 2] [--json-out FILE]

Runs `kickgate mutants IMAGE --json` (the image built or reused from the cache first, outside the
timing), then prints one row per mutant (what it breaks, the specs that killed it or SURVIVED, the
seconds to apply it and to run the specs on it) and the wall-clock total, with the effective time
per mutant (total / mutants) that running --jobs at a time gives. Far too long for CI: CI runs a
named subset (tests/test_mutants_e2e.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.mutants import SHIPPED_DIR, discover  # noqa: E402


def interleaved() -> list[str]:
    """Every shipped mutant, one of each broken property in turn: the first rows cover every property."""
    groups: dict[str, list[str]] = {}
    for m in discover([SHIPPED_DIR]):
        groups.setdefault(m.breaks, []).append(m.name)
    order = []
    while any(groups.values()):
        for names in groups.values():
            if names:
                order.append(names.pop(0))
    return order


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default="generic-dev")
    p.add_argument("--cache-dir", help="build cache (default: kickgate's)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--mutant", action="append", default=[], help="only these (default: every shipped mutant)")
    p.add_argument("--json-out", type=Path, help="also write the results here")
    args = p.parse_args()
    env = dict(os.environ)
    if args.cache_dir:
        env["KICKGATE_CACHE_DIR"] = args.cache_dir
    cli = [sys.executable, "-m", "builder.cli"]
    build = subprocess.run([*cli, "build", args.image], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if build.returncode != 0:
        sys.stderr.write(build.stderr)
        return 2
    started = time.monotonic()
    res = subprocess.run([*cli, "mutants", args.image, "--json", "--jobs", str(args.jobs),
                          *(a for m in args.mutant or interleaved() for a in ("--mutant", m))],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, check=False)
    total = time.monotonic() - started
    if not res.stdout.strip():
        print(f"kickgate mutants printed nothing (exit status {res.returncode})", file=sys.stderr)
        return 2
    results = json.loads(res.stdout)
    if args.json_out:
        args.json_out.write_text(json.dumps({"total_seconds": round(total, 1), "results": results}, indent=2) + "\n")
    w0 = max(len(r["name"]) for r in results)
    w1 = max(len(r["breaks"]) for r in results)
    print(f"{'mutant':<{w0}}  {'breaks':<{w1}}  {'apply':>6}  {'specs':>6}  result")
    for r in results:
        if r["outcome"] == "killed":
            what = "killed by " + ", ".join(r["killed_by"])
            if r["detail"]:
                what = f"killed by every spec ({len(r['killed_by'])}): {r['detail']}"
        elif r["outcome"] == "survived":
            what = "SURVIVED"
        else:
            what = "ERROR: " + (r["error"] or "").splitlines()[0]
        s = r["seconds"]
        print(f"{r['name']:<{w0}}  {r['breaks']:<{w1}}  {s['apply']:>5.0f}s  {s['specs']:>5.0f}s  {what}")
    killed = sum(r["outcome"] == "killed" for r in results)
    print(f"\n{killed} of {len(results)} mutants killed; exit status {res.returncode}")
    print(f"total {total:.0f}s for {len(results)} mutants and the control, {args.jobs} at a time: "
          f"{total / len(results):.0f}s per mutant effective")
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
