"""sinkhole.yaml: one deployment's settings. Every key is documented in README "Configuration";
unknown keys are errors. Paths are relative to the file's own directory."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from .loader import PolicyError, _Report, parse_network
from .yamlsrc import Located, LocatedList, Problem, read_yaml

KEYS = {"listen", "upstreams", "upstream_timeout", "blocklists", "cache", "reload_interval",
        "query_log", "metrics", "ecs_clients_from", "user", "sanctioned_resolvers", "rate_limit", "tcp", "udp"}
CACHE_KEYS = {"size", "min_ttl", "max_ttl", "negative_max_ttl", "serve_stale", "answers"}
LOG_KEYS = {"target", "max_bytes", "backups", "queue"}
METRICS_KEYS = {"listen"}
RATE_KEYS = {"rate", "burst", "exempt", "slip"}
TCP_KEYS = {"max_connections", "idle_timeout", "max_queries", "max_lifetime"}
UDP_KEYS = {"batch"}


@dataclass(frozen=True)
class CacheConfig:
    size: int = 10000
    min_ttl: int = 0
    max_ttl: int = 86400
    negative_max_ttl: int = 3600
    serve_stale: int = 0
    answers: int = 1 << 17       # finished answers kept for reuse, per client group (0: none)


@dataclass(frozen=True)
class QueryLogConfig:
    target: str = "off"        # off | stdout | a file path
    max_bytes: int = 50 * 1024 * 1024
    backups: int = 10
    queue: int = 10000


@dataclass(frozen=True)
class RateLimitConfig:
    rate: int = 0              # queries per second per /32 (IPv4) or /64 (IPv6); 0 = off
    burst: int = 0
    exempt: tuple[str, ...] = ()
    slip: int = 2              # over the limit: every 2nd query gets TC=1 (retry over TCP), the rest dropped; 0 = drop all


@dataclass(frozen=True)
class TcpConfig:
    max_connections: int = 256
    idle_timeout: float = 10.0
    max_queries: int = 1000
    max_lifetime: float = 120.0  # seconds one connection may live; then in-flight answers go out and it closes


@dataclass(frozen=True)
class UdpConfig:
    batch: int = 64              # datagrams taken in (recvmmsg) and answered (sendmmsg) per call;
                                 # 1: recvfrom/sendto


@dataclass(frozen=True)
class Config:
    path: str = "sinkhole.yaml"
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 5353),)
    upstreams: tuple[tuple[str, int], ...] = ()
    upstream_timeout: float = 1.5
    blocklists: str = "blocklists"
    cache: CacheConfig = field(default_factory=CacheConfig)
    reload_interval: float = 5.0
    query_log: QueryLogConfig = field(default_factory=QueryLogConfig)
    metrics: tuple[str, int] | None = None
    ecs_clients_from: tuple[str, ...] = ()
    user: str | None = None
    sanctioned_resolvers: tuple[str, ...] = ()
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    tcp: TcpConfig = field(default_factory=TcpConfig)
    udp: UdpConfig = field(default_factory=UdpConfig)


def parse_hostport(text, default_port: int | None) -> tuple[str, int]:
    """'192.0.2.1:53', '[2001:db8::1]:53', or a bare address when a default port is given."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not host:port")
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r} is not [address]:port")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if port is None:
        if default_port is None:
            raise ValueError(f"{text!r} needs a port (host:port, [v6]:port)")
        port = default_port
    try:
        port = int(port)
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not address:port with a numeric IP address") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return host, port


def resolv_conf_upstreams(path: str = "/etc/resolv.conf") -> tuple[tuple[str, int], ...]:
    out = []
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ()
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ipaddress.ip_address(parts[1].split("%")[0])
                out.append((parts[1].split("%")[0], 53))
            except ValueError:
                continue
    return tuple(out)


