#!/usr/bin/env bash
# Installs mirrorpool and its runtime needs on Debian (run as root).
#   scripts/install.sh          the device only
#   scripts/install.sh --test   plus the peers and libraries the test suite uses
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc, libc6-dev and python3-dev build the C chunk copy that resyncs use
debs=(python3 python3-venv python3-pip gcc libc6-dev python3-dev)
extras=""
if [[ "${1:-}" == "--test" ]]; then
    debs+=(qemu-utils libnbd-bin python3-libnbd nbdkit fio qemu-system-common iproute2 openssl)
    extras="[test]"
fi

missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own interpreter, so python3-libnbd (a system package) imports in the venv.
if [[ ! -x .venv/bin/python ]]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
ln -sf "$PWD/.venv/bin/mirrorpool" /usr/local/bin/mirrorpool
