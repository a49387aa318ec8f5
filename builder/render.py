"""Render a recipe's kickstart template (jinja2) and validate the result with pykickstart.

Template context
  * every ``[vars]`` entry of image.toml, by name;
  * ``image``: the image name; ``description``: the recipe's description;
  * ``scripts``: the post-install scripts in run order (common first, then node), each with
    ``namespace``, ``name``, ``stem`` (name without extension), ``text``, ``path`` (relative to
    the recipe root), ``interpreter`` (from its ``#!`` line, default /bin/sh) and ``log``
    (``/root/kickgate-post-<namespace>-<stem>.log``), so the template emits one ``%post`` section
    per script, each logged to its own file;
  * ``script_env``: shell lines exporting ``[vars]`` plus IMAGE_NAME and IMAGE_FAMILY, to put
    before a script's text, as the bootstrap method runs the same scripts with them;
  * ``markers``: the serial console lines the kickstart build method waits for (``markers.ok``,
    ``markers.failed``, ``markers.pkg``, ``markers.pkgs_begin``, ``markers.pkgs_end``);
  * ``rpm_queryformat``: the ``rpm -qa --qf`` argument whose lines (after ``markers.pkg``) become
    the build record's package list (name, version, arch, source rpm, licence);
  * secrets from the environment, never from the recipe: ``rootpw_hash`` from
    ``KICKGATE_ROOTPW_HASH`` (a crypt(3) hash; empty when unset, and the template then writes
    ``rootpw --lock``) and ``secrets.<name>`` from each ``KICKGATE_SECRET_<NAME>``.

Every ``{{ expression }}`` renders as one shell word (``shlex.quote``): pykickstart splits
command lines as the shell does, so a value stays one argument, and in a ``%post`` body it stays
data. A value may not contain a line break or control character, and one that begins with ``%``
may not start a line (pykickstart would read a section header). Only kickgate's own multi-line
text goes in verbatim: ``s.text``, ``script_env`` and ``rootpw_hash`` (a checked crypt(3) hash).
Filters and concatenation yield plain values, which are quoted again as one word.

Undefined variables are errors (StrictUndefined); write ``{% if x is defined %}`` for optional
ones. Every problem is a RecipeError naming the template file and line. Secrets never appear in
logs or errors: use ``mask_secrets`` on anything rendered before printing it.

Beyond syntax, the rendered kickstart must honour kickgate's contract: it powers the machine off
(or reboots, which the install domain turns into a stop); its last ``%post`` removes the
installer's copies of the kickstart (``KICKSTART_COPIES``: they hold the root password hash and
every ``%post`` body) and the per-script logs, then prints the success marker, or the build could
only end by its timeout.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import traceback
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import jinja2

from builder.errors import RecipeError
from builder.packages import rpm_query_format
from builder.recipe import Recipe, Script, describe_char, forbidden_char

log = logging.getLogger(__name__)

ROOTPW_ENV = "KICKGATE_ROOTPW_HASH"
SECRET_PREFIX = "KICKGATE_SECRET_"
MASK = "********"
# Files an EL install leaves in the image that hold the whole kickstart (root password hash,
# every %post body), and the per-script %post logs, which may hold whatever a script printed.
KICKSTART_COPIES = ("/root/anaconda-ks.cfg", "/root/original-ks.cfg", "/root/initial-setup-ks.cfg")
POST_LOGS = "/root/kickgate-post-*.log"
RESERVED_NAMES = frozenset({"image", "description", "scripts", "script_env", "markers", "rpm_queryformat",
                            "rootpw_hash", "secrets"})


class Verbatim(str):
    """Text kickgate itself built or checked, inserted into the kickstart as is (not quoted)."""


@dataclass(frozen=True)
class Markers:
    ok: str = "KICKGATE-INSTALL-OK"
    failed: str = "KICKGATE-INSTALL-FAILED"
    pkg: str = "KICKGATE-PKG"
    pkgs_begin: str = "KICKGATE-PKGS-BEGIN"
    pkgs_end: str = "KICKGATE-PKGS-END"


MARKERS = Markers()


@dataclass(frozen=True)
class ScriptView:
    """A post-install script as the template sees it."""

    namespace: str
    name: str
    stem: str
    text: str
    path: str
    interpreter: str
    log: str
    source: Path

    @property
    def is_shell(self) -> bool:
        return Path(self.interpreter).name in _SHELLS


# --------------------------------------------------------------------------- secrets


_SHELLS = frozenset({"sh", "bash", "dash", "ksh", "zsh"})
_CRYPT_RE = re.compile(r"\$(1|5|6|y|2[abxy]?|gy|7)\$[./A-Za-z0-9$=,]+")
# Values that follow these options or commands are secret whatever they are.
_OPT_SECRET_RE = re.compile(r"(--(?:password|passphrase)(?:=|\s+))(\S+)")
_POSITIONAL_SECRET_CMDS = ("rootpw", "sshpw")


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    values = [v for k, v in env.items() if (k == ROOTPW_ENV or k.startswith(SECRET_PREFIX)) and v]
    return sorted({v.strip() for v in values if len(v.strip()) >= 4}, key=len, reverse=True)


def mask_secrets(text: str, env: Mapping[str, str] | None = None) -> str:
    """text with every secret replaced by ********: the values of KICKGATE_ROOTPW_HASH and
    KICKGATE_SECRET_* in env (default: the process environment), and whatever follows
    ``rootpw``/``sshpw`` or a ``--password``/``--passphrase`` option, wherever it came from."""
    for value in secret_values(env):
        text = text.replace(value, MASK)
    out = []
    for line in text.split("\n"):
        words = line.split()
        if words and words[0] in _POSITIONAL_SECRET_CMDS:
            indent = line[: len(line) - len(line.lstrip())]
            masked = [words[0]] + [w if w.startswith("--") else MASK for w in words[1:]]
            line = indent + " ".join(masked)
        line = _OPT_SECRET_RE.sub(lambda m: m.group(1) + MASK, line)
        out.append(line)
    return "\n".join(out)


# --------------------------------------------------------------------------- context


def _interpreter(text: str) -> str:
    first = text.split("\n", 1)[0]
    if not first.startswith("#!"):
        return "/bin/sh"
    parts = first[2:].split()
    if not parts:
        return "/bin/sh"
    if parts[0].endswith("/env") and len(parts) > 1:
        return f"/usr/bin/{parts[1]}"
    return parts[0]


_SECTION_RE = re.compile(r"^\s*%(end|post|pre|pre-install|packages|onerror|traceback|addon|"
                         r"anaconda|include|ksappend)\b")


def script_views(recipe: Recipe) -> list[ScriptView]:
    root = recipe.dir.parent.parent
    views = []
    for s in recipe.scripts:
        text = s.path.read_text(encoding="utf-8")
        _check_script(s, text)
        if not text.endswith("\n"):
            text += "\n"
        try:
            rel = str(s.path.relative_to(root))
        except ValueError:
            rel = str(s.path)
        stem = s.path.stem
        views.append(ScriptView(namespace=s.namespace, name=s.name, stem=stem, text=Verbatim(text), path=rel,
                                interpreter=_interpreter(text), source=s.path,
                                log=f"/root/kickgate-post-{s.namespace}-{stem}.log"))
    return views


def _check_script(script: Script, text: str) -> None:
    for i, line in enumerate(text.splitlines(), 1):
        m = _SECTION_RE.match(line)
        if m:
            raise RecipeError(script.path, f"line {i}",
                              f"a line starting with '%{m.group(1)}' would end the kickstart's "
                              "%post section early",
                              "no line may begin with '%', leading blanks or not: quote it "
                              "(echo '%end') or build the text another way")


def script_env(recipe: Recipe) -> Verbatim:
    """Shell lines exporting the recipe's [vars] plus IMAGE_NAME and IMAGE_FAMILY, as the
    bootstrap method gives them to the same scripts: one ``export NAME='value'`` line each."""
    env = {**recipe.variables_map, "IMAGE_NAME": recipe.name, "IMAGE_FAMILY": recipe.family}
    for k, v in env.items():
        # A quoted line break would still end the line pykickstart reads: a '%end' after it
        # would close the %post early. The recipe loader refuses these; a Recipe built in code
        # is checked here.
        bad = forbidden_char(k + v)
        if bad is not None:
            raise RecipeError(recipe.path, f"vars.{k}", f"contains {describe_char(bad)}",
                              "write the value on one line without control characters")
    return Verbatim("\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()))


def template_context(recipe: Recipe, env: Mapping[str, str] | None = None) -> dict[str, object]:
    env = os.environ if env is None else env
    variables = recipe.variables_map
    for name in variables:
        if name in RESERVED_NAMES:
            raise RecipeError(recipe.path, f"vars.{name}", f"{name!r} is set by kickgate",
                              f"rename it; reserved: {', '.join(sorted(RESERVED_NAMES))}")
    rootpw = env.get(ROOTPW_ENV, "").strip()
    if rootpw and not _CRYPT_RE.fullmatch(rootpw):
        raise RecipeError(ROOTPW_ENV, "",
                          "is not a crypt(3) password hash (the value is not shown)",
                          "create one with `openssl passwd -6` or `mkpasswd -m sha-512`; never put "
                          "a plain-text password there")
    secrets = {k[len(SECRET_PREFIX):].lower(): v for k, v in env.items()
               if k.startswith(SECRET_PREFIX) and len(k) > len(SECRET_PREFIX)}
    ctx: dict[str, object] = dict(variables)
    ctx.update(image=recipe.name, description=recipe.description, scripts=script_views(recipe),
               script_env=script_env(recipe), markers=MARKERS, rpm_queryformat=rpm_query_format(MARKERS.pkg),
               rootpw_hash=Verbatim(rootpw), secrets=secrets)
    return ctx


# --------------------------------------------------------------------------- rendering


class _UnsafeValue(Exception):
    """A template expression produced a value that cannot be one kickstart word."""


# An expression's output is first a slot; the slots are filled, quoted, once the whole text is
# known, so a value can be judged by where it lands (a leading '%' only matters at line start).
_SLOT_RE = re.compile("\x00kg-slot-(\\d+)\x00")


class _Slots:
    def __init__(self) -> None:
        self.values: list[str] = []

    def finalize(self, value: object) -> str:
        if isinstance(value, Verbatim):
            return value
        text = str(value)
        bad = forbidden_char(text)
        if bad is not None:
            # The value itself is not shown: it may be a secret, or part of one.
            raise _UnsafeValue(f"an expression renders a value containing {describe_char(bad)}")
        self.values.append(text)
        return f"\x00kg-slot-{len(self.values) - 1}\x00"

    def fill(self, rendered: str) -> str:
        def quoted(m: re.Match[str]) -> str:
            value = self.values[int(m.group(1))]
            line_start = rendered.rfind("\n", 0, m.start()) + 1
            if value.startswith("%") and not _SLOT_RE.sub("x", rendered[line_start:m.start()]).strip():
                lineno = rendered.count("\n", 0, m.start()) + 1
                raise _UnsafeValue(f"rendered line {lineno}: the value {value!r} starts the line, where "
                                   "pykickstart would read it as a section header")
            return shlex.quote(value)

        return _SLOT_RE.sub(quoted, rendered)


def _environment(recipe: Recipe, slots: _Slots) -> jinja2.Environment:
    # With the context passed, jinja2 never folds a constant at compile time: every expression
    # goes through the slots at render time.
    @jinja2.pass_context
    def finalize(_context: jinja2.runtime.Context, value: object) -> str:
        return slots.finalize(value)

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(recipe.dir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        finalize=finalize,
    )


def _template_frame(exc: BaseException, recipe_dir: Path) -> tuple[Path, int] | None:
    """The innermost traceback frame that runs template code: (template file, template line)."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename)
        if path.suffix == ".j2" and frame.lineno is not None and recipe_dir in path.parents:
            found = (path, frame.lineno)
    return found


