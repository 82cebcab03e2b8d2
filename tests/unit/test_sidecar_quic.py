"""exporters.quic: RFC 9001 Appendix A vectors, and ClientHellos split over packets and frames."""
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from exporters import quic  # noqa: E402
from rfc9001_vectors import (CLIENT_FRAMES, CLIENT_HP, CLIENT_INITIAL_SECRET, CLIENT_IV,  # noqa: E402
                             CLIENT_KEY, CLIENT_PN, CLIENT_PROTECTED, DCID)
from sidecar_frames import hello_message  # noqa: E402


def test_rfc9001_a1_keys():
    keys = quic.client_keys(DCID)
    assert (keys.key, keys.iv, keys.hp) == (CLIENT_KEY, CLIENT_IV, CLIENT_HP)
    # the client secret itself, through the same HKDF-Expand-Label
    assert quic._expand_label(quic.initial_secret(DCID), b"client in", 32) == CLIENT_INITIAL_SECRET


def test_rfc9001_a2_client_initial_decrypts_and_protects():
    initial, used = quic.decrypt_initial(CLIENT_PROTECTED)
    assert (initial.packet_number, initial.dcid, used) == (CLIENT_PN, DCID, len(CLIENT_PROTECTED))
    assert initial.payload == CLIENT_FRAMES
    assert quic.protect_initial(DCID, b"", CLIENT_PN, CLIENT_FRAMES) == CLIENT_PROTECTED
    _, hello = quic.read_datagram(CLIENT_PROTECTED, None)
    assert (hello.sni, hello.alpn) == ("example.com", ("alpn",))


def test_tampered_or_foreign_packets_raise():
    bad = bytearray(CLIENT_PROTECTED)
    bad[500] ^= 1
    with pytest.raises(quic.QUICError):
        quic.read_datagram(bytes(bad), None)
    with pytest.raises(quic.QUICError):
        quic.read_datagram(b"\x40" + bytes(40), None)                # a short-header packet
    assert quic.first_initial_dcid(b"\xc0\xff\x00\x00\x1d" + bytes(40)) is None   # unknown version


def _crypto(offset, data):
    return b"\x06" + quic.varint(offset) + quic.varint(len(data)) + data


@pytest.mark.parametrize("version", [quic.V1, quic.V2])
def test_hello_over_several_initials_with_out_of_order_frames(version):
    msg = hello_message("dns.doh.test", alpn=("h3",), pad=2500)       # a post-quantum-sized hello
    dcid, rng = bytes(range(8)), random.Random(version)
    pieces = [(o, msg[o:o + 400]) for o in range(0, len(msg), 400)]
    rng.shuffle(pieces)
    packets = [pieces[:4], pieces[4:]]
    stream, hello = None, None
    for pn, group in enumerate(packets):
        frames = b"\x01" + b"".join(b"\x00" * 3 + _crypto(o, d) for o, d in group)
        frames += bytes(max(0, 1162 - len(frames)))
        # after the server answers, a client's Initials carry the server's CID, protected with
        # the keys of the first DCID (RFC 9001 section 5.2)
        datagram = quic.protect_initial(dcid if pn == 0 else b"server-cid", b"c", pn, frames, version,
                                        keys=quic.client_keys(dcid, version))
        assert hello is None
        stream, hello = quic.read_datagram(datagram, stream)
    assert (hello.sni, hello.alpn) == ("dns.doh.test", ("h3",))



def test_coalesced_packets_in_one_datagram():
    msg = hello_message("coalesced.test", alpn=("doq",))
    dcid = b"\x11" * 8
    a = quic.protect_initial(dcid, b"", 0, _crypto(0, msg[:50]) + bytes(30))
    b = quic.protect_initial(dcid, b"", 1, _crypto(50, msg[50:]) + bytes(30))
    _, hello = quic.read_datagram(a + b + b"\x40" + bytes(30), None)
    assert hello.alpn == ("doq",) and hello.sni == "coalesced.test"


def test_random_datagrams_never_raise_anything_else():
    rng = random.Random(1)
    for _ in range(2000):
        b = bytearray(CLIENT_PROTECTED[:rng.randrange(1, 1200)])
        for _ in range(rng.randrange(0, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            quic.read_datagram(bytes(b), None)
        except quic.QUICError:
            pass
