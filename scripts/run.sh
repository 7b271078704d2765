#!/usr/bin/env bash
# The main job: stream an answer and run a tool call. With OPENAI_COMPATIBLE_BASE_URL
# set it talks to that endpoint; without, it builds (once, showing its progress),
# starts and stops a local llama.cpp server with a small real model.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
if [ -n "$(printf %s "${OPENAI_COMPATIBLE_BASE_URL:-}" | tr -d '[:space:]')" ]; then
    exec .venv/bin/python scripts/demo.py "$@"
fi
exec .venv/bin/python scripts/local_server.py run -- .venv/bin/python scripts/demo.py --local "$@"