def render_unvalidated(recipe: Recipe, env: Mapping[str, str] | None = None) -> str:
    if recipe.kickstart is None:
        raise RecipeError(recipe.path, "method", "not a kickstart recipe")
    template_path = recipe.kickstart.template
    context = template_context(recipe, env)
    slots = _Slots()
    jenv = _environment(recipe, slots)
    try:
        template = jenv.get_template(template_path.name)
        return slots.fill(template.render(**context))
    except _UnsafeValue as exc:
        where = _template_frame(exc, recipe.dir)
        path, line = where if where else (template_path, None)
        raise RecipeError(path, f"line {line}" if line else "", mask_secrets(str(exc), env),
                          "every {{ expression }} renders as one shell-quoted word on one line: "
                          "change the value, or move it after a command word") from None
    except jinja2.TemplateSyntaxError as exc:
        path = Path(exc.filename) if exc.filename else template_path
        raise RecipeError(path, f"line {exc.lineno}",
                          f"template syntax error: {exc.message}") from None
    except jinja2.TemplateNotFound as exc:
        where = _template_frame(exc, recipe.dir)
        raise RecipeError(where[0] if where else template_path, f"line {where[1]}" if where else "",
                          f"template {exc.name!r} not found in {recipe.dir}") from None
    except jinja2.UndefinedError as exc:
        where = _template_frame(exc, recipe.dir)
        path, line = where if where else (template_path, None)
        raise RecipeError(path, f"line {line}" if line else "",
                          f"undefined variable: {exc.message}",
                          f"define it in [vars] of {recipe.path.name}, or guard it with "
                          "'{% if NAME is defined %}'") from None
    except jinja2.TemplateError as exc:
        where = _template_frame(exc, recipe.dir)
        path, line = where if where else (template_path, None)
        raise RecipeError(path, f"line {line}" if line else "", f"template error: {exc}") from None


