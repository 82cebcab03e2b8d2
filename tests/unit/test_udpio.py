"""resolver/udpio.py on real loopback sockets, IPv4 and IPv6: BatchIO (recvmmsg/sendmmsg) and
PlainIO (recvfrom/sendto) give each datagram with its sender, send each answer to the client it is
for, take an empty datagram as data, and give None once the socket is shut down; BatchIO takes
every datagram waiting in one call and skips one longer than a slot.

Every receiving socket has SO_RCVTIMEO set, so a datagram that never comes fails the test (OSError
from receive()) instead of hanging it."""
from __future__ import annotations

import socket
import struct
import sys
import threading
import time

import pytest

from helpers import have_ipv6_loopback, settled
from resolver import udpio
from resolver.udpio import SLOT, AdaptiveIO, BatchIO, PlainIO, udp_io

WAIT = 5                                            # seconds before a missing datagram fails a test


FAMILIES = [pytest.param("127.0.0.1", id="ipv4"),
            pytest.param("::1", id="ipv6", marks=pytest.mark.skipif(not have_ipv6_loopback(),
                                                                    reason="no IPv6 loopback (::1) here"))]
needs_mmsg = pytest.mark.skipif(udpio._MMSG is None, reason="recvmmsg/sendmmsg need 64-bit Linux")
KINDS = [pytest.param("batch", marks=needs_mmsg), pytest.param("adaptive", marks=needs_mmsg), "plain"]


