"""How a UDP socket's thread takes datagrams in and sends answers out, a batch at a time.

BatchIO uses Linux's recvmmsg(2) and sendmmsg(2), which Python's socket module does not offer, by
way of ctypes and the C library: one system call takes in every datagram waiting (up to `size`)
and one sends every answer of the batch, so the per-packet cost of a system call and of Python's
socket wrapper is paid once per batch. PlainIO is recvfrom/sendto, one datagram per batch: for
systems without recvmmsg, and for `udp: {batch: 1}` in sinkhole.yaml. AdaptiveIO (what udp_io
gives for a batch above 1) uses PlainIO while datagrams come one at a time, BatchIO otherwise.

All three offer the same calls to the server's loop:
  receive()       -> [(question, client, ref)], or None once the socket is shut down; raises
                  OSError. `question` is the datagram without its first two bytes (the ID): what
                  a remembered answer is found by (Policy.remember)
  query(ref)      -> the whole datagram, until its answer is sent (BatchIO answers over it)
  send(replies, reused=())  replies: [(answer bytes, ref)]; reused: [(answer without its ID, ref)],
                  sent behind the query's own ID; one answer per ref. Failures are dropped
                  datagrams, never errors
  address(ref)    -> the sender's address tuple, as socket.recvfrom would give it
`client` is the sender's address as a string; `ref` says where its answer goes, good until the
next receive().
"""
from __future__ import annotations

import ctypes
import mmap
import os
import socket
import sys

SLOT = 4096                     # bytes per datagram in the buffers: a longer query is not DNS we
                                # answer; either IO hands it on as b"" (dropped, counted malformed)
NAMELEN = 28                    # sizeof(struct sockaddr_in6), which holds a sockaddr_in too
_NAME_STRIDE = 32
_MSG_TRUNC = 0x20
_MSG_DONTWAIT = 0x40
_MSG_WAITFORONE = 0x10000
_CLIENTS_MAX = 65536            # sender addresses remembered as strings


def _libc():
    """The C library's recvmmsg and sendmmsg, or None where they are missing."""
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None             # the struct layout below is the 64-bit Linux one
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    recv.restype = ctypes.c_int
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    send.restype = ctypes.c_int
    return recv, send


_MMSG = _libc()


def send_one(sock: socket.socket, data: bytes, addr) -> None:
    """One datagram out with sendto, never blocking: a client that is gone or a full buffer costs
    that answer, never an error."""
    try:
        sock.sendto(data, _MSG_DONTWAIT, addr)
    except OSError:
        pass


def udp_io(sock: socket.socket, size: int):
    """AdaptiveIO (BatchIO when busy) for `size` > 1 where the system has recvmmsg, else PlainIO."""
    if size > 1 and _MMSG is not None:
        return AdaptiveIO(sock, size)
    return PlainIO(sock)


