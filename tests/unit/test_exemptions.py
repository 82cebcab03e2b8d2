"""Exemptions: validation (each error and warning, --strict), decisions against the clock, and the
`sinkhole exemptions` / `sinkhole explain` output. Pure: no sockets, `now` passed in."""
from __future__ import annotations

import datetime
import json
import time

import pytest
import yaml

from helpers import TEST_POLICY, TEST_SERVICES, write_blocklists
from resolver import cli
from resolver.loader import check_directory, load_policy
from resolver.policy import decide

NOW = float(int(time.time()))     # the CLI reads the real clock; the tables are relative to it
DAY = 86400
DESKTOP = "127.0.1.5"


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat()


def entry(**fields) -> dict:
    base = {"id": "EX-1", "clients": [DESKTOP], "services": ["chat"], "approved_by": "Head of IT",
            "reason": "ticket CHG-1", "expires": iso(NOW + 7 * DAY)}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def directory(tmp_path, *exemptions, **settings):
    policy = dict(TEST_POLICY, exemptions=list(exemptions), **settings)
    return write_blocklists(tmp_path / "bl", policy, TEST_SERVICES)


def problems(tmp_path, *exemptions, **settings):
    found = check_directory(directory(tmp_path, *exemptions, **settings), NOW)
    return [(p.severity, p.message) for p in found if "exemption" in p.message]


