"""What a run tells people: the terminal summary, the per-stage table (terminal and HTML), JUnit
properties and the artifacts directory."""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from builder.fsutil import atomic_write_json, atomic_write_text
from builder.inventory import SBOM_FILE
from builder.packages import render_diff
from builder.pipeline import ImageState, KeptInstance, copy_into
from builder.progress import BOOT, BUILD, ActivityTiming
from builder.registration import inventory_of


def summary_lines(images: Mapping[str, ImageState], not_selected: Mapping[str, str],
                  kept: Iterable[KeptInstance], interrupted: str | None = None) -> list[str]:
    """One line per image: how it was built, its checksum, boot time, specs and what the gate did."""
    lines = [f"interrupted ({interrupted}): guests stopped, work files removed, nothing registered"] \
        if interrupted else []
    lines += [f"{name}: not selected ({why}); name it with --image to try anyway" for name, why in not_selected.items()]
    for name, state in images.items():
        img = state.image
        if img is None:
            lines.append(f"{name}: NOT built: {state.error or ('interrupted' if interrupted else 'not reached')}")
            continue
        how = "prebuilt" if img.artifact is None else ("cached" if img.cached else "built")
        parts = [f"{name}: {how} ({img.seconds:.1f}s) sha256 {img.sha256[:12]}"]
        if state.boot_seconds:
            parts.append(f"boot-to-SSH {max(state.boot_seconds):.1f}s")
        r = state.results
        parts.append(f"specs {len(r.passed)}/{r.total} passed")
        if state.package_diff_line:
            parts.append(f"packages {state.package_diff_line}")
        if state.registered is not None:
            reg = state.registered
            what = "already registered" if reg.reused else "registered"
            parts.append(f"{what}: {reg.registry} {reg.label} ({reg.location})")
            if state.promotion is not None:
                parts.append(state.promotion.summary())
            elif state.promote_error:
                parts.append(f"NOT promoted: {state.promote_error}")
        elif state.register_error:
            parts.append(f"NOT registered: registration failed: {state.register_error}")
        elif state.verdict is not None:
            parts.append(f"NOT registered: {state.verdict.reason}")
        lines.append(" | ".join(parts))
    for inst in kept:
        lines.append(f"kept {inst.name}: {inst.ssh_command}  (serial log {inst.serial_log}); "
                     f"remove it with: kickgate cleanup")
    return lines


@dataclass(frozen=True)
class StageRow:
    """One row of the per-stage table: where an image's time went."""

    image: str
    stage: str
    seconds: float | None
    note: str = ""


STAGE_HEADER = ("image", "stage", "seconds", "")


def _boot_note(act: ActivityTiming) -> str:
    """Boot phases in order with the second each was first seen, e.g. "kernel 2.1 -> init 8.0 -> SSH 48.9"."""
    steps = [f"{s.name} {s.start:.1f}" for s in act.stages]
    steps.append(f"SSH {act.seconds:.1f}" if act.outcome == "SSH login" else f"{act.outcome} {act.seconds:.1f}")
    return " -> ".join(steps)


def stage_rows(images: Mapping[str, ImageState], activities: Sequence[ActivityTiming]) -> list[StageRow]:
    """Per image: build stages, boot-to-SSH of every instance, spec time and registration."""
    rows: list[StageRow] = []
    for name, state in images.items():
        acts = [a for a in activities if a.image == name]
        img = state.image
        builds = [a for a in acts if a.activity == BUILD]
        if img is not None and img.artifact is None:
            rows.append(StageRow(name, "build", None, "prebuilt (--image-path)"))
        elif img is not None and img.cached:
            rows.append(StageRow(name, "build", img.seconds, "cache hit"))
        elif img is not None and img.record is not None:
            # The build record's timings: the same numbers whichever process built the image.
            rows += [StageRow(name, f"build: {stage}", secs) for stage, secs in img.record.timings.items()]
            rows.append(StageRow(name, "build total", img.seconds, "built"))
        elif builds:
            failed = builds[-1]
            for st in failed.stages:
                last = st.seconds is None
                secs = failed.seconds - st.start if last else st.seconds
                rows.append(StageRow(name, f"build: {st.name}", secs, failed.outcome if last else ""))
            rows.append(StageRow(name, "build total", failed.seconds, f"NOT built ({failed.outcome})"))
        boots = [a for a in acts if a.activity == BOOT]
        rows += [StageRow(name, f"boot-to-SSH {a.subject}", a.seconds, _boot_note(a)) for a in boots]
        if not boots:  # an image verified in another process whose timeline did not come back
            rows += [StageRow(name, "boot-to-SSH", secs) for secs in state.boot_seconds]
        r = state.results
        if r.total:
            rows.append(StageRow(name, "specs", state.spec_seconds, f"{len(r.passed)}/{r.total} passed"))
        if state.registered is not None:
            what = "already registered" if state.registered.reused else "registered"
            rows.append(StageRow(name, "register", state.register_seconds,
                                 f"{what}: version {state.registered.version}"))
        elif state.register_error:
            rows.append(StageRow(name, "register", state.register_seconds, "failed"))
    return rows


