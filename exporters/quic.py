"""QUIC client Initial packets decrypted per RFC 9001 section 5 (and RFC 9369 for v2), to read the
ClientHello inside: keys come from the first Destination Connection ID, which is on the wire.

`Initials` keeps, per client flow, the keys of its first Initial and the CRYPTO stream assembled by
offset, so ClientHellos split over several packets or sent as out-of-order CRYPTO frames are read
once complete. `protect_initial` builds Initials (tests; checked against RFC 9001 Appendix A).
"""
from __future__ import annotations

import functools
import hmac
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .tls import MAX_HELLO, ClientHello, TLSError, hello_from_handshake

V1, V2 = 0x00000001, 0x6B3343CF
# RFC 9001 section 5.2 and RFC 9369 section 3.3.1
SALTS = {V1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
         V2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9")}
LABELS = {V1: (b"quic key", b"quic iv", b"quic hp"), V2: (b"quicv2 key", b"quicv2 iv", b"quicv2 hp")}
INITIAL_TYPE = {V1: 0, V2: 1}          # long-header packet type bits of an Initial


class QUICError(ValueError):
    """Not a client Initial we can read."""


@dataclass(frozen=True, slots=True)
class Keys:
    """A client's Initial keys, and the two ciphers made from them once: AES-ECB for header
    protection and AES-GCM for the payload (every Initial of a connection reuses them)."""
    key: bytes
    iv: bytes
    hp: bytes
    ecb: object = field(init=False, repr=False, compare=False)
    aead: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "ecb", Cipher(algorithms.AES(self.hp), modes.ECB()).encryptor())
        object.__setattr__(self, "aead", AESGCM(self.key))


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 section 7.1) with SHA-256, for at most 32 bytes: HKDF-Expand's
    first block, HMAC(secret, info | 0x01), is all of it (the standard library's one-shot HMAC)."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return hmac.digest(secret, info + b"\x01", "sha256")[:length]


def initial_secret(dcid: bytes, version: int = V1) -> bytes:
    return hmac.digest(SALTS[version], dcid, "sha256")     # HKDF-Extract


@functools.lru_cache(maxsize=4096)
def client_keys(dcid: bytes, version: int = V1) -> Keys:
    """The client's Initial keys for a DCID; cached, since every Initial of a connection (and a
    client's retries on new flows) derives the same ones from the same DCID."""
    client = _expand_label(initial_secret(dcid, version), b"client in", 32)
    k, i, h = LABELS[version]
    return Keys(_expand_label(client, k, 16), _expand_label(client, i, 12), _expand_label(client, h, 16))


def _mask(keys: Keys, sample: bytes) -> bytes:
    """The header-protection mask: AES-ECB of a 16-byte sample with the keys' one encryptor (a
    whole block leaves nothing buffered in it for the next sample)."""
    if len(sample) != 16:
        raise QUICError("a header-protection sample is 16 bytes")
    return keys.ecb.update(sample)


def read_varint(data: bytes, p: int) -> tuple[int, int]:
    value, end = _varint(data, p)
    if value < 0:
        raise QUICError(_PAST_END)
    return value, end


def _varint(data: bytes, p: int) -> tuple[int, int]:
    """read_varint without raising: (-1, p) when the varint runs past the end."""
    if p >= len(data):
        return -1, p
    size = 1 << (data[p] >> 6)
    if p + size > len(data):
        return -1, p
    return int.from_bytes(data[p:p + size], "big") & _VARINT_VALUE[size], p + size


_PAST_END = "varint past the end"
_VARINT_VALUE = {1: 0x3F, 2: 0x3FFF, 4: 0x3FFFFFFF, 8: 0x3FFFFFFFFFFFFFFF}     # the length bits cleared


def varint(value: int) -> bytes:
    for size, prefix in ((1, 0), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if value < 1 << (size * 8 - 2):
            out = bytearray(value.to_bytes(size, "big"))
            out[0] |= prefix
            return bytes(out)
    raise ValueError("varint too large")


@dataclass(frozen=True, slots=True)
class Initial:
    version: int
    dcid: bytes
    scid: bytes
    packet_number: int
    payload: bytes          # decrypted frames


def long_header(data: bytes) -> tuple[int, bytes, bytes, int, int] | None:
    """(version, dcid, scid, packet-number offset, end of packet) of a client Initial at the start of `data`; None for
    any other packet. Raises QUICError when it is an Initial but malformed."""
    head = _long_header(data)
    if head.__class__ is str:
        raise QUICError(head)
    return head


def _long_header(data: bytes) -> tuple[int, bytes, bytes, int, int] | str | None:
    """long_header, with what is wrong with a malformed Initial returned instead of raised (most
    long-header datagrams seen are not readable Initials, and raising costs)."""
    if len(data) < 7 or not data[0] & 0x80:
        return None
    version = int.from_bytes(data[1:5], "big")
    if version not in SALTS or (data[0] >> 4) & 0x03 != INITIAL_TYPE[version]:
        return None
    p = 5
    dlen = data[p]
    if dlen > 20 or p + 1 + dlen >= len(data):
        return "bad DCID length"
    dcid = data[p + 1:p + 1 + dlen]
    p += 1 + dlen
    slen = data[p]
    if slen > 20 or p + 1 + slen > len(data):
        return "bad SCID length"
    scid = data[p + 1:p + 1 + slen]
    p += 1 + slen
    token_len, p = _varint(data, p)
    if token_len < 0:
        return _PAST_END
    length, p = _varint(data, p + token_len)
    if length < 0:
        return _PAST_END
    if p + length > len(data) or length < 20:
        return "Initial length runs past the datagram"
    return version, dcid, scid, p, p + length


def decrypt_initial(data: bytes, keys: Keys | None = None) -> tuple[Initial, int]:
    """Decrypt the client Initial at the start of `data` (a datagram may hold several coalesced
    packets): (Initial, bytes used). Raises QUICError."""
    head = long_header(data)
    if head is None:
        raise QUICError("not a QUIC Initial")
    version, dcid, scid, p, end = head
    keys = keys or client_keys(dcid, version)
    sample = data[p + 4:p + 20]
    if len(sample) < 16:
        raise QUICError("too short for a header-protection sample")
    mask = _mask(keys, sample)
    first = data[0] ^ (mask[0] & 0x0F)
    pn_len = (first & 0x03) + 1
    pn_bytes = bytes(b ^ m for b, m in zip(data[p:p + pn_len], mask[1:1 + pn_len]))
    pn = int.from_bytes(pn_bytes, "big")
    header = bytes([first]) + data[1:p] + pn_bytes
    nonce = (int.from_bytes(keys.iv, "big") ^ pn).to_bytes(12, "big")
    try:
        payload = keys.aead.decrypt(nonce, data[p + pn_len:end], header)
    except Exception as e:   # noqa: BLE001 - InvalidTag and friends: not ours to read
        raise QUICError(f"Initial does not decrypt ({type(e).__name__})") from None
    return Initial(version, dcid, scid, pn, payload), end


def crypto_frames(payload: bytes) -> list[tuple[int, bytes]]:
    """(offset, data) of every CRYPTO frame in a decrypted Initial payload."""
    out = []
    p = 0
    n = len(payload)
    for _ in range(4096):
        if p >= n:
            break
        ftype = payload[p]
        if ftype == 0x00:                         # PADDING: a run of zero bytes, skipped at once
            p = n - len(payload[p:].lstrip(b"\x00"))
        elif ftype == 0x01:                       # PING
            p += 1
        elif ftype == 0x06:                       # CRYPTO
            offset, p = read_varint(payload, p + 1)
            length, p = read_varint(payload, p)
            if p + length > n:
                raise QUICError("CRYPTO frame runs past the payload")
            out.append((offset, payload[p:p + length]))
            p += length
        elif ftype in (0x02, 0x03):               # ACK (client Initials may carry one)
            _, p = read_varint(payload, p + 1)
            _, p = read_varint(payload, p)
            count, p = read_varint(payload, p)
            _, p = read_varint(payload, p)
            for _ in range(min(count, 256) * 2):
                _, p = read_varint(payload, p)
            if ftype == 0x03:
                for _ in range(3):
                    _, p = read_varint(payload, p)
        elif ftype == 0x1C:                       # CONNECTION_CLOSE
            break
        else:
            raise QUICError(f"frame type {ftype:#x} not allowed in an Initial")
    return out


class CryptoStream:
    """The client's Initial CRYPTO stream of one connection, put together by offset."""

    __slots__ = ("keys", "chunks", "size", "done")

    def __init__(self, keys: Keys):
        self.keys = keys
        self.chunks: dict[int, bytes] = {}
        self.size = 0
        self.done = False

    def add(self, frames) -> ClientHello | None:
        for offset, data in frames:
            if offset >= MAX_HELLO or len(self.chunks) >= 64:
                continue
            data = data[:MAX_HELLO - offset]
            if len(data) > len(self.chunks.get(offset, b"")) and self.size + len(data) <= 2 * MAX_HELLO:
                self.size += len(data) - len(self.chunks.get(offset, b""))
                self.chunks[offset] = data
        stream = bytearray()
        for offset in sorted(self.chunks):
            if offset > len(stream):
                break
            stream += self.chunks[offset][len(stream) - offset:]
        try:
            hello = hello_from_handshake(bytes(stream))
        except TLSError as e:
            raise QUICError(str(e)) from None
        if hello is not None:
            self.done = True
        return hello


def first_initial_dcid(datagram: bytes) -> bytes | None:
    """The DCID of a datagram that starts with a client Initial (cheap: no decryption)."""
    head = _long_header(datagram)
    return head[1] if head and head.__class__ is not str else None


def read_datagram(datagram: bytes, stream: CryptoStream | None) -> tuple[CryptoStream, ClientHello | None]:
    """Decrypt every coalesced client Initial in a datagram into the connection's CRYPTO stream
    (a new one keyed on this DCID when `stream` is None); returns the stream and the ClientHello
    once it is complete. Raises QUICError for a datagram that is not a readable Initial."""
    p = 0
    hello = None
    for _ in range(8):
        if p >= len(datagram):
            break
        chunk = datagram[p:]
        head = long_header(chunk)
        if head is None:
            break                                    # a 0-RTT/Handshake/short packet or padding
        if stream is None:
            stream = CryptoStream(client_keys(head[1], head[0]))
        initial, used = decrypt_initial(chunk, stream.keys)
        hello = stream.add(crypto_frames(initial.payload)) or hello
        p += used
    if stream is None:
        raise QUICError("not a QUIC Initial")
    return stream, hello


def protect_initial(dcid: bytes, scid: bytes, pn: int, frames: bytes, version: int = V1,
                    pn_len: int = 4, token: bytes = b"", keys: Keys | None = None) -> bytes:
    """A protected client Initial carrying `frames` (padded by the caller as it likes), with
    the keys of `dcid` unless others are given (a client's later Initials use its first DCID's)."""
    keys = keys or client_keys(dcid, version)
    first = 0xC0 | (INITIAL_TYPE[version] << 4) | (pn_len - 1)
    length = pn_len + len(frames) + 16
    header = (bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid
              + bytes([len(scid)]) + scid + varint(len(token)) + token + varint(length)
              + pn.to_bytes(pn_len, "big"))
    nonce = (int.from_bytes(keys.iv, "big") ^ pn).to_bytes(12, "big")
    sealed = keys.aead.encrypt(nonce, frames, header)
    pn_at = len(header) - pn_len
    mask = _mask(keys, sealed[4 - pn_len:20 - pn_len])
    out = bytearray(header + sealed)
    out[0] ^= mask[0] & 0x0F
    for i in range(pn_len):
        out[pn_at + i] ^= mask[1 + i]
    return bytes(out)
