"""exporters.capture: the kernel filter passes what the detectors need, for IPv4 and IPv6 alike,
and drops the bulk; `sinkhole sidecar --pcap` reads a capture and prints alerts and a summary."""
import json
import os
import subprocess
import sys

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.utils import wrpcap  # noqa: E402

from exporters.capture import BPF_FILTER, check_filter, read_pcap  # noqa: E402
from helpers import ROOT, have  # noqa: E402
from sidecar_frames import (CHAT_IP, DESKTOP, DESKTOP6, MOBILE, RESOLVER, WEB_IP, WEB_IP6,  # noqa: E402
                            client_hello_record, dns_answer, dns_query, syn, tcp_data, udp, write_policy)


def _both(build):
    return [build(DESKTOP, WEB_IP), build(DESKTOP6, WEB_IP6)]


def _ip(s, d):
    return IPv6(src=s, dst=d) if ":" in s else IP(src=s, dst=d)


PASS = {
    "syn": _both(lambda s, d: syn(s, d, 8080)),
    "dns query": _both(lambda s, d: udp(s, d, 53, dns_query("x.test"))),
    "dns answer": _both(lambda s, d: udp(d, s, 33000, dns_answer("x.test", ["192.0.2.1"]), sport=53)),
    "tls hello on any port": _both(lambda s, d: tcp_data(s, d, 5222, client_hello_record("x.test"))),
    "later hello segment to 443": _both(lambda s, d: tcp_data(s, d, 443, b"\x99" * 300)),
    "http request": _both(lambda s, d: tcp_data(s, d, 80, b"GET /d?dn=x HTTP/1.1\r\n\r\n")),
    "quic initial": _both(lambda s, d: udp(s, d, 443, b"\xc3\x00\x00\x00\x01" + bytes(60))),
    "udp 853": _both(lambda s, d: udp(s, d, 853, b"\x40" + bytes(20))),
}
DROP = {
    "pure ack to 443": _both(lambda s, d: bytes(Ether() / _ip(s, d) / TCP(sport=4000, dport=443, flags="A"))),
    "server data": _both(lambda s, d: tcp_data(d, s, 41000, b"\x17\x03\x03" + bytes(1200), sport=443)),
    "other tcp data": _both(lambda s, d: tcp_data(s, d, 22, b"SSH-2.0-x\r\n")),
    "quic short header": _both(lambda s, d: udp(s, d, 443, b"\x40" + bytes(60))),
    "quic from the server": _both(lambda s, d: udp(d, s, 50000, b"\xc3" + bytes(60), sport=443)),
    "ntp": _both(lambda s, d: bytes(Ether() / _ip(s, d) / UDP(sport=123, dport=123) / bytes(48))),
}


def test_filter_compiles():
    assert 50 < check_filter() < 400


@pytest.mark.skipif(not have("tcpdump"), reason="needs tcpdump (apt-get install tcpdump) to run the filter")
@pytest.mark.parametrize("table, passes", [(PASS, True), (DROP, False)])
def test_filter_passes_what_detectors_need_for_ipv4_and_ipv6(tmp_path, table, passes):
    for name, frames in table.items():
        path = tmp_path / "in.pcap"
        wrpcap(str(path), [Ether(f) for f in frames])
        out = subprocess.run(["tcpdump", "-nn", "-r", str(path), BPF_FILTER], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        seen = len(out.stdout.splitlines())
        assert seen == (len(frames) if passes else 0), f"{name}: {seen} of {len(frames)} passed\n{out.stdout}"


def test_pcap_reader_gives_time_linktype_and_bytes(tmp_path):
    frames = [syn(DESKTOP, WEB_IP, 443), syn(DESKTOP6, WEB_IP6, 443)]
    path = tmp_path / "x.pcap"
    wrpcap(str(path), [Ether(f) for f in frames])
    got = list(read_pcap(str(path)))
    assert [(lt, f) for _, lt, f in got] == [(1, f) for f in frames]


def test_cli_reads_a_pcap(tmp_path):
    write_policy(tmp_path / "blocklists")
    (tmp_path / "sinkhole.yaml").write_text(yaml.safe_dump({
        "listen": [f"{RESOLVER}:53"], "upstreams": ["192.0.2.1"], "blocklists": "blocklists"}))
    packets = [udp(RESOLVER, DESKTOP, 50000, dns_answer("www.example.test", [WEB_IP]), sport=53),
               syn(DESKTOP, WEB_IP, 443), syn(DESKTOP, CHAT_IP, 5222), syn(DESKTOP, CHAT_IP, 5222, sport=40001),
               syn(MOBILE, CHAT_IP, 5222), udp(DESKTOP, "192.0.2.1", 53, dns_query("x.test")), b"\x00" * 20]
    wrpcap(str(tmp_path / "x.pcap"), [Ether(f) for f in packets])
    out = subprocess.run([sys.executable, "-m", "resolver", "sidecar", "-c", str(tmp_path / "sinkhole.yaml"),
                          "--pcap", str(tmp_path / "x.pcap"), "--learning", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["detector"], r["client"], r["destination"]) for r in rows] == [
        ("blocked-ip", DESKTOP, CHAT_IP), ("external-dns", DESKTOP, "192.0.2.1")]
    summary = {line.split()[0]: line.split()[1:] for line in out.stderr.splitlines() if line.split()}
    assert summary["blocked-ip"] == ["1", "1", "1"] and summary["external-dns"] == ["1", "0", "0"]
    assert "packets 7, unparsed 1" in out.stderr


def test_cli_refuses_a_bad_policy(tmp_path):
    (tmp_path / "blocklists").mkdir()
    (tmp_path / "blocklists" / "policy.yaml").write_text("groups: 3\n")
    (tmp_path / "sinkhole.yaml").write_text(yaml.safe_dump({"upstreams": ["192.0.2.1"], "blocklists": "blocklists"}))
    out = subprocess.run([sys.executable, "-m", "resolver", "sidecar", "-c", str(tmp_path / "sinkhole.yaml"),
                          "--pcap", "/nonexistent"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "policy.yaml" in out.stderr and "not starting" in out.stderr
