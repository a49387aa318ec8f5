"""Promotion: point consumers (OpenNebula VM templates, the local ``promoted`` link) at a verified version.

A registration only adds a version; promotion is what makes VMs use it. It runs after a
registration that passed the gate (when the recipe has a ``[promote]`` table), or by hand with
``kickgate promote NAME@VERSION`` for a version whose SPECS attribute records that every spec
passed; ``kickgate rollback NAME`` goes back to the version promoted before. The registries do the
work (``Registry.promote`` / ``rollback``); this module decides what may be promoted and where to.
"""

from __future__ import annotations

import logging

from builder.errors import GateError, KickgateError, RecipeError
from builder.recipe import PromoteSpec, Recipe, RecipeBook, promote_spec
from builder.registry.base import PromoteTargets, Promotion, Registered, Registry
from builder.versions import parse_ref, specs_all_passed

log = logging.getLogger(__name__)


def targets_of(spec: PromoteSpec | None) -> PromoteTargets:
    if spec is None:
        return PromoteTargets()
    return PromoteTargets(templates=spec.templates, select=spec.select, keep=spec.keep)


def recipe_targets(recipe: Recipe | None) -> PromoteTargets | None:
    """What a recipe's [promote] table asks for; None when the recipe does not ask for promotion."""
    if recipe is None:
        return None
    spec = promote_spec(recipe)
    return targets_of(spec) if spec is not None else None


def recipe_registering(book: RecipeBook, name: str) -> Recipe | None:
    """The recipe that registers images under name (its [register] NAME, else its folder name)."""
    found = None
    for folder in book.names():
        try:
            recipe = book.load(folder)
        except RecipeError as exc:
            if folder == name:
                raise
            log.warning("skipping a broken recipe while looking for the one registering %s: %s", name, exc)
            continue
        if recipe.register.name == name:
            return recipe
        if folder == name:
            found = recipe
    return found


def check_gate(entry: Registered) -> None:
    """Refuse a version whose SPECS attribute does not record that every spec passed."""
    specs = entry.attributes.get("SPECS", "")
    if not specs_all_passed(specs):
        raise GateError(f"{entry.label} did not pass its gate (SPECS = {specs!r}); only a version whose every spec "
                        "passed can be promoted: run pytest specs/ for it")


def promote(registry: Registry, entry: Registered, targets: PromoteTargets) -> Promotion:
    check_gate(entry)
    return registry.promote(entry, targets)


def promote_ref(registry: Registry, ref: str, targets: PromoteTargets) -> Promotion:
    """Promote NAME@VERSION (see builder.versions)."""
    name, version = parse_ref(ref)
    return promote(registry, registry.get(name, str(version)), targets)


def rollback(registry: Registry, name: str, targets: PromoteTargets) -> Promotion:
    return registry.rollback(name, targets)


def promote_registered(registry: Registry, entry: Registered, recipe: Recipe | None) -> Promotion | None:
    """After a registration that passed the gate: promote it if its recipe has a [promote] table."""
    targets = recipe_targets(recipe)
    if targets is None:
        return None
    try:
        return promote(registry, entry, targets)
    except KickgateError:
        log.error("%s was registered but not promoted", entry.label)
        raise


__all__ = ["check_gate", "promote", "promote_ref", "promote_registered", "recipe_registering", "recipe_targets",
           "rollback", "targets_of"]
