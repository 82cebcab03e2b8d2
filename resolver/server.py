"""The I/O shell: sockets, the upstream task, policy reloads, signals. Decisions live in core.py.

UDP is read by one thread per socket, a batch at a time: every datagram waiting, taken in with one
blocking recvmmsg and answered with one sendmmsg (udpio.py; recvfrom/sendto with `udp: {batch: 1}`),
no event loop in between; only queries that need the upstream go to the event loop, as tasks. TCP
follows RFC 7766: length-prefixed messages, several per connection, answered as they complete.
"""
from __future__ import annotations

import asyncio
import gc
import errno
import hashlib
import ipaddress
import logging
import os
import signal
import socket
import struct
import threading
import time

from . import core
from .cache import Cache
from .config import Config
from .loader import PolicyError, load_with_warnings
from .observe import Quiet
from .policy import Policy
from .querylog import FLUSH_INTERVAL, QueryLog
from .ratelimit import PASS, SLIP, RateLimiter, slip_answer
from .upstream import Upstreams
from .udpio import send_one, udp_io
from .wire import truncate

log = logging.getLogger("sinkhole")
MAX_INFLIGHT = 4096
TCP_PIPELINE = 64             # queries in progress per TCP connection before we stop reading


def fingerprint(directory: str) -> str:
    """A cheap checksum of the blocklists directory: where it resolves to (git-sync flips a
    symlink) and every file's name, size, mtime and inode."""
    root = os.path.realpath(directory)
    h = hashlib.sha256(root.encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            h.update(f"{dirpath}/{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()


class Server:
    def __init__(self, config: Config, policy: Policy, observer=None, clock=time.time,
                 reuse_port: bool = False):
        self.config = config
        self.reuse_port = reuse_port         # --workers: several processes share the listening ports
        self.policy = policy                 # the one reference a reload swaps
        self.observer = observer or Quiet()
        self.clock = clock
        c = config.cache
        self.cache = Cache(c.size, c.min_ttl, c.max_ttl, c.negative_max_ttl, c.serve_stale)
        ecs_nets = [ipaddress.ip_network(n) for n in config.ecs_clients_from]
        self.ctx = core.Context(self.cache, (lambda client: _in_nets(client, ecs_nets)) if ecs_nets else None)
        r = config.rate_limit
        self.ratelimit = RateLimiter(r.rate, r.burst, r.exempt, r.slip) if r.rate else None
        self.upstreams = Upstreams(config.upstreams, config.upstream_timeout, self.observer.upstream)
        q = config.query_log
        self.lock = threading.RLock()        # the cache, policy memos, counters and query log:
                                             # one thread at a time (see _udp_serve)
        self.querylog = QueryLog(q.target, q.max_bytes, q.backups, q.queue, lock=self.lock)
        self.fingerprint = fingerprint(config.blocklists)
        self.addresses: list[tuple[str, int]] = []
        self.last_reload_ok: float | None = None
        self.reload_failures = 0
        self.reload_failing = False          # the files on disk were rejected; the old policy serves
        self._udp: list[socket.socket] = []
        self._udp_threads: list[threading.Thread] = []
        self._udp_pending = 0                # queries handed from UDP threads to the event loop
        self._halt = False                   # tells the UDP threads to return
        self._tcp_servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()
        self._tcp_count = 0
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.observer.bind(self)

    # -- start and stop ------------------------------------------------------------------------
    async def start(self) -> list[tuple[str, int]]:
        self._loop = asyncio.get_running_loop()
        self.querylog.start()
        for host, port in self.config.listen:
            self.addresses.append(await self._listen(host, port))
        self.last_reload_ok = self.clock()
        self.observer.reload(True, self.policy, self.last_reload_ok)
        self._spawn(self._reload_loop())
        if self.querylog.enabled:
            self._spawn(self._querylog_ticker())
        # The policy lives until the next reload: move it out of the garbage collector's way, or
        # every full collection walks a million-entry name table (milliseconds on the query path).
        gc.freeze()
        return self.addresses

    async def _listen(self, host: str, port: int) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for attempt in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            if self.reuse_port:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            except OSError:
                pass
            try:
                udp.bind((host, port))
            except OSError as e:
                udp.close()
                hint = " (a port below 1024 needs root or CAP_NET_BIND_SERVICE)" if e.errno == errno.EACCES else ""
                raise OSError(e.errno, f"cannot listen on {host} port {port}: {e.strerror}{hint}") from None
            bound = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                tcp.bind((host, bound))
            except OSError:
                udp.close()
                tcp.close()
                if port == 0 and attempt < 19:
                    continue              # port 0: the TCP twin of the UDP port was taken; try another
                raise
            break
        self._udp.append(udp)
        thread = threading.Thread(target=self._udp_serve, args=(udp,), name=f"udp {host}:{bound}", daemon=True)
        self._udp_threads.append(thread)
        thread.start()
        tcp.listen(128)
        tcp.setblocking(False)
        self._tcp_servers.append(await asyncio.start_server(self._tcp_client, sock=tcp))
        log.info("serving DNS on %s port %d (UDP and TCP)", host, bound)
        return host, bound

    @property
    def serving(self) -> bool:
        """Listening for DNS, every UDP thread alive, not shutting down (for /healthz)."""
        return (bool(self.addresses) and not self._stopping.is_set()
                and all(thread.is_alive() for thread in self._udp_threads))

    async def stop(self, drain: float = 5.0) -> None:
        """Stop listening, let in-flight queries finish (up to `drain` seconds), close everything."""
        self._stopping.set()
        self._halt = True
        for udp in self._udp:
            try:
                udp.shutdown(socket.SHUT_RD)        # wakes the thread blocked in receive(); sending works on
            except OSError:
                pass                                # ENOTCONN: unconnected UDP, woken all the same
        for thread in self._udp_threads:
            await asyncio.to_thread(thread.join, 2.0)
        for srv in self._tcp_servers:
            srv.close()
        pending = [t for t in self._tasks if not t.get_name().startswith("bg:")]
        if pending:
            await asyncio.wait(pending, timeout=drain)
        for task in list(self._tasks):
            task.cancel()
        for udp in self._udp:
            udp.close()
        self.querylog.close()

    def _spawn(self, coro, background: bool = True) -> asyncio.Task:
        task = (self._loop or asyncio.get_running_loop()).create_task(coro)
        if background:
            task.set_name("bg:" + task.get_name())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- UDP -----------------------------------------------------------------------------------
    def _udp_serve(self, sock: socket.socket) -> None:
        """The body of a UDP socket's thread: its loop, started again if a bug ever escapes it (that
        costs the batch in hand, never the socket). Each turn needs a datagram, so a bug that fails
        every batch logs once per batch, and nothing spins."""
        while True:
            try:
                self._udp_loop(sock)
                return
            except Exception:
                log.exception("UDP loop on %s failed; serving on", sock.getsockname())
                self.observer.dropped("internal")

    def _udp_loop(self, sock: socket.socket) -> None:
        """The thread of one UDP socket: it takes in every datagram waiting at once (udpio: one
        recvmmsg), answers what can be answered at once (blocks, cache hits, errors), sends those
        answers at once (one sendmmsg), then counts and logs them; what needs the upstream is
        handed to the event loop. Everything but receiving runs under self.lock, which the event
        loop thread takes too (TCP, upstream answers, reloads, scrapes): one writer at a time for
        the cache, the counters and the query log, and an answer is counted and logged before
        anyone else can look. The answers of a batch share its time and its duration (from
        receiving the batch to having sent it). This is the resolver's hot loop; names are bound
        locally and the path for a reused answer (Policy.remember) is written out."""
        io = udp_io(sock, self.config.udp.batch)
        receive, send, address, query = io.receive, io.send, io.address, io.query
        begin, renew, keep, forward_type = core.begin, core.renew, core.keep, core.Forward
        ctx, cache = self.ctx, self.cache
        perf, clock, ratelimit = time.perf_counter, self.clock, self.ratelimit
        observer, querylog = self.observer, self.querylog
        count_many, write_many, account = observer.count_many, querylog.write_many, self._account
        signature, middle, client_field = observer.signature, querylog.middle, querylog.client
        acquire, release = self.lock.acquire, self.lock.release
        loop, handoff = self._loop, self._udp_handoff
        answers_max = self.config.cache.answers
        fields: dict[str, str] = {}     # client address -> its query-log field
        while True:
            try:
                batch = receive()
            except OSError:
                if self._halt:
                    return
                continue                # e.g. ICMP port unreachable reported on the socket
            if batch is None or self._halt:     # shutdown() woke the thread: the server is stopping
                return
            started = perf()
            now = clock()
            replies, reused, sigs, tails, others = [], [], [], [], []
            reply_to, reuse, count_as, log_as = replies.append, reused.append, sigs.append, tails.append
            hits, last, field, table = 0, None, "", None
            acquire()
            try:
                policy = self.policy    # read once: this batch uses this snapshot to the end
                tables = policy.answer_tables
                for question, client, ref in batch:
                    if ratelimit is not None and self._rate_limited(io, client, ref, now):
                        continue
                    if client is not last:      # udpio hands out one string per address
                        last, field, table = client, fields.get(client), tables.get(client)
                        if field is None:
                            if len(fields) >= 65536:
                                fields.clear()
                            field = fields[client] = client_field(client)
                    if table is not None:
                        ready = table.get(question)
                        if ready is not None:
                            body, until, sig, tail, cached, renewal = ready
                            if until <= now and renewal is not None and \
                                    (ready := renew(ready, cache, now)) is not None:
                                table[question] = ready     # a cache answer's TTLs a second on
                                body, until = ready[0], ready[1]
                            if until > now:
                                reuse((body, ref))      # sent behind the query's ID
                                count_as(sig)
                                log_as(field + tail)
                                hits += cached
                                continue
                    last = None                 # what follows may give this client a table
                    try:
                        step = begin(query(ref), client, policy, ctx, now)
                    except Exception:   # a bug must cost one answer, never the server
                        log.exception("query from %s failed", client)
                        observer.dropped("internal")
                        continue
                    if step.__class__ is forward_type:
                        if self._udp_pending >= MAX_INFLIGHT:
                            observer.dropped("overload")
                            continue
                        self._udp_pending += 1
                        loop.call_soon_threadsafe(handoff, sock, step, address(ref), policy, started, now)
                        continue
                    reply, outcome = step
                    if reply is None:           # dropped, or nothing safe to answer with
                        others.append(outcome)
                        continue
                    renewal = outcome.renewal
                    if len(reply) > outcome.udp_limit:
                        reply, renewal = truncate(reply, outcome.udp_limit), None
                    reply_to((reply, ref))
                    if outcome.reuse_until > now and answers_max:
                        # kept, then counted and logged from what was kept, as its reuses will be
                        sig, tail = signature(outcome), middle(outcome)
                        policy.remember(client, outcome.group, question,
                                        keep(reply, outcome, sig, tail, renewal), answers_max)
                        count_as(sig)
                        log_as(field + tail)
                    else:
                        others.append(outcome)
                send(replies, reused)
                duration = perf() - started
                count_many(sigs, duration)
                write_many(now, duration, tails)
                if hits:
                    cache.reused(hits)
                for outcome in others:
                    account(now, outcome, duration)
            finally:
                release()

    def _rate_limited(self, io, client: str, ref, now: float) -> bool:
        """UDP only (a TCP client's address cannot be spoofed): True when this query is over the
        client's limit; it then gets an empty TC answer now and then (slip), else nothing."""
        verdict = self.ratelimit.check(client, now)
        if verdict == PASS:
            return False
        self.observer.dropped("ratelimit")
        if verdict == SLIP and (reply := slip_answer(io.query(ref))) is not None:
            io.send([(reply, ref)])
        return True

    def _udp_handoff(self, sock, fwd, addr, policy, started, now) -> None:
        """On the event loop: a query from a UDP thread that needs the upstream."""
        self._spawn(self._udp_forward(sock, fwd, addr, policy, started, now), background=False)

    async def _udp_forward(self, sock, fwd, addr, policy, started, now) -> None:
        try:
            reply, outcome = await self._forward(fwd, policy)
            self._done(now, outcome, started)      # logged before the client can ask again
            send_one(sock, truncate(reply, outcome.udp_limit), addr)
        finally:
            with self.lock:
                self._udp_pending -= 1

    async def _forward(self, fwd, policy):
        try:
            reply = await self.upstreams.resolve(fwd.query.key)
        except Exception:
            log.exception("upstream query failed")
            reply = None
        with self.lock:
            return core.finish(fwd, reply, policy, self.ctx, self.clock())

    def _done(self, now: float, outcome, started: float) -> None:
        duration = time.perf_counter() - started
        with self.lock:
            self._account(now, outcome, duration)

    def _account(self, now: float, outcome, duration: float) -> None:
        """Count and log one Outcome (the caller holds self.lock); a dropped packet is counted as
        malformed and not logged."""
        self.observer.query(outcome, duration)
        if outcome.action != "dropped":
            self.querylog.log(now, outcome, duration)
        else:
            self.observer.dropped("malformed")

    # -- TCP -----------------------------------------------------------------------------------
    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tcp = self.config.tcp
        if self._tcp_count >= tcp.max_connections:
            self.observer.dropped("tcp-connections")
            writer.close()
            return
        self._tcp_count += 1
        peer = writer.get_extra_info("peername")[0]
        lock = asyncio.Lock()
        inflight: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        # RFC 7766 lets a server close connections (6.2.3 idle timeouts; 6.2.4 either end may close,
        # e.g. to defend itself, and clients retry what was not answered). A client holds this one for
        # at most max_lifetime seconds (without it, up to max_queries x idle_timeout): past it no new
        # query is read, the ones in flight are answered, then we close.
        deadline = loop.time() + tcp.max_lifetime
        why = ""                        # set when we hang up while the client may still be sending
        try:
            for _ in range(tcp.max_queries):
                left = deadline - loop.time()
                if left <= 0:
                    why = f"max_lifetime {tcp.max_lifetime:g} s"
                    break
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), min(tcp.idle_timeout, left))
                except asyncio.TimeoutError:
                    why = f"max_lifetime {tcp.max_lifetime:g} s" if loop.time() >= deadline else ""
                    break
                except (asyncio.IncompleteReadError, ConnectionError, OSError):
                    break
                try:                    # a query begun before the deadline is read to its end
                    size = struct.unpack("!H", head)[0]
                    data = await asyncio.wait_for(reader.readexactly(size), tcp.idle_timeout)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
                    break
                task = asyncio.ensure_future(self._tcp_query(data, peer, writer, lock))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                if len(inflight) >= TCP_PIPELINE:   # stop reading until answers go out: bounded
                    await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            else:
                why = f"max_queries {tcp.max_queries}"
            if why:
                log.debug("TCP connection from %s reached %s: closing after %d answer(s) in flight",
                          peer, why, len(inflight))
            if inflight:
                await asyncio.wait(inflight, timeout=self.config.upstream_timeout * (len(self.config.upstreams) + 1))
            if why and not inflight:    # (an answer still pending after that wait: plain close)
                await self._tcp_linger(reader, writer)
        finally:
            self._tcp_count -= 1
            writer.close()

    async def _tcp_linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Our answers are sent; send FIN and discard what the client still sends until it closes
        (at most idle_timeout). Closing with unread queries in the buffer would make the kernel
        answer with a reset, which can destroy answers the client has not read yet."""
        try:
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(self.config.tcp.idle_timeout):
                while await reader.read(65536):
                    pass
        except (TimeoutError, ConnectionError, OSError):
            pass

    async def _tcp_query(self, data: bytes, peer: str, writer, lock) -> None:
        started = time.perf_counter()
        now = self.clock()
        policy = self.policy
        try:
            with self.lock:
                step = core.begin(data, peer, policy, self.ctx, now)
            if isinstance(step, core.Forward):
                reply, outcome = await self._forward(step, policy)
            else:
                reply, outcome = step
        except Exception:
            log.exception("TCP query from %s failed", peer)
            return
        if reply is not None:
            async with lock:
                try:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await asyncio.wait_for(writer.drain(), self.config.tcp.idle_timeout)
                except (ConnectionError, OSError, asyncio.TimeoutError):
                    writer.transport.abort()    # a client that does not read loses the connection
        self._done(now, outcome, started)

    async def _querylog_ticker(self) -> None:
        """Lines are rendered CHUNK at a time by whoever logs; this renders what a quiet moment
        leaves behind, so the file is never more than about FLUSH_INTERVAL behind the answers."""
        while not self._stopping.is_set():
            await asyncio.sleep(FLUSH_INTERVAL)
            self.querylog.render()

    # -- reloads -------------------------------------------------------------------------------
    async def _reload_loop(self) -> None:
        interval = self.config.reload_interval
        if interval <= 0:
            return
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), interval)
                return
            except asyncio.TimeoutError:
                pass
            await self.reload(force=False)

    def _load(self, seen: str):
        """Load (in a worker thread) from where the path resolves now, so that a symlink flip
        mid-load cannot mix two revisions. If the files changed while loading (a `git pull` in
        progress), load again, at most three times; the fingerprint returned is the one taken
        before the last load, so a change that raced it is picked up by the next poll."""
        directory = self.config.blocklists
        for attempt in range(3):
            try:
                policy, warnings = load_with_warnings(os.path.realpath(directory), self.clock())
                error = None
            except PolicyError as e:
                error = e
            after = fingerprint(directory)
            if after == seen or attempt == 2:
                break
            seen = after
        if error is not None:
            raise error
        return policy, warnings, seen

    async def reload(self, force: bool = True) -> bool:
        """Load the blocklists off the event loop, validate, swap whole. False keeps the old policy."""
        async with self._reload_lock:
            seen = await asyncio.to_thread(fingerprint, self.config.blocklists)
            if not force and seen == self.fingerprint:
                if not self.reload_failing:      # confirmed: the policy in force is the one on disk
                    self.last_reload_ok = self.clock()
                    self.observer.reload(True, self.policy, self.last_reload_ok)
                return True
            try:
                policy, warnings, seen = await asyncio.to_thread(self._load, seen)
            except PolicyError as e:
                self.fingerprint = seen          # do not retry the same broken files every poll
                self.reload_failures += 1
                self.reload_failing = True
                for problem in e.problems:
                    log.error("reload rejected, keeping policy %s: %s", self.policy.revision, problem)
                self.observer.reload(False, self.policy, self.clock())
                return False
            except Exception:
                self.fingerprint = seen
                self.reload_failures += 1
                self.reload_failing = True
                log.exception("reload failed, keeping policy %s", self.policy.revision)
                self.observer.reload(False, self.policy, self.clock())
                return False
            for problem in warnings:
                log.warning("%s", problem)
            old = self.policy
            self.policy = policy                 # the swap: one reference
            # No gc.freeze() here (unlike start()): it would also freeze whatever cyclic garbage
            # the running server has at that moment, a leak per reload (the soak showed it).
            self.fingerprint = seen
            self.reload_failing = False
            self.last_reload_ok = self.clock()
            self.observer.reload(True, policy, self.last_reload_ok)
            if policy.revision != old.revision:
                log.info("policy %s loaded (was %s)", policy.revision, old.revision)
            return True


def _in_nets(client: str, nets) -> bool:
    try:
        addr = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(addr in n for n in nets)


def drop_privileges(user: str | None) -> None:
    if not user or os.getuid() != 0:
        return
    import pwd
    entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    log.info("dropped privileges to %s (uid %d)", entry.pw_name, entry.pw_uid)


async def serve(config: Config, policy: Policy, observer=None, reuse_port: bool = False) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the policy."""
    server = Server(config, policy, observer, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Handlers before the sockets: a SIGHUP or SIGTERM right after "serving DNS" must not kill us.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: server._spawn(server.reload(force=True)))
    try:
        await server.start()
    except OSError as e:
        log.error("not starting: %s", e)
        await server.stop(drain=0)
        return 1
    drop_privileges(config.user)
    await stop.wait()
    log.info("stopping: draining in-flight queries")
    await server.stop()
    return 0


def run_workers(count: int, start_worker) -> int:
    """`--workers N`: N processes share the listening ports with SO_REUSEPORT; the kernel spreads
    clients over them. Each worker asks upstreams from its own sockets, so replies come back to
    the process that asked. The parent forwards SIGHUP and SIGTERM and restarts a worker that dies
    (at most 10 restarts a minute, then it stops them all: something is wrong, say so)."""
    children: dict[int, int] = {}

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = start_worker(index)
            finally:
                os._exit(code)
        children[pid] = index

    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, forward)
    for index in range(count):
        spawn(index)
    restarts: list[float] = []
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is None or stopping:
            continue
        restarts = [t for t in restarts if time.monotonic() - t < 60] + [time.monotonic()]
        if len(restarts) > 10:
            log.error("workers keep dying; stopping all")
            stopping, status = True, 1
            forward(signal.SIGTERM, None)
            continue
        log.error("worker %d (pid %d) exited with status %d; restarting it", index, pid, code >> 8)
        spawn(index)
    return status
