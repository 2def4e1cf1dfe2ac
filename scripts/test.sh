#!/usr/bin/env bash
# Set up (venv + pinned installs) and run the test suite on CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline_env.sh
exec .venv/bin/python -m pytest -q "$@"
