"""End to end: a link-local IPv6 client (fe80::/10, which needs a scope: the interface) in a network
namespace of its own. Every UDP IO (recvfrom/sendto, recvmmsg/sendmmsg, and the adaptive one
switching between them) gives the client's address without its %scope, which is how policy and
the query log know it, and still sends the answer back over the right interface."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import ROOT, have, is_root  # noqa: E402

pytestmark = pytest.mark.e2e
if not is_root():
    pytest.skip("needs root for a network namespace", allow_module_level=True)
if not have("ip"):
    pytest.skip("needs ip (Debian iproute2)", allow_module_level=True)

ADDRESS = "fe80::1"
PROBE = r'''
import json, socket, sys
sys.path.insert(0, sys.argv[1])
from resolver.udpio import AdaptiveIO, BatchIO, PlainIO, _MMSG
scope = socket.if_nametoindex("lo")
out = {}
for kind in (PlainIO, BatchIO, AdaptiveIO):
    if kind is not PlainIO and _MMSG is None:
        continue
    server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    server.bind((sys.argv[2], 0, 0, scope))
    server.settimeout(5)
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    client.bind((sys.argv[2], 0, 0, scope))
    client.settimeout(5)
    io = kind(server) if kind is PlainIO else kind(server, 8)
    client.sendto(b"\x12\x34 query", server.getsockname())
    batch = io.receive()
    address = io.address(batch[0][2])
    io.send([], [(b" answer", batch[0][2])])
    data, sender = client.recvfrom(64)
    out[kind.__name__] = {"clients": [c for _, c, _ in batch], "questions": [q.decode() for q, _, _ in batch],
                          "address": [address[0], address[3]], "client_port": client.getsockname()[1],
                          "port": address[1], "answer": data.decode("latin-1"), "scope": scope}
print(json.dumps(out))
'''


def run(*cmd, timeout=30):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_a_link_local_client_is_known_without_its_scope_and_answered():
    ns = f"ll-{os.getpid()}-{secrets.token_hex(3)}"
    run("ip", "netns", "add", ns)
    try:
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "-6", "addr", "add", f"{ADDRESS}/64", "dev", "lo", "nodad")
        got = json.loads(run("ip", "netns", "exec", ns, sys.executable, "-c", PROBE, str(ROOT), ADDRESS, timeout=60))
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    kinds = {"PlainIO", "BatchIO", "AdaptiveIO"} if len(got) > 1 else {"PlainIO"}
    assert set(got) == kinds
    for kind, r in got.items():
        assert r["clients"] == [ADDRESS], kind                  # no %lo: what policy and the log see
        assert r["questions"] == [" query"], kind
        assert r["address"] == [ADDRESS, r["scope"]] and r["port"] == r["client_port"], kind
        assert r["answer"] == "\x12\x34 answer", kind           # back over lo, behind the query's ID
