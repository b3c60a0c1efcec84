#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite: lint, types, then the
# unit and integration tests against real QEMU and real agents. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check src tests bench scripts
ruff format --check src tests bench scripts
echo "== mypy --strict"
mypy
echo "== lint-imports (layer contracts, pyproject.toml)"
lint-imports --no-cache
echo "== pytest"
# Two workers, each taking whole test files (module fixtures stay in one process); set
# VMREPLICA_TEST_WORKERS=0 to run in one process.
workers=${VMREPLICA_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  pytest -p no:cacheprovider "$@"
else
  pytest -p no:cacheprovider -n "$workers" --dist loadfile "$@"
fi
