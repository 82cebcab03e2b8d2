"""The nftables export as text (pure), and `nft -c` on it when root (a real parser)."""
import shutil
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

from helpers import TEST_POLICY, TEST_SERVICES, is_root, write_blocklists
from resolver.export import client_classes, group_addresses, nftables
from resolver.loader import load_policy

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def policy_with(tmp_path, exemptions=(), **changes):
    body = {**TEST_POLICY, **changes, "exemptions": list(exemptions)}
    return load_policy(write_blocklists(tmp_path / "bl", body, TEST_SERVICES), NOW.timestamp())


def ex(id_, client, starts=None, expires=NOW + timedelta(hours=2)):
    out = {"id": id_, "clients": [client], "services": ["chat"], "approved_by": "h", "reason": "r",
           "expires": expires.isoformat()}
    if starts:
        out["starts"] = starts.isoformat()
    return out


def test_only_blocking_groups_get_rules(tmp_path):
    text = nftables.ruleset(policy_with(tmp_path), NOW.timestamp(), ("127.0.0.53",))
    assert "table inet sinkhole {" in text and text.count("delete table inet sinkhole") == 1
    assert "clients_desktop_v4" in text and "clients_mobile" not in text
    assert "198.51.100.0/24" in text
    assert 'th dport 853 counter drop' in text
    assert "ip daddr != @sanctioned_v4 counter drop" in text
    rules = [l for l in text.splitlines() if l.startswith("\t\tip")]
    assert rules and all(" counter " in r for r in rules)


def test_without_sanctioned_resolvers_dns_is_not_restricted(tmp_path):
    text = nftables.ruleset(policy_with(tmp_path), NOW.timestamp())
    assert "dport 53" not in text and "No sanctioned_resolvers" in text


def test_exemptions_time_out_at_expiry_and_only_in_force_ones(tmp_path):
    policy = policy_with(tmp_path, [
        ex("NOW", "127.0.1.7"),
        ex("LATER", "127.0.1.8", starts=NOW + timedelta(hours=1)),
        ex("GONE", "127.0.1.9", expires=NOW - timedelta(minutes=1)),
    ])
    text = nftables.ruleset(policy, NOW.timestamp())
    assert "127.0.1.7 . 198.51.100.0/24 timeout 7200s" in text
    assert "127.0.1.8" not in text and "127.0.1.9" not in text
    assert "regenerate-at: 2026-11-01T13:00:00+00:00" in text     # LATER starts then


def test_group_addresses_follow_longest_prefix(tmp_path):
    policy = policy_with(tmp_path, groups={
        "desktop": {"subnets": ["127.0.0.0/16"], "block": ["chat"]},
        "mobile": {"subnets": ["127.0.2.0/24"], "block": []}}, default_group="desktop")
    sets = group_addresses(policy)
    assert "127.0.2.5" not in sets["desktop"] and "127.0.2.5" in sets["mobile"]
    assert "127.0.1.5" in sets["desktop"] and "127.5.0.1" in sets["desktop"]   # default group: rest of allowed
    assert "10.0.0.1" not in sets["desktop"]                                    # outside allowed_clients
    text = nftables.ruleset(policy, NOW.timestamp())
    assert "127.0.0.0/23" in text and "127.0.3.0-127.255.255.255" in text


def test_exemption_classes_split_by_group(tmp_path):
    policy = policy_with(tmp_path, [ex("WIDE", "127.0.0.0/8")])
    classes = {c.name: c for c in client_classes(policy, NOW.timestamp())}
    assert "desktop-wide" in classes and "mobile-wide" in classes
    assert "127.0.1.0/24" in classes["desktop-wide"].networks
    assert "127.0.1.0/24" not in classes["desktop"].networks


def test_enforce_add_rejects_bad_input():
    with pytest.raises(ValueError):
        nftables.enforce_add("10.1.0.5", "2001:db8::1", 30)
    with pytest.raises(ValueError):
        nftables.enforce_add("not-an-ip", "192.0.2.1", 30)


@pytest.mark.skipif(not (is_root() and shutil.which("nft")), reason="nft -c needs root and nftables")
def test_nft_accepts_the_shipped_policy():
    policy = load_policy("blocklists", time.time())
    text = nftables.ruleset(policy, time.time(), ("10.0.0.53", "fd00::53"))
    nftables.check(text)
    with pytest.raises(RuntimeError):
        nftables.check(text.replace("counter drop", "counter dorp", 1))


@pytest.mark.skipif(not (is_root() and shutil.which("nft")), reason="nft -c needs root and nftables")
def test_cli_prints_a_ruleset_nft_accepts(tmp_path):
    import sys
    bl = write_blocklists(tmp_path / "bl", TEST_POLICY, TEST_SERVICES)
    out = subprocess.run([sys.executable, "-m", "resolver", "export", "nftables", "--blocklists", str(bl),
                          "--sanctioned", "127.0.0.53"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    nftables.check(out.stdout)
