"""Shared test parts: real servers on loopback (dnsmasq upstream, the sinkhole itself), a DNS
client (dnspython), blocklist directories written per test. No sleeps: everything waits on an
event (a line printed, a query answered) with a bounded number of tries and a deadline."""
from __future__ import annotations

import os
import shutil
import signal
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

ROOT = Path(__file__).resolve().parent.parent
SINKHOLE = [sys.executable, "-m", "resolver"]


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def is_root() -> bool:
    return os.geteuid() == 0


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
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Sinkhole:
    """`sinkhole serve` as a real subprocess on loopback port 0; the bound ports are read back
    from its log. `config` is a dict written to sinkhole.yaml in `workdir`."""

    def __init__(self, workdir: Path, config: dict, env: dict | None = None):
        self.workdir = Path(workdir)
        self.config = {"listen": ["127.0.0.1:0"], "reload_interval": 0, **config}
        self.env = env
        self.lines: list[str] = []
        self.addresses: list[tuple[str, int]] = []
        self._cond = threading.Condition()

    def __enter__(self):
        path = self.workdir / "sinkhole.yaml"
        path.write_text(yaml.safe_dump(self.config))
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        self.proc = subprocess.Popen(SINKHOLE + ["serve", "-c", str(path)], cwd=ROOT, env=env,
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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

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
    query = dns.message.make_query(name, rdtype, use_edns=0 if use_edns else None, payload=payload)
    if tcp:
        return dns.query.tcp(query, host, port=port, timeout=timeout, source=source)
    return dns.query.udp(query, host, port=port, timeout=timeout, source=source, ignore_trailing=False)
