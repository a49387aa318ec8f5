"""What a run tells people: the terminal summary, JUnit properties and the artifacts directory."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

from builder.fsutil import atomic_write_json, atomic_write_text
from builder.inventory import SBOM_FILE
from builder.packages import render_diff
from builder.pipeline import ImageState, KeptInstance, copy_into
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
