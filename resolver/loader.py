"""Read a blocklists directory (policy.yaml + services/*.yaml), validate it, compile a Policy.

Every problem is reported with its `path:line`; a directory with any error yields no Policy.
`check_directory` is what `sinkhole check` and the server's reload both run.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
from array import array
import hashlib
import os
import re
from pathlib import Path

import netaddr

from .names import is_within, name_problem
from .policy import (ENCRYPTED_DNS, RESPONSES, Exemption, Group, IPRange, Policy, Rule, Service,
                     Settings)
from .yamlsrc import Located, LocatedList, Problem, read_yaml

POLICY_FILE = "policy.yaml"
SERVICES_DIR = "services"
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
_TAG = re.compile(r"[a-z0-9][a-z0-9-]{0,31}\Z")

# Names a pattern must not match: a pattern that does would block far more than one service.
_PATTERN_PROBES = ("example.com", "www.example.org", "a.b.c.example.net", "com", "google.com",
                   "www.google.com", "qq.com", "localhost", "x", "mail.example.co.uk")

# Built-in answers for any group that blocks encrypted-dns (never forwarded).
BUILT_INS = (
    ("use-application-dns.net", "host", "nxdomain", "built-in: Firefox DoH canary (Mozilla)"),
    ("mask.icloud.com", "host", "nxdomain", "built-in: iCloud Private Relay (Apple)"),
    ("mask-h2.icloud.com", "host", "nxdomain", "built-in: iCloud Private Relay (Apple)"),
    ("resolver.arpa", "domain", "nodata", "built-in: DDR, RFC 9462"),
)

POLICY_KEYS = {"groups", "default_group", "allowed_clients", "exemptions", "block_ttl",
               "exemption_ttl", "max_exemption_days"}
GROUP_KEYS = {"description", "subnets", "block", "response", "block_ttl", "sinkhole"}
EXEMPTION_KEYS = {"id", "clients", "services", "approved_by", "reason", "expires", "starts"}
SERVICE_KEYS = {"description", "sources", "domains", "hosts", "patterns", "allow", "ip_ranges",
                "domain_lists", "host_lists"}
LIST_KEYS = {"domain_lists": "domain", "host_lists": "host"}     # plain-text files, one name a line
_VALID_NAME = re.compile(r"(?=[a-z0-9_.-]{1,253}\Z)(?:(?!-)[a-z0-9_-]{1,63}(?<!-)\.)*(?!-)[a-z0-9_-]{1,63}(?<!-)\Z").match
ENTRY_KEYS = {"domains": "name", "hosts": "name", "allow": "name", "patterns": "pattern",
              "ip_ranges": "cidr"}


class PolicyError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class _Report:
    """Collects problems for one file."""

    def __init__(self, path: str, problems: list[Problem]):
        self.path, self.problems = path, problems

    def error(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.path, line, message))

    def warn(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.path, line, message, "warning"))

    def keys(self, mapping: Located, allowed: set, what: str) -> None:
        for key in mapping:
            if key not in allowed:
                self.error(mapping.line_of(key), f"unknown key {key!r} in {what} "
                           f"(expected one of: {', '.join(sorted(allowed))})")

    def typed(self, mapping: Located, key: str, kind, what: str, default=None):
        value = mapping.get(key, default)
        if value is default:
            return default
        if kind is list and not isinstance(value, LocatedList):
            self.error(mapping.line_of(key), f"{what}: {key!r} must be a list")
            return default
        if kind is dict and not isinstance(value, Located):
            self.error(mapping.line_of(key), f"{what}: {key!r} must be a mapping")
            return default
        if kind is str and not isinstance(value, str):
            self.error(mapping.line_of(key), f"{what}: {key!r} must be text")
            return default
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            self.error(mapping.line_of(key), f"{what}: {key!r} must be a whole number >= 0")
            return default
        return value


def parse_network(text, report: _Report, line: int, what: str):
    """A CIDR or a bare address as an IPNetwork, or None (with the problem reported)."""
    if not isinstance(text, str) or not text.strip() or text != text.strip():
        report.error(line, f"{what}: {text!r} is not an IP address or CIDR")
        return None
    address, _, prefix = text.partition("/")
    try:
        netaddr.IPAddress(address)          # strict: no '10.1', no '10/8'
        if prefix and not (prefix.isdigit() and len(prefix) <= 3):
            raise ValueError
        net = netaddr.IPNetwork(text)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        report.error(line, f"{what}: {text!r} is not an IP address or CIDR")
        return None
    if net.ip != net.network:
        report.error(line, f"{what}: {text!r} has host bits set (did you mean {net.cidr}?)")
        return None
    return net


def parse_time(value, report: _Report, line: int, what: str) -> float | None:
    if isinstance(value, datetime.datetime):
        value = value.isoformat()
    if not isinstance(value, str):
        report.error(line, f"{what}: {value!r} is not an ISO 8601 time")
        return None
    try:
        when = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        report.error(line, f"{what}: {value!r} is not an ISO 8601 time (e.g. 2026-12-31T18:00:00+08:00)")
        return None
    if when.tzinfo is None:
        report.error(line, f"{what}: {value!r} has no time zone (add e.g. +08:00 or Z)")
        return None
    return when.timestamp()


# -- services ----------------------------------------------------------------------------------

def load_service(path: Path, shown: str, problems: list[Problem],
                 root: Path | None = None) -> tuple[Service | None, bytes]:
    data, file_problems, raw = read_yaml(path, shown)
    problems.extend(file_problems)
    if file_problems:
        return None, raw
    report = _Report(shown, problems)
    name = path.name[: -len(".yaml")]
    if not _SERVICE_NAME.match(name):
        report.error(1, f"service name {name!r} (from the file name) must be lower-case letters, digits and '-'")
    if not isinstance(data, Located):
        report.error(1, "a service file must be a mapping with description, domains, ...")
        return None, raw
    before = len(problems)
    report.keys(data, SERVICE_KEYS, "a service")
    description = report.typed(data, "description", str, "service", "")
    sources = report.typed(data, "sources", dict, "service", Located())
    for key, text in sources.items():
        if not isinstance(text, str) or not text.strip():
            report.error(sources.line_of(key), f"source {key!r} needs a description (text)")
    rules: list[Rule] = []
    ranges: list[IPRange] = []
    seen: dict[tuple[str, str], int] = {}
    domains: list[str] = []
    allows: list[tuple[str, int]] = []
    bad_domain = False          # reported already; its allows are not judged against it again
    for section, field in ENTRY_KEYS.items():
        entries = report.typed(data, section, list, "service", LocatedList())
        for i, entry in enumerate(entries):
            line = entries.line_of(i)
            value, source, tags = entry, None, ()
            if isinstance(entry, Located):
                report.keys(entry, {field, "source", "tags"}, f"a {section} entry")
                value = entry.get(field)
                source = entry.get("source")
                tags = entry.get("tags", ())
                if value is None:
                    report.error(line, f"{section} entry needs {field!r}")
                    continue
                if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) and _TAG.match(t) for t in tags):
                    report.error(entry.line_of("tags"), "tags must be a list of short lower-case words")
                    tags = ()
                if source is not None and source not in sources:
                    report.error(entry.line_of("source"), f"source {source!r} is not listed under 'sources'")
            elif not isinstance(entry, str):
                report.error(line, f"{section} entry {entry!r} must be text or a mapping with {field!r}")
                continue
            if source is None:
                report.warn(line, f"{section} entry {value!r} has no source recorded")
            if not isinstance(value, str):
                report.error(line, f"{section}: {value!r} must be text")
                continue
            dup = seen.get((section, value))
            if dup is not None:
                report.error(line, f"{section}: {value!r} is listed twice (first on line {dup})")
                continue
            seen[(section, value)] = line
            if section == "ip_ranges":
                net = parse_network(value, report, line, "ip_ranges")
                if net is not None:
                    ranges.append(IPRange(str(net.cidr), tuple(tags), f"{shown}:{line}"))
                continue
            if section == "patterns":
                problem = pattern_problem(value)
                if problem:
                    report.error(line, problem)
                    continue
                rules.append(Rule(name, "pattern", value, shown, line))
                continue
            problem = name_problem(value)
            if problem:
                report.error(line, f"{section}: {problem}")
                bad_domain = bad_domain or section == "domains"
                continue
            kind = {"domains": "domain", "hosts": "host", "allow": "allow"}[section]
            rules.append(Rule(name, kind, value, shown, line))
            if kind == "domain":
                domains.append(value)
            elif kind == "allow":
                allows.append((value, line))
    lists = []
    allows_present = bool(allows)
    for section, kind in LIST_KEYS.items():
        entries = report.typed(data, section, list, "service", LocatedList())
        for i, entry in enumerate(entries):
            line = entries.line_of(i)
            file, source = entry, None
            if isinstance(entry, Located):
                report.keys(entry, {"file", "source"}, f"a {section} entry")
                file, source = entry.get("file"), entry.get("source")
                if source is not None and source not in sources:
                    report.error(entry.line_of("source"), f"source {source!r} is not listed under 'sources'")
            if not isinstance(file, str) or not file.strip():
                report.error(line, f"{section} entry needs a 'file' (a text file, one name a line)")
                continue
            if source is None:
                report.warn(line, f"{section} entry {file!r} has no source recorded")
            list_path = Path(os.path.normpath(path.parent / file))
            if root is not None and not _inside(list_path, root):
                report.error(line, f"{section}: {file!r} is outside the blocklists directory "
                             "(changes there would not be reloaded)")
                continue
            shown_list = _display(root, list_path)
            names, lines, list_raw = _read_list(list_path, shown_list, problems, line, report)
            raw += b"\0" + list_raw
            lists.append((kind, shown_list, names, lines))
            if kind == "domain" and allows_present:
                domains.extend(names)
    for value, line in allows if not bad_domain else ():
        if not any(is_within(value, d) and value != d for d in domains):
            report.error(line, f"allow: {value!r} is not below any of this service's domains "
                         "(allow only carves names out of the service's own domains)")
    if len(problems) > before and any(p.severity == "error" for p in problems[before:]):
        return None, raw
    return Service(name, description, tuple(rules), tuple(ranges),
                   tuple((k, str(v)) for k, v in sources.items()), f"{shown}:1",
                   sum(len(n) for _, _, n, _ in lists), tuple(lists)), raw


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _read_list(path: Path, shown: str, problems: list[Problem], line: int, owner: "_Report"):
    """A plain-text list: one name a line, '#' starts a comment. Built for big lists: no YAML,
    one regex per name; returns (names, their line numbers, raw bytes)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        owner.error(line, f"cannot read list {shown!r}: {e.strerror or e}")
        return [], array("I"), b""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(Problem(shown, raw[: e.start].count(b"\n") + 1, "not valid UTF-8"))
        return [], array("I"), raw
    names: list[str] = []
    lines = array("I")
    seen: set[str] = set()
    valid = _VALID_NAME
    for number, entry in enumerate(_split_lines(text), 1):
        if "#" in entry:
            entry = entry.split("#", 1)[0]
        entry = entry.strip()
        if not entry:
            continue
        if not valid(entry):
            problems.append(Problem(shown, number, name_problem(entry) or f"{entry!r} is not a valid name"))
            continue
        if entry in seen:
            problems.append(Problem(shown, number, f"{entry!r} is listed twice"))
            continue
        seen.add(entry)
        names.append(entry)
        lines.append(number)
    return names, lines, raw


