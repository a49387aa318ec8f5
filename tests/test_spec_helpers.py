"""The specs' own building blocks: guest commands that cannot pass vacuously, and the judgements of
accounts, firewall rules and the image as built, each shown on the forms real images produce."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "specs"))

from guestcmd import GuestCommandError, has_tool, run, run_rc
from judgements import (
    DEFAULT_AUTHORIZED_KEYS,
    HISTORY_FILES,
    IPV4,
    IPV6,
    Account,
    accepted_tcp_ports,
    authorized_keys_files,
    authorized_keys_patterns,
    expand_keys_pattern,
    has_content,
    home_files,
    inbound_problems,
    iptables_input_chains,
    key_lines,
    name_files,
    nft_input_chains,
    passwd_accounts,
    password_problems,
    plural,
)

# -- guest commands ---------------------------------------------------------------------------


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str


class FakeHost:
    """Answers commands like testinfra's Host.run, from a table."""

    def __init__(self, answers: dict[str, Result]) -> None:
        self.answers = answers
        self.ran: list[str] = []

    def run(self, command: str) -> Result:
        self.ran.append(command)
        return self.answers.get(command, Result(127, "", f"bash: {command.split()[0]}: command not found"))


def test_run_returns_stdout_of_a_command_that_answered() -> None:
    host = FakeHost({"hostname": Result(0, "kg-1\n", "")})
    assert run(host, "hostname") == "kg-1\n"


def test_missing_tool_is_an_error_naming_it_never_an_empty_answer() -> None:
    with pytest.raises(GuestCommandError, match=r"`blkid -o device` failed: blkid is not installed .*exit status "
                                                r"127.*blkid: command not found"):
        run(FakeHost({}), "blkid -o device", ok=(0, 2))


def test_unexpected_exit_status_is_an_error_with_stderr() -> None:
    host = FakeHost({"iptables-save": Result(4, "", "iptables-save: can't initialize: Permission denied")})
    with pytest.raises(GuestCommandError) as err:
        run(host, "iptables-save")
    assert "exit status 4" in str(err.value) and "Permission denied" in str(err.value)
    assert "expected exit status 0" in str(err.value)


def test_declared_exit_statuses_are_answers() -> None:
    host = FakeHost({"blkid -t TYPE=swap": Result(2, "", ""),
                     "systemctl is-system-running": Result(1, "degraded\n", "")})
    assert run(host, "blkid -t TYPE=swap", ok=(0, 2)) == ""
    assert run_rc(host, "systemctl is-system-running", ok=(0, 1)) == (1, "degraded\n")


def test_not_executable_is_an_error_even_when_declared() -> None:
    host = FakeHost({"/usr/sbin/x": Result(126, "", "Permission denied")})
    with pytest.raises(GuestCommandError, match="is not executable"):
        run(host, "/usr/sbin/x", ok=(0, 126))


def test_has_tool() -> None:
    host = FakeHost({"command -v nft": Result(0, "/usr/sbin/nft\n", ""), "command -v ufw": Result(1, "", "")})
    assert has_tool(host, "nft")
    assert not has_tool(host, "ufw")
    assert not has_tool(host, "iptables")  # dash's 127


# -- accounts ---------------------------------------------------------------------------------

PASSWD = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n"
SHADOW = "root:!:19700:0:99999:7:::\ndaemon:*:19700:0:99999:7:::\n"
HASH = "$6$salt$b3EvdNiJ9W91Rwj0w3iRipwOdiIte9cSSGvRoarAO2ICS8"


@pytest.mark.parametrize("locked", ["!", "*", "!!", "!" + HASH, "*LK*", "!*"])
def test_locked_and_disabled_forms_pass(locked: str) -> None:
    assert password_problems(PASSWD, SHADOW.replace("root:!:", f"root:{locked}:")) == []


def test_empty_shadow_field_fails_naming_the_account() -> None:
    assert password_problems(PASSWD, SHADOW.replace("root:!:", "root::")) == ["root (empty password in /etc/shadow)"]


