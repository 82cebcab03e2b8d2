"""TLS ClientHello reading (SNI, ALPN, versions, ECH) and the per-flow TCP reassembly it needs.

Real browsers' ClientHellos (post-quantum key shares) span several TCP segments, and the record
layer may split one handshake message over several records, so both are put back together here,
in sequence order, up to MAX_HELLO bytes. Errors raise `TLSError`; nothing else escapes.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

MAX_HELLO = 8192           # bytes of client stream kept per flow; a ClientHello is ~0.5-2.5 KiB
EXT_SNI, EXT_ALPN, EXT_VERSIONS, EXT_QUIC_TP, EXT_ECH = 0x0000, 0x0010, 0x002B, 0x0039, 0xFE0D


class TLSError(ValueError):
    """Not a ClientHello, or a malformed one."""


class ClientHello(NamedTuple):
    """(Immutable; a NamedTuple: one per hello, and a frozen dataclass sets each field by
    object.__setattr__.)"""
    sni: str | None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    ech: bool = False             # has an encrypted_client_hello extension (may be GREASE)


def looks_like_tls(payload: bytes) -> bool:
    """The first bytes of a client stream that starts with a TLS handshake record."""
    return len(payload) >= 3 and payload[0] == 0x16 and payload[1] == 0x03 and payload[2] <= 0x04


def hello_from_records(stream: bytes) -> ClientHello | None:
    """The ClientHello at the start of a TLS client stream; None while more bytes are needed."""
    if len(stream) >= 9 and stream[0] == 0x16 and stream[1] == 0x03 and stream[5] == 1:
        # the common case, read in place: one record that holds the whole ClientHello (what the
        # loop below returns for it: that record's handshake message, parsed)
        length, size = stream[3] << 8 | stream[4], stream[6] << 16 | stream[7] << 8 | stream[8]
        if 4 + size <= length <= 18432 and 5 + length <= len(stream) and size <= MAX_HELLO * 4:
            return parse_client_hello(stream[9:9 + size])
    handshake = bytearray()
    p = 0
    for _ in range(64):
        if p + 5 > len(stream):
            break
        if stream[p] != 0x16 or stream[p + 1] != 0x03:
            raise TLSError("not a TLS handshake record")
        length = int.from_bytes(stream[p + 3:p + 5], "big")
        if length == 0 or length > 18432:
            raise TLSError("bad TLS record length")
        handshake += stream[p + 5:p + 5 + length]
        p += 5 + length
        hello = hello_from_handshake(bytes(handshake))
        if hello is not None or p > len(stream):
            return hello
    if len(stream) >= MAX_HELLO:
        raise TLSError("no complete ClientHello in the first bytes of the stream")
    return None


def hello_from_handshake(stream: bytes) -> ClientHello | None:
    """The ClientHello at the start of a handshake-message stream (a TLS record payload or the
    QUIC CRYPTO stream); None while more bytes are needed."""
    if len(stream) < 4:
        return None
    if stream[0] != 1:
        raise TLSError(f"handshake type {stream[0]} is not a ClientHello")
    length = int.from_bytes(stream[1:4], "big")
    if length > MAX_HELLO * 4:
        raise TLSError("ClientHello too long")
    if len(stream) < 4 + length:
        return None
    return parse_client_hello(stream[4:4 + length])


def parse_client_hello(body: bytes) -> ClientHello:
    """The ClientHello body (after the 4-byte handshake header). Offsets into `body`, checked
    against the end of the field they are in (a field running past it is a TLSError)."""
    n = len(body)
    p = 34                                                   # legacy_version, random
    if p + 1 > n or (p := p + 1 + body[p]) + 2 > n:          # session id
        raise TLSError(_PAST_END)
    p += 2 + (body[p] << 8 | body[p + 1])                    # cipher suites
    if p + 1 > n or (p := p + 1 + body[p]) > n:              # compression methods
        raise TLSError(_PAST_END)
    if p == n:
        return ClientHello(None)             # no extensions at all
    if p + 2 > n:
        raise TLSError(_PAST_END)
    ext_end = p + 2 + (body[p] << 8 | body[p + 1])
    p += 2
    if ext_end > n:
        raise TLSError(_PAST_END)
    sni, alpn, versions, ech = None, (), (), False
    for _ in range(256):
        if ext_end - p < 4:
            break
        etype, d = body[p] << 8 | body[p + 1], p + 4
        end = d + (body[p + 2] << 8 | body[p + 3])
        if end > ext_end:
            raise TLSError(_PAST_END)
        p = end
        if etype == EXT_SNI and d < end:
            q, names_end = _field16(body, d, end)
            while names_end - q >= 3:
                kind, q, name_end = body[q], q + 3, q + 3 + (body[q + 1] << 8 | body[q + 2])
                if name_end > names_end:
                    raise TLSError(_PAST_END)
                if kind == 0:
                    sni = body[q:name_end].decode("ascii", "replace").lower().rstrip(".")
                    break
                q = name_end
        elif etype == EXT_ALPN and d < end:
            q, protos_end = _field16(body, d, end)
            out = []
            while q < protos_end and len(out) < 32:
                q, proto_end = q + 1, q + 1 + body[q]
                if proto_end > protos_end:
                    raise TLSError(_PAST_END)
                out.append(body[q:proto_end].decode("ascii", "replace"))
                q = proto_end
            alpn = tuple(out)
        elif etype == EXT_VERSIONS and d < end:
            q, vs_end = d + 1, d + 1 + body[d]
            if vs_end > end:
                raise TLSError(_PAST_END)
            versions = _U16[(vs_end - q) // 2](body, q)
        elif etype == EXT_ECH:
            ech = True
    return ClientHello(sni or None, alpn, versions, ech)


_PAST_END = "field runs past its end"
_U16 = [struct.Struct(f"!{i}H").unpack_from for i in range(128)]     # i big-endian 16-bit numbers


def _field16(body: bytes, p: int, end: int) -> tuple[int, int]:
    """(start, end) of the 16-bit-length-prefixed field at p, which must end by `end`."""
    if p + 2 > end:
        raise TLSError(_PAST_END)
    stop = p + 2 + (body[p] << 8 | body[p + 1])
    if stop > end:
        raise TLSError(_PAST_END)
    return p + 2, stop


class Reassembly:
    """The first MAX_HELLO bytes of one TCP client stream, put in order by sequence number.

    `base` is the sequence number of the first data byte (SYN + 1), or the first data segment's
    when the SYN was not seen (then only a segment that starts a TLS record may open the stream).
    """

    __slots__ = ("base", "data", "pending", "size")

    def __init__(self, base: int | None = None):
        self.base = base
        self.data = bytearray()
        self.pending: dict[int, bytes] = {}    # offset -> bytes beyond a gap
        self.size = 0

    def add(self, seq: int, payload: bytes) -> bytes:
        """Add one segment; returns the contiguous stream so far."""
        if not payload:
            return bytes(self.data)
        if self.base is None:
            if not looks_like_tls(payload):
                return bytes(self.data)
            self.base = seq
        offset = (seq - self.base) & 0xFFFFFFFF
        if offset >= MAX_HELLO:
            return bytes(self.data)             # retransmitted-before-base wraps high; beyond window
        payload = payload[:MAX_HELLO - offset]
        if offset > len(self.data):
            if offset not in self.pending and len(self.pending) < 32 and self.size + len(payload) <= MAX_HELLO:
                self.pending[offset] = payload
                self.size += len(payload)
            return bytes(self.data)
        self._append(offset, payload)
        for _ in range(len(self.pending)):
            nxt = next((o for o in sorted(self.pending) if o <= len(self.data)), None)
            if nxt is None:
                break
            chunk = self.pending.pop(nxt)
            self.size -= len(chunk)
            self._append(nxt, chunk)
        return bytes(self.data)

    def _append(self, offset: int, payload: bytes) -> None:
        new = payload[len(self.data) - offset:]
        if new:
            self.data += new
            self.size += len(new)