def udp(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", WAIT, 0))
    return s


@pytest.fixture(params=FAMILIES)
def host(request):
    return request.param


@pytest.fixture
def sockets(host):
    """Sockets made by a test, closed after it."""
    made: list[socket.socket] = []

    def make() -> socket.socket:
        made.append(udp(host))
        return made[-1]
    yield make
    for s in made:
        s.close()


def make_io(kind: str, sock: socket.socket):
    return {"batch": BatchIO, "adaptive": AdaptiveIO}[kind](sock, 16) if kind != "plain" else PlainIO(sock)


def receive_all(io, count: int) -> list[list]:
    """receive() until `count` datagrams are in (bounded): the batches, each entry as
    (query(ref), client, ref, address(ref)) since a BatchIO ref holds only until the next
    receive(); each question is its datagram without the first two bytes."""
    batches, got = [], 0
    for _ in range(count):
        batch = io.receive()
        assert batch is not None, "receive() gave None on an open socket"
        for question, _, ref in batch:
            assert question == io.query(ref)[2:]
        batches.append([(io.query(ref), client, ref, io.address(ref)) for _, client, ref in batch])
        got += len(batch)
        if got >= count:
            break
    assert got == count
    return batches


def nothing_more(*clients: socket.socket) -> None:
    """Nothing else is waiting for these clients (loopback delivers before sendto returns)."""
    for c in clients:
        with pytest.raises(BlockingIOError):
            c.recv(65535, socket.MSG_DONTWAIT)


@pytest.mark.parametrize("kind", KINDS)
def test_receive_gives_each_datagram_with_its_sender(kind, host, sockets):
    server = sockets()
    io = make_io(kind, server)
    clients = [sockets() for _ in range(3)]
    sent = {}                                       # datagram -> the client socket that sent it
    for round_ in range(2):
        for n, c in enumerate(clients):
            data = b"" if (n, round_) == (1, 0) else b"query %d from %d" % (round_, n)
            c.sendto(data, server.getsockname())
            sent[data] = c
    settled(host)
    batches = receive_all(io, len(sent))
    if kind != "plain":                             # (AdaptiveIO starts with BatchIO)
        assert len(batches) == 1, "every datagram waiting comes in one recvmmsg"
    else:
        assert [len(b) for b in batches] == [1] * len(sent)
    got = [entry for batch in batches for entry in batch]
    assert sorted(data for data, *_ in got) == sorted(sent)
    for data, client, ref, address in got:
        name = sent[data].getsockname()
        assert client == host
        assert address[:2] == name[:2], f"address({ref!r}) of {data!r}"
        assert len(address) == len(name)            # as recvfrom gives it: 2-tuple, or 4 for IPv6


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_datagram_is_data_not_the_end(kind, host, sockets):
    server = sockets()
    io = make_io(kind, server)
    client = sockets()
    client.sendto(b"", server.getsockname())
    [[(data, who, ref, address)]] = receive_all(io, 1)
    assert (data, who, address[:2]) == (b"", host, client.getsockname()[:2])
    io.send([(b"still here", ref)])
    assert client.recv(64) == b"still here"
    client.sendto(b"next", server.getsockname())
    assert [(question, io.query(ref)) for question, _, ref in io.receive()] == [(b"xt", b"next")]


@pytest.mark.parametrize("kind", KINDS)
def test_send_takes_each_answer_to_its_client(kind, host, sockets):
    server = sockets()
    io = make_io(kind, server)
    clients = [sockets() for _ in range(3)]
    for n, c in enumerate(clients):
        c.sendto(b"q%d" % n, server.getsockname())
    clients[0].sendto(b"q0 again", server.getsockname())
    settled(host)
    batches = receive_all(io, 4)
    assert kind == "plain" or len(batches) == 1     # (a BatchIO ref holds until the next receive)
    got = [entry for batch in batches for entry in batch]
    big = bytes(range(256)) * (SLOT // 256 + 2)    # longer than a slot: sent on its own
    answers = {b"q0": b"a0", b"q0 again": b"", b"q1": big, b"q2": b"x" * SLOT}
    io.send([])                                     # nothing to send: nothing goes out
    io.send([(answers[data], ref) for data, _, ref, _ in got])
    assert sorted(clients[0].recv(65535) for _ in range(2)) == [b"", b"a0"]
    assert clients[1].recv(65535) == big
    assert clients[2].recv(65535) == b"x" * SLOT
    nothing_more(*clients)


@pytest.mark.parametrize("kind", KINDS)
def test_reused_answers_go_out_behind_their_querys_id(kind, host, sockets):
    """send(replies, reused): a reused answer is sent as its query's first two bytes (the ID)
    followed by the body, beside whole answers in the same call, and one too long for a slot on
    its own."""
    server = sockets()
    io = make_io(kind, server)
    clients = [sockets() for _ in range(3)]
    queries = [b"\x12\x34 question", b"\xab\xcd other", b"\x00\x07 long"]
    for c, q in zip(clients, queries):
        c.sendto(q, server.getsockname())
    settled(host)
    got = [entry for batch in receive_all(io, 3) for entry in batch]
    refs = {data: ref for data, _, ref, _ in got}
    long_body = b"L" * (SLOT - 1)                   # with the ID one byte over a slot
    io.send([(b"whole answer", refs[queries[1]])],
            [(b" body", refs[queries[0]]), (long_body, refs[queries[2]])])
    assert clients[0].recv(65535) == b"\x12\x34 body"
    assert clients[1].recv(65535) == b"whole answer"
    assert clients[2].recv(65535) == b"\x00\x07" + long_body
    nothing_more(*clients)


@pytest.mark.parametrize("kind", KINDS)
def test_queries_left_unanswered_leave_the_others_theirs(kind, host, sockets):
    """Some queries of a batch get no answer in send() (forwarded to the upstream, dropped): every
    answered one still reaches its own client, whole or behind its ID, and the unanswered
    clients get nothing; the next batch, answered in full, goes out right as well."""
    server = sockets()
    io = make_io(kind, server)
    clients = [sockets() for _ in range(5)]
    for round_ in range(2):
        for n, c in enumerate(clients):
            c.sendto(b"%c%c q%d" % (round_, n, n), server.getsockname())
        settled(host)
        got = [entry for batch in receive_all(io, 5) for entry in batch]
        refs = {data[3:]: ref for data, _, ref, _ in got}
        if round_ == 0:                             # q1 and q3 unanswered
            io.send([(b"whole 2", refs[b"q2"])], [(b" body 0", refs[b"q0"]), (b" body 4", refs[b"q4"])])
            expect = {0: b"\x00\x00 body 0", 2: b"whole 2", 4: b"\x00\x04 body 4"}
        else:
            io.send([(b"whole %d" % n, refs[b"q%d" % n]) for n in (1, 3)],
                    [(b" body %d" % n, refs[b"q%d" % n]) for n in (0, 2, 4)])
            expect = {n: (b"whole %d" % n if n in (1, 3) else b"\x01%c body %d" % (n, n)) for n in range(5)}
        for n, answer in expect.items():
            assert clients[n].recv(65535) == answer, f"round {round_}, client {n}"
        nothing_more(*clients)


@pytest.mark.parametrize("kind", KINDS)
def test_a_datagram_longer_than_a_slot_comes_as_empty(kind, host, sockets):
    """Longer than SLOT (cut short by recvmmsg, or by recvfrom's buffer), it is handed on as b"":
    the server drops it as malformed and counts it, as it does an empty datagram."""
    server = sockets()
    io = make_io(kind, server)
    long, short = sockets(), sockets()
    long.sendto(b"L" * (SLOT + 1), server.getsockname())
    short.sendto(b"short", server.getsockname())
    long.sendto(b"F" * SLOT, server.getsockname())  # a full slot is still whole
    settled(host)
    got = [entry for batch in receive_all(io, 3) for entry in batch]
    assert [(data, client) for data, client, _, _ in got] == [(b"", host), (b"short", host), (b"F" * SLOT, host)]
    assert [address[:2] for *_, address in got] == [long.getsockname()[:2], short.getsockname()[:2],
                                                    long.getsockname()[:2]]
    io.send([(b"to short", got[1][2]), (b"to long", got[2][2])])
    assert (short.recv(64), long.recv(64)) == (b"to short", b"to long")
    nothing_more(short, long)


def blocked_in(thread: threading.Thread, fd: int) -> bool | None:
    """Whether the thread sits in a system call on `fd` (its first argument, as for recvfrom and
    recvmmsg), from /proc; waits for it, at most WAIT seconds. None where /proc cannot say."""
    path = f"/proc/self/task/{thread.native_id}/syscall"
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                fields = f.read().split()
        except OSError:
            return None
        if len(fields) > 1 and fields[0] != "running" and int(fields[1], 16) == fd:
            return True
        time.sleep(0.001)                           # polling a state, bounded by the deadline
    return False


@pytest.mark.parametrize("kind", KINDS)
def test_shutdown_wakes_a_blocked_receive_with_none(kind, host, sockets):
    server = sockets()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))   # block for good
    io = make_io(kind, server)
    results = []
    thread = threading.Thread(target=lambda: results.append(io.receive()), daemon=True)
    thread.start()
    # a shutdown before receive() is reached gives None too; this makes sure the blocked case is the one tested
    assert blocked_in(thread, server.fileno()) is not False, "receive() did not block"
    try:
        server.shutdown(socket.SHUT_RD)
    except OSError:
        pass                                        # ENOTCONN: an unconnected UDP socket is woken all the same
    thread.join(WAIT)
    assert not thread.is_alive(), "receive() still blocked after shutdown"
    assert results == [None]


