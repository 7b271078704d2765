"""Tests for openai_compat: a scripted loopback HTTP server for the wire, a real
llama.cpp server for the integration section. No mocks."""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import openai_compat as oc

KEY = "sk-test-secret-0123456789"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OPENAI_COMPATIBLE_"):
            monkeypatch.delenv(name)


# ==== The scripted loopback server ====


class Reply:
    """One scripted HTTP response.

    framing: "chunked" (each part its own HTTP chunk), "close" (no length, ends at
    close), "length" (Content-Length), "gzip" (gzip, flushed per part, ends at close).
    pause: seconds before each part after the first. stall: seconds to sleep after
    the parts, then the connection is cut without finishing the body. delay: seconds
    before the status line.
    """

    def __init__(self, *parts: bytes | str, status: int = 200, framing: str = "chunked",
                 content_type: str = "text/event-stream", headers: dict[str, str] | None = None,
                 pause: float = 0.0, stall: float | None = None, delay: float = 0.0) -> None:
        self.parts = [p.encode() if isinstance(p, str) else p for p in parts]
        self.status = status
        self.framing = framing
        self.content_type = content_type
        self.headers = headers or {}
        self.pause = pause
        self.stall = stall
        self.delay = delay


def json_reply(obj: Any, status: int = 200, **kwargs: Any) -> Reply:
    return Reply(json.dumps(obj), status=status, framing="length",
                 content_type="application/json", **kwargs)


class Scripted:
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
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

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
            if reply.framing == "length":
                self.send_header("Content-Length", str(sum(map(len, reply.parts))))
            elif reply.framing == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
                if reply.framing == "gzip":
                    self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            packer = zlib.compressobj(wbits=31) if reply.framing == "gzip" else None
            try:
                for i, part in enumerate(reply.parts):
                    if i and reply.pause:
                        time.sleep(reply.pause)
                    if packer is not None:
                        part = packer.compress(part) + packer.flush(zlib.Z_SYNC_FLUSH)
                    if reply.framing == "chunked":
                        part = b"%x\r\n%s\r\n" % (len(part), part)
                    self.wfile.write(part)
                    self.wfile.flush()
                if reply.stall is not None:
                    time.sleep(reply.stall)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if packer is not None:
                    self.wfile.write(packer.flush())
                if reply.framing == "chunked":
                    self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                self.close_connection = True

    return Handler


class _Loopback(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-reply are part of the tests, not news.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def server() -> Iterator[Scripted]:
    script = Scripted()
    httpd = _Loopback(("127.0.0.1", 0), _handler(script))
    httpd.daemon_threads = True
    script.httpd = httpd
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield script
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


def text_of(chunks: list[oc.Chunk]) -> str:
    return "".join(c.content for c in chunks)


# ==== Errors ====


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        (401, "Invalid API Key", oc.AuthenticationError),  # llama.cpp
        (401, "Invalid API key", oc.AuthenticationError),  # llama-cpp-python {"detail"}
        (403, "Forbidden", oc.AuthenticationError),
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


def test_errors_mix_in_builtins() -> None:
    assert issubclass(oc.ConfigError, ValueError)
    assert issubclass(oc.EndpointUnavailableError, ConnectionError)
    assert issubclass(oc.RequestTimeoutError, TimeoutError)
    assert issubclass(oc.StreamError, oc.APIError)
    assert oc.RateLimitError.retryable and not oc.BadRequestError.retryable


@pytest.mark.parametrize(
    ("status", "body", "content_type", "expected", "says"),
    [
        (400, {"error": {"message": "bad thing", "type": "invalid_request_error"}}, "json",
         oc.BadRequestError, "bad thing"),
        (422, {"error": "Input validation error", "error_type": "validation"}, "json",
         oc.BadRequestError, "Input validation error"),  # TGI
        (400, {"object": "error", "message": "Tool call id was call_1 but must be a-z, A-Z, "
               "0-9, with a length of 9.", "code": "3280"}, "json",
         oc.BadRequestError, "length of 9"),  # Mistral, vLLM < 0.10.1
        (401, {"detail": "Invalid API key"}, "json", oc.AuthenticationError,
         "Invalid API key"),  # llama-cpp-python
        (422, {"detail": [{"loc": ["body", "messages"], "msg": "field required",
                           "type": "value_error.missing"}]}, "json",
         oc.BadRequestError, "messages: field required"),  # FastAPI
        (400, [{"error": {"code": 400, "message": "Unknown name \"top_k\"",
                          "status": "INVALID_ARGUMENT"}}], "json",
         oc.BadRequestError, "Unknown name"),  # Gemini
        (500, {"error": {"message": "1 validation error:\n  {'type': 'list_type'}\n\n  File "
                         "\"/srv/site-packages/llama_cpp/server/app.py\", line 376",
                         "type": "internal_server_error"}}, "json",
         oc.BadRequestError, "1 validation error"),  # llama-cpp-python, a 500 not retried
        (502, ("<html><head><title>api.example.com | 502: Bad gateway</title></head>"
              "<body><h1>Bad gateway</h1></body></html>"), "text/html",
         oc.ServerError, "502: Bad gateway"),  # Cloudflare
        (500, "", "text/plain", oc.ServerError, "HTTP 500"),
    ],
)
def test_error_bodies_of_every_shape(server: Scripted, status: int, body: Any,
                                     content_type: str, expected: type, says: str) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    kind = "application/json" if content_type == "json" else content_type
    server.add(Reply(text, status=status, framing="length", content_type=kind))
    with pytest.raises(expected) as caught:
        server.client(max_retries=0).generate("hi")
    assert type(caught.value) is expected
    assert says in caught.value.message
    assert caught.value.status_code == status
    assert "site-packages" not in str(caught.value)
    assert "<html>" not in str(caught.value)


def test_error_404_without_v1_suggests_adding_it(server: Scripted) -> None:
    server.add(json_reply({"detail": "Not Found"}, status=404))
    client = oc.Client(server.base_url[: -len("/v1")], model="m", max_retries=0)
    with pytest.raises(oc.BadRequestError) as caught:
        client.generate("hi")
    assert f"{client.config.base_url}/v1" in str(caught.value)


def test_error_connection_refused_names_the_fix() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = oc.Client(f"http://127.0.0.1:{port}/v1", model="m", max_retries=0)
    with pytest.raises(oc.EndpointUnavailableError) as caught:
        client.generate("hi")
    message = str(caught.value)
    assert "OPENAI_COMPATIBLE_BASE_URL" in message and f"127.0.0.1:{port}" in message
    assert isinstance(caught.value, ConnectionError)


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
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oc.Client, "_warned_hosts", set())
    with caplog.at_level(logging.WARNING, logger="openai_compat"):
        oc.Client("http://gpu-box.example:8000/v1", api_key="sk-secret-1", model="m")
        oc.Client("http://gpu-box.example:8000/v1", api_key="sk-secret-1", model="m")
        oc.Client("http://127.0.0.1:8000/v1", api_key="sk-secret-1", model="m")
        oc.Client("http://localhost:8000/v1", api_key="sk-secret-1", model="m")
        oc.Client("https://api.example/v1", api_key="sk-secret-1", model="m")
        oc.Client("http://other.example/v1", model="m")  # no key, nothing to leak
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "gpu-box.example" in warnings[0]
    assert "https" in warnings[0] and "sk-secret-1" not in warnings[0]