def test_empty_passwd_field_fails_whatever_shadow_says() -> None:
    passwd = PASSWD + "ghost::1000:1000::/home/ghost:/bin/sh\n"
    shadow = SHADOW + "ghost:!:19700:0:99999:7:::\n"
    assert password_problems(passwd, shadow) == ["ghost (empty password field in /etc/passwd)"]


def test_usable_hashes_fail_in_either_file() -> None:
    passwd = PASSWD + f"old:{HASH}:1001:1001::/:/bin/sh\nbuilder:x:1002:1002::/:/bin/sh\n"
    shadow = SHADOW + f"builder:{HASH}:19700::::::\n"
    assert password_problems(passwd, shadow) == ["old (password hash in /etc/passwd)",
                                                 "builder (usable password hash in /etc/shadow)"]


def test_x_with_a_locked_shadow_entry_passes_and_every_account_is_named() -> None:
    shadow = SHADOW.replace("root:!:", "root::").replace("daemon:*:", "daemon::")
    assert password_problems(PASSWD, shadow) == ["root (empty password in /etc/shadow)",
                                                 "daemon (empty password in /etc/shadow)"]


# -- firewall: iptables-save ------------------------------------------------------------------

REFERENCE_V4 = """# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [10:600]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p icmp -j ACCEPT
-A INPUT -p tcp -m conntrack --ctstate NEW -m tcp --dport 22 -j ACCEPT
COMMIT
"""
REFERENCE_V6 = REFERENCE_V4.replace("-p icmp", "-p ipv6-icmp")


def test_reference_iptables_rules_drop_by_default_and_accept_ssh() -> None:
    v4 = iptables_input_chains(REFERENCE_V4, IPV4)
    v6 = iptables_input_chains(REFERENCE_V6, IPV6)
    assert inbound_problems(v4, IPV4) == [] and inbound_problems(v6, IPV6) == []
    assert accepted_tcp_ports(v4) == {22}


def test_policy_accept_fails() -> None:
    chains = iptables_input_chains(REFERENCE_V4.replace(":INPUT DROP", ":INPUT ACCEPT"), IPV4)
    [problem] = inbound_problems(chains, IPV4)
    assert problem.startswith("IPv4: no input chain drops by default (iptables filter INPUT → accept)")


def test_accept_all_rule_before_the_end_fails_despite_policy_drop() -> None:
    rules = REFERENCE_V4.replace("-A INPUT -i lo -j ACCEPT", "-A INPUT -j ACCEPT\n-A INPUT -i lo -j ACCEPT")
    [problem] = inbound_problems(iptables_input_chains(rules, IPV4), IPV4)
    assert problem == "IPv4: iptables filter INPUT accepts everything: -A INPUT -j ACCEPT"
    commented = REFERENCE_V4.replace("COMMIT", '-A INPUT -m comment --comment "open up" -j ACCEPT\nCOMMIT')
    assert "accepts everything" in inbound_problems(iptables_input_chains(commented, IPV4), IPV4)[0]


def test_conditional_last_rule_is_not_a_default_drop() -> None:
    rules = REFERENCE_V4.replace(":INPUT DROP", ":INPUT ACCEPT").replace(
        "COMMIT", "-A INPUT -p tcp -m tcp --dport 8080 -j DROP\nCOMMIT")
    assert "no input chain drops by default" in inbound_problems(iptables_input_chains(rules, IPV4), IPV4)[0]


def test_unconditional_last_drop_or_reject_is_a_default() -> None:
    for target in ("DROP", "REJECT --reject-with icmp-port-unreachable"):
        rules = REFERENCE_V4.replace(":INPUT DROP", ":INPUT ACCEPT").replace("COMMIT", f"-A INPUT -j {target}\nCOMMIT")
        assert inbound_problems(iptables_input_chains(rules, IPV4), IPV4) == []


def test_no_rules_at_all_means_nothing_is_filtered() -> None:
    assert inbound_problems(iptables_input_chains("", IPV6), IPV6) == [
        "IPv6: no input chain filters inbound traffic, so all of it is accepted"]


def test_other_tables_input_chains_do_not_hide_the_filter_table() -> None:
    mangle = "*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\nCOMMIT\n"
    assert inbound_problems(iptables_input_chains(mangle + REFERENCE_V4, IPV4), IPV4) == []


