"""Promotion to OpenNebula VM templates, the pure part: which DISKs point at a version, the DISK list to
send back, and which version is promoted. The calls to oned are in ``registry/opennebula.py``.

What oned does that this relies on (see docs/opennebula.md):

- A DISK names its image by ``IMAGE_ID``, or by ``IMAGE`` plus ``IMAGE_UNAME``/``IMAGE_UID``;
  without an owner the name is looked up among the images of whoever instantiates the template,
  usually the template's owner (oned: VirtualMachineDisk::get_image_id / get_uid).
- ``one.template.update(id, text, 1)`` (merge) first erases every attribute named in text, so a
  merge carrying DISK vectors replaces *all* DISKs: the whole list goes back, only one disk changed.
- In oned's ``KEY = "value"`` syntax the only escape is ``\\"``; a value ending in a backslash needs
  the XML form, which in turn drops empty sub-attributes.

Promotion state lives on the images, so a re-run after a failure half way finds where it stopped:
``KICKGATE_PROMOTED_AT`` (when it was promoted; empty once rolled back), ``KICKGATE_PREVIOUS``
(the IDs promoted before it, newest first: what rollback goes back to) and ``KICKGATE_SUPERSEDED_BY``
(the ID promoted after it). The promoted version is the one promoted last that nothing superseded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from xml.sax.saxutils import escape as xml_escape

PROMOTED_AT = "KICKGATE_PROMOTED_AT"
PREVIOUS = "KICKGATE_PREVIOUS"
SUPERSEDED_BY = "KICKGATE_SUPERSEDED_BY"
ROLLED_BACK_AT = "KICKGATE_ROLLED_BACK_AT"
HISTORY = 10  # how many earlier promotions an image remembers for rollback
_NAME_REFS = ("IMAGE", "IMAGE_UNAME", "IMAGE_UID")

Disk = dict[str, str]


class ImageFacts(Protocol):
    """What promotion needs to know about an image."""

    @property
    def id(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def uid(self) -> int: ...

    @property
    def uname(self) -> str: ...

    @property
    def template(self) -> dict[str, str]: ...


def disks_of(raw_template: Any) -> list[Disk]:
    """The DISK vectors of a template as pyone returns it (one dict, or a list for several), in order.

    Empty sub-attributes come back from pyone as None; they are kept as "" so they are sent back.
    """
    if not isinstance(raw_template, Mapping):
        return []
    raw = raw_template.get("DISK")
    items = raw if isinstance(raw, list) else [raw] if raw is not None else []
    out: list[Disk] = []
    for d in items:
        if isinstance(d, Mapping):
            out.append({str(k): "" if v is None else str(v) for k, v in d.items()})
    return out


def points_to(disk: Mapping[str, str], image: ImageFacts, template_uid: int) -> bool:
    """Whether disk names image, by IMAGE_ID or by IMAGE with its owner (IMAGE_UID, IMAGE_UNAME, else the
    template's owner, who is who usually instantiates it)."""
    image_id = disk.get("IMAGE_ID", "").strip()
    if image_id:
        return image_id.isdigit() and int(image_id) == image.id
    if disk.get("IMAGE") != image.name:
        return False
    uid, uname = disk.get("IMAGE_UID", "").strip(), disk.get("IMAGE_UNAME", "").strip()
    if uid:
        return uid.isdigit() and int(uid) == image.uid
    if uname:
        return uname == image.uname
    return template_uid == image.uid


@dataclass(frozen=True)
class DiskPlan:
    """The DISK list of one template with every disk naming an image of from_images pointed at a new ID."""

    disks: tuple[Disk, ...]
    changed: tuple[tuple[int, int], ...]  # (disk index, image ID it pointed at)
    already: bool  # some disk already points at the new image


def plan_disks(disks: Sequence[Disk], from_images: Sequence[ImageFacts], to_image: ImageFacts,
               template_uid: int) -> DiskPlan:
    out: list[Disk] = []
    changed: list[tuple[int, int]] = []
    already = False
    for i, disk in enumerate(disks):
        if points_to(disk, to_image, template_uid):
            already = True
            out.append(dict(disk))
            continue
        old = next((img for img in from_images if points_to(disk, img, template_uid)), None)
        if old is None:
            out.append(dict(disk))
            continue
        new = {k: v for k, v in disk.items() if k not in _NAME_REFS}
        new["IMAGE_ID"] = str(to_image.id)
        out.append(new)
        changed.append((i, old.id))
    return DiskPlan(tuple(out), tuple(changed), already)


def _text_ok(value: str) -> bool:
    return not value.endswith("\\") and "]]>" not in value


def render_disks(disks: Sequence[Mapping[str, str]]) -> str:
    """The DISK vectors as oned template text, or in oned's XML form when a value needs it.

    Raises ValueError when no form carries every value unchanged.
    """
    values = [v for d in disks for v in d.values()]
    if any("]]>" in v for v in values):
        raise ValueError("a DISK value holds ']]>', which oned cannot store")
    if all(_text_ok(v) for v in values):
        return "".join("DISK = [ " + ", ".join(f'{k} = "{v.replace(chr(34), chr(92) + chr(34))}"'
                                               for k, v in d.items()) + " ]\n" for d in disks)
    if any(v == "" for v in values):
        raise ValueError("a DISK value ends in a backslash and another is empty: neither of oned's template "
                         "forms carries both unchanged")
    return "<TEMPLATE>" + "".join("<DISK>" + "".join(f"<{k}>{xml_escape(v)}</{k}>" for k, v in d.items())
                                  + "</DISK>" for d in disks) + "</TEMPLATE>"


def current_promoted(images: Sequence[ImageFacts]) -> ImageFacts | None:
    """The image promoted last that no later promotion superseded (half-done runs leave two: the later wins)."""
    live = [i for i in images if i.template.get(PROMOTED_AT) and not i.template.get(SUPERSEDED_BY)]
    return max(live, key=lambda i: (i.template[PROMOTED_AT], i.id), default=None)


def history(image: ImageFacts) -> list[int]:
    """The IDs promoted before image, newest first."""
    return [int(x) for x in re.findall(r"[0-9]+", image.template.get(PREVIOUS, ""))]


def history_after(previous: ImageFacts | None, new_id: int) -> str:
    """KICKGATE_PREVIOUS for an image promoted after previous."""
    if previous is None:
        return ""
    ids = [i for i in dict.fromkeys([previous.id, *history(previous)]) if i != new_id]
    return " ".join(str(i) for i in ids[:HISTORY])


def matches_select(raw_template: Any, select: Sequence[tuple[str, str]]) -> bool:
    """Whether a VM template carries every attribute of select with that value."""
    if not select or not isinstance(raw_template, Mapping):
        return False
    return all(isinstance(raw_template.get(k), str) and raw_template.get(k) == v for k, v in select)


__all__ = ["HISTORY", "PREVIOUS", "PROMOTED_AT", "ROLLED_BACK_AT", "SUPERSEDED_BY", "DiskPlan", "ImageFacts",
           "current_promoted", "disks_of", "history", "history_after", "matches_select", "plan_disks",
           "points_to", "render_disks"]
