#!/usr/bin/env bash
# Installs mirrorpool and starts a device on its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/mirrorpool serve "$@"