# -- firewall: nft -j list ruleset ------------------------------------------------------------


def nft(*items: dict[str, object]) -> str:
    return json.dumps({"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, *items]})


def chain(family: str, name: str = "input", policy: str = "drop", table: str = "filter") -> dict[str, object]:
    return {"chain": {"family": family, "table": table, "name": name, "handle": 1, "type": "filter",
                      "hook": name if name in ("forward", "output") else "input", "prio": 0, "policy": policy}}


def rule(family: str, *expr: dict[str, object], name: str = "input", table: str = "filter") -> dict[str, object]:
    return {"rule": {"family": family, "table": table, "chain": name, "handle": 5, "expr": list(expr)}}


LO = {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}
CT = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}
SSH = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}
COUNTER = {"counter": {"packets": 0, "bytes": 0}}
ACCEPT: dict[str, object] = {"accept": None}

# /etc/nftables.conf of the reference images: table inet filter { chain input { … policy drop; … } }
REFERENCE_NFT = nft({"table": {"family": "inet", "name": "filter", "handle": 1}}, chain("inet"),
                    rule("inet", LO, ACCEPT), rule("inet", CT, ACCEPT), rule("inet", SSH, COUNTER, ACCEPT),
                    chain("inet", "forward"), chain("inet", "output", "accept"))


def test_reference_nftables_ruleset_drops_both_families_and_accepts_ssh() -> None:
    chains = nft_input_chains(REFERENCE_NFT)
    assert [c.source for c in chains if c.policy == "drop"] == ["nft inet filter input"]
    assert inbound_problems(chains, IPV4) == [] and inbound_problems(chains, IPV6) == []
    assert accepted_tcp_ports(chains) == {22}


def test_nft_accept_without_a_match_fails() -> None:
    chains = nft_input_chains(nft(chain("inet"), rule("inet", COUNTER, ACCEPT), rule("inet", SSH, ACCEPT)))
    problems = inbound_problems(chains, IPV6)
    assert len(problems) == 1 and problems[0].startswith("IPv6: nft inet filter input accepts everything")


def nfproto(*names: str) -> dict[str, object]:
    right: object = names[0] if len(names) == 1 else {"set": list(names)}
    return {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": right}}


def test_nft_accept_of_one_family_in_an_inet_chain_opens_that_family_only() -> None:
    chains = nft_input_chains(nft(chain("inet"), rule("inet", nfproto("ipv6"), ACCEPT), rule("inet", SSH, ACCEPT)))
    problems = inbound_problems(chains, IPV6)
    assert len(problems) == 1 and problems[0].startswith("IPv6: nft inet filter input accepts everything")
    assert inbound_problems(chains, IPV4) == []
    both = nft_input_chains(nft(chain("inet"), rule("inet", nfproto("ipv4", "ipv6"), COUNTER, ACCEPT)))
    assert inbound_problems(both, IPV4) and inbound_problems(both, IPV6)
    protocol = {"match": {"op": "==", "left": {"meta": {"key": "protocol"}}, "right": "ip"}}
    v4 = nft_input_chains(nft(chain("inet"), rule("inet", protocol, ACCEPT)))
    assert inbound_problems(v4, IPV4) and inbound_problems(v4, IPV6) == []


def test_nft_family_match_with_another_condition_stays_conditional() -> None:
    chains = nft_input_chains(nft(chain("inet"), rule("inet", nfproto("ipv6"), SSH, ACCEPT)))
    assert inbound_problems(chains, IPV6) == [] and accepted_tcp_ports(chains) == {22}


def test_nft_drop_of_one_family_is_not_a_default_for_the_other() -> None:
    chains = nft_input_chains(nft(chain("inet", policy="accept"), rule("inet", nfproto("ipv4"), {"drop": None})))
    assert inbound_problems(chains, IPV4) == []
    assert "no input chain drops by default" in inbound_problems(chains, IPV6)[0]


def test_nft_ip_and_ip6_tables_cover_one_family_each() -> None:
    only_v4 = nft_input_chains(nft(chain("ip"), rule("ip", SSH, ACCEPT)))
    assert inbound_problems(only_v4, IPV4) == []
    assert inbound_problems(only_v4, IPV6) == ["IPv6: no input chain filters inbound traffic, so all of it is accepted"]
    both = nft_input_chains(nft(chain("ip"), chain("ip6", table="filter6")))
    assert inbound_problems(both, IPV6) == []


def test_nft_policy_accept_with_conditional_drop_last_is_not_a_default() -> None:
    drop_8080 = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 8080}}
    chains = nft_input_chains(nft(chain("inet", policy="accept"), rule("inet", drop_8080, {"drop": None})))
    assert "no input chain drops by default" in inbound_problems(chains, IPV4)[0]
    closed = nft_input_chains(nft(chain("inet", policy="accept"), rule("inet", LO, ACCEPT),
                                  rule("inet", COUNTER, {"reject": None})))
    assert inbound_problems(closed, IPV4) == []


