"""The benchmark of issue 7: sinkhole beside dnsmasq and Unbound, same blocklist, same upstream,
driven by dnsperf in the same run, interleaved over rounds, server pinned to CPU 1 and dnsperf to
CPU 0. Writes bench/results/<timestamp>.json, prints the table, and writes bench/RESULTS.md.

    python bench/bench.py                       # the full run (several minutes)
    python bench/bench.py -l 3 --rounds 1 --no-scale   # a quick check
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dnsperf  # noqa: E402
import workload as wl  # noqa: E402
from procs import (Dnsmasq, HaltPoll, PyRaw, Sinkhole, Unbound, Upstream, metrics_available, pinning,  # noqa: E402
                   probe, quiet_gate, rss_mib, workers_supported)

SERVER_CPU, CLIENT_CPU = 1, 0
LATENCY_QPS = 10_000
WARM_PASSES = 16                 # one-socket warm-up passes at most for a --workers server
# workload -> (client address, what it asks)
WORKLOADS = {
    "blocked": (wl.DESKTOP_CLIENT, "every blocked name, shuffled (desktop client)"),
    "cached": (wl.DESKTOP_CLIENT, "allowed names answered from the warmed cache (desktop client)"),
    "cached-mobile": (wl.MOBILE_CLIENT, "the same from a mobile client (group blocking nothing)"),
    "mix30": (wl.DESKTOP_CLIENT, "30 % blocked / 70 % cached, shuffled (desktop client)"),
    "miss": (wl.MOBILE_CLIENT, "unique names: every query goes to the upstream (mobile client)"),
}
RATE_WORKLOADS = ("blocked", "cached", "mix30")    # also run at 80 % of our peak rate
SERVERS = ("sinkhole", "dnsmasq", "unbound", "pyraw")
OTHERS = ("dnsmasq", "unbound", "pyraw")           # the same-round ratios sinkhole / each of these


def tool_versions() -> dict:
    def first_line(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            text = (out.stdout or out.stderr).strip().splitlines()
            return next((l for l in text if l.strip()), "")
        except (OSError, subprocess.TimeoutExpired):
            return None
    return {"dnsperf": first_line(["sh", "-c", "dnsperf -h 2>&1 | grep -i version"]),
            "dnsmasq": first_line(["dnsmasq", "--version"]),
            "unbound": first_line(["sh", "-c", "unbound -V | head -1"]),
            "python": sys.version.split()[0], "kernel": platform.release(),
            "cpu": next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                         if l.startswith("model name")), None), "cpus": os.cpu_count()}


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="sinkhole-bench-"))
        pin_ok, self.pin_note = pinning()
        self.server_cpu, self.client_cpu = (SERVER_CPU, CLIENT_CPU) if pin_ok else (None, None)
        self.metrics_on, self.metrics_note = metrics_available()
        self.workers_on = workers_supported()
        self.servers: dict = {}
        self.upstream = None
        self.runs: list[dict] = []

    def log(self, *parts):
        print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)

    # -- setup ----------------------------------------------------------------------------------
    def prepare(self):
        a = self.args
        self.blocked = wl.blocked_names(a.names, a.seed)
        self.allowed = wl.allowed_names(a.allowed)
        self.files = {
            "blocked": wl.write_queries(self.tmp / "blocked.txt", wl.shuffled(self.blocked)),
            "cached": wl.write_queries(self.tmp / "allowed.txt", wl.shuffled(self.allowed)),
            "mix30": wl.write_queries(self.tmp / "mix30.txt", wl.mix(self.blocked, self.allowed, 0.3, 20000)),
        }
        self.files["cached-mobile"] = self.files["cached"]
        self.blocklists = wl.write_blocklists(self.tmp / "blocklists", self.blocked)
        self.dnsmasq_list = wl.write_dnsmasq_list(self.tmp / "dnsmasq-block.conf", self.blocked)
        self.unbound_list = wl.write_unbound_list(self.tmp / "unbound-block.conf", self.blocked)

    def start_servers(self):
        a = self.args
        self.upstream = Upstream(self.tmp, self.client_cpu, wl.UPSTREAM_ZONE).start("probe." + wl.UPSTREAM_ZONE)
        kinds = {
            "sinkhole": lambda: Sinkhole(self.tmp, self.server_cpu, self.upstream.port, self.blocklists,
                                         a.cache_size, metrics=self.metrics_on),
            "dnsmasq": lambda: Dnsmasq(self.tmp, self.server_cpu, self.upstream.port, self.dnsmasq_list, a.cache_size),
            "unbound": lambda: Unbound(self.tmp, self.server_cpu, self.upstream.port, self.unbound_list, a.cache_size),
            "pyraw": lambda: PyRaw(self.tmp, self.server_cpu, self.upstream.port, list_files(self.blocklists),
                                   a.cache_size),
        }
        if self.workers_on and a.workers > 1:
            # unpinned: N processes on one core would say nothing; they share both cores with dnsperf
            kinds[f"sinkhole-w{a.workers}"] = lambda: Sinkhole(
                self.tmp, None, self.upstream.port, self.blocklists, a.cache_size,
                workers=a.workers, metrics=self.metrics_on)
        if a.nolog:
            kinds["sinkhole-nolog"] = lambda: Sinkhole(self.tmp, self.server_cpu, self.upstream.port, self.blocklists,
                                                       a.cache_size, metrics=self.metrics_on, querylog=False)
        extra = [k for k in kinds if k not in SERVERS]
        for name in a.servers + extra:
            self.log("starting", name)
            server = kinds[name]().start("probe." + wl.UPSTREAM_ZONE, deadline=a.start_deadline)
            pids = server.pids()
            server.rss_loaded = rss_mib(pids)
            self.servers[name] = server
            self.log(f"  {name} ready in {server.ready_s:.2f} s, RSS {server.rss_loaded:.1f} MiB")
        self.check_equivalence()

    def check_equivalence(self):
        """Every server must give the same answers before any figure means anything."""
        cases = [(self.blocked[1], wl.DESKTOP_CLIENT, 3), ("x." + self.blocked[2], wl.DESKTOP_CLIENT, 3),
                 (self.allowed[0], wl.DESKTOP_CLIENT, 0), (self.allowed[1], wl.MOBILE_CLIENT, 0)]
        for name, server in self.servers.items():
            for qname, source, want in cases:
                got = probe("127.0.0.1", server.port, qname, source, timeout=2)
                if got != want:
                    raise SystemExit(f"{name} answers {qname} from {source} with rcode {got}, expected {want}")

    def stop_servers(self):
        for server in list(self.servers.values()) + ([self.upstream] if self.upstream else []):
            server.stop()

    # -- one measured run -----------------------------------------------------------------------
    def gate(self):
        own = [p for s in self.servers.values() for p in s.pids()] + self.upstream.pids()
        return quiet_gate(own, self.args.quiet_limit, self.args.quiet_wait)

    def measure(self, round_no, workload, name, kind, datafile, seconds, qps=None, verbose=False, max_runs=None):
        server = self.servers[name]
        gate = self.gate()
        if gate["timed_out"]:
            self.log(f"  quiet gate timed out after {gate['waited_s']} s ({gate['foreign_cores']} cores busy elsewhere)")
        logging = isinstance(server, Sinkhole) and server.querylog_on
        if logging:
            server.querylog_lines()          # empty the log: count only this run's lines
        result = dnsperf.run(server.port, datafile, seconds, WORKLOADS[workload][0], server.pids(),
                             self.upstream.pids(), self.client_cpu, self.tmp, qps=qps, verbose=verbose,
                             max_runs=max_runs)
        result.update({"round": round_no, "workload": workload, "server": name, "kind": kind, "gate": gate,
                       "rss_mib": round(rss_mib(server.pids()), 1)})
        if logging:
            result["querylog_lines"] = server.querylog_lines()
        self.runs.append(result)
        lat = (f" p50 {result.get('p50_ms')} p99 {result.get('p99_ms')} ms, stalls {result.get('stalls')} "
               f"({result.get('stalled')} answers)" if verbose else "")
        self.log(f"  r{round_no} {workload:13} {name:11} {kind:8} {result.get('qps') or 0:>9.0f} q/s "
                 f"lost {result.get('lost_pct')}% cpu {result.get('server_cpu_us_per_q')} us/q"
                 f"{lat} foreign {result['foreign_cores']}" + (f" ERROR {result['error']}" if "error" in result else ""))
        return result

    def warm(self, name):
        """Put the allowed names in the server's cache (asked from the mobile client, which
        everything allows). A --workers server keeps a cache per worker, and the kernel hands each
        source port to one worker, so one pass of dnsperf's four sockets may leave a worker with a
        quarter of the names (or none); it then gets one-socket passes until each worker has made a
        whole pass of lookups (its metrics say), at most WARM_PASSES."""
        server = self.servers[name]
        workers = getattr(server, "workers", 1)
        if workers <= 1:
            self.warm_port(server.port)
            return
        cold = set(range(workers))
        for _ in range(WARM_PASSES):
            before = server.cache_requests()
            self.warm_port(server.port, clients=1)
            after = server.cache_requests()
            if before is not None:
                cold -= {i for i, (a, b) in enumerate(zip(after, before)) if a - b >= len(self.allowed)}
                if not cold:
                    return
        if before is not None:
            self.log(f"  {name}: workers {sorted(cold)} not warmed by {WARM_PASSES} one-socket passes")

    # -- the rounds -----------------------------------------------------------------------------
    def rounds(self):
        a = self.args
        names = list(self.servers)
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]     # interleaved, rotated
            for workload in a.workloads:
                peak = {}
                for name in order:
                    if workload == "miss":
                        self.miss_runs(r, name)
                        continue
                    if workload != "blocked":
                        self.warm(name)
                    peak[name] = self.measure(r, workload, name, "peak", self.files[workload], a.seconds)
                    self.measure(r, workload, name, "lat10k", self.files[workload], a.latency_seconds,
                                 qps=LATENCY_QPS, verbose=True)
                ours = (peak.get("sinkhole") or {}).get("qps")
                if workload in RATE_WORKLOADS and ours:
                    rate = int(ours * 0.8)
                    for name in order:
                        self.measure(r, workload, name, "at80", self.files[workload], a.seconds, qps=rate)
            if "miss" in a.workloads:
                self.miss_baseline(r)

    def miss_file(self, tag, count):
        return wl.write_queries(self.tmp / "miss.txt", wl.miss_names(count, f"{tag}{time.monotonic_ns() % 10**9:x}"))

    def miss_runs(self, r, name):
        a = self.args
        self.measure(r, "miss", name, "peak", self.miss_file("p", int(a.seconds * 60000)), a.seconds, max_runs=1)
        self.measure(r, "miss", name, "latmiss", self.miss_file("l", int(a.latency_seconds * a.miss_rate) + 100),
                     a.latency_seconds, qps=a.miss_rate, verbose=True, max_runs=1)

    def miss_baseline(self, r):
        """The upstream's own latency at the same rate, asked directly: what the servers add to."""
        a = self.args
        up = self.upstream
        gate = self.gate()
        result = dnsperf.run(up.port, self.miss_file("u", int(a.latency_seconds * a.miss_rate) + 100),
                             a.latency_seconds, wl.MOBILE_CLIENT, up.pids(), [], self.client_cpu, self.tmp,
                             qps=a.miss_rate, verbose=True, max_runs=1)
        result.update({"round": r, "workload": "miss", "server": "upstream", "kind": "latmiss", "gate": gate})
        self.runs.append(result)
        self.log(f"  r{r} miss upstream alone p50 {result.get('p50_ms')} p99 {result.get('p99_ms')} ms")

    # -- scale: a big list, its load time, RSS, and latency during a reload ---------------------
    def scale(self):
        a = self.args
        n = a.scale_names
        self.log(f"scale: {n} names")
        tmp = self.tmp / "scale"
        tmp.mkdir()
        names = wl.blocked_names(n, a.seed + 1)
        out = {"names": n}
        blocklists = wl.write_blocklists(tmp / "blocklists", names)
        lists = {"dnsmasq": wl.write_dnsmasq_list(tmp / "dnsmasq-block.conf", names),
                 "unbound": wl.write_unbound_list(tmp / "unbound-block.conf", names)}
        for name in a.servers:
            if name == "sinkhole":
                server = Sinkhole(tmp, self.server_cpu, self.upstream.port, blocklists, a.cache_size,
                                  metrics=self.metrics_on)
            elif name == "dnsmasq":
                server = Dnsmasq(tmp, self.server_cpu, self.upstream.port, lists[name], a.cache_size)
            elif name == "pyraw":
                server = PyRaw(tmp, self.server_cpu, self.upstream.port, list_files(blocklists), a.cache_size)
            else:
                server = Unbound(tmp, self.server_cpu, self.upstream.port, lists[name], a.cache_size)
            try:
                server.start("probe." + wl.UPSTREAM_ZONE, deadline=a.scale_deadline)
            except RuntimeError as e:
                out[name] = {"error": str(e)[:500]}
                self.log(f"  {name} failed: {e}")
                continue
            pids = server.pids()
            row = {"load_s": round(server.ready_s, 2), "rss_mib": round(rss_mib(pids), 1),
                   "peak_rss_mib": round(rss_mib(pids, "VmHWM"), 1)}
            self.log(f"  {name}: ready in {row['load_s']} s, RSS {row['rss_mib']} MiB (peak {row['peak_rss_mib']})")
            if name == "sinkhole":
                row["reload"] = self.reload_latency(server, tmp, names)
            server.stop()
            out[name] = row
        return out

    def reload_latency(self, server, tmp, names):
        """dnsperf at a steady rate (mix of blocked and cached names) while the server reloads the
        big list after SIGHUP; the run ends once the new policy is in force."""
        a = self.args
        queries = wl.write_queries(tmp / "reload-mix.txt", wl.mix(names, self.allowed, 0.3, 20000))
        self.warm_port(server.port)
        # change the list so the reload is a real one (a name added to the first plain-text list)
        with (tmp / "blocklists" / "services" / f"{wl.BLOCK_SERVICE}.txt").open("a") as f:
            f.write("reload-marker.example\n")
        start, last_probe = [None], [0.0]

        def reloaded():
            """SIGHUP after one quiet second; done once the marker name is blocked (the new policy
            is in force) or the server says the reload failed."""
            now = time.monotonic()
            if start[0] is None:
                if now - t0 > 1.0:
                    start[0] = now
                    server.proc.send_signal(signal.SIGHUP)
                return False
            if now - last_probe[0] < 0.2:
                return False
            last_probe[0] = now
            if probe("127.0.0.1", server.port, "reload-marker.example", wl.DESKTOP_CLIENT, timeout=0.5) == 3:
                return True
            text = server.log.read_text(errors="replace")
            return "reload rejected" in text or "reload failed" in text
        t0 = time.monotonic()
        result = dnsperf.run(server.port, queries, a.scale_deadline, wl.DESKTOP_CLIENT, server.pids(),
                             self.upstream.pids(), self.client_cpu, tmp, qps=a.reload_rate, verbose=True,
                             stop_when=reloaded)
        done = result["interrupted"]
        result["reload_done"] = done
        result["reload_s"] = round(time.monotonic() - start[0], 2) if start[0] else None
        blocked_now = probe("127.0.0.1", server.port, "reload-marker.example", wl.DESKTOP_CLIENT, timeout=2)
        result["new_policy_in_force"] = blocked_now == 3
        self.log(f"  reload: done {done} in ~{result['reload_s']} s; latency during it p50 {result.get('p50_ms')} "
                 f"p99 {result.get('p99_ms')} max {result.get('max_ms')} ms, lost {result.get('lost_pct')}%")
        return result

    def warm_port(self, port, clients=4):
        """One pass of the allowed names from the mobile client over `clients` sockets."""
        dnsperf.run(port, self.files["cached"], 30, wl.MOBILE_CLIENT, [], [], self.client_cpu, self.tmp, max_runs=1,
                    clients=clients)


