"""Shared test parts: real servers on loopback (dnsmasq upstream, the sinkhole itself), a DNS
client (dnspython), blocklist directories written per test. No sleeps: everything waits on an
event (a line printed, a query answered) with a bounded number of tries and a deadline."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import yaml

from processes import stop_process  # noqa: F401  (re-exported: tests import it from helpers)

ROOT = Path(__file__).resolve().parent.parent
SINKHOLE = [sys.executable, "-m", "resolver"]


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def is_root() -> bool:
    return os.geteuid() == 0


def have_ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (containers sometimes have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def write_blocklists(directory: Path, policy: dict, services: dict[str, dict]) -> Path:
    """A blocklists directory: policy.yaml plus services/<name>.yaml from plain dicts."""
    (directory / "services").mkdir(parents=True, exist_ok=True)
    (directory / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    for name, body in services.items():
        (directory / "services" / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return directory


TEST_SERVICES = {
    "chat": {"description": "a test chat service", "sources": {"t": "test"},
             "domains": [{"name": "chat.test", "source": "t"}, {"name": "chat-cdn.test", "source": "t"}],
             "hosts": [{"name": "exact.other.test", "source": "t"}],
             "patterns": [{"pattern": r"file-[0-9a-z]+\.files\.test", "source": "t"}],
             "allow": [{"name": "help.chat.test", "source": "t"}],
             "ip_ranges": [{"cidr": "198.51.100.0/24", "source": "t"}]},
    "encrypted-dns": {"description": "test DoH", "sources": {"t": "test"},
                      "domains": [{"name": "doh.test", "source": "t"}]},
}

# 127.0.1.0/24 plays the desktop subnet, 127.0.2.0/24 the mobile one.
TEST_POLICY = {
    "groups": {
        "desktop": {"subnets": ["127.0.1.0/24"], "block": ["chat", "encrypted-dns"], "response": "nxdomain"},
        "mobile": {"subnets": ["127.0.2.0/24"], "block": []},
    },
    "default_group": "mobile",
    "allowed_clients": ["127.0.0.0/8", "::1/128"],
}


def free_port(kind=socket.SOCK_DGRAM, host="127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def settled(host: str = "127.0.0.1", timeout: float = 5.0) -> None:
    """Return once every datagram this thread sent over loopback is in its receiver's queue.
    Loopback hands a datagram on before sendto returns, or else to this CPU's backlog, in order:
    one more sent to a socket of our own and read back comes after all of them."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        probe.settimeout(timeout)
        probe.sendto(b"settled?", probe.getsockname())
        assert probe.recv(16) == b"settled?"


def wait_for_answer(host: str, port: int, name: str = "probe.test", deadline: float = 10.0) -> None:
    """Wait until a DNS server answers on host:port (any rcode), at most `deadline` seconds."""
    end = time.monotonic() + deadline
    for _ in range(200):
        try:
            dns.query.udp(dns.message.make_query(name, "A"), host, port=port, timeout=0.2)
            return
        except (dns.exception.Timeout, OSError):
            if time.monotonic() > end:
                break
    raise TimeoutError(f"no DNS answer from {host}:{port}")


class Dnsmasq:
    """dnsmasq as the upstream: a real DNS server on loopback with the records a test wants.
    Records: lists of dnsmasq options, e.g. ["--host-record=www.example.test,192.0.2.10"]."""

    def __init__(self, options: list[str], host: str = "127.0.0.1"):
        self.host, self.options = host, options
        self.port = None
        self.proc = None

    def __enter__(self):
        for _ in range(10):
            self.port = free_port(host=self.host)
            self.proc = subprocess.Popen(
                ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-daemon",
                 f"--port={self.port}", f"--listen-address={self.host}", "--bind-interfaces",
                 "--cache-size=0", "--pid-file=", "--user=" + ("root" if is_root() else os.environ.get("USER", "nobody")),
                 "--local-ttl=300", *self.options],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_for_answer(self.host, self.port, deadline=5)
                return self
            except TimeoutError:
                self.proc.kill()
                self.proc.wait()
        raise RuntimeError("dnsmasq did not start")

    def __exit__(self, *exc):
        stop_process(self.proc, 5)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Sinkhole:
    """`sinkhole serve` as a real subprocess on loopback port 0; the bound ports are read back
    from its log. `config` is a dict written to sinkhole.yaml in `workdir`; `args` are added to
    `serve` (["-v"]: debug lines in .lines)."""

    def __init__(self, workdir: Path, config: dict, env: dict | None = None, args: tuple[str, ...] = ()):
        self.workdir = Path(workdir)
        self.args = tuple(args)
        self.config = {"listen": ["127.0.0.1:0"], "reload_interval": 0, **config}
        self.env = env
        self.lines: list[str] = []
        self.addresses: list[tuple[str, int]] = []
        self._cond = threading.Condition()

    def __enter__(self):
        path = self.workdir / "sinkhole.yaml"
        path.write_text(yaml.safe_dump(self.config))
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        self.proc = subprocess.Popen(SINKHOLE + ["serve", "-c", str(path), *self.args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout_lines: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stderr, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout_lines), daemon=True).start()
        want = len(self.config["listen"])
        self.wait_for_log(lambda: len([l for l in self.lines if "serving DNS on" in l]) >= want, 20,
                          "the server to start")
        for line in self.lines:
            if "serving DNS on" in line:
                words = line.split()
                self.addresses.append((words[words.index("on") + 1], int(words[words.index("port") + 1])))
        return self

    def _read(self, stream, sink):
        for line in stream:
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_log(self, predicate, timeout: float, what: str):
        with self._cond:
            if not self._cond.wait_for(lambda: predicate() or self.proc.poll() is not None, timeout):
                raise TimeoutError(f"timed out waiting for {what}; log:\n" + "\n".join(self.lines))
            if not predicate():
                raise RuntimeError(f"server exited ({self.proc.returncode}) waiting for {what}; log:\n"
                                   + "\n".join(self.lines))

    def count(self, text: str) -> int:
        with self._cond:
            return sum(text in l for l in self.lines)

    def __exit__(self, *exc):
        stop_process(self.proc)                 # SIGTERM: the server drains and exits

    @property
    def host(self) -> str:
        return self.addresses[0][0]

    @property
    def port(self) -> int:
        return self.addresses[0][1]


