"""The benchmark's stall episodes (bench/dnsperf.stalls) and its round-by-round latency table: how
a bad p99 at 10k q/s is told apart into pauses (the server, or its machine, stopped for
milliseconds) and a slow path (answers slow one by one)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))


dnsperf = _load("dnsperf")
bench = _load("bench")
FAST, SLOW = 0.00004, 0.0002


def test_a_pause_is_one_episode_of_the_answers_it_held_up():
    # a 3 ms pause at 10k q/s: about 30 answers waiting 3 ms down to 0.1 ms, then normal again
    pause = [0.003 - i * 0.0001 for i in range(29)]
    got = dnsperf.stalls([FAST] * 100 + pause + [FAST] * 100 + pause[:10] + [FAST])
    assert got == {"stalls": 2, "stalled": 39, "stall_largest": 29}


def test_slow_answers_without_a_pause_are_no_stall():
    # 2 % of answers at 0.2 ms (a slow path): p99 over 0.1 ms, yet nothing paused
    seq = ([FAST] * 49 + [SLOW]) * 100 + [SLOW, SLOW, SLOW]
    assert dnsperf.stalls(seq) == {"stalls": 0, "stalled": 0, "stall_largest": 0}


def test_an_episode_at_the_end_and_an_empty_run():
    assert dnsperf.stalls([FAST, SLOW, 0.001]) == {"stalls": 1, "stalled": 2, "stall_largest": 2}
    assert dnsperf.stalls([]) == {"stalls": 0, "stalled": 0, "stall_largest": 0}


def test_parse_keeps_the_order_for_stalls_and_sorts_for_percentiles():
    lines = ["> NOERROR a.example A 0.000040"] * 200 + ["> NOERROR a.example A 0.002000",
                                                         "> NOERROR a.example A 0.000900"]
    got = dnsperf.parse("\n".join(lines), verbose=True)
    assert got["stalls"] == 1 and got["stalled"] == 2
    assert got["max_ms"] == 2.0 and got["p50_ms"] == 0.04


def test_the_round_by_round_table_shows_each_run_and_marks_a_loaded_one():
    runs = [{"kind": "lat10k", "workload": "cached", "server": "sinkhole", "round": r, "p99_ms": p,
             "stalled": s, "foreign_cores": f}
            for r, p, s, f in ((0, 0.045, 12, 0.0), (1, 0.21, 1900, 0.0), (2, 0.05, 30, 0.6))]
    runs.append({"kind": "peak", "workload": "cached", "server": "sinkhole", "round": 0, "qps": 1})
    lines = bench.per_round_latency(runs, 0.25)
    row = next(line for line in lines if line.startswith("| cached | sinkhole |"))
    assert row == "| cached | sinkhole | 0.045 (12) | 0.210 (1900) | 0.050 (30)* |"
    assert bench.per_round_latency([], 0.25) == []
