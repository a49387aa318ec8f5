"""The one exception hierarchy: every error kickgate raises on purpose derives from KickgateError."""

from __future__ import annotations


class KickgateError(Exception):
    """Base of all kickgate errors; str(e) is a complete message for a user."""


class RecipeError(KickgateError):
    """A recipe (image.toml, template, scripts) is invalid. Names the file and the key or line."""

    def __init__(self, path: object, where: str, problem: str, hint: str = "") -> None:
        self.path = str(path)
        self.where = where
        self.problem = problem
        self.hint = hint
        loc = f"{self.path}: {where}" if where else self.path
        msg = f"{loc}: {problem}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class MutantError(RecipeError):
    """A mutant script (mutants/*.sh) is malformed or clashes with another. Names the file and line."""


class CommandError(KickgateError):
    """An external command failed or timed out."""

    def __init__(self, argv: list[str], returncode: int | None, output: str, timeout: float | None = None) -> None:
        self.argv = argv
        self.returncode = returncode
        self.output = output
        self.timed_out = timeout is not None
        what = f"timed out after {timeout:.0f}s" if timeout is not None else f"exited {returncode}"
        tail = "\n".join(output.strip().splitlines()[-15:])
        super().__init__(f"{argv[0]} {what}: {' '.join(argv)}" + (f"\n{tail}" if tail else ""))


class BuildError(KickgateError):
    """A build stage failed. Carries the stage, the reason and the tail of the serial console."""

    def __init__(self, stage: str, reason: str, serial_tail: list[str] | None = None,
                 serial_log: str | None = None) -> None:
        self.stage = stage
        self.reason = reason
        self.serial_tail = serial_tail or []
        self.serial_log = serial_log
        super().__init__(stage, reason)

    def __str__(self) -> str:
        msg = f"build failed in stage '{self.stage}': {self.reason}"
        if self.serial_log:
            msg += f"\nserial log: {self.serial_log}"
        if self.serial_tail:
            msg += "\n--- last serial lines ---\n" + "\n".join(self.serial_tail)
        return msg


class IntegrityError(KickgateError):
    """Bytes are not the bytes they were checked to be."""

    def __init__(self, path: object, expected: str, actual: str, what: str) -> None:
        self.path = str(path)
        self.expected = expected
        self.actual = actual
        super().__init__(f"{self.path} {what}: sha256 is {actual}, expected {expected}")


class HypervisorError(KickgateError):
    """libvirt/QEMU could not be reached or refused a domain."""


class InstanceError(KickgateError):
    """A throwaway instance did not come up. Says how far it got, with the serial tail."""

    def __init__(self, reached: str, reason: str, serial_tail: list[str] | None = None,
                 serial_log: str | None = None) -> None:
        self.reached = reached
        self.reason = reason
        self.serial_tail = serial_tail or []
        self.serial_log = serial_log
        super().__init__(reached, reason)

    def __str__(self) -> str:
        msg = f"instance failed (reached: {self.reached}): {self.reason}"
        if self.serial_log:
            msg += f"\nserial log: {self.serial_log}"
        if self.serial_tail:
            msg += "\n--- last serial lines ---\n" + "\n".join(self.serial_tail)
        return msg


class RegistryError(KickgateError):
    """Registering or reading a registry failed; nothing was left half-registered."""


class GateError(KickgateError):
    """The gate refused to promote an image."""
