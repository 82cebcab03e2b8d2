"""RPZ and Unbound exports as text: triggers, actions per response, classes, what is left out."""
from datetime import datetime, timedelta, timezone

from helpers import TEST_POLICY, TEST_SERVICES, write_blocklists
from resolver.export import client_classes, rpz, unbound
from resolver.loader import load_policy

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def load(tmp_path, **group_changes):
    body = {**TEST_POLICY, "groups": {**TEST_POLICY["groups"],
                                      "desktop": {**TEST_POLICY["groups"]["desktop"], **group_changes}}}
    body["exemptions"] = [{"id": "EX-1", "clients": ["127.0.1.7"], "services": ["chat"], "approved_by": "h",
                           "reason": "r", "expires": (NOW + timedelta(days=1)).isoformat()}]
    return load_policy(write_blocklists(tmp_path / "bl", body, TEST_SERVICES), NOW.timestamp())


def records(text):
    return {tuple(l.split(None, 1)) for l in text.splitlines() if l and not l.startswith((";", "$", "@"))}


def test_triggers_follow_rule_kinds(tmp_path):
    policy = load(tmp_path)
    desktop = next(c for c in client_classes(policy, NOW.timestamp()) if c.name == "desktop")
    r = records(rpz.zone(policy, desktop, NOW.timestamp()))
    assert ("chat.test", "CNAME .") in r and ("*.chat.test", "CNAME .") in r
    assert ("help.chat.test", "CNAME rpz-passthru.") in r and ("*.help.chat.test", "CNAME rpz-passthru.") in r
    assert ("exact.other.test", "CNAME .") in r and not any(o == "*.exact.other.test" for o, _ in r)
    assert ("resolver.arpa", "CNAME *.") in r and ("mask.icloud.com", "CNAME .") in r


def test_exempted_class_passes_the_exempted_service(tmp_path):
    policy = load(tmp_path)
    classes = {c.name: c for c in client_classes(policy, NOW.timestamp())}
    assert classes["desktop-ex-1"].networks == ("127.0.1.7/32",)
    r = records(rpz.zone(policy, classes["desktop-ex-1"], NOW.timestamp()))
    assert ("chat.test", "CNAME rpz-passthru.") in r and ("doh.test", "CNAME .") in r
    later = (NOW + timedelta(days=2)).timestamp()
    assert "desktop-ex-1" not in {c.name for c in client_classes(policy, later)}


def test_actions_per_response(tmp_path):
    for response, expected in (("nodata", {"CNAME *."}), ("null", {"A 0.0.0.0", "AAAA ::"}),
                               ("sinkhole", {"A 192.0.2.99"}), ("refused", {"CNAME ."})):
        extra = {"sinkhole": ["192.0.2.99"]} if response == "sinkhole" else {}
        policy = load(tmp_path / response, response=response, **extra)
        desktop = next(c for c in client_classes(policy, NOW.timestamp()) if c.name == "desktop")
        text = rpz.zone(policy, desktop, NOW.timestamp())
        assert {a for o, a in records(text) if o == "chat.test"} == expected, response
        assert ("refused" in text.split("$ORIGIN")[0]) == (response == "refused")


def test_bind_views_and_patterns(tmp_path):
    files = rpz.export(load(tmp_path), NOW.timestamp(), "/etc/bind/sinkhole")
    views = files["named.conf.sinkhole-views"]
    assert 'view "desktop-ex-1"' in views and "127.0.1.7/32;" in views
    assert "match-clients { !127.0.1.0/24; !127.0.1.7/32; 127.0.0.0/8; ::1/128; 127.0.2.0/24; }" in views
    assert "match-clients { !127.0.1.7/32; 127.0.1.0/24; }" in views
    assert r"file-[0-9a-z]+\.files\.test" in files["desktop.rpz"]     # listed as not expressed


def test_unbound_config_tags_and_module(tmp_path):
    files = unbound.export(load(tmp_path), NOW.timestamp(), "/etc/unbound/sinkhole")
    conf = files[unbound.CONF]
    assert 'define-tag: "desktop mobile desktop-ex-1"' in conf
    assert 'access-control-tag: 127.0.1.7/32 "desktop-ex-1"' in conf
    assert 'tags: "desktop"' in conf and "mobile.rpz" not in files
    compile(files[unbound.MODULE], unbound.MODULE, "exec")
    assert "regenerate-at: 2026-11-02T12:00:00+00:00" in conf
