#!/bin/sh
# Install the Debian packages listed in tests/debian-packages.txt that are missing.
# Only as root; anyone else is told what the tests that need them will skip.
set -eu
list="$(dirname "$0")/debian-packages.txt"
missing=""
for pkg in $(grep -v '^#' "$list"); do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "not root: tests needing these Debian packages will skip:$missing" >&2
    exit 0
fi
echo "installing Debian packages:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# unbound and bind9 ship services: none may start on this machine's port 53 during the install
# (invoke-rc.d and deb-systemd-invoke ask policy-rc.d; a machine's own policy is left alone)
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
