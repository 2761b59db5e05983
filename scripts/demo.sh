#!/usr/bin/env bash
# The README's first command: installs the package into .venv and runs the embedded demo
# (SQLite + JSON lines, no servers needed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q ".[all]"  # every extra: the demo, then the README's tour and its commands
exec .venv/bin/outbox-relay demo "$@"
