"""The shortest end-to-end path: a desktop is blocked, a mobile client is forwarded."""
import pytest

from helpers import Dnsmasq, Sinkhole, ask, have

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not have("dnsmasq"), reason="needs dnsmasq (Debian dnsmasq-base)")]


def test_desktop_blocked_mobile_forwarded(tmp_path, blocklists):
    with Dnsmasq(["--host-record=www.chat.test,192.0.2.10"]) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(blocklists)}) as server:
        desktop = ask(server, "www.chat.test", source="127.0.1.5")
        mobile = ask(server, "www.chat.test", source="127.0.2.5")
    assert desktop.rcode() == 3 and not desktop.answer
    assert mobile.rcode() == 0
    assert [str(r) for rr in mobile.answer for r in rr] == ["192.0.2.10"]
