"""`sinkhole sidecar`: watch the wire for attempts to get around the resolver (live or a pcap)."""
from __future__ import annotations

import logging
import sys
import time

from resolver import cli as resolver_cli
from resolver.config import parse_hostport
from resolver.loader import PolicyError, load_policy


def cmd_sidecar(args) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s sinkhole-sidecar %(levelname)s %(message)s", stream=sys.stderr)
    from .alerts import Alerts
    from .detectors import SHARED_INFRASTRUCTURE, Settings, sanctioned_addresses
    from .sidecar import Engine, Reloader, run_live, run_pcap
    try:
        config = resolver_cli._config(args.config)
        blocklists = args.blocklists or config.blocklists
        policy = load_policy(blocklists, time.time())
    except PolicyError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        print("sinkhole sidecar: not starting: fix the problems above", file=sys.stderr)
        return 1
    allow = SHARED_INFRASTRUCTURE if args.no_dns_allow is None else tuple(
        x for x in args.no_dns_allow.split(",") if x)
    try:
        from .detectors import NetTable
        NetTable((a, True) for a in allow)
    except ValueError as e:
        print(f"sinkhole sidecar: --no-dns-allow: {e}", file=sys.stderr)
        return 2
    settings = Settings(window=args.window, learning=args.learning, grace=args.grace, no_dns_allow=allow)
    metrics = None
    if args.metrics:
        from .metrics import SidecarMetrics, serve
        metrics = SidecarMetrics()
        host, port = parse_hostport(args.metrics, None)
        serve(metrics, host, port)
    out = open(args.alerts, "a", buffering=1) if args.alerts not in (None, "-") else sys.stdout
    alerts = Alerts(out, settings.window)
    engine = Engine(policy, sanctioned_addresses(config), alerts, metrics, settings,
                    started=None if args.pcap else time.time())
    if args.pcap:
        return run_pcap(engine, args.pcap)
    reloader = Reloader(engine, blocklists, config.reload_interval, metrics)
    return run_live(engine, [i for i in args.iface.split(",") if i], reloader, metrics)


def register(sub) -> None:
    p = sub.add_parser("sidecar", help="detect attempts to bypass the resolver on the wire (scapy)")
    p.add_argument("-c", "--config", default=resolver_cli.DEFAULT_CONFIG)
    p.add_argument("--blocklists", help="a blocklists directory (default: the one in the config)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--iface", help="capture live on these interfaces (comma-separated)")
    where.add_argument("--pcap", help="read a pcap/pcapng file, print alerts and a summary, exit")
    p.add_argument("--alerts", default="-", help="JSON-lines file to append alerts to (default: stdout)")
    p.add_argument("--metrics", help="serve Prometheus metrics on HOST:PORT")
    p.add_argument("--window", type=float, default=600.0, help="seconds: one alert per client, "
                   "detector and destination per window (default 600)")
    p.add_argument("--learning", type=float, default=1800.0, help="seconds after start in which "
                   "no-dns only counts (default 1800; 0 for a pcap that starts with the lookups)")
    p.add_argument("--grace", type=float, default=300.0, help="seconds an answer stays good past its TTL")
    p.add_argument("--no-dns-allow", help="comma-separated CIDRs no-dns ignores (default: shared "
                   "infrastructure: Apple 17/8, Cloudflare front ends)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_sidecar)


resolver_cli._EXTRA.append(register)
