"""Bad input against the running server: every malformed packet gets FORMERR, NOTIMP or REFUSED,
or no answer when none is safe; the server keeps answering. Hostile blocklist files give a clear
`path:line` error from `sinkhole check`, never a crash or a hang.

Each bad packet is followed on the same socket by a good probe query: loopback keeps the order and
the server reads one socket in order, so any answer to the bad packet arrives before the probe's.
No sleeps, no "wait and see if nothing comes".
"""
from __future__ import annotations

import random
import socket
import struct
import subprocess

import pytest
import yaml

from helpers import SINKHOLE, ROOT, Dnsmasq, Sinkhole, TEST_POLICY, TEST_SERVICES, ask, have, write_blocklists

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not have("dnsmasq"), reason="needs dnsmasq (Debian dnsmasq-base)")]

FORMERR, NOTIMP, REFUSED, BADVERS = 1, 4, 5, 16
PROBE_ID = 0xBEEF


def header(qid=0x1234, flags=0x0100, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(l)]) + l for l in labels) + b"\x00"


def question(qname=name(b"www", b"example", b"test"), qtype=255, qclass=1) -> bytes:
    """ANY by default: were a bad packet taken for a query, its answer (local, RFC 8482) would
    still come before the probe's."""
    return qname + struct.pack("!HH", qtype, qclass)


def opt(udp=1232, ext_rcode=0, version=0, flags=0, rdata=b"", owner=b"\x00") -> bytes:
    return owner + struct.pack("!HHBBHH", 41, udp, ext_rcode, version, flags, len(rdata)) + rdata


PROBE = header(PROBE_ID) + question(name(b"probe", b"test"), qtype=255)   # ANY: answered locally

