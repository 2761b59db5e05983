#!/usr/bin/env bash
# The README's test command: installs everything, starts real Postgres, Kafka and Redis on
# loopback (scripts/services.sh), then runs lint, types, the whole test suite and bench --quick.
# Extra arguments go to pytest (e.g. ./scripts/test.sh -k kafka).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev,bench]"

services_env="$(bash scripts/services.sh up)"  # an assignment: a failed `up` stops the run
eval "$services_env"
export OUTBOX_REQUIRE_SERVICES=1  # a missing service fails the run instead of skipping tests

echo "== ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy" >&2
.venv/bin/mypy
echo "== pytest" >&2
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "== bench --quick" >&2
.venv/bin/python -m bench --quick
