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
    metrics = health = None
    if args.metrics:
        from resolver.exposition import serve_metrics

        from .metrics import Health, SidecarMetrics
        metrics, health = SidecarMetrics(), Health()
        try:
            host, port = parse_hostport(args.metrics, None)
            serve_metrics(metrics.registry, host, port, health=health, log=logging.getLogger("sinkhole.sidecar"))
        except (ValueError, OSError) as e:
            print(f"sinkhole sidecar: --metrics {args.metrics}: {e}", file=sys.stderr)
            return 2
    out = open(args.alerts, "a", buffering=1) if args.alerts not in (None, "-") else sys.stdout
    alerts = Alerts(out, settings.window)
    enforce = None
    if args.enforce:
        from .enforce import NOT_ENFORCED_BY_DEFAULT, Enforcer
        skip = NOT_ENFORCED_BY_DEFAULT - set(args.enforce_detectors or ())
        enforce = Enforcer(args.enforce_timeout, skip)
    engine = Engine(policy, sanctioned_addresses(config), alerts, metrics, settings,
                    started=None if args.pcap else time.time(), enforce=enforce)
    if args.pcap:
        return run_pcap(engine, args.pcap, health)
    reloader = Reloader(engine, blocklists, config.reload_interval, metrics)
    return run_live(engine, [i for i in args.iface.split(",") if i], reloader, metrics, health=health)


def register(sub) -> None:
    p = sub.add_parser("sidecar", help="detect attempts to bypass the resolver on the wire (scapy)")
    p.add_argument("-c", "--config", default=resolver_cli.DEFAULT_CONFIG)
    p.add_argument("--blocklists", help="a blocklists directory (default: the one in the config)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--iface", help="capture live on these interfaces (comma-separated)")
    where.add_argument("--pcap", help="read a pcap/pcapng file, print alerts and a summary, exit")
    p.add_argument("--alerts", default="-", help="JSON-lines file to append alerts to (default: stdout)")
    p.add_argument("--metrics", help="serve /metrics (Prometheus) and /healthz on HOST:PORT "
                   "(port 0: any free port, logged as 'metrics on HOST port N')")
    p.add_argument("--window", type=float, default=600.0, help="seconds: one alert per client, "
                   "detector and destination per window (default 600)")
    p.add_argument("--learning", type=float, default=1800.0, help="seconds after start in which "
                   "no-dns only counts (default 1800; 0 for a pcap that starts with the lookups)")
    p.add_argument("--grace", type=float, default=300.0, help="seconds an answer stays good past its TTL")
    p.add_argument("--no-dns-allow", help="comma-separated CIDRs no-dns ignores (default: shared "
                   "infrastructure: Apple 17/8, Cloudflare front ends)")
    p.add_argument("--enforce", action="store_true",
                   help="add each alert's (client, destination) to the nftables set bypass_v4/v6 of "
                        "`sinkhole export nftables`, so the rest of the flow is dropped (off by default)")
    p.add_argument("--enforce-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long an enforced pair stays in the set (default 600)")
    p.add_argument("--enforce-detectors", type=lambda s: [x for x in s.split(",") if x], default=None,
                   metavar="no-dns", help="also enforce these detectors (no-dns is only reported by default)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_sidecar)


resolver_cli._EXTRA.append(register)