def _split_lines(text: str, size: int = 1 << 20):
    """text.split("\n"), a megabyte at a time: one C call over a whole million-name list holds
    the interpreter for some 60 ms, which a query waiting for it on a UDP thread would feel."""
    start = 0
    while True:
        end = text.find("\n", start + size)
        if end < 0:
            yield from text[start:].split("\n")
            return
        yield from text[start:end].split("\n")
        start = end + 1


def pattern_problem(pattern: str) -> str | None:
    if not pattern or len(pattern) > 500:
        return f"patterns: {pattern!r} must be 1 to 500 characters"
    try:
        regex = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return f"patterns: {pattern!r} does not compile: {e}"
    hits = [probe for probe in _PATTERN_PROBES if regex.fullmatch(probe)]
    if hits or regex.fullmatch(""):
        return (f"patterns: {pattern!r} would match almost anything "
                f"(it matches {', '.join(hits) or 'the empty name'})")
    return None


# -- policy.yaml -------------------------------------------------------------------------------

def _load_groups(data: Located, report: _Report, services: dict[str, Service | None], settings: Settings):
    groups: dict[str, Group] = {}
    owner: dict[str, tuple[str, int]] = {}
    subnet_table: dict[int, dict[int, dict[int, str]]] = {4: {}, 6: {}}
    raw_groups = report.typed(data, "groups", dict, "policy", None)
    if raw_groups is None:
        if "groups" not in data:
            report.error(data.line, "policy needs 'groups'")
        return groups, subnet_table
    for gname, body in raw_groups.items():
        gline = raw_groups.line_of(gname)
        what = f"group {gname!r}"
        if not isinstance(gname, str) or not _SERVICE_NAME.match(gname):
            report.error(gline, f"group name {gname!r} must be lower-case letters, digits and '-'")
            continue
        if not isinstance(body, Located):
            report.error(gline, f"{what} must be a mapping with subnets, block, response")
            continue
        report.keys(body, GROUP_KEYS, what)
        subnets = report.typed(body, "subnets", list, what, LocatedList())
        block = report.typed(body, "block", list, what, LocatedList())
        response = report.typed(body, "response", str, what, "nxdomain")
        block_ttl = report.typed(body, "block_ttl", int, what, settings.block_ttl)
        sinkhole = report.typed(body, "sinkhole", list, what, LocatedList())
        nets = []
        for i, text in enumerate(subnets):
            line = subnets.line_of(i)
            net = parse_network(text, report, line, f"{what} subnets")
            if net is None:
                continue
            key = str(net.cidr)
            if key in owner:
                other, other_line = owner[key]
                report.error(line, f"{what}: subnet {key} is already in group {other!r} (line {other_line})")
                continue
            owner[key] = (gname, line)
            subnet_table[net.version].setdefault(net.prefixlen, {})[int(net.network)] = gname
            nets.append(key)
        blocked = []
        for i, sname in enumerate(block):
            line = block.line_of(i)
            if not isinstance(sname, str) or sname not in services:
                report.error(line, f"{what}: unknown service {sname!r} "
                             f"(no {SERVICES_DIR}/{sname}.yaml; known: {', '.join(sorted(services)) or 'none'})")
            elif sname in blocked:
                report.error(line, f"{what}: service {sname!r} is listed twice")
            else:
                blocked.append(sname)
        if response not in RESPONSES:
            report.error(body.line_of("response"), f"{what}: response {response!r} is not one of {', '.join(RESPONSES)}")
        a, aaaa = [], []
        for i, text in enumerate(sinkhole):
            try:
                addr = netaddr.IPAddress(text) if isinstance(text, str) and "/" not in text else None
            except (netaddr.AddrFormatError, ValueError):
                addr = None
            if addr is None:
                report.error(sinkhole.line_of(i), f"{what}: sinkhole address {text!r} is not an IP address")
            else:
                (a if addr.version == 4 else aaaa).append(str(addr))
        if response == "sinkhole" and not (a or aaaa):
            report.error(body.line_of("response"), f"{what}: response sinkhole needs 'sinkhole' addresses")
        groups[gname] = Group(gname, tuple(nets), frozenset(blocked), response, block_ttl,
                              tuple(a), tuple(aaaa), f"{report.path}:{gline}")
    return groups, subnet_table