def render_kickstart(recipe: Recipe, env: Mapping[str, str] | None = None) -> str:
    """The recipe's kickstart, rendered, then validated with pykickstart for its version."""
    text = render_unvalidated(recipe, env)
    validate_kickstart(recipe, text, env)
    return text


# --------------------------------------------------------------------------- line mapping


_TAG_RE = re.compile(r"({{.*?}}|{%.*?%}|{#.*?#})")
_STATEMENT_ONLY_RE = re.compile(r"^\s*({%.*?%}|{#.*?#}|\s)*$")
_ANY_TAG_RE = re.compile(r"{{.*?}}|{%.*?%}|{#.*?#}", re.DOTALL)


def _collapse_tag(m: re.Match[str]) -> str:
    tag = m.group(0)
    return tag if "\n" not in tag else tag[:2] + tag[-2:] + "\n" * tag.count("\n")

_LOG_RE = re.compile(r"kickgate-post-(common|node)-([A-Za-z0-9._-]+?)\.log")


@dataclass(frozen=True)
class _TemplateLine:
    path: Path
    lineno: int
    regex: re.Pattern[str]
    literal: int  # number of literal characters: how specific the match is


class LineMapper:
    """Maps a line of the rendered kickstart back to where it came from (best effort).

    Template lines become patterns (literal text, with expressions as wildcards); the most
    specific match wins. Lines that came from a post-install script are found through the
    ``kickgate-post-<ns>-<stem>.log`` of the ``%post`` header above them.
    """

    def __init__(self, recipe: Recipe, scripts: Iterable[ScriptView]) -> None:
        assert recipe.kickstart is not None
        self.template = recipe.kickstart.template
        files = [self.template, *sorted(p for p in recipe.dir.glob("*.j2") if p != self.template)]
        self.lines: list[_TemplateLine] = []
        for path in files:
            # Tags and comments spanning lines: keep the line count, drop their inner lines.
            source = _ANY_TAG_RE.sub(_collapse_tag, path.read_text(encoding="utf-8"))
            for i, raw in enumerate(source.splitlines(), 1):
                if not raw.strip() or _STATEMENT_ONLY_RE.match(raw):
                    continue
                parts = _TAG_RE.split(raw.strip())
                pattern = "".join(".*?" if _TAG_RE.fullmatch(p) else re.escape(p) for p in parts)
                literal = sum(len(p.strip()) for p in parts if not _TAG_RE.fullmatch(p))
                regex = re.compile(rf"^\s*{pattern}\s*$")
                self.lines.append(_TemplateLine(path, i, regex, literal))
        self.scripts = {(s.namespace, s.stem): s for s in scripts}

    def _script_origin(self, rendered: list[str], index: int) -> tuple[ScriptView, int] | None:
        for j in range(index, -1, -1):
            line = rendered[j]
            if line.lstrip().startswith("%end") and j != index:
                return None
            if line.lstrip().startswith("%post"):
                m = _LOG_RE.search(line)
                script = self.scripts.get((m.group(1), m.group(2))) if m else None
                if script is None:
                    return None
                body = script.text.splitlines()
                if not body:
                    return None
                for start in range(j + 1, index + 1):  # where the script's text begins
                    if rendered[start] == body[0]:
                        k = index - start
                        if 0 <= k < len(body) and body[k] == rendered[index]:
                            return script, k + 1
                        return None
                return None
        return None

    def locate(self, rendered_text: str, lineno: int) -> tuple[Path, str]:
        """(file to name, where) for rendered line lineno (1-based)."""
        rendered = rendered_text.split("\n")
        index = lineno - 1
        if not 0 <= index < len(rendered):
            return self.template, f"rendered line {lineno}"
        origin = self._script_origin(rendered, index)
        if origin is not None:
            script, k = origin
            return self.template, f"rendered line {lineno} (from {script.path} line {k})"
        line = rendered[index]
        matches = [t for t in self.lines if t.literal > 0 and t.regex.match(line)]
        if matches:
            best = max(t.literal for t in matches)
            chosen = [t for t in matches if t.literal == best]
            if len(chosen) == 1 or len({(t.path, t.lineno) for t in chosen}) == 1:
                t = chosen[0]
                return t.path, f"line {t.lineno}"
        return self.template, f"rendered line {lineno}"


