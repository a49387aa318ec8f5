"""The gate's second half: decide per image, then register exactly the tested bytes with provenance."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from builder import __version__
from builder.errors import KickgateError, RegistryError
from builder.fsutil import sha256_file
from builder.gate import SpecResults, Verdict, decide, specs_attribute
from builder.inventory import DIFF_ATTR, SBOM_FILE, Inventory, diff_against
from builder.packages import PackageDiff
from builder.pipeline import ImageState, ImageUnderTest
from builder.promote import promote_registered
from builder.provenance import git_state
from builder.registry.base import Registered, Registration, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFacts:
    """What the gate needs to know about the run as a whole."""

    narrowed: str | None  # why the run does not cover every spec, or None
    interrupted: bool
    register: bool
    allow_partial: bool


def inventory_of(image: ImageUnderTest) -> Inventory | None:
    """The package facts of a built image (a prebuilt --image-path file has none)."""
    record, recipe = image.record, image.recipe
    if record is None or recipe is None or not record.packages:
        return None
    if recipe.bootstrap is not None:
        vendor, distro = "debian", recipe.bootstrap.suite
    else:
        # The install tree's product name ("Rocky Linux") names the vendor; [vars] purl_vendor overrides.
        product = record.extra.get("product", "")
        vendor = recipe.variables_map.get("purl_vendor") or (product.split()[0].lower() if product else "redhat")
        major = "".join(ch for ch in (recipe.kickstart.version if recipe.kickstart else "") if ch.isdigit())
        distro = f"{vendor}-{major}" if major else vendor
    return Inventory(name=recipe.register.name, sha256=image.sha256, build_id=record.build_id,
                     built_at=record.built_at, packages=record.packages, vendor=vendor, distro=distro)


def package_diff(inventory: Inventory, registry: Registry) -> tuple[PackageDiff, str] | None:
    """The difference to the newest version of the same NAME in registry, or None for a first version."""
    try:
        previous = registry.get(inventory.name)
    except RegistryError:
        return None
    if previous.sha256 == inventory.sha256:
        return None  # the same bytes again: nothing to compare with
    return diff_against(inventory.packages, previous.attributes, f"{inventory.name} v{previous.version}")


def registration_for(image: ImageUnderTest, results: SpecResults, inventory: Inventory | None = None,
                     diff_line: str | None = None) -> Registration:
    """The template the article registers, plus provenance: Source, GitRev, checksum, spec results,
    and what the image is made of (package manifest, SBOM checksum, difference to the last version)."""
    recipe = image.recipe
    reg_name = recipe.register.name if recipe else image.name
    desc = recipe.register.description if recipe else image.name
    # An image without an artifact was not built from the recipe repository (--image-path): its
    # git revision says nothing about these bytes.
    gitrev = git_state(recipe.dir).gitrev if recipe and image.artifact is not None else None
    source = recipe.name if gitrev is not None and recipe else f"prebuilt {image.path.name}"
    provenance = f"Source: {source}, GitRev: {gitrev}" if gitrev is not None else f"Source: {source}"
    attrs: list[tuple[str, str]] = [
        ("NAME", reg_name),
        ("TYPE", recipe.register.type if recipe else "OS"),
        ("PUBLIC", "YES" if recipe and recipe.register.public else "NO"),
        ("DESCRIPTION", f"{desc}. {provenance}"),
    ]
    if recipe:
        attrs += list(recipe.register.attributes)
    record = image.record
    attrs += [
        ("SHA256", image.sha256),
        ("SIZE", str(image.size)),
        ("FORMAT", image.format),
        ("BUILT_AT", record.built_at if record else dt.datetime.now(dt.UTC).isoformat(timespec="seconds")),
        ("BUILD_ID", record.build_id if record else f"prebuilt-{image.sha256[:12]}"),
        ("SPECS", specs_attribute(results)),
        ("KICKGATE_VERSION", __version__),
        ("SOURCE", source),
    ]
    files: tuple[tuple[str, bytes], ...] = ()
    if inventory is not None:
        attrs += inventory.attributes()
        files = ((SBOM_FILE, inventory.sbom().encode()),)
    if diff_line:
        attrs.append((DIFF_ATTR, diff_line))
    if gitrev is not None:
        attrs.append(("GITREV", gitrev))
    return Registration(name=reg_name, image_path=image.path, sha256=image.sha256, size=image.size,
                        format=image.format, public=bool(recipe and recipe.register.public), attributes=tuple(attrs),
                        files=files)


def register_image(state: ImageState, registry: Registry) -> Registered:
    """Register the image of state if its bytes are still the ones the specs judged."""
    image = state.image
    assert image is not None
    now = sha256_file(image.path)
    if now != image.sha256:
        raise RegistryError(f"{image.path}: its sha256 changed after the specs ran ({image.sha256[:12]}… → "
                            f"{now[:12]}…); refusing to register bytes that were not tested")
    inventory = inventory_of(image)
    if inventory is not None:
        found = package_diff(inventory, registry)
        if found is not None:
            state.package_diff, state.package_diff_line = found
    return registry.register(registration_for(image, state.results, inventory, state.package_diff_line))


def verdict_for(state: ImageState, collected: int | None, facts: RunFacts) -> Verdict:
    results = state.results
    if collected is not None and results.total < collected:
        return Verdict(False, f"only {results.total} of {collected} specs ran")
    if state.image is None:
        return Verdict(False, f"the image was not built: {state.error or 'not reached'}")
    return decide(results, narrowed=facts.narrowed, allow_partial=facts.allow_partial,
                  interrupted=facts.interrupted, register=facts.register)


def gate_and_register(images: Mapping[str, ImageState], collected: Mapping[str, int], facts: RunFacts,
                      open_registry: Callable[[], Registry]) -> bool:
    """Give every image its verdict and register those that may be promoted; True if any image failed.

    The registry is opened only when an image may be registered, so a run that promotes nothing
    never needs its credentials. A registered image whose recipe has a [promote] table is then
    promoted (after READY: registries return only then); a promotion that fails or stays
    incomplete fails the run, the registration stands.
    """
    registry: list[Registry] = []
    any_failed = False
    for name, state in images.items():
        if state.image is None and state.error is None and not state.results.total:
            continue  # selected but never reached (e.g. no spec asked for it)
        state.verdict = verdict_for(state, collected.get(name), facts)
        if state.verdict.promote and state.image is not None:
            started = time.monotonic()
            try:
                if not registry:
                    registry.append(open_registry())
                state.registered = register_image(state, registry[0])
            except KickgateError as exc:
                state.register_error = str(exc)
                any_failed = True
            state.register_seconds = time.monotonic() - started
            if state.registered is not None:
                try:
                    state.promotion = promote_registered(registry[0], state.registered, state.image.recipe)
                except KickgateError as exc:
                    state.promote_error = str(exc)
                    any_failed = True
                if state.promotion is not None and not state.promotion.complete:
                    any_failed = True
        elif facts.register and not state.verdict.promote and not facts.narrowed:
            any_failed = True
    return any_failed
