"""`sinkhole serve --workers N`: several processes on one port (SO_REUSEPORT), all answering by
the same policy, a dead worker restarted, SIGTERM stopping them all."""
import os
import signal
import subprocess
import threading

import pytest
import yaml

from helpers import ROOT, SINKHOLE, Dnsmasq, ask, free_port, have

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not have("dnsmasq"), reason="needs dnsmasq (Debian dnsmasq-base)")]


def children_of(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def test_workers_share_the_port_and_are_restarted(tmp_path, blocklists):
    with Dnsmasq(["--host-record=www.example.test,192.0.2.10"]) as upstream:
        for attempt in range(5):
            port = free_port()
            config = tmp_path / "sinkhole.yaml"
            config.write_text(yaml.safe_dump({"listen": [f"127.0.0.1:{port}"], "upstreams": [upstream.address],
                                              "blocklists": str(blocklists), "reload_interval": 0}))
            proc = subprocess.Popen(SINKHOLE + ["serve", "-c", str(config), "--workers", "2"], cwd=ROOT,
                                    stderr=subprocess.PIPE, text=True)
            lines, changed = [], threading.Condition()

            def read():
                for line in proc.stderr:
                    with changed:
                        lines.append(line)
                        changed.notify_all()
                with changed:
                    changed.notify_all()

            def serving(n):
                with changed:
                    return changed.wait_for(lambda: sum("serving DNS on" in l for l in lines) >= n
                                            or proc.poll() is not None, 20)
            threading.Thread(target=read, daemon=True).start()
            serving(2)
            if sum("serving DNS on" in l for l in lines) >= 2:
                break
            proc.kill()
            proc.wait()
        else:
            pytest.fail("workers did not start: " + "".join(lines))
        try:
            workers = children_of(proc.pid)
            assert len(workers) == 2
            server = ("127.0.0.1", port)
            for i in range(40):     # many source ports: the kernel spreads them over both workers
                assert ask(server, "www.chat.test", source="127.0.1.5").rcode() == 3
                assert ask(server, "www.example.test", source="127.0.2.5").rcode() == 0
            victim = sorted(workers)[0]
            os.kill(victim, signal.SIGKILL)
            serving(3)              # the replacement worker is listening
            assert len(children_of(proc.pid)) == 2 and victim not in children_of(proc.pid)
            assert any("restarting it" in l for l in lines)
            assert ask(server, "www.chat.test", source="127.0.1.5").rcode() == 3
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
