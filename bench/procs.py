"""The servers under test as processes: sinkhole, dnsmasq and Unbound configured alike, the pyraw
reference loop, a dnsmasq upstream, and what the harness reads from /proc about them (CPU ticks,
RSS, machine load)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "tests"))
from processes import stop_process  # noqa: E402  (standard library only, shared with the tests)

HZ = os.sysconf("SC_CLK_TCK")


# -- pinning -------------------------------------------------------------------------------------
def pinning() -> tuple[bool, str]:
    """(available, why): the server goes on CPU 1, dnsperf on CPU 0."""
    if shutil.which("taskset") is None:
        return False, "taskset not installed: nothing pinned"
    cpus = os.sched_getaffinity(0)
    if not {0, 1} <= cpus:
        return False, f"CPUs 0 and 1 not both available (have {sorted(cpus)}): nothing pinned"
    return True, "server on CPU 1, load generator and upstream on CPU 0"


HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


class HaltPoll:
    """A KVM guest's idle CPUs halt at once when guest_halt_poll_ns is 0 (this VM boots with
    haltpoll.guest_halt_poll_ns=0), and waking a halted vCPU costs tens of microseconds: at a
    steady 10k q/s every query waits for one, for every server alike. With `ns` > 0 an idle CPU
    polls that long before it halts. Opt-in (bench --halt-poll-ns) and put back on exit; `note`
    says what the run had, for RESULTS.md."""

    def __init__(self, ns: int | None):
        self.ns, self.before = ns, None
        current = HALT_POLL.read_text().strip() if HALT_POLL.exists() else None
        if ns is None:
            self.note = (f"guest halt polling {current} ns, as the machine had it" if current is not None
                         else "no haltpoll guest idle driver")
        else:
            self.note = f"guest halt polling set to {ns} ns for this run (machine: {current} ns)"
            if current is None:
                raise SystemExit("bench: --halt-poll-ns needs a KVM guest with the haltpoll cpuidle driver")
            self.before = current

    def __enter__(self):
        if self.ns is not None:
            HALT_POLL.write_text(str(self.ns))
        return self

    def __exit__(self, *exc):
        if self.before is not None:
            HALT_POLL.write_text(self.before)


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if cpu is not None else cmd


# -- /proc ---------------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def tree(pid: int) -> list[int]:
    """pid and every descendant (the --workers processes)."""
    out, todo = [], [pid]
    for _ in range(1000):
        if not todo:
            break
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of every thread of these processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / HZ


def rss_mib(pids: list[int], field: str = "VmRSS") -> float:
    """Resident memory of these processes. Several processes (--workers: forked, sharing pages)
    are summed as PSS, so shared pages count once; one process is its VmRSS (or VmHWM: the peak)."""
    total = 0
    for pid in pids:
        try:
            if len(pids) > 1 and field == "VmRSS":
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
                total += next(int(l.split()[1]) for l in text.splitlines() if l.startswith("Pss:"))
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except (OSError, StopIteration):
            continue
    return total / 1024


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (every CPU, everything but idle/iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / HZ


def quiet_gate(own_pids: list[int], limit: float, max_wait: float, window: float = 1.0) -> dict:
    """Wait (at most max_wait seconds) until processes other than ours use < `limit` of one core."""
    started = time.monotonic()
    load = None
    for _ in range(int(max_wait / window) + 2):
        busy0, own0, t0 = machine_busy(), cpu_seconds(own_pids), time.monotonic()
        time.sleep(window)
        busy1, own1, t1 = machine_busy(), cpu_seconds(own_pids), time.monotonic()
        load = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)
        if load < limit:
            return {"waited_s": round(time.monotonic() - started, 1), "foreign_cores": round(load, 3),
                    "timed_out": False}
        if time.monotonic() - started >= max_wait:
            break
    return {"waited_s": round(time.monotonic() - started, 1), "foreign_cores": round(load or 0, 3),
            "timed_out": True}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


# -- a DNS probe without dependencies ------------------------------------------------------------
def probe(host: str, port: int, name: str, source: str = "127.0.0.1", timeout: float = 0.3) -> int | None:
    """One A query; the rcode of the answer, or None."""
    qid = os.getpid() & 0xFFFF
    question = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0\0\1\0\1"
    packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(timeout)
        s.sendto(packet, (host, port))
        try:
            data = s.recv(4096)
        except OSError:
            return None
    return data[3] & 0xF if len(data) >= 12 and data[:2] == packet[:2] else None


def wait_ready(host: str, port: int, proc: subprocess.Popen, deadline: float, name: str) -> float:
    """Seconds until the server answers (any rcode); raises if it exits or the deadline passes."""
    start = time.monotonic()
    for _ in range(int(deadline / 0.05) + 10):
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before answering")
        if probe(host, port, name, timeout=0.05) is not None:
            return time.monotonic() - start
        if time.monotonic() - start > deadline:
            break
    raise TimeoutError(f"no answer from {host}:{port} within {deadline} s")


def free_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            try:
                t.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


# -- servers -------------------------------------------------------------------------------------
class Server:
    """One DNS server process on 127.0.0.1:port."""

    name = "server"

    def __init__(self, workdir: Path, cpu: int | None):
        self.workdir, self.cpu = workdir, cpu
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None
        self.log = workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, probe_name: str, deadline: float = 60.0) -> "Server":
        self._log = open(self.log, "ab")
        self._log_from = self._log.tell()
        self.proc = subprocess.Popen(pinned(self.command(), self.cpu), stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            start = time.monotonic()
            self.wait_listening(deadline)
            wait_ready("127.0.0.1", self.port, self.proc, deadline, probe_name)
            self.ready_s = time.monotonic() - start
        except Exception as e:
            self.stop()
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} did not start: {e}\n{tail}") from None
        return self

    def wait_listening(self, deadline: float) -> None:
        """Servers that say when they listen are waited for first: a probe alone could be answered
        by another program that took the same port while this one was still loading."""

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc)
        self._log.close()


class Upstream(Server):
    """dnsmasq answering every name under bench.test itself, uncached: the 'internet'."""

    name = "upstream"

    def __init__(self, workdir, cpu, zone: str):
        self.zone = zone
        super().__init__(workdir, cpu)

    def command(self):
        return ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--pid-file=",
                f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                "--user=" + _user(), f"--address=/{self.zone}/192.0.2.1", "--cache-size=0",
                "--local-ttl=3600", "--log-facility=-"]


class Dnsmasq(Server):
    name = "dnsmasq"

    def __init__(self, workdir, cpu, upstream: int, blocklist: Path, cache_size: int):
        self.upstream, self.blocklist, self.cache_size = upstream, blocklist, cache_size
        super().__init__(workdir, cpu)

    def command(self):
        return ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--pid-file=",
                f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                "--user=" + _user(), f"--server=127.0.0.1#{self.upstream}", f"--cache-size={self.cache_size}",
                f"--conf-file={self.blocklist}", "--log-facility=-"]


class Unbound(Server):
    name = "unbound"

    def __init__(self, workdir, cpu, upstream: int, blocklist: Path, cache_size: int):
        self.upstream, self.blocklist, self.cache_size = upstream, blocklist, cache_size
        super().__init__(workdir, cpu)
        self.conf = workdir / "unbound.conf"

    def command(self):
        self.conf.write_text(f"""server:
    interface: 127.0.0.1
    port: {self.port}
    num-threads: 1
    do-ip6: no
    username: ""
    chroot: ""
    directory: "{self.workdir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    module-config: "iterator"
    do-not-query-localhost: no
    access-control: 127.0.0.0/8 allow
    so-rcvbuf: 4m
    local-zone: "test." nodefault
    include: "{self.blocklist}"
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{self.upstream}
""")
        return ["unbound", "-d", "-p", "-c", str(self.conf)]


class PyRaw(Server):
    """bench/pyraw.py: a bare recvfrom/sendto loop with a wire-name set and a question-bytes cache,
    the floor of a Python server here. Reads the sinkhole's list files (one name per line)."""

    name = "pyraw"

    def __init__(self, workdir, cpu, upstream: int, lists: list[Path], cache_size: int):
        self.upstream, self.lists, self.cache_size = upstream, lists, cache_size
        super().__init__(workdir, cpu)

    def command(self):
        cmd = [sys.executable, str(ROOT / "bench" / "pyraw.py"), "--port", str(self.port),
               "--upstream", f"127.0.0.1:{self.upstream}", "--cache-size", str(self.cache_size)]
        for path in self.lists:
            cmd += ["--list", str(path)]
        return cmd

    def wait_listening(self, deadline: float) -> None:
        _wait_log(self, deadline)