def test_udp_io_picks_plain_for_1_and_batch_where_linux_has_recvmmsg():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert type(udp_io(s, 1)) is PlainIO
        if sys.platform.startswith("linux") and sys.maxsize > 2 ** 32:
            io = udp_io(s, 64)
            assert type(io) is AdaptiveIO and io.size == 64
        else:
            assert type(udp_io(s, 64)) is PlainIO


@needs_mmsg
def test_adaptive_io_takes_lone_datagrams_one_at_a_time_and_bunches_at_once(host, sockets):
    """After a batch of one, AdaptiveIO reads with recvfrom (one datagram per receive(), even when
    more wait) for PROBE receives, then one recvmmsg takes every datagram waiting and a bunch
    keeps it there. Every answer reaches its client, whichever IO took the query in."""
    server = sockets()
    io = AdaptiveIO(server, 16)
    client = sockets()
    sizes, count = [], 0

    def exchange(n: int) -> None:
        nonlocal count
        sent = [b"\x00%c query %d" % (count + i, count + i) for i in range(n)]
        count += n
        for q in sent:
            client.sendto(q, server.getsockname())
        settled(host)
        got = []
        while len(got) < n and len(sizes) < 200:    # bounded
            batch = io.receive()
            sizes.append(len(batch))
            assert all(question == io.query(ref)[2:] for question, _, ref in batch)
            assert all(io.address(ref)[:2] == client.getsockname()[:2] for _, _, ref in batch)
            got += [io.query(ref) for _, _, ref in batch]     # before send: it answers over them
            io.send([], [(b" answer", ref) for _, _, ref in batch])
        assert got == sent
        assert sorted(client.recv(64) for _ in range(n)) == sorted(q[:2] + b" answer" for q in sent)
        nothing_more(client)

    exchange(1)                                     # a batch of one: PlainIO from here on
    exchange(3)
    assert sizes == [1, 1, 1, 1]
    for _ in range(AdaptiveIO.PROBE - 3):
        exchange(1)
    exchange(4)                                     # the probe: one recvmmsg takes all four
    exchange(2)                                     # a bunch keeps BatchIO
    assert sizes[-2:] == [4, 2]
    assert len(sizes) == 1 + 3 + (AdaptiveIO.PROBE - 3) + 2
