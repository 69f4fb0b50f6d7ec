#!/usr/bin/env bash
# The walkthrough: start a local Hypha server with the conda worker, run
# examples/client.py against it (numpy + pandas session, one cell, stop), shut down.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv server
exec .venv/bin/python scripts/demo.py "$@"