# (id, packet, expected rcode or None for "no answer")
CASES = [
    ("empty", b"", None),
    ("truncated-header", header()[:7], None),
    ("header-only", header(qd=0), FORMERR),
    ("qr-set", header(flags=0x8100) + question(), None),
    ("qr-set-formerr-bait", header(flags=0x8100, qd=5) + b"\xff", None),
    ("qdcount-0", header(qd=0) + question(), FORMERR),
    ("qdcount-2", header(qd=2) + question() + question(), FORMERR),
    ("qdcount-65535", header(qd=0xFFFF) + question(), FORMERR),
    ("question-cut", header() + question()[:9], FORMERR),
    ("no-type-class", header() + name(b"www", b"example", b"test"), FORMERR),
    ("label-past-end", header() + b"\x3fabc", FORMERR),
    ("label-64", header() + question(name(b"a" * 64, b"test")), FORMERR),
    ("name-256", header() + question(name(*[b"a" * 63] * 4, b"b" * 3)), FORMERR),
    ("pointer-in-question", header() + b"\x03www\xc0\x0c" + struct.pack("!HH", 1, 1), FORMERR),
    ("pointer-loop-in-additional", header(ar=1) + question() + b"\xc0\x21" + b"\x00" * 10, FORMERR),
    ("pointer-forward-in-additional", header(ar=1) + question() + b"\xc0\x30" + b"\x00" * 40, FORMERR),
    ("answer-records-in-query", header(an=1) + question() + b"\x00" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x01" * 4, FORMERR),
    ("opcode-iquery", header(flags=0x0900) + question(), NOTIMP),
    ("opcode-status", header(flags=0x1100) + question(), NOTIMP),
    ("opcode-update", header(flags=0x2900) + question(), NOTIMP),
    ("opcode-15", header(flags=0x7900) + question(), NOTIMP),
    ("class-chaos", header() + question(name(b"version", b"bind"), qtype=16, qclass=3), REFUSED),
    ("class-none", header() + question(qclass=254), REFUSED),
    ("class-any", header() + question(qclass=255), REFUSED),
    ("axfr-over-udp", header() + question(qtype=252), REFUSED),
    ("ixfr", header() + question(qtype=251), REFUSED),
    ("edns-rdlen-past-end", header(ar=1) + question() + opt()[:-2] + b"\x00\x20", FORMERR),
    ("edns-two-opts", header(ar=2) + question() + opt() + opt(), FORMERR),
    ("edns-not-root", header(ar=1) + question() + opt(owner=b"\x01x\x00"), FORMERR),
    ("edns-version-1", header(ar=1) + question() + opt(version=1), BADVERS),
    ("edns-loop-owner", header(ar=1) + question() + b"\xc0\x0c" + opt()[1:], FORMERR),
    ("edns-option-past-end", header(ar=1) + question() + opt(rdata=struct.pack("!HH", 10, 40) + b"x"), FORMERR),
    ("edns-bad-ecs", header(ar=1) + question() + opt(rdata=struct.pack("!HHHBB", 8, 5, 1, 33, 0) + b"\x01"), FORMERR),
    ("arcount-huge", header(ar=0xFFFF) + question() + opt(), FORMERR),
    ("additional-cut", header(ar=1) + question() + opt()[:5], FORMERR),
]


def rcode_of(reply: bytes) -> int:
    flags = struct.unpack_from("!H", reply, 2)[0]
    rcode = flags & 0xF
    qd, an, ns, ar = struct.unpack_from("!HHHH", reply, 4)
    if ar and reply.endswith(b""):                      # extended rcode from an OPT record at the end
        tail = reply[-11:]
        if len(tail) == 11 and tail[0] == 0 and struct.unpack_from("!H", tail, 1)[0] == 41:
            rcode |= tail[5] << 4
    return rcode


def exchange(address, packet: bytes, source: str = "127.0.2.9") -> list[bytes]:
    """Send `packet`, then the probe; return every reply that came before the probe's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(3)
        s.sendto(packet, address)
        s.sendto(PROBE, address)
        before = []
        for _ in range(10):
            reply, _ = s.recvfrom(65535)
            if reply[:2] == struct.pack("!H", PROBE_ID) and reply[2] & 0x80 and len(reply) > 12:
                return before
            before.append(reply)
        raise AssertionError(f"no probe answer; got {before!r}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("malformed")
    policy = dict(TEST_POLICY, allowed_clients=["127.0.1.0/24", "127.0.2.0/24", "::1/128"])
    lists = write_blocklists(tmp / "blocklists", policy, TEST_SERVICES)
    with Dnsmasq(["--host-record=www.example.test,192.0.2.10"]) as upstream, \
         Sinkhole(tmp, {"upstreams": [upstream.address], "blocklists": str(lists)}) as sinkhole:
        yield sinkhole
        assert sinkhole.proc.poll() is None, "the server died"
        assert not any("Traceback" in l for l in sinkhole.lines), "\n".join(sinkhole.lines)


@pytest.mark.parametrize("packet, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_packet(server, packet, expected):
    replies = exchange((server.host, server.port), packet)
    if expected is None:
        assert replies == [], "answered a packet that must be dropped"
        return
    assert len(replies) == 1
    reply = replies[0]
    assert reply[:2] == packet[:2], "the answer does not echo the ID"
    assert reply[2] & 0x80, "QR not set on our answer"
    assert rcode_of(reply) == expected
    assert len(reply) <= max(len(packet), 12) + 11, "an error answer bigger than the query"


def test_any_gets_minimal_answer(server):
    reply = ask(server, "www.example.test", "ANY", source="127.0.2.9", use_edns=True, payload=4096)
    assert reply.rcode() == 0
    assert [rr.rdtype for rr in reply.answer] == [13]            # HINFO "RFC8482"
    assert len(reply.to_wire()) < 100


def test_outside_allowed_clients(server):
    """A valid query from outside allowed_clients is REFUSED; a malformed one is dropped."""
    refused = exchange((server.host, server.port), header() + question(), source="127.0.0.77")
    assert [rcode_of(r) for r in refused] == [REFUSED]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.77", 0))
        s.settimeout(3)
        s.sendto(header(qd=0), (server.host, server.port))        # FORMERR bait: dropped
        s.sendto(header(0x4321) + question(), (server.host, server.port))
        reply, _ = s.recvfrom(65535)
    assert reply[:2] == b"\x43\x21" and rcode_of(reply) == REFUSED


def test_random_garbage_stream_then_still_answers(server):
    rng = random.Random(8)
    good = header(0x5555) + question()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.2.10", 0))
        for i in range(3000):
            packet = bytearray(good if i % 2 else rng.randbytes(rng.randint(0, 200)))
            for _ in range(rng.randint(0, 4)):
                if packet:
                    packet[rng.randrange(len(packet))] = rng.randrange(256)
            s.sendto(bytes(packet), (server.host, server.port))
    answer = ask(server, "www.example.test", source="127.0.2.11")
    assert [str(r) for rr in answer.answer for r in rr] == ["192.0.2.10"]


def tcp_exchange(address, payload: bytes) -> list[bytes]:
    """Write raw bytes on one TCP connection, then the probe; replies until the probe's."""
    with socket.create_connection(address, timeout=5, source_address=("127.0.2.9", 0)) as s:
        s.sendall(payload + struct.pack("!H", len(PROBE)) + PROBE)
        replies = []
        buf = b""
        for _ in range(20):
            while len(buf) < 2 or len(buf) < 2 + struct.unpack_from("!H", buf)[0]:
                chunk = s.recv(65535)
                if not chunk:
                    return replies
                buf += chunk
            size = struct.unpack_from("!H", buf)[0]
            message, buf = buf[2:2 + size], buf[2 + size:]
            if message[:2] == struct.pack("!H", PROBE_ID):
                return replies
            replies.append(message)
    raise AssertionError("no probe answer over TCP")


def test_tcp_malformed_messages(server):
    bad = [header(qd=0), header(flags=0x8100) + question(), header(flags=0x2900) + question(), b"\x01"]
    payload = b"".join(struct.pack("!H", len(m)) + m for m in bad) + struct.pack("!H", 0)
    replies = tcp_exchange((server.host, server.port), payload)
    # FORMERR, (QR set: nothing), NOTIMP, (1 byte: nothing), (empty: nothing); answers may come in any order
    assert sorted(rcode_of(r) for r in replies) == [FORMERR, NOTIMP]


# -- hostile blocklist files -------------------------------------------------------------------

def _check(directory) -> subprocess.CompletedProcess:
    return subprocess.run(SINKHOLE + ["check", str(directory)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


HOSTILE = {
    "deep-nesting": ("policy.yaml", b"groups: " + b"[" * 5000 + b"]" * 5000 + b"\n", "policy.yaml:"),
    "deep-mappings": ("policy.yaml", b"groups:\n" + b"".join(b"  " * i + b"k%d:\n" % i for i in range(1, 200)), "policy.yaml:"),
    "non-utf8": ("policy.yaml", b"groups:\n  desktop:\n    subnets: [\xff\xfe]\n", "policy.yaml:3: not valid UTF-8"),
    "billion-laughs": ("services/chat.yaml",
                       b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
                           b"%s: &%s [*%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s]\n" % ((bytes([c]),) * 2 + (bytes([c - 1]),) * 9)
                           for c in range(ord("b"), ord("j"))) + b"domains: *i\n", "services/chat.yaml:1: expands to more than"),
    "wrong-types": ("policy.yaml", yaml.safe_dump({"groups": [1, 2], "default_group": [], "allowed_clients": "all",
                                                   "exemptions": {"x": 1}, "block_ttl": "ten"}).encode(), "policy.yaml:"),
    "python-tag": ("policy.yaml", b"groups: !!python/object/apply:os.system ['true']\n", "policy.yaml:1: invalid YAML"),
    "tab-and-junk": ("services/chat.yaml", b"domains:\n\t- x\n", "services/chat.yaml:"),
}


@pytest.mark.parametrize("where, content, expected", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_blocklist_file(tmp_path, where, content, expected):
    lists = write_blocklists(tmp_path / "blocklists", TEST_POLICY, TEST_SERVICES)
    (lists / where).write_bytes(content)
    result = _check(lists)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert expected in result.stdout + result.stderr, result.stdout + result.stderr


def test_oversized_blocklist_file(tmp_path):
    lists = write_blocklists(tmp_path / "blocklists", TEST_POLICY, TEST_SERVICES)
    with open(lists / "services" / "chat.yaml", "r+b") as f:
        f.truncate(65 * 1024 * 1024)                       # sparse: no real disk used
    result = _check(lists)
    assert result.returncode == 1
    assert "services/chat.yaml:1: file is" in result.stdout, result.stdout + result.stderr


def test_running_server_keeps_policy_after_hostile_reload(tmp_path):
    lists = write_blocklists(tmp_path / "blocklists", TEST_POLICY, TEST_SERVICES)
    with Dnsmasq(["--host-record=www.example.test,192.0.2.10"]) as upstream, \
         Sinkhole(tmp_path, {"upstreams": [upstream.address], "blocklists": str(lists)}) as server:
        (lists / "policy.yaml").write_bytes(b"groups: " + b"[" * 5000 + b"]" * 5000 + b"\n")
        server.proc.send_signal(1)
        server.wait_for_log(lambda: server.count("reload rejected") >= 1, 30, "the reload to be rejected")
        assert ask(server, "www.chat.test", source="127.0.1.5").rcode() == 3      # still blocked
        assert server.proc.poll() is None