# --------------------------------------------------------------------------- validation


def validate_kickstart(recipe: Recipe, text: str, env: Mapping[str, str] | None = None) -> None:
    """Parse text with pykickstart for the recipe's syntax version; RecipeError on any problem."""
    from pykickstart.constants import KS_REBOOT, KS_SCRIPT_POST, KS_SHUTDOWN
    from pykickstart.errors import KickstartError, KickstartParseError, KickstartVersionError
    from pykickstart.parser import KickstartParser
    from pykickstart.version import makeVersion

    assert recipe.kickstart is not None
    version = recipe.kickstart.version
    try:
        handler = makeVersion(version)
    except KickstartVersionError:
        raise RecipeError(recipe.path, "kickstart.version",
                          f"unknown kickstart syntax version {version!r}",
                          "use a pykickstart version name such as RHEL8, RHEL9, RHEL10 or F40"
                          ) from None
    parser = KickstartParser(handler, followIncludes=False, errorsAreFatal=True,
                             missingIncludeIsFatal=False, unknownSectionIsFatal=True)
    mapper = LineMapper(recipe, script_views(recipe))
    rendered = text.split("\n")

    def shown(lineno: int) -> str:
        if 1 <= lineno <= len(rendered):
            return mask_secrets(rendered[lineno - 1], env).strip()
        return ""

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parser.readKickstartFromString(text)
        except KickstartParseError as exc:
            lineno = int(getattr(exc, "lineno", 0) or 0)
            message = mask_secrets(str(getattr(exc, "message", "") or exc).strip(), env)
            if "does not end with %end" in message:
                lineno = _section_start(rendered, lineno) or lineno
            path, where = mapper.locate(text, lineno) if lineno else (recipe.kickstart.template, "")
            problem = f"pykickstart ({version}): {message}"
            if lineno:
                problem += f" [rendered line {lineno}: {shown(lineno)!r}]"
            raise RecipeError(path, where, problem) from None
        except KickstartError as exc:
            message = mask_secrets(str(exc).strip(), env)
            raise RecipeError(recipe.kickstart.template, "",
                              f"pykickstart ({version}): {message}") from None
        except Exception as exc:  # pykickstart lets shlex's ValueError (an open quote) and others escape
            message = mask_secrets(f"{type(exc).__name__}: {exc}", env)
            lineno = _unparsable_line(rendered) or 0
            path, where = mapper.locate(text, lineno) if lineno else (recipe.kickstart.template, "")
            problem = f"pykickstart ({version}) cannot parse the kickstart: {message}"
            if lineno:
                problem += f" [rendered line {lineno}: {shown(lineno)!r}]"
            raise RecipeError(path, where, problem,
                              "check the quotes on that line: a command line is split as the shell does") from None
    for w in caught:
        log.warning("%s: kickstart (%s): %s", recipe.kickstart.template.name, version,
                    mask_secrets(str(w.message), env))

    action = handler.reboot.action
    if action not in (KS_SHUTDOWN, KS_REBOOT):
        raise RecipeError(recipe.kickstart.template, "",
                          "the kickstart does not end the install with 'poweroff'",
                          "add 'poweroff': the build ends when the install domain powers off")
    posts = [s for s in handler.scripts if s.type == KS_SCRIPT_POST]
    if not posts or MARKERS.ok not in posts[-1].script:
        raise RecipeError(recipe.kickstart.template, "",
                          f"the last %post section does not print the success marker {MARKERS.ok}",
                          "end with a %post that runs: echo " + MARKERS.ok + " > /dev/ttyS0")
    last = posts[-1]
    before_marker = last.script[: last.script.index(MARKERS.ok)]
    kept = [f for f in (*KICKSTART_COPIES, POST_LOGS) if f not in removed_files(before_marker)]
    if last.inChroot is False or kept:
        raise RecipeError(recipe.kickstart.template, "",
                          "the last %post section does not remove, before the success marker, what "
                          f"would keep the kickstart's secrets in the image: {', '.join(kept) or 'it runs --nochroot'}",
                          f"add to the last (chroot) %post, before the marker: rm -f {' '.join(kept)}")


