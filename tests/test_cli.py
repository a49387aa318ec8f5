"""The kickgate command's promises: validate, render (masked on stdout, 0600 file), show, build --json,
--print-virt-install. In-process through builder.cli.main, except the one build that needs a cache."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from builder.cli import main
from builder.registry.base import Registration
from builder.registry.local import LocalRegistry

# A SHA-512 crypt(3) hash (of no password anyone uses): distinctive, so any copy of it is found.
ROOTPW_HASH = "$6$kgcliSalt$" + "Zq9" * 28 + "w2"
EL9 = "generic-dev-el9"


def kickgate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def checkout(tmp_path: Path, repo_root: Path) -> Path:
    """A copy of the repository's recipes and scripts, free to break."""
    root = tmp_path / "repo"
    shutil.copytree(repo_root / "images", root / "images")
    shutil.copytree(repo_root / "scripts", root / "scripts")
    return root


# --------------------------------------------------------------------------- validate


def test_validate_every_recipe(capsys: pytest.CaptureFixture[str], repo_root: Path) -> None:
    rc, out, err = kickgate(capsys, "--recipes", str(repo_root), "validate")
    names = sorted(p.name for p in (repo_root / "images").iterdir() if (p / "image.toml").is_file())
    assert rc == 0, err
    assert sorted(line.split(":", 1)[0] for line in out.splitlines()) == names
    assert f"{EL9}: ok (kickstart, " in out and "generic-dev: ok (bootstrap, " in out


def test_validate_names_the_broken_file_and_key(capsys: pytest.CaptureFixture[str], checkout: Path) -> None:
    toml = checkout / "images" / "generic-dev" / "image.toml"
    text = toml.read_text()
    assert "\nmemory = " in text
    toml.write_text(text.replace("\nmemory = ", "\nmemory = \"lots\"\n# was: ", 1))
    rc, out, err = kickgate(capsys, "--recipes", str(checkout), "validate")
    assert rc == 1
    assert "generic-dev:" in err and str(toml) in err and "memory" in err
    assert f"{EL9}: ok" in out, "one broken recipe must not hide the verdict on the others"
    rc, out, _ = kickgate(capsys, "--recipes", str(checkout), "validate", EL9)
    assert rc == 0 and out.startswith(f"{EL9}: ok")


def test_validate_renders_kickstart_templates(capsys: pytest.CaptureFixture[str], checkout: Path) -> None:
    template = next((checkout / "images" / EL9).glob("*.ks.j2"))
    template.write_text(template.read_text() + "\n{{ no_such_variable }}\n")
    rc, _, err = kickgate(capsys, "--recipes", str(checkout), "validate", EL9)
    assert rc == 1
    assert "no_such_variable" in err


# --------------------------------------------------------------------------- render