# ==== Model discovery ====


@pytest.mark.parametrize(
    ("payload", "ids"),
    [
        ({"object": "list", "data": [{"id": "a", "object": "model"}, {"id": "b"}]}, ["a", "b"]),
        ({"models": [{"name": "smollm2", "model": "smollm2"}],
          "object": "list", "data": [{"id": "smollm2", "meta": None}]}, ["smollm2"]),  # llama.cpp
        ([{"id": "x"}, "y"], ["x", "y"]),
        ({"models": [{"name": "llama3:8b"}]}, ["llama3:8b"]),
        ({"data": [{"id": "tgi-model", "created": 0, "owned_by": "tgi-model"}]}, ["tgi-model"]),
    ],
)
def test_discovery_shapes(server: Scripted, payload: Any, ids: list[str]) -> None:
    server.add(json_reply(payload))
    client = oc.Client(server.base_url)
    assert client.available_models(fallback=False) == ids
    assert client.model == ids[0] == client.first_available_model()
    assert server.requests[0]["path"] == "/v1/models"


@pytest.mark.parametrize(
    "reply",
    [
        json_reply({"object": "list", "data": None}),  # Ollama with no models
        json_reply({"detail": "Not Found"}, status=404),
        json_reply({"error": "Unexpected endpoint or method. (GET /models)"}),  # LM Studio
        Reply("<html><title>502</title></html>", status=502, framing="length",
              content_type="text/html"),
        Reply("not json", framing="length", content_type="text/plain"),
        Reply("", framing="length", content_type="application/json"),
    ],
)
def test_discovery_failure_falls_back_and_logs_why(
    server: Scripted, reply: Reply, caplog: pytest.LogCaptureFixture
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


def test_discovery_is_bounded_when_the_server_never_answers(server: Scripted) -> None:
    server.add(Reply(status=200, framing="length", delay=9))
    client = oc.Client(server.base_url)
    started = time.monotonic()
    assert client.first_available_model() == oc.DEFAULT_MODEL
    assert time.monotonic() - started < 7
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


# ==== Streaming ====


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


QUIRKY_STREAMS = {
    "crlf": text_stream("a", "b").replace("\n", "\r\n"),
    "cr": text_stream("a", "b").replace("\n", "\r"),
    "no-space": text_stream("a", "b").replace("data: ", "data:"),
    "comments": ": OPENROUTER PROCESSING\n\n: keep-alive\n\n" + text_stream("a", "b"),
    "bom": "\ufeff" + text_stream("a", "b"),
    "ping-without-data": "event: ping\n\n" + text_stream("a", "b"),
    "done-spaced": text_stream("a", "b").replace("data: [DONE]", "data:  [DONE]  "),
    "no-done": text_stream("a", "b").replace("data: [DONE]\n\n", ""),
    "multi-line-data": 'data: {"choices": [{"delta":\ndata: {"content": "a"}}]}\n\n'
                       + sse(delta(content="b"), delta("stop"), "data: [DONE]\n\n"),
    "choices-empty-null-missing": sse({"choices": []}, {"choices": None}, {"id": "x"},
                                      delta(content="a"), {"choices": [{"index": 0}]},
                                      delta(content="b"), delta("stop")),
    "role-empty-every-chunk": sse(delta(role="", content="a"), delta(role="", content="b"),
                                  delta("stop", role="")),
    "content-null-and-list": sse(delta(content=None), delta(content=[{"type": "text",
                                                                       "text": "a"}]),
                                 delta(content="b"), delta("stop")),
    "finish-on-content-chunk": sse(delta(content="a"), delta("stop", content="b")),
    "azure-empty-first": sse({"choices": [], "id": "", "model": "",
                              "prompt_filter_results": []}, delta(content="a"),
                             delta(content="b"), delta("stop"), "data: [DONE]\n\n"),
    "application-json": json.dumps(completion("ab")),
}


@pytest.mark.parametrize("name", list(QUIRKY_STREAMS))
def test_stream_quirks(server: Scripted, name: str) -> None:
    kind = "application/json" if name == "application-json" else "text/event-stream"
    server.add(Reply(QUIRKY_STREAMS[name], content_type=kind))
    chunks, result = run(server.client().stream("hi"))
    assert text_of(chunks) == "ab" == result.text
    assert [c.type for c in chunks].count("finish") == 1
    assert chunks[-1].type == "finish" and chunks[-1].finish_reason == "stop"


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
    ("events", "expected", "says"),
    [
        (sse(delta(content="par"), {"error": {"message": "The server had an error while "
                                               "processing your request.",
                                               "type": "server_error"}}),
         oc.StreamError, "server had an error"),  # OpenAI
        (sse(delta(content="par"), {"error": {"code": "server_error",
                                              "message": "Provider disconnected unexpectedly"},
                                    "choices": [{"delta": {"content": ""},
                                                 "finish_reason": "error"}]}),
         oc.StreamError, "Provider disconnected"),  # OpenRouter
        (sse(delta(content="par"), {"error": {"message": "boom", "type": "InternalServerError",
                                              "code": 500}}, "data: [DONE]\n\n"),
         oc.StreamError, "boom"),  # vLLM, [DONE] after the error
        (sse(delta(content="par"), {"object": "error", "message": "old vllm failure"}),
         oc.StreamError, "old vllm failure"),  # vLLM < 0.10.1
        (sse(delta(content="par")).replace("data: ", "data:")
         + 'data:{"error":{"message":"Input validation error","http_status_code":422}}\n\n',
         oc.StreamError, "Input validation error"),  # TGI
        (sse(delta(content="par")) + 'event: error\ndata: {"error":{"message":"Failed to '
         'call a function.","code":"tool_use_failed","status_code":400}}\n\n',
         oc.StreamError, "Failed to call a function"),  # Groq
        (sse(delta(content="par")) + 'data: {"error": {"message": "litellm.APIConnectionError:'
         ' Connection error.", "type": null, "param": null, "code": "500"}}\n\n',
         oc.StreamError, "Connection error"),  # LiteLLM, no [DONE]
        (sse(delta(content="par")) + 'data: {"error": {"message": "Rate limit reached for '
         'gpt-4o", "type": "requests"}}\n\n', oc.RateLimitError, "Rate limit"),
        (sse(delta(content="par")) + 'error: {"code":400,"message":"the request exceeds the '
         'available context size, try increasing it","type":"exceed_context_size_error"}\n\n',
         oc.ContextLengthError, "available context size"),  # llama.cpp, legacy field line
    ],
)
def test_stream_in_stream_errors(server: Scripted, events: str, expected: type,
                                 says: str) -> None:
    server.add(Reply(events))
    got: list[str] = []
    with pytest.raises(expected) as caught:
        for chunk in server.client().stream("hi"):
            got.append(chunk.content)
    assert type(caught.value) is expected
    assert says in caught.value.message
    assert caught.value.partial_text == "par" == "".join(got)
    assert len(server.requests) == 1, "nothing is retried once a chunk was yielded"


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
    server.add(Reply(first, rest, framing=framing, pause=1.5))
    started = time.monotonic()
    stream = server.client().stream("hi")
    chunk = next(stream)
    elapsed = time.monotonic() - started
    assert chunk.content == "early"
    if framing != "length":  # a Content-Length body may be held by proxies; we still read it
        assert elapsed < 0.75, f"first event arrived after {elapsed:.2f} s on {framing}"
    assert text_of(list(stream)) == "late"


