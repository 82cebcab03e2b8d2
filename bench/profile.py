"""Where a query's time goes inside sinkhole: (1) each stage of core.begin and of the server's UDP
path timed in-process with perf_counter_ns over many iterations, on the same generated blocklist
as bench.py; (2) cProfile of the real server under dnsperf load (blocked, then cached names),
pinned as in the benchmark. Prints both and writes bench/results/profile-<timestamp>.json.

    python bench/profile.py                     # 100,000 names, in-process + server profile
    python bench/profile.py --names 20000 --no-server
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import pstats
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH = 64                       # datagrams per batch, as udp.batch's default
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import workload as wl  # noqa: E402
from resolver import core  # noqa: E402
from resolver import server as server_module  # noqa: E402
from resolver.cache import Cache  # noqa: E402
from resolver.config import Config, QueryLogConfig  # noqa: E402
from resolver.loader import load_policy  # noqa: E402
from resolver.observe import Quiet  # noqa: E402
from resolver.querylog import QueryLog  # noqa: E402
from resolver.udpio import udp_io  # noqa: E402
from resolver.wire import block_reply, build_reply, parse_query, parse_reply, truncate  # noqa: E402


def wire_name(name: str) -> bytes:
    return b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"


def query_bytes(name: str, qid: int = 0x1234) -> bytes:
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + wire_name(name) + b"\0\1\0\1"


def upstream_answer(name: str, qid: int) -> bytes:
    """What the upstream says: one A record, TTL 3600, name compressed to the question."""
    question = wire_name(name) + b"\0\1\0\1"
    return (struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question
            + b"\xc0\x0c\0\1\0\1" + struct.pack("!IH", 3600, 4) + bytes([192, 0, 2, 1]))


def timeit(fn, items, repeat: int = 5, loops: int = 1) -> float:
    """Best-of-`repeat` mean nanoseconds per call of fn(item) over `items`."""
    best = None
    n = len(items) * loops
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            for item in items:
                fn(item)
        dt = (time.perf_counter_ns() - t0) / n
        best = dt if best is None or dt < best else best
    return best


def loop_turn(tmp: Path, policy, observer, datagram: bytes, client: str, turns: int, repeat: int = 5) -> float:
    """ns per turn of the server's UDP loop (Server._udp_loop) for a batch of one datagram whose
    answer is remembered: the real loop, query log and observer, with an IO that hands out the
    same datagram `turns` times and sends nothing (the socket's part is the stages above)."""
    class Repeat:
        def __init__(self, n):
            self.n = n

        def receive(self, dontwait=False):
            self.n -= 1
            return [(datagram[2:], client, 0)] if self.n >= 0 else None

        def send(self, replies, reused=()):
            pass

        def address(self, ref):
            return client, 53000

        def query(self, ref):
            return datagram

    config = Config(blocklists=str(tmp / "bl"), query_log=QueryLogConfig(str(tmp / "loop.jsonl"), 0))
    server = server_module.Server(config, policy, observer)
    server.querylog.start()
    made = server_module.udp_io
    best = float("inf")
    try:
        for _ in range(repeat):
            server_module.udp_io = lambda sock, *args: Repeat(turns)
            t0 = time.perf_counter()
            server._udp_loop(None)
            best = min(best, (time.perf_counter() - t0) / turns * 1e9)
    finally:
        server_module.udp_io = made
        server.querylog.close()
    return best


def stages(names: int, iterations: int, seed: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="sinkhole-profile-"))
    try:
        blocked = wl.blocked_names(names, seed)
        allowed = wl.allowed_names(2000)
        wl.write_blocklists(tmp / "bl", blocked)
        t0 = time.perf_counter()
        policy = load_policy(tmp / "bl", time.time())
        load_s = time.perf_counter() - t0
        now = time.time()
        cache = Cache(10000)
        ctx = core.Context(cache)
        for i, name in enumerate(allowed):
            q = parse_query(query_bytes(name, i))
            cache.put(q.key, parse_reply(upstream_answer(name, i), q.key, i), now)
        k = min(iterations, len(blocked))
        bq = [query_bytes(n) for n in blocked[:k]]
        aq = [query_bytes(allowed[i % len(allowed)]) for i in range(k)]
        desktop, mobile = wl.DESKTOP_CLIENT, wl.MOBILE_CLIENT
        group_d, _ = policy.classify(desktop)
        parsed_b = [parse_query(d) for d in bq]
        parsed_a = [parse_query(d) for d in aq]
        decisions_b = [core.decide(policy, desktop, q.qname, now) for q in parsed_b]
        assert all(d.action == "block" for d in decisions_b), "blocked names must be blocked"
        hits = [cache.get(q.key, now) for q in parsed_a]
        assert all(h is not None for h in hits), "allowed names must be cached"
        out_b = [core.begin(d, desktop, policy, ctx, now) for d in bq]
        out_a = [core.begin(d, desktop, policy, ctx, now) for d in aq]
        assert all(o[1].action == "blocked" for o in out_b) and all(o[1].action == "cached" for o in out_a)
        qlog = QueryLog(str(tmp / "q.jsonl"), 0, 0, 10 ** 7)      # not started: log() only enqueues
        outcome = out_b[0][1]
        try:                                   # the observer `serve` uses when metrics are on
            import prometheus_client
            from resolver.metrics import PrometheusObserver
            observer = PrometheusObserver(None, registry=prometheus_client.CollectorRegistry())
        except ImportError:
            observer = Quiet()
        sink = open(os.devnull, "w")
        sa, sb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sa.bind(("127.0.0.1", 0))
        sb.bind(("127.0.0.1", 0))
        addr_b = sb.getsockname()
        rows = {}

        def t(name, fn, items, path):
            rows[name] = {"ns": round(timeit(fn, items)), "path": path}

        def t_batch(name, fn, items):
            """A stage the server runs once per batch of BATCH answers: its cost per answer."""
            rows[name] = {"ns": round(timeit(fn, items) / BATCH), "path": "both", "note": f"per answer, "
                          f"batches of {BATCH}"}

        # the stages of core.begin, in its order
        t("classify (policy.classify, memoised)", lambda c: policy.classify(c), [desktop, mobile] * (k // 2), "both")
        t("parse_query", parse_query, bq, "both")
        t("match, blocked name (policy.match)", lambda q: policy.match(group_d, q.qname), parsed_b, "blocked")
        t("match, allowed name (policy.match)", lambda q: policy.match(group_d, q.qname), parsed_a, "cached")
        t("decide, blocked (classify + match + Decision)", lambda q: core.decide(policy, desktop, q.qname, now),
          parsed_b, "blocked")
        t("decide, allowed", lambda q: core.decide(policy, desktop, q.qname, now), parsed_a, "cached")
        t("Outcome(...)", lambda q: core.Outcome("blocked", "desktop", q.qname, q.qtype, 0, "s", "f:1", None,
                                                 desktop, 512), parsed_b, "both")
        t("block_reply (+ sinkhole lookup)", lambda qd: block_reply(qd[0], qd[1].response, qd[1].ttl,
                                                                    *core._sinkhole(policy, qd[1])),
          list(zip(parsed_b, decisions_b)), "blocked")
        t("cache.get", lambda q: cache.get(q.key, now), parsed_a, "cached")
        t("build_reply (TTL rewrite)", lambda qh: build_reply(qh[0], qh[1][0], 5, None), list(zip(parsed_a, hits)),
          "cached")
        t("core.begin, blocked (all of the above)", lambda d: core.begin(d, desktop, policy, ctx, now), bq, "blocked")
        t("core.begin, cached (all of the above)", lambda d: core.begin(d, desktop, policy, ctx, now), aq, "cached")
        # the server around core.begin (Server._udp_loop)
        t("perf_counter x2 + time.time", lambda _: (time.perf_counter(), time.time(), time.perf_counter()),
          bq, "both")
        t("truncate", lambda o: truncate(o[0], o[1].udp_limit), out_b, "both")
        t("observer.query (" + type(observer).__name__ + ")", lambda o: observer.query(o, 1e-5), [outcome] * k,
          "both")
        sig, middle = observer.signature(outcome), qlog.middle(outcome)
        for d, (reply, out) in zip(bq, out_b):
            policy.remember(desktop, out.group, d[2:], core.keep(reply, out, sig, middle, out.renewal))
        tables = policy.answer_tables
        t("reused answer: two dict lookups (the ID goes in at send)",
          lambda q: tables.get(desktop).get(q)[0], [d[2:] for d in bq], "both")
        # per batch of BATCH answers (Server._udp_loop), shown per answer
        field = QueryLog.client(desktop)
        batches = [None] * max(1, k // BATCH)
        t_batch("observer.count_many, one batch (reused answers)",
                lambda _: observer.count_many([sig] * BATCH, 1e-5), batches)
        t("querylog.log (one line, Outcome formatted)", lambda o: qlog.log(now, o, 1e-5), [outcome] * k, "both")
        t_batch("querylog.write_many, one batch (reused answers)",
                lambda _: qlog.write_many(now, 1e-5, [field + middle] * BATCH), batches)
        rows[f"querylog.write_many, one batch (reused answers)"]["note"] = \
            "includes joining CHUNK lines into a block for the writer (QueryLog.render)"
        t("querylog writer: write the line (writer thread)", lambda o: sink.write("x" * 200 + "\n"),
          [outcome] * k, "both")
        t("socket recvfrom + sendto, one loopback packet", lambda d: (sa.sendto(d, addr_b), sb.recvfrom(65535)),
          bq, "both")
        io = udp_io(sb, BATCH)

        def batch_io(_):
            for d in bq[:BATCH]:
                sa.sendto(d, addr_b)
            got = io.receive()
            io.send((), [(question, ref) for question, _, ref in got])     # as reused answers
            for _ in got:
                sa.recv(65535)
        t_batch(f"{type(io).__name__}: receive() + send(), one batch of loopback datagrams "
                "(client side included)", batch_io, batches[:200])
        rows["Server._udp_loop: one turn for a lone remembered block (no socket: an IO that hands "
             "out the same datagram)"] = {"ns": round(loop_turn(tmp, policy, observer, bq[0], desktop, k)),
                                          "path": "both", "note": "batch of one: lists, lock, clocks, "
                                          "lookup, count_many, write_many (query log on)"}
        sa.close()
        sb.close()
        sink.close()
        return {"names": names, "iterations": k, "policy_load_s": round(load_s, 2), "stages_ns": rows}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def server_profile(names: int, seconds: float, seed: int, top: int) -> dict:
    """cProfile of `sinkhole serve` (pinned to CPU 1) while dnsperf (CPU 0) sends blocked names,
    then cached names, from a desktop client."""
    from procs import Sinkhole, Upstream, metrics_available, pinning
    import dnsperf
    tmp = Path(tempfile.mkdtemp(prefix="sinkhole-profile-srv-"))
    pin_ok, _ = pinning()
    server_cpu, client_cpu = (1, 0) if pin_ok else (None, None)
    upstream = sink = None
    try:
        blocked = wl.blocked_names(names, seed)
        allowed = wl.allowed_names(2000)
        bl = wl.write_blocklists(tmp / "bl", blocked)
        files = {"blocked": wl.write_queries(tmp / "b.txt", wl.shuffled(blocked)),
                 "cached": wl.write_queries(tmp / "a.txt", wl.shuffled(allowed))}
        upstream = Upstream(tmp, client_cpu, wl.UPSTREAM_ZONE).start("probe." + wl.UPSTREAM_ZONE)

        class Profiled(Sinkhole):
            def command(self):
                cmd = super().command()
                i = cmd.index("-m")
                return cmd[:i] + [str(HERE / "profiled_serve.py"), str(tmp / "server.prof")] + cmd[i + 2:]
        sink = Profiled(tmp, server_cpu, upstream.port, bl, 10000, metrics=metrics_available()[0])
        sink.start("probe." + wl.UPSTREAM_ZONE, deadline=600)
        dnsperf.run(sink.port, files["cached"], 30, wl.MOBILE_CLIENT, [], [], client_cpu, tmp, max_runs=1)
        runs = {}
        for name in ("blocked", "cached"):
            runs[name] = dnsperf.run(sink.port, files[name], seconds, wl.DESKTOP_CLIENT, sink.pids(), [],
                                     client_cpu, tmp)
        sink.proc.send_signal(signal.SIGTERM)
        sink.proc.wait(60)
        buf = io.StringIO()
        stats = pstats.Stats(str(tmp / "server.prof"), stream=buf)
        stats.sort_stats("tottime").print_stats(top)
        by_self = buf.getvalue()
        buf2 = io.StringIO()
        pstats.Stats(str(tmp / "server.prof"), stream=buf2).sort_stats("cumulative").print_stats(top)
        return {"seconds_each": seconds, "runs": {k: {x: v.get(x) for x in ("qps", "completed", "lost",
                                                                             "server_cpu_us_per_q")}
                                                  for k, v in runs.items()},
                "top_by_self_time": _trim(by_self), "top_by_cumulative": _trim(buf2.getvalue())}
    finally:
        for proc in (sink, upstream):
            if proc is not None:
                proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _trim(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if "ncalls" in l), 0)
    return "\n".join(l.replace(str(HERE.parent) + "/", "") for l in lines[start:] if l.strip())


def render(result: dict) -> str:
    s = result["stages"]
    lines = [f"In-process stage costs ({s['names']} names loaded in {s['policy_load_s']} s; best of 5 means "
             f"over {s['iterations']} queries; the server runs these on one core):", "",
             "| stage | path | ns per query |", "|---|---|---:|"]
    for name, row in s["stages_ns"].items():
        lines.append(f"| {name} | {row['path']} | {row['ns']} |")
    if result.get("server"):
        sp = result["server"]
        lines += ["", f"cProfile of `sinkhole serve` under dnsperf ({sp['seconds_each']} s blocked, then "
                  f"{sp['seconds_each']} s cached; profiling slows it): "
                  + ", ".join(f"{k} {v['qps']} q/s, {v['server_cpu_us_per_q']} CPU µs/q" for k, v in sp["runs"].items()),
                  "", "Top functions by own time:", "", "```", sp["top_by_self_time"], "```"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", type=int, default=100_000)
    p.add_argument("--iterations", type=int, default=20_000)
    p.add_argument("--seconds", type=float, default=5, help="dnsperf seconds per workload under cProfile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-server", action="store_true", help="skip the cProfile run of the server")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if hasattr(os, "sched_setaffinity") and {1} <= os.sched_getaffinity(0):
        os.sched_setaffinity(0, {1})             # in-process timings on the server's core
    result = {"started": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
              "stages": stages(args.names, args.iterations, args.seed)}
    os.sched_setaffinity(0, os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
    if not args.no_server:
        if shutil.which("dnsperf") and shutil.which("dnsmasq"):
            result["server"] = server_profile(args.names, args.seconds, args.seed, args.top)
        else:
            print("profile: dnsperf or dnsmasq missing: no server profile", file=sys.stderr)
    text = render(result)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-{result['started']}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