def list_files(blocklists: Path) -> list[Path]:
    """The plain name lists (one name per line) that workload.write_blocklists put in a blocklists
    directory: what pyraw loads."""
    return sorted((blocklists / "services").glob("*.txt"))


# -- summary ---------------------------------------------------------------------------------------
def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def summarise(runs: list[dict], foreign_limit: float) -> dict:
    """Medians per (workload, server, kind) over clean runs (foreign load under the limit; all runs
    when none is clean), and the same-round ratios ours/dnsmasq, ours/unbound and ours/pyraw."""
    cells: dict = {}
    for run in runs:
        cells.setdefault((run["workload"], run["server"], run["kind"]), []).append(run)
    table = {}
    for (workload, server, kind), rs in cells.items():
        clean = [r for r in rs if r["foreign_cores"] <= foreign_limit] or rs
        table.setdefault(workload, {}).setdefault(server, {})[kind] = {
            "runs": len(rs), "clean_runs": sum(r["foreign_cores"] <= foreign_limit for r in rs),
            **{k: median([r.get(k) for r in clean]) for k in
               ("qps", "lost_pct", "p50_ms", "p99_ms", "p99.9_ms", "max_ms", "server_cpu_us_per_q",
                "rss_mib", "offered_qps", "foreign_cores")},
            "lost_max": max((r.get("lost") or 0) for r in clean),
        }
        if server.startswith("sinkhole") and "nolog" not in server:
            table[workload][server][kind]["querylog_ratio"] = median(
                [r.get("querylog_lines", 0) / r["completed"] for r in clean if r.get("completed")])
    ratios: dict = {}
    by_round: dict = {}
    for run in runs:
        by_round.setdefault((run["workload"], run["kind"], run["round"]), {})[run["server"]] = run
    for (workload, kind, rnd), servers in by_round.items():
        ours = servers.get("sinkhole")
        if kind not in ("peak", "at80") or not ours:
            continue
        for other in OTHERS:
            theirs = servers.get(other)
            if not theirs:
                continue
            clean = max(ours["foreign_cores"], theirs["foreign_cores"]) <= foreign_limit
            entry = ratios.setdefault(workload, {}).setdefault(other, {"qps": [], "cpu": [], "clean": []})
            if kind == "peak" and ours.get("qps") and theirs.get("qps"):
                entry["qps"].append(round(ours["qps"] / theirs["qps"], 3))
                entry["clean"].append(clean)
            if kind == "at80" and ours.get("server_cpu_us_per_q") and theirs.get("server_cpu_us_per_q"):
                entry["cpu"].append(round(ours["server_cpu_us_per_q"] / theirs["server_cpu_us_per_q"], 3))
    for workload in ratios.values():
        for entry in workload.values():
            use = [q for q, c in zip(entry["qps"], entry["clean"]) if c] or entry["qps"]
            entry["qps_median"] = median(use)
            entry["cpu_median"] = median(entry["cpu"])
    return {"table": table, "ratios": ratios}


