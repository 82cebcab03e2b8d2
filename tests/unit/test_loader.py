"""resolver/loader.py: a blocklists directory broken in one way gives exactly one problem, with the
file, the line and what is wrong; a good directory gives none."""
from __future__ import annotations

from pathlib import Path

import pytest

from resolver.loader import PolicyError, check_directory, load_policy

POLICY = """\
groups:
  desktop:
    subnets: [10.1.0.0/16, "fd00:1::/48"]
    block: [chat]
    response: nxdomain
  mobile:
    subnets: [10.2.0.0/16]
    block: []
default_group: mobile
allowed_clients: [10.0.0.0/8, "fd00::/8"]
"""

CHAT = """\
description: chat
sources:
  t: test
domains:
  - {name: chat.test, source: t}
patterns:
  - {pattern: 'file-[0-9]+\\.files\\.test', source: t}
allow:
  - {name: help.chat.test, source: t}
"""


def make_dir(root: Path, policy: str = POLICY, chat: str = CHAT, extra: dict | None = None) -> Path:
    (root / "services").mkdir(parents=True, exist_ok=True)
    (root / "policy.yaml").write_text(policy)
    (root / "services" / "chat.yaml").write_text(chat)
    for name, text in (extra or {}).items():
        (root / "services" / name).write_text(text)
    return root


# (id, file, old, new, line, words the message must contain)
BROKEN = [
    ("bad-yaml", "policy.yaml", "    block: [chat]\n", "    block: [chat\n", 5, ["invalid YAML"]),
    ("bad-yaml-service", "services/chat.yaml", "  t: test\n", "  t: test\n t2: x\n", 4, ["invalid YAML"]),
    ("duplicate-key", "policy.yaml", "    block: []\n", "    block: []\n    block: [chat]\n", 9,
     ["duplicate key 'block'"]),
    ("bad-cidr-prefix", "policy.yaml", "10.1.0.0/16", "10.1.0.0/33", 3, ["'10.1.0.0/33'", "not an IP address or CIDR"]),
    ("bad-cidr-short", "policy.yaml", "10.1.0.0/16", "10.1/16", 3, ["'10.1/16'", "not an IP address or CIDR"]),
    ("bad-cidr-text", "policy.yaml", "10.1.0.0/16", "ten.one/16", 3, ["'ten.one/16'", "not an IP address or CIDR"]),
    ("cidr-host-bits", "policy.yaml", "10.1.0.0/16", "10.1.0.1/16", 3, ["host bits", "10.1.0.0/16"]),
    ("bad-v6-cidr", "policy.yaml", "fd00:1::/48", "fd00:1::/129", 3, ["'fd00:1::/129'"]),
    ("bad-allowed-client", "policy.yaml", "allowed_clients: [10.0.0.0/8", "allowed_clients: [11.0.0.0/7", 10,
     ["allowed_clients", "host bits"]),
    ("unknown-service", "policy.yaml", "block: [chat]", "block: [chats]", 4,
     ["group 'desktop'", "unknown service 'chats'"]),
    ("service-twice", "policy.yaml", "block: [chat]", "block: [chat, chat]", 4, ["'chat' is listed twice"]),
    ("duplicate-subnet", "policy.yaml", "subnets: [10.2.0.0/16]", "subnets: [10.1.0.0/16]", 7,
     ["group 'mobile'", "10.1.0.0/16", "already in group 'desktop' (line 3)"]),
    ("duplicate-subnet-spelling", "policy.yaml", "subnets: [10.2.0.0/16]", "subnets: ['FD00:1::/48']", 7,
     ["fd00:1::/48", "already in group 'desktop'"]),
    ("bad-regex", "services/chat.yaml", "'file-[0-9]+", "'file-[0-9+", 7, ["does not compile"]),
    ("regex-matches-everything", "services/chat.yaml", "'file-[0-9]+\\.files\\.test'", "'.*'", 7,
     ["would match almost anything"]),
    ("regex-matches-common-names", "services/chat.yaml", "'file-[0-9]+\\.files\\.test'", "'[a-z.]+\\.com'", 7,
     ["would match almost anything", "google.com"]),
    ("regex-matches-empty", "services/chat.yaml", "'file-[0-9]+\\.files\\.test'", "'(file-x)?'", 7,
     ["would match almost anything", "empty name"]),
    ("unknown-key-policy", "policy.yaml", "default_group: mobile\n", "default_group: mobile\ncolour: red\n", 10,
     ["unknown key 'colour'", "policy.yaml"]),
    ("unknown-key-group", "policy.yaml", "    response: nxdomain", "    respones: nxdomain", 5,
     ["unknown key 'respones'", "group 'desktop'"]),
    ("unknown-key-service", "services/chat.yaml", "description: chat\n", "description: chat\nhomepage: x\n", 2,
     ["unknown key 'homepage'"]),
    ("unknown-key-entry", "services/chat.yaml", "{name: chat.test, source: t}", "{name: chat.test, source: t, why: x}",
     5, ["unknown key 'why'"]),
    ("invalid-name-case", "services/chat.yaml", "name: chat.test,", "name: Chat.test,", 5, ["'Chat.test'", "lower case"]),
    ("invalid-name-label", "services/chat.yaml", "name: chat.test,", "name: chat..test,", 5, ["'chat..test'", "bad label"]),
    ("invalid-name-dot", "services/chat.yaml", "name: chat.test,", "name: chat.test.,", 5, ["trailing dot"]),
    ("invalid-name-hyphen", "services/chat.yaml", "name: chat.test,", "name: -chat.test,", 5, ["bad label '-chat'"]),
    ("allow-outside-domains", "services/chat.yaml", "name: help.chat.test", "name: help.other.test", 9,
     ["allow", "not below any of this service's domains"]),
    ("unknown-source", "services/chat.yaml", "{name: chat.test, source: t}", "{name: chat.test, source: u}", 5,
     ["source 'u' is not listed"]),
    ("bad-response", "policy.yaml", "response: nxdomain", "response: blackhole", 5, ["response 'blackhole'"]),
    ("sinkhole-without-addresses", "policy.yaml", "response: nxdomain", "response: sinkhole", 5,
     ["needs 'sinkhole' addresses"]),
    ("unknown-default-group", "policy.yaml", "default_group: mobile", "default_group: phones", 9,
     ["default_group 'phones' is not a group"]),
    ("negative-ttl", "policy.yaml", "default_group: mobile\n", "default_group: mobile\nblock_ttl: -1\n", 10,
     ["block_ttl", "whole number"]),
]