def ask(server: tuple[str, int] | Sinkhole, name: str, rdtype="A", source: str | None = None,
        tcp: bool = False, use_edns=False, payload: int = 1232, timeout: float = 3.0) -> dns.message.Message:
    """One query with dnspython from `source` (e.g. 127.0.1.5 for a desktop)."""
    host, port = (server.host, server.port) if isinstance(server, Sinkhole) else server
    if use_edns:
        query = dns.message.make_query(name, rdtype, use_edns=0, payload=payload)
    else:
        query = dns.message.make_query(name, rdtype, use_edns=False)
    if tcp:
        return dns.query.tcp(query, host, port=port, timeout=timeout, source=source)
    return dns.query.udp(query, host, port=port, timeout=timeout, source=source, ignore_trailing=False)


class PyUpstream:
    """A small real DNS server on loopback (UDP and TCP on one port, dnslib for the records) for
    what dnsmasq cannot do: answers bigger than any UDP limit, TC on every UDP answer, silence.
    `answer(request, transport)` returns a dnslib DNSRecord, or None to stay silent. Every question
    it receives is recorded in `.queries` as (transport, qname without the dot, qtype name)."""

    def __init__(self, answer, host: str = "127.0.0.1", truncate_udp: bool = False):
        self.answer, self.host, self.truncate_udp = answer, host, truncate_udp
        self.queries: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def __enter__(self):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(20):
            self.udp = socket.socket(family, socket.SOCK_DGRAM)
            self.udp.bind((self.host, 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(family, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind((self.host, self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        else:
            raise RuntimeError("no free UDP+TCP port pair")
        self.tcp.listen(16)
        self.udp.settimeout(0.1)
        self.tcp.settimeout(0.1)
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.udp.close()
        self.tcp.close()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def asked(self, qname: str) -> list[tuple[str, str, str]]:
        with self._lock:
            return [q for q in self.queries if q[1] == qname]

    def _reply(self, data: bytes, transport: str) -> bytes | None:
        import dnslib
        try:
            request = dnslib.DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - a test server ignores garbage
            return None
        with self._lock:
            self.queries.append((transport, str(request.q.qname).rstrip("."),
                                 dnslib.QTYPE.get(request.q.qtype)))
        reply = self.answer(request, transport)
        if reply is None:
            return None
        if transport == "udp" and self.truncate_udp:
            reply.rr, reply.auth, reply.ar = [], [], []
            reply.header.tc = 1
        return reply.pack()

    def _serve_udp(self):
        while not self._stop.is_set():
            try:
                data, addr = self.udp.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            out = self._reply(data, "udp")
            if out is not None:
                self.udp.sendto(out, addr)

    def _serve_tcp(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    for _ in range(100):
                        head = conn.recv(2, socket.MSG_WAITALL)
                        if len(head) < 2:
                            break
                        data = conn.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)
                        out = self._reply(data, "tcp")
                        if out is not None:
                            conn.sendall(len(out).to_bytes(2, "big") + out)
                except OSError:
                    pass


def zone_answer(zone: str):
    """An `answer` for PyUpstream from zone-file lines: every record whose name and type match
    the question (ANY: all of that name); NXDOMAIN for names the zone does not have."""
    import dnslib
    records = dnslib.RR.fromZone(zone)

    def answer(request, transport):
        reply = request.reply()
        qname, qtype = request.q.qname, request.q.qtype
        named = [rr for rr in records if rr.rname == qname]
        reply.rr = [rr for rr in named if qtype in (rr.rtype, dnslib.QTYPE.ANY)]
        if not named:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
        return reply
    return answer