def targets(summary: dict, servers: dict, scale: dict | None, names: int) -> list[dict]:
    """The issue's targets, each with the measured value and the margin."""
    t, ratios, out = summary["table"], summary["ratios"], []

    def add(what, value, goal, ok):
        out.append({"target": what, "measured": value, "goal": goal,
                    "met": None if value is None else bool(ok)})
    for w in ("blocked", "cached"):
        r = ratios.get(w, {}).get("dnsmasq", {}).get("qps_median")
        add(f"{w}: q/s vs dnsmasq (median same-round ratio)", r, ">= 1.0", r is not None and r >= 1.0)
        u = ratios.get(w, {}).get("unbound", {}).get("qps_median")
        add(f"{w}: q/s vs Unbound (report only)", u, "report", True)
        at80 = t.get(w, {}).get("sinkhole", {}).get("at80", {})
        add(f"{w}: lost queries at 80 % of our peak ({at80.get('offered_qps')} q/s)", at80.get("lost_max"), "0",
            at80.get("lost_max") == 0)
        p99 = t.get(w, {}).get("sinkhole", {}).get("lat10k", {}).get("p99_ms")
        add(f"{w}: p99 latency at 10k q/s, ms", p99, "< 0.1", p99 is not None and p99 < 0.1)
    ours = t.get("miss", {}).get("sinkhole", {}).get("latmiss", {}).get("p50_ms")
    base = t.get("miss", {}).get("upstream", {}).get("latmiss", {}).get("p50_ms")
    added = round(ours - base, 4) if ours is not None and base is not None else None
    add("miss: median latency added to the upstream's own, ms", added, "<= 1.0", added is not None and added <= 1.0)
    rss = servers.get("sinkhole", {}).get("rss_loaded_mib")
    add(f"{names} names: RSS after load, MiB", rss, "< 50", rss is not None and rss < 50)
    if scale and isinstance(scale.get("sinkhole"), dict) and "load_s" in scale["sinkhole"]:
        s = scale["sinkhole"]
        add(f"{scale['names']} names: load time, s", s["load_s"], "< 10", s["load_s"] < 10)
        add(f"{scale['names']} names: RSS, MiB", s["rss_mib"], "< 500", s["rss_mib"] < 500)
        mx = (s.get("reload") or {}).get("max_ms")
        add(f"{scale['names']} names: max query latency during a reload, ms", mx, "< 100",
            mx is not None and mx < 100 and s["reload"].get("reload_done"))
    elif scale:
        add(f"{scale['names']} names: load", None, "< 10 s, < 500 MiB", False)
    return out


