"""List the skipped tests of a JUnit report; exit 1 if any is not expected by node id.

usage: skips.py JUNIT_XML [EXPECTED_NODE_ID ...]
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def skipped(junit: str) -> dict[str, str]:
    """Node id -> reason of every skipped test (xfail is an outcome of its own, not a skip)."""
    out: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        skip = case.find("skipped")
        if skip is None or skip.get("type") == "pytest.xfail":
            continue
        classname, name = case.get("classname", ""), case.get("name", "")
        # junit names a test by module path with dots and its class, if any: back to a node id
        parts = classname.split(".")
        module = [p for p in parts if not p[:1].isupper()]
        classes = parts[len(module):]
        nodeid = "/".join(module) + ".py::" + "::".join([*classes, name])
        out[nodeid] = skip.get("message", "")
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    junit, expected = argv[0], set(argv[1:])
    found = skipped(junit)
    print(f".ci/run: {len(found)} skipped test(s)")
    for nodeid, reason in sorted(found.items()):
        mark = "expected" if nodeid in expected else "NOT EXPECTED"
        print(f"  {nodeid}  [{mark}] {reason}")
    unexpected = sorted(set(found) - expected)
    if unexpected:
        print(f".ci/run: {len(unexpected)} unexpected skip(s); make the test run, or list it in "
              "expected_skips in .ci/run with the reason", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
