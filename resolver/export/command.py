"""`sinkhole export nftables|unbound|rpz`: the subcommand and its file/apply I/O."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..cli import _EXTRA
from ..loader import PolicyError, load_policy


def _policy_source(args):
    if args.blocklists:
        return args.blocklists, tuple(args.sanctioned or ())
    from ..config import load_config
    config = load_config(args.config)
    return config.blocklists, tuple(args.sanctioned or config.sanctioned_resolvers)


def cmd_export(args) -> int:
    from . import nftables, rpz, unbound, write_outputs
    try:
        blocklists, sanctioned = _policy_source(args)
        now = time.time()
        if args.format == "nftables" and args.apply:
            return nftables.apply_loop(lambda t: load_policy(blocklists, t), sanctioned, args.interval,
                                       rounds=1 if args.once else None)
        policy = load_policy(blocklists, now)
    except PolicyError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    if args.format == "nftables":
        outputs = {"sinkhole.nft": nftables.ruleset(policy, now, sanctioned)}
    elif args.format == "unbound":
        outputs = unbound.export(policy, now, str(Path(args.out_dir or ".").resolve()))
    else:
        outputs = rpz.export(policy, now, str(Path(args.out_dir or ".").resolve()))
    if args.out_dir is None and len(outputs) == 1:
        sys.stdout.write(next(iter(outputs.values())))
        return 0
    if args.out_dir is None:
        print(f"sinkhole export {args.format}: writes {len(outputs)} files; give --out-dir", file=sys.stderr)
        return 2
    for path in write_outputs(outputs, args.out_dir):
        print(path)
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="compile the policy for nftables, Unbound or BIND (RPZ)")
    p.add_argument("format", choices=("nftables", "unbound", "rpz"))
    p.add_argument("-c", "--config", default="sinkhole.yaml")
    p.add_argument("--blocklists", help="a blocklists directory (default: the one in the config)")
    p.add_argument("--sanctioned", action="append", metavar="IP",
                   help="a resolver clients may use on port 53 (default: sanctioned_resolvers in the config)")
    p.add_argument("-o", "--out-dir", help="write the files here (nftables: default stdout)")
    p.add_argument("--apply", action="store_true", help="nftables: load with `nft -f` and re-apply on change")
    p.add_argument("--once", action="store_true", help="with --apply: apply once and exit")
    p.add_argument("--interval", type=float, default=5.0, help="with --apply: seconds between policy checks")
    p.set_defaults(func=cmd_export)


_EXTRA.append(register)