def test_render_masks_the_root_password_hash_on_stdout(capsys: pytest.CaptureFixture[str], repo_root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KICKGATE_ROOTPW_HASH", ROOTPW_HASH)
    rc, out, err = kickgate(capsys, "--recipes", str(repo_root), "render", EL9)
    assert rc == 0, err
    assert "%post" in out and "KICKGATE-INSTALL-OK" in out
    assert ROOTPW_HASH not in out + err and "kgcliSalt" not in out + err
    assert "rootpw --iscrypted ********" in out


def test_render_without_a_hash_locks_root(capsys: pytest.CaptureFixture[str], repo_root: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KICKGATE_ROOTPW_HASH", raising=False)
    rc, out, _ = kickgate(capsys, "--recipes", str(repo_root), "render", EL9)
    assert rc == 0
    assert "rootpw --lock" in out and "--iscrypted" not in out


def test_render_to_a_file_is_unmasked_and_private(capsys: pytest.CaptureFixture[str], repo_root: Path,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KICKGATE_ROOTPW_HASH", ROOTPW_HASH)
    out_file = tmp_path / "ks.cfg"
    umask = os.umask(0)  # even a permissive umask must not widen it
    try:
        rc, out, err = kickgate(capsys, "--recipes", str(repo_root), "render", EL9, "-o", str(out_file))
    finally:
        os.umask(umask)
    assert rc == 0
    assert out == "" and ROOTPW_HASH not in err and f"wrote {out_file}" in err
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    text = out_file.read_text()
    assert f"rootpw --iscrypted {ROOTPW_HASH}" in text


def test_render_of_a_bootstrap_recipe_is_an_error(capsys: pytest.CaptureFixture[str], repo_root: Path) -> None:
    rc, out, err = kickgate(capsys, "--recipes", str(repo_root), "render", "generic-dev")
    assert rc == 2 and out == ""
    assert "generic-dev is a bootstrap recipe" in err


# --------------------------------------------------------------------------- build --print-virt-install


def test_print_virt_install(capsys: pytest.CaptureFixture[str], repo_root: Path) -> None:
    rc, out, err = kickgate(capsys, "--recipes", str(repo_root), "build", EL9, "--print-virt-install",
                            "--location", "https://mirror.example/rocky/9/BaseOS/x86_64/os/")
    assert rc == 0, err
    argv = shlex.split(out)
    assert argv[0] == "virt-install"
    opts = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert opts["--location"] == "https://mirror.example/rocky/9/BaseOS/x86_64/os/"
    assert opts["--initrd-inject"] == "ks.cfg"
    assert "inst.ks=file:/ks.cfg" in opts["--extra-args"].split()
    assert opts["--name"] == f"{EL9}-build"
    assert "--noreboot" in argv


def test_print_virt_install_never_builds(capsys: pytest.CaptureFixture[str], repo_root: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pipeline(*_a: object, **_k: object) -> None:
        raise AssertionError("--print-virt-install started a pipeline")

    monkeypatch.setattr("builder.cli._pipeline", no_pipeline)
    rc, _, err = kickgate(capsys, "--recipes", str(repo_root), "build", EL9, "--print-virt-install")
    assert rc == 0, err
    rc, out, err = kickgate(capsys, "--recipes", str(repo_root), "build", "generic-dev", "--print-virt-install")
    assert rc == 2 and out == "" and "virt-install applies to kickstart recipes" in err


# --------------------------------------------------------------------------- show


def test_show_prints_the_registration_record(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    image = tmp_path / "web.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    attrs = (("NAME", "web"), ("TYPE", "OS"), ("SHA256", sha), ("SPECS", "2/2 passed: a, b"))
    LocalRegistry(registry).register(Registration(name="web", image_path=image, sha256=sha,
                                                  size=image.stat().st_size, format="qcow2", public=False,
                                                  attributes=attrs))
    rc, out, err = kickgate(capsys, "show", "web@latest", "--registry-dir", str(registry))
    assert rc == 0, err
    record = json.loads(out)
    assert record["name"] == "web" and str(record["version"]) == "1" and record["sha256"] == sha
    assert dict(record["attributes"])["SPECS"] == "2/2 passed: a, b"
    rc, out, err = kickgate(capsys, "show", "web@1", "--registry-dir", str(registry))
    assert rc == 0 and json.loads(out) == record
    rc, out, err = kickgate(capsys, "show", "web@2", "--registry-dir", str(registry))
    assert rc == 2 and out == "" and "web" in err


# --------------------------------------------------------------------------- build --json


@pytest.mark.slow
def test_build_json_is_the_build_record(repo_root: Path, shared_cache_dir: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "builder.cli", "--recipes", str(repo_root), "--cache-dir",
                          str(shared_cache_dir), "build", "generic-dev", "--json"],
                         capture_output=True, text=True, timeout=1800, check=False)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    image = Path(doc["image"])
    assert image.is_file() and image.is_relative_to(shared_cache_dir)
    record = doc["record"]
    assert record["recipe"] == "generic-dev" and record["method"] == "bootstrap"
    assert record["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert record["image_size"] == image.stat().st_size
    on_disk = json.loads((image.parent / "record.json").read_text())
    assert {k: on_disk[k] for k in ("image_sha256", "cache_key", "recipe_hash")} == \
        {k: record[k] for k in ("image_sha256", "cache_key", "recipe_hash")}
    assert isinstance(doc["cached"], bool) and doc["seconds"] >= 0
