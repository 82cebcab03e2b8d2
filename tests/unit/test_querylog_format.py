"""The hand-built JSON line is exactly what json.dumps would write, for any field values."""
import datetime
import json

from hypothesis import given, settings, strategies as st

from resolver.core import Outcome
from resolver.querylog import QueryLog

text = st.one_of(st.none(), st.text(max_size=30), st.sampled_from(["desktop", "web.whatsapp.com",
                                                                    "blocklists/services/x.yaml:19", "::1"]))


@settings(max_examples=300, deadline=None)
@given(client=text, group=text, qname=text, service=text, rule=text, exemption=text,
       action=st.sampled_from(["blocked", "cached", "forwarded", "refused", "error", "stale", "local"]),
       qtype=st.integers(0, 65535), rcode=st.integers(0, 23),
       when=st.floats(0, 4e9, allow_nan=False), duration=st.floats(0, 10, allow_nan=False))
def test_line_is_valid_json_with_every_field(client, group, qname, service, rule, exemption, action,
                                             qtype, rcode, when, duration):
    o = Outcome(action, group, qname, qtype, rcode, service, rule, exemption, client)
    line = QueryLog("off").format(when, o, duration)
    got = json.loads(line)
    assert list(got) == ["time", "client", "group", "qname", "qtype", "decision", "service", "rule",
                         "exemption", "rcode", "duration_ms"]
    assert (got["client"], got["group"], got["qname"], got["service"], got["rule"], got["exemption"]) == \
        (client, group, qname, service, rule, exemption)
    assert got["decision"] == action
    assert got["duration_ms"] == round(duration * 1000, 3)
    stamp = datetime.datetime.fromisoformat(got["time"])
    assert abs(stamp.timestamp() - when) < 0.001 + 1e-6 * when / 1e6
    assert got["qtype"] and got["rcode"]


def test_a_batch_writes_the_lines_log_would(tmp_path):
    """write_many (the UDP batch: one time, one duration, tails of client + middle) writes byte
    for byte the lines log() writes for the same answers."""
    outcomes = [Outcome("blocked", "desktop", "web.whatsapp.com", 1, 3, "whatsapp", "s/w.yaml:4", None, "10.1.2.3"),
                Outcome("cached", "mobile", 'we"ird\\name\u00e9', 28, 0, None, None, "EX-1", "2001:db8::7"),
                Outcome("refused", None, "x.test", 65, 5, None, None, None, "192.0.2.9")]
    when, duration = 1_700_000_000.123456, 0.0000417
    one, many = QueryLog(str(tmp_path / "one.jsonl")), QueryLog(str(tmp_path / "many.jsonl"))
    for log in (one, many):
        log.start()
    with one.lock:
        for o in outcomes:
            one.log(when, o, duration)
    with many.lock:
        many.write_many(when, duration, [QueryLog.client(o.client) + QueryLog.middle(o) for o in outcomes])
        many.write_many(when, duration, [])
    for log in (one, many):
        assert log.flush()
        log.close()
    lines = (tmp_path / "one.jsonl").read_bytes()
    assert lines.count(b"\n") == 3 and [json.loads(l)["qname"] for l in lines.splitlines()] == \
        [o.qname for o in outcomes]
    assert (tmp_path / "many.jsonl").read_bytes() == lines


@settings(max_examples=200, deadline=None)
@given(times=st.lists(st.one_of(st.floats(1.7e9, 1.7e9 + 3, allow_nan=False),
                                st.sampled_from([1.7e9 + 0.5, 1.7e9 + 1.5, 1.7e9 + 1.5004, 1.7e9 + 2.9999])),
                      min_size=2, max_size=40))
def test_the_time_field_is_made_again_whenever_its_second_or_millisecond_changes(times):
    """One log's time field (kept per millisecond) is, call after call, what a fresh log writes
    for the same time: the same millisecond in another second, the next millisecond, going back."""
    log = QueryLog("off")
    o = Outcome("blocked", "desktop", "web.whatsapp.com", 1, 3, client="10.1.2.3")
    for when in times:
        assert log.format(when, o, 0.001) == QueryLog("off").format(when, o, 0.001)
