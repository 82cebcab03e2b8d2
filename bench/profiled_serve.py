"""`sinkhole serve` with cProfile switched on only while it serves (after start, until stop), so
the profile shows the query path and not the policy load. Usage: profiled_serve.py OUT ARGS...
The query-log writer thread is not in this profile (cProfile follows one thread); bench/profile.py
times its work in-process instead."""
import sys
from pathlib import Path

# this directory holds bench/profile.py, which would shadow the standard library's `profile`
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import cProfile  # noqa: E402

from resolver import server  # noqa: E402
from resolver.cli import main  # noqa: E402

OUT = sys.argv.pop(1)
_profile = cProfile.Profile()
_start, _stop = server.Server.start, server.Server.stop


async def start(self):
    addresses = await _start(self)
    _profile.enable()
    return addresses


async def stop(self, *args, **kwargs):
    _profile.disable()
    _profile.dump_stats(OUT)
    return await _stop(self, *args, **kwargs)


server.Server.start, server.Server.stop = start, stop
sys.exit(main())