def break_dir(root: Path, file: str, old: str, new: str) -> Path:
    make_dir(root)
    path = root / file
    text = path.read_text()
    assert old in text, f"test table: {old!r} not in {file}"
    path.write_text(text.replace(old, new, 1))
    return root


def test_good_directory_loads(tmp_path):
    assert check_directory(make_dir(tmp_path)) == []
    policy = load_policy(tmp_path)
    assert set(policy.groups) == {"desktop", "mobile"} and set(policy.services) == {"chat"}


@pytest.mark.parametrize("case,file,old,new,line,words", BROKEN, ids=[b[0] for b in BROKEN])
def test_one_precise_problem(tmp_path, case, file, old, new, line, words):
    root = break_dir(tmp_path / "bl", file, old, new)
    problems = [p for p in check_directory(root) if p.severity == "error"]
    assert len(problems) == 1, "\n".join(map(str, problems))
    p = problems[0]
    assert p.path.endswith(file) and p.line == line, str(p)
    for word in words:
        assert word in p.message, str(p)
    with pytest.raises(PolicyError) as e:
        load_policy(root)
    assert [str(x) for x in e.value.problems] == [str(p)]


def test_every_problem_at_once(tmp_path):
    """One message per problem, all of them, not just the first."""
    policy = (POLICY.replace("10.1.0.0/16", "10.1.0.0/33").replace("block: [chat]", "block: [chat, mail]")
              .replace("subnets: [10.2.0.0/16]", "subnets: ['fd00:1::/48']")
              .replace("default_group: mobile\n", "default_group: mobile\ncolour: red\n"))
    chat = CHAT.replace("'file-[0-9]+", "'file-[0-9+").replace("name: chat.test,", "name: chat_.test.,")
    root = make_dir(tmp_path, policy, chat, {"broken.yaml": "description: [x\n"})
    problems = sorted((p.path.rsplit("/", 1)[1], p.line) for p in check_directory(root) if p.severity == "error")
    # the allow below the invalid domain is not reported a second time
    assert problems == [("broken.yaml", 2), ("chat.yaml", 5), ("chat.yaml", 7),
                        ("policy.yaml", 3), ("policy.yaml", 4), ("policy.yaml", 7), ("policy.yaml", 10)]


def test_missing_sections(tmp_path):
    root = make_dir(tmp_path, "block_ttl: 5\n")
    messages = [p.message for p in check_directory(root)]
    assert any("needs 'groups'" in m for m in messages)
    assert any("needs 'default_group'" in m for m in messages)
    assert any("needs 'allowed_clients'" in m for m in messages)


def test_not_a_directory(tmp_path):
    problems = check_directory(tmp_path / "nope")
    assert len(problems) == 1 and "not a directory" in problems[0].message
