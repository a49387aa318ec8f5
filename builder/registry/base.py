"""What every registry takes and returns. Registries never decide *whether* to register: the gate does."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Registration:
    """One verified image, ready to promote.

    ``attributes`` is the full image template in order: NAME, TYPE, PUBLIC (YES/NO), DESCRIPTION
    (ending in "Source: <recipe>, GitRev: <repo>@<sha>[-dirty]"), the recipe's custom attributes,
    and the provenance attributes SHA256, SIZE, FORMAT, BUILT_AT, BUILD_ID, SPECS, KICKGATE_VERSION,
    SOURCE, GITREV. Values are strings. PATH is never in it: each registry decides where bytes live.
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
    name: str
    version: str  # local: "1", "2"…; opennebula: the image ID
    location: str  # local: path of the stored image; opennebula: endpoint + image ID
    sha256: str
    reused: bool = False  # True when the same bytes were already registered under that name
    attributes: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)  # the registry's whole record, for `kickgate show`


class Registry(Protocol):
    kind: str

    def register(self, reg: Registration) -> Registered:
        """Promote reg; idempotent for the same name and sha256. Raises RegistryError."""
        ...

    def list(self) -> list[Registered]:
        """Images this registry holds that kickgate registered."""
        ...

    def get(self, name: str, version: str = "latest") -> Registered:
        """One registered version of name ("latest": the newest). Raises RegistryError if absent."""
        ...
