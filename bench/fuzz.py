"""The long fuzz run: the same hypothesis properties as tests/unit/test_fuzz.py (packet path,
upstream replies, blocklist loader), round after round with fresh seeds, for --minutes.

    .venv/bin/python bench/fuzz.py --minutes 30

Exits non-zero on the first failure, printing hypothesis's minimal failing example.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "unit")]

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import test_fuzz as t  # noqa: E402

PROPERTIES = {
    "parse_query": (given(t.packets), t.check_parse_query),
    "begin": (given(t.packets, st.sampled_from(t.CLIENTS)), t.check_begin),
    "upstream-reply": (given(st.binary(max_size=600) | t.mutated_queries(), t.valid_queries()),
                       lambda data, query: t.check_reply(
                           data, query[12:len(query) - (11 if query[11] else 0)])),
    "loader": (given(t.hostile_yaml(), st.booleans()),
               lambda text, in_policy: t.check_loader(text, t.GOOD_SERVICE) if in_policy
               else t.check_loader(t.GOOD_POLICY, text)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--examples", type=int, default=2000, help="examples per property per round")
    args = parser.parse_args()
    run = settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
                   suppress_health_check=list(HealthCheck))
    deadline = time.monotonic() + args.minutes * 60
    totals = dict.fromkeys(PROPERTIES, 0)
    rounds = 0
    while time.monotonic() < deadline:
        for name, (decorate, check) in PROPERTIES.items():
            started = time.monotonic()
            run(decorate(check))()
            totals[name] += args.examples
            print(f"round {rounds + 1}: {name}: {args.examples} examples in {time.monotonic() - started:.1f}s",
                  flush=True)
            if time.monotonic() >= deadline:
                break
        rounds += 1
    print("fuzz ok: " + ", ".join(f"{name} {n} examples" for name, n in totals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
