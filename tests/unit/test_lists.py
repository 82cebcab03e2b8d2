"""Plain-text lists (`domain_lists`, `host_lists`): big lists without YAML, checked as strictly
as YAML entries, every problem with the list file's own line."""
import time

import pytest
import yaml

from resolver.loader import PolicyError, check_directory, load_policy
from resolver.policy import decide

POLICY = {"groups": {"desktop": {"subnets": ["10.1.0.0/16"], "block": ["big"]},
                     "mobile": {"subnets": ["10.2.0.0/16"], "block": []}},
          "default_group": "mobile", "allowed_clients": ["10.0.0.0/8"]}


def make(tmp_path, service: dict, files: dict[str, str]):
    root = tmp_path / "bl"
    (root / "services").mkdir(parents=True)
    (root / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    (root / "services" / "big.yaml").write_text(yaml.safe_dump(
        {"description": "a big list", "sources": {"pub": "a public list, 2026-11"}, **service}))
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_domains_and_hosts_from_text_files(tmp_path):
    root = make(tmp_path, {"domain_lists": [{"file": "../lists/ads.txt", "source": "pub"}],
                           "host_lists": [{"file": "hosts.txt", "source": "pub"}],
                           "allow": [{"name": "ok.ads.test", "source": "pub"}]},
                {"lists/ads.txt": "# ad servers\nads.test\n\ntracker.test   # inline comment\n",
                 "services/hosts.txt": "exact.host.test\n"})
    policy = load_policy(root, time.time())
    cases = {"ads.test": "block", "x.ads.test": "block", "tracker.test": "block", "ok.ads.test": "forward",
             "exact.host.test": "block", "sub.exact.host.test": "forward", "other.test": "forward"}
    for name, action in cases.items():
        assert decide(policy, "10.1.0.5", name, 0).action == action, name
        assert decide(policy, "10.2.0.5", name, 0).action == "forward", name
    rule = decide(policy, "10.1.0.5", "tracker.test", 0).rule
    assert rule.origin.endswith("lists/ads.txt:4") and rule.kind == "domain"
    assert check_directory(root) == []


def test_every_bad_line_is_reported_with_its_own_line(tmp_path):
    root = make(tmp_path, {"domain_lists": [{"file": "l.txt", "source": "pub"}]},
                {"services/l.txt": "good.test\nBad.Test\nspace in.test\ngood.test\ntrailing.test.\n"})
    with pytest.raises(PolicyError) as e:
        load_policy(root)
    got = [(p.path.rsplit("/", 1)[-1], p.line) for p in e.value.problems]
    assert got == [("l.txt", 2), ("l.txt", 3), ("l.txt", 4), ("l.txt", 5)]
    assert "twice" in e.value.problems[2].message


@pytest.mark.parametrize("entry, files, message", [
    ({"file": "missing.txt", "source": "pub"}, {}, "cannot read list"),
    ({"file": "../../outside.txt", "source": "pub"}, {"../outside.txt": "x.test\n"}, "outside the blocklists"),
    ({"file": "l.txt", "source": "nope"}, {"services/l.txt": "x.test\n"}, "not listed under 'sources'"),
    ({"source": "pub"}, {}, "needs a 'file'"),
])
def test_bad_list_entries(tmp_path, entry, files, message):
    root = make(tmp_path, {"domain_lists": [entry]}, files)
    problems = check_directory(root)
    assert any(message in p.message and p.severity == "error" for p in problems), problems


def test_non_utf8_list(tmp_path):
    root = make(tmp_path, {"domain_lists": [{"file": "l.txt", "source": "pub"}]}, {})
    (root / "services" / "l.txt").write_bytes(b"ok.test\n\xff\xfe.test\n")
    problems = check_directory(root)
    assert [(p.line, p.message) for p in problems] == [(2, "not valid UTF-8")]


def test_list_names_meet_yaml_rules_and_built_ins(tmp_path):
    """A listed name that also has YAML rules (another service, an allow, a built-in) behaves as
    if every rule were written in YAML; the built-in answer still wins."""
    root = tmp_path / "bl"
    (root / "services").mkdir(parents=True)
    policy = {"groups": {"desktop": {"subnets": ["10.1.0.0/16"], "block": ["big", "encrypted-dns"],
                                     "response": "null"}},
              "default_group": "desktop", "allowed_clients": ["10.0.0.0/8"]}
    (root / "policy.yaml").write_text(yaml.safe_dump(policy))
    (root / "services" / "big.yaml").write_text(yaml.safe_dump(
        {"description": "d", "sources": {"p": "p"}, "domain_lists": [{"file": "big.txt", "source": "p"}],
         "allow": [{"name": "ok.both.test", "source": "p"}]}))
    (root / "services" / "big.txt").write_text("both.test\nuse-application-dns.net\n")
    (root / "services" / "encrypted-dns.yaml").write_text(yaml.safe_dump(
        {"description": "d", "sources": {"p": "p"}, "domains": [{"name": "both.test", "source": "p"}],
         "domain_lists": [{"file": "doh.txt", "source": "p"}]}))
    (root / "services" / "doh.txt").write_text("doh.example.test\n")
    policy = load_policy(root)
    canary = decide(policy, "10.1.0.5", "use-application-dns.net", 0)
    assert canary.response == "nxdomain" and canary.rule.path.startswith("built-in")   # not the group's null
    assert {r.service for r in policy.rules_at("both.test")} == {"big", "encrypted-dns"}
    carved = decide(policy, "10.1.0.5", "ok.both.test", 0)
    assert (carved.action, carved.service) == ("block", "encrypted-dns")        # allow carves only "big"
    assert decide(policy, "10.1.0.5", "x.doh.example.test", 0).rule.origin.endswith("doh.txt:1")
    assert policy.services["big"].entries() == 3 and policy.services["encrypted-dns"].entries() == 2
