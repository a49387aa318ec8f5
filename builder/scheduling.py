"""pytest-xdist scheduling for kickgate: every spec of one image runs on one worker.

That worker builds the image once and boots its instances once. The grouping is kickgate's own
scheduler rather than ``--dist loadgroup`` with ``xdist_group`` marks, because loadgroup works by
renaming test node ids, which pytest 9 no longer lets a plugin do: the marks then have no effect
and every worker boots every image.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]


def image_of(nodeid: str, images: Iterable[str]) -> str | None:
    """The selected image a test node id was parametrized with, or None (a test of no image).

    Images are spec parameters with their name as id; other parameters join the id with "-", and an
    image name may itself contain "-", so the longest name that is a whole "-"-separated part wins.
    """
    tail = nodeid.rsplit("::", 1)[-1]
    if not tail.endswith("]") or "[" not in tail:
        return None
    ident = tail[tail.index("[") + 1:-1]
    best: str | None = None
    for name in images:
        whole = ident == name or ident.startswith(name + "-") or ident.endswith("-" + name) or f"-{name}-" in ident
        if whole and (best is None or len(name) > len(best)):
            best = name
    return best


class ImageScheduling(LoadScopeScheduling):  # type: ignore[misc]
    """LoadScope with one scope per image; tests of no image are grouped by module as usual."""

    def __init__(self, config: Any, log: Any, images: Iterable[str]) -> None:
        super().__init__(config, log)
        self._images = tuple(images)

    def _split_scope(self, nodeid: str) -> str:
        image = image_of(nodeid, self._images)
        return f"kickgate-image:{image}" if image is not None else str(super()._split_scope(nodeid))