def _load_exemptions(data: Located, report: _Report, services, settings: Settings, now: float | None):
    exemptions: list[Exemption] = []
    raw = report.typed(data, "exemptions", list, "policy", LocatedList())
    ids: dict[str, int] = {}
    for i, body in enumerate(raw):
        line = raw.line_of(i)
        if not isinstance(body, Located):
            report.error(line, "an exemption must be a mapping with id, clients, services, approved_by, reason, expires")
            continue
        report.keys(body, EXEMPTION_KEYS, "an exemption")
        ex_id = body.get("id")
        what = f"exemption {ex_id!r}"
        ok = True
        if not isinstance(ex_id, (str, int)) or isinstance(ex_id, bool) or str(ex_id).strip() == "":
            report.error(line, "exemption needs an 'id'")
            ok = False
        elif str(ex_id) in ids:
            report.error(body.line_of("id"), f"{what}: duplicate id (first on line {ids[str(ex_id)]})")
            ok = False
        else:
            ids[str(ex_id)] = body.line_of("id")
        for key in ("approved_by", "reason"):
            value = body.get(key)
            if not isinstance(value, str) or not value.strip():
                report.error(body.line_of(key), f"{what}: {key!r} is required (text)")
                ok = False
        clients = body.get("clients")
        networks = []
        if not isinstance(clients, LocatedList) or not clients:
            report.error(body.line_of("clients"), f"{what}: 'clients' must be a non-empty list of IPs or CIDRs")
            ok = False
        else:
            for j, text in enumerate(clients):
                net = parse_network(text, report, clients.line_of(j), f"{what} clients")
                if net is None:
                    ok = False
                else:
                    bits = 32 if net.version == 4 else 128
                    mask = ((1 << net.prefixlen) - 1) << (bits - net.prefixlen)
                    networks.append((net.version, int(net.network), mask))
        svc = body.get("services")
        if not isinstance(svc, LocatedList) or not svc:
            report.error(body.line_of("services"), f"{what}: 'services' must be a non-empty list of service names")
            ok = False
        else:
            for j, sname in enumerate(svc):
                if not isinstance(sname, str) or sname not in services:
                    report.error(svc.line_of(j), f"{what}: unknown service {sname!r}")
                    ok = False
        if "expires" not in body:
            report.error(line, f"{what}: 'expires' is required (ISO 8601 with a time zone)")
            ok = False
            expires = None
        else:
            expires = parse_time(body["expires"], report, body.line_of("expires"), f"{what} expires")
            ok = ok and expires is not None
        starts = None
        if "starts" in body:
            starts = parse_time(body["starts"], report, body.line_of("starts"), f"{what} starts")
            ok = ok and starts is not None
        if expires is not None and starts is not None and expires <= starts:
            report.error(body.line_of("expires"), f"{what}: expires is not after starts")
            ok = False
        if expires is not None and now is not None and expires <= now:
            report.warn(body.line_of("expires"), f"{what}: has expired; remove it from the policy")
        if expires is not None:
            begin = starts if starts is not None else now
            if begin is not None and expires - begin > settings.max_exemption_days * 86400:
                report.warn(body.line_of("expires"), f"{what}: lasts more than "
                            f"{settings.max_exemption_days} days (max_exemption_days)")
        if ok:
            exemptions.append(Exemption(str(ex_id), tuple(str(c) for c in clients), frozenset(svc),
                                        body["approved_by"].strip(), body["reason"].strip(), starts,
                                        expires, f"{report.path}:{line}", tuple(networks)))
    return exemptions


