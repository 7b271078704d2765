# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The openai-compat developers
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.
"""Stream chat completions and run tool calls against any OpenAI-compatible server.

One file, two dependencies (requests, sseclient-py); copy it into a project or
install it with pip from a clone::

    import openai_compat as oc

    for chunk in oc.stream("Explain distributed computing"):
        print(chunk.content, end="", flush=True)

    def add(a: int, b: int) -> int:
        "Add two integers."
        return a + b

    result = oc.generate("What is 2 + 40?", tools=[add])
    print(result.text)

Configuration comes from the environment when a Client is made (explicit
arguments win; blank values count as unset):

    OPENAI_COMPATIBLE_BASE_URL      server URL, e.g. http://localhost:11434/v1 (required)
    OPENAI_COMPATIBLE_API_KEY       sent as "Authorization: Bearer ..." when set
    OPENAI_COMPATIBLE_MODEL         model id; when unset, the first one GET /models lists
    OPENAI_COMPATIBLE_TIMEOUT       seconds of silence allowed between bytes (default 30)
    OPENAI_COMPATIBLE_MAX_RETRIES   extra attempts for failed connections, 408/409/429/5xx (default 2)

Works with vLLM, Ollama, llama.cpp's llama-server, LM Studio, TGI, Groq, Together,
Fireworks, OpenRouter, DeepSeek, Mistral, Gemini's OpenAI endpoint, Azure, LiteLLM
and OpenAI, including their deviations from OpenAI's wire format.

The file, top to bottom (each section starts with a "# ==== Name ====" line):

    Constants
    Error classification   the exceptions, the ordered regex table, classify_error()
    Data types             Usage, ToolCall, ToolResult, Chunk, Step, Result, Stream
    Configuration          Config.from_env(): arguments, then OPENAI_COMPATIBLE_*, then defaults
    Client                 Client, and the module-level stream(), generate(), ...
    Model discovery        GET /models within 5 s, whatever shape the answer has
    Tool-call loop         model call, tools run, results sent back, until text or max_steps
    Tools                  tool definitions from functions, their JSON Schemas, running them
    Streaming              response bytes -> lines -> SSE events -> payloads -> Chunks
    HTTP plumbing          one pool of connections, retries, refused fields, draining
    Command line           python -m openai_compat, or the openai-compat script

Source and documentation: https://github.com/openai-compat/openai-compat
"""

from __future__ import annotations

import argparse
import difflib
import email.utils
import enum
import functools
import http.client
import inspect
import json
import logging
import operator
import os
import random
import re
import string
import sys
import threading
import time
import types
import typing
import urllib.parse
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from decimal import Decimal
from typing import Any, ClassVar, Final, Literal, Union

import requests
import requests.adapters
import sseclient
import urllib3.exceptions

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "FALLBACK_MODELS",
    "DEFAULT_MAX_STEPS",
    "OpenAICompatError",
    "ConfigError",
    "APIError",
    "EndpointUnavailableError",
    "RequestTimeoutError",
    "AuthenticationError",
    "RateLimitError",
    "ModelNotFoundError",
    "ContextLengthError",
    "BadRequestError",
    "ServerError",
    "StreamError",
    "OutputError",
    "classify_error",
    "Usage",
    "ToolCall",
    "ToolResult",
    "Chunk",
    "Step",
    "Result",
    "Tool",
    "tool",
    "Config",
    "Client",
    "Stream",
    "stream",
    "generate",
    "available_models",
    "first_available_model",
    "main",
]

_log = logging.getLogger("openai_compat")
# Silent unless the application configures logging (as requests does).
_log.addHandler(logging.NullHandler())


def _no_quirk(line: str) -> None:
    """Where the pure pieces note an absorbed deviation when no Client listens (see
    _Quirks: a Client passes its own)."""


# ==== Constants ====

DEFAULT_MODEL: Final = "gpt-3.5-turbo"
FALLBACK_MODELS: Final = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4-turbo",
    "gpt-3.5-turbo",
    "claude-3-5-sonnet",
    "claude-3-haiku",
    "gemini-pro",
)
DEFAULT_MAX_STEPS: Final = 10

_ENV_BASE_URL: Final = "OPENAI_COMPATIBLE_BASE_URL"
_ENV_API_KEY: Final = "OPENAI_COMPATIBLE_API_KEY"
_ENV_MODEL: Final = "OPENAI_COMPATIBLE_MODEL"
_ENV_TIMEOUT: Final = "OPENAI_COMPATIBLE_TIMEOUT"
_ENV_MAX_RETRIES: Final = "OPENAI_COMPATIBLE_MAX_RETRIES"
_DEFAULT_TIMEOUT: Final = 30.0
_DEFAULT_MAX_RETRIES: Final = 2
_DISCOVERY_SECONDS: Final = 5.0
_MAX_EVENT_BYTES: Final = 16 * 1024 * 1024
_MAX_ERROR_BODY: Final = 64 * 1024
_DRAIN_SECONDS: Final = 0.1
_MAX_RETRY_AFTER: Final = 60.0
_BACKOFF_BASE: Final = 0.5
_BACKOFF_MAX: Final = 8.0
_READ_SIZE: Final = 65536
_POOL_SIZE: Final = 128  # kept-alive connections per host; opened only when needed
_ID_ALPHABET: Final = string.ascii_letters + string.digits
_LOOPBACK_HOSTS: Final = ("localhost", "127.0.0.1", "::1", "[::1]")
# What requests, urllib3 and the socket layer raise on the network path; each place
# that catches them turns them into the module's own errors.
_TRANSPORT_ERRORS: Final = (requests.RequestException, urllib3.exceptions.HTTPError,
                            http.client.HTTPException, OSError)

# ==== Error classification ====


class OpenAICompatError(Exception):
    """Root of every error this module raises; catch it to catch them all."""


class ConfigError(OpenAICompatError, ValueError):
    """Bad or missing configuration (an environment variable, an argument, a tool).

    Raised before anything is sent. Retrying does not help: fix what the message names.
    """


class APIError(OpenAICompatError):
    """The server could not be reached, or answered with an error.

    Attributes:
        message: the server's own message (or the transport's), with the API key redacted.
        status_code: the HTTP status, or None (no response, or an error inside a stream).
        body: the response body as text (trimmed), or None.
        base_url: the endpoint the request went to.
        retryable: True when sending the same request again may succeed.
        partial_text: answer text the interrupted model call had already yielded ("" if none).
    """

    retryable: ClassVar[bool] = False
    # Where the base URL came from, for hints: the variable, or "base_url=" when the
    # Client was given one (set by the Client that raises the error).
    _url_source: str = _ENV_BASE_URL

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        body: str | None = None,
        base_url: str | None = None,
        partial_text: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.body = body
        self.base_url = base_url
        self.partial_text = partial_text

    def __str__(self) -> str:
        where = []
        if self.status_code is not None:
            where.append(f"HTTP {self.status_code}")
        if self.base_url:
            where.append(f"from {self.base_url}")
        text = self.message or "no message from the server"
        if where:
            text += f" ({' '.join(where)})"
        hint = self._hint()
        return f"{text}. {hint}" if hint else text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status_code={self.status_code!r})"

    def _hint(self) -> str:
        """What to do next, appended to the message."""
        return ""


class EndpointUnavailableError(APIError, ConnectionError):
    """No response: connection refused, DNS failure, reset before the server answered.

    Retried automatically (max_retries); safe to retry.
    """

    retryable = True

    def _hint(self) -> str:
        now = f" (now {self.base_url})" if self.base_url else ""
        return f"Is the server running? Check {self._url_source}{now}"


class RequestTimeoutError(APIError, TimeoutError):
    """The connection could not be made in time, or the server went silent for longer
    than `timeout` seconds (silence between bytes, not total time). Safe to retry.
    """

    retryable = True

    def _hint(self) -> str:
        return f"Raise the timeout ({_ENV_TIMEOUT} or timeout=) for slow or cold servers"


class AuthenticationError(APIError):
    """HTTP 401/403 or an invalid-key message: the key is missing, wrong or not allowed.

    Not retryable: fix the key.
    """

    def _hint(self) -> str:
        return f"Check the API key ({_ENV_API_KEY} or api_key=)"


class RateLimitError(APIError):
    """HTTP 429 or a rate-limit message. `retry_after` holds the server's Retry-After
    in seconds when it sent one. Retried automatically up to 60 s of Retry-After.
    """

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after

    def _hint(self) -> str:
        if self.retry_after is not None:
            return f"Wait {self.retry_after:g} s before retrying, or lower the request rate"
        return "Wait and retry, or lower the request rate"


class ModelNotFoundError(APIError):
    """The server does not know the model. Not retryable: pick a listed model."""

    def _hint(self) -> str:
        return (f"List the server's models with `openai-compat models`; set {_ENV_MODEL} "
                "or pass model=")


class ContextLengthError(APIError):
    """The prompt (plus max_tokens) does not fit the model's context window."""

    def _hint(self) -> str:
        return "Shorten the messages or lower max_tokens, or use a model with a larger context"


class BadRequestError(APIError):
    """Any other 4xx: the server rejected the request as sent. Not retryable."""

    def _hint(self) -> str:
        if self.status_code in (404, 405) and self.base_url and not _has_version(self.base_url):
            return f"The server may expect /v1: try {self._url_source}={self.base_url}/v1"
        if self.status_code in (404, 405):
            return f"Check {self._url_source}: the server has no chat-completions route there"
        return "Check the request's options against what this server supports"


class ServerError(APIError):
    """HTTP 5xx: the server failed. Retried automatically; safe to retry later."""

    retryable = True

    def _hint(self) -> str:
        return "The server failed; retry later or look at the server's log"


class StreamError(APIError):
    """A stream was cut short, was malformed, or carried an error that no other class
    matches. `partial_text` holds the text that had arrived. Safe to retry.
    """

    retryable = True

    def _hint(self) -> str:
        return "The answer was cut short; .partial_text holds what arrived"


class OutputError(APIError):
    """The answer did not match `schema=`, after the model was asked to repair it
    (twice at most). `partial_text` holds the last answer. Retrying the same request
    rarely helps: a simpler schema or a model that follows instructions does."""

    def _hint(self) -> str:
        return "The model's answer did not match schema=; .partial_text holds the last one"


# Ordered: the first row whose pattern matches the message wins. Statuses that
# decide on their own (401, 403, 413, 429) are checked before this table.
_ERROR_PATTERNS: Final[tuple[tuple[type[APIError], re.Pattern[str]], ...]] = (
    # vLLM "The model `qwen2.5-7b` does not exist.", Ollama "model "llama3.2" not found,
    # try pulling it first", OpenAI model_not_found, LiteLLM "Invalid model name passed",
    # Fireworks "Model not found, inaccessible", Together "Unable to access model x",
    # Gemini "models/x is not found for API version v1beta". First, so that nothing an id holds
    # (a "context" or "rate-limit" in its name) can outrank it; the gap after "model"
    # takes any character but a newline: ids hold dots, colons, slashes, @ and quotes.
    (
        ModelNotFoundError,
        re.compile(
            r"\bmodels?\b[^\n]{0,200}?\b(?:not found|does not exist|not exist|is not available)"
            r"|model_not_found|invalid model name|unknown model|no such model"
            r"|unable to access model",
            re.IGNORECASE,
        ),
    ),
    # vLLM/OpenAI/llama-cpp-python "maximum context length is N tokens", llama.cpp
    # exceed_context_size_error "exceeds the available context size", LiteLLM
    # ContextWindowExceededError, Anthropic-compat "prompt is too long".
    (
        ContextLengthError,
        re.compile(
            r"context[ _-]?(?:length|size|window)|maximum context|exceed_context"
            r"|too many tokens|prompt is too long|reduce the length of the (?:messages|input)",
            re.IGNORECASE,
        ),
    ),
    # LiteLLM answers a wrong key with 400 "No connected db." when it has no database.
    (AuthenticationError, re.compile(r"\bno connected db\b", re.IGNORECASE)),
    # llama.cpp "Invalid API Key", llama-cpp-python "Invalid API key", OpenAI
    # "Incorrect API key provided", LiteLLM "Authentication Error, No api key passed in",
    # Gemini "API key not valid" with reason API_KEY_INVALID.
    (
        AuthenticationError,
        re.compile(
            r"(?:invalid|incorrect|missing|no) api[ _-]?key"
            r"|api[ _-]?key[ _-](?:is[ _-])?(?:invalid|not valid|missing|required)"
            r"|unauthori[sz]ed|authentication[ _]error|\bauthentication\b",
            re.IGNORECASE,
        ),
    ),
    # OpenAI "Rate limit reached", TGI 429 "Model is overloaded", Gemini RESOURCE_EXHAUSTED.
    (
        RateLimitError,
        re.compile(
            r"rate[ _-]?limit|too many requests|overloaded|resource[ _]exhausted|exceeded your current quota",
            re.IGNORECASE,
        ),
    ),
    # The seed's table: a bare "does not exist" is a model that does not.
    (ModelNotFoundError, re.compile(r"does not exist", re.IGNORECASE)),
    # Quirk(llama-cpp-python): a request its schema rejects ("messages" not a list,
    # "content": null) is a 500 "N validation error(s)"; resending cannot help.
    (BadRequestError, re.compile(r"\b\d+ validation errors?\b", re.IGNORECASE)),
    # Transport words (no HTTP status): the seed's table ("ECONNREFUSED", the browser's
    # "Failed to fetch", Node's "fetch failed", "TimeoutError: The operation was aborted
    # due to timeout"), and what Python's socket layer says.
    (
        EndpointUnavailableError,
        re.compile(
            r"ECONNREFUSED|connection refused|ECONNRESET|connection reset|name or service not known"
            r"|nodename nor servname|temporary failure in name resolution|no route to host"
            r"|failed to fetch|fetch failed",
            re.IGNORECASE,
        ),
    ),
    (
        RequestTimeoutError,
        re.compile(r"TimeoutError|timed out|ETIMEDOUT|aborted due to timeout", re.IGNORECASE),
    ),
)
_TRANSPORT_CLASSES: Final = (EndpointUnavailableError, RequestTimeoutError)


def classify_error(message: str, status: int | None = None) -> type[APIError]:
    """Return the APIError subclass for an error `message` and optional HTTP `status`.

    Status first (401/403 auth, 413 context length, 429 rate limit), then the
    module's ordered table of regular expressions over the message, then the
    status class (408 timeout, other 4xx bad request, 5xx server error). The
    transport rows (connection refused, timed out) apply only without a status.
    Returns APIError itself when nothing matches and there is no status.
    """
    if status in (401, 403):
        return AuthenticationError
    if status == 429:
        return RateLimitError
    if status == 413:
        return ContextLengthError
    for cls, pattern in _ERROR_PATTERNS:
        if status is not None and cls in _TRANSPORT_CLASSES:
            continue
        if pattern.search(message):
            return cls
    if status is None or status < 400:
        return APIError
    if status == 408:
        return RequestTimeoutError
    return ServerError if status >= 500 else BadRequestError


# Quirks of requests a server refuses because of one field, and the field to drop
# (see _Connection.drop_rejected_field). Ollama: "registry.ollama.ai/library/x does
# not support tools"; vLLM: '"auto" tool choice requires --enable-auto-tool-choice and
# --tool-call-parser to be set'; llama.cpp: "tools param requires --jinja flag";
# others: "tools are not supported", "tool_choice ... not supported"; servers that do
# not know stream_options name it.
_REJECTED_FIELDS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    ("tools", re.compile(
        r"does not support tools|enable-auto-tool-choice|tools param requires"
        r"|tools? (?:are |is )?not supported|tool (?:use|calling) is not supported",
        re.IGNORECASE)),
    ("tool_choice", re.compile(
        r"tool_choice.{0,60}(?:not supported|unsupported|not allowed|invalid)", re.IGNORECASE)),
    ("stream_options", re.compile(r"stream_options", re.IGNORECASE)),
)

# A server that refuses how a schema was asked for: llama-cpp-python's 500 "1
# validation error ... response_format.type Input should be 'text' or 'json_object'",
# and others naming the field or its type.
_SCHEMA_REFUSED: Final = re.compile(r"response_format|json_schema|json_object",
                                    re.IGNORECASE)

# A server still loading its model: llama-server's 503 "Loading model", and 503s that
# say they are loading or warming up (see _Connection.post and Client.wait_ready).
_LOADING: Final = re.compile(r"\bloading\b|warming up|warm-up", re.IGNORECASE)
_LOADING_GAP: Final = 1.0  # the longest wait between two asks to a loading server


def _is_loading(error: APIError) -> bool:
    return error.status_code == 503 and _LOADING.search(error.message) is not None


# What the socket layer says, shortened for messages (see _transport_reason).
_TRANSPORT_REASON: Final = re.compile(
    r"Connection refused|Name or service not known|nodename nor servname provided"
    r"|Temporary failure in name resolution|No route to host|Network is unreachable"
    r"|Connection reset by peer|Remote end closed connection without response"
    r"|certificate verify failed[^)'\"]*|Connection aborted|IncompleteRead[^)]*\)"
    r"|Response ended prematurely|Connection broken"
)
# A kept-alive connection the server had closed: the request met an EOF or a reset
# before any byte of an answer (see _stale_connection).
_STALE_CONNECTION: Final = re.compile(
    r"Remote end closed connection|reset by peer|Broken pipe|BrokenPipeError"
    r"|ConnectionResetError"
)


