"""bench/profile.py's in-process stages against the resolver as it is now: the profile builds the
server's remembered-answer entries itself and drives the real Server._udp_loop, so a change to
either shape must fail here, not in the next benchmark run."""
import json
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.integration


def test_profile_stages_run_and_time_every_stage(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "profile.py"), "--names", "2000",
                          "--iterations", "50", "--no-server", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    (written,) = tmp_path.glob("profile-*.json")
    stages = json.loads(written.read_text())["stages"]["stages_ns"]
    names = list(stages)
    for wanted in ("parse_query", "core.begin, blocked", "core.begin, cached", "Server._udp_loop: one turn"):
        assert any(name.startswith(wanted) for name in names), wanted
    assert all(row["ns"] > 0 for row in stages.values())
    assert "Server._udp_loop" in run.stdout
