"""What every registry takes and returns. Registries never decide *whether* to register: the gate does."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class Registration:
    """One verified image, ready to promote.

    ``attributes`` is the full image template in order: NAME, TYPE, PUBLIC (YES/NO), DESCRIPTION
    (ending in "Source: <recipe>, GitRev: <repo>@<sha>[-dirty]", or "Source: prebuilt <file>"),
    the recipe's custom attributes, and the provenance attributes SHA256, SIZE, FORMAT, BUILT_AT,
    BUILD_ID, SPECS, KICKGATE_VERSION, SOURCE and (for built images) GITREV. Values are strings.
    PATH is never in it: each registry decides where bytes live.
    """

    name: str
    image_path: Path
    sha256: str
    size: int
    format: str
    public: bool
    attributes: tuple[tuple[str, str], ...]
    files: tuple[tuple[str, bytes], ...] = ()  # kept beside the image where the registry can (e.g. the SBOM)

    def attr(self, key: str, default: str = "") -> str:
        for k, v in self.attributes:
            if k == key:
                return v
        return default


@dataclass(frozen=True)
class Registered:
    """The outcome of a registration (or one entry of a listing)."""

    registry: str  # "local" or "opennebula"
    name: str  # local: the image name; opennebula: the image's name there (NAME, NAME-v2…)
    version: str  # local: "1", "2"…; opennebula: the N of NAME-vN (NAME itself is "1"), "" for other names
    location: str  # local: path of the stored image; opennebula: endpoint + image ID
    sha256: str
    reused: bool = False  # True when the same bytes were already registered under that name
    attributes: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)  # the registry's whole record, for `kickgate show`
    image_id: int | None = None  # opennebula: the image ID
    promoted: bool = False  # the version consumers are pointed at

    @property
    def label(self) -> str:
        """How people are told which version this is: "image 17, generic-dev-v3" or "generic-dev version 3"."""
        if self.image_id is not None:
            return f"image {self.image_id}, {self.name}"
        return f"{self.name} version {self.version}"


@dataclass(frozen=True)
class PromoteTargets:
    """Where a promotion points consumers, and how many versions to keep (a recipe's [promote] table).

    templates: OpenNebula VM templates by name or ID; select: every VM template carrying all these
    attributes; keep: delete versions older than the newest keep ones that nothing uses (None: keep all).
    """

    templates: tuple[str | int, ...] = ()
    select: tuple[tuple[str, str], ...] = ()
    keep: int | None = None


TemplateOutcome = Literal["updated", "unchanged", "no-disk", "conflict", "failed"]


@dataclass(frozen=True)
class TemplateChange:
    """What a promotion did to one VM template."""

    template: str  # "web-base (template 5)" or the name/ID as given when it was not found
    outcome: TemplateOutcome
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in ("updated", "unchanged", "no-disk")


@dataclass(frozen=True)
class Promotion:
    """The outcome of a promotion or rollback."""

    registry: str
    promoted: str  # label of the version consumers now point at
    previous: str | None  # label of the version it replaced (None: nothing was promoted before)
    templates: tuple[TemplateChange, ...] = ()
    deleted: tuple[str, ...] = ()  # labels of old versions removed by keep
    kept: tuple[str, ...] = ()  # old versions keep would remove but could not, with why (in use…)

    @property
    def complete(self) -> bool:
        return all(t.ok for t in self.templates)

    def summary(self) -> str:
        """One line for the run summary and the command."""
        done = "promoted" if self.complete else "promotion INCOMPLETE"
        parts = [f"{done}: {self.promoted}" + (f" (was {self.previous})" if self.previous else "")]
        updated = [t.template for t in self.templates if t.outcome == "updated"]
        if updated:
            parts.append(f"templates updated: {', '.join(updated)}")
        same = [t.template for t in self.templates if t.outcome == "unchanged"]
        if same:
            parts.append(f"already pointing at it: {', '.join(same)}")
        for t in self.templates:
            if t.outcome not in ("updated", "unchanged"):
                parts.append(f"{t.template}: {t.detail}")
        if self.deleted:
            parts.append(f"deleted {', '.join(self.deleted)}")
        if self.kept:
            parts.append(f"kept {'; '.join(self.kept)}")
        return "; ".join(parts)


class Registry(Protocol):
    kind: str

    def register(self, reg: Registration) -> Registered:
        """Promote reg; idempotent for the same name and sha256. Raises RegistryError."""
        ...

    def list(self) -> list[Registered]:
        """Images this registry holds that kickgate registered."""
        ...

    def get(self, name: str, version: str = "latest") -> Registered:
        """One registered version of name (see builder.versions for VERSION). Raises RegistryError if absent."""
        ...

    def promote(self, entry: Registered, targets: PromoteTargets) -> Promotion:
        """Point consumers at entry, mark it promoted, apply keep. Idempotent; safe to re-run after a failure."""
        ...

    def rollback(self, name: str, targets: PromoteTargets) -> Promotion:
        """Point consumers back at the version promoted before the current one. Raises RegistryError if none."""
        ...