class Sinkhole(Server):
    """`sinkhole serve` with the full product on: policy, query log to a file, metrics if built."""

    name = "sinkhole"

    def __init__(self, workdir, cpu, upstream: int, blocklists: Path, cache_size: int,
                 workers: int = 1, metrics: bool = True, reload_interval: float = 0, querylog: bool = True):
        self.upstream, self.blocklists, self.cache_size = upstream, blocklists, cache_size
        self.workers, self.metrics, self.reload_interval = workers, metrics, reload_interval
        self.querylog_on = querylog
        if workers > 1:
            self.name = f"sinkhole-w{workers}"
        if not querylog:
            self.name += "-nolog"
        super().__init__(workdir, cpu)
        self.querylog = workdir / f"{self.name}-queries.jsonl"
        self.conf = workdir / f"{self.name}.yaml"

    def command(self):
        config = {
            "listen": [f"127.0.0.1:{self.port}"],
            "upstreams": [f"127.0.0.1:{self.upstream}"],
            "blocklists": str(self.blocklists),
            "cache": {"size": self.cache_size},
            "reload_interval": self.reload_interval,
            # max_bytes 0: no rotation, so the harness can count every line written in a run
            "query_log": {"target": str(self.querylog) if self.querylog_on else "off", "max_bytes": 0},
        }
        if self.metrics:
            self.metrics_port = free_port()
            config["metrics"] = {"listen": f"127.0.0.1:{self.metrics_port}"}
        self.conf.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-m", "resolver", "serve", "-c", str(self.conf)]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        return cmd

    def wait_listening(self, deadline: float) -> None:
        _wait_log(self, deadline)

    def cache_requests(self) -> list[float] | None:
        """Each worker's sinkhole_cache_requests_total, from its metrics port (the metrics port +
        its index); None when metrics are off."""
        if not self.metrics:
            return None
        counts = []
        for index in range(max(1, self.workers)):
            url = f"http://127.0.0.1:{self.metrics_port + index}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            found = re.search(r"^sinkhole_cache_requests_total (\S+)$", text, re.M)
            counts.append(float(found.group(1)) if found else 0.0)
        return counts

    def querylog_lines(self, settle: float = 0.3, deadline: float = 15.0) -> int:
        """Lines in the query log once the writer has caught up; then empties the file."""
        last, stable_since = -1, time.monotonic()
        end = time.monotonic() + deadline
        for _ in range(int(deadline / 0.05) + 1):
            size = self.querylog.stat().st_size if self.querylog.exists() else 0
            if size != last:
                last, stable_since = size, time.monotonic()
            elif time.monotonic() - stable_since >= settle or time.monotonic() > end:
                break
            time.sleep(0.05)
        lines = 0
        # --workers: worker i > 0 writes NAME.workerI.EXT beside the main file
        for path in [self.querylog, *self.querylog.parent.glob(f"{self.querylog.stem}.worker*{self.querylog.suffix}")]:
            if path.exists():
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        lines += chunk.count(b"\n")
                os.truncate(path, 0)        # the writer appends (O_APPEND): it goes on at offset 0
        return lines


def _wait_log(server: Server, deadline: float) -> None:
    """Until the server's log (this start's part) says "port N " (its own port), or it exits."""
    text = f"port {server.port} ".encode()
    end = time.monotonic() + deadline
    for _ in range(int(deadline / 0.05) + 1):
        with open(server.log, "rb") as f:
            f.seek(server._log_from)
            if text in f.read() or server.proc.poll() is not None:
                return
        if time.monotonic() > end:
            raise TimeoutError(f"not listening on port {server.port} within {deadline} s")
        time.sleep(0.05)


def _user() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


def metrics_available() -> tuple[bool, str]:
    """Metrics on when this checkout has resolver/metrics.py (looked up as a file: an editable
    install elsewhere must not lend its module to this tree)."""
    if not (ROOT / "resolver" / "metrics.py").exists():
        return False, "resolver/metrics.py not in this build: metrics off"
    return True, "metrics on (Prometheus endpoint on loopback)"


def workers_supported() -> bool:
    out = subprocess.run([sys.executable, "-m", "resolver", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    return "--workers" in out.stdout
