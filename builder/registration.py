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


def registration_for(image: ImageUnderTest, results: SpecResults) -> Registration:
    """The template the article registers, plus provenance: Source, GitRev, checksum, spec results."""
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
    if gitrev is not None:
        attrs.append(("GITREV", gitrev))
    return Registration(name=reg_name, image_path=image.path, sha256=image.sha256, size=image.size,
                        format=image.format, public=bool(recipe and recipe.register.public), attributes=tuple(attrs))


def register_image(image: ImageUnderTest, results: SpecResults, registry: Registry) -> Registered:
    """Register image if its bytes are still the ones the specs judged."""
    now = sha256_file(image.path)
    if now != image.sha256:
        raise RegistryError(f"{image.path}: its sha256 changed after the specs ran ({image.sha256[:12]}… → "
                            f"{now[:12]}…); refusing to register bytes that were not tested")
    return registry.register(registration_for(image, results))


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
                state.registered = register_image(state.image, state.results, registry[0])
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
