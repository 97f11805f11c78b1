#!/usr/bin/env bash
# Installs everything the tests need (Debian packages included) and runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
# Debian's python3 first, so nbdsh (`python3 -m nbd`) finds python3-libnbd.
export PATH="$PWD/.venv/bin:/usr/bin:$PATH"
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest "$@"
