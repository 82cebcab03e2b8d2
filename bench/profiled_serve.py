"""`sinkhole serve` with cProfile on the UDP socket threads, where queries are answered (and the
upstream work they hand to the event loop shows as the handoff). The policy load is not in the
profile; neither are the query-log writer thread nor the event loop, which bench/profile.py times
in-process instead. Usage: profiled_serve.py OUT ARGS..."""
import sys
import threading
from pathlib import Path

# this directory holds bench/profile.py, which would shadow the standard library's `profile`
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import cProfile  # noqa: E402
import pstats  # noqa: E402

from resolver import server  # noqa: E402
from resolver.cli import main  # noqa: E402

OUT = sys.argv.pop(1)
_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()
_serve, _stop = server.Server._udp_serve, server.Server.stop


def udp_serve(self, sock):
    profile = cProfile.Profile()
    with _lock:
        _profiles.append(profile)
    profile.enable()
    try:
        return _serve(self, sock)
    finally:
        profile.disable()


async def stop(self, *args, **kwargs):
    result = await _stop(self, *args, **kwargs)        # joins the UDP threads: their profiles are done
    with _lock:
        if _profiles:
            stats = pstats.Stats(_profiles[0])
            for profile in _profiles[1:]:
                stats.add(profile)
            stats.dump_stats(OUT)
    return result


server.Server._udp_serve, server.Server.stop = udp_serve, stop
sys.exit(main())
