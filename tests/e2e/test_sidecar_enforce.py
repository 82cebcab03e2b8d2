"""`sinkhole sidecar --enforce` against a real nftables: an alert puts (client . destination) into
the exported ruleset's bypass set with a timeout; mobile traffic and no-dns (a heuristic) do not."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from helpers import ROOT, have, is_root

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit"))
from sidecar_frames import DESKTOP, MOBILE, WEB_IP, engine, syn  # noqa: E402
from test_sidecar_detectors import feed, tls_flow  # noqa: E402

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not is_root(), reason="needs root for a network namespace and nftables"),
              pytest.mark.skipif(not have("nft"), reason="needs nft (Debian nftables)")]


def run(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30, cwd=ROOT)


@pytest.fixture
def gateway():
    ns = f"skenf{os.getpid() % 10000}{uuid.uuid4().hex[:6]}"
    run("ip", "netns", "add", ns)
    try:
        yield ns
    finally:
        run("ip", "netns", "del", ns, check=False)


def elements(ns: str) -> str:
    return run("ip", "netns", "exec", ns, "nft", "list", "set", "inet", "sinkhole", "bypass_v4").stdout


def test_alerts_are_enforced_in_the_bypass_set(tmp_path, gateway):
    """Also loads an exemption expiring in 2099 into the kernel: its timeout is capped (nft refuses
    timeouts of decades) and the --apply loop re-applies before the cap runs out."""
    from exporters.enforce import Enforcer
    eng = engine(tmp_path, started=1000.0)
    ruleset = run(sys.executable, "-m", "resolver", "export", "nftables",
                  "--blocklists", str(tmp_path / "blocklists"), "--sanctioned", "10.0.0.53").stdout
    (tmp_path / "ruleset.nft").write_text(ruleset)
    run("ip", "netns", "exec", gateway, "nft", "-f", str(tmp_path / "ruleset.nft"))
    eng.enforce = Enforcer(timeout=120, nft=("ip", "netns", "exec", gateway, "nft"))
    assert f"{DESKTOP} . {WEB_IP}" not in elements(gateway)

    rows = feed(eng, tls_flow(DESKTOP, WEB_IP, "doh.test")            # DoH by SNI: enforced
                + tls_flow(MOBILE, WEB_IP, "doh.test", sport=41001)     # mobile: counted only
                + [syn(DESKTOP, "192.0.2.99", 443, sport=41002)])       # no-dns: reported only
    detectors = sorted(r["detector"] for r in rows)
    assert "doh-sni" in detectors and "no-dns" in detectors
    listed = elements(gateway)
    assert f"{DESKTOP} . {WEB_IP}" in listed and "expires" in listed
    assert MOBILE not in listed
    assert "192.0.2.99" not in listed
    assert eng.enforce.added >= 1 and eng.enforce.failures == 0


def test_a_failing_nft_costs_the_enforcement_not_the_sidecar(tmp_path):
    from exporters.enforce import Enforcer
    eng = engine(tmp_path, started=1000.0)
    eng.enforce = Enforcer(timeout=60, nft=(sys.executable, "-c", "import sys; sys.exit(1)"))
    rows = feed(eng, tls_flow(DESKTOP, WEB_IP, "doh.test"))
    assert "doh-sni" in [r["detector"] for r in rows]
    assert eng.enforce.failures >= 1 and eng.enforce.added == 0
