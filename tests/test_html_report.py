"""The HTML report (pytest-html) for people who read CI results in a browser: the kickgate summary
line, the per-stage table and a failed spec's serial console tail. pytest-html comes with the dev
extra (ci/setup installs it); without it the run below fails on --html."""

from __future__ import annotations

import html
import re
import subprocess
from pathlib import Path

import pytest

SPECS = '''
class StandInInstance:
    """What the plugin reads from a running instance when a spec fails: its serial console."""

    def serial_tail(self, n):
        return ["[    2.104] Linux version 6.1.0-28-amd64", "kg-0123abcd login: (serial line of the stand-in)"][-n:]


def test_passes(built_image):
    assert built_image.format == "qcow2"


def test_fails_with_an_instance(built_image, kickgate):
    kickgate.state(built_image.name).current = StandInInstance()
    assert False, "firewall lets port 8080 through"
'''


def test_html_report_has_summary_stage_table_and_serial_tail(pytester: pytest.Pytester, repo_root: Path,
                                                             tmp_path: Path) -> None:
    image = tmp_path / "generic-dev.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    report = tmp_path / "report.html"
    pytester.makepyfile(test_specs=SPECS)
    result = pytester.runpytest_subprocess("--image-path", str(image), "--image", "generic-dev", "--recipes",
                                           str(repo_root), "--registry-dir", str(tmp_path / "registry"),
                                           f"--html={report}", "--self-contained-html")
    result.assert_outcomes(passed=1, failed=1)
    page = report.read_text()
    # The summary sits in the page as HTML; the results (with their logs) as an escaped JSON blob.
    summary = re.search(r'<div class="kickgate">.*?</div>', page, re.S)
    assert summary is not None, "no kickgate summary in the report"
    text = html.unescape(re.sub(r"<[^>]+>", " ", summary.group(0)))
    assert re.search(r"generic-dev: prebuilt \(\d+\.\ds\) sha256 [0-9a-f]{12} \| specs 1/2 passed \| "
                     r"NOT registered: 1 of 2 specs did not pass", text), text
    table = re.search(r'<table class="kickgate-stages">(.*?)</table>', summary.group(0), re.S)
    assert table is not None
    rows = [[html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", tr)]
            for tr in re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)]
    assert rows[0] == ["image", "stage", "seconds", ""]
    assert ["generic-dev", "build", "-", "prebuilt (--image-path)"] in rows
    assert any(r[:2] == ["generic-dev", "specs"] and r[3] == "1/2 passed" for r in rows), rows

    blob = html.unescape(html.unescape(page))
    assert "kickgate serial log (last 60 lines)" in blob
    assert "kg-0123abcd login: (serial line of the stand-in)" in blob
    # ...in the failed spec's entry, not the passing one's.
    failed_at = blob.index("test_fails_with_an_instance")
    assert blob.index("kickgate serial log", failed_at) > failed_at
    assert blob.count("kickgate serial log (last 60 lines)") == 1