def test_stream_silence_past_timeout_is_request_timeout(server: Scripted) -> None:
    server.add(Reply(sse(delta(content="a")), stall=3))
    started = time.monotonic()
    with pytest.raises(oc.RequestTimeoutError) as caught:
        list(server.client(timeout=0.5, max_retries=0).stream("hi"))
    assert time.monotonic() - started < 2.5
    assert caught.value.partial_text == "a" and isinstance(caught.value, TimeoutError)


def test_generate_silence_past_timeout_says_whole_answers_take_longer(server: Scripted) -> None:
    # A non-streamed answer comes only when complete: a long one is silence, not a fault.
    server.add(json_reply(completion("late"), delay=3))
    started = time.monotonic()
    with pytest.raises(oc.RequestTimeoutError) as caught:
        server.client(timeout=0.5, max_retries=0).generate("hi")
    assert time.monotonic() - started < 2.5
    assert "whole answer" in str(caught.value) and "stream()" in str(caught.value)
    assert "OPENAI_COMPATIBLE_TIMEOUT" in str(caught.value)  # the hint: raise it


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
    with caplog.at_level(logging.WARNING, logger="openai_compat"):
        chunks, result = run(server.client().stream("hi"))
    assert result.text == "fallback answer" and chunks[-1].type == "finish"
    first, second = server.bodies()
    assert first["stream"] is True and "stream" not in second and "stream_options" not in second
    assert "without any event" in caplog.text


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


def test_stream_empty_200_then_error_is_classified(server: Scripted) -> None:
    server.add(Reply(""), json_reply({"error": {"message": "This model's maximum context "
                                                "length is 2048 tokens."}}, status=400))
    with pytest.raises(oc.ContextLengthError):
        list(server.client().stream("hi"))