# -- the whole directory -----------------------------------------------------------------------

def _display(directory: Path, path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _build(directory: Path, now: float | None) -> tuple[Policy | None, list[Problem]]:
    """Load with the cyclic garbage collector paused: a big list allocates millions of objects,
    and the collections that would trigger cost time and, in a running server, stall queries
    (the loader runs in a thread; a collection holds the interpreter)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return _build_unpaused(directory, now)
    finally:
        if paused:
            gc.enable()


def _build_unpaused(directory: Path, now: float | None) -> tuple[Policy | None, list[Problem]]:
    problems: list[Problem] = []
    directory = Path(directory)
    digest = hashlib.sha256()
    policy_path = directory / POLICY_FILE
    shown = _display(directory, policy_path)
    if not directory.is_dir():
        return None, [Problem(str(directory), 0, "is not a directory")]
    services: dict[str, Service | None] = {}
    service_dir = directory / SERVICES_DIR
    files = sorted(service_dir.glob("*.yaml")) if service_dir.is_dir() else []
    for path in files:
        service, raw = load_service(path, _display(directory, path), problems, directory)
        services[path.name[:-5]] = service
        digest.update(path.name.encode() + b"\0" + raw + b"\0")
    for path in sorted(service_dir.glob("*.yml")) if service_dir.is_dir() else []:
        problems.append(Problem(_display(directory, path), 1, "service files must end in .yaml"))
    data, file_problems, raw = read_yaml(policy_path, shown)
    digest.update(b"policy.yaml\0" + raw)
    problems.extend(file_problems)
    if file_problems:
        return None, problems
    report = _Report(shown, problems)
    if not isinstance(data, Located):
        report.error(1, "policy.yaml must be a mapping with groups, default_group, allowed_clients")
        return None, problems
    report.keys(data, POLICY_KEYS, "policy.yaml")
    settings = Settings(
        block_ttl=report.typed(data, "block_ttl", int, "policy", Settings.block_ttl),
        exemption_ttl=report.typed(data, "exemption_ttl", int, "policy", Settings.exemption_ttl),
        max_exemption_days=report.typed(data, "max_exemption_days", int, "policy", Settings.max_exemption_days),
    )
    groups, subnet_table = _load_groups(data, report, services, settings)
    default_group = data.get("default_group")
    if default_group is None:
        report.error(data.line, "policy needs 'default_group' (the group of allowed clients in no group's subnets)")
    elif not isinstance(default_group, str) or default_group not in groups:
        report.error(data.line_of("default_group"), f"default_group {default_group!r} is not a group")
    allowed_raw = report.typed(data, "allowed_clients", list, "policy", None)
    allowed_table: dict[int, dict[int, dict[int, bool]]] = {4: {}, 6: {}}
    allowed = []
    if allowed_raw is None:
        if "allowed_clients" not in data:
            report.error(data.line, "policy needs 'allowed_clients' (anyone else is refused)")
    else:
        for i, text in enumerate(allowed_raw):
            net = parse_network(text, report, allowed_raw.line_of(i), "allowed_clients")
            if net is not None:
                allowed_table[net.version].setdefault(net.prefixlen, {})[int(net.network)] = True
                allowed.append(str(net.cidr))
    exemptions = _load_exemptions(data, report, services, settings, now)
    if any(p.severity == "error" for p in problems):
        return None, problems
    policy = compile_policy(digest.hexdigest()[:12], groups, default_group, tuple(allowed),
                            {k: v for k, v in services.items() if v is not None}, tuple(exemptions),
                            settings, subnet_table, allowed_table)
    return policy, problems


def compile_policy(revision, groups, default_group, allowed, services, exemptions, settings,
                   subnet_table, allowed_table) -> Policy:
    names: dict[str, tuple[Rule, ...]] = {}
    patterns: dict[str, list] = {}
    all_rules = []
    if ENCRYPTED_DNS in services:
        # first, so that a catalog entry for the same name cannot change the built-in answer
        all_rules += [Rule(ENCRYPTED_DNS, kind, name, why, 0, response)
                      for name, kind, response, why in BUILT_INS]
    all_rules += [r for s in services.values() for r in s.rules]
    lists = []
    for service in services.values():
        for kind, path, list_names, lines in service.lists:
            base = len(lists) << 32
            lists.append((service.name, kind, path))
            for name, line in zip(list_names, lines):
                existing = names.get(name)
                if existing is None:
                    names[name] = base | line         # one int, not a Rule (see Policy.rules_at)
                else:                                 # rare: the name has other rules too
                    rule = Rule(service.name, kind, name, path, line)
                    all_rules.append(rule)
    for rule in all_rules:
        if rule.kind == "pattern":
            patterns.setdefault(rule.service, []).append((rule, re.compile(rule.text)))
            continue
        existing = names.get(rule.text)
        if existing.__class__ is int:
            service, kind, path = lists[existing >> 32]
            existing = (Rule(service, kind, rule.text, path, existing & 0xFFFFFFFF),)
        if existing is None:
            names[rule.text] = (rule,)
        elif rule.kind == "allow" or rule.response is not None:     # response: only built-ins have one
            # allow first: it carves before its twin blocks; built-ins first: nothing overrides them
            names[rule.text] = (rule,) + existing
        else:
            names[rule.text] = existing + (rule,)

    def table(t):
        return {v: tuple(sorted(t[v].items(), reverse=True)) for v in (4, 6)}

    services = {k: dataclasses.replace(v, lists=()) for k, v in services.items()}   # the lists are in `names` now
    return Policy(revision, groups, default_group, allowed, services, exemptions, settings,
                  names, {k: tuple(v) for k, v in patterns.items()}, table(subnet_table),
                  table(allowed_table), tuple(lists))


def check_directory(directory, now: float | None = None) -> list[Problem]:
    """Every problem in a blocklists directory, errors and warnings, in file order."""
    return _build(Path(directory), now)[1]


def load_policy(directory, now: float | None = None) -> Policy:
    """The compiled Policy, or PolicyError listing every error."""
    policy, problems = _build(Path(directory), now)
    if policy is None:
        raise PolicyError([p for p in problems if p.severity == "error"] or
                          [Problem(str(directory), 0, "could not be loaded")])
    return policy


def load_with_warnings(directory, now: float | None = None) -> tuple[Policy, list[Problem]]:
    policy, problems = _build(Path(directory), now)
    if policy is None:
        raise PolicyError([p for p in problems if p.severity == "error"])
    return policy, problems