def removed_files(script: str) -> set[str]:
    """Operands of the plain ``rm`` commands of a shell script (one command per line)."""
    out: set[str] = set()
    for line in script.splitlines():
        words = line.split("#", 1)[0].split()
        if words and words[0] == "rm":
            out.update(w for w in words[1:] if not w.startswith("-"))
    return out


def _unparsable_line(rendered: list[str]) -> int | None:
    """The first line pykickstart would split with shlex and cannot (an open quote): command
    lines and section headers; section bodies are not split."""
    in_section = False
    for i, line in enumerate(rendered, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        word = stripped.split()[0]
        if in_section and not (word == "%end" or _SECTION_RE.match(word)):
            continue
        try:
            shlex.split(line, comments=not in_section)
        except ValueError:
            return i
        if word == "%end":
            in_section = False
        elif _SECTION_RE.match(word):
            in_section = True
    return None


def _section_start(rendered: list[str], lineno: int) -> int | None:
    """For an unclosed section: the line that opened it. pykickstart reports the error where the
    next section starts, or at the end of the file."""

    def opens(j: int) -> bool:
        word = rendered[j].strip().split(" ", 1)[0]
        return word != "%end" and bool(_SECTION_RE.match(word))

    last = min(lineno, len(rendered)) - 1
    for j in range(last - 1, -1, -1):
        if rendered[j].strip().split(" ", 1)[0] == "%end":
            break
        if opens(j):
            return j + 1
    return lineno if 0 <= last < len(rendered) and opens(last) else None
