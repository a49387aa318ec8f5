"""Where a recipe came from: git revision and dirty flag of the repository that holds it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.errors import CommandError
from builder.run import run


@dataclass(frozen=True)
class GitState:
    repo: str  # short repository name (origin's basename, else the folder's)
    revision: str  # full sha, or "" outside git
    dirty: bool

    @property
    def short(self) -> str:
        if not self.revision:
            return "nogit"
        return self.revision[:7] + ("-dirty" if self.dirty else "")

    @property
    def gitrev(self) -> str:
        """The article's GitRev: repo@sha, with -dirty when the work tree has changes."""
        return f"{self.repo}@{self.short}"


def git_state(path: Path) -> GitState:
    try:
        top = run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], timeout=10).stdout.strip()
    except CommandError:
        return GitState(repo=path.resolve().name, revision="", dirty=True)
    name = Path(top).name
    origin = run(["git", "-C", top, "config", "--get", "remote.origin.url"], timeout=10, check=False).stdout.strip()
    if origin:
        name = origin.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].removesuffix(".git") or name
    rev = run(["git", "-C", top, "rev-parse", "HEAD"], timeout=10, check=False)
    revision = rev.stdout.strip() if rev.returncode == 0 else ""
    status = run(["git", "-C", top, "status", "--porcelain"], timeout=30, check=False).stdout
    return GitState(repo=name, revision=revision, dirty=bool(status.strip()) or not revision)

