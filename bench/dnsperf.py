"""One dnsperf run against one server, with what the server, dnsperf and everything else spent in
CPU meanwhile. Latencies come from dnsperf's verbose per-query lines."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from procs import cpu_seconds, machine_busy, pinned

STAT_PATTERNS = {
    "sent": r"Queries sent:\s+(\d+)",
    "completed": r"Queries completed:\s+(\d+)",
    "lost": r"Queries lost:\s+(\d+)",
    "qps": r"Queries per second:\s+([\d.]+)",
    "avg_latency_s": r"Average Latency \(s\):\s+([\d.]+)",
    "run_time_s": r"Run time \(s\):\s+([\d.]+)",
}


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def stalls(latencies: list[float], slow: float = 0.0001, stall: float = 0.0005) -> dict:
    """Stall episodes in a fixed-rate run's latencies (seconds, in the order dnsperf printed them,
    which is the order answers came in): a run of consecutive answers slower than `slow` with at
    least one slower than `stall`. A server that stops for a few milliseconds leaves one such run of
    about rate x pause answers; a slow query path leaves scattered slow answers and no episode.
    p99 at 10k q/s is over 0.1 ms once more than 1 % of the answers are slow, so the answers inside
    episodes (`stalled`) say how much of a bad p99 pauses explain, and `stall_largest` whether one
    pause did it."""
    episodes, i, n = [], 0, len(latencies)
    while i < n:
        if latencies[i] <= slow:
            i += 1
            continue
        j = i
        while j < n and latencies[j] > slow:
            j += 1
        if max(latencies[i:j]) > stall:
            episodes.append(j - i)
        i = j
    return {"stalls": len(episodes), "stalled": sum(episodes), "stall_largest": max(episodes, default=0)}


def parse(stdout: str, verbose: bool) -> dict:
    out = {}
    for key, pattern in STAT_PATTERNS.items():
        m = re.search(pattern, stdout)
        out[key] = (float(m.group(1)) if "." in m.group(1) else int(m.group(1))) if m else None
    codes = re.search(r"Response codes:\s+(.*)", stdout)
    out["rcodes"] = dict((name, int(n)) for name, n in re.findall(r"([A-Z]+) (\d+) \(", codes.group(1))) if codes else {}
    if verbose:
        seq = [float(line.rsplit(" ", 1)[1]) for line in stdout.splitlines()
               if line.startswith("> ") and line.count(" ") >= 4 and line.rsplit(" ", 1)[1][:1].isdigit()]
        out.update(stalls(seq))
        lat = sorted(seq)
        out["latency_samples"] = len(lat)
        for p in (50, 99, 99.9):
            v = percentile(lat, p)
            out[f"p{p:g}_ms"] = round(v * 1000, 4) if v is not None else None
        out["max_ms"] = round(lat[-1] * 1000, 3) if lat else None
    return out


def run(port: int, datafile: Path, seconds: float, source: str, server_pids: list[int], other_pids: list[int],
        cpu: int | None, workdir: Path, qps: int | None = None, verbose: bool = False,
        max_runs: int | None = None, stop_when=None, clients: int = 4) -> dict:
    """dnsperf -c 4 -q 100 against 127.0.0.1:port from `source`. `stop_when()`, polled, ends the
    run early with SIGINT (dnsperf then prints its statistics). `clients`: dnsperf's sockets (each
    its own source port: with --workers, the kernel picks a worker per source port)."""
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-a", source, "-d", str(datafile),
           "-l", str(seconds), "-c", str(clients), "-q", "100", "-t", "2"]
    if qps:
        cmd += ["-Q", str(int(qps))]
    if verbose:
        cmd += ["-v"]
    if max_runs:
        cmd += ["-n", str(max_runs)]
    out_path = workdir / "dnsperf.out"
    busy0, srv0, oth0, t0 = machine_busy(), cpu_seconds(server_pids), cpu_seconds(other_pids), time.monotonic()
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(pinned(cmd, cpu), stdout=out, stderr=subprocess.STDOUT)
        rusage, interrupted = None, False
        deadline = time.monotonic() + seconds + 30
        for _ in range(int((seconds + 30) / 0.02) + 10):
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if stop_when is not None and not interrupted and stop_when():
                proc.send_signal(signal.SIGINT)
                interrupted = True
            if time.monotonic() > deadline:
                proc.kill()
                _, status, rusage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                break
            time.sleep(0.02)
    busy1, srv1, oth1, t1 = machine_busy(), cpu_seconds(server_pids), cpu_seconds(other_pids), time.monotonic()
    text = out_path.read_text(errors="replace")
    result = parse(text, verbose)
    elapsed = t1 - t0
    server_cpu = srv1 - srv0
    gen_cpu = (rusage.ru_utime + rusage.ru_stime) if rusage else 0.0
    foreign = max(0.0, (busy1 - busy0) - server_cpu - gen_cpu - (oth1 - oth0))
    completed = result.get("completed") or 0
    result.update({
        "offered_qps": qps, "seconds": seconds, "source": source, "exit": proc.returncode,
        "interrupted": interrupted,
        "lost_pct": round(100 * (result["lost"] or 0) / result["sent"], 4) if result.get("sent") else None,
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_us_per_q": round(server_cpu / completed * 1e6, 2) if completed else None,
        "server_cpu_cores": round(server_cpu / elapsed, 3),
        "dnsperf_cpu_cores": round(gen_cpu / elapsed, 3),
        "foreign_cores": round(foreign / elapsed, 3),
    })
    if proc.returncode not in (0, None) and not interrupted:
        result["error"] = text[-800:]
    return result