def load_config(path) -> Config:
    """Read sinkhole.yaml; raises PolicyError listing every problem with its line."""
    path = Path(path)
    data, problems, _ = read_yaml(path)
    if problems:
        raise PolicyError(problems)
    report = _Report(str(path), problems)
    if data is None:
        data = Located()
    if not isinstance(data, Located):
        raise PolicyError([Problem(str(path), 1, "the configuration must be a mapping")])
    report.keys(data, KEYS, str(path.name))
    base = path.parent

    def hostports(key, default_port):
        value = report.typed(data, key, list, "configuration", None)
        out = []
        for i, text in enumerate(value or ()):
            try:
                out.append(parse_hostport(text, default_port))
            except ValueError as e:
                report.error(value.line_of(i), f"{key}: {e}")
        return value, tuple(out)

    def section(key, keys, cls, types):
        value = report.typed(data, key, dict, "configuration", Located())
        report.keys(value, keys, key)
        kwargs = {}
        for k, kind in types.items():
            v = value.get(k)
            if v is None:
                continue
            if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
                kwargs[k] = float(v)
            elif kind is int and isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                kwargs[k] = v
            elif kind is str and isinstance(v, str):
                kwargs[k] = v
            elif kind is tuple and isinstance(v, LocatedList):
                for i, text in enumerate(v):
                    parse_network(text, report, v.line_of(i), f"{key}.{k}")
                kwargs[k] = tuple(str(t) for t in v)
            else:
                report.error(value.line_of(k), f"{key}.{k}: {v!r} is not a valid {kind.__name__}")
        return cls(**kwargs)

    listen_raw, listen = hostports("listen", None)
    _, upstreams = hostports("upstreams", 53)
    if not upstreams:
        upstreams = resolv_conf_upstreams()
    listen_set = set(listen or Config.listen)
    upstreams = tuple(u for u in upstreams if u not in listen_set)
    if not upstreams:
        report.error(data.line_of("upstreams"), "no upstreams: list some under 'upstreams' "
                     "(none usable in /etc/resolv.conf either)")
    ecs = report.typed(data, "ecs_clients_from", list, "configuration", LocatedList())
    for i, text in enumerate(ecs):
        parse_network(text, report, ecs.line_of(i), "ecs_clients_from")
    sanctioned = report.typed(data, "sanctioned_resolvers", list, "configuration", LocatedList())
    for i, text in enumerate(sanctioned):
        parse_network(text, report, sanctioned.line_of(i), "sanctioned_resolvers")
    metrics = None
    metrics_section = report.typed(data, "metrics", dict, "configuration", None)
    if metrics_section is not None:
        report.keys(metrics_section, METRICS_KEYS, "metrics")
        if "listen" in metrics_section:
            try:
                metrics = parse_hostport(metrics_section["listen"], None)
            except ValueError as e:
                report.error(metrics_section.line_of("listen"), f"metrics.listen: {e}")
    blocklists = report.typed(data, "blocklists", str, "configuration", "blocklists")
    timeout = data.get("upstream_timeout", Config.upstream_timeout)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0.05 <= timeout <= 30:
        report.error(data.line_of("upstream_timeout"), "upstream_timeout must be seconds between 0.05 and 30")
        timeout = Config.upstream_timeout
    interval = data.get("reload_interval", Config.reload_interval)
    if not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval < 0:
        report.error(data.line_of("reload_interval"), "reload_interval must be seconds >= 0 (0: only on SIGHUP)")
        interval = Config.reload_interval
    user = report.typed(data, "user", str, "configuration", None)
    cache = section("cache", CACHE_KEYS, CacheConfig, {k: int for k in CACHE_KEYS})
    query_log = section("query_log", LOG_KEYS, QueryLogConfig,
                        {"target": str, "max_bytes": int, "backups": int, "queue": int})
    rate = section("rate_limit", RATE_KEYS, RateLimitConfig, {"rate": int, "burst": int, "exempt": tuple, "slip": int})
    tcp = section("tcp", TCP_KEYS, TcpConfig, {"max_connections": int, "idle_timeout": float, "max_queries": int,
                                               "max_lifetime": float})
    if tcp.max_lifetime <= 0:
        report.error(data["tcp"].line_of("max_lifetime"), "tcp.max_lifetime must be seconds > 0")
    udp = section("udp", UDP_KEYS, UdpConfig, {"batch": int})
    if not 1 <= udp.batch <= 1024:
        report.error(data["udp"].line_of("batch"), "udp.batch must be a whole number from 1 to 1024")
    if query_log.target not in ("off", "stdout", "-"):
        query_log = QueryLogConfig(str(base / query_log.target), query_log.max_bytes,
                                   query_log.backups, query_log.queue)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise PolicyError(errors)
    return Config(str(path), listen or Config.listen, upstreams, float(timeout), str(base / blocklists),
                  cache, float(interval), query_log, metrics, tuple(str(x) for x in ecs), user,
                  tuple(str(x) for x in sanctioned), rate, tcp, udp)
