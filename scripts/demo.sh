#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the demo: two host agents on this machine,
# a real Linux guest, replication server settings and authorization, narrated command by command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tests.demo "$@"
