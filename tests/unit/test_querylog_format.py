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
