"""Pure judgements the specs make from what the guest reports: accounts, inbound firewall rules, and what
the image as built holds (authorized keys, shell history).

Kept apart from the specs so each rule of judgement is unit-tested without a guest.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# -- accounts ---------------------------------------------------------------------------------


def _locked(field_: str) -> bool:
    """A password field no password can match: locked (`!…`, `!!`) or disabled (`*`, `*LK*`)."""
    return field_.startswith(("!", "*"))


def password_problems(passwd: str, shadow: str) -> list[str]:
    """Accounts anyone could log in to with a password: empty fields (either file) or usable hashes.

    passwd and shadow are `getent passwd` / `getent shadow` outputs. `x` in /etc/passwd defers to
    the shadow entry; without one no password can match.
    """
    shadow_fields = {}
    for line in shadow.splitlines():
        parts = line.split(":")
        if len(parts) >= 2:
            shadow_fields[parts[0]] = parts[1]
    problems = []
    seen = set()
    for line in passwd.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name, pw = parts[0], parts[1]
        seen.add(name)
        if pw == "":
            problems.append(f"{name} (empty password field in /etc/passwd)")
        elif pw != "x" and not _locked(pw):
            problems.append(f"{name} (password hash in /etc/passwd)")
        elif pw == "x" and name in shadow_fields:
            problems += _shadow_problem(name, shadow_fields[name])
    for name, sp in shadow_fields.items():
        if name not in seen:  # a shadow entry without a passwd line still holds a password
            problems += _shadow_problem(name, sp)
    return problems


def _shadow_problem(name: str, field_: str) -> list[str]:
    if field_ == "":
        return [f"{name} (empty password in /etc/shadow)"]
    if not _locked(field_):
        return [f"{name} (usable password hash in /etc/shadow)"]
    return []


# -- firewall ---------------------------------------------------------------------------------

IPV4, IPV6 = "IPv4", "IPv6"
TERMINAL = ("accept", "drop", "reject")


@dataclass(frozen=True)
class Rule:
    text: str
    verdict: str | None  # accept, drop, reject, jump, return, …; None: the rule decides nothing
    unconditional: bool  # matches every packet (of its families)
    accepts_tcp_ports: frozenset[int] = frozenset()
    families: frozenset[str] | None = None  # a rule that selects a family (meta nfproto ipv6); None: any

    def applies_to(self, family: str) -> bool:
        return self.families is None or family in self.families


@dataclass(frozen=True)
class InputChain:
    """A chain every inbound packet of its families traverses (a base chain on the input hook)."""

    source: str  # e.g. "iptables filter INPUT", "nft inet filter input"
    families: frozenset[str]
    policy: str  # accept or drop
    rules: tuple[Rule, ...] = field(default_factory=tuple)


_IPT_VERDICTS = {"ACCEPT": "accept", "DROP": "drop", "REJECT": "reject", "RETURN": "return"}


def _ipt_rule(line: str) -> Rule:
    tokens = shlex.split(line)[2:]  # after "-A CHAIN"
    conditions: list[str] = []
    verdict: str | None = None
    ports: set[int] = set()
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-c":  # counters: -c packets bytes
            i += 3
            continue
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "comment":
            i += 2
            continue
        if tok == "--comment":
            i += 2
            continue
        if tok in ("-j", "-g"):
            target = tokens[i + 1] if i + 1 < len(tokens) else ""
            verdict = _IPT_VERDICTS.get(target, "jump" if tok == "-g" or target not in ("LOG", "NFLOG") else None)
            break
        if tok in ("--dport", "--dports", "--destination-port", "--destination-ports") and i + 1 < len(tokens):
            ports |= _ports(tokens[i + 1])
        conditions.append(tok)
        i += 1
    tcp = "tcp" in conditions
    return Rule(line, verdict, not conditions, frozenset(ports) if verdict == "accept" and tcp else frozenset())


def _ports(spec: str) -> set[int]:
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition(":")
        if lo.isdigit() and (hi.isdigit() or not hi):
            out |= set(range(int(lo), int(hi or lo) + 1)) if int(hi or lo) - int(lo) < 70000 else set()
        elif part == "ssh":
            out.add(22)
    return out


def iptables_input_chains(save: str, family: str) -> list[InputChain]:
    """The built-in INPUT chains of every table in `iptables-save` (or ip6tables-save) output."""
    chains: list[InputChain] = []
    table = ""
    policy: str | None = None
    rules: list[Rule] = []

    def close() -> None:
        if table and policy is not None:
            chains.append(InputChain(f"{'ip6tables' if family == IPV6 else 'iptables'} {table} INPUT",
                                     frozenset({family}), policy, tuple(rules)))

    for raw in save.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            close()
            table, policy, rules = line[1:], None, []
        elif line.startswith(":INPUT "):
            policy = "drop" if line.split()[1] == "DROP" else "accept"
        elif line.startswith("-A INPUT "):
            rules.append(_ipt_rule(line))
        elif line == "COMMIT":
            close()
            table, policy, rules = "", None, []
    close()
    return chains


_NFT_FAMILIES = {"inet": frozenset({IPV4, IPV6}), "ip": frozenset({IPV4}), "ip6": frozenset({IPV6})}
_NFT_VERDICTS = ("accept", "drop", "reject", "jump", "goto", "return", "queue")
_NFT_STATEMENTS = ("counter", "log")  # statements that match every packet
# Matches that select a family in an inet chain: `meta nfproto ipv6 accept` accepts all of IPv6.
_NFT_FAMILY_KEYS = {"nfproto": {"ipv4": IPV4, "ipv6": IPV6}, "protocol": {"ip": IPV4, "ip6": IPV6}}


def _nft_ports(right: Any) -> set[int]:
    if isinstance(right, int):
        return {right}
    if right == "ssh":
        return {22}
    if isinstance(right, dict) and "set" in right:
        return set().union(*(_nft_ports(v) for v in right["set"])) if right["set"] else set()
    if isinstance(right, list):
        return set().union(*(_nft_ports(v) for v in right)) if right else set()
    if isinstance(right, dict) and "range" in right and all(isinstance(v, int) for v in right["range"]):
        lo, hi = right["range"]
        return set(range(lo, hi + 1)) if hi - lo < 70000 else set()
    return set()


def _nft_rule(rule: dict[str, Any]) -> Rule:
    exprs: list[dict[str, Any]] = rule.get("expr", [])
    verdict: str | None = None
    conditional = False
    families: frozenset[str] | None = None
    ports: set[int] = set()
    for expr in exprs:
        key = next(iter(expr), "")
        if key in _NFT_VERDICTS:
            verdict = key
        elif (family := _nft_family(expr)) is not None:
            families = family if families is None else families & family
        elif key not in _NFT_STATEMENTS:
            conditional = True
        if key == "match":
            left = expr["match"].get("left", {})
            payload = left.get("payload", {}) if isinstance(left, dict) else {}
            if payload.get("protocol") == "tcp" and payload.get("field") == "dport":
                ports |= _nft_ports(expr["match"].get("right"))
    text = f"nft {rule.get('family')} {rule.get('table')} {rule.get('chain')} rule " \
           f"(handle {rule.get('handle')}): {json.dumps(exprs, separators=(',', ':'))[:200]}"
    return Rule(text, verdict, not conditional, frozenset(ports) if verdict == "accept" else frozenset(), families)


def _nft_family(expr: dict[str, Any]) -> frozenset[str] | None:
    """The families a `meta nfproto`/`meta protocol` equality match selects; None for any other expression."""
    match = expr.get("match")
    if not isinstance(match, dict) or match.get("op", "==") not in ("==", "in"):
        return None
    left = match.get("left")
    meta = left.get("meta", {}) if isinstance(left, dict) else {}
    names = _NFT_FAMILY_KEYS.get(meta.get("key", "")) if isinstance(meta, dict) else None
    if names is None:
        return None
    right = match.get("right")
    values = right.get("set", []) if isinstance(right, dict) else right if isinstance(right, list) else [right]
    picked = [names.get(v) for v in values if isinstance(v, str)]
    return frozenset(f for f in picked if f is not None) if picked and all(picked) else None


def nft_input_chains(ruleset_json: str) -> list[InputChain]:
    """Base chains on the input hook in `nft -j list ruleset` (families inet, ip, ip6)."""
    items = json.loads(ruleset_json).get("nftables", [])
    bases: dict[tuple[str, str, str], dict[str, Any]] = {}
    rules: dict[tuple[str, str, str], list[Rule]] = {}
    for item in items:
        chain = item.get("chain")
        if chain and chain.get("hook") == "input" and chain.get("family") in _NFT_FAMILIES:
            bases[(chain["family"], chain["table"], chain["name"])] = chain
    for item in items:
        rule = item.get("rule")
        if rule:
            key = (rule.get("family"), rule.get("table"), rule.get("chain"))
            if key in bases:
                rules.setdefault(key, []).append(_nft_rule(rule))  # type: ignore[arg-type]
    return [InputChain(f"nft {fam} {table} {name}", _NFT_FAMILIES[fam], str(chain.get("policy", "accept")),
                       tuple(rules.get((fam, table, name), [])))
            for (fam, table, name), chain in bases.items()]


def inbound_problems(chains: Iterable[InputChain], family: str) -> list[str]:
    """Why inbound traffic of family is not dropped by default; empty when it is.

    Every input base chain sees every inbound packet, and a drop in any of them is final: one
    chain that drops by default (policy drop, or an unconditional drop or reject rule) is enough.
    An unconditional accept anywhere is a defect on its own, and a conditional last rule is not a
    default.
    """
    mine = [c for c in chains if family in c.families]
    if not mine:
        return [f"{family}: no input chain filters inbound traffic, so all of it is accepted"]
    problems = []
    defaults = []
    drops = False
    for chain in mine:
        effective = chain.policy
        for rule in chain.rules:
            if not rule.applies_to(family):
                continue
            if rule.unconditional and rule.verdict in TERMINAL:
                effective = rule.verdict
                if rule.verdict == "accept":
                    problems.append(f"{family}: {chain.source} accepts everything: {rule.text}")
                break
        defaults.append(f"{chain.source} → {effective}")
        drops = drops or effective in ("drop", "reject")
    if not drops and not problems:  # an accept-all rule already says why
        problems.append(f"{family}: no input chain drops by default ({'; '.join(defaults)}); "
                        "a conditional last rule is not a default")
    return problems


def accepted_tcp_ports(chains: Iterable[InputChain]) -> set[int]:
    return set().union(*(r.accepts_tcp_ports for c in chains for r in c.rules))


# -- the image as built -----------------------------------------------------------------------

# What sshd reads when AuthorizedKeysFile is not set (and what many a build script writes anyway).
DEFAULT_AUTHORIZED_KEYS = (".ssh/authorized_keys", ".ssh/authorized_keys2")
# Files that keep what a person or a script typed: commands with passwords, tokens, hosts.
HISTORY_FILES = (".bash_history", ".zsh_history", ".sh_history", ".python_history", ".lesshst", ".viminfo",
                 ".mysql_history", ".psql_history")


@dataclass(frozen=True)
class Account:
    name: str
    uid: str
    home: str


def passwd_accounts(passwd: str) -> list[Account]:
    """Every account of an /etc/passwd file, root included; lines that are not entries are skipped."""
    accounts = []
    for line in passwd.splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and parts[0] and not parts[0].startswith(("#", "+", "-")):
            accounts.append(Account(parts[0], parts[2], parts[5]))
    return accounts


def authorized_keys_patterns(sshd_t: str) -> list[str]:
    """AuthorizedKeysFile patterns from `sshd -T`, followed by OpenSSH's defaults.

    The defaults are always looked at: a key there is live as soon as a context or a later
    configuration goes back to them. `none` names no file.
    """
    patterns: list[str] = []
    for line in sshd_t.splitlines():
        words = line.split()
        if words and words[0].lower() == "authorizedkeysfile":
            patterns += [w for w in words[1:] if w != "none"]
    return list(dict.fromkeys([*patterns, *DEFAULT_AUTHORIZED_KEYS]))


_TOKEN = re.compile(r"%(.?)", re.DOTALL)


def expand_keys_pattern(pattern: str, account: Account) -> str:
    """The file an AuthorizedKeysFile pattern names for account, as sshd expands it.

    %h is the home, %u the name, %U the uid, %% a percent sign; a relative result is relative to
    the home. Any other token is an error: guessing would check a file sshd never reads.
    """
    def token(m: re.Match[str]) -> str:
        values = {"%": "%", "h": account.home, "u": account.name, "U": account.uid}
        if m.group(1) not in values:  # also a lone % at the end
            raise ValueError(f"AuthorizedKeysFile {pattern!r}: unknown token %{m.group(1)}")
        return values[m.group(1)]

    path = _TOKEN.sub(token, pattern)
    return posixpath.normpath(posixpath.join(account.home or "/", path))


def authorized_keys_files(accounts: Iterable[Account], patterns: Sequence[str]) -> dict[str, list[str]]:
    """path → the accounts whose keys sshd would read from it, for every account and pattern."""
    files: dict[str, list[str]] = {}
    for account in accounts:
        for pattern in patterns:
            owners = files.setdefault(expand_keys_pattern(pattern, account), [])
            if account.name not in owners:
                owners.append(account.name)
    return files


def key_lines(text: str) -> list[str]:
    """The lines of an authorized_keys file that sshd reads as keys: not blank, not comments."""
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def has_content(text: str) -> bool:
    """A file holds something (a history of only blank lines holds nothing)."""
    return bool(text.strip())


def home_files(accounts: Iterable[Account], names: Iterable[str]) -> dict[str, list[str]]:
    """path → accounts, for each name in the home of every account (root's /root however passwd puts it)."""
    names = list(names)
    files: dict[str, list[str]] = {}
    homes = [(a.name, a.home or "/") for a in accounts] + [("root", "/root")]
    for owner, home in homes:
        for name in names:
            owners = files.setdefault(posixpath.normpath(posixpath.join(home, name)), [])
            if owner not in owners:
                owners.append(owner)
    return files


def name_files(found: Mapping[str, Sequence[str]], details: Mapping[str, str] | None = None) -> str:
    """"path (account, …; detail)" for each file, in path order: which file, whose, and what is in it."""
    parts = []
    for path in sorted(found):
        said = [", ".join(found[path])] if found[path] else []
        if details and path in details:
            said.append(details[path])
        parts.append(f"{path} ({'; '.join(said)})" if said else path)
    return ", ".join(parts)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
