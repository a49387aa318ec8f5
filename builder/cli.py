"""The `kickgate` command: validate, render, build, boot, list, show, promote and roll back registered images,
run mutants against the specs, clean up."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from builder import __version__
from builder.errors import KickgateError, RecipeError
from builder.fsutil import atomic_write_text
from builder.options import RunOptions, add_options, registry_options, run_options
from builder.progress import LiveDisplay, Progress, StreamSink, plain_output
from builder.recipe import RecipeBook, find_root
from builder.registry import open_registry
from builder.registry.base import PromoteTargets, Promotion, Registry
from builder.signals import received, stop_signals_interrupt

if TYPE_CHECKING:
    from builder.pipeline import Pipeline


def _options(args: argparse.Namespace) -> RunOptions:
    """The run options this command was given; those of other surfaces keep their defaults."""
    return run_options(lambda name: getattr(args, name, None))


def _book(args: argparse.Namespace) -> RecipeBook:
    return RecipeBook(Path(args.recipes) if args.recipes else find_root())


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
        atomic_write_text(out, text, mode=0o600)  # may hold a password hash: never readable by others
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(mask_secrets(text))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    recipe = _book(args).load(args.image)
    if args.print_virt_install:
        if recipe.method != "kickstart":
            raise KickgateError(f"{args.image} is a {recipe.method} recipe; virt-install applies to kickstart recipes")
        from builder.methods.kickstart import virt_install_command

        print(shlex.join(virt_install_command(recipe, args.location)))
        return 0
    with _pipeline(args) as pipeline:
        image = pipeline.image(recipe.name)
    art = image.artifact
    assert art is not None
    if args.json:
        print(json.dumps({"image": str(art.image), "cached": art.cached, "seconds": round(art.seconds, 3),
                          "record": asdict(art.record)}, indent=2))
    else:
        how = "cached" if art.cached else "built"
        print(f"{art.image}", file=sys.stdout)
        print(f"{recipe.name}: {how} in {art.seconds:.1f}s, sha256 {art.record.image_sha256}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _pipeline(args: argparse.Namespace) -> Iterator[Pipeline]:
    """A Pipeline whose builds and boots show their progress on stderr, as `pytest specs/` shows it.

    A live line on a terminal when nothing else writes there; with INFO log lines on stderr (the
    default) plain lines, which interleave with them cleanly.
    """
    from builder.pipeline import Pipeline

    live = not plain_output(sys.stderr.isatty()) and logging.getLogger().getEffectiveLevel() > logging.INFO
    display = LiveDisplay(StreamSink(sys.stderr, width=shutil.get_terminal_size().columns), live=live)
    try:
        with Pipeline(_options(args), progress=Progress(display)) as pipeline:
            yield pipeline
    finally:
        display.close()


_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


def parse_duration(text: str) -> float:
    """Seconds from "30s", "5m", "1h", "1m30s" or a bare number of seconds."""
    m = _DURATION_RE.fullmatch(text.strip())
    if not text.strip() or m is None or not any(m.groups()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write e.g. 30s, 5m, 1h or 1m30s")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    return hours * 3600 + minutes * 60 + seconds


def cmd_boot(args: argparse.Namespace) -> int:
    recipe = _book(args).load(args.image)
    with _pipeline(args) as pipeline:
        image = pipeline.image(recipe.name)
        # The instance the specs get: same overlay, context CD, key and forwards (Pipeline.running_instance).
        with pipeline.running_instance(image, label=recipe.name, primary=True) as inst:
            print(inst.ssh_command(), flush=True)
            print(f"serial log: {inst.serial_log}", flush=True)
            until = f"for {args.duration:g}s" if args.duration is not None else "until Ctrl-C"
            print(f"kickgate: {inst.name} is up {until}; then it is destroyed and its files removed",
                  file=sys.stderr, flush=True)
            try:
                if args.duration is not None:
                    time.sleep(args.duration)
                else:
                    while True:
                        time.sleep(3600)
            except KeyboardInterrupt:  # the expected way to end it (SIGTERM and SIGHUP too)
                print(f"kickgate: {received() or 'Ctrl-C'}: stopping {inst.name}", file=sys.stderr, flush=True)
        name = inst.name
    print(f"kickgate: {name} destroyed and removed", file=sys.stderr)
    return 0


def _registry(args: argparse.Namespace) -> Registry:
    return open_registry(registry_options(lambda name: getattr(args, name, None)))


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
        which = e.label if e.image_id is not None else f"{e.name}\tversion {e.version}"
        print(f"{which}\tsha256 {e.sha256[:12]}\t{attrs.get('GITREV', '')}\t"
              f"{attrs.get('SPECS', '').split(':', 1)[0]} specs\t{e.location}" + ("\tpromoted" if e.promoted else ""))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print(json.dumps(dict(_registry(args).get(*_ref(args.ref)).details), indent=2, default=str))
    return 0


def _ref(ref: str) -> tuple[str, str]:
    from builder.versions import parse_ref

    name, version = parse_ref(ref)
    return name, str(version)


def cmd_diff(args: argparse.Namespace) -> int:
    from builder.inventory import from_attributes
    from builder.packages import diff_packages, render_diff

    registry = _registry(args)
    old, new = (registry.get(*_ref(ref)) for ref in (args.old, args.new))
    diff = diff_packages(from_attributes(old.attributes, old.label).packages,
                         from_attributes(new.attributes, new.label).packages)
    if args.json:
        print(json.dumps({"old": old.label, "new": new.label, **diff.to_json()}, indent=2))
    else:
        print(f"{new.label}: " + render_diff(diff, old.label))
    return 0


def cmd_sbom(args: argparse.Namespace) -> int:
    from builder.inventory import stored_sbom

    reg = _registry(args).get(*_ref(args.ref))
    sys.stdout.write(stored_sbom(reg.attributes, reg.label))
    return 0


def _promote_targets(args: argparse.Namespace, name: str) -> PromoteTargets:
    """The [promote] table of the recipe registering name; none (no templates) when no recipe does."""
    from builder.promote import recipe_registering, recipe_targets

    try:
        book = _book(args)
    except RecipeError:
        book = None
    recipe = recipe_registering(book, name) if book is not None else None
    targets = recipe_targets(recipe)
    if targets is None:
        where = f"{recipe.path} has no [promote] table" if recipe else f"no recipe registers {name}"
        logging.getLogger("kickgate").warning("%s: no VM template follows the promoted version", where)
        return PromoteTargets()
    return targets


def _print_promotion(promotion: Promotion) -> int:
    print(promotion.summary())
    return 0 if promotion.complete else 1


def cmd_promote(args: argparse.Namespace) -> int:
    from builder.promote import promote_ref
    from builder.versions import parse_ref

    name, _ = parse_ref(args.ref)
    registry = _registry(args)
    return _print_promotion(promote_ref(registry, args.ref, _promote_targets(args, name)))


def cmd_rollback(args: argparse.Namespace) -> int:
    from builder.promote import rollback

    registry = _registry(args)
    return _print_promotion(rollback(registry, args.name, _promote_targets(args, args.name)))


def cmd_mutants(args: argparse.Namespace) -> int:
    from builder.mutants import (
        MutantRunner,
        RunSettings,
        discover,
        exit_status,
        mutant_dirs,
        render_json,
        render_table,
        select,
    )

    if args.jobs < 1:
        raise KickgateError("--jobs must be at least 1")
    book = _book(args)
    recipe = book.load(args.image)
    dirs = mutant_dirs(book.root.resolve(), recipe.name)
    mutants = select(discover(dirs), args.mutant or [])
    if not mutants:
        raise KickgateError(f"no mutants (*.sh) in {', '.join(map(str, dirs)) or 'mutants/'}")
    log = logging.getLogger("kickgate.mutants")
    # Built or reused exactly as `kickgate build` does; the cache is only read after that.
    with _pipeline(args) as pipeline:
        image = pipeline.image(recipe.name)
        hv = pipeline.hypervisor()
        settings = RunSettings(image_name=recipe.name, image=image.path, image_format=image.format,
                               recipes=book.root.resolve(), domain_type=hv.domain_type(), jobs=args.jobs,
                               control=not args.no_control, user_cache=pipeline.options.cache_dir)
        log.info("%s: %d mutant(s), %d at a time%s", recipe.name, len(mutants), args.jobs,
                 "" if args.no_control else ", after a control run on the unmutated image")
        with MutantRunner(settings, hv) as runner:
            report = runner.run(mutants)
    if report.control_error is not None:
        print(f"kickgate: the control run on the unmutated {recipe.name} failed: {report.control_error}",
              file=sys.stderr)
    elif report.control_failed and report.control is not None:
        failed = report.control.names("failed", "error")
        print(f"kickgate: specs fail on the unmutated {recipe.name}, so no mutant was judged: "
              f"{', '.join(failed)} (run `pytest specs/ --image {recipe.name}` to see why)", file=sys.stderr)
    if args.json:
        sys.stdout.write(render_json(report.results))
    elif report.results:
        sys.stdout.write(render_table(report.results, report.control_passed))
    return exit_status(report.results, report.control_failed)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from builder.hypervisor import cleanup_kept
    from builder.runstamp import sweep

    cache_dir = _options(args).cache_dir
    removed = cleanup_kept(cache_dir)
    print(f"removed {len(removed)} kept instance(s){': ' + ', '.join(removed) if removed else ''}")
    swept = sweep(cache_dir)
    print(f"removed {len(swept)} leftover(s) of runs that are gone{': ' + ', '.join(map(str, swept)) if swept else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kickgate", description="Build VM images from recipes, verify them with "
                                "testinfra specs (pytest specs/), register only what passed.")
    p.add_argument("--version", action="version", version=f"kickgate {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    add_options(p.add_argument, "global")
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
    add_options(s.add_argument, "build")
    s.add_argument("--json", action="store_true", help="print the build record as JSON")
    s.add_argument("--print-virt-install", action="store_true",
                   help="print the equivalent virt-install command instead of building")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("boot", help="boot a throwaway instance of an image (built or reused) to log in and look")
    s.add_argument("image", metavar="IMAGE")
    add_options(s.add_argument, "build")
    s.add_argument("--for", dest="duration", type=parse_duration, metavar="DURATION",
                   help="stay up this long (30s, 5m, 1h; default: until Ctrl-C), then clean up")
    s.set_defaults(func=cmd_boot)

    for name, func, helptext in (("images", cmd_images, "list registered images"),
                                 ("show", cmd_show, "show one registered image's record"),
                                 ("diff", cmd_diff, "packages added, removed, up- and downgraded between two "
                                  "registered versions"),
                                 ("sbom", cmd_sbom, "print the CycloneDX SBOM of a registered image")):
        s = sub.add_parser(name, help=helptext)
        if name in ("show", "sbom"):
            s.add_argument("ref", metavar="NAME[@VERSION]")
        if name == "diff":
            s.add_argument("old", metavar="NAME@A")
            s.add_argument("new", metavar="NAME@B")
        add_options(s.add_argument, "registry")
        if name != "sbom":
            s.add_argument("--json", action="store_true", help="JSON output")
        s.set_defaults(func=func)

    s = sub.add_parser("promote", help="point VM templates (and the local 'promoted' link) at a verified version")
    s.add_argument("ref", metavar="NAME@VERSION",
                   help="VERSION: N or vN (OpenNebula: NAME-vN), id:N (an OpenNebula image ID), latest")
    add_options(s.add_argument, "registry")
    s.set_defaults(func=cmd_promote)

    s = sub.add_parser("rollback", help="point them back at the version promoted before the current one")
    s.add_argument("name", metavar="NAME")
    add_options(s.add_argument, "registry")
    s.set_defaults(func=cmd_rollback)

    s = sub.add_parser("mutants", help="prove the specs: run them on copies of an image each broken on purpose")
    s.add_argument("image", metavar="IMAGE")
    add_options(s.add_argument, "build")
    s.add_argument("--mutant", action="append", metavar="NAME",
                   help="run only this mutant (repeatable; default: every mutant found)")
    s.add_argument("--jobs", type=int, default=2, metavar="N", help="mutants verified at a time (default 2)")
    s.add_argument("--no-control", action="store_true",
                   help="skip the control run of the specs on the unmutated image")
    s.add_argument("--json", action="store_true", help="print the results as a JSON list")
    s.set_defaults(func=cmd_mutants)

    s = sub.add_parser("cleanup", help="stop instances kept by --keep-instance and remove what dead runs left")
    s.set_defaults(func=cmd_cleanup)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    if getattr(args, "console", False):
        logging.getLogger("kickgate.serial").setLevel(logging.INFO)  # --console: every serial line, once
    try:
        with stop_signals_interrupt():
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
