"""Rewrite the golden domain and disk XML files from tests/golden_domains.py: python tests/update_golden.py

The tests only compare; run this when a change to the XML is meant, then review `git diff tests/golden`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import golden_domains  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden-dir", type=Path, default=golden_domains.GOLDEN,
                        help=f"default: {golden_domains.GOLDEN}")
    golden = parser.parse_args().golden_dir
    golden.mkdir(exist_ok=True)
    files = golden_domains.golden_files(golden)
    stale = {*golden.glob("domain-*.xml"), *golden.glob("disk-*.xml")} - set(files)
    for path in sorted(stale):
        path.unlink()
        print(f"removed {path}")
    for path, xml in sorted(files.items()):
        if not path.is_file() or path.read_text() != xml:
            path.write_text(xml)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
