"""The `kickgate` command: validate, render, build, list and show registered images, clean up."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from builder import __version__
from builder.errors import KickgateError
from builder.recipe import RecipeBook, find_root

log = logging.getLogger("kickgate")


def _book(args: argparse.Namespace) -> RecipeBook:
    return RecipeBook(Path(args.root) if args.root else find_root())


def cmd_validate(args: argparse.Namespace) -> int:
    book = _book(args)
    names = args.images or book.names()
    if not names:
        raise KickgateError(f"no recipes under {book.images_dir}")
    failed = 0
    for name in names:
        try:
            recipe = book.load(name)
            if recipe.method == "kickstart":
                from builder.render import render_kickstart

                render_kickstart(recipe)
            print(f"{name}: ok ({recipe.method}, {len(recipe.scripts)} scripts)")
        except KickgateError as exc:
            failed += 1
            print(f"{name}: {exc}", file=sys.stderr)
    return 1 if failed else 0


def cmd_render(args: argparse.Namespace) -> int:
    from builder.render import mask_secrets, render_kickstart, render_unvalidated

    recipe = _book(args).load(args.image)
    if recipe.method != "kickstart":
        raise KickgateError(f"{args.image} is a {recipe.method} recipe; only kickstart recipes render a kickstart")
    text = render_unvalidated(recipe) if args.no_validate else render_kickstart(recipe)
    if args.output:
        out = Path(args.output)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o600)  # may hold a password hash
        tmp.replace(out)
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(mask_secrets(text))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from builder.build import BuildOptions, build_image, default_cache_dir
    from builder.hypervisor import Hypervisor

    recipe = _book(args).load(args.image)
    if args.print_virt_install:
        if recipe.method != "kickstart":
            raise KickgateError(f"{args.image} is a {recipe.method} recipe; virt-install applies to kickstart recipes")
        from builder.methods.kickstart import virt_install_command

        print(shlex.join(virt_install_command(recipe, args.location)))
        return 0
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    options = BuildOptions(cache_dir=cache_dir, no_cache=args.no_cache, accel=args.accel,
                           stream_console=args.console, location=args.location)
    on_line = (lambda line: print(line, file=sys.stderr)) if args.console else None
    with Hypervisor(args.libvirt_uri, accel=args.accel, cache_dir=cache_dir) as hv:
        art = build_image(recipe, hv, options, on_console_line=on_line)
    if args.json:
        print(json.dumps({"image": str(art.image), "cached": art.cached, "seconds": round(art.seconds, 3),
                          "record": asdict(art.record)}, indent=2))
    else:
        how = "cached" if art.cached else "built"
        print(f"{art.image}", file=sys.stdout)
        print(f"{recipe.name}: {how} in {art.seconds:.1f}s, sha256 {art.record.image_sha256}", file=sys.stderr)
    return 0


def _registry(args: argparse.Namespace) -> Any:
    if args.registry == "opennebula":
        from builder.registry.opennebula import OpenNebulaConfig, OpenNebulaRegistry

        cfg = OpenNebulaConfig.from_env(endpoint=args.one_xmlrpc, auth_file=args.one_auth)
        return OpenNebulaRegistry(cfg)
    from builder.registry.local import LocalRegistry, default_registry_dir

    return LocalRegistry(Path(args.registry_dir) if args.registry_dir else default_registry_dir())


def cmd_images(args: argparse.Namespace) -> int:
    entries = _registry(args).list()
    if args.json:
        print(json.dumps([asdict(e) for e in entries], indent=2, default=str))
        return 0
    if not entries:
        print("no images registered", file=sys.stderr)
        return 0
    for e in entries:
        attrs = dict(e.attributes)
        print(f"{e.name}\tversion {e.version}\tsha256 {e.sha256[:12]}\t{attrs.get('GITREV', '')}\t"
              f"{attrs.get('SPECS', '').split(':', 1)[0]} specs\t{e.location}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    name, _, version = args.ref.partition("@")
    reg = _registry(args)
    if args.registry == "local":
        print(json.dumps(reg.record(name, version or "latest"), indent=2))
    else:
        matches = [e for e in reg.list() if e.name == name and (not version or e.version == version)]
        if not matches:
            raise KickgateError(f"no image {args.ref} registered by kickgate in OpenNebula")
        print(json.dumps(asdict(matches[-1]), indent=2, default=str))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from builder.build import default_cache_dir
    from builder.hypervisor import cleanup_kept

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    removed = cleanup_kept(cache_dir)
    print(f"removed {len(removed)} kept instance(s){': ' + ', '.join(removed) if removed else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kickgate", description="Build VM images from recipes, verify them with "
                                "testinfra specs (pytest specs/), register only what passed.")
    p.add_argument("--version", action="version", version=f"kickgate {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("--root", help="recipe repository root (default: the nearest folder with images/)")
    p.add_argument("--cache-dir", help="build cache (default: $KICKGATE_CACHE_DIR or ~/.cache/kickgate)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("validate", help="validate recipes without building")
    s.add_argument("images", nargs="*", metavar="IMAGE")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("render", help="print a kickstart recipe's rendered kickstart (secrets masked)")
    s.add_argument("image", metavar="IMAGE")
    s.add_argument("-o", "--output", help="write the unmasked kickstart to this file (mode 0600)")
    s.add_argument("--no-validate", action="store_true", help="skip pykickstart validation")
    s.set_defaults(func=cmd_render)

    s = sub.add_parser("build", help="build (or reuse) an image; prints the artifact path")
    s.add_argument("image", metavar="IMAGE")
    s.add_argument("--no-cache", action="store_true", help="rebuild even if a cached build matches")
    s.add_argument("--json", action="store_true", help="print the build record as JSON")
    s.add_argument("--console", action="store_true", help="stream the guest's serial console to stderr")
    s.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    s.add_argument("--libvirt-uri", help="libvirt URI (default: the embedded QEMU driver)")
    s.add_argument("--location", help="kickstart install source (URL, tree or ISO) overriding the recipe")
    s.add_argument("--print-virt-install", action="store_true",
                   help="print the equivalent virt-install command instead of building")
    s.set_defaults(func=cmd_build)

    for name, func, helptext in (("images", cmd_images, "list registered images"),
                                 ("show", cmd_show, "show one registered image's record")):
        s = sub.add_parser(name, help=helptext)
        if name == "show":
            s.add_argument("ref", metavar="NAME[@VERSION]")
        s.add_argument("--registry", default="local", choices=("local", "opennebula"))
        s.add_argument("--registry-dir", help="local registry directory")
        s.add_argument("--one-xmlrpc", help="OpenNebula endpoint (default: $ONE_XMLRPC)")
        s.add_argument("--one-auth", help="file holding user:password (default: $ONE_AUTH)")
        s.add_argument("--json", action="store_true", help="JSON output")
        s.set_defaults(func=func)

    s = sub.add_parser("cleanup", help="stop instances kept by --keep-instance and remove their files")
    s.set_defaults(func=cmd_cleanup)
    return p


def _sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM (CI cancel, timeout) into the same clean unwind as Ctrl-C.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        rc: int = args.func(args)
        return rc
    except KickgateError as exc:
        print(f"kickgate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kickgate: interrupted; cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