def _cells(row: StageRow) -> tuple[str, str, str, str]:
    return row.image, row.stage, "-" if row.seconds is None else f"{row.seconds:.1f}", row.note


def stage_table(rows: Sequence[StageRow]) -> list[str]:
    """The rows as aligned text lines under a header (seconds right-aligned); no lines without rows."""
    if not rows:
        return []
    cells = [STAGE_HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    return [f"{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:>{widths[2]}}  {c[3]}".rstrip() for c in cells]


def html_summary(lines: Sequence[str], rows: Sequence[StageRow]) -> str:
    """The summary lines and the stage table as an HTML fragment (for pytest-html's summary)."""
    out = ['<div class="kickgate">', "<h3>kickgate</h3>"]
    out += [f'<p class="kickgate-summary">{html.escape(line)}</p>' for line in lines]
    if rows:
        out.append('<table class="kickgate-stages">')
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in STAGE_HEADER) + "</tr>")
        for row in rows:
            image, stage, secs, note = (html.escape(c) for c in _cells(row))
            out.append(f"<tr><td>{image}</td><td>{stage}</td><td style=\"text-align: right\">{secs}</td>"
                       f"<td>{note}</td></tr>")
        out.append("</table>")
    out.append("</div>")
    return "\n".join(out)


def junit_properties(state: ImageState | None) -> list[tuple[str, str]]:
    """Which bytes a spec judged, for every test case of an image."""
    if state is None or state.image is None:
        return []
    return [("image_sha256", state.image.sha256)]


def suite_properties(name: str, state: ImageState) -> list[tuple[str, str]]:
    """Per-image facts known only once the gate ran, for the JUnit report's suite properties."""
    props = []
    if state.verdict is not None:
        props.append((f"kickgate_verdict[{name}]", state.verdict.reason))
    if state.package_diff_line:
        props.append((f"kickgate_package_diff[{name}]", state.package_diff_line))
    return props


def write_artifacts(artifacts_dir: Path, name: str, state: ImageState) -> None:
    """Build record, build serial log and the gate's verdict for one image, for CI to keep."""
    dst = artifacts_dir / name
    dst.mkdir(parents=True, exist_ok=True)
    img = state.image
    art = img.artifact if img else None
    if art is not None:
        copy_into(art.record_path, dst, "build-record.json")
        if art.serial_log.is_file():
            copy_into(art.serial_log, dst, "build-serial.log")
    summary = {"image": name, "verdict": asdict(state.verdict) if state.verdict else None,
               "specs": state.results.outcomes,
               "registered": asdict(state.registered) if state.registered else None,
               "register_error": state.register_error, "package_diff": state.package_diff_line,
               "promotion": asdict(state.promotion) if state.promotion else None,
               "promote_error": state.promote_error,
               "timings": {"image_seconds": img.seconds if img else None,
                           "cached": img.cached if img else None,
                           "boot_to_ssh_seconds": state.boot_seconds, "specs_seconds": state.spec_seconds,
                           "register_seconds": state.register_seconds},
               "sha256": img.sha256 if img else None}
    atomic_write_json(dst / "gate.json", summary)
    if state.package_diff is not None and state.package_diff_line:
        against = state.package_diff_line.split(" vs ", 1)[1]
        atomic_write_text(dst / "package-diff.txt", render_diff(state.package_diff, against) + "\n")
        atomic_write_json(dst / "package-diff.json", state.package_diff.to_json())
    inventory = inventory_of(img) if img else None
    if inventory is not None:
        atomic_write_text(dst / SBOM_FILE, inventory.sbom())
