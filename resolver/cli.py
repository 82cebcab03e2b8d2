"""The `sinkhole` command: serve, check, explain, exemptions, healthcheck (and later: sidecar, export)."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

from .loader import PolicyError, check_directory, load_policy, load_with_warnings
from .policy import decide, iso_time
from .yamlsrc import Problem

DEFAULT_CONFIG = "sinkhole.yaml"


def _config(path):
    from .config import load_config
    return load_config(path)


def cmd_serve(args) -> int:
    import asyncio  # here, not at the top: the other commands (sidecar, check) start faster

    from .server import serve
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s sinkhole %(levelname)s %(message)s", stream=sys.stderr)
    try:
        config = _config(args.config)
        policy, warnings = load_with_warnings(config.blocklists, time.time())
    except PolicyError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        print("sinkhole: not starting: fix the problems above (it never serves without a valid policy)",
              file=sys.stderr)
        return 1
    for problem in warnings:
        logging.getLogger("sinkhole").warning("%s", problem)
    logging.getLogger("sinkhole").info("policy %s from %s; upstreams %s", policy.revision,
                                       config.blocklists, ", ".join(f"{h}:{p}" for h, p in config.upstreams))
    if args.workers <= 1:
        observer = _observer(config.metrics)
        return 1 if observer is False else asyncio.run(serve(config, policy, observer))
    if any(port == 0 for _, port in config.listen):
        print("sinkhole: --workers needs fixed listen ports (port 0 would give each worker its own)",
              file=sys.stderr)
        return 1
    from .server import run_workers
    return run_workers(args.workers, lambda index: _worker(config, policy, index))


def _observer(metrics):
    """The Prometheus observer for `metrics: {listen}`, None without one, False if it cannot bind."""
    if metrics is None:
        return None
    from .metrics import PrometheusObserver
    try:
        return PrometheusObserver(metrics)
    except OSError as e:
        print(f"sinkhole: not starting: cannot serve metrics on {metrics[0]} port "
              f"{metrics[1]}: {e.strerror or e}", file=sys.stderr)
        return False


def _worker(config, policy, index: int) -> int:
    """One of --workers N: worker i serves metrics on the metrics port + i and, when the query log
    is a file, writes NAME.workerI.EXT for i > 0 (no two processes rotate one file)."""
    import asyncio
    import dataclasses

    from .server import serve
    metrics = config.metrics
    if metrics is not None and metrics[1] and index:
        metrics = (metrics[0], metrics[1] + index)
    target = config.query_log.target
    if index and target not in ("off", "stdout", "-"):
        path = Path(target)
        target = str(path.with_name(f"{path.stem}.worker{index}{path.suffix}"))
    config = dataclasses.replace(config, metrics=metrics,
                                 query_log=dataclasses.replace(config.query_log, target=target))
    observer = _observer(metrics)
    if observer is False:
        return 1
    return asyncio.run(serve(config, policy, observer, reuse_port=True))


def cmd_check(args) -> int:
    directory = Path(args.directory)
    problems = check_directory(directory, time.time())
    errors = [p for p in problems if p.severity == "error" or args.strict]
    for problem in problems:
        print(problem if problem.severity == "error" or not args.strict
              else Problem(problem.path, problem.line, problem.message), file=sys.stdout)
    if errors:
        print(f"{directory}: {len(errors)} error(s)", file=sys.stderr)
        return 1
    policy = load_policy(directory, time.time())
    entries = sum(s.entries() for s in policy.services.values())
    print(f"{directory}: ok, revision {policy.revision}: {len(policy.groups)} groups, "
          f"{len(policy.services)} services, {entries} entries, {len(policy.exemptions)} exemptions",
          file=sys.stderr)
    return 0


def _blocklists(args) -> str:
    if args.blocklists:
        return args.blocklists
    return _config(args.config).blocklists


def cmd_explain(args) -> int:
    from .names import normalize
    policy = load_policy(_blocklists(args), time.time())      # PolicyError: main() prints it, exit 1
    now = time.time()
    try:
        decision = decide(policy, args.client, normalize(args.name), now)
    except ValueError:
        print(f"sinkhole explain: {args.client!r} is not an IP address", file=sys.stderr)
        return 2
    print(f"client {args.client}: group {decision.group or '-'}")
    print(f"{normalize(args.name)} {args.type.upper()}: {decision.explain()}")
    if decision.service is not None:
        _, key = policy.classify(args.client)
        for ex in policy.exemptions_covering(key, decision.service):
            if ex is decision.exemption:
                continue
            when = (f"expired {iso_time(ex.expires)}" if ex.expires <= now
                    else f"starts {iso_time(ex.starts)}, expires {iso_time(ex.expires)}")
            print(f"  exemption {ex.id} ({ex.origin}) for this client and {decision.service} is not "
                  f"in force: {when}")
    return 0



_DURATION = re.compile(r"(\d+)([smhdw])\Z")


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 7d, 12h, 30m")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def cmd_exemptions(args) -> int:
    """Every exemption with its state (active, pending, expired); with --expiring-within, only
    those not yet expired that end within the window: the weekly review."""
    policy = load_policy(_blocklists(args), time.time())      # PolicyError: main() prints it, exit 1
    now = time.time()
    rows = []
    for ex in policy.exemptions:
        if ex.expires <= now:
            state = "expired"
        elif ex.starts is not None and ex.starts > now:
            state = "pending"
        else:
            state = "active"
        soon = ex.expires - now <= args.expiring_within if args.expiring_within is not None else True
        if args.expiring_within is not None and (state == "expired" or not soon):
            continue
        rows.append({"id": ex.id, "state": state, "clients": list(ex.clients), "services": sorted(ex.services),
                     "approved_by": ex.approved_by, "reason": ex.reason, "starts": iso_time(ex.starts),
                     "expires": iso_time(ex.expires), "expires_in_seconds": int(ex.expires - now), "origin": ex.origin})
    rows.sort(key=lambda r: r["expires_in_seconds"])
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    if not rows:
        print("no exemptions" + (" expiring in that window" if args.expiring_within is not None else ""))
        return 0
    header = ("ID", "STATE", "EXPIRES (UTC)", "IN", "CLIENTS", "SERVICES", "APPROVED BY", "REASON")
    table = [header] + [(r["id"], r["state"], r["expires"][:19], _human(r["expires_in_seconds"]),
                         ",".join(r["clients"]), ",".join(r["services"]), r["approved_by"], r["reason"])
                        for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def _human(seconds: int) -> str:
    if seconds < 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cmd_healthcheck(args) -> int:
    """A real DNS query to the server; exit 0 when it answers at all (an upstream outage is not a
    reason to restart the resolver: it would still answer blocks and cached names)."""
    from dnslib import DNSRecord
    from .config import parse_hostport
    host, port = parse_hostport(args.server, 53)
    try:
        reply = DNSRecord.parse(DNSRecord.question(args.name, "A").send(host, port, timeout=args.timeout))
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    rcode = reply.header.rcode
    print(f"healthy: {args.name} answered rcode {rcode}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinkhole", description="The departmental DNS sinkhole.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the resolver")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N processes sharing the ports with SO_REUSEPORT (for machines with more cores)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="validate a blocklists directory as the server would load it")
    p.add_argument("directory", nargs="?", default="blocklists")
    p.add_argument("--strict", action="store_true", help="treat warnings as errors")
    p.set_defaults(func=cmd_check)

    for name, func, help_ in (("explain", cmd_explain, "show a client's group and the decision for a name"),
                              ("exemptions", cmd_exemptions, "list active and soon-expiring exemptions")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        p.add_argument("--blocklists", help="a blocklists directory (default: the one in the config)")
        p.set_defaults(func=func)
        if name == "explain":
            p.add_argument("--client", required=True)
            p.add_argument("--type", default="A")
            p.add_argument("name")
        else:
            p.add_argument("--expiring-within", type=parse_duration, default=None, metavar="7d")
            p.add_argument("--json", action="store_true")

    p = sub.add_parser("healthcheck", help="ask the server one DNS question; exit 0 if it answers")
    p.add_argument("--server", default="127.0.0.1:53")
    p.add_argument("--name", default="healthcheck.sinkhole.invalid")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=cmd_healthcheck)

    for extra in _EXTRA:
        extra(sub)
    return parser


_EXTRA = []     # other modules register subcommands here (sidecar, export)
from .export import command as _export_command  # noqa: E402,F401 - registers `sinkhole export`


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PolicyError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


from exporters import cli as _sidecar_cli  # noqa: E402,F401 - registers `sinkhole sidecar`

if __name__ == "__main__":
    sys.exit(main())
