#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: makes .venv, installs the local
# llama.cpp server (the prebuilt xllamacpp wheel, into .venv) and caches the model
# used by the integration tests (seconds the first time; nothing to do after), then
# runs pytest. Extra arguments go to pytest. While another run holds the cache's lock,
# it waits for it, saying for whom, up to $OPENAI_COMPAT_DEV_LOCK_WAIT seconds
# (default 30 minutes).
# With OPENAI_COMPAT_MORE_SERVERS=1 (as in CI) it also builds llama-server from source,
# installs llama-cpp-python's server and the LiteLLM proxy (about 13 minutes more the
# first time, with progress lines), then vLLM and transformers serve (about 3 minutes
# more), and runs the tests against them too.
# OPENAI_COMPAT_LOCAL_SERVER=llama-server builds llama-server alone and makes it the
# local server.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
.venv/bin/python scripts/local_server.py ensure
exec .venv/bin/python -m pytest "$@"