@pytest.mark.parametrize("count", [0, 1, 1023, 1024, 1025, 3000])
def test_text_buffer_keeps_every_piece_in_order(count: int) -> None:
    buffer = oc._TextBuffer()
    pieces = [f"{i}," for i in range(count)]
    for piece in pieces[: count // 2]:
        buffer.write(piece)
    assert buffer.getvalue() == "".join(pieces[: count // 2])  # partial_text, mid-stream
    for piece in pieces[count // 2:]:
        buffer.write(piece)
    assert buffer.getvalue() == buffer.getvalue() == "".join(pieces)


# ==== SSE byte layer ====

SAMPLE = (b'data: {"a": 1}\n\n: comment\n\nevent: ping\n\ndata: x\ndata: y\n\n'
          b'error: {"e": 2}\n\ndata: caf\xc3\xa9\n\ndata:  [DONE]\n\n')
SAMPLE_EVENTS = [("message", '{"a": 1}'), ("message", "x\ny"), ("error", '{"e": 2}'),
                 ("message", "café"), ("message", " [DONE]")]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_iter_events_line_endings(ending: bytes) -> None:
    data = SAMPLE.replace(b"\n", ending)
    assert list(oc._iter_events([data])) == SAMPLE_EVENTS
    assert list(oc._iter_events([data[i:i + 1] for i in range(len(data))])) == SAMPLE_EVENTS


def test_iter_events_bom_split_across_reads() -> None:
    data = b"\xef\xbb\xbf" + SAMPLE
    assert list(oc._iter_events([data[:1], data[1:2], data[2:]])) == SAMPLE_EVENTS


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(SAMPLE) * 2), max_size=12),
       ending=st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_iter_events_any_split_gives_the_same_events(cuts: list[int], ending: bytes) -> None:
    data = SAMPLE.replace(b"\n", ending)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    assert list(oc._iter_events(pieces)) == SAMPLE_EVENTS


# ==== Non-streaming (generate) ====


def test_generate_body_and_result(server: Scripted) -> None:
    server.add(json_reply(completion("Hello", reasoning_content="hmm")))
    result = server.client().generate("hi", stream_options={"include_usage": True})
    body = server.bodies()[0]
    assert "stream" not in body and "stream_options" not in body
    assert result.text == "Hello" and result.reasoning == "hmm"
    assert result.usage == oc.Usage(3, 2, 5) and result.finish_reason == "stop"


def test_generate_tolerates_null_content_and_missing_fields(server: Scripted) -> None:
    server.add(json_reply({"choices": [{"message": {"content": None}}]}))
    result = server.client().generate("hi")
    assert result.text == "" and result.usage is None and result.finish_reason == "stop"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"error": "Unexpected endpoint or method. (POST /chat/completions)"},
         oc.BadRequestError),  # LM Studio, 200
        ({"error": {"message": "request exceeds the available context size"}},
         oc.ContextLengthError),
        ({"choices": None}, oc.APIError),  # vLLM via RunPod
    ],
)
def test_generate_200_with_an_error_body(server: Scripted, payload: Any,
                                         expected: type) -> None:
    server.add(json_reply(payload))
    with pytest.raises(expected):
        server.client().generate("hi")


def test_generate_continues_a_conversation(server: Scripted) -> None:
    server.add(json_reply(completion("Paris")), json_reply(completion("About 2 million.")))
    client = server.client()
    first = client.generate("Capital of France?")
    second = client.generate("And its population?", messages=first.messages)
    assert second.text == "About 2 million."
    roles = [m["role"] for m in server.bodies()[1]["messages"]]
    assert roles == ["user", "assistant", "user"]


def test_generate_needs_something_to_send(server: Scripted) -> None:
    with pytest.raises(oc.ConfigError):
        server.client().generate()
    assert server.requests == []


# ==== HTTP plumbing: retries, timeouts, connections ====


def test_retry_429_then_200(server: Scripted) -> None:
    server.add(json_reply({"error": {"message": "slow down"}}, status=429,
                          headers={"Retry-After": "0"}), json_reply(completion("ok")))
    assert server.client().generate("hi").text == "ok"
    assert len(server.requests) == 2


def test_retry_after_is_honoured(server: Scripted) -> None:
    server.add(json_reply({"error": {"message": "busy"}}, status=503,
                          headers={"Retry-After": "1"}), json_reply(completion("ok")))
    started = time.monotonic()
    assert server.client().generate("hi").text == "ok"
    assert time.monotonic() - started >= 0.9


def test_retry_after_too_long_fails_at_once(server: Scripted) -> None:
    server.add(json_reply({"error": {"message": "Rate limit reached"}}, status=429,
                          headers={"Retry-After": "120"}))
    started = time.monotonic()
    with pytest.raises(oc.RateLimitError) as caught:
        server.client().generate("hi")
    assert caught.value.retry_after == 120 and time.monotonic() - started < 1
    assert len(server.requests) == 1


def test_retry_5xx_spends_the_budget(server: Scripted) -> None:
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


def test_connection_refused_is_retried_then_classified() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(oc.EndpointUnavailableError):
        oc.Client(f"http://127.0.0.1:{port}/v1", model="m", max_retries=2).generate("hi")
    assert time.monotonic() - started > 0.3, "two retries with backoff"


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


