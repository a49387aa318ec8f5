"""Mutants without guests: discovery and its errors, the runner script, the killed-by judgement, the table."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.cli import main
from builder.errors import MutantError
from builder.mutants import (
    FAILED_MARKER,
    OK_MARKER,
    SHIPPED_DIR,
    Mutant,
    MutantResult,
    SpecRun,
    discover,
    exit_status,
    judge,
    mutant_dirs,
    parse_junit,
    parse_mutant,
    render_json,
    render_table,
    runner_script,
    select,
    spec_name,
)

SEED_PROPERTIES = {"no swap", "no persistent net naming", "contextualization in rc.local", "restrictive firewall",
                   "unique identity", "no open access"}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


GOOD = "#!/bin/sh\n# mutant: writes a harmless file\n# breaks: nothing\nset -eu\necho hi > /etc/kickgate-harmless\n"


# --------------------------------------------------------------------------- discovery


def test_shipped_mutants_cover_every_seed_property_several_times() -> None:
    mutants = discover([SHIPPED_DIR])
    assert len(mutants) >= 15
    counts = {prop: sum(m.breaks == prop for m in mutants) for prop in SEED_PROPERTIES}
    assert all(n >= 2 for n in counts.values()), counts
    assert {m.breaks for m in mutants} <= SEED_PROPERTIES
    for m in mutants:
        assert m.body.startswith("#!/bin/sh\n") and "set -eu" in m.body, m.path
        assert "apt-get" not in m.body, f"{m.path}: mutants run with no network"
        assert "authorized_keys" not in m.body, f"{m.path}: no spec proves a pristine image yet"


def test_headers_are_read_from_the_comment_block(tmp_path: Path) -> None:
    m = parse_mutant(write(tmp_path / "harmless.sh", GOOD))
    assert (m.name, m.description, m.breaks) == ("harmless", "writes a harmless file", "nothing")
    assert m.body == GOOD


@pytest.mark.parametrize(("text", "line", "problem", "hint"), [
    ("#!/bin/sh\n# breaks: no swap\nswapon -a\n", "line 1", "no '# mutant:' header", "# mutant: <one-line"),
    ("#!/bin/sh\n# mutant: swap\nswapon -a\n", "line 1", "no '# breaks:' header", "# breaks: <the seed property"),
    ("#!/bin/sh\n# mutant: a\n# breaks: no swap\n# mutant: b\n", "line 4",
     "a second '# mutant:' header (the first is on line 2)", "keep one '# mutant: ...' line"),
    ("#!/bin/sh\n# mutant:\n# breaks: no swap\n", "line 2", "'# mutant:' is empty", "# mutant: <one-line"),
    # a header below the first command is not a header
    ("#!/bin/sh\n# mutant: late\nset -eu\n# breaks: no swap\n", "line 1", "no '# breaks:' header", ""),
])
def test_header_errors_name_the_file_the_line_and_what_to_write(tmp_path: Path, text: str, line: str,
                                                                problem: str, hint: str) -> None:
    path = write(tmp_path / "bad.sh", text)
    with pytest.raises(MutantError) as err:
        parse_mutant(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {line}: "), msg
    assert problem in msg and hint in msg, msg


def test_the_same_name_twice_is_an_error_naming_both_files(tmp_path: Path) -> None:
    first = write(tmp_path / "a" / "swap.sh", GOOD)
    second = write(tmp_path / "b" / "swap.sh", GOOD)
    with pytest.raises(MutantError) as err:
        discover([tmp_path / "a", tmp_path / "b"])
    assert str(second) in str(err.value) and str(first) in str(err.value) and "rename" in str(err.value)


def test_user_mutants_come_from_the_recipe_root_and_the_image_folder(tmp_path: Path) -> None:
    shipped = tmp_path / "kickgate" / "mutants"
    write(shipped / "shipped.sh", GOOD)
    write(tmp_path / "recipes" / "mutants" / "mine.sh", GOOD)
    write(tmp_path / "recipes" / "images" / "web" / "mutants" / "web-only.sh", GOOD)
    write(tmp_path / "recipes" / "images" / "db" / "mutants" / "db-only.sh", GOOD)
    dirs = mutant_dirs(tmp_path / "recipes", "web", shipped=shipped)
    assert [m.name for m in discover(dirs)] == ["mine", "shipped", "web-only"]
    # the recipe root is kickgate's own checkout: its mutants/ counts once
    assert mutant_dirs(tmp_path / "kickgate", "web", shipped=shipped) == [shipped]


def test_select_keeps_the_order_given_and_rejects_unknown_names(tmp_path: Path) -> None:
    mutants = [Mutant(n, tmp_path / f"{n}.sh", "d", "no swap", GOOD) for n in ("a", "b", "c")]
    assert [m.name for m in select(mutants, ["c", "a", "c"])] == ["c", "a"]
    assert select(mutants, []) == mutants
    with pytest.raises(Exception, match="no mutant named zz; known: a, b, c"):
        select(mutants, ["zz"])


# --------------------------------------------------------------------------- the script disk


def test_script_disk_holds_the_runner_and_the_body_in_whole_sectors(tmp_path: Path) -> None:
    m = parse_mutant(write(tmp_path / "harmless.sh", GOOD))
    data = runner_script(m, eof="KG_EOF")
    assert len(data) % 512 == 0
    text = data.rstrip(b"\0").decode()
    assert "\0" not in text
    assert f"<<'KG_EOF'\n{GOOD.rstrip()}\nKG_EOF\n" in text  # quoted: the body is copied verbatim
    assert "sh -eu /run/kickgate-mutant.sh" in text
    assert OK_MARKER in text and FAILED_MARKER in text
    # it powers off before the shell could read the padding
    assert text.rstrip().endswith("echo o > /proc/sysrq-trigger\nsleep 30\nexit 0")
    assert subprocess.run(["sh", "-n"], input=text, text=True, check=False).returncode == 0


def test_the_runner_applies_the_body_and_reports_its_exit_status(tmp_path: Path) -> None:
    """The runner's own logic on the host, with the guest-only commands stubbed out."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool in ("mountpoint", "mount", "sync"):
        (stubs / tool).write_text("#!/bin/sh\nexit 0\n")
        (stubs / tool).chmod(0o755)
    for body, expect in (("#!/bin/sh\n# mutant: x\n# breaks: y\ntouch \"$OUT/applied\"\n", OK_MARKER),
                         ("#!/bin/sh\n# mutant: x\n# breaks: y\nfalse\ntouch \"$OUT/applied\"\n",
                          f"{FAILED_MARKER}: the mutant exited 1")):
        m = Mutant("x", tmp_path / "x.sh", "x", "y", body)
        text = runner_script(m).rstrip(b"\0").decode()
        text = text.replace("/run/kickgate-mutant.sh", str(tmp_path / "m.sh"))
        text = text.replace("/proc/sysrq-trigger", str(tmp_path / "sysrq"))
        text = text.replace("/proc/sys/kernel/sysrq", str(tmp_path / "sysrq-enable"))
        text = text.replace("export PATH=", f"export PATH={stubs}:").replace("sleep 30", "true")
        (tmp_path / "applied").unlink(missing_ok=True)
        res = subprocess.run(["sh"], input=text, text=True, capture_output=True, check=False,
                             env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
        assert expect in res.stdout, res.stdout + res.stderr
        assert (tmp_path / "applied").exists() == (expect == OK_MARKER)  # set -e stopped the failing body
        assert (tmp_path / "sysrq").read_text().strip() == "o"


def test_a_body_holding_the_delimiter_is_refused(tmp_path: Path) -> None:
    m = Mutant("x", tmp_path / "x.sh", "x", "y", "echo KG_EOF\n")
    with pytest.raises(MutantError, match="delimiter"):
        runner_script(m, eof="KG_EOF")


# --------------------------------------------------------------------------- judging


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="test_swap" name="test_no_active_swap[generic-dev]"/>
<testcase classname="test_swap" name="test_no_swap_in_fstab[generic-dev]">
  <failure message="AssertionError: /etc/fstab mounts swap: ['/swapfile none swap sw 0 0']">trace</failure></testcase>
<testcase classname="test_boot" name="test_boot_finished_without_failed_units[generic-dev]">
  <error message="failed on setup with &quot;InstanceError: boom&quot;">trace</error></testcase>
<testcase classname="test_x" name="test_param[generic-dev-v6]"><skipped message="no"/></testcase>
</testsuite></testsuites>
"""


def test_junit_outcomes_by_spec_name(tmp_path: Path) -> None:
    run = parse_junit(write(tmp_path / "j.xml", JUNIT), "generic-dev")
    assert run.outcomes == (
        ("test_no_active_swap", "passed", ""),
        ("test_no_swap_in_fstab", "failed", "AssertionError: /etc/fstab mounts swap: ['/swapfile none swap sw 0 0']"),
        ("test_boot_finished_without_failed_units", "error", 'failed on setup with "InstanceError: boom"'),
        ("test_param[v6]", "skipped", "no"))


def test_spec_names_keep_parameters_other_than_the_image() -> None:
    assert spec_name("test_a[generic-dev]", "generic-dev") == "test_a"
    assert spec_name("test_a[tcp-generic-dev]", "generic-dev") == "test_a[tcp]"
    assert spec_name("test_a", "generic-dev") == "test_a"
    assert spec_name("test_a[other]", "generic-dev") == "test_a[other]"


M = Mutant("m", Path("m.sh"), "d", "no swap", GOOD)


def spec_run(**outcomes: str) -> SpecRun:
    return SpecRun(tuple((name, outcome, f"{name} says no") for name, outcome in outcomes.items()))  # type: ignore[misc]


def test_only_specs_that_passed_on_the_control_kill_a_mutant() -> None:
    control = spec_run(a="passed", b="failed", c="passed")
    assert judge(M, control, spec_run(a="failed", b="failed", c="passed")) == ("killed", ("a",), "")
    # b fails on the unmutated image too: its failure proves nothing about the mutant
    assert judge(M, control, spec_run(a="passed", b="failed", c="passed")) == ("survived", (), "")
    assert judge(M, None, spec_run(a="passed", b="failed", c="error")) == ("killed", ("b", "c"), "")


def test_a_run_that_did_not_judge_every_spec_cannot_survive() -> None:
    control = spec_run(a="passed", b="passed", c="passed")
    outcome, killed_by, detail = judge(M, control, spec_run(a="passed"))
    assert outcome == "error" and killed_by == () and "did not run b, c" in detail
    assert judge(M, None, SpecRun(()))[0] == "error"
    assert judge(M, control, spec_run(a="passed", b="passed", c="passed")) == ("survived", (), "")


def test_a_mutant_every_spec_errors_on_carries_the_one_reason() -> None:
    control = spec_run(a="passed", b="passed")
    run = SpecRun((("a", "error", "InstanceError: no SSH"), ("b", "error", "InstanceError: no SSH")))
    assert judge(M, control, run) == ("killed", ("a", "b"), "InstanceError: no SSH")


def result(name: str, outcome: str, killed_by: tuple[str, ...] = (), **kw: object) -> MutantResult:
    return MutantResult(name=name, description="d", breaks="no swap", source=f"/m/{name}.sh",
                        outcome=outcome, killed_by=killed_by, apply_seconds=10.0, spec_seconds=50.0,
                        **kw)  # type: ignore[arg-type]


def test_table_rows_and_exit_status() -> None:
    results = [result("swap-fstab", "killed", ("test_no_swap_in_fstab", "test_no_active_swap")),
               result("harmless", "survived"),
               result("broken", "error", error="mutant broken was not applied: the guest powered off\n--- tail"),
               result("no-rc", "killed", ("a", "b"), detail="InstanceError: no SSH")]
    table = render_table(results, control_passed=2)
    lines = table.splitlines()
    assert lines[0].split() == ["mutant", "breaks", "time", "result"]
    assert lines[1].startswith("swap-fstab") and lines[1].endswith(
        "60s  killed by test_no_swap_in_fstab, test_no_active_swap")
    assert lines[2].endswith("SURVIVED")
    assert lines[3].endswith("ERROR: mutant broken was not applied: the guest powered off")
    assert lines[4].endswith("killed by every spec (2): InstanceError: no SSH")
    assert lines[5] == "2 killed, 1 survived, 1 could not be applied, of 4 mutants"
    assert exit_status(results, control_failed=False) == 1
    assert exit_status(results[:1], control_failed=False) == 0
    assert exit_status(results[:1], control_failed=True) == 1


def test_json_is_one_object_per_mutant() -> None:
    data = json.loads(render_json([result("swap-fstab", "killed", ("test_no_swap_in_fstab",)),
                                   result("harmless", "survived")]))
    assert [d["name"] for d in data] == ["swap-fstab", "harmless"]
    assert data[0]["outcome"] == "killed" and data[0]["killed_by"] == ["test_no_swap_in_fstab"]
    assert data[0]["breaks"] == "no swap" and data[0]["source"] == "/m/swap-fstab.sh"
    assert data[0]["seconds"] == {"apply": 10.0, "specs": 50.0, "total": 60.0}
    assert data[1]["outcome"] == "survived" and data[1]["killed_by"] == [] and data[1]["error"] is None


# --------------------------------------------------------------------------- the command's usage errors


@pytest.fixture
def recipes(tmp_path: Path, repo_root: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(repo_root / "images" / "generic-dev", root / "images" / "generic-dev")
    shutil.copytree(repo_root / "scripts", root / "scripts")
    return root


@pytest.mark.parametrize(("args", "message"), [
    (["--mutant", "no-such-mutant"], "no mutant named no-such-mutant; known: "),
    (["--jobs", "0"], "--jobs must be at least 1"),
])
def test_usage_errors_exit_2_before_anything_is_built(capsys: pytest.CaptureFixture[str], recipes: Path,
                                                      tmp_path: Path, args: list[str], message: str) -> None:
    rc = main(["--recipes", str(recipes), "--cache-dir", str(tmp_path / "cache"), "mutants", "generic-dev", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "cache" / "images").exists()


def test_a_malformed_user_mutant_is_named(capsys: pytest.CaptureFixture[str], recipes: Path, tmp_path: Path) -> None:
    bad = write(recipes / "images" / "generic-dev" / "mutants" / "mine.sh", "#!/bin/sh\n# breaks: no swap\n")
    rc = main(["--recipes", str(recipes), "--cache-dir", str(tmp_path / "cache"), "mutants", "generic-dev"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}: line 1: no '# mutant:' header" in err, err