class PlainIO:
    """recvfrom and sendto: a batch of one."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def receive(self):
        data, addr = self.sock.recvfrom(SLOT + 1)
        if addr is None:                # shutdown() woke the thread
            return None
        if len(data) > SLOT:            # as BatchIO: no DNS query we answer is this long
            data = b""
        client = addr[0]
        if "%" in client:               # as BatchIO: a link-local IPv6 client without its scope
            client = client.split("%", 1)[0]
        return [(data[2:], client, (addr, data))]

    def send(self, replies, reused=()) -> None:
        sock = self.sock
        for reply, (addr, _) in replies:
            send_one(sock, reply, addr)
        for body, (addr, query) in reused:
            send_one(sock, query[:2] + body, addr)

    @staticmethod
    def address(ref):
        return ref[0]

    @staticmethod
    def query(ref) -> bytes:
        return ref[1]


class BatchIO:
    """recvmmsg and sendmmsg over buffers made once. struct mmsghdr is 64 bytes on 64-bit Linux:
    msg_name (8), msg_namelen (4, padded to 8), msg_iov (8), msg_iovlen (8), msg_control (8),
    msg_controllen (8), msg_flags (4), then msg_len (4); struct iovec is base (8) and length (8).
    They are kept as arrays of 64-bit words and read and written through memoryviews.

    An answer is written over its own query, in the datagram's slot of the receive buffer: the
    query's ID is already in place (a reused answer goes in behind it), and the send header of
    slot i names slot i's sender and buffer from the start. When every datagram of the batch got
    its answer here (a busy resolver's usual batch) one sendmmsg sends the slots as they are;
    otherwise the answered slots are gathered into a second header array first."""

    def __init__(self, sock: socket.socket, size: int):
        self.sock, self.size = sock, size
        self.family = sock.family
        self._recv, self._send = _MMSG
        self._fd = sock.fileno()
        # the buffer is an anonymous mmap: slicing one makes the bytes in one step, where a
        # memoryview slice would make a view and then the bytes (80 ns more per datagram, measured)
        self._data = mmap.mmap(-1, size * SLOT)
        self._data_at = ctypes.c_char.from_buffer(self._data)     # held: the mmap stays put while exported
        self._names = ctypes.create_string_buffer(size * _NAME_STRIDE)
        self._riov = (ctypes.c_uint64 * (2 * size))()
        self._siov = (ctypes.c_uint64 * (2 * size))()
        self._rmsg = (ctypes.c_uint64 * (8 * size))()
        self._smsg = (ctypes.c_uint64 * (8 * size))()       # slot i's answer, as the slots are
        self._gmsg = (ctypes.c_uint64 * (8 * size))()       # the answered slots, gathered
        data = ctypes.addressof(self._data_at)
        names, riov, siov = ctypes.addressof(self._names), ctypes.addressof(self._riov), ctypes.addressof(self._siov)
        for i in range(size):
            self._riov[2 * i], self._riov[2 * i + 1] = data + i * SLOT, SLOT
            self._siov[2 * i] = data + i * SLOT
            for msgs, iov in ((self._rmsg, riov), (self._smsg, siov), (self._gmsg, siov)):
                msgs[8 * i] = names + _NAME_STRIDE * i      # the sender's address, and so the reply's
                msgs[8 * i + 1] = NAMELEN
                msgs[8 * i + 2] = iov + 16 * i
                msgs[8 * i + 3] = 1
        self._rmsg_at, self._smsg_at = ctypes.addressof(self._rmsg), ctypes.addressof(self._smsg)
        self._gmsg_at = ctypes.addressof(self._gmsg)
        self._name_bytes = memoryview(self._names).cast("B")
        self._rwords = memoryview(self._rmsg).cast("B").cast("I")      # 32-bit view: lengths, flags
        self._gwords = memoryview(self._gmsg).cast("B").cast("Q")
        self._slens = memoryview(self._siov).cast("B").cast("Q")
        # the sender's address read as numbers, no bytes made: sin_addr is the 32-bit word at byte 4
        # of a sockaddr_in, sin6_addr the two 64-bit words at byte 8 of a sockaddr_in6
        self._v4 = self.family == socket.AF_INET
        self._name_words = memoryview(self._names).cast("B").cast("I" if self._v4 else "Q")
        self._clients: dict[int, str] = {}
        # per slot, made once: (index, its first 32-bit word, its buffer offset, where its address
        # is among the name words: >= 0 an IPv4 word, < 0 minus the first of two IPv6 words)
        self._rslots = [(i, 16 * i, SLOT * i, 8 * i + 1 if self._v4 else -(4 * i + 1)) for i in range(size)]
        self._name_at = [names + _NAME_STRIDE * i for i in range(size)]
        self._iov_at = [siov + 16 * i for i in range(size)]
        self._count = 0                 # datagrams in the last batch received

    def receive(self):
        n = self._recv(self._fd, self._rmsg_at, self.size, _MSG_WAITFORONE, None)
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._count = 0
        if n == 0:
            return None
        words, data, names, clients = self._rwords, self._data, self._name_words, self._clients
        out = []
        for i, w, start, at in self._rslots[:n]:
            if words[w + 2] == 0:       # no sender: a shut-down socket reports empty "datagrams"
                words[w + 2] = NAMELEN
                self._count = len(out)
                return out or None
            key = names[at] if at >= 0 else (names[-at] << 64) | names[1 - at]
            client = clients.get(key)
            if client is None:
                client = self._client(key)
            if words[w + 12] & _MSG_TRUNC:      # longer than SLOT: no DNS query we answer; as b""
                out.append((b"", client, i))    # it is dropped and counted as malformed
                continue
            out.append((data[start + 2:start + words[w + 14]], client, i))
        self._count = n
        return out

    def query(self, ref: int) -> bytes:
        """Datagram `ref` of the last batch, whole (b"" for one longer than SLOT)."""
        w = 16 * ref
        if self._rwords[w + 12] & _MSG_TRUNC:
            return b""
        start = SLOT * ref
        return self._data[start:start + self._rwords[w + 14]]

    def _client(self, key: int) -> str:
        clients = self._clients
        if len(clients) >= _CLIENTS_MAX:
            clients.clear()
        if self._v4:
            raw = key.to_bytes(4, sys.byteorder)
        else:
            raw = (key >> 64).to_bytes(8, sys.byteorder) + (key & (1 << 64) - 1).to_bytes(8, sys.byteorder)
        client = clients[key] = socket.inet_ntop(self.family, raw)
        return client

    def address(self, ref: int):
        """The sender of datagram `ref` of the last batch, as recvfrom would give it."""
        base = _NAME_STRIDE * ref
        raw = bytes(self._name_bytes[base:base + NAMELEN])
        port = int.from_bytes(raw[2:4], "big")
        if self._v4:
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port,
                int.from_bytes(raw[4:8], "big"), int.from_bytes(raw[24:28], sys.byteorder))

    def send(self, replies, reused=()) -> None:
        """Each answer over its query, in the query's slot (so at most one answer per ref)."""
        data, lens = self._data, self._slens
        alone = []                      # refs whose answer went out on its own: too big for a slot
        for reply, ref in replies:
            size = len(reply)
            if size > SLOT:             # a large EDNS answer
                send_one(self.sock, reply, self.address(ref))
                alone.append(ref)
                continue
            start = SLOT * ref
            data[start:start + size] = reply
            lens[ref + ref + 1] = size
        for body, ref in reused:        # behind the query's ID, which is in place
            size = len(body) + 2
            start = SLOT * ref
            if size > SLOT:
                send_one(self.sock, data[start:start + 2] + body, self.address(ref))
                alone.append(ref)
                continue
            data[start + 2:start + size] = body
            lens[ref + ref + 1] = size
        k = len(replies) + len(reused) - len(alone)
        if k == self._count:            # every datagram of the batch answered: the slots in order
            msgs = self._smsg_at
        else:                           # some were not (forwarded, dropped, sent on their own)
            words, name_at, iov_at = self._gwords, self._name_at, self._iov_at
            j = 0
            for refs in (replies, reused):
                for _, ref in refs:
                    if ref not in alone:
                        words[j], words[j + 2] = name_at[ref], iov_at[ref]
                        j += 8
            msgs = self._gmsg_at
        done, tries = 0, 0
        while done < k and tries < k:   # a datagram that cannot go (EAGAIN, EPERM) is skipped
            tries += 1
            sent = self._send(self._fd, msgs + 64 * done, k - done, _MSG_DONTWAIT)
            done += sent if sent > 0 else 1


class AdaptiveIO:
    """BatchIO while datagrams come in bunches, PlainIO while they come one at a time: for a lone
    datagram recvfrom and sendto cost 4-6 us less than recvmmsg and sendmmsg through ctypes
    (measured at 10k q/s), while a busy socket answers twice as many queries per second in
    batches. A batch of one switches to PlainIO for the next PROBE receives; then one recvmmsg
    looks again, and a batch of more than one stays with BatchIO. A ref belongs to the IO whose
    receive() gave it, and so to the one in use until the next receive()."""

    PROBE = 16

    def __init__(self, sock: socket.socket, size: int):
        self.sock, self.size = sock, size
        self._batch, self._plain = BatchIO(sock, size), PlainIO(sock)
        self._io = self._batch
        self._plain_left = 0            # receives left to make with PlainIO before a probe

    def receive(self):
        if self._plain_left:
            self._plain_left -= 1
            self._io = self._plain
            return self._plain.receive()
        self._io = self._batch
        batch = self._batch.receive()
        if batch is not None and len(batch) == 1:
            self._plain_left = self.PROBE
        return batch

    def send(self, replies, reused=()) -> None:
        self._io.send(replies, reused)

    def address(self, ref):
        return self._io.address(ref)

    def query(self, ref) -> bytes:
        return self._io.query(ref)