@pytest.mark.parametrize("hang_up", ["eof", "reset"])
def test_stale_keep_alive_connection_is_resent_once(hang_up: str) -> None:
    # A server that answers one request per connection and then closes it without
    # saying so (no Connection: close): the next request on the pooled connection
    # fails before any response byte, with an EOF or (llama-cpp-python after an
    # empty stream, seen both ways) a reset, and must be sent again on a new one.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    body = json.dumps(completion("fresh")).encode()
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
              b"\r\n%s" % (len(body), body))

    def read_request(conn: socket.socket) -> None:
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

    def serve() -> None:
        for _ in range(3):
            try:
                conn, _ = listener.accept()
            except OSError:  # the test is over
                return
            with conn:
                read_request(conn)
                conn.sendall(answer)
                try:
                    read_request(conn)  # the next request, whole: drop it unanswered
                    if hang_up == "reset":  # close with RST instead of FIN
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    client = oc.Client(f"http://127.0.0.1:{port}/v1", model="m", max_retries=0)
    try:
        assert client.generate("one").text == "fresh"
        time.sleep(0.1)
        assert client.generate("two").text == "fresh"
    finally:
        listener.close()


# ==== Tools ====


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


def test_tool_description_and_decorator_forms() -> None:
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

    a, b = oc._as_tools([plain, other])
    assert (a.name, a.description) == ("plain", "Double it.")
    assert (b.name, b.description, b.parameters["required"]) == ("renamed", "Custom.", [])
    assert plain(4) == 8, "the decorated function stays callable"


@pytest.mark.parametrize(
    "bad",
    [lambda: None, "not a tool", 3],
)
def test_tool_bad_definitions_are_config_errors(bad: Any) -> None:
    with pytest.raises(oc.ConfigError):
        oc._as_tools([bad])


def test_tool_unsupported_annotation_names_tool_and_parameter() -> None:
    def takes_callback(callback: Callable[[], None]) -> None:
        pass

    with pytest.raises(oc.ConfigError, match="takes_callback.*callback"):
        oc._as_tools([takes_callback])


def test_tool_dict_forms_and_duplicates() -> None:
    def run(query: str) -> str:
        return query

    tools = oc._as_tools([{"search": {"description": "Find things.",
                                      "parameters": {"type": "object", "properties": {}},
                                      "execute": run}},
                          {"echo": oc.Tool("echo", "Echo.", {"type": "object"}, run)}])
    assert [t.name for t in tools] == ["search", "echo"]
    with pytest.raises(oc.ConfigError, match="two tools"):
        oc._as_tools([run, run])
    with pytest.raises(oc.ConfigError):
        oc._as_tools({"x": {"description": "no execute"}})


def test_run_tool_checks_arguments_and_converts_enums() -> None:
    seen: list[Any] = []

    def paint(colour: Colour, coats: int = 1) -> str:
        seen.append(colour)
        return colour.value

    (t,) = oc._as_tools([paint])
    assert oc._run_tool(t, {"colour": "red"}) == "red" and seen == [Colour.RED]
    with pytest.raises(TypeError, match="missing"):
        oc._run_tool(t, {})
    with pytest.raises(TypeError, match="unexpected"):
        oc._run_tool(t, {"colour": "red", "brush": "wide"})
    with pytest.raises(ValueError, match="must be one of"):
        oc._run_tool(t, {"colour": "green"})


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