def test_nft_chains_off_the_input_hook_are_ignored() -> None:
    chains = nft_input_chains(nft(chain("inet"), {"chain": {"family": "inet", "table": "filter", "name": "out",
                                                            "handle": 2, "type": "filter", "hook": "output",
                                                            "prio": 0, "policy": "accept"}},
                                  rule("inet", COUNTER, ACCEPT, name="out"),
                                  {"chain": {"family": "inet", "table": "filter", "name": "helper", "handle": 3}},
                                  rule("inet", ACCEPT, name="helper")))
    assert [c.source for c in chains] == ["nft inet filter input"]
    assert inbound_problems(chains, IPV4) == []


def test_nft_ssh_in_a_set() -> None:
    ports = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                       "right": {"set": [22, 443, {"range": [8000, 8002]}]}}}
    assert accepted_tcp_ports(nft_input_chains(nft(chain("inet"), rule("inet", ports, ACCEPT)))) == {
        22, 443, 8000, 8001, 8002}


# -- the image as built -----------------------------------------------------------------------

ROOT = Account("root", "0", "/root")
DEPLOY = Account("deploy", "998", "/var/lib/deploy")


def test_every_passwd_entry_is_an_account_with_its_home() -> None:
    passwd = ("root:x:0:0:root:/root:/bin/bash\n# a comment\n\nsshd:x:105:65534::/run/sshd:/usr/sbin/nologin\n"
              "+nis\nbroken:x:1\nnohome:x:1001:1001:::/bin/sh\n")
    assert passwd_accounts(passwd) == [ROOT, Account("sshd", "105", "/run/sshd"), Account("nohome", "1001", "")]


def test_sshd_patterns_come_first_then_the_defaults_once() -> None:
    sshd_t = "port 22\nauthorizedkeysfile .ssh/authorized_keys /etc/ssh/keys/%u\nhostkey /etc/ssh/k\n"
    assert authorized_keys_patterns(sshd_t) == [".ssh/authorized_keys", "/etc/ssh/keys/%u", ".ssh/authorized_keys2"]


def test_none_names_no_file_but_the_defaults_are_still_looked_at() -> None:
    # A key in the default place goes live as soon as a context or a later configuration sets it back.
    assert authorized_keys_patterns("authorizedkeysfile none\n") == list(DEFAULT_AUTHORIZED_KEYS)
    assert authorized_keys_patterns("") == list(DEFAULT_AUTHORIZED_KEYS)


@pytest.mark.parametrize(("pattern", "path"), [
    (".ssh/authorized_keys", "/var/lib/deploy/.ssh/authorized_keys"),
    ("%h/.ssh/keys", "/var/lib/deploy/.ssh/keys"),
    ("/etc/ssh/authorized_keys/%u", "/etc/ssh/authorized_keys/deploy"),
    ("/etc/ssh/keys/%U.pub", "/etc/ssh/keys/998.pub"),
    ("/etc/ssh/100%%/%u", "/etc/ssh/100%/deploy"),
    ("../shared/keys", "/var/lib/shared/keys"),
])
def test_patterns_expand_as_sshd_does(pattern: str, path: str) -> None:
    assert expand_keys_pattern(pattern, DEPLOY) == path