def _error_from_body(status: int, text: str, message: str | None = None,
                     retry_after: float | None = None,
                     quirk: Callable[[str], None] = _no_quirk) -> APIError:
    """The classified error for an error body of any shape (`message` overrides the
    body's own). A 2xx status means an error the server sent with a success status.
    `quirk` hears of the body's deviations from OpenAI's."""
    message = message or _error_message(text, quirk) or f"HTTP {status}"
    tags = _error_tags(text)
    if status < 400:
        # Quirk(LM Studio): 200 with {"error": "Unexpected endpoint or method."}.
        quirk(f"errors with status {status}")
        cls = classify_error(message + " " + tags)
        if cls is APIError or cls in _TRANSPORT_CLASSES:
            cls = BadRequestError
    else:
        cls = classify_error(message + " " + tags, status)
        if cls is BadRequestError and status >= 500:
            # Only the validation row makes a 5xx a BadRequestError (see _ERROR_PATTERNS).
            quirk("validation errors as HTTP 500")
    body = text[:_MAX_ERROR_BODY]
    if cls is RateLimitError:
        return RateLimitError(message, retry_after=retry_after, status_code=status, body=body)
    return cls(message, status_code=status, body=body)


def _stream_error(payload: dict[str, Any], data: str, error_event: bool,
                  quirk: Callable[[str], None] = _no_quirk) -> APIError | None:
    """The classified error an event inside a 200 stream carries, or None.

    Forms: {"error": {...}} (OpenAI, vLLM, LiteLLM, TGI), {"object": "error", ...}
    (vLLM < 0.10.1, Mistral), `event: error` (Groq), and llama.cpp's legacy `error:
    {...}` line (made an `event: error` by _iter_lines), whose JSON is the error itself.
    A transport word in the message (LiteLLM's "Connection error") is still a stream
    cut short here: the connection to this client is fine.
    """
    err = payload.get("error")
    if err is None and payload.get("object") != "error" and not error_event:
        return None
    if payload.get("object") == "error":
        quirk("errors in streams as object: error")
    if err is None and error_event:
        # A legacy `error:` line, already noted by _iter_lines.
        err = payload
    elif error_event:
        quirk("errors in streams as event: error")
    message = _error_message(data) or "error event without a message"
    cls = classify_error(message + " " + _error_tags(data))
    if cls is APIError or cls in _TRANSPORT_CLASSES:
        cls = StreamError
    status = None
    if isinstance(err, dict):
        # Quirk(TGI): http_status_code; Groq: status_code; LiteLLM: code "503" as a string.
        for key in ("status_code", "http_status_code", "code", "status"):
            value = err.get(key)
            if isinstance(value, str) and value.isdigit():
                quirk("error codes as strings of digits")
            if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
                status = int(value)
                break
    return cls(message, status_code=status, body=data[:_MAX_ERROR_BODY])


def _has_version(base_url: str) -> bool:
    return re.search(r"/v\d+[a-z0-9]*(?:/|$)", base_url) is not None


def _error_message(text: str, quirk: Callable[[str], None] = _no_quirk) -> str:
    """The human message inside an error body of any shape, trimmed to a readable line.

    Shapes: {"error": {"message"}}, {"error": "..."}, {"message"} (vLLM < 0.10.1,
    Mistral), {"detail": str | [{"msg"}]} (FastAPI), [{"error": {...}}] (Gemini),
    HTML pages (proxies), plain text. Never raises. `quirk` hears of a shape that is
    not OpenAI's.
    """
    text = text.strip()
    if not text:
        return ""
    message: str | None = None
    parsed = False
    if text[:1] in "{[":
        try:
            body = json.loads(text)
        except ValueError:
            pass
        else:
            parsed = True
            message = _message_from(body, quirk)
    if message is None:
        if text[:1] == "<":
            quirk("error bodies as HTML pages")
            message = _html_title(text)
        else:
            if not parsed:
                quirk("error bodies as plain text")
            message = text
    if _TRACEBACK.search(message):
        quirk("Python tracebacks in error messages")
    return _trim_message(message)


def _message_from(body: object, quirk: Callable[[str], None] = _no_quirk) -> str | None:
    if isinstance(body, list):
        quirk("error bodies as a JSON array")
        return _message_from(body[0], quirk) if body else None
    if not isinstance(body, dict):
        return body if isinstance(body, str) and body else None
    err = body.get("error")
    if isinstance(err, dict):
        code = err.get("code")
        if isinstance(code, str) and code.isdigit():
            # Quirk(LiteLLM): the HTTP status again, as a string ("400").
            quirk("error codes as strings of digits")
        for key in ("message", "msg", "detail"):
            if isinstance(err.get(key), str) and err[key]:
                return str(err[key])
        nested = _message_from(err.get("error"), quirk)
        if nested:
            return nested
    if isinstance(err, str) and err:
        # Quirk(TGI, Ollama, LM Studio, xAI).
        quirk('error bodies as {"error": "text"}')
        return err
    if isinstance(body.get("message"), str) and body["message"]:
        # Quirk(vLLM < 0.10.1, Mistral).
        quirk('error bodies with a top-level "message"')
        return str(body["message"])
    detail = body.get("detail")
    if isinstance(detail, str) and detail:
        # Quirk(llama-cpp-python and other FastAPI servers).
        quirk('error bodies as {"detail": ...}')
        return detail
    if isinstance(detail, list):
        quirk('error bodies as {"detail": ...}')
        parts = [_detail_item(item) for item in detail]
        return "; ".join(p for p in parts if p) or None
    return None


def _detail_item(item: object) -> str:
    # FastAPI validation errors: {"loc": ["body", "messages"], "msg": "...", "type": ...}
    if not isinstance(item, dict):
        return str(item)
    loc = ".".join(str(x) for x in item.get("loc") or () if x != "body")
    msg = str(item.get("msg") or "")
    return f"{loc}: {msg}" if loc else msg


def _html_title(text: str) -> str:
    match = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL) or re.search(
        r"<h1[^>]*>(.*?)</h1>", text, re.IGNORECASE | re.DOTALL
    )
    inner = match.group(1) if match else re.sub(r"<[^>]+>", " ", text)
    return "HTML error page: " + re.sub(r"\s+", " ", inner).strip()


_TRACEBACK: Final = re.compile(r"\n\s*File \"")


def _trim_message(message: str) -> str:
    # Quirk(llama-cpp-python): 500s carry a Python traceback with the server's own
    # file paths; LiteLLM appends paragraphs about its routing. The first paragraph
    # holds what the user needs.
    message = re.split(r"\n\s*\n|\n\s*File \"", message, maxsplit=1)[0]
    message = re.sub(r"\s+", " ", message).strip()
    return message if len(message) <= 600 else message[:597] + "..."


def _error_tags(text: str) -> str:
    """The `type` and `code` fields of an error body, for classification only."""
    try:
        body = json.loads(text)
    except ValueError:
        return ""
    if isinstance(body, list) and body:
        body = body[0]
    if not isinstance(body, dict):
        return ""
    err: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else body
    return " ".join(
        str(err.get(k)) for k in ("type", "code", "status") if isinstance(err.get(k), (str, int))
    )


def _transport_reason(text: str) -> str:
    match = _TRANSPORT_REASON.search(text)
    return match.group(0) if match else text[:200]


def _redact(text: str, secret: str | None) -> str:
    if secret and secret in text:
        text = text.replace(secret, "[redacted]")
    return re.sub(r"(?i)(bearer\s+)[^\s\"',]+", r"\1[redacted]", text)


# ==== Data types ====


@dataclass(frozen=True)
class Usage:
    """Token counts one model call (or a whole Result, summed) reported.

    Attributes: prompt_tokens, completion_tokens, total_tokens; raw (the decoded JSON).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
        )


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for.

    Attributes:
        id: the server's call id (one is made up when the server sent none).
        name: the tool's name.
        arguments: the arguments, parsed ({} when empty or not valid JSON).
        raw_arguments: the arguments string as received.
        error: why the arguments could not be parsed, or None.
        raw: fields of the call other than id/type/function (echoed back to the server).
    """

    id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw_arguments: str = ""
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class ToolResult:
    """What running one ToolCall gave.

    Attributes:
        call: the ToolCall.
        value: what the function returned (None on error).
        error: the error text sent to the model instead, or None.
        content: the string sent back to the model.
    """

    call: ToolCall
    value: Any = None
    error: str | None = None
    content: str = ""


ChunkType = Literal["text", "reasoning", "refusal", "tool_call", "tool_result", "finish"]


@dataclass(frozen=True)
class Chunk:
    """One piece of a stream.

    Attributes:
        type: "text", "reasoning", "refusal", "tool_call", "tool_result" or "finish".
        content: answer text delta, or refusal text delta ("" for other types), so
            print(chunk.content, end="") works and shows a refusal too.
        reasoning: reasoning text delta (from reasoning_content or reasoning).
        tool_call: the ToolCall ("tool_call" and "tool_result" chunks).
        tool_result: the ToolResult ("tool_result" chunks).
        finish_reason: why the model call ended ("finish" chunks).
        usage: the model call's Usage ("finish" chunks; None if the server sent none).
        step: the model call this chunk belongs to, from 1.
        raw: the decoded server event, when there is one.
    """

    type: ChunkType
    content: str = ""
    reasoning: str = ""
    tool_call: ToolCall | None = None
    tool_result: ToolResult | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    step: int = 1
    raw: Any = field(default=None, repr=False, compare=False)


# Every field's default, for building Chunks the fast way (see _delta_chunk).
_CHUNK_DEFAULTS: Final[dict[str, Any]] = {f.name: f.default for f in fields(Chunk)}


def _delta_chunk(kind: ChunkType, text: str, step: int, raw: Any) -> Chunk:
    """A "text", "reasoning" or "refusal" Chunk, built the fast way.

    NOTE: the hot path of every stream. A frozen dataclass's __init__ sets each of
    its nine fields through object.__setattr__ (about 1 us per event); filling the
    instance dict directly costs a quarter of that and gives an equal, equally
    frozen Chunk.
    """
    chunk = object.__new__(Chunk)
    fields = _CHUNK_DEFAULTS.copy()
    fields["type"] = kind
    fields["reasoning" if kind == "reasoning" else "content"] = text
    fields["step"] = step
    fields["raw"] = raw
    object.__setattr__(chunk, "__dict__", fields)
    return chunk


@dataclass(frozen=True)
class Step:
    """One model call of a Result: its text, reasoning, calls, their results,
    finish_reason, usage and refusal (OpenAI's structured refusal text, "" if none)."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    refusal: str = ""


@dataclass(frozen=True)
class Result:
    """Everything a stream or generate() call produced.

    Attributes:
        text: the final model call's answer text.
        reasoning: the final model call's reasoning text.
        refusal: the final model call's refusal text (OpenAI's structured refusal,
            kept apart from text), "" when the model did not refuse.
        data: the answer parsed and checked against schema= (a dataclass instance
            for a dataclass), or None without schema=.
        steps: one Step per model call.
        tool_calls, tool_results: over all steps.
        finish_reason: the last model call's, or "max_steps" when the budget ran out
            with calls still requested.
        usage: summed over the model calls; None if the server reported none.
        messages: the whole conversation (assistant and tool turns included), ready to
            pass as messages= to continue it.
    """

    text: str = ""
    reasoning: str = ""
    refusal: str = ""
    data: Any = None
    steps: list[Step] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)


class Stream:
    """An iterator of Chunks from stream(); also a context manager.

    Breaking out of the loop (when nothing else holds the Stream), close(), or
    leaving a with-block closes the HTTP response. After the loop ends, `result`
    holds the Result (None before).
    """

    def __init__(self, steps: Generator[Chunk, None, Result]) -> None:
        self._steps = steps
        self.result: Result | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Chunk:
        try:
            return next(self._steps)
        except StopIteration as stop:
            self.result = stop.value
            raise

    def close(self) -> None:
        """Stop the stream and close its HTTP response."""
        self._steps.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def text(self) -> str:
        """The final answer text (reads the stream to its end if needed)."""
        for _ in self:
            pass
        return self.result.text if self.result else ""

# ==== Configuration ====


@dataclass(frozen=True)
class Config:
    """Resolved settings of a Client (see Config.from_env)."""

    base_url: str
    api_key: str | None = None
    model: str | None = None
    timeout: float = _DEFAULT_TIMEOUT
    max_retries: int = _DEFAULT_MAX_RETRIES

    def __repr__(self) -> str:
        key = "'[redacted]'" if self.api_key else "None"
        return (
            f"Config(base_url={self.base_url!r}, api_key={key}, model={self.model!r}, "
            f"timeout={self.timeout!r}, max_retries={self.max_retries!r})"
        )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | str | None = None,
        max_retries: int | str | None = None,
    ) -> Config:
        """Merge explicit arguments over OPENAI_COMPATIBLE_* variables over defaults.

        Blank (empty or whitespace-only) values count as unset. Raises ConfigError
        naming the variable and the fix when a value is missing or malformed.
        """
        env = os.environ if environ is None else environ

        def pick(value: object, name: str) -> str | None:
            if value is not None and str(value).strip():
                return str(value).strip()
            raw = env.get(name)
            return raw.strip() if raw and raw.strip() else None

        url = pick(base_url, _ENV_BASE_URL)
        if url is None:
            raise ConfigError(
                f"No endpoint configured: set {_ENV_BASE_URL} (for example "
                "http://localhost:11434/v1 for Ollama) or pass base_url= to Client()"
            )
        return cls(
            base_url=_check_url(url),
            api_key=pick(api_key, _ENV_API_KEY),
            model=pick(model, _ENV_MODEL),
            timeout=_parse_number(pick(timeout, _ENV_TIMEOUT), _ENV_TIMEOUT, _DEFAULT_TIMEOUT),
            max_retries=int(
                _parse_number(
                    pick(max_retries, _ENV_MAX_RETRIES), _ENV_MAX_RETRIES, _DEFAULT_MAX_RETRIES,
                    integer=True,
                )
            ),
        )


def _check_url(url: str) -> str:
    match = re.match(r"(?i)^https?://([^/?#]+)", url)
    if not match or match.group(1).startswith(":"):
        raise ConfigError(
            f"{_ENV_BASE_URL} must be an http:// or https:// URL such as "
            f"http://localhost:8000/v1 (got {url!r}); add the scheme"
        )
    return url.rstrip("/")


def _parse_number(raw: str | None, name: str, default: float, *, integer: bool = False) -> float:
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number of seconds"
        raise ConfigError(f"{name} must be {kind} (got {raw!r})") from None
    if not value >= 0 or (not integer and value == 0):  # also rejects nan
        raise ConfigError(f"{name} must be positive (got {raw!r})")
    return value


# The chat-completions request parameters of OpenAI's API, accepted by name and sent
# when not None; the library's own options; anything else is a ConfigError, so that
# a misspelt option never travels silently to a server that ignores it.
_OPENAI_PARAMETERS: Final = frozenset({
    "temperature", "max_tokens", "top_p", "seed", "stop", "response_format", "n",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "user",
    "parallel_tool_calls", "reasoning_effort", "max_completion_tokens", "stream_options",
    "metadata", "store", "service_tier", "modalities", "prediction", "audio",
    "web_search_options",
})
_OWN_OPTIONS: Final = frozenset({
    "messages", "system", "model", "tools", "tool_choice", "max_steps", "timeout", "extra_body",
    "schema",
})


def _check_options(options: Mapping[str, Any]) -> None:
    """Raise ConfigError for a keyword that is neither the library's nor OpenAI's."""
    for name in options:
        if name in _OWN_OPTIONS or name in _OPENAI_PARAMETERS:
            continue
        if name == "stream":
            raise ConfigError("stream= is not an option: call stream() to stream, generate() "
                              "for the whole answer")
        close = difflib.get_close_matches(name, sorted(_OWN_OPTIONS | _OPENAI_PARAMETERS), 1)
        hint = f"did you mean {close[0]}=? " if close else ""
        raise ConfigError(f"unknown option {name}=: {hint}Fields a server adds to OpenAI's "
                          f"go in extra_body={{{name!r}: ...}}")


def _answer_schema(schema: Any) -> dict[str, Any]:
    """The JSON Schema of schema=: a dict as given, or one made from a type hint."""
    if isinstance(schema, (Mapping, str, bytes)) and not isinstance(schema, dict):
        raise ConfigError("schema= must be a JSON Schema dict or a type such as a dataclass")
    answer: dict[str, Any] = schema if isinstance(schema, dict) else _schema(schema, "schema=")
    _vet_schema(answer, "schema=")
    return answer


def _conversation(system: object, messages: object, prompt: str | None) -> list[dict[str, Any]]:
    """The request's turns: `system`, then `messages`, then `prompt` as a user turn."""
    turns: list[dict[str, Any]] = []
    if system is not None:
        turns.append({"role": "system", "content": system})
    if messages is not None:
        if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) for m in messages
        ):
            raise ConfigError("messages= must be a list of dicts like "
                              "{'role': 'user', 'content': '...'}")
        turns.extend(dict(m) for m in messages)
    if prompt is not None:
        turns.append({"role": "user", "content": prompt})
    if not turns:
        raise ConfigError("Nothing to send: pass a prompt or messages=")
    return turns


