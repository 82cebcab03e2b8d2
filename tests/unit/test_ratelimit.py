"""The rate limiter as a pure function of (client, now): buckets, refill, slip, exemptions, bounds."""
import dns.flags
import dns.message
import pytest

from resolver.ratelimit import DROP, PASS, SLIP, RateLimiter, bucket_key, slip_answer


def run(limiter, client, times):
    return [limiter.check(client, t) for t in times]


def test_burst_then_limited():
    rl = RateLimiter(rate=10, burst=5, slip=0)
    assert run(rl, "192.0.2.1", [0.0] * 8) == [PASS] * 5 + [DROP] * 3
    assert rl.limited == 3


def test_refill_at_rate_and_capped_at_burst():
    rl = RateLimiter(rate=10, burst=5, slip=0)
    run(rl, "192.0.2.1", [0.0] * 5)
    assert rl.check("192.0.2.1", 0.05) == DROP        # half a token
    assert rl.check("192.0.2.1", 0.1) == PASS          # one token after 0.1 s at 10/s
    assert rl.check("192.0.2.1", 0.1) == DROP
    # a long quiet spell refills to the burst, no further
    assert run(rl, "192.0.2.1", [1000.0] * 6) == [PASS] * 5 + [DROP]


def test_burst_defaults_to_rate():
    rl = RateLimiter(rate=3, slip=0)
    assert run(rl, "192.0.2.1", [0.0] * 4) == [PASS] * 3 + [DROP]


@pytest.mark.parametrize("slip, expected", [
    (0, [DROP] * 6),
    (1, [SLIP] * 6),
    (2, [DROP, SLIP] * 3),
    (3, [DROP, DROP, SLIP] * 2),
])
def test_slip(slip, expected):
    rl = RateLimiter(rate=1, burst=1, slip=slip)
    assert rl.check("192.0.2.1", 0.0) == PASS
    assert run(rl, "192.0.2.1", [0.0] * 6) == expected


@pytest.mark.parametrize("a, b, same", [
    ("192.0.2.1", "192.0.2.1", True),
    ("192.0.2.1", "192.0.2.2", False),                       # IPv4: /32
    ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True),       # IPv6: one /64
    ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
    ("2001:db8:1:2::1%eth0", "2001:db8:1:2::2", True),
])
def test_bucket_keys(a, b, same):
    assert (bucket_key(a) == bucket_key(b)) is same
    rl = RateLimiter(rate=1, burst=1, slip=0)
    assert rl.check(a, 0.0) == PASS
    assert rl.check(b, 0.0) == (DROP if same else PASS)


def test_clients_are_independent():
    rl = RateLimiter(rate=1, burst=2, slip=0)
    assert run(rl, "192.0.2.1", [0.0] * 3) == [PASS, PASS, DROP]
    assert run(rl, "192.0.2.2", [0.0] * 3) == [PASS, PASS, DROP]


def test_exempt_clients_never_limited():
    rl = RateLimiter(rate=1, burst=1, exempt=["192.0.2.0/28", "2001:db8:ff::/48"], slip=0)
    assert run(rl, "192.0.2.5", [0.0] * 100) == [PASS] * 100
    assert run(rl, "2001:db8:ff:1::5", [0.0] * 100) == [PASS] * 100
    assert run(rl, "192.0.2.16", [0.0] * 2) == [PASS, DROP]
    assert len(rl) == 1                     # exempt clients take no bucket


def test_table_is_bounded_and_forgets_the_least_recent():
    rl = RateLimiter(rate=1, burst=1, slip=0, max_clients=100)
    assert rl.check("198.51.100.1", 0.0) == PASS        # the busy client
    for i in range(1000):
        rl.check(f"10.0.{i // 256}.{i % 256}", 0.0)
        if i % 10 == 0:
            assert rl.check("198.51.100.1", 0.0) == DROP   # seen recently: kept, still limited
        assert len(rl) <= 100
    assert len(rl) == 100


def test_clock_going_backwards_grants_nothing():
    rl = RateLimiter(rate=1, burst=1, slip=0)
    assert rl.check("192.0.2.1", 100.0) == PASS
    assert rl.check("192.0.2.1", 50.0) == DROP
    assert rl.check("192.0.2.1", 100.5) == DROP
    assert rl.check("192.0.2.1", 101.0) == PASS


def test_rate_must_be_positive():
    with pytest.raises(ValueError):
        RateLimiter(rate=0)


def test_slip_answer_is_header_and_question_with_tc():
    query = dns.message.make_query("www.example.test", "TXT", use_edns=0, payload=4096)
    query.flags |= dns.flags.RD
    wire = query.to_wire()
    answer = slip_answer(wire)
    assert len(answer) <= len(wire)                      # never larger than the query
    parsed = dns.message.from_wire(answer)
    assert parsed.id == query.id
    assert parsed.flags & dns.flags.QR and parsed.flags & dns.flags.TC and parsed.flags & dns.flags.RD
    assert parsed.question == query.question
    assert not parsed.answer and not parsed.authority


@pytest.mark.parametrize("data", [b"", b"\x00" * 11, b"\x12\x34\x80\x00" + b"\x00" * 8,
                                  b"\x12\x34\x01\x00\x00\x02" + b"\x00" * 6])
def test_slip_answer_drops_what_is_not_a_query(data):
    assert slip_answer(data) is None
