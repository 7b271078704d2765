#!/usr/bin/env bash
# The main job: stream an answer and run a tool call. With OPENAI_COMPATIBLE_BASE_URL
# set it talks to that endpoint; without, it starts and stops a local llama.cpp server
# with a small real model: the prebuilt xllamacpp wheel's (installed into .venv the
# first time, seconds), or with OPENAI_COMPAT_LOCAL_SERVER=llama-server the llama-server
# binary compiled from source (once, minutes, showing its progress).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
if [ -n "$(printf %s "${OPENAI_COMPATIBLE_BASE_URL:-}" | tr -d '[:space:]')" ]; then
    exec .venv/bin/python scripts/demo.py "$@"
fi
exec .venv/bin/python scripts/local_server.py run -- .venv/bin/python scripts/demo.py --local "$@"