def render(result: dict) -> str:
    s, meta = result["summary"], result["meta"]
    lines = [f"Run {meta['started']} on {meta['versions']['cpu']} ({meta['versions']['cpus']} CPUs), "
             f"{meta['rounds']} round(s) x {meta['seconds']} s, {meta['names']} blocked names. "
             f"Pinning: {meta['pinning']}. {meta['metrics']}. Query log: on (file). "
             f"Workers: {meta['workers']}. Idle CPUs: {meta.get('idle', '-')}.", ""]
    lines.append("| workload | server | q/s (peak) | lost % (peak) | p50 / p99 ms @10k | lost @80 % of ours "
                 "| server CPU µs/q (peak / @80 %) | RSS MiB | query-log lines/answer | clean runs |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workload, servers in s["table"].items():
        for server, kinds in servers.items():
            peak, lat = kinds.get("peak", {}), kinds.get("lat10k") or kinds.get("latmiss", {})
            at80 = kinds.get("at80", {})
            latn = "" if "lat10k" in kinds else f" (@{meta['miss_rate']})" if lat else ""
            lines.append(
                f"| {workload} | {server} | {_f(peak.get('qps'), 0)} | {_f(peak.get('lost_pct'), 2)} "
                f"| {_f(lat.get('p50_ms'), 3)} / {_f(lat.get('p99_ms'), 3)}{latn} "
                f"| {_f(at80.get('lost_max'), 0) if at80 else '-'} "
                f"| {_f(peak.get('server_cpu_us_per_q'), 1)} / {_f(at80.get('server_cpu_us_per_q'), 1)} "
                f"| {_f(peak.get('rss_mib') or lat.get('rss_mib'), 1)} "
                f"| {_f(peak.get('querylog_ratio'), 3) if 'querylog_ratio' in peak else '-'} "
                f"| {peak.get('clean_runs', lat.get('clean_runs', '-'))}/{peak.get('runs', lat.get('runs', '-'))} |")
    # pyraw's columns only when it ran: a run without it keeps the table it always had
    raw = any("pyraw" in others for others in s["ratios"].values())
    lines += ["", "Same-round ratios, sinkhole / other (median [min..max] over rounds):", "",
              "| workload | q/s / dnsmasq | q/s / Unbound | CPU µs/q @80 % / dnsmasq | CPU µs/q @80 % / Unbound |"
              + (" q/s / pyraw | CPU µs/q @80 % / pyraw |" if raw else ""),
              "|---|---:|---:|---:|---:|" + ("---:|---:|" if raw else "")]
    for workload, others in s["ratios"].items():
        d, u, p = others.get("dnsmasq", {}), others.get("unbound", {}), others.get("pyraw", {})
        lines.append(f"| {workload} | {_r(d, 'qps')} | {_r(u, 'qps')} | {_r(d, 'cpu')} | {_r(u, 'cpu')} |"
                     + (f" {_r(p, 'qps')} | {_r(p, 'cpu')} |" if raw else ""))
    lines += per_round_latency(result.get("runs") or [], meta.get("foreign_limit", 0.25))
    lines += ["", "Targets:", "", "| target | measured | goal | met |", "|---|---:|---:|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {t['goal']} | {met} |")
    if result.get("scale"):
        sc = result["scale"]
        lines += ["", f"Scale, {sc['names']} names (each server started alone):", "",
                  "| server | load s | RSS MiB | peak RSS MiB |", "|---|---:|---:|---:|"]
        for name, row in sc.items():
            if isinstance(row, dict):
                lines.append(f"| {name} | {row.get('load_s', row.get('error', '-'))} | {row.get('rss_mib', '-')} "
                             f"| {row.get('peak_rss_mib', '-')} |")
        rl = (sc.get("sinkhole") or {}).get("reload") if isinstance(sc.get("sinkhole"), dict) else None
        if rl:
            lines.append(f"\nDuring a reload of that list (SIGHUP, {rl.get('offered_qps')} q/s offered): "
                         f"reload took ~{rl.get('reload_s')} s, done: {rl.get('reload_done')}, new policy "
                         f"in force: {rl.get('new_policy_in_force')}; latency p50 {rl.get('p50_ms')} / p99 "
                         f"{rl.get('p99_ms')} / max {rl.get('max_ms')} ms; lost {rl.get('lost')} of {rl.get('sent')}.")
    gates = meta["gates"]
    lines += ["", f"Machine load: quiet gate (< {meta['quiet_limit']} of a core elsewhere, wait <= "
              f"{meta['quiet_wait']} s) timed out before {gates['timed_out']} of {gates['total']} runs; foreign CPU "
              f"during runs median {gates['foreign_median']} cores, max {gates['foreign_max']}; runs above "
              f"{meta['foreign_limit']} cores are left out of the medians when clean runs exist. "
              f"Load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}."]
    return "\n".join(lines)


def per_round_latency(runs: list[dict], foreign_limit: float) -> list[str]:
    """The 10k q/s runs one by one: p99, and the answers caught in stall episodes (dnsperf.stalls:
    consecutive answers over 0.1 ms with one over 0.5 ms), so a median p99 shows whether the rounds
    agree or one pause decided it. Runs with foreign load over the limit are marked *."""
    cells: dict = {}
    for run in runs:
        if run.get("kind") == "lat10k" and run.get("p99_ms") is not None:
            cells.setdefault((run["workload"], run["server"]), {})[run["round"]] = run
    if not cells:
        return []
    rounds = sorted({r for byround in cells.values() for r in byround})
    lines = ["", "At 10k q/s, round by round: p99 ms (answers in stall episodes, of 10k per second):", "",
             "| workload | server | " + " | ".join(f"round {r}" for r in rounds) + " |",
             "|---|---|" + "---:|" * len(rounds)]
    for (workload, server), byround in cells.items():
        row = []
        for r in rounds:
            run = byround.get(r)
            row.append("-" if run is None else
                       f"{_f(run['p99_ms'], 3)} ({run.get('stalled', '-')})"
                       + ("*" if run.get("foreign_cores", 0) > foreign_limit else ""))
        lines.append(f"| {workload} | {server} | " + " | ".join(row) + " |")
    return lines


def _f(v, digits):
    return "-" if v is None else f"{v:.{digits}f}"


def _r(entry, key):
    values = entry.get(key) or []
    m = entry.get(f"{key}_median")
    return "-" if m is None else f"{m:.2f} [{min(values):.2f}..{max(values):.2f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-l", "--seconds", type=float, default=10, help="seconds per peak run (default 10)")
    p.add_argument("--latency-seconds", type=float, default=None, help="seconds per fixed-rate run (default: -l)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--names", type=int, default=100_000, help="blocked names (default 100000)")
    p.add_argument("--allowed", type=int, default=2000, help="allowed (cached) names")
    p.add_argument("--cache-size", type=int, default=10_000)
    p.add_argument("--servers", default="sinkhole,dnsmasq,unbound",
                   help=f"comma-separated, from {','.join(SERVERS)} (pyraw: the bare Python loop, "
                        "bench/pyraw.py, a reference floor; opt-in)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--workers", type=int, default=2, help="also run sinkhole --workers N when it supports it")
    p.add_argument("--nolog", action="store_true",
                   help="also run sinkhole with the query log off (a diagnostic, not the product)")
    p.add_argument("--miss-rate", type=int, default=1000, help="q/s for the cache-miss latency runs")
    p.add_argument("--scale-names", type=int, default=1_000_000)
    p.add_argument("--no-scale", action="store_true")
    p.add_argument("--scale-deadline", type=float, default=900, help="seconds a big list may take to load")
    p.add_argument("--reload-rate", type=int, default=2000, help="q/s offered during the reload")
    p.add_argument("--start-deadline", type=float, default=300)
    p.add_argument("--quiet-limit", type=float, default=0.2, help="cores others may use before a run")
    p.add_argument("--quiet-wait", type=float, default=30, help="at most this long waiting for quiet")
    p.add_argument("--foreign-limit", type=float, default=0.25, help="runs with more foreign CPU are not clean")
    p.add_argument("--halt-poll-ns", type=int, default=None,
                   help="root, KVM guests: let idle CPUs poll this long before halting during the run "
                        "(put back after); shows the latency floor a halted vCPU's wake-up sets")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--results-md", default=str(HERE / "RESULTS.md"), help="'' to skip")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    args.latency_seconds = args.latency_seconds or args.seconds
    args.servers = [s for s in args.servers.split(",") if s]
    args.workloads = [w for w in args.workloads.split(",") if w]
    for tool in ("dnsperf", "dnsmasq", "unbound"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (Debian: dnsperf, dnsmasq-base, unbound); "
                  "bench/run.sh installs them as root", file=sys.stderr)
            return 2
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        p.error(f"unknown servers {sorted(unknown)}; choose from {list(SERVERS)}")
    bench = Bench(args)
    halt_poll = HaltPoll(args.halt_poll_ns)
    started = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    meta = {"started": started, "rounds": args.rounds, "seconds": args.seconds,
            "latency_seconds": args.latency_seconds, "names": args.names, "allowed": args.allowed,
            "miss_rate": args.miss_rate, "pinning": bench.pin_note, "metrics": bench.metrics_note,
            "workers": (f"--workers {args.workers} run beside one process" if bench.workers_on and args.workers > 1
                        else "one process only (--workers below 2)" if bench.workers_on else
                        "sinkhole serve has no --workers option yet: one process only"),
            "idle": halt_poll.note, "quiet_limit": args.quiet_limit, "quiet_wait": args.quiet_wait, "foreign_limit": args.foreign_limit,
            "versions": tool_versions(), "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
            "workloads": {w: WORKLOADS[w][1] for w in args.workloads},
            "dnsperf": "-c 4 -q 100 -t 2; peak: no -Q; lat10k: -Q 10000 -v; at80: -Q 0.8 x sinkhole's peak"}
    bench.log(f"workdir {bench.tmp}; {bench.pin_note}; {bench.metrics_note}; {meta['workers']}")
    scale = None
    try:
        with halt_poll:
            bench.prepare()
            bench.start_servers()
            servers = {name: {"ready_s": round(s.ready_s, 3), "rss_loaded_mib": round(s.rss_loaded, 1),
                              "rss_end_mib": None} for name, s in bench.servers.items()}
            bench.rounds()
            for name, s in bench.servers.items():
                servers[name]["rss_end_mib"] = round(rss_mib(s.pids()), 1)
                servers[name]["peak_rss_mib"] = round(rss_mib(s.pids(), "VmHWM"), 1)
            for name in list(bench.servers):
                bench.servers.pop(name).stop()
            if not args.no_scale:
                scale = bench.scale()
    finally:
        bench.stop_servers()
        if not args.keep:
            shutil.rmtree(bench.tmp, ignore_errors=True)
    foreign = [r["foreign_cores"] for r in bench.runs]
    meta["gates"] = {"total": len(bench.runs), "timed_out": sum(r["gate"]["timed_out"] for r in bench.runs),
                     "foreign_median": median(foreign), "foreign_max": max(foreign) if foreign else None}
    meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    summary = summarise(bench.runs, args.foreign_limit)
    result = {"meta": meta, "servers": servers, "summary": summary, "scale": scale, "runs": bench.runs}
    result["targets"] = targets(summary, servers, scale, args.names)
    text = render(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{started}.json"
    path.write_text(json.dumps(result, indent=1))
    print(text)
    print(f"\nJSON: {path}")
    if args.results_md:
        Path(args.results_md).write_text(
            "# Latest benchmark result\n\nWritten by `make bench` (bench/bench.py); how to read it: "
            "bench/README.md.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
