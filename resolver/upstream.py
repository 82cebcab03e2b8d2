"""Asking the upstream servers: UDP first, TCP when truncated, the next upstream on failure.

Each query gets a fresh random ID and a fresh socket (so a fresh random source port); a reply is
accepted only from the address asked (the socket is connected), with the right ID and question.
Identical questions in flight share one upstream query.
"""
from __future__ import annotations

import asyncio
import secrets
import socket
import struct
import time
from dataclasses import dataclass

from .wire import NOERROR, NXDOMAIN, Reply, WireError, make_query, parse_reply, TC


@dataclass
class UpstreamStats:
    """Plain counters the metrics layer reads; no Prometheus here."""

    requests: int = 0
    failures: int = 0


def upstream_label(host: str, port: int) -> str:
    """How an upstream is named in logs and metrics: host:port, [v6]:port."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Upstreams:
    def __init__(self, servers, timeout: float = 1.5, observe=None):
        self.servers = tuple(servers)
        self.timeout = timeout
        self.observe = observe          # callable(upstream "host:port", seconds, ok: bool) or None
        self._inflight: dict[bytes, asyncio.Future] = {}

    async def resolve(self, key: bytes) -> Reply | None:
        """The reply for question `key` (lower-case question bytes), or None if every upstream failed."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            reply = await self._resolve(key)
            future.set_result(reply)
            return reply
        except BaseException as e:
            future.set_result(None)
            raise e
        finally:
            del self._inflight[key]

    async def _resolve(self, key: bytes) -> Reply | None:
        for host, port in self.servers:
            label = upstream_label(host, port)
            started = time.monotonic()
            try:
                reply = await self._ask_udp(host, port, key)
                if reply.flags & TC:
                    reply = await self._ask_tcp(host, port, key)
            except (OSError, asyncio.TimeoutError, WireError, EOFError, asyncio.IncompleteReadError):
                reply = None
            ok = reply is not None and reply.rcode in (NOERROR, NXDOMAIN)
            if self.observe is not None:
                self.observe(label, time.monotonic() - started, ok)
            if ok:
                return reply
        return None

    async def _ask_udp(self, host: str, port: int, key: bytes) -> Reply:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        qid = secrets.randbits(16)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((host, port))          # the kernel drops datagrams from anyone else
            await loop.sock_sendall(sock, make_query(qid, key))
            deadline = loop.time() + self.timeout
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                data = await asyncio.wait_for(loop.sock_recv(sock, 65535), remaining)
                try:
                    return parse_reply(data, key, qid)
                except WireError:
                    if len(data) >= 2 and struct.unpack_from("!H", data)[0] == qid:
                        raise          # our ID, but garbage: this upstream is broken
                    continue           # someone else's packet (a spoofing attempt): keep waiting
        finally:
            sock.close()

    async def _ask_tcp(self, host: str, port: int, key: bytes) -> Reply:
        qid = secrets.randbits(16)
        message = make_query(qid, key)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout)
        try:
            writer.write(struct.pack("!H", len(message)) + message)
            await writer.drain()
            size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), self.timeout))[0]
            data = await asyncio.wait_for(reader.readexactly(size), self.timeout)
            return parse_reply(data, key, qid)
        finally:
            writer.close()
