"""Least privilege, for real: port 53 bound as root then `user: nobody` (uid 65534), and port 53
bound by an unprivileged user holding only CAP_NET_BIND_SERVICE (setpriv). Both still answer.

Each test listens on its own random 127.53.x.y address, so port 53 never clashes with anything.
"""
from __future__ import annotations

import os
import pwd
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import helpers
from helpers import Dnsmasq, Sinkhole, TEST_POLICY, TEST_SERVICES, ask, have, is_root, write_blocklists

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not is_root(), reason="needs root (binds port 53, changes user)"),
              pytest.mark.skipif(not have("dnsmasq"), reason="needs dnsmasq (Debian dnsmasq-base)"),
              pytest.mark.skipif(not have("setpriv"), reason="needs setpriv (Debian util-linux)")]

CAP_NET_BIND_SERVICE = 1 << 10


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def thread_uids(pid: int) -> set[str]:
    return {status_line for task in os.listdir(f"/proc/{pid}/task")
            for status_line in [Path(f"/proc/{pid}/task/{task}/status").read_text().split("Uid:")[1].split("\n")[0].strip()]}


@pytest.fixture
def world_readable():
    """A directory nobody can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="sinkhole-priv-"))
    path.chmod(0o755)
    lists = write_blocklists(path / "blocklists", TEST_POLICY, TEST_SERVICES)
    for p in [lists, *lists.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def address() -> str:
    return f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"


def test_root_binds_53_then_runs_as_nobody(world_readable):
    nobody = pwd.getpwnam("nobody")
    listen = address()
    with Dnsmasq(["--host-record=www.example.test,192.0.2.10"]) as upstream, \
         Sinkhole(world_readable, {"listen": [f"{listen}:53"], "upstreams": [upstream.address],
                                   "blocklists": str(world_readable / "blocklists"), "user": "nobody"}) as server:
        assert server.addresses == [(listen, 53)]
        server.wait_for_log(lambda: server.count("dropped privileges to nobody") == 1, 10, "the privilege drop")
        fields = status(server.proc.pid)
        assert fields["Uid"].split() == [str(nobody.pw_uid)] * 4          # real, effective, saved, fs
        assert fields["Gid"].split() == [str(nobody.pw_gid)] * 4
        assert fields["Groups"] == ""
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
        assert thread_uids(server.proc.pid) == {fields["Uid"]}              # every thread, not just main
        answer = ask((listen, 53), "www.example.test", source="127.0.2.5")
        assert [str(r) for rr in answer.answer for r in rr] == ["192.0.2.10"]
        blocked = ask((listen, 53), "www.chat.test", source="127.0.1.5")
        assert blocked.rcode() == 3


def test_unprivileged_user_with_only_cap_net_bind_service(world_readable, monkeypatch):
    nobody = pwd.getpwnam("nobody")
    listen = address()
    monkeypatch.setattr(helpers, "SINKHOLE", [
        "setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
        "--inh-caps=-all,+net_bind_service", "--ambient-caps=+net_bind_service",
        "--bounding-set=-all,+net_bind_service", *helpers.SINKHOLE])
    with Dnsmasq(["--host-record=www.example.test,192.0.2.10"]) as upstream, \
         Sinkhole(world_readable, {"listen": [f"{listen}:53"], "upstreams": [upstream.address],
                                   "blocklists": str(world_readable / "blocklists")}) as server:
        fields = status(server.proc.pid)
        assert fields["Uid"].split() == [str(nobody.pw_uid)] * 4
        assert int(fields["CapEff"], 16) == CAP_NET_BIND_SERVICE
        assert int(fields["CapBnd"], 16) == CAP_NET_BIND_SERVICE
        answer = ask((listen, 53), "www.example.test", source="127.0.2.5")
        assert [str(r) for rr in answer.answer for r in rr] == ["192.0.2.10"]


def test_unprivileged_user_without_the_capability_cannot_bind_53(world_readable):
    nobody = pwd.getpwnam("nobody")
    config = world_readable / "sinkhole.yaml"
    config.write_text(f"listen: ['{address()}:53']\nupstreams: ['127.0.0.1:9']\n"
                      f"blocklists: {world_readable / 'blocklists'}\n")
    config.chmod(0o644)
    result = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                             "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
                             *helpers.SINKHOLE, "serve", "-c", str(config)],
                            cwd=helpers.ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "cannot listen on" in result.stderr and "CAP_NET_BIND_SERVICE" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