@pytest.mark.parametrize("pattern", ["/etc/ssh/%i", "/etc/ssh/keys%"])
def test_a_token_sshd_would_not_expand_here_is_an_error_not_a_guess(pattern: str) -> None:
    with pytest.raises(ValueError, match="unknown token"):
        expand_keys_pattern(pattern, DEPLOY)


def test_an_account_without_a_home_looks_at_the_root_directory() -> None:
    assert expand_keys_pattern(".ssh/authorized_keys", Account("x", "5", "")) == "/.ssh/authorized_keys"


def test_every_account_and_pattern_names_a_file_with_whose_it_is() -> None:
    shared = Account("svc", "997", "/var/lib/deploy")  # two accounts, one home
    files = authorized_keys_files([ROOT, DEPLOY, shared], [".ssh/authorized_keys", "/etc/ssh/keys/%u"])
    assert files == {"/root/.ssh/authorized_keys": ["root"], "/etc/ssh/keys/root": ["root"],
                     "/var/lib/deploy/.ssh/authorized_keys": ["deploy", "svc"], "/etc/ssh/keys/deploy": ["deploy"],
                     "/etc/ssh/keys/svc": ["svc"]}


def test_only_key_lines_count() -> None:
    assert key_lines("") == []
    assert key_lines("\n   \n# kickgate: keys come from the context\n  # indented comment\n") == []
    text = "# ops\nssh-ed25519 AAAAC3 ops@example\n\nfrom=\"10.0.0.1\" ssh-rsa AAAAB3 backup\n"
    assert key_lines(text) == ["ssh-ed25519 AAAAC3 ops@example", 'from="10.0.0.1" ssh-rsa AAAAB3 backup']


def test_a_history_of_blank_lines_holds_nothing() -> None:
    assert not has_content("")
    assert not has_content("\n \n\t\n")
    assert has_content("curl -u admin:hunter2 https://repo\n")


def test_history_files_are_looked_for_in_every_home_and_in_root() -> None:
    files = home_files([Account("root", "0", "/"), DEPLOY], [".bash_history"])
    # root's home in this passwd is /, and /root is looked at anyway
    assert files == {"/.bash_history": ["root"], "/var/lib/deploy/.bash_history": ["deploy"],
                     "/root/.bash_history": ["root"]}
    assert set(HISTORY_FILES) >= {".bash_history", ".zsh_history", ".python_history", ".lesshst", ".viminfo"}


def test_messages_name_the_file_whose_it_is_and_what_it_holds() -> None:
    found = {"/var/lib/deploy/.ssh/authorized_keys": ["deploy", "svc"], "/root/.ssh/authorized_keys": ["root"]}
    assert name_files(found, {"/root/.ssh/authorized_keys": plural(1, "key"),
                              "/var/lib/deploy/.ssh/authorized_keys": plural(2, "key")}) == (
        "/root/.ssh/authorized_keys (root; 1 key), /var/lib/deploy/.ssh/authorized_keys (deploy, svc; 2 keys)")
    assert name_files({"/root/.bash_history": ["root"]}) == "/root/.bash_history (root)"
    assert name_files({"/etc/x": []}) == "/etc/x"


def test_what_is_present_in_the_image_expands_globs_and_keeps_spaces(tmp_path: Path) -> None:
    from test_pristine import _PRESENT

    (tmp_path / "etc ssh").mkdir()
    for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key", "ssh_host_rsa_key.pub"):
        (tmp_path / "etc ssh" / name).write_text("k")
    (tmp_path / "kickgate").mkdir()
    args = [f"{tmp_path}/etc ssh/ssh_host_*_key", f"{tmp_path}/kickgate", f"{tmp_path}/anaconda-ks.cfg",
            f"{tmp_path}/kickgate-post-*.log"]
    out = subprocess.run(["sh", "-c", _PRESENT, "sh", *args], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"{tmp_path}/etc ssh/ssh_host_ed25519_key", f"{tmp_path}/etc ssh/ssh_host_rsa_key",
                                f"{tmp_path}/kickgate"]