# ==== Client ====


class _Quirks:
    """The deviations from OpenAI's behaviour that one Client has absorbed (see
    Client.quirks): one short line each, in the order first seen, each logged once at
    INFO. Thread-safe.

    NOTE: note() runs inside a stream's loop for a server that deviates on every event
    (CR line endings, reasoning fields); a line already noted costs one set lookup,
    without the lock.
    """

    __slots__ = ("base_url", "lines", "lock", "seen")

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.lines: list[str] = []
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def note(self, line: str) -> None:
        if line in self.seen:
            return
        with self.lock:
            if line in self.seen:
                return
            self.seen.add(line)
            self.lines.append(line)
        _log.info("%s deviates from OpenAI's behaviour (absorbed): %s", self.base_url, line)


class Client:
    """A connection to one OpenAI-compatible server.

    Client(base_url=None, api_key=None, model=None, *, timeout=None, max_retries=None,
    headers=None): each None argument is read from its OPENAI_COMPATIBLE_* variable
    (see the module docstring) when the Client is made. `timeout` is the silence
    allowed between bytes (connecting included), not a bound on total time.
    `headers` are added to every request. Raises ConfigError on bad settings.

    One Client keeps one connection pool: sequential calls reuse a TCP connection,
    and it may be shared by threads. Model discovery runs at most once per Client.

    `quirks` lists what this server did differently from OpenAI and the Client
    absorbed so far, one short line each (see Client.quirks): read it before going
    to production on an endpoint.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.config = Config.from_env(
            base_url=base_url, api_key=api_key, model=model, timeout=timeout,
            max_retries=max_retries,
        )
        given = base_url is not None and str(base_url).strip()
        self._quirks = _Quirks(self.config.base_url)
        self._http = _Connection(self.config, headers, "base_url=" if given else _ENV_BASE_URL,
                                 self._quirks.note)
        self._lock = threading.Lock()
        self._discovered: list[str] | APIError | None = None
        # Set when a streamed request with tools came back as an empty 200 stream:
        # later calls with tools are asked for without streaming (see _model_call).
        self._tools_unstreamed = False
        # Models asked for and answered by another (warned once each, see _note_model).
        self._models_warned: set[str] = set()
        self._warn_plain_http()

    _warned_hosts: ClassVar[set[str]] = set()

    def __repr__(self) -> str:
        return f"Client(base_url={self.config.base_url!r}, model={self.config.model!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def wait_ready(self, timeout: float | None = None) -> list[str]:
        """Wait until the server answers GET {base_url}/models; return its model ids.

        Asks at least once a second. Refused connections, silence and a server that says
        it is loading (or a gateway's 502/503/504) count as not ready yet; progress
        is logged. Past `timeout` seconds in all (default: the Client's timeout)
        raises the last classified error; any other error (a wrong key, no /models
        route) is raised at once, since waiting cannot mend it.
        """
        limit = self.config.timeout if timeout is None else _parse_number(
            str(timeout), "timeout=", self.config.timeout)
        started = time.monotonic()
        logged = started
        asks = 0
        while True:
            found = _fetch_models(self._http)
            if not isinstance(found, APIError):
                with self._lock:
                    if not isinstance(self._discovered, list):
                        self._discovered = found
                return list(found)
            self._http.stamp(found)
            now = time.monotonic()
            if not _not_ready(found) or now - started >= limit:
                raise found
            if asks == 0 or now - logged >= 10:
                logged = now
                _log.info("waiting for %s (%.0f s of %g): %s", self.config.base_url,
                          now - started, limit, found.message)
            asks += 1
            time.sleep(min(_LOADING_GAP, 0.1 * 2 ** asks, started + limit - now))

    @property
    def quirks(self) -> list[str]:
        """The server's deviations from OpenAI's behaviour that this Client has absorbed
        so far: one short line each ("no usage in streams", "tool calls streamed
        without index", "stream_options rejected: dropped", ...), in the order first
        seen, each also logged once at INFO. A copy; `openai-compat check` prints it."""
        with self._quirks.lock:
            return list(self._quirks.lines)

    @property
    def model(self) -> str:
        """The model id requests use: model= → OPENAI_COMPATIBLE_MODEL → the first id
        GET /models lists → DEFAULT_MODEL (discovery runs at most once)."""
        return self.config.model or self.first_available_model()

    def available_models(self, *, fallback: bool = True) -> list[str]:
        """Model ids from GET {base_url}/models, asked at most once per Client (5 s limit).

        When discovery fails (no route, error status, unparsable, empty list) this
        returns FALLBACK_MODELS and logs why; with fallback=False it raises the
        classified APIError instead.
        """
        found = self._discover()
        if isinstance(found, APIError):
            if not fallback:
                raise found
            return list(FALLBACK_MODELS)
        return list(found)

    def first_available_model(self) -> str:
        """The first id the server listed, or DEFAULT_MODEL when discovery failed
        (never an entry of FALLBACK_MODELS that no server confirmed)."""
        found = self._discover()
        return DEFAULT_MODEL if isinstance(found, APIError) else found[0]

    def stream(self, prompt: str | None = None, **options: Any) -> Stream:
        """Stream a chat completion (and any tool calls) as Chunks.

        Options (keyword-only): messages, system, model, tools, tool_choice (default
        "auto" with tools, never sent without), max_steps, schema (a JSON Schema
        dict or a type the answer must match: Result.data holds it parsed, see
        OutputError), timeout (this call's silence limit), the chat-completions
        parameters of OpenAI's API by name
        (temperature, max_tokens, top_p, seed, stop, response_format, n, ...: sent
        when not None), and extra_body={...} for server-specific fields, merged into
        the request last. The request is `system`, then `messages`, then `prompt` as
        the last user turn.

        Returns a Stream: iterate it with a plain for-loop; each event is yielded as
        soon as its bytes arrive. Leaving the loop (or close(), or a with-block)
        closes the HTTP response. After the loop, `stream.result` is the Result.
        Raises ConfigError at once for an unknown keyword (naming the closest valid
        one) or a bad value, and APIError subclasses while iterating.
        """
        return Stream(_iter_steps(self, self._prepare(prompt, options)))

    def generate(self, prompt: str | None = None, **options: Any) -> Result:
        """Run stream() to its end and return the Result.

        It streams underneath, so that `timeout` keeps its one meaning: a long answer
        from a slow server never times out while tokens flow, a dead one fails within
        `timeout`, and an error keeps the text that had arrived in .partial_text.
        """
        run = Stream(_iter_steps(self, self._prepare(prompt, options)))
        for _ in run:
            pass
        assert run.result is not None
        return run.result

    def _warn_plain_http(self) -> None:
        host = re.sub(r"(?i)^http://([^/:]+|\[[^\]]+\]).*$", r"\1", self.config.base_url)
        if (
            self.config.api_key
            and self.config.base_url.lower().startswith("http://")
            and host.lower() not in _LOOPBACK_HOSTS
            and not host.startswith("127.")
            and host not in Client._warned_hosts
        ):
            Client._warned_hosts.add(host)
            _log.warning(
                "the API key is sent over plain http to %s; use https for remote servers", host
            )

    def _discover(self) -> list[str] | APIError:
        with self._lock:
            if self._discovered is None:
                found = _fetch_models(self._http)
                if isinstance(found, APIError):
                    self._http.stamp(found)
                    _log.warning("model discovery at %s/models failed (%s); using fallbacks",
                                 self.config.base_url, found.message)
                self._discovered = found
            return self._discovered

    def _prepare(self, prompt: str | None, options: dict[str, Any]) -> _Request:
        """Check the options and build the request (raises ConfigError, sends nothing)."""
        _check_options(options)
        opts = dict(options)
        turns = _conversation(opts.pop("system", None), opts.pop("messages", None), prompt)
        model = opts.pop("model", None)
        tools = _as_tools(opts.pop("tools", None))
        tool_choice = opts.pop("tool_choice", None)
        max_steps = opts.pop("max_steps", None)
        if max_steps is None:
            max_steps = DEFAULT_MAX_STEPS
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ConfigError(f"max_steps must be a whole number of at least 1 (got {max_steps!r})")
        timeout = opts.pop("timeout", None)
        timeout = self.config.timeout if timeout is None else _parse_number(
            str(timeout), "timeout=", self.config.timeout)
        extra_body = opts.pop("extra_body", None)
        if extra_body is not None and not isinstance(extra_body, Mapping):
            raise ConfigError("extra_body= must be a dict of fields to add to the request body")
        schema_type = opts.pop("schema", None)
        schema = None if schema_type is None else _answer_schema(schema_type)
        if schema is not None and opts.get("response_format") is not None:
            raise ConfigError("give schema= or response_format=, not both")
        body: dict[str, Any] = {"model": model or self.model, "messages": turns}
        body.update((k, v) for k, v in opts.items() if v is not None)
        if tools:
            body["tools"] = [_tool_spec(t) for t in tools]
            body["tool_choice"] = "auto" if tool_choice is None else tool_choice
        body.update(extra_body or {})
        return _Request(body, {t.name: t for t in tools}, max_steps, timeout, schema,
                        schema_type)

    def _model_call(
        self, body: dict[str, Any], step: int, request: _Request
    ) -> Generator[Chunk, None, Step]:
        """One model call, streamed unless the server cannot; its Chunks (the
        "finish" one last) and its Step (without tool results)."""
        self._http.drop_refused_fields(body)
        if request.schema is not None:
            self._http.ask_for_schema(body, request.schema)
        if self._tools_unstreamed and "tools" in body:
            return (yield from self._plain_call(body, step, request))
        body["stream"] = True
        if "stream_options" not in body and "stream_options" not in self._http.refused:
            # Ask for usage; servers that reject the field lose it once.
            body["stream_options"] = {"include_usage": True}
        record = yield from self._streamed_call(body, step, request)
        if record is None:
            # Quirk(llama-cpp-python): a 200 stream with no event at all (a failure
            # after the headers), for instance for streamed tool_choice "auto" or a
            # prompt beyond the context. Nothing was yielded: ask once more without
            # streaming, which answers or raises the classified error. With tools,
            # assume the server cannot stream them and stop trying.
            if "tools" in body and not self._tools_unstreamed:
                self._tools_unstreamed = True
                self._quirks.note("tool calls only unstreamed")
                _log.warning("the server ended a stream with tools without any event; asking"
                             " without streaming, for calls with tools from now on")
            else:
                self._quirks.note("empty 200 stream: asked again without streaming")
                _log.warning("the server ended a stream without any event; asking again"
                             " without streaming")
            record = yield from self._plain_call(body, step, request)
        return record

    def _streamed_call(
        self, body: dict[str, Any], step: int, request: _Request
    ) -> Generator[Chunk, None, Step | None]:
        """Send, hand the body to the streaming chain, close. None when the stream
        ended without any event (see _model_call)."""
        response = self._http.post(body, request.timeout, request.schema)
        quirk = self._quirks.note
        acc = _Accumulator(step, quirk)
        with response:
            content_type = response.headers.get("content-type", "").lower()
            if "text/html" in content_type:
                # A proxy's or a web server's page, not the API.
                raise self._http.error_from_body(response.status_code,
                                                 self._http.read_text(response))
            if "json" in content_type and "event-stream" not in content_type:
                # Quirk(LM Studio, proxies): one JSON document for a stream request
                # (LM Studio's 200 error for an unknown route, servers ignoring stream).
                payload = self._http.read_json(response, request.timeout)
                if isinstance(payload, dict) and payload.get("choices"):
                    quirk("one JSON document for a stream request")
                return (yield from self._deliver_whole(payload, body, step))
            try:
                yield from _iter_chunks(_iter_sse(_iter_raw(response), quirk), acc)
                if acc.done:
                    _drain(response)
            except APIError as exc:
                exc.partial_text = acc.text.getvalue()
                self._http.stamp(exc)
                raise
        self._note_model(body.get("model"), acc.model)
        if not acc.seen:
            return None
        if not acc.done and acc.finish_reason is None:
            raise self._http.stamp(StreamError(
                "the stream ended before the answer was finished (no finish_reason, no [DONE])",
                partial_text=acc.text.getvalue()))
        if not acc.done:
            quirk("no [DONE] at the end of streams")
        record = acc.finish()
        options = body.get("stream_options")
        if record.usage is None and isinstance(options, dict) and options.get("include_usage"):
            # Quirk(llama-cpp-python): include_usage is ignored.
            quirk("no usage in streams")
        yield _finish_chunk(record, step)
        return record

    def _plain_call(
        self, body: dict[str, Any], step: int, request: _Request
    ) -> Generator[Chunk, None, Step]:
        """One model call without streaming (servers send the answer once complete)."""
        body.pop("stream", None)
        # vLLM answers 400 to stream_options without stream: true.
        body.pop("stream_options", None)
        response = self._http.post(body, request.timeout, request.schema)
        with response:
            payload = self._http.read_json(response, request.timeout)
        return (yield from self._deliver_whole(payload, body, step))

    def _deliver_whole(
        self, payload: Any, body: dict[str, Any], step: int
    ) -> Generator[Chunk, None, Step]:
        """The Chunks of a whole (non-streamed) answer, then its Step."""
        if isinstance(payload, dict):
            self._note_model(body.get("model"), payload.get("model"))
        try:
            chunks, record = _whole_answer(payload, step, self._quirks.note)
        except APIError as exc:
            self._http.stamp(exc)
            raise
        yield from chunks
        yield _finish_chunk(record, step)
        return record

    def _note_model(self, asked: object, answered: object) -> None:
        """Warn once per model when the server answers with another model than asked.

        Quirk(llama.cpp, TGI, llama-cpp-python): an unknown model is answered by the
        one they have loaded. A name inside the other (a dated version, a provider
        prefix) is the same model.
        """
        if not (isinstance(asked, str) and isinstance(answered, str) and asked and answered):
            return
        if asked.lower() in answered.lower() or answered.lower() in asked.lower():
            return
        self._quirks.note("answers with another model than asked")
        with self._lock:
            if asked in self._models_warned:
                return
            self._models_warned.add(asked)
        _log.warning("asked for model %r, %s answered with %r: it may not serve %r",
                     asked, self.config.base_url, answered, asked)


_default: Client | None = None
_default_lock = threading.Lock()


def _default_client() -> Client:
    """A Client for the current environment, reused while the environment is unchanged
    (so its connection pool and discovery are shared between calls)."""
    global _default
    config = Config.from_env()
    with _default_lock:
        if _default is None or _default.config != config:
            _default = Client()
        return _default


def stream(prompt: str | None = None, **options: Any) -> Stream:
    """Client().stream(prompt, **options) with a Client configured from the environment."""
    return _default_client().stream(prompt, **options)


def generate(prompt: str | None = None, **options: Any) -> Result:
    """Client().generate(prompt, **options) with a Client configured from the environment."""
    return _default_client().generate(prompt, **options)


def available_models(*, fallback: bool = True) -> list[str]:
    """Client().available_models(fallback=fallback) for the environment's endpoint."""
    return _default_client().available_models(fallback=fallback)


def first_available_model() -> str:
    """Client().first_available_model() for the environment's endpoint."""
    return _default_client().first_available_model()

# ==== Model discovery ====


def _fetch_models(conn: _Connection) -> list[str] | APIError:
    """The model ids GET {base_url}/models lists, or why not (returned, not raised),
    within _DISCOVERY_SECONDS in all."""
    # In a thread, so that the bound holds even for a server that accepts the
    # connection and then trickles or says nothing (a read timeout alone would
    # allow 5 s per read).
    answers: list[list[str] | APIError] = []

    def ask() -> None:
        try:
            answers.append(_models_request(conn))
        except Exception as exc:  # noqa: BLE001 - a bug here must not cost 5 s
            answers.append(APIError(f"model discovery failed: {exc!r}"))

    worker = threading.Thread(target=ask, daemon=True, name="openai-compat-discovery")
    worker.start()
    worker.join(_DISCOVERY_SECONDS)
    if answers:
        return answers[0]
    return RequestTimeoutError(f"GET /models did not answer within {_DISCOVERY_SECONDS:g} s")


def _not_ready(error: APIError) -> bool:
    """Whether an error from GET /models means "not up yet" rather than "wrong"."""
    return isinstance(error, (EndpointUnavailableError, RequestTimeoutError)) or (
        isinstance(error, ServerError) and error.status_code in (502, 503, 504))


def _models_request(conn: _Connection) -> list[str] | APIError:
    try:
        status, text, retry_after = conn.get_text("/models", _DISCOVERY_SECONDS)
    except APIError as exc:
        return exc
    if status >= 300:
        return conn.error_from_body(status, text, retry_after=retry_after)
    try:
        ids = _model_ids(json.loads(text), conn.quirk)
    except ValueError:
        return APIError(f"GET /models answered with something that is not JSON: "
                        f"{_error_message(text)!r}")
    if isinstance(ids, str):
        return conn.error_from_body(200, text, message=ids)
    if not ids:
        return APIError("GET /models listed no models")
    return ids


def _model_ids(payload: Any, quirk: Callable[[str], None] = _no_quirk) -> list[str] | str:
    """Model ids from any /models shape, or the error message a 200 body carried.

    Shapes: {"data": [...]} (OpenAI), {"data": null} (Ollama with no models),
    {"models": [...], "data": [...]} (llama.cpp), {"models": [{"name"}]}, a bare list;
    entries are {"id"} or {"name"}/{"model"} or plain strings. `quirk` hears of a
    shape that is not OpenAI's.
    """
    if isinstance(payload, dict):
        if payload.get("error"):
            return _message_from(payload, quirk) or "GET /models answered with an error"
        entries = payload.get("data")
        if entries is None and "data" in payload:
            quirk("/models data: null")
        if not entries and payload.get("models") is not None:
            quirk('/models as {"models": [...]}')
            entries = payload.get("models")
    else:
        if isinstance(payload, list):
            quirk("/models as a bare list")
        entries = payload
    ids: list[str] = []
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict):
            if not entry.get("id"):
                quirk('/models entries without "id"')
            entry = entry.get("id") or entry.get("name") or entry.get("model")
        elif isinstance(entry, str):
            quirk("/models entries as plain strings")
        if isinstance(entry, str) and entry.strip() and entry not in ids:
            ids.append(entry)
    return ids


# ==== Tool-call loop ====


class _Request:
    """One stream() or generate() call, prepared: the request body, the tools by
    name, the budget of model calls, the silence limit, and the answer's schema
    (JSON Schema, and the type it came from, when schema= was given)."""

    __slots__ = ("body", "max_steps", "schema", "schema_type", "timeout", "tools")

    def __init__(self, body: dict[str, Any], tools: dict[str, Tool], max_steps: int,
                 timeout: float, schema: dict[str, Any] | None = None,
                 schema_type: Any = None) -> None:
        self.body = body
        self.tools = tools
        self.max_steps = max_steps
        self.timeout = timeout
        self.schema = schema
        self.schema_type = schema_type


_REPAIRS: Final = 2  # times a model is asked to mend an answer that breaks schema=


def _iter_steps(client: Client, request: _Request) -> Generator[Chunk, None, Result]:
    """The loop: a model call; the tools it asked for, run one after another and
    their results sent back; again, until the model answers in text or max_steps
    model calls are spent. With schema=, an answer that does not match goes back
    to the model with what was wrong, twice at most. Yields every Chunk; returns
    the Result."""
    messages: list[dict[str, Any]] = request.body["messages"]
    steps: list[Step] = []
    finish: str | None = None
    data = None
    repairs = 0
    for step in range(1, request.max_steps + 1):
        record = yield from client._model_call(
            {**request.body, "messages": list(messages)}, step, request
        )
        finish = record.finish_reason
        calls = record.tool_calls
        run_calls = bool(calls and request.tools and finish != "length"
                         and step < request.max_steps)
        # Calls that are not run stay out of the history: a conversation whose
        # assistant turn asks for tools must be followed by their results.
        messages.append(_assistant_message(record, with_calls=run_calls))
        results: list[ToolResult] = []
        for call in calls:
            yield Chunk("tool_call", tool_call=call, step=step)
            if run_calls:
                result = _execute(call, request.tools)
                results.append(result)
                messages.append(
                    {"role": "tool", "tool_call_id": call.id, "content": result.content}
                )
                yield Chunk("tool_result", tool_call=call, tool_result=result, step=step)
        steps.append(replace(record, tool_results=results))
        if run_calls:
            continue
        if calls and request.tools and step >= request.max_steps and finish != "length":
            finish = "max_steps"
        elif request.schema is not None and not record.refusal:
            problem, data = _read_answer(record.text, request)
            if problem is not None:
                if repairs == _REPAIRS or step == request.max_steps:
                    raise client._http.stamp(OutputError(
                        f"the answer does not match the schema: {problem}",
                        partial_text=record.text))
                repairs += 1
                messages.append({"role": "user", "content": _repair_prompt(problem)})
                continue
        break
    return _result(steps, finish, messages, data)


def _read_answer(text: str, request: _Request) -> tuple[str | None, Any]:
    """(what is wrong, None) or (None, the data) for an answer to schema=."""
    assert request.schema is not None
    try:
        value = _json_from_text(text)
    except ValueError as exc:
        return f"no JSON value in the answer ({exc})", None
    value, _ = _prune_nulls(value, request.schema)
    problem = _validate(value, request.schema)
    if problem is not None:
        return problem, None
    if is_dataclass(request.schema_type):
        return None, _build(value, request.schema_type)
    return None, value


def _repair_prompt(problem: str) -> str:
    return (f"That answer does not match the JSON Schema: {problem}. Answer again with "
            "the corrected JSON only.")


def _assistant_message(record: Step, *, with_calls: bool) -> dict[str, Any]:
    # content "" rather than null: llama-cpp-python rejects null (500), Ollama takes
    # null only with tool_calls, llama.cpp/OpenAI/vLLM/LiteLLM take "".
    message: dict[str, Any] = {"role": "assistant", "content": record.text}
    if with_calls and record.tool_calls:
        message["tool_calls"] = [
            {
                **call.raw,
                "id": call.id,
                "type": "function",
                # Quirk(Ollama): arguments must be valid JSON text ("{}" when empty).
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for call in record.tool_calls
        ]
    return message


def _execute(call: ToolCall, tools: Mapping[str, Tool]) -> ToolResult:
    """Run one call; any failure becomes the error the model reads, never an exception."""
    found = tools.get(call.name)
    if call.error:
        error = f"{call.error}; received: {call.raw_arguments[:500]!r}"
    elif found is None:
        error = f"unknown tool {call.name!r}; available tools: {', '.join(tools) or 'none'}"
    else:
        try:
            value = _run_tool(found, call.arguments)
        except Exception as exc:  # noqa: BLE001 - any tool failure goes back to the model
            _log.debug("tool %s raised %r", call.name, exc)
            error = f"{type(exc).__name__}: {exc}"
        else:
            return ToolResult(call, value, None, _tool_content(value))
    return ToolResult(call, None, error, json.dumps({"error": error}, ensure_ascii=False))


def _tool_content(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _result(steps: list[Step], finish: str | None, messages: list[dict[str, Any]],
            data: Any = None) -> Result:
    usages = [s.usage for s in steps if s.usage is not None]
    total = None
    for usage in usages:
        total = usage if total is None else total + usage
    last = steps[-1] if steps else Step()
    return Result(
        text=last.text,
        reasoning=last.reasoning,
        refusal=last.refusal,
        data=data,
        steps=steps,
        tool_calls=[c for s in steps for c in s.tool_calls],
        tool_results=[r for s in steps for r in s.tool_results],
        finish_reason=finish,
        usage=total,
        messages=messages,
    )


# ==== Tools ====

_TOOL_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_JSON_TYPES: Final[dict[type, str]] = {str: "string", int: "integer", float: "number",
                                       bool: "boolean"}
# TypedDict's Required[...], NotRequired[...] (3.11+) and ReadOnly[...] (3.13+) wrap a key's type.
_KEY_MARKS: Final = tuple(getattr(typing, name) for name in ("Required", "NotRequired", "ReadOnly")
                          if hasattr(typing, name))
_THINK: Final = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
_FENCE: Final = re.compile(r"```[^\n`]*\n(.*?)(?:```|$)", re.DOTALL)
_JSON_START: Final = re.compile(r"[{\[]")


@dataclass(frozen=True)
class Tool:
    """A tool the model may call: its name, description, JSON Schema of its
    arguments (an object), and the function that runs it (called with the
    arguments as keywords, once they match that schema). hints: the type hint of
    each parameter, from which its argument is built; filled for a function given
    as a tool."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any] | None = None
    # The function's type hint per parameter, from which each argument is built (an Enum
    # member, a dataclass instance). Empty for a Tool made by hand: its arguments are
    # checked against its schema and passed as they came.
    hints: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Whether the function takes **kwargs, so that names its schema lacks may pass;
    # read from the signature once, here, not on every call.
    _takes_any: bool = field(default=True, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TOOL_NAME.match(self.name):
            raise ConfigError(f"tool name {self.name!r} must be 1-64 letters, digits, _ or -")
        if not isinstance(self.parameters, dict):
            raise ConfigError(f"tool {self.name!r}: parameters must be a JSON Schema dict")
        _vet_schema(self.parameters, f"tool {self.name!r} parameters")
        if self.function is not None:
            try:
                takes_any = any(p.kind is p.VAR_KEYWORD
                                for p in inspect.signature(self.function).parameters.values())
            except (TypeError, ValueError):
                takes_any = True
            object.__setattr__(self, "_takes_any", takes_any)


def tool(func: Callable[..., Any] | None = None, *, name: str | None = None,
         description: str | None = None) -> Any:
    """Mark a function as a tool, optionally naming or describing it differently.

    Usable bare (@tool) or with arguments (@tool(name="search")). Returns the
    function itself, still callable as before.
    """
    def mark(target: Callable[..., Any]) -> Callable[..., Any]:
        target.__openai_compat_tool__ = (name, description)  # type: ignore[attr-defined]
        return target

    return mark(func) if func is not None else mark


def _as_tools(tools: object) -> list[Tool]:
    """Normalise tools=: Tools, functions, dicts of name -> Tool or name ->
    {"description", "parameters", "execute"}, or a list mixing them."""
    if not tools:
        return []
    items = tools if isinstance(tools, (list, tuple)) else [tools]
    out: list[Tool] = []
    for position, item in enumerate(items):
        if isinstance(item, Tool):
            out.append(item)
        elif isinstance(item, dict):
            out.extend(_tool_from_entry(key, value) for key, value in item.items())
        elif callable(item):
            out.append(_tool_from_function(item))
        else:
            raise ConfigError(f"tools[{position}] is a {type(item).__name__}: give a function, "
                              "an oc.Tool, or a dict of name -> tool")
    names = [t.name for t in out]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two tools are named {name!r}")
    return out


def _tool_from_entry(name: object, value: object) -> Tool:
    if isinstance(value, Tool):
        return value if value.name == name else Tool(str(name), value.description,
                                                     value.parameters, value.function,
                                                     value.hints)
    if callable(value):
        return _tool_from_function(value, name=str(name))
    if not isinstance(value, dict):
        raise ConfigError(f"tool {name!r}: expected a Tool, a function or a dict with "
                          "'description', 'parameters' and 'execute'")
    execute = value.get("execute") or value.get("function")
    if not callable(execute):
        raise ConfigError(f"tool {name!r}: 'execute' must be a function")
    parameters = value.get("parameters") or {"type": "object", "properties": {}}
    return Tool(str(name), str(value.get("description") or ""), parameters, execute)


def _tool_spec(definition: Tool) -> dict[str, Any]:
    """The request form of a tool."""
    return {"type": "function", "function": {"name": definition.name,
                                             "description": definition.description,
                                             "parameters": definition.parameters}}


def _tool_from_function(func: Callable[..., Any], *, name: str | None = None) -> Tool:
    marked_name, marked_description = getattr(func, "__openai_compat_tool__", (None, None))
    tool_name = name or marked_name or getattr(func, "__name__", "")
    if tool_name == "<lambda>" or not tool_name:
        raise ConfigError("a lambda needs a name: use oc.tool(name=...)(fn) or oc.Tool")
    summary, arg_docs = _parse_docstring(inspect.getdoc(func) or "")
    try:
        hints = typing.get_type_hints(func, include_extras=True)
        signature = inspect.signature(func)
    except (NameError, TypeError, ValueError) as exc:
        raise ConfigError(f"tool {tool_name!r}: cannot read its signature ({exc})") from None
    properties: dict[str, Any] = {}
    required: list[str] = []
    annotations: dict[str, Any] = {}
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            continue  # **kwargs accepts whatever else the model sends
        if param.kind in (param.VAR_POSITIONAL, param.POSITIONAL_ONLY):
            raise ConfigError(f"tool {tool_name!r}: parameter {param.name!r} cannot be passed "
                              "by keyword")
        where = f"tool {tool_name!r}, parameter {param.name!r}"
        annotation = annotations[param.name] = hints.get(param.name, Any)
        schema = _schema(annotation, where, parameter=True)
        if "description" not in schema and param.name in arg_docs:
            schema["description"] = arg_docs[param.name]
        if param.default is param.empty:
            required.append(param.name)
        properties[param.name] = schema
    parameters = {"type": "object", "properties": properties, "required": required}
    return Tool(tool_name, marked_description or summary, parameters, func, annotations)


def _schema(annotation: Any, where: str, *, parameter: bool = False,
            seen: tuple[type, ...] = ()) -> dict[str, Any]:
    """JSON Schema for one annotation; ConfigError naming `where` for one it cannot describe.

    parameter: the annotation is a tool parameter's own, where Optional[X] means the
    argument may be left out and the schema is X's alone; anywhere else (a field, an
    item, an answer) it is X or null. seen: the classes being described, as a
    dataclass or TypedDict that contains itself cannot be written out.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = _schema(args[0], where, parameter=parameter, seen=seen)
        notes = [a for a in args[1:] if isinstance(a, str)]
        if notes:
            inner["description"] = notes[0]
        return inner
    if origin in _KEY_MARKS:
        return _schema(args[0], where, seen=seen)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return {}
    if origin in (Union, types.UnionType):
        options = [_schema(a, where, parameter=parameter, seen=seen)
                   for a in args if a is not type(None)]
        if len(options) < len(args) and not parameter:
            options.append({"type": "null"})
        return options[0] if len(options) == 1 else {"anyOf": options}
    schema: dict[str, Any]
    if origin is Literal:
        kinds = {_JSON_TYPES.get(type(v)) for v in args}
        schema = {"enum": list(args)}
        if len(kinds) == 1 and None not in kinds:
            schema["type"] = kinds.pop()
        return schema
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [m.value for m in annotation]
        kinds = {_JSON_TYPES.get(type(v)) for v in values}
        schema = {"enum": values}
        if len(kinds) == 1 and None not in kinds:
            schema["type"] = kinds.pop()
        return schema
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    if annotation in (list, tuple) or origin in (list, tuple):
        items = [a for a in args if a is not Ellipsis]
        schema = {"type": "array"}
        if len(items) == 1:
            schema["items"] = _schema(items[0], where, seen=seen)
        return schema
    if annotation is dict or origin is dict:
        return {"type": "object"}
    if _is_record(annotation):
        return _object_schema(annotation, where, seen)
    raise ConfigError(f"{where}: cannot describe {annotation!r} as JSON Schema; use str, int, "
                      "float, bool, list, dict, Optional, Literal, an Enum, a dataclass or "
                      "a TypedDict")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The summary (text before a blank line or Args:) and the Args: descriptions."""
    summary_lines: list[str] = []
    for line in doc.splitlines():
        if not line.strip() or line.strip().rstrip(":") in ("Args", "Arguments", "Parameters"):
            break
        summary_lines.append(line.strip())
    args: dict[str, str] = {}
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?|\s*\n)*)", doc,
                        re.MULTILINE)
    if section:
        current: str | None = None
        indent = 0
        for line in section.group(1).splitlines():
            match = re.match(r"^\s{1,8}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
            if match and (current is None or len(line) - len(line.lstrip()) <= indent):
                current, indent = match.group(1), len(line) - len(line.lstrip())
                args[current] = match.group(2).strip()
            elif current and line.strip():
                args[current] = (args[current] + " " + line.strip()).strip()
    return " ".join(summary_lines), args


def _is_record(annotation: Any) -> bool:
    """A dataclass or TypedDict class: a JSON object with named fields."""
    return isinstance(annotation, type) and (is_dataclass(annotation)
                                             or typing.is_typeddict(annotation))


def _object_schema(cls: type, where: str, seen: tuple[type, ...]) -> dict[str, Any]:
    if cls in seen:
        raise ConfigError(f"{where}: {cls.__name__} contains itself, which JSON Schema "
                          "without references cannot describe")
    try:
        fields = _fields(cls)
    except (NameError, TypeError) as exc:
        raise ConfigError(f"{where}: cannot read the fields of {cls.__name__} ({exc})") from None
    properties = {name: _schema(hint, f"{where}, field {name!r}", seen=(*seen, cls))
                  for name, hint, _ in fields}
    return {"type": "object", "properties": properties,
            "required": [name for name, _, required in fields if required],
            "additionalProperties": False}


@functools.lru_cache(maxsize=256)
def _fields(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """(name, type hint, required) of each field of a dataclass or TypedDict, in order.

    get_type_hints resolves forward references (string annotations) in the class's
    module; cached, as that evaluates them anew on every call.
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    if is_dataclass(cls):
        return tuple((f.name, hints.get(f.name, Any),
                      f.default is MISSING and f.default_factory is MISSING)
                     for f in fields(cls) if f.init)
    required = getattr(cls, "__required_keys__", frozenset(hints))
    # NOTE: under string annotations (from __future__ import annotations) Python puts
    # NotRequired keys in __required_keys__ too (3.11-3.13); the hint itself tells.
    marks = {getattr(typing, mark): mark == "Required" for mark in ("Required", "NotRequired")
             if hasattr(typing, mark)}
    return tuple((name, hint, marks.get(typing.get_origin(hint), name in required))
                 for name, hint in hints.items())


def _build(value: Any, annotation: Any) -> Any:
    """The Python value a type hint asks for, made from JSON that _validate accepted.

    A dataclass becomes an instance (nested ones too), an Enum its member, an int's 3.0
    (an integer to JSON Schema) 3; lists and TypedDicts have their items built likewise;
    anything else is returned as it is.
    """
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if value is None:
        return None
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) > 1:  # the first option the value fits
            options = [a for a in options if _validate(value, _schema(a, "")) is None] or [Any]
        return _build(value, options[0])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation(value)
    if annotation is int and isinstance(value, float):  # JSON Schema's integer 3.0
        return int(value)
    if _is_record(annotation) and isinstance(value, dict):
        hints = {name: hint for name, hint, _ in _fields(annotation)}
        built = {k: _build(v, hints[k]) if k in hints else v for k, v in value.items()}
        return built if typing.is_typeddict(annotation) else annotation(**built)
    items = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    if origin in (list, tuple) and len(items) == 1 and isinstance(value, list):
        return [_build(v, items[0]) for v in value]
    return value


def _unwrap(annotation: Any) -> Any:
    """The type inside Annotated[...] and TypedDict's Required[...] and NotRequired[...]."""
    while typing.get_origin(annotation) in (typing.Annotated, *_KEY_MARKS):
        annotation = typing.get_args(annotation)[0]
    return annotation


def _json_from_text(text: str) -> Any:
    """The first complete JSON value in a model's answer.

    The whole answer when it is JSON (a bare string or number too); else the content
    of the first fenced code block that holds an object or array; else the first
    object or array that parses, wherever it stands among the prose. Raises ValueError
    with a short reason when there is none.
    """
    # Quirk(vLLM without --reasoning-parser, llama.cpp with reasoning_format none): the
    # model's thinking comes inline, before the answer, and may hold drafts of it.
    text = _THINK.sub("", text).strip()
    if not text:
        raise ValueError("the answer is empty")
    try:
        return json.loads(text)
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    first_error: json.JSONDecodeError | None = None
    for piece in [*(m.group(1) for m in _FENCE.finditer(text)), text]:
        for start in _JSON_START.finditer(piece):
            try:
                return decoder.raw_decode(piece, start.start())[0]
            except json.JSONDecodeError as exc:
                first_error = first_error or exc
    if first_error is None:
        raise ValueError("the answer holds no JSON object or array")
    raise ValueError(f"the answer holds no complete JSON value ({first_error.msg})")


def _run_tool(t: Tool, arguments: dict[str, Any]) -> Any:
    """Check the model's arguments, build them as the function's type hints ask, and
    call the function with them as keywords.

    Raises TypeError naming a missing required argument or an unexpected one, and
    ValueError naming the field, what was expected and what came for a value that does
    not match the tool's schema; the function is not called then.
    """
    if t.function is None:
        raise TypeError(f"tool {t.name!r} has no function to run")
    # Null for an argument that is not required, where its schema rejects null, means the
    # model left it out: the function's default applies (DESIGN.md, Tools).
    arguments, _ = _prune_nulls(arguments, t.parameters)
    properties = t.parameters.get("properties") or {}
    missing = [n for n in t.parameters.get("required") or () if n not in arguments]
    if missing:
        raise TypeError(f"missing required argument(s): {', '.join(missing)}")
    unknown = [n for n in arguments if properties and n not in properties]
    if unknown and not t._takes_any:
        raise TypeError(f"unexpected argument(s): {', '.join(unknown)}")
    problem = _validate(arguments, t.parameters)
    if problem:
        raise ValueError(problem)
    return t.function(**{n: _build(v, t.hints[n]) if n in t.hints else v
                         for n, v in arguments.items()})


# ==== Checking JSON against a schema ====

# Spec: JSON Schema draft 2020-12 (json-schema.org/draft/2020-12, Core and Validation).
# The vendored JSON-Schema-Test-Suite (testdata/) asserts this checker case by case.

_TYPES: Final[dict[str, Callable[[Any], bool]]] = {
    "null": lambda v: v is None, "boolean": lambda v: isinstance(v, bool),
    # Spec: a number with a zero fractional part is an integer (3.0 is); a bool is no number.
    "integer": lambda v: _TYPES["number"](v) and (isinstance(v, int) or v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str), "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}
# What a keyword's value must be (the shape in _KEYWORDS): a JSON type or one of these.
_SHAPES: Final[dict[str, Callable[[Any], bool]]] = {
    **_TYPES,
    "schema": lambda a: isinstance(a, (dict, bool)), "any": lambda a: True,
    "schemas": lambda a: isinstance(a, list) and bool(a) and all(map(_SHAPES["schema"], a)),
    "map": lambda a: isinstance(a, dict) and all(map(_SHAPES["schema"], a.values())),
    "names": lambda a: isinstance(a, list) and all(isinstance(name, str) for name in a),
    "deps": lambda a: isinstance(a, dict) and all(map(_SHAPES["names"], a.values())),
    "types": lambda a: all(isinstance(name, str) and name in _TYPES
                           for name in (a if isinstance(a, list) else [a])),
}
# Keywords whose meaning needs what this checker does not track (which keys and items
# the other keywords evaluated, dynamic scopes, anchors): refused, never ignored.
_REFUSED: Final = frozenset({"unevaluatedProperties", "unevaluatedItems", "$dynamicRef",
                             "$dynamicAnchor", "$anchor"})
_PLAIN_KEY: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Spec: patterns are ECMA-262, where $ is the very end (Python's $ also matches before a
# final newline): each $ outside an escape or a [class] becomes \Z.
_DOLLAR: Final = re.compile(r"\\.|\[(?:\\.|[^\]\\])*\]|\$", re.DOTALL)
_MAX_SHOWN: Final = 40  # characters of a value quoted in a message sent back to the model
_MAX_OPTIONS: Final = 10  # enum values listed in such a message


def _validate(value: Any, schema: Any) -> str | None:
    """The first way `value` breaks `schema` (JSON Schema 2020-12, vetted by _vet_schema),
    as one short message naming the path, what was expected and what came; None when
    it conforms.

    E.g. '$.items[2].price: expected number, got string "12.5"', '$: missing required
    field "city"', '$.extra: unexpected field', '$.age: must be at most 150, got 400'.
    Never raises: a value nested too deeply to check is a mismatch, and so is a $ref
    loop that never ends.
    """
    try:
        return _Run(schema).check(value, schema, "$")
    except (RecursionError, LookupError):  # LookupError: a $ref _vet_schema refuses
        return "$: nested too deeply to check"


def _vet_schema(schema: Any, where: str) -> None:
    """Raise ConfigError(f"{where}: ...") naming the first keyword of `schema` that this
    checker would not check exactly as JSON Schema 2020-12 says: a refused one (_REFUSED,
    $id below the root, a $ref that is not a pointer into the schema or does not
    resolve), a regex Python cannot compile, a value of the wrong shape. Walks every
    subschema, $defs and $ref targets included; raises nothing else."""
    todo, seen = [schema], set()
    while todo:
        node = todo.pop()
        if not isinstance(node, bool) and id(node) not in seen:
            seen.add(id(node))
            todo.extend(reversed(_vet_node(node, schema, where)))


def _vet_node(node: Any, root: Any, where: str) -> list[Any]:
    """Vet one schema's own keywords; return its subschemas (and $ref target)."""
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: a JSON Schema is an object or a boolean, got {_describe(node)}")
    inner: list[Any] = []
    for keyword, arg in node.items():
        shape = _KEYWORDS.get(keyword, _ANNOTATION)[0]
        try:
            if keyword in _REFUSED or keyword == "$id" and node is not root:
                raise LookupError(f"{'below the root ' * (keyword == '$id')}is not supported "
                                  "by this module's checker; leave it out")
            if not _SHAPES[shape](arg):
                raise LookupError(f"cannot be {_short(arg)} (see JSON Schema 2020-12)")
            for pattern in {"pattern": [arg], "patternProperties": arg}.get(keyword, ()):
                _regex(pattern)
            inner += [_pointer(root, arg)] if keyword == "$ref" else []
        except (LookupError, re.error, OverflowError, RecursionError, ValueError) as exc:
            why = exc if isinstance(exc, LookupError) else f"holds a regex Python cannot use ({exc})"
            raise ConfigError(f"{where}: JSON Schema keyword {keyword!r} {why}") from None
        inner += ([arg] if shape == "schema" else arg if shape == "schemas"
                  else list(arg.values()) if shape == "map" else [])
    return inner


def _pointer(root: Any, ref: str) -> Any:
    """The schema a '#' or '#/...' $ref names in `root`; LookupError saying why not.

    Spec: RFC 6901 in a URI fragment: percent-decoded, split at '/', then in each token
    '~1' is '/' and '~0' is '~'; an array is indexed by a decimal number.
    """
    if ref != "#" and not ref.startswith("#/"):
        raise LookupError(f"to {ref!r} is not supported by this module's checker; only '#' "
                          "and '#/...' pointers are (no remote document, anchor, relative URI)")
    target = root
    for token in urllib.parse.unquote(ref[2:]).split("/") if ref != "#" else ():
        token = token.replace("~1", "/").replace("~0", "~")
        index = int(token) if token.isascii() and token.isdigit() else -1
        target = (target.get(token, ...) if isinstance(target, dict) else target[index]
                  if isinstance(target, list) and 0 <= index < len(target) else ...)
    if isinstance(target, (dict, bool)):
        return target
    raise LookupError(f"{ref!r} does not point at a schema in the same document")


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    """A schema's pattern compiled for re.search, with ECMA-262's meaning where Python's
    differs: $ only at the very end, and \\d, \\w, \\b ASCII only (\\s then misses the
    rarer Unicode spaces ECMA-262 counts)."""
    return re.compile(_DOLLAR.sub(lambda m: r"\Z" if m.group() == "$" else m.group(),
                                  pattern), re.ASCII)


class _Run:
    """One check against one schema: the root its $ref pointers resolve in, and the
    ($ref target, value) pairs being checked, as meeting one again inside itself is a
    loop that would never end."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.active: set[tuple[int, int]] = set()

    def check(self, value: Any, schema: Any, path: str) -> str | None:
        """The first problem of `value` (found at `path`) against a subschema, or None:
        each keyword's step, for the values of the type it applies to."""
        if not isinstance(schema, dict):
            return f"{path}: unexpected value" if schema is False else None
        return _first(step(self, value, arg, schema, path) for keyword, arg in schema.items()
                      for _, kind, step in [_KEYWORDS.get(keyword, _ANNOTATION)]
                      if step and (not kind or _TYPES[kind](value)))


def _first(problems: Iterable[str | None]) -> str | None:
    """The first problem (the iterable is lazy, so checking stops there)."""
    return next((problem for problem in problems if problem is not None), None)


def _kinds(schema: Any) -> list[str]:
    """The type names a schema allows, [] when it does not say."""
    kinds = schema.get("type") if isinstance(schema, dict) else None
    return [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []


def _type(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """type: a name or a list of names, one of which the value must be."""
    if any(_TYPES[kind](value) for kind in _kinds(schema)):
        return None
    return f"{path}: expected {' or '.join(_kinds(schema))}, got {_describe(value)}"


def _options(arg: list[Any]) -> str:
    """An enum's values for a message: the first _MAX_OPTIONS of them."""
    more = ", ..." if len(arg) > _MAX_OPTIONS else ""
    return ", ".join(map(_short, arg[:_MAX_OPTIONS])) + more


def _required(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """required: the fields an object must have (the first missing one is named)."""
    missing = next((name for name in arg if name not in value), None)
    return None if missing is None else f"{path}: missing required field {_short(missing)}"


def _dependent_required(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """dependentRequired: the fields an object must have when it has a given one."""
    return _first(f"{problem} (required with {_short(key)})" for key, names in arg.items()
                  if key in value and (problem := _required(run, value, names, schema, path)))


def _properties(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """properties: each field it names matches that field's schema."""
    return _first(run.check(item, arg[key], _at(path, key))
                  for key, item in value.items() if key in arg)


def _pattern_properties(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """patternProperties: each field matches the schema of every regex its name matches."""
    return _first(run.check(item, sub, _at(path, key)) for key, item in value.items()
                  for pattern, sub in arg.items() if _regex(pattern).search(key))


def _additional(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """Spec: additionalProperties applies to the keys that properties and
    patternProperties (of the same schema) do not name."""
    return _first(f"{_at(path, key)}: unexpected field" if arg is False else
                  run.check(value[key], arg, _at(path, key))
                  for key in value if not _named(schema, key))


def _property_names(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """propertyNames: each field name, a string, matches the schema."""
    return _first(run.check(key, arg, f"{_at(path, key)}: field name") for key in value)


def _dependent_schemas(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """dependentSchemas: an object that has a given field matches that field's schema."""
    return _first(run.check(value, sub, path) for key, sub in arg.items() if key in value)


def _items(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """Spec (2020-12): prefixItems (arg a list) describes the first elements one by one,
    items the elements after those."""
    start = 0 if isinstance(arg, list) else len(schema.get("prefixItems", ()))
    subs = arg if isinstance(arg, list) else [arg] * len(value)
    return _first(run.check(item, sub, f"{path}[{index}]")
                  for index, (item, sub) in enumerate(zip(value[start:], subs), start))


def _contains(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """Spec: minContains (1 when not given) and maxContains bound how many items match."""
    found = sum(run.check(item, arg, path) is None for item in value)
    least, most = schema.get("minContains", 1), schema.get("maxContains", found)
    if least <= found <= most:
        return None
    bound = f"at least {_short(least)}" if found < least else f"at most {_short(most)}"
    return f"{path}: must hold {bound} items that match contains, got {found}"


def _is_multiple(value: Any, step: Any) -> bool:
    """Whether value / step is a whole number, exactly: each number taken as the decimal
    it is written as (0.01 is 1/100, not the binary float nearest to it), as a ratio of
    integers. One that cannot be decided (inf, nan, a step of 0) is no multiple."""
    try:
        (top, bottom), (step_top, step_bottom) = [
            Decimal(x if isinstance(x, int) else repr(x)).as_integer_ratio() for x in (value, step)]
        return top * step_bottom % (bottom * step_top) == 0
    except (ValueError, OverflowError, ZeroDivisionError):
        return False


def _rule(holds: Callable[[Any, Any], Any], words: str, measure: Callable[[Any], Any] | None = None,
          show: Callable[[Any], str] | None = None) -> _Keyword:
    """The step of a keyword that is met when holds(value, its argument) (or the value's
    measure: minLength's len); `words` say what must hold, in a message, and `show`
    how the argument reads there."""
    def step(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
        got = value if measure is None else measure(value)
        return None if holds(got, arg) else (
            f"{path}: must {words.format((show or _short)(arg))}, got {_short(got)}")
    return step


def _all_of(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """allOf: the value matches every schema."""
    return _first(run.check(value, option, path) for option in arg)


def _any_of(run: _Run, value: Any, arg: Any, schema: Any, path: str, one: bool = False
            ) -> str | None:
    """anyOf, and oneOf when `one`: checking stops at the first option that matches
    (the second, for oneOf). When none does, the problem of the option whose type fits
    (it failed deeper in: a field, an enum) says most; else every type allowed."""
    problems: list[str | None] = []
    for option in arg:
        problems.append(run.check(value, option, path))
        if problems.count(None) > one:
            break
    matched = [str(index) for index, problem in enumerate(problems) if problem is None]
    if matched:
        return None if len(matched) == 1 else (
            f"{path}: must match one schema of oneOf, matched {' and '.join(matched)}")
    fits = [p for option, p in zip(arg, problems)
            if _kinds(option) and _type(run, value, None, option, path) is None]
    if fits or not all(map(_kinds, arg)):
        return (fits or problems)[0]
    allowed = [*dict.fromkeys(kind for option in arg for kind in _kinds(option))]
    return _type(run, value, None, {"type": allowed}, path)


def _not(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """not: the value does not match the schema."""
    return None if run.check(value, arg, path) is not None else (
        f"{path}: must not match {_short(arg)}, got {_short(value)}")


def _if(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """if: a value that matches it must match then, one that does not must match else."""
    branch = "then" if run.check(value, arg, path) is None else "else"
    return run.check(value, schema.get(branch, True), path)


def _ref(run: _Run, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """Spec (2020-12): $ref applies beside its sibling keywords, not instead of them.
    The same target on the same value again, inside itself, is a loop without end."""
    key = (id(target := _pointer(run.root, arg)), id(value))
    if key in run.active:
        return f"{path}: the schema loops through $ref {_short(arg)} without end"
    run.active.add(key)
    problem = run.check(value, target, path)
    run.active.discard(key)
    return problem


_Keyword = Callable[[_Run, Any, Any, Any, str], "str | None"]

# Every keyword this checker knows: (the shape its value must have, see _SHAPES; the
# JSON type it applies to, "" for any; the step that checks it, None for one that only
# holds schemas or is read by another step). Any other keyword is an annotation
# (format, title, description, default, ...): not asserted, as the spec says.
_KEYWORDS: Final[dict[str, tuple[str, str, _Keyword | None]]] = {
    "type": ("types", "", _type),
    "enum": ("array", "", _rule(lambda value, arg: _key(value) in map(_key, arg),
                                "be one of {}", show=_options)),
    "const": ("any", "", _rule(lambda value, arg: _key(value) == _key(arg), "be {}")),
    "required": ("names", "object", _required), "properties": ("map", "object", _properties),
    "dependentRequired": ("deps", "object", _dependent_required),
    "minProperties": ("integer", "object", _rule(operator.ge, "have at least {} fields", len)),
    "maxProperties": ("integer", "object", _rule(operator.le, "have at most {} fields", len)),
    "patternProperties": ("map", "object", _pattern_properties),
    "additionalProperties": ("schema", "object", _additional),
    "propertyNames": ("schema", "object", _property_names),
    "dependentSchemas": ("map", "object", _dependent_schemas),
    "minItems": ("integer", "array", _rule(operator.ge, "have at least {} items", len)),
    "maxItems": ("integer", "array", _rule(operator.le, "have at most {} items", len)),
    "uniqueItems": ("boolean", "array", _rule(
        lambda value, arg: not arg or len(set(map(_key, value))) == len(value), "hold unique items")),
    "prefixItems": ("schemas", "array", _items), "items": ("schema", "array", _items),
    "contains": ("schema", "array", _contains),
    "minLength": ("integer", "string", _rule(operator.ge, "have at least {} characters", len)),
    "maxLength": ("integer", "string", _rule(operator.le, "have at most {} characters", len)),
    "pattern": ("string", "string", _rule(lambda value, arg: _regex(arg).search(value),
                                          "match the pattern {}")),
    "minimum": ("number", "number", _rule(operator.ge, "be at least {}")),
    "maximum": ("number", "number", _rule(operator.le, "be at most {}")),
    "exclusiveMinimum": ("number", "number", _rule(operator.gt, "be greater than {}")),
    "exclusiveMaximum": ("number", "number", _rule(operator.lt, "be less than {}")),
    "multipleOf": ("number", "number", _rule(_is_multiple, "be a multiple of {}")),
    "allOf": ("schemas", "", _all_of), "anyOf": ("schemas", "", _any_of),
    "oneOf": ("schemas", "", functools.partial(_any_of, one=True)),
    "not": ("schema", "", _not), "if": ("schema", "", _if), "$ref": ("string", "", _ref),
    "then": ("schema", "", None), "else": ("schema", "", None),
    "minContains": ("integer", "", None), "maxContains": ("integer", "", None),
    # definitions: draft 7's $defs, which many generators still write.
    "$defs": ("map", "", None), "definitions": ("map", "", None),
}
_ANNOTATION: Final = ("any", "", None)


def _prune_nulls(value: Any, schema: Any) -> tuple[Any, bool]:
    """`value` without the nulls that mean "left out", and whether there were any.

    At any depth, a key that a schema describing its object lists in properties and no
    such schema requires, whose value is null where that property's schema rejects null,
    is removed (models send null for an argument they leave out). The schemas describing
    a value are followed through $ref, allOf/anyOf/oneOf, properties,
    additionalProperties, prefixItems and items. `value` itself is not changed.
    """
    try:
        return _prune(value, [schema], _Run(schema))
    except (LookupError, RecursionError):
        return value, False


def _prune(value: Any, schemas: list[Any], run: _Run) -> tuple[Any, bool]:
    """_prune_nulls below the root: `value` and the schemas that describe it."""
    if not isinstance(value, (list, dict)):
        return value, False
    found = list(_described(schemas, run, {}).values())
    keys = range(len(value)) if isinstance(value, list) else [
        key for key, item in value.items() if item is not None or not _left_out(key, found, run)]
    inner = {key: _prune(value[key], [_inner(s, key) for s in found], run) for key in keys}
    pruned = [item for item, _ in inner.values()] if isinstance(value, list) else {
        key: item for key, (item, _) in inner.items()}
    return pruned, len(inner) < len(value) or any(changed for _, changed in inner.values())


def _described(schemas: list[Any], run: _Run, found: dict[int, Any]) -> dict[int, Any]:
    """The schemas that apply to a value in place: these, their $ref targets and the
    branches of their allOf, anyOf and oneOf, each once (by id)."""
    for schema in schemas:
        if isinstance(schema, dict) and id(schema) not in found:
            found[id(schema)] = schema
            refs = [_pointer(run.root, schema["$ref"])] if "$ref" in schema else []
            _described([*schema.get("allOf", ()), *schema.get("anyOf", ()),
                        *schema.get("oneOf", ()), *refs], run, found)
    return found


def _left_out(key: str, found: list[dict[str, Any]], run: _Run) -> bool:
    """Whether null for `key` means "left out": a schema lists it as a property whose
    schema rejects null, and none requires it."""
    optional = any(key in s.get("properties", {}) and run.check(None, s["properties"][key], "$")
                   for s in found)
    return optional and not any(key in s.get("required", ()) for s in found)


def _inner(schema: dict[str, Any], key: Any) -> Any:
    """The schema of an item (`key` an index: prefixItems, items) or of a field
    (properties; patternProperties, as True; additionalProperties); None if none."""
    if isinstance(key, int):
        before = schema.get("prefixItems", ())
        return before[key] if key < len(before) else schema.get("items")
    named = schema.get("properties", {}).get(key, _named(schema, key) or None)
    return schema.get("additionalProperties") if named is None else named


def _named(schema: dict[str, Any], key: str) -> bool:
    """Whether properties or patternProperties of `schema` name the field `key`."""
    return key in schema.get("properties", {}) or any(
        _regex(pattern).search(key) for pattern in schema.get("patternProperties", ()))


def _at(path: str, key: Any) -> str:
    """The path of a field: $.name for a plain key, $["odd key"] for any other."""
    plain = isinstance(key, str) and _PLAIN_KEY.match(key)
    return f"{path}.{key}" if plain else f"{path}[{_short(key)}]"


def _key(value: Any) -> Any:
    """A hashable stand-in that is equal for JSON-equal values: 1 and 1.0 alike, true
    and 1 not, arrays and objects item by item."""
    if isinstance(value, dict):
        return dict, frozenset((key, _key(item)) for key, item in value.items())
    return (list, tuple(map(_key, value))) if isinstance(value, list) else (
        (bool, value) if isinstance(value, bool) else value)


def _describe(value: Any) -> str:
    """What came, for a message: 'string "12.5"', 'integer 3', 'null'."""
    kind = next((name for name, test in _TYPES.items() if test(value)), type(value).__name__)
    return "null" if value is None else f"{kind} {_short(value)}"


def _short(value: Any) -> str:
    """A value as JSON, cut to _MAX_SHOWN characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (ValueError, RecursionError):  # an int of over 4300 digits; a value nested deeply
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."


# ==== Streaming ====
# A model call's answer is read as a chain, each link a small generator or function
# with no I/O but the first: _iter_raw (response bytes as they arrive) -> _iter_lines
# (whole, LF-terminated lines) -> _iter_sse (sseclient-py's events) -> _iter_chunks
# (payload dicts, [DONE], in-stream errors) -> _Accumulator.add (the Chunks).
# A non-streamed answer goes through _whole_answer and the same _Accumulator.
# Each link that absorbs a deviation from OpenAI's behaviour tells the Client's quirk
# sink (a `quirk` argument, or the _Accumulator's), only in the branch that absorbs it.


def _iter_chunks(events: Iterable[sseclient.Event], acc: _Accumulator) -> Iterator[Chunk]:
    """The Chunks of one model call from its SSE events; `acc` keeps its state.

    Raises StreamError for malformed JSON, and the classified error for an error
    the server sent inside the stream. Stops at [DONE] (acc.done).
    """
    add = acc.add
    for event in events:
        acc.seen = True
        data = event.data
        if data[:1] != "{":
            stripped = data.strip()
            if stripped.startswith("[DONE]"):
                if data != "[DONE]":
                    # Quirk(several servers): a space before [DONE], or padding after it.
                    acc.quirk("spaces around [DONE]")
                acc.done = True
                return
            if not stripped.startswith("{"):
                # Quirk(gateways): data lines of their own that are not JSON are skipped.
                acc.quirk("non-JSON data in streams skipped")
                _log.debug("skipping a stream event that is not JSON: %.80r", stripped)
                continue
            data = stripped
        try:
            payload = json.loads(data)
        except ValueError:
            raise StreamError("the stream was cut short or sent malformed JSON") from None
        if event.event == "error" or "error" in payload or payload.get("object") == "error":
            error = _stream_error(payload, data, event.event == "error", acc.quirk)
            if error is not None:
                raise error
        if acc.model is None:
            acc.model = payload.get("model") or ""
        got = add(payload)
        if got is not None:
            if isinstance(got, list):
                yield from got
            else:
                yield got


def _whole_answer(payload: Any, step: int, quirk: Callable[[str], None] = _no_quirk
                  ) -> tuple[list[Chunk], Step]:
    """The Chunks and the Step of a non-streamed answer (pure)."""
    if not isinstance(payload, dict) or payload.get("error") or payload.get("object") == "error":
        raise _error_from_body(200, json.dumps(payload), quirk=quirk)
    choices = payload.get("choices")
    choice = _choice_zero(choices) if isinstance(choices, list) else None
    if choice is None:
        raise APIError("the server answered without choices: " + _trim_message(
            json.dumps(payload)))
    acc = _Accumulator(step, quirk, streamed=False)
    got = acc.delta(choice.get("message") or choice.get("delta") or {}, payload)
    acc.usage = payload.get("usage") or acc.usage
    acc.finish_reason = choice.get("finish_reason") or "stop"
    chunks = got if isinstance(got, list) else [got] if got is not None else []
    return chunks, acc.finish()


def _finish_chunk(record: Step, step: int) -> Chunk:
    return Chunk("finish", finish_reason=record.finish_reason, usage=record.usage, step=step)


# Quirk(TGI < 2.3, TGI stop strings, Anthropic-compat): other names for a normal stop.
_STOP_ALIASES: Final = frozenset({"eos_token", "eos", "stop_sequence", "end_turn", "end"})


class _Accumulator:
    """One model call while its events arrive: text, reasoning, refusal, tool calls,
    usage, finish_reason, the model that answered, and how the stream ended.

    NOTE: add() runs once per event. Its common case (one text delta) costs a few
    dict lookups and one Chunk; anything rarer goes through _mixed_delta.
    `quirk` hears of each deviation absorbed; `streamed`: False for a whole answer.
    """

    __slots__ = ("calls", "done", "finish_reason", "model", "quirk", "reasoning", "refusal",
                 "seen", "step", "text", "usage")

    def __init__(self, step: int, quirk: Callable[[str], None] = _no_quirk,
                 streamed: bool = True) -> None:
        self.step = step
        self.quirk = quirk
        self.text = _TextBuffer()
        self.reasoning = _TextBuffer()
        self.refusal = _TextBuffer()
        self.calls = _CallAssembler(quirk, streamed)
        self.usage: Any = None
        self.finish_reason: str | None = None
        self.model: str | None = None  # the "model" of the first event, "" if none
        self.seen = False  # any event at all
        self.done = False  # [DONE] arrived

    def add(self, payload: dict[str, Any]) -> Chunk | list[Chunk] | None:
        """Take one decoded event; return its Chunk, a list of them, or None."""
        usage = payload.get("usage")
        choices = payload.get("choices")
        if usage:
            self.usage = usage
            if choices:
                # Quirk(vLLM continuous usage, LiteLLM, Groq, Mistral): OpenAI sends usage
                # alone, in a last chunk whose choices are [].
                self.quirk("usage chunk with choices")
        if not choices:
            return None
        choice = choices[0]
        if len(choices) > 1 or not isinstance(choice, dict) or choice.get("index"):
            # Quirk(OpenAI and vLLM with n > 1): choices interleave; follow index 0.
            choice = _choice_zero(choices)
            if choice is None:
                return None
        delta = choice.get("delta") or choice.get("message")
        got = self.delta(delta, payload) if delta else None
        reason = choice.get("finish_reason")
        if reason:
            if reason == "error":
                # Quirk(OpenRouter): finish_reason "error" with the error at top level.
                self.quirk("finish_reason 'error' for an error")
                raise StreamError("the server ended the answer with an error")
            self.finish_reason = reason
        return got

    def delta(self, delta: Any, raw: Any) -> Chunk | list[Chunk] | None:
        """The Chunks of one delta (or a whole message)."""
        if not isinstance(delta, dict):
            return None
        content = delta.get("content")
        if content.__class__ is str and not (
            delta.get("reasoning_content") or delta.get("reasoning") or delta.get("refusal")
            or delta.get("tool_calls") or delta.get("function_call")
        ):
            if not content:
                return None
            self.text.write(content)
            return _delta_chunk("text", content, self.step, raw)
        return self._mixed_delta(delta, content, raw)

    def _mixed_delta(self, delta: dict[str, Any], content: Any, raw: Any) -> list[Chunk]:
        chunks = self._content_parts(content, raw) if content else []
        # Quirk(DeepSeek, vLLM, llama.cpp: reasoning_content; Ollama, Groq, OpenRouter:
        # reasoning): OpenAI streams no reasoning text.
        reasoning = delta.get("reasoning_content")
        where = "reasoning in reasoning_content"
        if not reasoning:
            reasoning = delta.get("reasoning")
            where = "reasoning in reasoning"
        if reasoning and isinstance(reasoning, str):
            self.quirk(where)
            self.reasoning.write(reasoning)
            chunks.append(_delta_chunk("reasoning", reasoning, self.step, raw))
        refusal = delta.get("refusal")
        if refusal and isinstance(refusal, str):
            # OpenAI's structured refusal: shown like text, kept apart from the answer.
            self.refusal.write(refusal)
            chunks.append(_delta_chunk("refusal", refusal, self.step, raw))
        # Quirk(llama-cpp-python): a legacy function_call beside tool_calls with the
        # same content; used only when no tool_calls come with it (as the one call).
        calls = delta.get("tool_calls")
        if calls:
            self.calls.add(calls)
            if delta.get("function_call"):
                self.quirk("legacy function_call beside tool_calls")
        elif delta.get("function_call"):
            self.quirk("legacy function_call instead of tool_calls")
            self.calls.add([{"index": 0, "function": delta["function_call"]}])
        return chunks

    def _content_parts(self, content: Any, raw: Any) -> list[Chunk]:
        if isinstance(content, str):
            self.text.write(content)
            return [_delta_chunk("text", content, self.step, raw)]
        chunks = []
        # Quirk(Mistral magistral): content is a list of typed parts; "thinking"
        # parts hold reasoning as a nested list of text parts.
        self.quirk("content as a list of parts")
        for part in content if isinstance(content, list) else [content]:
            if isinstance(part, str):
                text, kind = part, "text"
            elif isinstance(part, dict):
                kind = "reasoning" if part.get("type") in ("thinking", "reasoning") else "text"
                inner = part.get("thinking") if kind == "reasoning" else part.get("text")
                if isinstance(inner, list):
                    inner = "".join(p.get("text", "") for p in inner if isinstance(p, dict))
                text = inner if isinstance(inner, str) else ""
            else:
                continue
            if text:
                (self.text if kind == "text" else self.reasoning).write(text)
                chunks.append(_delta_chunk("text" if kind == "text" else "reasoning", text,
                                           self.step, raw))
        return chunks

    def finish(self) -> Step:
        """The model call's Step (its tool results are added by the loop)."""
        calls = self.calls.finish()
        reason = self.finish_reason
        if reason in _STOP_ALIASES:
            self.quirk(f"finish_reason {reason!r} for stop")
            reason = "stop"
        elif reason is None:
            reason = "tool_calls" if calls else "stop"
        return Step(self.text.getvalue(), self.reasoning.getvalue(), calls, [], reason,
                    _usage(self.usage), self.refusal.getvalue())


class _TextBuffer:
    """Appends text deltas; memory stays about the size of the text itself.

    A plain list (or StringIO, which keeps one internally) holds one str object
    per event, about ten times the text for short deltas: 6.7 MB for 100,000
    events here. Every 1,024 pieces are joined into one block instead.
    """

    __slots__ = ("blocks", "pieces")

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.pieces: list[str] = []

    def write(self, text: str) -> None:
        pieces = self.pieces
        pieces.append(text)
        if len(pieces) >= 1024:
            self.blocks.append("".join(pieces))
            pieces.clear()

    def getvalue(self) -> str:
        # One join, kept as the only block: `a + b` over two joins held three copies
        # of the text at the peak.
        if self.pieces:
            self.blocks.append("".join(self.pieces))
            self.pieces.clear()
        if len(self.blocks) > 1:
            self.blocks[:] = ["".join(self.blocks)]
        return self.blocks[0] if self.blocks else ""


def _choice_zero(choices: list[Any]) -> dict[str, Any] | None:
    """The choice with index 0 (or none): with n > 1 (OpenAI, vLLM) chunks of several
    choices interleave, and only the first answer is followed, never braided."""
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index") in (None, 0, "0"):
            return choice
    return None


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None

    def count(key: str) -> int:
        value = raw.get(key)
        return value if isinstance(value, int) else 0

    prompt, completion = count("prompt_tokens"), count("completion_tokens")
    return Usage(prompt, completion, count("total_tokens") or prompt + completion, raw)


class _CallAssembler:
    """Builds tool calls from streamed fragments, whatever the server.

    A delta with a new non-empty id starts a call (even when its index is reused);
    a known id continues its call (TGI and llama-cpp-python repeat it); without an
    id, the call with the same index continues; with neither, the latest call. The
    index is a key, never a list position (it may start at 1 or be missing). Names
    are set once, from the first non-empty value (TGI repeats it, LM Studio later
    sends ""). Arguments are only appended; calls are finished when the model call
    ends, never early because a prefix happens to parse. `quirk` hears of each
    deviation; `streamed`: False for a whole answer, whose calls have no index.
    """

    def __init__(self, quirk: Callable[[str], None] = _no_quirk, streamed: bool = True) -> None:
        self.quirk = quirk
        self.streamed = streamed
        self.calls: list[_PartialCall] = []
        self.by_id: dict[str, _PartialCall] = {}
        self.by_index: dict[Any, _PartialCall] = {}

    def add(self, deltas: Any) -> None:
        # Quirk(TGI < 3.2): tool_calls is one object, not a list.
        if not isinstance(deltas, list):
            self.quirk("tool_calls as one object, not a list")
            deltas = [deltas]
        for position, delta in enumerate(deltas):
            if isinstance(delta, dict):
                self._add_one(delta, position)

    def _add_one(self, delta: dict[str, Any], position: int) -> None:
        call_id = delta.get("id")
        call_id = str(call_id) if call_id not in (None, "") else ""
        index = delta.get("index")
        call = self.by_id.get(call_id) if call_id else None
        if call is None:
            if index is None and self.streamed:
                # Quirk(Gemini, Mistral, LM Studio).
                self.quirk("tool calls streamed without index")
            if not call_id and index in self.by_index:
                call = self.by_index[index]
            elif not call_id and index is None and self.calls and not (
                position or self._names_another_call(delta)
            ):
                call = self.calls[-1]
            else:
                if index is not None and index in self.by_index:
                    # Quirk(proxies): index 0 for every call, each with its own id.
                    self.quirk("tool call index reused for another call")
                call = _PartialCall(call_id)
                self.calls.append(call)
                if call_id:
                    self.by_id[call_id] = call
            if index is not None:
                self.by_index[index] = call
        else:
            # Quirk(TGI, llama-cpp-python, LiteLLM): OpenAI sends the id once.
            self.quirk("tool call id repeated on later deltas")
        function = delta.get("function")
        if isinstance(function, dict):
            name = function.get("name")
            if name and isinstance(name, str):
                if not call.name:
                    call.name = name
                else:
                    # Quirk(llama-cpp-python, LiteLLM): the whole name on every delta.
                    self.quirk("tool call name repeated")
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call.parts.append(arguments)
            elif isinstance(arguments, (dict, list)):
                # Quirk(TGI < 3.2): arguments as a JSON object, not a string.
                self.quirk("tool arguments as an object, not a string")
                call.parts.append(json.dumps(arguments))
        for key, value in delta.items():
            if key not in ("index", "id", "type", "function") and value is not None:
                call.extra.setdefault(key, value)

    def _names_another_call(self, delta: dict[str, Any]) -> bool:
        # Quirk(LM Studio, Gemini through proxies): calls with "id": "" and no index.
        # A name where the latest call already has one starts the next call; servers
        # that repeat a name on every delta also repeat an id or an index.
        function = delta.get("function")
        return bool(self.calls[-1].name and isinstance(function, dict) and function.get("name"))

    def finish(self) -> list[ToolCall]:
        # Each result goes back under its call's id: made-up ids must be unique too.
        taken = set(self.by_id)
        for call in self.calls:
            if not call.id:
                # Quirk(LM Studio, Gemini through proxies, TGI < 3.2).
                self.quirk("tool calls without ids: ids made up")
                call.id = _new_call_id()
                while call.id in taken:
                    call.id = _new_call_id()
                taken.add(call.id)
        indexes = [i for i in self.by_index if isinstance(i, int)]
        if self.streamed and indexes and min(indexes) > 0:
            # Quirk(Anthropic-compat, LiteLLM -> Bedrock): the index is a key, not a position.
            self.quirk(f"tool call index starting at {min(indexes)}")
        return [_finish_call(call, self.quirk) for call in self.calls]


class _PartialCall:
    __slots__ = ("extra", "id", "name", "parts")

    def __init__(self, call_id: str) -> None:
        self.id = call_id
        self.name = ""
        self.parts: list[str] = []
        self.extra: dict[str, Any] = {}


def _finish_call(call: _PartialCall, quirk: Callable[[str], None] = _no_quirk) -> ToolCall:
    raw = "".join(call.parts)
    name = call.name
    arguments, error = _parse_arguments(raw, quirk)
    if not name and isinstance(arguments, dict) and isinstance(arguments.get("function"), dict):
        # Quirk(TGI < 3.2): no name; the raw grammar output wraps the arguments as
        # {"function": {"_name": "get_weather", ...}} (plus a special token).
        quirk("tool name inside the arguments (_name)")
        inner = dict(arguments["function"])
        name = str(inner.pop("_name", ""))
        arguments = inner
    return ToolCall(call.id, name, arguments or {}, raw, error, call.extra)


def _new_call_id() -> str:
    # Nine letters and digits: the form Mistral requires of ids sent back to it.
    return "".join(random.choices(_ID_ALPHABET, k=9))


def _parse_arguments(raw: str, quirk: Callable[[str], None] = _no_quirk
                     ) -> tuple[dict[str, Any], str | None]:
    text = raw.strip()
    if not text:
        return {}, None
    try:
        value = json.loads(text)
    except ValueError as exc:
        # Quirk(llama-cpp-python, small models): a raw newline or tab inside a string,
        # which strict JSON forbids but whose meaning is plain. Quirk(TGI < 3.2): the
        # raw output ends in a special token such as <|eot_id|>.
        trimmed = re.sub(r"(?:<\|[^|>]*\|>|</s>)+\s*$", "", text)
        try:
            value = json.loads(trimmed, strict=False)
        except ValueError:
            return {}, f"arguments are not valid JSON ({exc})"
        raw_newlines = trimmed == text
        if not raw_newlines:
            quirk("special token after tool arguments")
            try:
                json.loads(trimmed)
            except ValueError:
                raw_newlines = True
        if raw_newlines:
            quirk("raw newlines in tool arguments")
    if isinstance(value, str):
        # Quirk(gateways that re-encode a provider's call): the arguments string is
        # itself a JSON string.
        try:
            value = json.loads(value)
        except ValueError:
            pass
        else:
            quirk("tool arguments encoded twice")
    if not isinstance(value, dict):
        return {}, f"arguments must be a JSON object, got {type(value).__name__}"
    return value, None


def _iter_sse(chunks: Iterable[bytes], quirk: Callable[[str], None] = _no_quirk
              ) -> Iterator[sseclient.Event]:
    """The SSE events in body bytes, parsed by sseclient-py from whole lines."""
    return sseclient.SSEClient(_iter_lines(chunks, quirk=quirk)).events()


_BOM: Final = b"\xef\xbb\xbf"
_LEGACY_ERROR_LINE: Final = re.compile(rb"(?m)^error:")


def _iter_lines(chunks: Iterable[bytes], limit: int = _MAX_EVENT_BYTES,
                quirk: Callable[[str], None] = _no_quirk) -> Iterator[bytes]:
    """Regroup body bytes into blocks of whole, LF-terminated lines for sseclient-py.

    Normalises CRLF and lone CR to LF as bytes arrive (also when a CRLF is split),
    drops a leading BOM (also when split), turns llama.cpp's legacy `error: {...}`
    line into an `event: error` with data, and raises StreamError when one event
    grows past `limit` bytes. A partial last line at EOF is passed on terminated,
    so a truncated event reaches the JSON parser and fails there, loudly. `quirk`
    hears of CR line endings, a BOM and legacy error lines.
    """
    tail: list[bytes] = []  # the unfinished last line, in pieces (no quadratic joins)
    tail_size = 0
    open_size = 0  # bytes of the event under way, before the tail
    skip_lf = False
    for chunk in _without_bom(chunks, quirk):
        if skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        skip_lf = False
        if b"\r" in chunk:
            # Quirk(sse-starlette, Azure, proxies): OpenAI ends lines with LF alone.
            quirk("CR or CRLF line endings in streams")
            # A CR at the end may be half of a CRLF: emit it as LF now (no delay for
            # CR-only servers) and drop an LF that starts the next chunk.
            skip_lf = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        cut = chunk.rfind(b"\n") + 1
        if cut:
            block = b"".join([*tail, chunk[:cut]]) if tail else chunk[:cut]
            rest = chunk[cut:]
            tail = [rest] if rest else []
            tail_size = len(rest)
            open_size = _open_event_size(block, open_size, limit)
            if b"error:" in block:
                # Quirk(llama.cpp, older builds): `error: {...}` instead of a data line.
                block, count = _LEGACY_ERROR_LINE.subn(b"event: error\ndata:", block)
                if count:
                    quirk("legacy `error:` lines in streams")
            yield block
        else:
            tail.append(chunk)
            tail_size += len(chunk)
        if open_size + tail_size > limit:
            raise _event_too_large(limit)
    if tail:
        yield b"".join(tail) + b"\n"


def _without_bom(chunks: Iterable[bytes], quirk: Callable[[str], None] = _no_quirk
                 ) -> Iterator[bytes]:
    # Spec (WHATWG server-sent events): a UTF-8 BOM before the first event is
    # skipped, also when split across reads; sseclient-py would drop that event.
    # OpenAI sends none, so it is noted.
    chunks = iter(chunks)
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) < len(_BOM) and _BOM.startswith(head):
            continue
        if head.startswith(_BOM):
            quirk("BOM before the first event")
            head = head[len(_BOM):]
        yield head
        break
    yield from chunks


def _open_event_size(block: bytes, open_size: int, limit: int) -> int:
    """Bytes of the event still open after `block` (whole lines), given those before
    it; raises StreamError when an event that ends in it was larger than `limit`."""
    first = block.find(b"\n\n")
    if first >= 0 and open_size + first > limit:
        raise _event_too_large(limit)
    last = block.rfind(b"\n\n")
    if last >= 0:
        return len(block) - last - 2
    if block[:1] == b"\n":  # the blank line that ends an event opens this block
        return len(block) - 1
    return open_size + len(block)


def _event_too_large(limit: int) -> StreamError:
    return StreamError(f"one stream event is larger than {limit} bytes")


def _iter_raw(response: requests.Response) -> Iterator[bytes]:
    """Yield body bytes as soon as the socket has them, whatever the framing.

    urllib3's read1 returns what has arrived (decoded when gzip) instead of waiting
    for a full buffer, which iter_content does on bodies that are not chunked.
    Transport failures become the module's errors here: a stream that breaks after
    its answer began is a StreamError (retrying would repeat what the caller has
    already seen), silence is a RequestTimeoutError.
    """
    raw = response.raw
    read1 = getattr(raw, "read1", None)
    try:
        if read1 is None:  # urllib3 < 2.2: one byte at a time is slow but never late
            yield from response.iter_content(1)
            return
        while True:
            data = read1(_READ_SIZE, decode_content=True)
            if not data:
                return
            yield data
    except (urllib3.exceptions.ReadTimeoutError, TimeoutError, requests.Timeout):
        raise RequestTimeoutError("the server went silent in the middle of the stream") from None
    except _TRANSPORT_ERRORS as exc:
        raise StreamError(
            f"the connection broke in the middle of the stream ({_transport_reason(str(exc))})"
        ) from None

# ==== HTTP plumbing ====


class _Connection:
    """One endpoint over HTTP: a pool of kept-alive connections, the headers,
    retries with backoff, the request fields the server refused, and the stamp
    (where from, key redacted) on every error a Client raises. `quirk` hears of the
    deviations absorbed here (the Client's quirk sink).
    """

    def __init__(self, config: Config, headers: Mapping[str, str] | None,
                 url_source: str, quirk: Callable[[str], None] = _no_quirk) -> None:
        self.config = config
        self.url_source = url_source
        self.quirk = quirk
        self.session = requests.Session()
        # requests keeps 10 connections per host and discards (with a warning) any
        # more that threads return; a Client shared by many threads keeps them all.
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=_POOL_SIZE)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.headers = {"User-Agent": f"openai-compat/{__version__}", **(headers or {})}
        if config.api_key:
            self.headers["Authorization"] = f"Bearer {config.api_key}"
        self.lock = threading.Lock()
        self.refused: set[str] = set()  # request fields never to send again
        # How this server is asked for an answer shaped by schema= (DESIGN.md,
        # "Structured answers"): 0 response_format json_schema; 1 json_object with the
        # schema, and the schema in a system message; 2 the system message only.
        # Stepped down, once per Client, when the server refuses the field.
        self.schema_rung = 0
        self.models_answer = ""  # what answered GET /models, for `openai-compat check`

    def close(self) -> None:
        self.session.close()

    def post(self, body: dict[str, Any], timeout: float,
             schema: dict[str, Any] | None = None) -> requests.Response:
        """POST body to /chat/completions; return a 2xx response (body not yet read).

        Retries connection failures and 408/409/429/5xx up to max_retries times with
        backoff; resends once, outside that budget, a request that failed because a
        kept-alive connection had been closed by the server; drops a field the server
        refused (tools, tool_choice, stream_options) once, and resends.
        """
        attempt = 0
        stale_resent = False
        loading_until: float | None = None
        loading_asks = 0
        while True:
            try:
                response = self._post_once(body, timeout)
            except _TRANSPORT_ERRORS as exc:
                if not stale_resent and _stale_connection(exc):
                    stale_resent = True
                    _log.debug("kept-alive connection was closed by the server; resending")
                    continue
                error = self.transport_error(exc, timeout, unstreamed=not body.get("stream"))
                # Connection failures (a connect timeout included) happened before the
                # server saw the request: safe to resend. A read timeout did not.
                if attempt < self.config.max_retries and isinstance(
                    exc, (requests.ConnectionError, ConnectionError)
                ):
                    attempt += 1
                    time.sleep(_backoff(attempt))
                    continue
                raise error from None
            if response.status_code < 300:
                return response
            with response:
                text = self.read_text(response)
            retry_after = _retry_after(response.headers)
            error = self.error_from_body(response.status_code, text, retry_after=retry_after)
            if self._drop_rejected_field(body, error) or (
                    schema is not None and self._step_down_schema(body, error, schema)):
                continue
            if _is_loading(error):
                # Waited for up to `timeout` in all, outside the retry budget.
                now = time.monotonic()
                if loading_until is None:
                    # Quirk(llama-server): 503 "Loading model" until the model is loaded.
                    self.quirk("waited for the model to load (503)")
                    loading_until = now + timeout
                    _log.warning("%s is loading its model (%s); waiting up to %g s",
                                 self.config.base_url, error.message, timeout)
                if now < loading_until:
                    loading_asks += 1
                    time.sleep(min(_LOADING_GAP, loading_until - now,
                                   _backoff(loading_asks) if retry_after is None else retry_after))
                    continue
            if not self._may_retry(error, attempt, retry_after):
                raise error
            attempt += 1
            _log.debug("HTTP %s; retry %d of %d", response.status_code, attempt,
                       self.config.max_retries)
            time.sleep(_backoff(attempt) if retry_after is None else retry_after)

    def _post_once(self, body: dict[str, Any], timeout: float) -> requests.Response:
        headers = {**self.headers, "Content-Type": "application/json"}
        if body.get("stream"):
            # A compressing proxy would batch the deltas; ask for none.
            headers["Accept-Encoding"] = "identity"
        return self.session.post(
            self.config.base_url + "/chat/completions",
            data=json.dumps(body, ensure_ascii=False).encode("utf-8"), headers=headers,
            timeout=(timeout, timeout), stream=True,
        )

    def _may_retry(self, error: APIError, attempt: int, retry_after: float | None) -> bool:
        status = error.status_code or 0
        return (
            (status in (408, 409, 429) or status >= 500)
            and error.retryable
            and attempt < self.config.max_retries
            and (retry_after is None or retry_after <= _MAX_RETRY_AFTER)
        )

    def ask_for_schema(self, body: dict[str, Any], schema: dict[str, Any]) -> None:
        """Ask for an answer shaped by `schema` the way this server takes it."""
        if self.schema_rung == 0:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": schema}}
            return
        body["messages"] = _with_schema_message(body["messages"], schema)
        if self.schema_rung == 1:
            # Quirk(llama.cpp, llama-cpp-python): a schema beside json_object is
            # enforced with a grammar.
            body["response_format"] = {"type": "json_object", "schema": schema}
        else:
            body.pop("response_format", None)

    def _step_down_schema(self, body: dict[str, Any], error: APIError,
                          schema: dict[str, Any]) -> bool:
        """One rung down when the server refused how the schema was asked for."""
        if "response_format" not in body or not _SCHEMA_REFUSED.search(error.message):
            return False
        rung = 1 if body["response_format"].get("type") == "json_schema" else 2
        with self.lock:
            self.schema_rung = max(self.schema_rung, rung)
        _log.warning("%s refused response_format %r (%s); asking %s from now on",
                     self.config.base_url, body["response_format"].get("type"), error.message,
                     "with json_object" if rung == 1 else "in a system message only")
        self.quirk("json_schema refused: json_object with the schema" if rung == 1
                   else "response_format refused: the schema in the system message")
        self.ask_for_schema(body, schema)
        return True

    def drop_refused_fields(self, body: dict[str, Any]) -> None:
        for name in tuple(self.refused):
            body.pop(name, None)

    def _drop_rejected_field(self, body: dict[str, Any], error: APIError) -> bool:
        """Drop a request field the server refused, remember it, and say so."""
        if error.status_code is None or (error.status_code >= 500 and "tools" not in body):
            return False
        name = next((field for field, pattern in _REJECTED_FIELDS
                     if field in body and pattern.search(error.message)), None)
        if name is None:
            return False
        _log.warning("%s rejected %s (%s); resending without it and not sending it again",
                     self.config.base_url, name, error.message)
        self.quirk("tools rejected: resent without them" if name == "tools"
                   else f"{name} rejected: dropped")
        dropped = ("tools", "tool_choice") if name == "tools" else (name,)
        with self.lock:
            self.refused.update(dropped)
        for field_name in dropped:
            body.pop(field_name, None)
        return True

    def get_text(self, path: str, seconds: float) -> tuple[int, str, float | None]:
        """GET base_url + path within `seconds` in all: status, body text, Retry-After."""
        started = time.monotonic()
        try:
            with self.session.get(self.config.base_url + path, headers=self.headers,
                                  timeout=seconds, stream=True) as response:
                server = response.headers.get("server")
                self.models_answer = (f"GET {path}: HTTP {response.status_code}"
                                      + (f" from {server}" if server else "")
                                      + f" in {time.monotonic() - started:.2f} s")
                body = bytearray()
                for piece in response.iter_content(8192):
                    body += piece
                    if time.monotonic() - started > seconds or len(body) > 8 * 1024 * 1024:
                        raise self.stamp(RequestTimeoutError(f"GET {path} took too long"))
                return (response.status_code, body.decode("utf-8", "replace"),
                        _retry_after(response.headers))
        except _TRANSPORT_ERRORS as exc:
            raise self.transport_error(exc) from None

    def read_text(self, response: requests.Response) -> str:
        """An error body, decoded and bounded; "" when it cannot be read."""
        try:
            raw = response.raw.read(_MAX_ERROR_BODY, decode_content=True) or b""
        except _TRANSPORT_ERRORS:
            raw = b""
        return raw.decode("utf-8", "replace")

    def read_json(self, response: requests.Response, timeout: float) -> Any:
        try:
            raw = response.content
        except _TRANSPORT_ERRORS as exc:
            raise self.transport_error(exc, timeout, unstreamed=True) from None
        try:
            return json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            raise self.stamp(APIError(
                "the server's answer is not JSON: " + _error_message(raw[:2000].decode(
                    "utf-8", "replace")), status_code=response.status_code,
            )) from None

    def error_from_body(self, status: int, text: str, message: str | None = None,
                        retry_after: float | None = None) -> APIError:
        return self.stamp(_error_from_body(status, text, message, retry_after, self.quirk))

    def transport_error(self, exc: BaseException, timeout: float | None = None,
                        unstreamed: bool = False) -> APIError:
        """The classified error for a transport failure. `timeout`: the silence limit the
        request had. `unstreamed`: the request asked for a whole answer, which servers
        send only once it is complete."""
        timeout = self.config.timeout if timeout is None else timeout
        if isinstance(exc, (requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)):
            return self.stamp(RequestTimeoutError(f"could not connect within {timeout:g} s"))
        if isinstance(exc, (requests.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return self.stamp(RequestTimeoutError(
                f"the server sent nothing for {timeout:g} s"
                + (" while composing a whole answer (non-streamed answers arrive only when"
                   " complete; stream() shows progress)" if unstreamed else "")))
        reason = _transport_reason(str(exc))
        # A broken chunked body is a connection that failed while reading, not one
        # that could not be made: the server had answered.
        if isinstance(exc, (requests.ConnectionError, ConnectionError)) and not isinstance(
            exc, requests.exceptions.ChunkedEncodingError
        ):
            return self.stamp(EndpointUnavailableError(f"cannot connect: {reason}"))
        return self.stamp(StreamError(f"the connection failed while reading: {reason}"))

    def stamp(self, exc: APIError) -> APIError:
        """Say where an error came from, and redact the key: every APIError a Client
        raises or returns passes here (the server may echo the key in its text)."""
        secret = self.config.api_key
        exc.message = _redact(exc.message, secret)
        exc.args = (exc.message,)
        if exc.body:
            exc.body = _redact(exc.body, secret)
        exc.base_url = exc.base_url or self.config.base_url
        exc._url_source = self.url_source
        return exc


def _with_schema_message(messages: list[dict[str, Any]],
                         schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The turns, asking in the system message for JSON that matches `schema`.

    Added to the first system message when there is one: several chat templates
    (llama.cpp's among them) refuse a second system message or one not first.
    """
    text = ("Answer with one JSON value and nothing else. It must match this JSON Schema: "
            + json.dumps(schema, ensure_ascii=False))
    first = messages[0] if messages else {}
    if first.get("role") == "system" and isinstance(first.get("content"), str):
        if text in first["content"]:
            return messages
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _stale_connection(exc: BaseException) -> bool:
    """Whether a request failed on a kept-alive connection the server had closed.

    The server closed it between requests (idle timeout, or after an error, as
    llama-cpp-python does after an empty stream): the request meets an EOF or a
    reset before any byte of an answer, so the server never took it up. urllib3
    only checks for a closed socket when it takes one from the pool, which leaves a
    race. Connect failures are "Failed to establish a new connection", not this.
    """
    text = str(exc)
    return "Connection aborted" in text and _STALE_CONNECTION.search(text) is not None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry number `attempt`: exponential, with jitter."""
    delay: float = min(_BACKOFF_MAX, _BACKOFF_BASE * 2 ** (attempt - 1))
    return delay * random.uniform(0.5, 1.0)


def _drain(response: requests.Response) -> None:
    """Read what follows [DONE] for up to ~100 ms so the connection can be reused.

    Stopping at [DONE] without reading the rest of the body would cost a new TCP
    (and TLS) connection for the next request.
    """
    sock = _socket_of(response)
    if sock is None:
        return
    try:
        sock.settimeout(_DRAIN_SECONDS)
        deadline = time.monotonic() + _DRAIN_SECONDS
        # decode_content=True as in _iter_raw: urllib3 refuses to mix the two on one
        # gzip body (RuntimeError), and the drain must never fail the answer.
        while time.monotonic() < deadline and response.raw.read1(_READ_SIZE, decode_content=True):
            pass
    except Exception as exc:  # noqa: BLE001 - best effort: at worst the connection is not reused
        _log.debug("draining the end of a stream failed: %r", exc)


def _socket_of(response: requests.Response) -> Any:
    connection = getattr(response.raw, "_connection", None) or getattr(
        response.raw, "connection", None
    )
    return getattr(connection, "sock", None)


# ==== Command line ====


_CLI_EXAMPLES: Final = """examples:
  openai-compat "Explain distributed computing"
  cat notes.txt | openai-compat "Summarize:"
  openai-compat -m llama3.2 -s "Answer in French" "What is SSE?"
  openai-compat --json "Hi" | jq -j 'select(.type == "text") | .content'
  openai-compat --base-url http://localhost:11434/v1 models
  openai-compat --schema person.json "Invent a person"
  openai-compat models
  openai-compat check
  openai-compat check --wait 120     # a server that is still starting

The endpoint comes from OPENAI_COMPATIBLE_BASE_URL (and OPENAI_COMPATIBLE_API_KEY,
OPENAI_COMPATIBLE_MODEL, OPENAI_COMPATIBLE_TIMEOUT, OPENAI_COMPATIBLE_MAX_RETRIES).
To send the word "models" or "check" as a prompt, put -- before it.
exit status: 0 ok, 1 API error, 2 usage or configuration error, 130 interrupted"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m openai_compat` and the `openai-compat` script.

    Returns the exit status: 0 ok, 1 API error, 2 usage or configuration error,
    130 interrupted (Ctrl-C). Errors are one line on stderr.
    """
    parser = _cli_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.literal = "--" in argv
    words: list[str] = args.words
    try:
        client = Client(args.base_url, model=args.model, timeout=args.timeout)
        if words[:1] == ["models"] and len(words) == 1 and not args.literal:
            return _cli_models(client)
        if words[:1] == ["check"] and len(words) == 1 and not args.literal:
            return _cli_check(client, args.wait)
        prompt = _cli_prompt(words)
        return _cli_chat(client, prompt, args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`); quiet exit, and no second error at shutdown.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as exc:
        print(f"openai-compat: {exc}", file=sys.stderr)
        return 2
    except APIError as exc:
        print(f"openai-compat: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openai-compat",
        description="Stream an answer from any OpenAI-compatible server.",
        epilog=_CLI_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("words", nargs="*", metavar="PROMPT | models | check",
                        help="the prompt (stdin, if any, is appended), or a command")
    parser.add_argument("--base-url", help="the server, e.g. http://localhost:11434/v1 "
                        "(default: OPENAI_COMPATIBLE_BASE_URL)")
    parser.add_argument("-m", "--model", help="model id (default: OPENAI_COMPATIBLE_MODEL, "
                        "else the first listed by the server)")
    parser.add_argument("-s", "--system", help="system message")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--timeout", type=float,
                        help="seconds of silence allowed between bytes (default 30)")
    parser.add_argument("--wait", type=float, metavar="SECONDS",
                        help="with check: first wait up to SECONDS for a server that is "
                        "starting or loading its model")
    parser.add_argument("--schema", metavar="FILE.json",
                        help="answer with JSON that matches this JSON Schema, printed on "
                        "one line (the model is asked to mend a wrong answer twice)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per chunk, one per line")
    parser.add_argument("--version", action="version", version=f"openai-compat {__version__}")
    return parser


def _cli_prompt(words: list[str]) -> str:
    prompt = " ".join(words)
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        if piped.strip():
            prompt = f"{prompt}\n\n{piped}" if prompt else piped
    if not prompt.strip():
        raise ConfigError("no prompt: give one as an argument or on stdin (see --help)")
    return prompt


def _cli_chat(client: Client, prompt: str, args: argparse.Namespace) -> int:
    if args.schema is not None:
        return _cli_structured(client, prompt, args)
    out = sys.stdout
    with client.stream(prompt, system=args.system, temperature=args.temperature,
                       max_tokens=args.max_tokens) as chunks:
        for chunk in chunks:
            if args.json:
                out.write(json.dumps(_chunk_json(chunk), ensure_ascii=False) + "\n")
            elif chunk.content and chunk.type == "text":
                out.write(chunk.content)
            else:
                continue
            out.flush()
        refusal = chunks.result.refusal if chunks.result else ""
    if not args.json:
        out.write("\n")
    if refusal:
        # A refusal is not an answer: scripts see it on stderr and in the exit status.
        print(f"openai-compat: the model refused: {' '.join(refusal.split())}",
              file=sys.stderr)
        return 1
    return 0


def _cli_structured(client: Client, prompt: str, args: argparse.Namespace) -> int:
    """--schema FILE: print the answer as one line of JSON that matches the schema."""
    try:
        with open(args.schema, encoding="utf-8") as file:
            schema = json.load(file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--schema {args.schema}: cannot read a JSON Schema ({exc})") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"--schema {args.schema}: a JSON Schema is a JSON object")
    result = client.generate(prompt, system=args.system, temperature=args.temperature,
                             max_tokens=args.max_tokens, schema=schema)
    if result.refusal:
        print(f"openai-compat: the model refused: {' '.join(result.refusal.split())}",
              file=sys.stderr)
        return 1
    print(json.dumps(result.data, ensure_ascii=False))
    return 0


def _chunk_json(chunk: Chunk) -> dict[str, Any]:
    data: dict[str, Any] = {"type": chunk.type, "step": chunk.step}
    if chunk.content:
        data["content"] = chunk.content
    if chunk.reasoning:
        data["reasoning"] = chunk.reasoning
    if chunk.tool_call is not None:
        call = chunk.tool_call
        data["tool_call"] = {"id": call.id, "name": call.name, "arguments": call.arguments}
    if chunk.tool_result is not None:
        data["tool_result"] = {"content": chunk.tool_result.content,
                               "error": chunk.tool_result.error}
    if chunk.type == "finish":
        data["finish_reason"] = chunk.finish_reason
        usage = chunk.usage
        data["usage"] = None if usage is None else {
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}
    return data


def _cli_models(client: Client) -> int:
    try:
        models = client.available_models(fallback=False)
    except APIError as exc:
        print(f"openai-compat: could not list models: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    print("\n".join(models))
    return 0


def _cli_check(client: Client, wait: float | None = None) -> int:
    """Probe the endpoint: one line per capability, then one per deviation from
    OpenAI's behaviour that the probes met and absorbed; exit 0 when chat works.
    `wait`: seconds to wait first for a server that is starting or loading its model."""
    def report(name: str, ok: bool | None, detail: str) -> None:
        mark = {True: "ok", False: "FAIL", None: "--"}[ok]
        print(f"{name:<12} {mark:<5} {detail}", flush=True)

    print(f"endpoint     {client.config.base_url}")
    if wait is not None:
        started = time.monotonic()
        try:
            client.wait_ready(timeout=wait)
        except APIError as exc:
            report("ready", False, f"not within {wait:g} s: {type(exc).__name__}: {exc}")
            return 1
        report("ready", True, f"after {time.monotonic() - started:.1f} s")
    try:
        models = client.available_models(fallback=False)
    except (AuthenticationError, EndpointUnavailableError, RequestTimeoutError) as exc:
        ok_reach = not isinstance(exc, (EndpointUnavailableError, RequestTimeoutError))
        report("reachable", ok_reach, client._http.models_answer if ok_reach else str(exc))
        if ok_reach:
            report("auth", False, str(exc))
            _check_quirks(report, client)
        return 1
    except APIError as exc:
        report("reachable", True, client._http.models_answer or "the server answered")
        report("models", None, f"not listed ({exc.message})")
    else:
        report("reachable", True, client._http.models_answer)
        report("models", True, f"{len(models)} listed: {', '.join(models[:8])}"
               + (" ..." if len(models) > 8 else ""))
    checker = Client(client.config.base_url, client.config.api_key, client.model,
                     timeout=client.config.timeout, max_retries=0)
    try:
        started = time.monotonic()
        answer = checker.generate("Say hello in one word.", max_tokens=16)
        report("auth", True, "accepted" if client.config.api_key else "no key sent")
        report("chat", True, f"{answer.text.strip()[:60]!r} ({time.monotonic() - started:.1f} s)")
    except APIError as exc:
        if isinstance(exc, AuthenticationError):
            report("auth", False, str(exc))
        report("chat", False, f"{type(exc).__name__}: {exc}")
        _check_quirks(report, client, checker)
        return 1
    _check_stream(checker, report)
    _check_tools(checker, report)
    _check_structured(checker, report)
    _check_quirks(report, client, checker)
    return 0


def _check_quirks(report: Callable[[str, bool | None, str], None], *clients: Client) -> None:
    """One line per deviation the probes' Clients absorbed, in the order met."""
    lines: list[str] = []
    for probe in clients:
        lines += [line for line in probe.quirks if line not in lines]
    for line in lines:
        report("quirk", None, line)
    if not lines:
        report("quirks", True, "none absorbed")


def _check_stream(client: Client, report: Callable[[str, bool | None, str], None]) -> None:
    try:
        started = time.monotonic()
        first = None
        count = 0
        with client.stream("Count from 1 to 5.", max_tokens=32) as chunks:
            for chunk in chunks:
                if chunk.type == "text":
                    count += 1
                    first = first if first is not None else time.monotonic() - started
            result = chunks.result
        report("streaming", count > 0, f"{count} text chunks, first after {first or 0:.2f} s")
        usage = result.usage if result else None
        report("usage", True if usage else None, f"prompt {usage.prompt_tokens}, completion "
               f"{usage.completion_tokens}" if usage else "not reported in streams")
    except APIError as exc:
        report("streaming", False, f"{type(exc).__name__}: {exc}")


def _check_tools(client: Client, report: Callable[[str, bool | None, str], None]) -> None:
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    try:
        result = client.stream("Use the add tool to add 2 and 3.", tools=[add], max_steps=2,
                               temperature=0, max_tokens=128)
        calls = [c.tool_call for c in result if c.type == "tool_call" and c.tool_call]
        if calls:
            call = calls[0]
            how = ("call (not streamed: the server's tool streams are empty, so they are"
                   " asked for without streaming)" if client._tools_unstreamed
                   else "streamed call")
            report("tool calls", True, f"{how} {call.name}({call.raw_arguments})")
        else:
            report("tool calls", None, "no tool call: the model answered in text")
    except APIError as exc:
        report("tool calls", False, f"{type(exc).__name__}: {exc}")


def _check_structured(client: Client,
                      report: Callable[[str, bool | None, str], None]) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "country": {"type": "string"}},
              "required": ["city", "country"]}
    try:
        result = client.generate("Name a city in France as JSON with city and country.",
                                 schema=schema, temperature=0, max_tokens=64)
    except APIError as exc:
        report("structured", False, f"{type(exc).__name__}: {exc}")
        return
    how = ("response_format json_schema honoured",
           "json_schema refused; json_object with the schema honoured",
           "response_format refused; the schema is asked for in a system message")
    repairs = f" after {len(result.steps) - 1} repair(s)" if len(result.steps) > 1 else ""
    report("structured", True, f"{how[client._http.schema_rung]}: {json.dumps(result.data)}"
           + repairs)


if __name__ == "__main__":
    sys.exit(main())
