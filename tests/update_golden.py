"""Rewrite the golden domain XML files from tests/golden_domains.py: python tests/update_golden.py

The tests only compare; run this when a change to the XML is meant, then review `git diff tests/golden`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from golden_domains import GOLDEN, SPECS, golden_path  # noqa: E402

from builder.domain import domain_xml  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden-dir", type=Path, default=GOLDEN, help=f"default: {GOLDEN}")
    golden = parser.parse_args().golden_dir
    golden.mkdir(exist_ok=True)
    stale = set(golden.glob("domain-*.xml")) - {golden_path(n, golden) for n in SPECS}
    for path in sorted(stale):
        path.unlink()
        print(f"removed {path}")
    for name, spec in sorted(SPECS.items()):
        path = golden_path(name, golden)
        xml = domain_xml(spec)
        if not path.is_file() or path.read_text() != xml:
            path.write_text(xml)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
