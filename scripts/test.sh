#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: makes .venv, builds and caches the
# local llama.cpp server and model used by the integration tests (several minutes
# the first time, seconds after), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
.venv/bin/python scripts/local_server.py ensure
exec .venv/bin/python -m pytest "$@"