def line_of(path, text: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not in {path}")


# -- validation --------------------------------------------------------------------------------

ERRORS = [
    ("no approver", [entry(approved_by=None)], "'approved_by' is required"),
    ("blank approver", [entry(approved_by="  ")], "'approved_by' is required"),
    ("no reason", [entry(reason=None)], "'reason' is required"),
    ("no expiry", [entry(expires=None)], "'expires' is required"),
    ("expiry without zone", [entry(expires="2026-06-08T12:00:00")], "has no time zone"),
    ("expiry not a time", [entry(expires="next tuesday")], "is not an ISO 8601 time"),
    ("unknown service", [entry(services=["chatt"])], "unknown service 'chatt'"),
    ("expiry before start", [entry(starts=iso(NOW + 2 * DAY), expires=iso(NOW + DAY))],
     "expires is not after starts"),
    ("expiry equal to start", [entry(starts=iso(NOW + DAY), expires=iso(NOW + DAY))],
     "expires is not after starts"),
    ("duplicate id", [entry(), entry(clients=["127.0.1.6"])], "duplicate id"),
    ("no id", [entry(id=None)], "exemption needs an 'id'"),
    ("bad client", [entry(clients=["127.0.1.999"])], "is not an IP address or CIDR"),
    ("no clients", [entry(clients=[])], "'clients' must be a non-empty list"),
    ("unknown key", [entry(approver="x")], "unknown key 'approver'"),
]


@pytest.mark.parametrize("label,exemptions,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_each_error(tmp_path, label, exemptions, message):
    found = check_directory(directory(tmp_path, *exemptions), NOW)
    errors = [p for p in found if p.severity == "error"]
    assert any(message in p.message for p in errors), found
    assert all(p.path.endswith("policy.yaml") and p.line > 0 for p in errors)
    assert cli.main(["check", str(tmp_path / "bl")]) == 1


def test_errors_name_the_line(tmp_path):
    path = directory(tmp_path, entry(), entry(id="EX-2", approved_by=None, services=["nope"])) / "policy.yaml"
    found = {p.message.split(": ", 1)[1]: p.line for p in check_directory(path.parent, NOW)}
    assert found["unknown service 'nope'"] == line_of(path, "- nope")
    assert found["'approved_by' is required (text)"] == line_of(path, "id: EX-2")


def test_a_valid_exemption_has_no_problems(tmp_path):
    assert problems(tmp_path, entry(starts=iso(NOW - DAY))) == []
    assert cli.main(["check", "--strict", str(tmp_path / "bl")]) == 0


WARNINGS = [
    ("expired", entry(expires=iso(NOW - 1)), "has expired"),
    ("longer than default 90 days", entry(expires=iso(NOW + 91 * DAY)), "lasts more than 90 days"),
    ("long from its start", entry(starts=iso(NOW + 10 * DAY), expires=iso(NOW + 101 * DAY)),
     "lasts more than 90 days"),
]


@pytest.mark.parametrize("label,ex,message", WARNINGS, ids=[w[0] for w in WARNINGS])
def test_each_warning_and_strict(tmp_path, capsys, label, ex, message):
    found = problems(tmp_path, ex)
    assert [s for s, _ in found] == ["warning"] and message in found[0][1]
    assert cli.main(["check", str(tmp_path / "bl")]) == 0          # a warning alone passes
    out = capsys.readouterr().out
    assert "warning: " in out and message in out
    assert cli.main(["check", "--strict", str(tmp_path / "bl")]) == 1
    out = capsys.readouterr().out
    assert message in out and "warning: " not in out              # printed as an error


def test_max_exemption_days_is_configurable(tmp_path):
    ex = entry(expires=iso(NOW + 20 * DAY))
    assert problems(tmp_path, ex) == []
    found = problems(tmp_path, ex, max_exemption_days=14)
    assert found == [("warning", found[0][1])] and "lasts more than 14 days" in found[0][1]
    assert problems(tmp_path, entry(expires=iso(NOW + 89 * DAY))) == []


# -- decisions against the clock ---------------------------------------------------------------

def test_window_to_the_second(tmp_path):
    starts, expires = NOW + 100, NOW + 400
    policy = load_policy(directory(tmp_path, entry(starts=iso(starts), expires=iso(expires))), NOW)
    table = [
        (starts - 1, "block", None),
        (starts - 0.001, "block", None),
        (starts, "forward", 60),
        (starts + 150, "forward", 60),
        (expires - 30.5, "forward", 30),          # never more than the time left
        (expires - 0.5, "forward", 0),
        (expires, "block", None),
        (expires + 1, "block", None),
    ]
    for now, action, ttl in table:
        d = decide(policy, DESKTOP, "www.chat.test", now)
        assert d.action == action, (now - NOW, d)
        if action == "forward":
            assert d.exemption.id == "EX-1" and d.ttl == ttl and d.service == "chat"
            assert d.ttl <= expires - now
        else:
            assert d.exemption is None and d.response == "nxdomain"


def test_exemption_is_narrow(tmp_path):
    both = entry(clients=["127.0.1.0/28"], expires=iso(NOW + DAY), services=["chat"])
    policy = load_policy(directory(tmp_path, both, exemption_ttl=20), NOW)
    assert decide(policy, "127.0.1.15", "www.chat.test", NOW).ttl == 20         # inside the CIDR
    assert decide(policy, "127.0.1.16", "www.chat.test", NOW).action == "block"  # outside it
    assert decide(policy, "127.0.1.5", "doh.test", NOW).action == "block"       # another service
    assert decide(policy, "127.0.1.5", "other.test", NOW).exemption is None     # nothing to exempt


# -- `sinkhole exemptions` and `sinkhole explain` ----------------------------------------------

def review_directory(tmp_path):
    now = datetime.datetime.now(datetime.timezone.utc).timestamp()
    return directory(tmp_path,
                     entry(id="EX-SOON", expires=iso(now + 3 * DAY)),
                     entry(id="EX-LATER", expires=iso(now + 30 * DAY), services=["chat", "encrypted-dns"]),
                     entry(id="EX-PENDING", starts=iso(now + DAY), expires=iso(now + 5 * DAY)),
                     entry(id="EX-OLD", starts=iso(now - 5 * DAY), expires=iso(now - DAY)))


def test_exemptions_json(tmp_path, capsys):
    bl = review_directory(tmp_path)
    assert cli.main(["exemptions", "--blocklists", str(bl), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["state"]) for r in rows] == [
        ("EX-OLD", "expired"), ("EX-SOON", "active"), ("EX-PENDING", "pending"), ("EX-LATER", "active")]
    soon = rows[1]
    assert soon["clients"] == [DESKTOP] and soon["services"] == ["chat"]
    assert soon["approved_by"] == "Head of IT" and soon["reason"] == "ticket CHG-1"
    assert 3 * DAY - 60 < soon["expires_in_seconds"] <= 3 * DAY
    assert soon["origin"].endswith("policy.yaml:" + str(line_of(bl / "policy.yaml", "id: EX-SOON")))
    assert rows[2]["starts"] is not None and rows[1]["starts"] is None

    assert cli.main(["exemptions", "--blocklists", str(bl), "--json", "--expiring-within", "7d"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["EX-SOON", "EX-PENDING"]
    assert cli.main(["exemptions", "--blocklists", str(bl), "--json", "--expiring-within", "60d"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["EX-SOON", "EX-PENDING", "EX-LATER"]
    assert cli.main(["exemptions", "--blocklists", str(bl), "--json", "--expiring-within", "1h"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_exemptions_table(tmp_path, capsys):
    bl = review_directory(tmp_path)
    assert cli.main(["exemptions", "--blocklists", str(bl), "--expiring-within", "7d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATE", "EXPIRES", "(UTC)"]
    assert [l.split()[:2] for l in lines[1:]] == [["EX-SOON", "active"], ["EX-PENDING", "pending"]]
    assert "2d" in lines[1].split() and "Head of IT" in lines[1] and "ticket CHG-1" in lines[1]
    assert cli.main(["exemptions", "--blocklists", str(bl), "--expiring-within", "1h"]) == 0
    assert capsys.readouterr().out.strip() == "no exemptions expiring in that window"


def test_expiring_within_rejects_bad_durations(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["exemptions", "--blocklists", str(review_directory(tmp_path)), "--expiring-within", "7 days"])
    assert "not a duration" in capsys.readouterr().err


def test_explain_names_the_exemption(tmp_path, capsys):
    bl = review_directory(tmp_path)
    assert cli.main(["explain", "--blocklists", str(bl), "--client", DESKTOP, "www.chat.test"]) == 0
    out = capsys.readouterr().out
    first = next(l for l in out.splitlines() if "www.chat.test" in l)
    assert "forward under exemption EX-SOON" in first and "approved by Head of IT" in first
    assert "until 20" in first
    assert "EX-PENDING" in out and "is not in force: starts" in out
    assert "EX-OLD" in out and "expired" in out
    assert cli.main(["explain", "--blocklists", str(bl), "--client", "127.0.1.99", "www.chat.test"]) == 0
    out = capsys.readouterr().out
    assert "block with nxdomain" in out and "EX-" not in out