TOOL_CALL_STREAMS: dict[str, tuple[list[Any], list[tuple[str, dict[str, Any]]]]] = {
    # OpenAI / vLLM / llama.cpp: id and name first, then argument fragments by index.
    "openai": ([[_call(0, "call_1", "add", '{"a"')], [_call(0, arguments=": 1, ")],
                [_call(0, arguments='"b": 2}')]], [("add", {"a": 1, "b": 2})]),
    # TGI >= 3.2: id "0", type and index repeated on every delta; name null after the first.
    "tgi-id-repeated": ([[_call(0, "0", "add", '{"a":', type="function")],
                         [_call(0, "0", None, " 1, ", type="function")],
                         [_call(0, "0", None, '"b": 2}', type="function")]],
                        [("add", {"a": 1, "b": 2})]),
    # llama-cpp-python / LiteLLM: id and full name in every chunk, legacy function_call too.
    "name-repeated": ([[_call(0, "c1", "add", '{"a": 1,')], [_call(0, "c1", "add", ' "b": 2}')],
                       [_call(0, "c1", "add", "")]], [("add", {"a": 1, "b": 2})]),
    # LM Studio: later deltas carry "name": "" which must not erase the name.
    "lmstudio-empty-name": ([[_call(0, "7", "add", "")], [_call(0, None, "", '{"a": 1, "b": 2}',
                                                              type="function")]],
                            [("add", {"a": 1, "b": 2})]),
    # Gemini: no index; two calls with distinct ids, each whole.
    "gemini-no-index": ([[_call(None, "g1", "add", '{"a": 1, "b": 2}'),
                          _call(None, "g2", "add", '{"a": 3, "b": 4}')]],
                        [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
    # A proxy that sends index 0 for every call, with distinct ids.
    "same-index-distinct-ids": ([[_call(0, "p1", "add", '{"a": 1, "b": 2}')],
                                 [_call(0, "p2", "add", '{"a": 5, "b": 6}')]],
                                [("add", {"a": 1, "b": 2}), ("add", {"a": 5, "b": 6})]),
    # Anthropic-compat / LiteLLM -> Bedrock: index starts at 1.
    "index-starts-at-1": ([[_call(1, "t1", "add", "")], [_call(1, arguments='{"a": 1, "b": 2}')]],
                          [("add", {"a": 1, "b": 2})]),
    # Mistral incremental: second delta has neither id nor index.
    "no-id-no-index-continues": ([[_call(None, "abcdefghi", "add", '{"a": 1')],
                                  [_call(None, None, "", ', "b": 2}')]],
                                 [("add", {"a": 1, "b": 2})]),
    # grok: the name arrives after the first delta.
    "name-late": ([[_call(0, "call_late", None, "")], [_call(0, None, "add", '{"a": 1, "b": 2}')]],
                  [("add", {"a": 1, "b": 2})]),
    # TGI < 3.2: tool_calls is one object; arguments as an object.
    "object-not-list": ([_call(0, "x", "add", {"a": 1, "b": 2})], [("add", {"a": 1, "b": 2})]),
    # function: null on a continuation, and empty trailing arguments (vLLM-based).
    "null-function-and-trailing-empty": ([[_call(0, "v1", "add", '{"a": 1, "b": 2}')],
                                          [{"index": 0, "function": None}],
                                          [_call(0, arguments="")]], [("add", {"a": 1, "b": 2})]),
    # Interleaved parallel calls by index.
    "interleaved": ([[_call(0, "i0", "add", '{"a": 1,'), _call(1, "i1", "add", '{"a": 3,')],
                     [_call(1, arguments=' "b": 4}'), _call(0, arguments=' "b": 2}')]],
                    [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
}


def _add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.mark.parametrize("name", list(TOOL_CALL_STREAMS))
def test_tool_call_assembly_survives_every_server(server: Scripted, name: str) -> None:
    deltas, expected = TOOL_CALL_STREAMS[name]
    events = [delta(tool_calls=d) for d in deltas]
    if name == "name-repeated":
        events = [delta(tool_calls=d, function_call=d[0]["function"]) for d in deltas]
    server.add(Reply(sse(*events, delta("tool_calls"), "data: [DONE]\n\n")),
               Reply(text_stream("done")))
    chunks, result = run(server.client().stream("hi", tools=[{"add": _add}]))
    calls = [c.tool_call for c in chunks if c.type == "tool_call"]
    assert [(c.name, c.arguments) for c in calls if c] == expected
    assert [r.value for r in result.tool_results] == [a["a"] + a["b"] for _, a in expected]
    ids = [c.id for c in calls if c]
    assert all(ids) and len(set(ids)) == len(ids)
    sent = server.bodies()[1]["messages"]
    assert [m["tool_call_id"] for m in sent if m["role"] == "tool"] == ids
    assert [c["id"] for c in sent[-len(ids) - 1]["tool_calls"]] == ids
    assert result.text == "done"


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


def _calls_then_text(*calls: dict[str, Any], finish: str = "tool_calls") -> Reply:
    return Reply(sse(delta(tool_calls=list(calls)), delta(finish), "data: [DONE]\n\n"))


@pytest.mark.parametrize("raw, parsed, error", [
    ('{"a": 1}', {"a": 1}, None),
    ("", {}, None),
    ('{"text": "two\nlines"}', {"text": "two\nlines"}, None),  # llama-cpp-python, raw newline
    ('{"a": 1}<|eot_id|>', {"a": 1}, None),  # TGI < 3.2, special token left in
    ('"{\\"a\\": 1}"', {"a": 1}, None),  # encoded twice
    ('{"a": 1', {}, "not valid JSON"),
    ("[1, 2]", {}, "must be a JSON object"),
])
def test_tool_arguments_are_parsed_leniently_but_never_guessed(
    raw: str, parsed: dict[str, Any], error: str | None
) -> None:
    value, problem = oc._parse_arguments(raw)
    assert value == parsed
    assert (problem is None) if error is None else (error in (problem or ""))


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


def test_tool_results_are_sent_as_text_or_json() -> None:
    call = oc.ToolCall("i", "t")
    tools = {n: oc.Tool(n, "", {"type": "object"}, f) for n, f in
             [("s", lambda: "plain"), ("d", lambda: {"k": [1]}), ("o", lambda: object)]}
    assert oc._execute(oc.ToolCall("i", "s"), tools).content == "plain"
    assert json.loads(oc._execute(oc.ToolCall("i", "d"), tools).content) == {"k": [1]}
    assert "object" in oc._execute(oc.ToolCall("i", "o"), tools).content
    assert call.arguments == {}


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


def test_tool_loop_stops_at_max_steps(server: Scripted) -> None:
    for i in range(2):
        server.add(_calls_then_text(_call(0, f"m{i}", "_add", '{"a": 1, "b": 1}')))
    chunks, result = run(server.client().stream("hi", tools=[_add], max_steps=2))
    assert result.finish_reason == "max_steps" and len(result.steps) == 2
    assert len(result.tool_results) == 1 and [c.type for c in chunks].count("tool_call") == 2
    assert "tool_calls" not in result.messages[-1], "unrun calls stay out of the history"


def test_generate_runs_the_same_loop(server: Scripted) -> None:
    call = {"id": "g1", "type": "function",
            "function": {"name": "_add", "arguments": {"a": 20, "b": 22}}}  # TGI < 3.2 object
    server.add(json_reply(completion(None, "tool_calls", tool_calls=[call])),
               json_reply(completion("42")))
    result = server.client().generate("hi", tools=[_add])
    assert result.text == "42" and result.tool_results[0].value == 42
    assert result.usage == oc.Usage(6, 4, 10)
    assert all("stream" not in b for b in server.bodies())


def test_tool_choice_is_never_sent_without_tools(server: Scripted) -> None:
    server.add(Reply(text_stream("x")))
    run(server.client().stream("hi", tool_choice="required"))
    assert "tool_choice" not in server.bodies()[0]


@pytest.mark.parametrize(
    "message",
    ["registry.ollama.ai/library/gemma:2b does not support tools",  # Ollama
     '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'],
)
def test_server_without_tools_gets_the_request_without_them(
    server: Scripted, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    server.add(json_reply({"error": {"message": message}}, status=400),
               Reply(text_stream("plain")), Reply(text_stream("again")))
    client = server.client()
    with caplog.at_level(logging.WARNING, logger="openai_compat"):
        _, result = run(client.stream("hi", tools=[_add]))
    assert result.text == "plain" and "tools" in caplog.text
    run(client.stream("hi", tools=[_add]))
    first, second, third = server.bodies()
    assert "tools" in first and "tools" not in second and "tool_choice" not in second
    assert "tools" not in third, "the Client remembers"

# ==== Real servers ====
# These talk to real server code running SmolLM2-135M-Instruct on 127.0.0.1
# (scripts/local_server.py builds and caches everything):
# - llama.cpp's llama-server, always;
# - llama-cpp-python's server and the LiteLLM proxy (in front of llama-server), when
#   OPENAI_COMPAT_MORE_SERVERS=1 (CI sets it; their first install adds minutes).
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
    """A started llama-server, or a skip (a failure in CI) saying how to get one."""
    local_server = _local_server_module()
    try:
        local_server.ensure(build=False)
    except OSError as exc:
        _missing(f"no local llama-server ({exc}); `bash scripts/test.sh` or "
                 "`python scripts/local_server.py ensure` builds it")
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
    server = _start_local_server()
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


REAL_SERVERS = ["llama-server", "llama-cpp-python", "litellm"]
_FIXTURES = {"llama-server": "llama", "llama-cpp-python": "llama_cpp_python",
             "litellm": "litellm"}


@pytest.fixture(params=REAL_SERVERS)
def real(request: pytest.FixtureRequest) -> Any:
    """Each real server in turn; `.name` says which."""
    return request.getfixturevalue(_FIXTURES[request.param])


def _client(server: Any, **kwargs: Any) -> oc.Client:
    kwargs.setdefault("timeout", 120)  # llama-cpp-python's tool grammar is slow
    return oc.Client(server.base_url, api_key=server.api_key, **kwargs)


@pytest.fixture(scope="session")
def few_shot() -> list[dict[str, Any]]:
    return list(_local_server_module().CALCULATOR_FEW_SHOT)


def _calculator(log: list[str]) -> Callable[..., Any]:
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
                               "cache_prompt": False}
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
        options.update(messages=few_shot, cache_prompt=False)
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
        assert not client._tools_unstreamed, "a forced tool call must really be streamed"


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
    name = {"llama-server": "llama_with_key", "llama-cpp-python": "llama_cpp_python_with_key",
            "litellm": "litellm"}[kind]
    server = request.getfixturevalue(name)
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


def test_real_llama_killed_mid_stream_is_a_classified_error_with_the_partial_text() -> None:
    server = _start_local_server()
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
    "json-answer": "response_format=",
    "tool-call": "def calculate(",
    "two-tool-steps": "def search_places(",
    "errors": "except oc.ConfigError",
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


@pytest.mark.parametrize(("name", "code", "shown"),
                         [pytest.param(*example, id=example[0]) for example in _readme_examples()])
def test_real_readme_examples_run_as_written(llama_short: Any, name: str, code: str,
                                             shown: str) -> None:
    assert name in _README_EXAMPLES, "a README example the suite does not check: add its check"
    lines = _run_example(code, llama_short.base_url)
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
        assert text.startswith("1") and "5" not in text and finish == "stop"  # cut at stop=
    elif name == "conversation":
        assert "Paris" in lines[0] and "Rome" in lines[1], lines  # "And of Italy?" understood
        assert lines[2] == "['system', 'user', 'assistant', 'user', 'assistant']"
    elif name == "json-answer":
        # Parsed as JSON, with the schema's fields (the case of a word is the model's).
        assert [word.lower() for word in lines[0].split()] == ["lyon", "france"], lines
    elif name == "tool-call":
        # One call and its result, as the README shows them, then the model's answer.
        calls = [line for line in lines if line.startswith(("-> ", "<- "))]
        assert calls == [line for line in shown.splitlines() if line.startswith(("-> ", "<- "))]
        assert calls == ["-> calculate({'expression': '85.50 * 15 / 100'})", "<- 12.825"]
        assert lines[-1] and not lines[-1].startswith("<- "), lines
    elif name == "two-tool-steps":
        # Two tool steps, as the README shows them: a search, then directions to an
        # address the search returned; then the answer after three model calls.
        steps = [line for line in lines if line.startswith(("search_places ", "get_directions "))]
        assert steps == [line for line in shown.splitlines()
                         if line.startswith(("search_places ", "get_directions "))]
        assert [step.split()[0] for step in steps] == ["search_places", "get_directions"], lines
        destination = re.search(r"'destination': '([^']+)'", steps[1])
        assert destination and f'"address": "{destination.group(1)}"' in steps[0]
        assert lines[-1] == "stop 3 model calls" == shown.splitlines()[-1], lines
        assert lines[-2] and lines[-2] not in steps  # the answer
    elif name == "errors":
        assert lines and not any(line.startswith(("configuration:", "EndpointUnavailable"))
                                 for line in lines), lines
        # Each failure: one line, no traceback (_run_example checks the exit and stderr).
        assert [line.split(":")[0] for line in _run_example(code, None)] == ["configuration"]
        closed = f"http://127.0.0.1:{_local_server_module().free_port()}/v1"
        failed = _run_example(code, closed)
        assert len(failed) == 1 and failed[0].startswith("EndpointUnavailableError: "), failed


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
    assert "without any event" in caplog.text and client._tools_unstreamed
    # The next request goes out on a new connection and, without tools, streams.
    text = [c.content for c in client.stream("Say hi.", max_tokens=10) if c.type == "text"]
    assert len(text) > 1


def test_real_llama_cpp_python_request_validation_500_is_a_short_bad_request(
    llama_cpp_python: Any
) -> None:
    client = _client(llama_cpp_python, max_retries=2)
    with pytest.raises(oc.BadRequestError) as caught:
        client.generate("hi", max_tokens=5, temperature="hot")
    error = caught.value
    assert error.status_code == 500 and "temperature" in error.message
    assert "File \"" not in str(error) and "site-packages" not in str(error)
    assert "validation error" in str(error) and len(str(error)) < 800


def test_real_litellm_unknown_model_with_a_string_code(litellm: Any) -> None:
    client = _client(litellm, max_retries=0)
    with pytest.raises(oc.ModelNotFoundError) as caught:
        client.generate("hi", model="nosuch", max_tokens=5)
    assert caught.value.status_code == 400 and "nosuch" in caught.value.message


def test_real_litellm_backend_killed_mid_stream_is_a_classified_error_with_the_partial_text(
    litellm: Any
) -> None:
    # LiteLLM sends data: {"error": {..., "code": "500"}} and ends the body without [DONE].
    backend = _local_server_module().LocalServer(port=litellm.doomed_port).start()
    client = _client(litellm, model="smollm2-doomed", timeout=30, max_retries=0)
    error, received = _kill_mid_stream(client, backend, within=60)
    assert isinstance(error, oc.StreamError) and "Connection error" in error.message
    assert error.partial_text == received and received


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


def test_cli_streams_the_answer(server: Scripted) -> None:
    server.add(Reply(text_stream("Hel", "lo")))
    done = cli(server, "-s", "be brief", "--temperature", "0.5", "--max-tokens", "7", "Say", "hi")
    assert (done.returncode, done.stdout, done.stderr) == (0, "Hello\n", "")
    body = server.bodies()[0]
    assert body["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "Say hi"}]
    assert body["temperature"] == 0.5 and body["max_tokens"] == 7


def test_cli_appends_stdin_to_the_prompt(server: Scripted) -> None:
    server.add(Reply(text_stream("ok")))
    done = cli(server, "Summarize:", stdin="notes line\n")
    assert done.returncode == 0
    assert server.bodies()[0]["messages"][-1]["content"] == "Summarize:\n\nnotes line\n"


def test_cli_json_prints_one_object_per_chunk(server: Scripted) -> None:
    server.add(Reply(text_stream("a", "b", usage={"prompt_tokens": 1, "completion_tokens": 2})))
    done = cli(server, "--json", "hi")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(x["type"], x.get("content")) for x in lines] == [("text", "a"), ("text", "b"),
                                                              ("finish", None)]
    assert lines[-1]["usage"]["total_tokens"] == 3 and lines[-1]["finish_reason"] == "stop"


def test_cli_models(server: Scripted) -> None:
    server.add(json_reply({"data": [{"id": "a"}, {"id": "b"}]}))
    done = cli(server, "models")
    assert (done.returncode, done.stdout) == (0, "a\nb\n")
    server.add(json_reply({"detail": "Not Found"}, status=404))
    failed = cli(server, "models")
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and "could not list models" in failed.stderr


def test_cli_errors_are_one_line_with_exit_codes(server: Scripted) -> None:
    server.add(json_reply({"error": {"message": f"Invalid API key {KEY}"}}, status=401))
    api = cli(server, "hi", env={"OPENAI_COMPATIBLE_API_KEY": KEY})
    assert api.returncode == 1 and api.stderr.count("\n") == 1
    assert "AuthenticationError" in api.stderr and KEY not in api.stderr + api.stdout
    config = cli(None, "hi")
    assert config.returncode == 2 and "OPENAI_COMPATIBLE_BASE_URL" in config.stderr
    assert "Traceback" not in config.stderr and config.stderr.count("\n") == 1
    usage = cli(server, "--temperature", "warm", "hi")
    assert usage.returncode == 2


def test_cli_ctrl_c_exits_130_without_traceback(server: Scripted) -> None:
    server.add(Reply(*[sse(delta(content=f"{i} ")) for i in range(100)], pause=0.1))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_COMPATIBLE_")}
    environ.update(OPENAI_COMPATIBLE_BASE_URL=server.base_url, OPENAI_COMPATIBLE_MODEL="m")
    process = subprocess.Popen([sys.executable, "-m", "openai_compat", "count"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environ, stdin=subprocess.DEVNULL,
                               cwd=os.path.dirname(os.path.abspath(__file__)))
    assert process.stdout is not None
    assert process.stdout.read(2) == "0 "  # streaming has begun
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=10)
    assert process.returncode == 130 and "Traceback" not in err
    assert server.closed.wait(3), "the connection is closed on Ctrl-C"


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
    assert marks["tool calls"][0] in ("ok", "--"), done.stdout
    if real.name == "llama-cpp-python" and marks["tool calls"][0] == "ok":
        assert "not streamed" in marks["tool calls"][1]
    assert real.api_key is None or real.api_key not in done.stdout + done.stderr
