"""resolver/policy.py: which group a client is in, which rule decides a name, what the decision is.

Policies are written as files and read by the real loader, so the tables test what a policy
author writes.
"""
from __future__ import annotations

import pytest

from helpers import write_blocklists
from resolver.loader import load_policy
from resolver.names import normalize
from resolver.policy import decide

NOW = 1_800_000_000.0

SERVICES = {
    "chat": {"description": "chat", "sources": {"t": "test"},
             "domains": [{"name": "chat.test", "source": "t"}, {"name": "chat-cdn.test", "source": "t"}],
             "hosts": [{"name": "exact.other.test", "source": "t"}],
             "patterns": [{"pattern": r"file-[0-9a-z]+\.files\.test", "source": "t"}],
             "allow": [{"name": "help.chat.test", "source": "t"}]},
    "video": {"description": "video", "sources": {"t": "test"},
              "domains": [{"name": "video.test", "source": "t"}, {"name": "help.chat.test", "source": "t"}]},
    "encrypted-dns": {"description": "doh", "sources": {"t": "test"},
                      "domains": [{"name": "doh.test", "source": "t"}],
                      "hosts": [{"name": "use-application-dns.net", "source": "t"}]},
}

POLICY = {
    "groups": {
        "wide": {"subnets": ["10.0.0.0/8", "fd00::/8"], "block": ["chat"], "response": "nodata"},
        "office": {"subnets": ["10.1.0.0/16", "fd00:1::/48"], "block": ["chat", "encrypted-dns"],
                   "response": "nxdomain"},
        "lab": {"subnets": ["10.1.2.0/24", "10.1.2.128/25", "fd00:1:0:2::/64"], "block": ["video"],
                "response": "sinkhole", "sinkhole": ["192.0.2.53", "2001:db8::53"], "block_ttl": 42},
        "host": {"subnets": ["10.1.2.200/32"], "block": ["chat", "video"], "response": "null"},
        "guest": {"subnets": ["192.168.0.0/16"], "block": [], "response": "refused"},
    },
    "default_group": "guest",
    "allowed_clients": ["10.0.0.0/8", "192.168.0.0/16", "172.16.0.0/12", "fd00::/8"],
    "block_ttl": 15,
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return load_policy(write_blocklists(tmp_path_factory.mktemp("bl"), POLICY, SERVICES))


# -- group selection: longest prefix wins ------------------------------------------------------

@pytest.mark.parametrize("client,group", [
    ("10.9.9.9", "wide"),
    ("10.1.0.1", "office"),
    ("10.1.3.255", "office"),
    ("10.1.2.1", "lab"),
    ("10.1.2.129", "lab"),             # /25 inside the /24, same group
    ("10.1.2.200", "host"),            # /32 beats /25, /24, /16, /8
    ("10.1.2.201", "lab"),
    ("192.168.7.7", "guest"),
    ("172.16.0.1", "guest"),           # allowed, in no group's subnets: default_group
    ("fd00:9::1", "wide"),
    ("fd00:1:0:5::1", "office"),
    ("fd00:1:0:2::99", "lab"),
    ("::ffff:10.1.2.200", "host"),     # IPv4-mapped IPv6 is the IPv4 client
    ("fe80::1%eth0", None),            # scope stripped, not allowed
    ("8.8.8.8", None),                 # outside allowed_clients
    ("11.0.0.1", None),
    ("2001:db8::1", None),
])
def test_group_selection(policy, client, group):
    g, _ = policy.classify(client)
    assert (g.name if g else None) == group
    d = decide(policy, client, "nothing.test", NOW)
    assert d.action == ("refuse" if group is None else "forward")
    assert d.group == group


# -- name matching -----------------------------------------------------------------------------

OFFICE = "10.1.0.1"


@pytest.mark.parametrize("qname,service,kind", [
    ("chat.test", "chat", "domain"),                # the domain itself
    ("www.chat.test", "chat", "domain"),            # and everything below it
    ("a.b.c.chat.test", "chat", "domain"),
    ("chat-cdn.test", "chat", "domain"),
    ("xchat.test", None, None),                     # a suffix match is by whole labels
    ("chat.test.evil", None, None),
    ("test", None, None),
    ("exact.other.test", "chat", "host"),           # hosts: exact only
    ("www.exact.other.test", None, None),
    ("other.test", None, None),
    ("file-abc123.files.test", "chat", "pattern"),  # patterns: fullmatch
    ("file-.files.test", None, None),
    ("xfile-abc.files.test", None, None),
    ("file-abc.files.test.evil", None, None),
    ("a.file-abc.files.test", None, None),
    ("help.chat.test", None, None),                 # allow carves out of chat's own domains
    ("kb.help.chat.test", None, None),              # ...and everything below it
    ("helpx.chat.test", "chat", "domain"),
    ("doh.test", "encrypted-dns", "domain"),
    ("video.test", None, None),                     # office does not block video
])
def test_matching(policy, qname, service, kind):
    d = decide(policy, OFFICE, qname, NOW)
    assert d.service == service, d.explain()
    assert d.action == ("block" if service else "forward")
    assert (d.rule.kind if d.rule else None) == kind


@pytest.mark.parametrize("written", ["WWW.Chat.TEST", "www.chat.test.", "Www.CHAT.test.", "EXACT.other.TEST.",
                                     "FILE-ABC.files.test."])
def test_case_and_trailing_dot_do_not_matter(policy, written):
    assert decide(policy, OFFICE, normalize(written), NOW).action == "block"


@pytest.mark.parametrize("written", ["HELP.chat.test.", "XCHAT.test."])
def test_case_and_trailing_dot_do_not_block_more(policy, written):
    assert decide(policy, OFFICE, normalize(written), NOW).action == "forward"


def test_allow_carves_only_its_own_service(policy):
    """`host` 10.1.2.200 blocks chat and video; video lists help.chat.test, which chat allows."""
    d = decide(policy, "10.1.2.200", "kb.help.chat.test", NOW)
    assert (d.action, d.service) == ("block", "video")
    assert decide(policy, "10.1.2.200", "www.chat.test", NOW).service == "chat"


# -- responses and TTLs -----------------------------------------------------------------------

@pytest.mark.parametrize("client,qname,response,ttl", [
    ("10.9.9.9", "www.chat.test", "nodata", 15),     # policy block_ttl
    ("10.1.0.1", "www.chat.test", "nxdomain", 15),
    ("10.1.2.1", "video.test", "sinkhole", 42),      # group block_ttl
    ("10.1.2.200", "video.test", "null", 15),
])
def test_response_and_ttl_follow_the_group(policy, client, qname, response, ttl):
    d = decide(policy, client, qname, NOW)
    assert (d.action, d.response, d.ttl) == ("block", response, ttl)


def test_block_ttl_defaults_to_10_seconds(tmp_path):
    pol = dict(POLICY)
    del pol["block_ttl"]
    p = load_policy(write_blocklists(tmp_path, pol, SERVICES))
    assert decide(p, "10.1.0.1", "chat.test", NOW).ttl == 10
    assert decide(p, "10.1.2.1", "video.test", NOW).ttl == 42


# -- built-ins for groups that block encrypted-dns -----------------------------------------------

@pytest.mark.parametrize("qname,response", [
    ("use-application-dns.net", "nxdomain"),    # a catalog host for the same name does not change it
    ("mask.icloud.com", "nxdomain"),
    ("mask-h2.icloud.com", "nxdomain"),
    ("resolver.arpa", "nodata"),
    ("_dns.resolver.arpa", "nodata"),
    ("_dns.x.resolver.arpa", "nodata"),
])
def test_built_ins(policy, qname, response):
    d = decide(policy, OFFICE, qname, NOW)
    assert (d.action, d.service, d.response) == ("block", "encrypted-dns", response), d.explain()
    assert d.rule.kind in ("host", "domain") and d.rule.line == 0
    # whatever the group answers otherwise, the built-in keeps its own answer
    wide = decide(policy, "10.9.9.9", qname, NOW)       # does not block encrypted-dns
    assert wide.action == "forward"


@pytest.mark.parametrize("qname", ["x.mask.icloud.com", "icloud.com", "www.use-application-dns.net",
                                   "arpa", "xresolver.arpa"])
def test_built_ins_are_exact(policy, qname):
    assert decide(policy, OFFICE, qname, NOW).action == "forward"


def test_built_ins_keep_their_answer_in_a_null_group(tmp_path):
    pol = {"groups": {"g": {"subnets": ["10.0.0.0/8"], "block": ["encrypted-dns"], "response": "null"}},
           "default_group": "g", "allowed_clients": ["10.0.0.0/8"]}
    p = load_policy(write_blocklists(tmp_path, pol, {"encrypted-dns": SERVICES["encrypted-dns"]}))
    assert decide(p, "10.0.0.1", "mask.icloud.com", NOW).response == "nxdomain"
    assert decide(p, "10.0.0.1", "_dns.resolver.arpa", NOW).response == "nodata"
    assert decide(p, "10.0.0.1", "doh.test", NOW).response == "null"


# -- exemptions --------------------------------------------------------------------------------

def test_exemption_forwards_only_its_clients_services_and_time(tmp_path):
    pol = dict(POLICY, exemptions=[{
        "id": "EX-1", "clients": ["10.1.0.7"], "services": ["chat"], "approved_by": "Head",
        "reason": "ticket", "starts": "2027-01-15T08:00:00+00:00", "expires": "2027-01-15T09:00:00+00:00"}])
    p = load_policy(write_blocklists(tmp_path, pol, SERVICES))
    during = 1_800_000_000.0 + 0   # 2027-01-15T08:00:00Z
    assert decide(p, "10.1.0.7", "chat.test", during - 1).action == "block"
    d = decide(p, "10.1.0.7", "chat.test", during + 3590)
    assert (d.action, d.exemption.id, d.ttl) == ("forward", "EX-1", 10)   # TTL capped at the time left
    assert decide(p, "10.1.0.7", "chat.test", during + 100).ttl == 60      # exemption_ttl
    assert decide(p, "10.1.0.7", "doh.test", during + 100).action == "block"
    assert decide(p, "10.1.0.8", "chat.test", during + 100).action == "block"
    assert decide(p, "10.1.0.7", "chat.test", during + 3600).action == "block"
