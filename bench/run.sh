#!/bin/sh
# `make bench`: install what the benchmark needs (Debian packages, as root, only when missing),
# then run bench/bench.py with the arguments given. Not part of `make test`.
#   sh bench/run.sh                      full run (3 rounds x 10 s, 1,000,000-name scale test)
#   sh bench/run.sh -l 3 --rounds 1 --no-scale     quick check
#   sh bench/run.sh --profile            also the per-stage profile (bench/profile.py)
#   sh bench/run.sh --sidecar            also the sidecar benchmark (bench/sidecar_bench.py)
#   sh bench/run.sh --soak / --fuzz      also bench/soak.py / bench/fuzz.py when present
set -eu
cd "$(dirname "$0")/.."
# the project's virtualenv (made by `make`), or $PY, or python3
if [ -z "${PY:-}" ]; then
  PY=python3
  [ -x .venv/bin/python ] && PY=.venv/bin/python
fi
"$PY" -c "import resolver.loader" 2>/dev/null || {
  echo "bench: $PY cannot import the resolver (run \`make bench\`, which installs .venv, or set PY=)" >&2; exit 2; }

PACKAGES="dnsperf dnsmasq-base unbound tshark tcpreplay util-linux"
missing=""
for pkg in $PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "bench: installing$missing" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "bench: missing Debian packages:$missing (run as root to install them, or apt-get install them)" >&2
  fi
fi

extra=""; profile=0; sidecar=0; soak=0; fuzz=0
for arg in "$@"; do
  case "$arg" in
    --profile) profile=1 ;;
    --sidecar) sidecar=1 ;;
    --soak) soak=1 ;;
    --fuzz) fuzz=1 ;;
    *) extra="$extra '$(printf %s "$arg" | sed "s/'/'\\\\''/g")'" ;;
  esac
done
eval "set -- $extra"

status=0
"$PY" bench/bench.py "$@" || status=$?
[ "$profile" -eq 1 ] && { "$PY" bench/profile.py || status=$?; }
[ "$sidecar" -eq 1 ] && { "$PY" bench/sidecar_bench.py || status=$?; }
for part in soak fuzz; do
  eval want=\$$part
  if [ "$want" -eq 1 ]; then
    if [ -f "bench/$part.py" ]; then "$PY" "bench/$part.py" || status=$?
    else echo "bench: bench/$part.py is not in this build; skipped" >&2; fi
  fi
done
exit $status
