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

One file, two dependencies (requests, sseclient-py); copy it into a project (keep
this header) or install it with pip from a clone::

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
    OPENAI_COMPATIBLE_MAX_RETRIES   retries of failed connections, 408/409/429/5xx (default 2)
    OPENAI_COMPATIBLE_DEADLINE      seconds a whole stream() or generate() may take (default none)

Works with vLLM, Ollama, llama.cpp's llama-server, LM Studio, TGI, Groq, Together,
Fireworks, OpenRouter, DeepSeek, Mistral, Gemini's OpenAI endpoint, Azure, LiteLLM
and OpenAI, including their deviations from OpenAI's wire format.

The file reads top-down. First what a user calls, receives or catches; then the
jobs the Client hands work to, in the order a call reaches them; each section's
entry point comes first and its helpers after it, in call order. Each section starts
with a "# ==== Name ====" line:

    Constants
    Errors                 the exceptions, the ordered regex table, classify_error(), error bodies
    Data types             Usage, ToolCall, ToolResult, Chunk, Step, Result
    Configuration          Config.from_env(): arguments, then OPENAI_COMPATIBLE_*, then defaults
    Client                 Client (discovery once per Client, the fallback list, wait_ready()),
                           and the module-level stream(), generate(), ...
    Model discovery        GET /models within 5 s; the shapes its answer comes in
    Requests               a call's options checked: the request body, its tools, its deadline
    Streaming              Stream, a call's steps; a model call: bytes -> lines -> events -> Chunks
    Tool-call loop         calls assembled from their fragments, run, results sent back; repairs
    Tools                  Tool, @tool; strict JSON Schemas from type hints; values from JSON
    Checking JSON          the JSON Schema checker (draft 2020-12) for tool arguments and schema=
    HTTP plumbing          the connection pool, retries, deadlines, redirects, refused fields
    Command line           python -m openai_compat, or the openai-compat script
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import email.utils
import enum
import functools
import http.client
import inspect
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import socket
import ssl
import string
import sys
import threading
import time
import types
import typing
import urllib.parse
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from decimal import Decimal
from typing import Any, ClassVar, Final, Literal, Union

import requests
import requests.adapters
import sseclient
import urllib3.exceptions

__version__ = "0.2.0"

__all__ = [  # everything a user calls, receives or catches, in file order
    "DEFAULT_MODEL", "FALLBACK_MODELS", "DEFAULT_MAX_STEPS", "OpenAICompatError",
    "ConfigError", "APIError", "EndpointUnavailableError", "RequestTimeoutError",
    "AuthenticationError", "RateLimitError", "ModelNotFoundError", "ContextLengthError",
    "BadRequestError", "ServerError", "StreamError", "OutputError", "classify_error", "Usage",
    "ToolCall", "ToolResult", "ChunkType", "Chunk", "Step", "Result", "Config", "Client",
    "stream", "generate", "available_models", "first_available_model", "Stream", "Tool", "tool",
    "main",
]

_log = logging.getLogger("openai_compat")
# Silent unless the application configures logging (as requests does).
_log.addHandler(logging.NullHandler())


# ==== Constants ====

DEFAULT_MODEL: Final = "gpt-3.5-turbo"
FALLBACK_MODELS: Final = ("gpt-4o", "gpt-4o-mini", "gpt-4-turbo", "gpt-3.5-turbo",
                          "claude-3-5-sonnet", "claude-3-haiku", "gemini-pro")
DEFAULT_MAX_STEPS: Final = 10

_ENV_BASE_URL: Final = "OPENAI_COMPATIBLE_BASE_URL"
_ENV_API_KEY: Final = "OPENAI_COMPATIBLE_API_KEY"
_ENV_MODEL: Final = "OPENAI_COMPATIBLE_MODEL"
_ENV_TIMEOUT: Final = "OPENAI_COMPATIBLE_TIMEOUT"
_ENV_MAX_RETRIES: Final = "OPENAI_COMPATIBLE_MAX_RETRIES"
_ENV_DEADLINE: Final = "OPENAI_COMPATIBLE_DEADLINE"
_DEFAULT_TIMEOUT: Final = 30.0
_DEFAULT_MAX_RETRIES: Final = 2
# The longest silence limit accepted: about 11.5 days. Far larger values (and inf) overflow
# the platform's socket timeouts at the first request.
_MAX_TIMEOUT: Final = 1_000_000.0
_MAX_ERROR_BODY: Final = 64 * 1024
# The longest wait between two asks to a server that is starting or loading its model
# (wait_ready, a 503 "Loading model"); tests lower it.
_WAIT_GAP: Final = 1.0
# What requests, urllib3 and the socket layer raise on the network path; each place
# that catches them turns them into the module's own errors.
_TRANSPORT_ERRORS: Final = (requests.RequestException, urllib3.exceptions.HTTPError,
                            http.client.HTTPException, OSError)
# An API key shorter than this is a placeholder ("x", "EMPTY", "ollama"), never redacted:
# no provider issues keys that short, and redacting "x" mangled every message.
_SECRET_LENGTH: Final = 8

# ==== Errors ====


class OpenAICompatError(Exception):
    """Root of every error this module raises; catch it to catch them all."""


class ConfigError(OpenAICompatError, ValueError):
    """Bad or missing configuration (an environment variable, an argument, a tool, a
    schema, text that cannot be sent).

    Raised before anything is sent. Retrying does not help: fix what the message names.
    """


class APIError(OpenAICompatError):
    """The server could not be reached, or answered with an error.

    Attributes:
        message: the server's own message (or the transport's), with secrets redacted.
        status_code: the HTTP status, or None (no response, or an error inside a stream).
        body: the response body as text (trimmed), or None.
        base_url: the endpoint the request went to (secrets in it redacted); the message
            names the URL called, its path and query.
        retryable: True when sending the same request again may succeed.
        partial_text: answer text the interrupted model call had already yielded ("" if none).
    """

    retryable: bool = False  # the class's, unless one error says otherwise
    # Where the base URL came from, for hints: the variable, "base_url=" or the CLI's
    # --base-url; and the path called below it (both set by the Client that raises it).
    _url_source: str = _ENV_BASE_URL
    _path: str = ""
    _cli = False  # raised for the command line: hints in its words (see _cli_words)
    _advice = ""  # what to do, where this error knows better than its class

    def __init__(self, message: str, *, status_code: int | None = None,
                 body: str | None = None, base_url: str | None = None,
                 partial_text: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.body = body
        self.base_url = base_url
        self.partial_text = partial_text

    def __str__(self) -> str:
        base, query, rest = (self.base_url or "").partition("?")
        where = [f"HTTP {self.status_code}"] if self.status_code is not None else []
        where += [f"from {base}{self._path}{query}{rest}"] if base else []
        text = self.message or "no message from the server"
        text += f" ({' '.join(where)})" if where else ""
        hint = self._hint()
        return ". ".join(filter(None, (text, _cli_words(hint) if self._cli else hint)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status_code={self.status_code!r})"

    def _hint(self) -> str:
        """What to do next, appended to the message."""
        return self._advice or self._HINT

    _HINT: ClassVar[str] = ""


class EndpointUnavailableError(APIError, ConnectionError):
    """No response: connection refused, DNS failure, reset before the server answered,
    a TLS certificate this machine does not trust, a proxy that cannot be reached or
    that answered 407.

    Retried automatically (max_retries); safe to retry, except for a certificate or a
    proxy's 407 (retryable is False: fix what the message names).
    """

    retryable = True

    def _hint(self) -> str:
        now = f" (now {self.base_url})" if self.base_url else ""
        return self._advice or f"Is the server running? Check {self._url_source}{now}"


class RequestTimeoutError(APIError, TimeoutError):
    """The connection could not be made in time, or the server went silent for longer
    than `timeout` seconds (silence between bytes, not total time). Safe to retry.
    """

    retryable = True
    _HINT = f"Raise the timeout ({_ENV_TIMEOUT} or timeout=) for slow or cold servers"


class AuthenticationError(APIError):
    """HTTP 401/403 or an invalid-key message: the key is missing, wrong or not allowed.

    Not retryable: fix the key.
    """

    _HINT = f"Check the API key ({_ENV_API_KEY} or api_key=)"


class RateLimitError(APIError):
    """HTTP 429 or a rate-limit message. `retry_after` holds the server's Retry-After
    in seconds when it sent one (else None). Retried automatically up to 60 s of
    Retry-After.
    """

    retryable = True
    retry_after: float | None = None

    def _hint(self) -> str:
        if self.retry_after is not None:
            return f"Wait {self.retry_after:g} s before retrying, or lower the request rate"
        return "Wait and retry, or lower the request rate"


class ModelNotFoundError(APIError):
    """The server does not know the model. Not retryable: pick a listed model."""

    def _hint(self) -> str:
        # Advice never loops back: a failing GET /models does not send the user there.
        listed = "" if self._path == "/models" else " (`openai-compat models` lists them)"
        return f"Set {_ENV_MODEL} or pass model= naming a model the server has{listed}"


class ContextLengthError(APIError):
    """The prompt (plus max_tokens) does not fit the model's context window."""

    _HINT = "Shorten the messages or lower max_tokens, or use a model with a larger context"


class BadRequestError(APIError):
    """Any other 4xx: the server rejected the request as sent. Not retryable."""

    def _hint(self) -> str:
        if self.status_code not in (404, 405):
            return "Check the request's options against what this server supports"
        # No route there: a URL without a version segment (and no query string) lacks /v1.
        if self.base_url and not re.search(r"\?|/v\d+[a-z0-9]*(?:/|$)", self.base_url):
            source = self._url_source.removesuffix("=")
            return f"The server may expect /v1: try {source}={self.base_url}/v1"
        return f"Check {self._url_source}: the server has no such route"


class ServerError(APIError):
    """HTTP 5xx: the server failed. Retried automatically; safe to retry later."""

    retryable = True
    _HINT = "The server failed; retry later or look at the server's log"


class StreamError(APIError):
    """A stream was cut short, was malformed, or carried an error that no other class
    matches. `partial_text` holds the text that had arrived. Safe to retry.
    """

    retryable = True
    _HINT = "The answer was cut short; .partial_text holds what arrived"


class OutputError(APIError):
    """The answer did not match `schema=`, after the model was asked to repair it
    (twice at most). `partial_text` holds the last answer. Retrying the same request
    rarely helps: a simpler schema or a model that follows instructions does."""

    _HINT = "The model's answer did not match the schema; .partial_text holds the last one"


# Ordered: the first row whose pattern matches the message wins. Statuses that
# decide on their own (_STATUS_ERRORS: 401, 403, 413, 429) are checked before this table.
_ERROR_PATTERNS: Final[tuple[tuple[type[APIError], re.Pattern[str]], ...]] = (
    # vLLM "The model `qwen2.5-7b` does not exist.", Ollama "model "llama3.2" not found,
    # try pulling it first", OpenAI model_not_found, LiteLLM "Invalid model name passed",
    # Fireworks "Model not found, inaccessible", Together "Unable to access model x",
    # Gemini "models/x is not found for API version v1beta", transformers serve "Server is
    # pinned to 'DIR'; requested 'x'." (a 400 {"detail"}). First, so that nothing an id holds
    # (a "context" or "rate-limit" in its name) can outrank it; the gap after "model"
    # takes any character but a newline: ids hold dots, colons, slashes, @ and quotes.
    (ModelNotFoundError, re.compile(
        r"\bmodels?\b[^\n]{0,200}?\b(?:not found|does not exist|not exist|is not available)"
        r"|model_not_found|invalid model name|unknown model|no such model|unable to access model"
        r"|server is pinned to",
        re.IGNORECASE)),
    # vLLM/OpenAI/llama-cpp-python "maximum context length is N tokens", llama.cpp
    # exceed_context_size_error "exceeds the available context size", LiteLLM
    # ContextWindowExceededError, Anthropic-compat "prompt is too long".
    (ContextLengthError, re.compile(
        r"context[ _-]?(?:length|size|window)|maximum context|exceed_context"
        r"|too many tokens|prompt is too long|reduce the length of the (?:messages|input)",
        re.IGNORECASE)),
    # llama.cpp "Invalid API Key", llama-cpp-python "Invalid API key", OpenAI
    # "Incorrect API key provided", LiteLLM "Authentication Error, No api key passed in",
    # Gemini "API key not valid" with reason API_KEY_INVALID; and LiteLLM answers a wrong
    # key with 400 "No connected db." when it has no database.
    (AuthenticationError, re.compile(
        r"(?:invalid|incorrect|missing|no) api[ _-]?key|\bno connected db\b"
        r"|api[ _-]?key[ _-](?:is[ _-])?(?:invalid|not valid|missing|required)"
        r"|unauthori[sz]ed|authentication[ _]error|\bauthentication\b", re.IGNORECASE)),
    # OpenAI "Rate limit reached", TGI 429 "Model is overloaded", Gemini RESOURCE_EXHAUSTED.
    (RateLimitError, re.compile(r"rate[ _-]?limit|too many requests|overloaded"
                                r"|resource[ _]exhausted|exceeded your current quota",
                                re.IGNORECASE)),
    # The seed's table: a bare "does not exist" is a model that does not.
    (ModelNotFoundError, re.compile(r"does not exist", re.IGNORECASE)),
    # Quirk(llama-cpp-python): a request its schema rejects ("messages" not a list,
    # "content": null) is a 500 "N validation error(s)"; resending cannot help.
    (BadRequestError, re.compile(r"\b\d+ validation errors?\b", re.IGNORECASE)),
    # Transport words (no HTTP status): the seed's table ("ECONNREFUSED", the browser's
    # "Failed to fetch", Node's "fetch failed", "TimeoutError: The operation was aborted
    # due to timeout"), and what Python's socket layer says.
    (EndpointUnavailableError, re.compile(
        r"ECONNREFUSED|connection refused|ECONNRESET|connection reset|name or service not known"
        r"|nodename nor servname|temporary failure in name resolution|no route to host"
        r"|failed to fetch|fetch failed", re.IGNORECASE)),
    (RequestTimeoutError, re.compile(r"TimeoutError|timed out|ETIMEDOUT|aborted due to timeout",
                                     re.IGNORECASE)),
)
_NO_RESPONSE_CLASSES: Final = (EndpointUnavailableError, RequestTimeoutError)
# The statuses that decide on their own, before the table is read.
_STATUS_ERRORS: Final[dict[int | None, type[APIError]]] = {
    401: AuthenticationError, 403: AuthenticationError, 413: ContextLengthError,
    429: RateLimitError, 407: EndpointUnavailableError}  # 407: a proxy's, not the key


def classify_error(message: str, status: int | None = None) -> type[APIError]:
    """Return the APIError subclass for an error `message` and optional HTTP `status`.

    Status first (401/403 auth, 413 context length, 429 rate limit), then the
    module's ordered table of regular expressions over the message, then the
    status class (408 timeout, other 4xx bad request, 5xx server error). The
    transport rows (connection refused, timed out) apply only without a status.
    Returns APIError itself when nothing matches and there is no status.
    """
    if status in _STATUS_ERRORS:
        return _STATUS_ERRORS[status]
    for cls, pattern in _ERROR_PATTERNS:
        if (status is None or cls not in _NO_RESPONSE_CLASSES) and pattern.search(message):
            return cls
    if status is None or status < 400:
        return APIError
    if status == 408:
        return RequestTimeoutError
    return ServerError if status >= 500 else BadRequestError


def _error_from_body(status: int, text: str, note: Callable[[str], None],
                     retry_after: float | None = None, decoded: Any = None) -> APIError:
    """The classified error for an error body of any shape; a 2xx `status` is an error
    sent with a success status. `decoded`: the body's JSON when the caller has it.
    `note` hears of the body's deviations from OpenAI's."""
    text = text.strip()
    body = decoded
    if body is None and text[:1] in ("{", "["):
        with contextlib.suppress(ValueError, RecursionError):
            body = json.loads(text)
    message, tags = _error_fields(body, note)
    if message is None and text[:1] == "<":
        # Quirk(Cloudflare, and other proxies in front of a server): an HTML error page.
        note("error bodies as HTML pages")
        match = re.search(r"(?is)<(title|h1)[^>]*>(.+?)</\1>", text)
        message = "HTML error page: " + " ".join(re.sub(
            r"<[^>]+>", " ", match.group(2) if match else text).split())
    elif message is None and text:
        if body is None:
            # Quirk(transformers serve, LiteLLM without prisma, Envoy): text/plain errors
            # ("Internal Server Error", "upstream connect error").
            note("error bodies as plain text")
        message = text
    if message and _TRACEBACK.search(message):
        note("Python tracebacks in error messages")  # Quirk(llama-cpp-python): see _trim_message
    message = _trim_message(message) if message else f"HTTP {status}"
    # A success status classifies as no status does: by the message alone.
    cls = classify_error(f"{message} {tags}", status if status >= 400 else None)
    if status < 400:
        # Quirk(LM Studio): 200 with {"error": "Unexpected endpoint or method."}.
        note(f"errors with status {status}")
        cls = BadRequestError if cls is APIError or cls in _NO_RESPONSE_CLASSES else cls
    elif cls is BadRequestError and status >= 500:
        # Quirk(llama-cpp-python): only the validation row makes a 5xx a BadRequestError
        # (see _ERROR_PATTERNS).
        note("validation errors as HTTP 500")
    error = cls(message, status_code=status, body=text[:_MAX_ERROR_BODY])
    if isinstance(error, RateLimitError):
        error.retry_after = retry_after
    return error


def _error_fields(body: Any, note: Callable[[str], None]) -> tuple[str | None, str]:
    """The message of a decoded error body and its classification tags (type, code,
    status). Shapes: {"error": {"message"}} (OpenAI), {"error": "text"} (TGI, Ollama,
    LM Studio, xAI), a top-level "message" (vLLM < 0.10.1, Mistral), {"detail": str or
    [{"loc", "msg"}]} (FastAPI servers), [{"error": {...}}] (Gemini)."""
    if isinstance(body, list):
        note("error bodies as a JSON array")  # Quirk(Gemini): [{"error": {...}}]
        body = body[0] if body else None
    if not isinstance(body, dict):
        return (body if isinstance(body, str) and body else None), ""
    err = body.get("error")
    inner = err if isinstance(err, dict) else body
    tags = " ".join(str(inner[k]) for k in ("type", "code", "status")
                    if isinstance(inner.get(k), (str, int)))
    if isinstance(err, dict):
        if isinstance(err.get("code"), str) and err["code"].isdigit():
            # Quirk(LiteLLM): the HTTP status again, as a string ("400").
            note("error codes as strings of digits")
        found = next((err[k] for k in ("message", "msg", "detail")
                      if isinstance(err.get(k), str) and err[k]), None)
        return found or _error_fields(err.get("error"), note)[0], tags
    # Quirk(TGI, LM Studio, Ollama, xAI): {"error": "text"}. Quirk(vLLM < 0.10.1, Mistral):
    # {"object": "error", "message": ...}, no "error".
    for key, quirk in (("error", 'error bodies as {"error": "text"}'),
                       ("message", 'error bodies with a top-level "message"')):
        if isinstance(body.get(key), str) and body[key]:
            note(quirk)
            return body[key], tags
    detail = body.get("detail")
    if not detail or not isinstance(detail, (str, list)):
        return None, tags
    # Quirk(FastAPI servers: llama-cpp-python's 401, LlamaFactory's 422).
    note('error bodies as {"detail": ...}')
    if isinstance(detail, list):
        detail = "; ".join(filter(None, map(_detail_item, detail)))
    return detail or None, tags


def _detail_item(item: object) -> str:
    # FastAPI validation errors: {"loc": ["body", "messages"], "msg": "...", "type": ...}
    if not isinstance(item, dict):
        return str(item)
    loc = ".".join(str(x) for x in item.get("loc") or () if x != "body")
    msg = str(item.get("msg") or "")
    return f"{loc}: {msg}" if loc else msg


_TRACEBACK: Final = re.compile(r"\n\s*File \"")


def _trim_message(message: str) -> str:
    # Quirk(llama-cpp-python): 500s carry a Python traceback with the server's own
    # file paths; LiteLLM appends paragraphs about its routing. The first paragraph
    # holds what the user needs.
    message = " ".join(re.split(r"\n\s*\n|\n\s*File \"", message, maxsplit=1)[0].split())
    return message if len(message) <= 600 else message[:597] + "..."


def _redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret (and any bearer token) replaced by [redacted]."""
    for secret in filter(None, secrets):
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
        return Usage(self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens,
                     self.total_tokens + other.total_tokens)


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
        exception: the exception the tool function raised, or None (a bug in a tool is
            one attribute away; it is logged at WARNING with its traceback too).
    """

    call: ToolCall
    value: Any = None
    error: str | None = None
    content: str = ""
    exception: BaseException | None = field(default=None, repr=False, compare=False)


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


def _delta_chunk(kind: ChunkType, text: str, step: int, raw: Any) -> Chunk:
    """A "text", "reasoning" or "refusal" Chunk, built the fast way.

    NOTE: the hot path of every stream. A frozen dataclass's __init__ sets each of
    its nine fields through object.__setattr__; here the instance dict gets only the
    four fields that differ from the defaults, which the class itself holds. The
    Chunk is equal, and equally frozen, at a third of the cost.
    """
    chunk = _new_object(Chunk)
    values = chunk.__dict__
    values["type"] = kind
    values["reasoning" if kind == "reasoning" else "content"] = text
    values["step"] = step
    values["raw"] = raw
    return chunk


_new_object: Final = object.__new__


@dataclass(frozen=True)
class _Answered:
    """What a Step and a Result both hold (see each for what their fields cover)."""

    text: str = ""
    reasoning: str = ""
    refusal: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    choices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Step(_Answered):
    """One model call of a Result: its text, reasoning, refusal (OpenAI's structured
    refusal text, "" if none), calls and their results, finish_reason, usage, and the
    texts of its choices by index (n= above 1)."""


@dataclass(frozen=True, repr=False)
class Result(_Answered):
    """Everything a stream or generate() call produced.

    Attributes:
        text: the final model call's answer text.
        reasoning: the final model call's reasoning text.
        refusal: the final model call's refusal text (OpenAI's structured refusal,
            kept apart from text), "" when the model did not refuse.
        tool_calls, tool_results: over all steps.
        finish_reason: the last model call's, or "max_steps" when the budget ran out
            with calls still requested.
        usage: summed over the model calls; None if the server reported none.
        choices: the final model call's answer texts by choice index, with n= above 1
            (which the server generates, and charges for); [text] otherwise.
        data: the answer parsed and checked against schema= (a dataclass instance
            for a dataclass, a model instance for a pydantic model), or None without
            schema=.
        steps: one Step per model call.
        messages: the whole conversation (assistant and tool turns included), ready to
            pass as messages= to continue it.
    """

    data: Any = None
    steps: list[Step] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)

    def __repr__(self) -> str:
        text = self.text if len(self.text) <= 80 else self.text[:77] + "..."
        return (f"Result(text={text!r}, finish_reason={self.finish_reason!r}, usage="
                f"{self.usage!r}, steps={len(self.steps)}, tool_calls={len(self.tool_calls)},"
                f" messages={len(self.messages)})")


def _result(steps: list[Step], finish: str | None, messages: list[dict[str, Any]],
            data: Any = None) -> Result:
    usages = [s.usage for s in steps if s.usage is not None]
    last = steps[-1]  # _iter_steps makes one model call at least
    return Result(last.text, last.reasoning, last.refusal,
                  [c for s in steps for c in s.tool_calls],
                  [r for s in steps for r in s.tool_results], finish,
                  functools.reduce(operator.add, usages) if usages else None, last.choices,
                  data, steps, messages)

# ==== Configuration ====


@dataclass(frozen=True)
class Config:
    """Resolved settings of a Client (see Config.from_env). base_url keeps its query
    string (Azure's ?api-version=...); repr() hides the key and the URL's secrets."""

    base_url: str
    api_key: str | None = None
    model: str | None = None
    timeout: float = _DEFAULT_TIMEOUT
    max_retries: int = _DEFAULT_MAX_RETRIES
    deadline: float | None = None

    def __repr__(self) -> str:
        # The dataclass's repr, every field in order, with the key and the URL's secrets hidden.
        key = self.api_key if len(self.api_key or "") < _SECRET_LENGTH else "[redacted]"
        shown = {**vars(self), "base_url": _shown_url(self.base_url), "api_key": key}
        return f"Config({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, base_url: str | None = None,
                 api_key: str | None = None, model: str | None = None,
                 timeout: float | str | None = None, max_retries: int | str | None = None,
                 deadline: float | str | None = None) -> Config:
        """Merge explicit arguments over OPENAI_COMPATIBLE_* variables over defaults.

        Blank (empty or whitespace-only) values count as unset. Raises ConfigError
        naming the variable and the fix when a value is missing or malformed.
        """
        env = os.environ if environ is None else environ

        def pick(value: object, name: str) -> tuple[str | None, str]:
            # The value, blank counting as unset, and where it came from (for messages):
            # the argument, named as its variable is without the prefix, or the variable.
            if value is not None and str(value).strip():
                return str(value).strip(), name.removeprefix("OPENAI_COMPATIBLE_").lower() + "="
            return (env.get(name) or "").strip() or None, name

        url, _ = pick(base_url, _ENV_BASE_URL)
        if url is None:
            raise ConfigError(f"No endpoint configured: set {_ENV_BASE_URL} (for example "
                              "http://localhost:11434/v1 for Ollama) or pass base_url= to Client()")
        key, _ = pick(api_key, _ENV_API_KEY)
        if key is not None:
            _check_header_value(key, f"the API key ({_ENV_API_KEY} or api_key=)")
        return cls(_base_url(url), key, pick(model, _ENV_MODEL)[0],
                   _parse_number(*pick(timeout, _ENV_TIMEOUT), _DEFAULT_TIMEOUT),
                   _parse_number(*pick(max_retries, _ENV_MAX_RETRIES), _DEFAULT_MAX_RETRIES,
                                 integer=True), _parse_number(*pick(deadline, _ENV_DEADLINE), None))


_warned_urls: set[str] = set()


def _base_url(url: str) -> str:
    """The base URL to send to: an http(s) URL without a fragment or a trailing slash,
    its query string kept; a pasted endpoint (.../chat/completions, .../models) is cut
    back to its base, with a warning (its meaning is plain: scripts keep working)."""
    try:
        parts = urllib.parse.urlsplit(url)
        valid = parts.port is None or parts.port > 0  # ValueError: a port that is no number
    except ValueError:
        valid = False
    # No spaces, no control characters, no lone surrogates (which UTF-8 cannot carry).
    if (not valid or parts.scheme.lower() not in ("http", "https") or not parts.hostname
            or re.search(r"[\x00-\x20\x7f\ud800-\udfff]", url)):
        problem = ("add the scheme" if "://" not in url else
                   "it needs a host, a port from 1 to 65535 if any, and no spaces")
        raise ConfigError(f"{_ENV_BASE_URL} must be an http:// or https:// URL such as "
                          f"http://localhost:8000/v1 (got {_shown_url(url)!r}); {problem}")
    path, cut = re.subn(r"/(?:chat/completions|models)$", "", parts.path.rstrip("/"))
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
    if cut and url not in _warned_urls:
        _warned_urls.add(url)  # stacklevel: the line that made the Client
        warnings.warn(f"the base URL {_shown_url(url)} ends in an endpoint's path: using "
                      f"{_shown_url(base)} (set that as the base URL)", UserWarning, stacklevel=4)
    return base


# The secrets a URL may hold: the userinfo password (groups 1-2), and the values of
# query parameters named like secrets, as Azure's SAS "sig" or a "key=" (groups 3-4).
_URL_SECRET: Final = re.compile(r"(//[^/?#@:]*:)([^/?#@]*)(?=@)"
                                r"|([?&][^=&#]*(?:key|token|secret|sig|password)[^=&#]*=)([^&#]*)",
                                re.IGNORECASE)


def _url_secrets(url: str) -> list[str]:
    """The secrets a URL holds, as written and percent-decoded."""
    found = [password or value for _, password, _, value in _URL_SECRET.findall(url)]
    return [secret for raw in found for secret in {raw, urllib.parse.unquote(raw)} if secret]


def _shown_url(url: str) -> str:
    """The URL with its secrets replaced by [redacted]; the rest stays readable."""
    return _URL_SECRET.sub(lambda m: (m.group(1) or m.group(3)) + "[redacted]", url)


# An HTTP header name is a "token" (RFC 9110, 5.6.2); a value we send is printable ASCII.
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SECRET_HEADER: Final = re.compile(r"key|token|auth|secret", re.IGNORECASE)
_UNPRINTABLE: Final = re.compile(r"[^\x20-\x7e]")


def _check_headers(headers: Mapping[str, str] | None, option: str) -> dict[str, str]:
    """`headers` as a dict, or ConfigError naming a header HTTP cannot carry."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ConfigError(f"{option} must be a dict of header names to values")
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ConfigError(f"header name {name!r} is not an HTTP token: use letters, "
                              "digits and !#$%&'*+-.^_`|~ only, no spaces or colons")
        _check_header_value(value, f"header {name!r}")
    # Surrounding spaces are no part of a value (RFC 9110), and requests refuses them:
    # "api-key: x".split(":", 1) leaves one.
    return {name: value.strip() for name, value in headers.items()}


def _header_secrets(headers: Mapping[str, str]) -> list[str]:
    """The values of headers named like secrets (Azure's api-key): secrets at any length."""
    return [value for name, value in headers.items() if _SECRET_HEADER.search(name)]


def _check_header_value(value: object, what: str) -> None:
    """ConfigError when `value` is no str or holds a character an HTTP header cannot
    carry; the message names where it is, never the value (a key is a secret)."""
    if not isinstance(value, str):
        raise ConfigError(f"{what}: its value must be a str, not {type(value).__name__}")
    bad = _UNPRINTABLE.search(value)
    if bad is not None:
        char = bad.group()
        kind = ("a line break" if char in "\r\n" else "a control character"
                if char < " " or char == "\x7f" else "a non-ASCII character")
        raise ConfigError(f"{what} holds {kind} at position {bad.start()}: HTTP headers "
                          "carry printable ASCII only (was it pasted with a newline, or from "
                          "a rich-text editor?)")


def _parse_number(value: object, name: str, default: float | None, *,
                  integer: bool = False) -> Any:
    """Seconds from a setting (a silence limit, a deadline): above 0, at most _MAX_TIMEOUT
    (larger ones, inf included, overflow the platform's socket timeouts); with `integer`,
    a count of 0 or more; `default` for None. ConfigError naming `name` for anything else
    (a bool too: its text is no number)."""
    if value is None:
        return default
    raw = str(value)
    try:
        number = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number of seconds"
        raise ConfigError(f"{name} must be {kind} (got {raw!r})") from None
    if integer and number < 0:
        raise ConfigError(f"{name} must be 0 or more (got {raw!r})")
    if not integer and not 0 < number <= _MAX_TIMEOUT:  # nan too
        meaning = ("the time a whole call may take" if "DEADLINE" in name.upper() else
                   "the silence allowed between bytes, so that a dead server cannot hang "
                   "the program")
        raise ConfigError(f"{name} must be a positive number of seconds, at most "
                          f"{_MAX_TIMEOUT:.0f} (got {raw!r}): {meaning}")
    return number

# ==== Client ====


class Client(contextlib.AbstractContextManager["Client", None]):
    """A connection to one OpenAI-compatible server.

    Client(base_url=None, api_key=None, model=None, *, timeout=None, max_retries=None,
    headers=None, deadline=None): each None argument is read from its
    OPENAI_COMPATIBLE_* variable (see the module docstring) when the Client is made.
    `timeout` is the silence allowed between bytes (connecting included), not a bound
    on total time; `deadline` (default none) bounds a whole stream() or generate().
    `headers` are added to every request (Azure's api-key, for instance). Raises
    ConfigError on bad settings, a key or header HTTP cannot carry included.

    One Client keeps one connection pool: sequential calls reuse a TCP connection,
    and it may be shared by threads. Model discovery runs at most once per Client.

    `quirks` lists what this server did differently from OpenAI and the Client
    absorbed so far, one short line each (see Client.quirks): read it before going
    to production on an endpoint.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 model: str | None = None, *, timeout: float | None = None,
                 max_retries: int | None = None, headers: Mapping[str, str] | None = None,
                 deadline: float | None = None) -> None:
        self.config = Config.from_env(base_url=base_url, api_key=api_key, model=model,
                                      timeout=timeout, max_retries=max_retries, deadline=deadline)
        given = base_url is not None and str(base_url).strip()
        self._http = _Connection(self.config, _check_headers(headers, "headers="),
                                 "base_url=" if given else _ENV_BASE_URL)
        # Model discovery: GET /models asked at most once, even from many threads at once
        # (a failure is remembered too); the fallbacks used, each logged once.
        self._models_lock = threading.Lock()
        self._found: list[str] | APIError | None = None
        self._fell_back: set[str] = set()

    def __repr__(self) -> str:
        return f"Client(base_url={self._http.shown_url!r}, model={self.config.model!r})"

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the calls in flight on this Client, from any thread, and close its
        connection pool. Each of those calls raises StreamError ("the Client was closed",
        not retryable) with its .partial_text; a call started later raises it at once."""
        self._http.close()

    @property
    def model(self) -> str:
        """The model id requests use: model= → OPENAI_COMPATIBLE_MODEL → the first id
        GET /models lists → DEFAULT_MODEL (discovery runs at most once)."""
        return self.config.model or self.first_available_model()

    @property
    def quirks(self) -> list[str]:
        """The server's deviations from OpenAI's behaviour that this Client has absorbed
        so far: one short line each ("no usage in streams", "tool calls streamed
        without index", "stream_options rejected: dropped", ...), in the order first
        seen, each also logged once at INFO. A copy; `openai-compat check` prints it."""
        with self._http.lock:
            return list(self._http.quirks)

    def available_models(self, *, fallback: bool = True) -> list[str]:
        """Model ids from GET {base_url}/models, asked at most once per Client (5 s limit).

        When discovery fails (no route, error status, unparsable, empty list) this
        returns FALLBACK_MODELS and logs why; with fallback=False it raises the
        classified APIError instead.
        """
        return self._models(list(FALLBACK_MODELS) if fallback else None)

    def first_available_model(self) -> str:
        """The first id the server listed, or DEFAULT_MODEL when discovery failed
        (never an entry of FALLBACK_MODELS that no server confirmed)."""
        return self._models([DEFAULT_MODEL], DEFAULT_MODEL)[0]

    def wait_ready(self, timeout: float | None = None) -> list[str]:
        """Wait until the server answers GET {base_url}/models; return its model ids.

        Asks at least once a second. Refused connections, silence and a server that says
        it is loading (or a gateway's 502/503/504) count as not ready yet; progress
        is logged. Past `timeout` seconds in all (default: the Client's timeout)
        raises the last classified error; any other error (a wrong key, no /models
        route) is raised at once, since waiting cannot mend it.
        """
        limit = _parse_number(timeout, "timeout=", self.config.timeout)
        started, logged, asks = time.monotonic(), -math.inf, 0
        while isinstance(found := _fetch_models(self._http), APIError):
            now = time.monotonic()
            if not _not_ready(found) or now - started >= limit:
                raise found
            if now - logged >= 10:  # the first time, then every 10 s
                logged = now
                _log.info("waiting for %s (%.0f s of %g): %s", self._http.shown_url,
                          now - started, limit, found.message)
            asks += 1
            time.sleep(min(_WAIT_GAP, 0.1 * 2 ** min(asks, 10), started + limit - now))
        with self._models_lock:
            if not isinstance(self._found, list):
                self._found = found
        return list(found)

    def stream(self, prompt: str | None = None, **options: Any) -> Stream:
        """Stream a chat completion (and any tool calls) as Chunks.

        Options (keyword-only): messages, system, model, tools, tool_choice (default
        "auto" with tools, never sent without), max_steps, schema (a JSON Schema
        dict, a dataclass, TypedDict, pydantic model or other type hint the answer
        must match: Result.data holds it parsed, see OutputError), timeout (this
        call's silence limit), the chat-completions parameters of OpenAI's API by
        name (temperature, max_tokens, top_p, seed, stop, response_format, n, ...:
        sent when not None), and extra_body={...} for server-specific fields, merged
        into the request last. The request is `system`, then `messages`, then
        `prompt` as the last user turn.

        Returns a Stream: iterate it with a plain for-loop; each event is yielded as
        soon as its bytes arrive. Leaving the loop (or close(), or a with-block)
        closes the HTTP response. After the loop, `stream.result` is the Result.
        Raises ConfigError at once for an unknown keyword (naming the closest valid
        one) or a bad value, and APIError subclasses while iterating.
        """
        outcome: list[Result] = []
        request = _prepare(self, prompt, options)
        return Stream(_iter_steps(request, outcome), outcome, request.body["model"])

    def generate(self, prompt: str | None = None, **options: Any) -> Result:
        """Run stream() to its end and return the Result.

        It streams underneath, so that `timeout` keeps its one meaning: a long answer
        from a slow server never times out while tokens flow, a dead one fails within
        `timeout`, and an error keeps the text that had arrived in .partial_text.
        """
        outcome: list[Result] = []
        for _ in _iter_steps(_prepare(self, prompt, options), outcome):
            pass
        return outcome[0]

    def _models(self, fallback: list[str] | None, what: str = "the fallback list",
                limit: float = math.inf) -> list[str]:
        """The ids GET /models lists, asked for once (a failure is remembered too). When
        it failed: `fallback`, saying once for each `what` that it is used, or without a
        fallback the error raised. A call's deadline `limit` (seconds left) under
        _DISCOVERY_SECONDS that passes first raises its error, nothing remembered."""
        with self._models_lock:
            if self._found is None:
                found = _fetch_models(self._http, min(limit, _DISCOVERY_SECONDS))
                if limit < _DISCOVERY_SECONDS and isinstance(found, RequestTimeoutError):
                    raise self._http.shown_error(_past_deadline(
                        f"the call took longer than its deadline: GET /models had not "
                        f"answered after {limit:.1f} s"))
                self._found = found
            if isinstance(self._found, list):
                return list(self._found)
            if fallback is None:
                raise self._found
            if what not in self._fell_back:
                self._fell_back.add(what)
                _log.warning("model discovery at %s/models failed (%s); using %s",
                             self._http.shown_url, self._found.message, what)
        return fallback


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

_DISCOVERY_SECONDS: Final = 5.0


def _not_ready(error: APIError) -> bool:
    """Whether an error from GET /models means "not up yet" rather than "wrong"."""
    return error.retryable and (isinstance(error, _NO_RESPONSE_CLASSES)
                                or error.status_code in (502, 503, 504))


def _fetch_models(http: _Connection, limit: float = _DISCOVERY_SECONDS) -> list[str] | APIError:
    """The model ids GET {base_url}/models lists, or why not (returned, not raised,
    redacted), within `limit` seconds in all."""
    # In a thread, so that the bound holds even for a server that accepts the
    # connection and then trickles or says nothing (a read timeout alone would
    # allow 5 s per read).
    answers: list[list[str] | APIError] = []

    def ask() -> None:
        try:
            answers.append(_ask_models(http))
        except Exception as exc:  # noqa: BLE001 - a bug here must not cost 5 s
            answers.append(exc if isinstance(exc, APIError) else http.shown_error(
                APIError(f"model discovery failed: {exc!r}")))

    worker = threading.Thread(target=ask, daemon=True, name="openai-compat-discovery")
    worker.start()
    worker.join(limit)
    found = answers[0] if answers else http.shown_error(RequestTimeoutError(
        f"GET /models did not answer within {limit:g} s"))
    if isinstance(found, APIError):
        found._path = "/models"  # its message names the URL called
    return found


def _ask_models(http: _Connection) -> list[str]:
    """The model ids GET /models lists (its body read up to 8 MiB); the APIError saying
    why not is raised. Each read waits _DISCOVERY_SECONDS at most (see _fetch_models)."""
    started = time.monotonic()
    try:
        with http.request("GET", "/models", _DISCOVERY_SECONDS) as response:
            status, server = response.status_code, response.headers.get("server")
            answered = f"HTTP {status} from {server}" if server else f"HTTP {status}"
            http.models_answer = f"GET /models: {answered} in {time.monotonic() - started:.2f} s"
            text = (response.raw.read(8 * 1024 * 1024, decode_content=True) or b"").decode(
                "utf-8", "replace")
    except _TRANSPORT_ERRORS as exc:
        raise http.transport_error(exc, _DISCOVERY_SECONDS) from None
    try:
        payload = json.loads(text) if status < 300 else None
    except ValueError:
        raise http.shown_error(APIError("GET /models answered with something that is not JSON: "
                                        + repr(_trim_message(text)))) from None
    if status >= 300 or (isinstance(payload, dict) and payload.get("error")):
        raise http.error_from_body(status, text, _retry_after(response.headers))
    ids = _model_ids(payload, http.note)
    if not ids:
        raise http.shown_error(APIError("GET /models listed no models"))
    return ids


def _model_ids(payload: Any, note: Callable[[str], None]) -> list[str]:
    """Model ids from any /models shape: {"data": [...]} (OpenAI), {"data": null}
    (Ollama with no models), {"models": [...], "data": [...]} (llama.cpp),
    {"models": [{"name"}]}, a bare list; entries {"id"}, {"name"}/{"model"} or plain
    strings. `note` hears of a shape that is not OpenAI's."""
    entries = payload
    if isinstance(payload, dict):
        entries = payload.get("data")
        if entries is None and "data" in payload:
            note("/models data: null")  # Quirk(Ollama with no model installed)
        if not entries and payload.get("models") is not None:
            # Quirk(llama.cpp, beside "data"; seen in: reference QUIRKS.md §6).
            note('/models as {"models": [...]}')
            entries = payload.get("models")
    elif isinstance(payload, list):
        # Quirk(seen in: reference QUIRKS.md §6): the list alone, no object around it.
        note("/models as a bare list")
    ids: list[str] = []
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict):
            if not entry.get("id"):
                # Quirk(llama.cpp's "models" entries): name and model, no id.
                note('/models entries without "id"')
            entry = entry.get("id") or entry.get("name") or entry.get("model")
        elif isinstance(entry, str):
            # Quirk(seen in: reference QUIRKS.md §6): ids without an object around each.
            note("/models entries as plain strings")
        if isinstance(entry, str) and entry.strip() and entry not in ids:
            ids.append(entry)
    return ids

# ==== Requests ====

# The request parameters of OpenAI's chat completions, accepted by name and sent when not
# None: the properties of CreateChatCompletionRequest in OpenAI's published OpenAPI spec
# (with those of ModelResponseProperties and CreateModelResponseProperties it includes),
# as of 2026-09, 37 in all. "messages", "model", "tools" and "tool_choice" are the
# library's own options below, and "stream" is how the library asks, not an option.
_OPENAI_PARAMETERS: Final = frozenset({
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "moderation", "n",
    "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
    "prompt_cache_options", "prompt_cache_retention", "reasoning_effort", "response_format",
    "safety_identifier", "seed", "service_tier", "stop", "store", "stream_options",
    "temperature", "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})
_OWN_OPTIONS: Final = frozenset({"messages", "system", "model", "tools", "tool_choice",
                                 "max_steps", "timeout", "extra_body", "schema", "deadline",
                                 "extra_headers"})
# The types of the options whose values a server would otherwise refuse, or take wrongly.
_NUMBER: Final = (int, float)
_OPTION_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "prompt": (str,), "system": (str,), "temperature": _NUMBER, "top_p": _NUMBER,
    "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER, "max_tokens": (int,),
    "n": (int,), "seed": (int,)}


@dataclass(eq=False)  # one call: told apart by identity (Client.close() keeps a set)
class _Request:
    """One stream() or generate() call, prepared: the Client's connection (which also
    takes the quirks the call meets), the request body, the tools by name, the budget of
    model calls, the silence limit, the headers, and with schema= the answer's JSON
    Schema and the type hint `data` is built as (Any: the JSON value as it is). While it
    runs: its deadline, the response being read, and why it was stopped ("deadline", or
    "closed" by Client.close()), from another thread."""

    http: _Connection  # the Client's: where the call goes, and where its quirks are noted
    body: dict[str, Any]
    tools: dict[str, Tool]
    max_steps: int
    timeout: float
    headers: dict[str, str]
    schema: dict[str, Any] | None = None
    answer_type: Any = None
    # The schema as the server gets it (see _sent_schema), and whether it is strict.
    sent_schema: dict[str, Any] | None = None
    strict: bool = False
    deadline: float | None = None  # seconds, from `ends - deadline` (time.monotonic())
    ends: float = math.inf
    response: requests.Response | None = None
    stopped: str = ""

    def stop(self, why: str) -> None:
        """End the call from any thread: its response's socket is shut down, so that a
        read blocked on it returns at once (closing the response would not wake it)."""
        self.stopped = self.stopped or why
        sock = _socket_of(self.response)
        if sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def halted(self, ahead: float = 0.0) -> APIError | None:
        """The error of a call that was closed, or whose deadline has passed (or will
        have, `ahead` seconds from now); None when it may go on."""
        if self.stopped == "closed" or self.http.closed.is_set():  # even before it was in flight
            return _client_closed()
        if not self.stopped and time.monotonic() + ahead < self.ends:
            return None
        return _past_deadline(f"the call took longer than its deadline of {self.deadline:g} s")


def _past_deadline(message: str) -> RequestTimeoutError:
    error = RequestTimeoutError(message)
    error._advice = f"Raise the deadline ({_ENV_DEADLINE} or deadline=) if it needs longer"
    return error


def _client_closed() -> StreamError:
    error = StreamError("the Client was closed")
    error.retryable = False  # the same Client cannot succeed
    return error


def _prepare(client: Client, prompt: str | None, options: dict[str, Any]) -> _Request:
    """Check the options and build the request (raises ConfigError, sends nothing; a
    closed Client raises its StreamError)."""
    started = time.monotonic()
    _check_options(options, prompt)
    opts = dict(options)
    # The library's own options leave `opts`; what stays are OpenAI's parameters.
    own = {name: opts.pop(name, None) for name in _OWN_OPTIONS}
    deadline = _parse_number(own["deadline"], "deadline=", client.config.deadline)
    ends = math.inf if deadline is None else started + deadline
    if client._http.closed.is_set():
        raise client._http.shown_error(_client_closed())
    turns = _conversation(own["system"], own["messages"], prompt)
    tools = _as_tools(own["tools"])
    max_steps = DEFAULT_MAX_STEPS if own["max_steps"] is None else own["max_steps"]
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"max_steps must be a whole number of at least 1 (got {max_steps!r})")
    timeout = _parse_number(own["timeout"], "timeout=", client.config.timeout)
    if own["extra_body"] is not None and not isinstance(own["extra_body"], Mapping):
        raise ConfigError("extra_body= must be a dict of fields to add to the request body")
    schema, answer_type = _answer_schema(own["schema"])
    sent, strict = _sent_schema(schema, not isinstance(own["schema"], dict))
    if schema is not None and opts.get("response_format") is not None:
        raise ConfigError("give schema= or response_format=, not both")
    if (opts.get("n") or 1) > 1 and (tools or schema is not None):
        raise ConfigError("n= above 1 goes without tools= and schema=: a tool loop and a "
                          "repair follow one answer")
    headers = {**client._http.headers, **_check_headers(own["extra_headers"], "extra_headers=")}
    model = own["model"] or client.config.model or client._models(
        [DEFAULT_MODEL], DEFAULT_MODEL, ends - started)[0]
    body: dict[str, Any] = {"model": model, "messages": turns}
    body.update((k, v) for k, v in opts.items() if v is not None)
    if tools:
        body["tools"] = [_tool_spec(tool) for tool in tools]
        body["tool_choice"] = "auto" if own["tool_choice"] is None else own["tool_choice"]
    body.update(own["extra_body"] or {})
    return _Request(client._http, body, {tool.name: tool for tool in tools}, max_steps, timeout,
                    headers, schema, answer_type, sent, strict, deadline, ends)


def _check_options(options: Mapping[str, Any], prompt: str | None) -> None:
    """ConfigError for a keyword that is neither the library's nor OpenAI's, and for a
    value of the wrong type (a bool is no number)."""
    for name in [n for n in options if n not in _OWN_OPTIONS and n not in _OPENAI_PARAMETERS]:
        if name == "stream":
            raise ConfigError("stream= is not an option: call stream() to stream, generate() "
                              "for the whole answer")
        close = difflib.get_close_matches(name, sorted(_OWN_OPTIONS | _OPENAI_PARAMETERS), 1)
        hint = f"did you mean {close[0]}=? " if close else ""
        raise ConfigError(f"unknown option {name}=: {hint}Fields a server adds to OpenAI's "
                          f"go in extra_body={{{name!r}: ...}}")
    for name, kinds in _OPTION_TYPES.items():
        value = prompt if name == "prompt" else options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            kind = {str: "a str", int: "a whole number", float: "a number"}[kinds[-1]]
            raise ConfigError(f"{name}= must be {kind}, got {type(value).__name__} "
                              f"{_short(value) if isinstance(value, str) else repr(value)[:40]}")


def _conversation(system: object, messages: object, prompt: str | None) -> list[dict[str, Any]]:
    """The request's turns: `system`, then `messages`, then `prompt` as a user turn."""
    turns: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
    if messages is not None:
        if not (isinstance(messages, (list, tuple))
                and all(isinstance(m, dict) and "role" in m for m in messages)):
            raise ConfigError("messages= must be a list of dicts, each with a role, like "
                              "{'role': 'user', 'content': '...'}")
        turns.extend(dict(m) for m in messages)
    if prompt is not None:
        turns.append({"role": "user", "content": prompt})
    if not turns:
        raise ConfigError("Nothing to send: pass a prompt or messages=")
    return turns


def _answer_schema(schema: Any) -> tuple[dict[str, Any] | None, Any]:
    """The JSON Schema of schema= (a dict as given, or made from a type hint), checked
    for keywords the checker cannot check; and the type hint data is built as."""
    if schema is None:
        return None, None
    if isinstance(schema, (Mapping, str, bytes)) and not isinstance(schema, dict):
        raise ConfigError("schema= must be a JSON Schema dict or a type such as a dataclass")
    built = _schema(schema, "schema=") if not isinstance(schema, dict) else schema
    _vet_schema(built, "schema=")
    # Data is built as the type asks (records and models, nested ones too; 3.0 as an int),
    # but a bare Enum or JSON Schema dict gives the plain JSON value.
    plain = isinstance(schema, dict) or isinstance(schema, type) and issubclass(schema, enum.Enum)
    return built, Any if plain else schema

# ==== Streaming ====
# What a for-loop over a Stream runs, in call order: Stream hands the caller the step
# generator, _iter_steps (model calls, then the tool-call loop's runs and repairs); each
# model call, _model_call, reads its events through few frames between the socket and the
# caller: _model_call (JSON payloads -> Chunks, in-stream errors, [DONE]) <- sseclient-py's
# events() <- _Lines.feed (whole, LF-terminated lines, as the bytes arrive) <- the body's
# chunks. _Answer gathers one call's text, reasoning, refusal, tool-call fragments and
# usage; the tool-call loop's _assemble_calls makes the calls of the fragments.


class Stream(contextlib.AbstractContextManager["Stream", None]):
    """An iterator of Chunks from stream(); also a context manager.

    Breaking out of the loop (when nothing else holds the Stream), close(), or
    leaving a with-block closes the HTTP response. After the loop ends, `result`
    holds the Result (None before).
    """

    def __init__(self, chunks: Generator[Chunk, None, None], outcome: list[Result],
                 model: str = "") -> None:
        # The tool-call loop appends the Result to `outcome` when it ends: the loop's
        # generator must not hold the Stream itself, or a plain `break` would leave the
        # two in a reference cycle and the response open until garbage collection.
        self._chunks = chunks
        self._outcome = outcome
        self.model = model

    def __repr__(self) -> str:
        return f"Stream(model={self.model!r}, finished={bool(self._outcome)})"

    @property
    def result(self) -> Result | None:
        """The Result, once the stream is exhausted; None before."""
        return self._outcome[0] if self._outcome else None

    def __iter__(self) -> Iterator[Chunk]:
        # NOTE: the generator itself, so that a for-loop resumes it directly, without a
        # frame of ours between the caller and each Chunk.
        return self._chunks

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def close(self) -> None:
        """Stop the stream and close its HTTP response."""
        self._chunks.close()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def text(self) -> str:
        """The final answer text (reads the stream to its end if needed)."""
        for _ in self._chunks:
            pass
        return self._outcome[0].text if self._outcome else ""


_REPAIRS: Final = 2  # times a model is asked to mend an answer that breaks schema=


def _iter_steps(request: _Request, outcome: list[Result]) -> Generator[Chunk, None, None]:
    """The loop: a model call; the tools it asked for, run one after another and
    their results sent back; again, until the model answers in text or max_steps
    model calls are spent. With schema=, an answer that does not match goes back
    to the model with what was wrong, twice at most. Yields every Chunk; appends
    the Result to `outcome`. No model call starts past the deadline or on a closed
    Client."""
    _check_async_tools(request.tools)
    http = request.http
    messages: list[dict[str, Any]] = request.body["messages"]
    steps: list[Step] = []
    finish, data, repairs = None, None, 0
    with http.in_flight(request):
        for number in range(1, request.max_steps + 1):
            if (halted := request.halted()) is not None:
                raise halted
            form = http.schema_form
            step = yield from _model_call({**request.body, "messages": list(messages)}, number,
                                          request)
            yield Chunk("finish", finish_reason=step.finish_reason, usage=step.usage, step=number)
            finish = step.finish_reason
            wanted = bool(step.tool_calls and request.tools and finish != "length")
            run_calls = wanted and number < request.max_steps
            results = yield from _iter_tool_calls(step, number, run_calls, request, messages)
            steps.append(replace(step, tool_results=results))
            if run_calls:
                if request.body.get("tool_choice") not in ("auto", "none"):
                    # A forced call ("required", a function) has run: later steps leave the
                    # choice out, as OpenAI's Agents SDK does, so that the model can answer.
                    request.body.pop("tool_choice", None)
                continue
            if wanted:  # and the budget is spent
                finish = "max_steps"
            elif request.schema is not None and not step.refusal:
                problem, data = _read_answer(step.text, request)
                if problem is not None:
                    _ask_repair(http, step, problem, form, messages,
                                last=repairs == _REPAIRS or number == request.max_steps)
                    repairs += 1
                    continue
            break
    outcome.append(_result(steps, finish, messages, data))


_MAX_EVENT_BYTES: Final = 16 * 1024 * 1024
_READ_SIZE: Final = 65536
_DRAIN_SECONDS: Final = 0.1
# Spec (WHATWG server-sent events): the stream is UTF-8, and a raw control character
# inside a JSON string (which strict JSON forbids) still means itself.
_CHUNK_JSON: Final = json.JSONDecoder(strict=False)


def _model_call(body: dict[str, Any], step: int, request: _Request) -> Generator[Chunk, None, Step]:
    """One model call: its text, reasoning and refusal Chunks as they arrive; returns
    its Step (without tool results). Streamed, unless the server cannot: a 200 stream
    with no event at all, or tools on a server whose tool streams are empty, is asked
    for whole instead.

    NOTE: the per-event loop stays in this one frame (no helper generator between the
    events and the caller): every frame a Chunk passes costs time on every event. Over
    40 lines for that reason.
    """
    http, note = request.http, request.http.note
    body["stream"] = True
    # Ask for usage; a server that rejects the field loses it once (prepare drops it).
    body.setdefault("stream_options", {"include_usage": True})
    http.prepare(body, request)
    if "streamed tools" in http.refused and "tools" in body:
        return (yield from _ask_unstreamed(body, request, step))
    event = None  # until the first event comes
    with http.post(body, request) as response:
        if _not_an_event_stream(http, response):
            return (yield from _ask_unstreamed(body, request, step, response))
        answer = _Answer(step, note)
        add = answer.add
        chunks = _body_chunks(response)
        try:
            for event in _iter_events(chunks, note):
                data = event.data
                if data[:1] != "{":
                    data = answer.json_text(data)
                    if not data:
                        if answer.done:
                            break
                        continue
                payload = _CHUNK_JSON.decode(data)
                # Every error form lacks "choices" or has "error" (see _raise_stream_error).
                if "error" in payload or "choices" not in payload:
                    _raise_stream_error(payload, data, event.event, note)
                made = add(payload)
                if isinstance(made, Chunk):
                    yield made
                elif made:  # a list of Chunks, or None
                    yield from made
        except (APIError, ValueError, RecursionError, *_TRANSPORT_ERRORS) as exc:
            raise _cut_short(exc, answer, request) from None
        if answer.done:
            _drain(response, chunks)
    return (yield from _ended(answer, body, request, seen=event is not None))


def _not_an_event_stream(http: _Connection, response: requests.Response) -> bool:
    """Whether a stream request was answered with a JSON document instead of events;
    raises the classified error an HTML page (a proxy's, a web server's) stands for."""
    content_type = response.headers.get("content-type", "").lower()
    if "text/html" in content_type:
        raise http.error_of(response)
    # A JSON document for a stream request: an error with a 200 (LM Studio, for an
    # unknown route) or a complete answer (see _ask_unstreamed).
    return "json" in content_type and "event-stream" not in content_type


def _body_chunks(response: requests.Response) -> Iterable[bytes]:
    """The body's bytes as soon as the socket has them, whatever the framing.

    A chunked body is read one HTTP chunk at a time (urllib3's read_chunked, which
    waits for nothing more); any other body with read1, which returns what has
    arrived (decoded when gzip) instead of waiting for a full buffer as iter_content
    does. NOTE: read1 costs a few microseconds per call more than read_chunked costs
    per chunk, and servers that stream chunk every event.
    """
    raw = response.raw
    if raw.chunked and raw.supports_chunked_reads():
        return raw.read_chunked(decode_content=True)
    read1 = getattr(raw, "read1", None)
    if read1 is None:  # urllib3 < 2.2: one byte at a time is slow but never late
        return response.iter_content(1)
    return iter(functools.partial(read1, _READ_SIZE, decode_content=True), b"")


def _iter_events(chunks: Iterable[bytes], note: Callable[[str], None]
                 ) -> Iterator[sseclient.Event]:
    """The SSE events in body bytes: sseclient-py's parser, fed whole lines. An LF after
    the last chunk ends a partial last line, so that a truncated event reaches the JSON
    parser and fails there, loudly.

    NOTE: map() and chain() are C iterators: the lines cost a call per chunk, not a
    generator frame between the socket and sseclient-py.
    """
    return sseclient.SSEClient(map(_Lines(note).feed, itertools.chain(chunks, [b"\n"]))).events()


_BOM: Final = b"\xef\xbb\xbf"
_LEGACY_ERROR_LINE: Final = re.compile(rb"(?m)^error:")


@dataclass(slots=True)
class _Lines:
    """Regroups body bytes into blocks of whole, LF-terminated lines for sseclient-py,
    applying on the way what the spec (WHATWG server-sent events) asks of a stream's
    bytes and sseclient-py leaves out, and the module's own bound:

    - the bytes are UTF-8: a BOM that opens the stream is dropped (also when split
      between reads), and bytes that are not UTF-8 read as U+FFFD;
    - a line ends at CRLF, LF or a lone CR (also when a CRLF is split): each becomes LF;
    - llama.cpp's legacy `error: {...}` line becomes an `event: error` with its data;
    - one event may not grow past _MAX_EVENT_BYTES (StreamError).

    Only whole lines go on, so that a character or a line split between two reads is
    mended whole. `note` hears of each deviation (OpenAI sends none of them).
    """

    note: Callable[[str], None]
    tail: bytearray = field(default_factory=bytearray)  # the unfinished last line
    open_size: int = 0  # bytes of the event under way, before the tail
    skip_lf: bool = False  # the last chunk ended in a CR: an LF opening the next is its pair
    started: bool = False  # lines have gone on: a BOM can no longer come
    plain: bool = False  # nothing pending: the next chunk may take the short way

    def feed(self, chunk: bytes) -> bytes:
        """The whole lines `chunk` completes (b"" when none).

        NOTE: every event passes here. The common chunk takes the short way: a few
        scans of its bytes and no copy. Any other goes through each rule in turn, in
        this one call (over 40 lines: the rules read in order, and a call per rule
        would cost on every chunk).
        """
        # The short way: one `data:` line and the blank line that ends its event (the
        # chunk's first LF is its last but one byte, and the last is LF too), in ASCII,
        # no longer than an event may be, with nothing pending. No rule below has
        # anything to do: no BOM, CR, bad byte or legacy line, nothing to join.
        size = len(chunk)
        if (self.plain and chunk.find(b"\n") == size - 2 and chunk[-1] == 10
                and size <= _MAX_EVENT_BYTES and chunk.isascii() and chunk.startswith(b"data")):
            return chunk
        # Spec: a line ends at CRLF, LF or a lone CR. A CR that ends the chunk may be half
        # of a CRLF: it ends its line now (no delay for CR-only servers), and an LF that
        # opens the next chunk is dropped.
        if self.skip_lf:
            chunk = chunk.removeprefix(b"\n")
        self.skip_lf = chunk[-1:] == b"\r"
        if b"\r" in chunk:
            # Quirk(sse-starlette, Azure, proxies): OpenAI ends lines with LF alone.
            self.note("CR or CRLF line endings in streams")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        # Whole lines only: the unfinished last one waits in `tail` for its end.
        cut = chunk.rfind(b"\n") + 1
        block = chunk[:cut]
        if cut and self.tail:
            block = b"".join((self.tail, block))
            self.tail.clear()
        self.tail += chunk[cut:]
        # Spec: the UTF-8 decoder drops one BOM that opens the stream. No server is known
        # to send one; sseclient-py would lose the first event behind it.
        if block and not self.started:
            self.started = True
            if block.startswith(_BOM):
                self.note("BOM before the first event")
                block = block[len(_BOM):]
        # The module's bound, not the spec's (a server that never ends an event would fill
        # the memory): the first event that ends in this block (a blank line that opens
        # the block ends the event before it), then the one under way, tail included.
        end = block.rfind(b"\n\n")
        ended = 0
        if end >= 0 or block[:1] == b"\n":
            ended = self.open_size + block.find(b"\n\n")
            self.open_size = len(block) - end - 2
        else:
            self.open_size += len(block)
        if max(ended, self.open_size + len(self.tail)) > _MAX_EVENT_BYTES:
            raise StreamError(f"one stream event is larger than {_MAX_EVENT_BYTES} bytes")
        self.plain = self.started and not (self.tail or self.open_size or self.skip_lf)
        if not block.isascii():
            try:
                block.decode("utf-8")
            except UnicodeDecodeError:
                # Spec: the UTF-8 decoder reads each invalid sequence as U+FFFD.
                # Quirk(llama.cpp): a token that splits a multibyte character, streamed
                # alone.
                self.note("invalid UTF-8 in streams (read as U+FFFD)")
                block = block.decode("utf-8", "replace").encode("utf-8")
        if b"error:" in block:
            # Quirk(llama.cpp, older builds): `error: {...}` instead of a data line, which
            # sseclient-py, as the spec asks of an unknown field, would drop.
            block, count = _LEGACY_ERROR_LINE.subn(b"event: error\ndata:", block)
            if count:
                self.note("legacy `error:` lines in streams")
        return block


def _raise_stream_error(payload: Any, data: str, event: str,
                        note: Callable[[str], None]) -> None:
    """Raise the classified error an event inside a 200 stream carries, if any.

    Forms: {"error": {...}} (OpenAI, vLLM, LiteLLM, TGI), {"object": "error", ...}
    (vLLM < 0.10.1, Mistral), `event: error` (Groq), and llama.cpp's legacy `error:
    {...}` line (made an `event: error` by _Lines), whose JSON is the error itself.
    A transport word in the message (LiteLLM's "Connection error") is still a stream
    cut short here: the connection to this client is fine.
    """
    err = payload.get("error")
    if err is None and payload.get("object") != "error" and event != "error":
        return
    if payload.get("object") == "error":
        note("errors in streams as object: error")  # Quirk(vLLM < 0.10.1, Mistral)
    if err is None and event == "error":
        err = payload  # a legacy `error:` line (noted by _Lines): the JSON is the error
    elif event == "error":
        note("errors in streams as event: error")  # Quirk(Groq)
    # The form of the body was noted above, as a whole: not each of its fields.
    message, tags = _error_fields({"error": err} if isinstance(err, dict) else payload,
                                  lambda quirk: None)
    message = _trim_message(message or "error event without a message")
    cls = classify_error(f"{message} {tags}")
    if cls is APIError or cls in _NO_RESPONSE_CLASSES:
        cls = StreamError
    # Quirk(TGI): http_status_code; Groq: status_code; LiteLLM: code "503" as a string.
    fields: dict[str, Any] = err if isinstance(err, dict) else {}
    code = next((fields[key] for key in ("status_code", "http_status_code", "code", "status")
                 if isinstance(fields.get(key), int) or str(fields.get(key)).isdigit()), None)
    if isinstance(code, str):
        note("error codes as strings of digits")
    raise cls(message, status_code=None if code is None else int(code),
              body=data[:_MAX_ERROR_BODY])


def _cut_short(exc: BaseException, answer: _Answer, request: _Request) -> APIError:
    """The error of a stream that failed after its answer began (never retried: the
    caller has seen part of it), keeping the text that had arrived; a stream stopped
    by its deadline or by close() says so."""
    if isinstance(exc, (ValueError, RecursionError)):
        exc = StreamError("the stream was cut short or sent malformed JSON")
    error = request.halted() or (exc if isinstance(exc, APIError) else
                                 request.http.transport_error(exc, request.timeout, "stream"))
    error.partial_text = "".join(answer.text)
    return error


def _ended(answer: _Answer, body: dict[str, Any], request: _Request,
           seen: bool) -> Generator[Chunk, None, Step]:
    """How a stream ended: its Step, or a StreamError when it was cut short. A stream in
    which no event was `seen` is asked for again, unstreamed: that answer's Chunks, then
    its Step."""
    http = request.http
    if not seen and not request.stopped:
        # Quirk(llama-cpp-python): a 200 stream with no event at all (a failure after the
        # headers), for instance for streamed tool_choice "auto" or a prompt beyond the
        # context. Nothing was yielded: ask once more without streaming, which answers or
        # raises the classified error. With tools, assume the server cannot stream them
        # and stop trying.
        tools = "tools" in body
        http.refuse("the server ended a stream without any event", "tool calls only unstreamed"
                    if tools else "empty 200 stream: asked again without streaming",
                    *["streamed tools"] * tools)
        return (yield from _ask_unstreamed(body, request, answer.step))
    _note_model(http, body.get("model"), answer.model)
    if not answer.done and answer.finish_reason is None:
        raise _cut_short(StreamError("the stream ended before the answer was finished (no "
                                     "finish_reason, no [DONE])"), answer, request)
    if not answer.done:
        # Quirk(transformers serve; llama.cpp and Ollama after an error: seen in reference
        # QUIRKS.md §1.4): OpenAI ends every stream with [DONE].
        http.note("no [DONE] at the end of streams")
    step = answer.finish()
    options = body.get("stream_options")
    if step.usage is None and isinstance(options, dict) and options.get("include_usage"):
        http.note("no usage in streams")  # Quirk(llama-cpp-python): include_usage ignored.
    return step


def _ask_unstreamed(body: dict[str, Any], request: _Request, step: int,
                    response: requests.Response | None = None) -> Generator[Chunk, None, Step]:
    """One model call answered whole, read as one event whose choice holds the whole
    message: its Chunks, then its Step. Asked for without streaming (servers send such
    an answer only once it is complete), unless `response` is the JSON document a
    server sent to a stream request."""
    http = request.http
    if response is None:
        body.pop("stream", None)
        body.pop("stream_options", None)  # vLLM answers 400 to it without stream: true
        response = http.post(body, request)
    with response:
        payload = http.read_json(response, request)
    if isinstance(payload, dict):
        if "stream" in body and payload.get("choices"):
            # Quirk(a complete answer to a stream request: seen in reference QUIRKS.md
            # §1.7, which names no server; LM Studio's 200 for an unknown route is an error).
            http.note("one JSON document for a stream request")
        _note_model(http, body.get("model"), payload.get("model"))
    if not isinstance(payload, dict) or payload.get("error") or payload.get("object") == "error":
        text = json.dumps(payload, ensure_ascii=False)
        raise _error_from_body(200, text, http.note, decoded=payload)
    if _choice_zero(payload.get("choices")) is None:
        raise APIError("the server answered without choices: " + _trim_message(
            json.dumps(payload, ensure_ascii=False)))
    answer = _Answer(step, http.note, streamed=False)
    made = answer.add(payload)
    yield from made if isinstance(made, list) else [made] if made is not None else []
    return answer.finish()


def _note_model(http: _Connection, asked: object, answered: object) -> None:
    """Warn (a UserWarning, shown once) when the server answers with another model than
    asked: most likely a typo in the name, for the program to fix.

    Quirk(llama.cpp, TGI, llama-cpp-python): an unknown model is answered by the one
    they have loaded. A name inside the other (a dated version, a provider prefix) is
    the same model.
    """
    # An empty name is inside any other: no warning.
    if (not isinstance(asked, str) or not isinstance(answered, str)
            or asked.lower() in answered.lower() or answered.lower() in asked.lower()):
        return
    http.note("answers with another model than asked", logged=True)  # the warning tells it
    warnings.warn(f"asked for model {asked!r}, {http.shown_url} answered with "
                  f"{answered!r}: it may not serve {asked!r} (a typo in the name?)",
                  UserWarning, stacklevel=2)


# Quirk(TGI < 2.3, TGI stop strings, Anthropic-compat): other names for a normal stop.
_STOP_ALIASES: Final = frozenset({"eos_token", "eos", "stop_sequence", "end_turn", "end"})
# The keys of a delta that is just text: the common case, taken without more lookups.
_TEXT_DELTA: Final = frozenset({"content", "role"})


@dataclass(slots=True)
class _Answer:
    """One model call while its events arrive: text, reasoning and refusal (as lists
    of pieces), tool-call fragments, usage, finish_reason, the model that answered,
    and whether [DONE] came. `note` hears of each deviation absorbed."""

    step: int
    note: Callable[[str], None]
    streamed: bool = True
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    # (position in its delta's tool_calls list, fragment), in arrival order
    fragments: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    usage: Any = None
    finish_reason: str | None = None
    model: str | None = None  # the "model" of the first event, "" if none
    done: bool = False  # [DONE] arrived
    others: dict[int, list[str]] = field(default_factory=dict)  # n > 1: choice 1 on

    def add(self, payload: dict[str, Any]) -> Chunk | list[Chunk] | None:
        """Take one decoded event; return its Chunk, a list of them, or None.

        NOTE: runs once per event; its common case (one text delta) costs a few dict
        lookups and one Chunk, inline (over 40 lines: a call costs on every event);
        anything rarer goes through _mixed_delta.
        """
        if self.model is None:
            self.model = payload.get("model") or ""
        usage = payload.get("usage")
        choices = payload.get("choices")
        if usage:
            self.usage = usage
            if choices and self.streamed:
                # Quirk(vLLM continuous usage, LiteLLM, Groq, Mistral): OpenAI sends usage
                # alone, in a last chunk whose choices are [].
                self.note("usage chunk with choices")
        if not choices or choices.__class__ is not list:
            return None
        choice = choices[0]
        if len(choices) > 1 or choice.__class__ is not dict or choice.get("index"):
            # With n > 1 (OpenAI, vLLM) the choices interleave: follow index 0, keep the
            # text of the others. None of them: an empty choice, which yields nothing.
            self._keep_others(choices)
            choice = _choice_zero(choices) or {}
        # A whole answer's choice holds a message (see _ask_unstreamed); a stream's, a delta.
        delta = choice.get("delta") or choice.get("message")
        content = delta.get("content") if delta.__class__ is dict else None
        if content.__class__ is str and (len(delta) == 1 or _TEXT_DELTA.issuperset(delta)):
            made: Chunk | list[Chunk] | None = None
            if content:
                self.text.append(content)
                made = _delta_chunk("text", content, self.step, payload)
        else:
            made = self._mixed_delta(delta, content, payload) if delta.__class__ is dict else None
        reason = choice.get("finish_reason")
        if reason and isinstance(reason, str):
            if reason == "error":
                # Quirk(OpenRouter): finish_reason "error" with the error at top level.
                self.note("finish_reason 'error' for an error")
                raise StreamError("the server ended the answer with an error")
            self.finish_reason = reason
        return made

    def _mixed_delta(self, delta: dict[str, Any], content: Any, raw: Any) -> list[Chunk]:
        chunks = self._content_parts(content, raw) if content else []
        # Quirk(DeepSeek, vLLM, llama.cpp: reasoning_content; Ollama, Groq, OpenRouter:
        # reasoning): OpenAI streams no reasoning text.
        for key in ("reasoning_content", "reasoning"):
            reasoning = delta.get(key)
            if reasoning and isinstance(reasoning, str):
                self.note(f"reasoning in {key}")
                chunks.append(self._piece("reasoning", reasoning, raw))
                break
        refusal = delta.get("refusal")
        if refusal and isinstance(refusal, str):
            # OpenAI's structured refusal: shown like text, kept apart from the answer.
            chunks.append(self._piece("refusal", refusal, raw))
        # Quirk(llama-cpp-python): a legacy function_call beside tool_calls with the
        # same content; used only when no tool_calls come with it (as the one call).
        calls = delta.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                self.note("tool_calls as one object, not a list")  # Quirk(TGI < 3.2)
                calls = [calls]
            self.fragments += [(i, c) for i, c in enumerate(calls) if isinstance(c, dict)]
            if delta.get("function_call"):
                self.note("legacy function_call beside tool_calls")
        elif isinstance(delta.get("function_call"), dict):
            # Quirk(none seen: reference QUIRKS.md §3.7 found no server that sends a
            # function_call alone; read as the one call, as OpenAI's legacy format meant).
            self.note("legacy function_call instead of tool_calls")
            self.fragments.append((0, {"index": 0, "function": delta["function_call"]}))
        return chunks

    def _content_parts(self, content: Any, raw: Any) -> list[Chunk]:
        if not isinstance(content, str):
            # Quirk(Mistral magistral): content is a list of typed parts; "thinking"
            # parts hold reasoning as a nested list of text parts.
            self.note("content as a list of parts")
        chunks = []
        for part in content if isinstance(content, list) else [content]:
            part = {"text": part} if isinstance(part, str) else part
            thinking = isinstance(part, dict) and part.get("type") in ("thinking", "reasoning")
            text = part.get("thinking" if thinking else "text") if isinstance(part, dict) else ""
            if isinstance(text, list):
                text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
            if text and isinstance(text, str):
                chunks.append(self._piece("reasoning" if thinking else "text", text, raw))
        return chunks

    def _keep_others(self, choices: list[Any]) -> None:
        """The text of the choices other than index 0, by index."""
        for choice in choices:
            index = choice.get("index") if isinstance(choice, dict) else None
            index = int(index) if isinstance(index, str) and index.isdigit() else index
            delta = (choice.get("delta") or choice.get("message")) if index else None
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(index, int) and isinstance(text, str) and text:
                self.others.setdefault(index, []).append(text)

    def _piece(self, kind: ChunkType, text: str, raw: Any) -> Chunk:
        """A piece of text, reasoning or refusal added to the list of that name; its
        Chunk."""
        getattr(self, kind).append(text)
        return _delta_chunk(kind, text, self.step, raw)

    def json_text(self, data: str) -> str:
        """An event's data that does not start with "{": "" for [DONE] (then `done`)
        and for data to skip; else the JSON text, its padding stripped."""
        stripped = data.strip()
        if stripped.startswith("[DONE]"):
            if data != "[DONE]":
                # Quirk(servers unnamed in reference QUIRKS.md §1.4): a space before
                # [DONE], or padding after it.
                self.note("spaces around [DONE]")
            self.done = True
            return ""
        if not stripped.startswith("{"):
            # Quirk(gateways; none named in the reference notes): data lines of their own
            # that are not JSON are skipped, not taken for a broken stream.
            self.note("non-JSON data in streams skipped")
            _log.debug("skipping a stream event that is not JSON: %.80r", stripped)
            return ""
        return stripped

    def finish(self) -> Step:
        """The model call's Step, its tool calls assembled (their results come later)."""
        calls = _assemble_calls(self.fragments, self.streamed, self.note)
        reason = self.finish_reason
        if reason in _STOP_ALIASES:
            self.note(f"finish_reason {reason!r} for stop")
            reason = "stop"
        elif reason is None:  # a whole answer without one says nothing of its calls
            reason = "tool_calls" if calls and self.streamed else "stop"
        text = "".join(self.text)
        return Step(text, "".join(self.reasoning), "".join(self.refusal), calls, [], reason,
                    _usage(self.usage),
                    [text, *("".join(self.others[i]) for i in sorted(self.others))])


def _choice_zero(choices: Any) -> dict[str, Any] | None:
    """The choice with index 0 (or none): with n > 1 (OpenAI, vLLM) chunks of several
    choices interleave, and only the first answer is followed, never braided. An index
    "0", a string, counts as 0 (no server is known to send one)."""
    return next((choice for choice in (choices if isinstance(choices, list) else ())
                 if isinstance(choice, dict) and choice.get("index") in (None, 0, "0")), None)


def _usage(raw: Any) -> Usage | None:
    """The Usage of a usage object: a missing or non-integer count reads 0, and a missing
    total the sum (no server is known to leave one out: a guard, not a quirk)."""
    if not isinstance(raw, dict):
        return None
    counts = [raw.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
    prompt, completion, total = (c if type(c) is int else 0 for c in counts)
    return Usage(prompt, completion, total or prompt + completion, raw)

# ==== Tool-call loop ====


def _check_async_tools(tools: Mapping[str, Tool]) -> None:
    """ConfigError naming a coroutine-function tool when this thread runs an event
    loop: asyncio.run() cannot run it there, and nothing must be sent in vain."""
    names = [tool.name for tool in tools.values() if inspect.iscoroutinefunction(tool.function)]
    if not names:
        return
    import asyncio  # here, not at the top: only coroutine tools need it (it is slow to import)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise ConfigError(f"tool {names[0]!r} is an async def function and this thread runs an event "
                      "loop, where the synchronous tool loop cannot await it: call generate() "
                      "from a worker thread (asyncio.to_thread), or give a plain function")


@dataclass
class _PartialCall:
    """A tool call while its fragments arrive."""

    id: str
    name: str = ""
    parts: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _assemble_calls(fragments: list[tuple[int, dict[str, Any]]], streamed: bool,
                    note: Callable[[str], None]) -> list[ToolCall]:
    """The tool calls of one model call, from its fragments (position in their delta's
    list, fragment) in arrival order, whatever the server.

    A fragment with a new non-empty id starts a call (even when its index is reused);
    a known id continues its call (TGI and llama-cpp-python repeat it); without an id,
    the call with the same index continues; with neither, the latest call. The index
    is a key, never a list position (it may start at 1 or be missing). Names are set
    once, from the first non-empty value (TGI repeats it, LM Studio later sends "").
    Arguments are only appended, and parsed once the model call has ended.
    `streamed`: False for a whole answer, whose calls have no index. (Over 40 lines
    with this docstring: the three ways a fragment finds its call are one decision.)
    """
    calls: list[_PartialCall] = []
    by_index: dict[Any, _PartialCall] = {}
    for position, fragment in fragments:
        call_id = "" if fragment.get("id") in (None, "") else str(fragment["id"])
        index = fragment.get("index")
        index = index if isinstance(index, (int, str)) else None
        function = fragment.get("function")
        function = function if isinstance(function, dict) else {}
        call = next((c for c in calls if c.id == call_id), None) if call_id else None
        if call is not None:
            # Quirk(TGI, llama-cpp-python, LiteLLM): OpenAI sends the id once.
            note("tool call id repeated on later deltas")
        else:
            if index is None and streamed:
                note("tool calls streamed without index")  # Quirk(Gemini, Mistral, LM Studio)
            if not call_id and index in by_index:
                call = by_index[index]
            # Quirk(LM Studio, Gemini through proxies): calls with "id": "" and no index.
            # A name where the latest call already has one starts the next call; servers
            # that repeat a name on every delta also repeat an id or an index.
            elif not call_id and index is None and calls and not (
                    position or calls[-1].name and function.get("name")):
                call = calls[-1]
            else:
                if index in by_index:
                    # Quirk(a proxy in front of Gemini; seen in: reference QUIRKS.md
                    # §3.1): index 0 for every call, each with its own id.
                    note("tool call index reused for another call")
                call = _PartialCall(call_id)
                calls.append(call)
            if index is not None:
                by_index[index] = call
        _add_fragment(call, fragment, function, note)
    first = min((i for i in by_index if isinstance(i, int)), default=0)
    if streamed and first > 0:
        # Quirk(Anthropic-compat, LiteLLM -> Bedrock): the index is a key, not a position.
        note(f"tool call index starting at {first}")
    return _finish_calls(calls, note)


def _add_fragment(call: _PartialCall, fragment: dict[str, Any], function: dict[str, Any],
                  note: Callable[[str], None]) -> None:
    """Add a fragment, its "function" ({} when it has none), to its call."""
    name = function.get("name")
    if name and isinstance(name, str):
        if not call.name:
            call.name = name
        else:
            # Quirk(llama-cpp-python, LiteLLM): the whole name on every delta.
            note("tool call name repeated")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        call.parts.append(arguments)
    elif isinstance(arguments, (dict, list)):
        # Quirk(TGI < 3.2): arguments as a JSON object, not a string.
        note("tool arguments as an object, not a string")
        call.parts.append(json.dumps(arguments))
    for key, value in fragment.items():
        if key not in ("index", "id", "type", "function") and value is not None:
            call.extra.setdefault(key, value)


def _finish_calls(calls: list[_PartialCall], note: Callable[[str], None]) -> list[ToolCall]:
    """The ToolCalls, their arguments parsed, made-up ids where the server sent none."""
    done = []
    for call in calls:
        if not call.id:
            # Quirk(LM Studio, Gemini through proxies, TGI < 3.2). Each result goes back
            # under its call's id, so made-up ids are unique too; nine letters and digits
            # is the form Mistral requires of ids sent back to it.
            note("tool calls without ids: ids made up")
            while not call.id or call.id in {other.id for other in calls if other is not call}:
                call.id = "".join(random.choices(string.ascii_letters + string.digits, k=9))
        raw = "".join(call.parts)
        arguments, error = _parse_arguments(raw, note)
        if not call.name and isinstance(arguments.get("function"), dict):
            # Quirk(TGI < 3.2): no name; the raw grammar output wraps the arguments as
            # {"function": {"_name": "get_weather", ...}} (plus a special token).
            note("tool name inside the arguments (_name)")
            arguments = dict(arguments["function"])
            call.name = str(arguments.pop("_name", ""))
        done.append(ToolCall(call.id, call.name, arguments, raw, error, call.extra))
    return done


def _parse_arguments(raw: str, note: Callable[[str], None]) -> tuple[dict[str, Any], str | None]:
    """A call's arguments as a dict, and why they could not be read (or None)."""
    text = raw.strip() or "{}"  # no arguments at all: an empty object
    # Quirk(TGI < 3.2): the raw output ends in a special token such as <|eot_id|>, after
    # the JSON (which can never end in one).
    trimmed = re.sub(r"(?:<\|[^|>]*\|>|</s>)+\s*$", "", text)
    try:
        value, strict = json.loads(trimmed), True
    except ValueError:
        # Quirk(llama-cpp-python, small models): a raw newline or tab inside a string,
        # which strict JSON forbids but whose meaning is plain.
        try:
            value, strict = json.loads(trimmed, strict=False), False
        except ValueError as exc:
            return {}, f"arguments are not valid JSON ({exc})"
    if trimmed != text:
        note("special token after tool arguments")
    if not strict:
        note("raw newlines in tool arguments")
    if isinstance(value, str):
        # Quirk(IBM watsonx.ai, reported in quarkus-langchain4j issue 2569): the
        # arguments string is itself a JSON string.
        with contextlib.suppress(ValueError):
            value = json.loads(value)
            note("tool arguments encoded twice")
    if not isinstance(value, dict):
        return {}, f"arguments must be a JSON object, got {type(value).__name__}"
    return value, None


def _iter_tool_calls(step: Step, number: int, run: bool, request: _Request,
                     messages: list[dict[str, Any]]) -> Generator[Chunk, None, list[ToolResult]]:
    """The calls of model call `number` as Chunks, each run when `run` is set (a
    "tool_result" Chunk after its "tool_call" one), the conversation extended; returns
    the results."""
    # Calls that are not run stay out of the history: a conversation whose assistant
    # turn asks for tools must be followed by their results.
    messages.append(_assistant_message(step, with_calls=run))
    results: list[ToolResult] = []
    for call in step.tool_calls:
        yield Chunk("tool_call", tool_call=call, step=number)
        if run:
            results.append(_execute(call, request.tools, request.http.note))
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": results[-1].content})
            yield Chunk("tool_result", tool_call=call, tool_result=results[-1], step=number)
    return results


def _assistant_message(step: Step, *, with_calls: bool) -> dict[str, Any]:
    # content "" rather than null: llama-cpp-python rejects null (500), Ollama takes
    # null only with tool_calls, llama.cpp/OpenAI/vLLM/LiteLLM take "".
    message: dict[str, Any] = {"role": "assistant", "content": step.text}
    if with_calls and step.tool_calls:
        message["tool_calls"] = [
            {**call.raw, "id": call.id, "type": "function",
             # Quirk(Ollama): arguments must be valid JSON text ("{}" when empty).
             "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}
            for call in step.tool_calls
        ]
    return message


def _execute(call: ToolCall, tools: Mapping[str, Tool], note: Callable[[str], None]
             ) -> ToolResult:
    """Run one call; any failure becomes the error the model reads, never an exception.
    A tool function that raises is logged at WARNING with its traceback."""
    def failed(error: str, exception: BaseException | None = None) -> ToolResult:
        return ToolResult(call, None, error, _tool_content({"error": error}), exception)

    if call.error:
        return failed(f"{call.error}; received: {call.raw_arguments[:500]!r}")
    if call.name not in tools:
        return failed(f"unknown tool {call.name!r}; available tools: {', '.join(tools) or 'none'}")
    try:
        arguments = _tool_arguments(tools[call.name], call.arguments, note)
    except Exception as exc:  # noqa: BLE001 - the arguments' problem goes back to the model
        return failed(f"{type(exc).__name__}: {exc}")
    try:
        value = _run_tool(tools[call.name], arguments)
    except Exception as exc:  # noqa: BLE001 - and so does any failure of the tool
        _log.warning("tool %s raised %s: %s", call.name, type(exc).__name__, exc, exc_info=exc)
        return failed(f"{type(exc).__name__}: {exc}", exc)
    return ToolResult(call, value, None, _tool_content(value))


def _tool_arguments(tool: Tool, arguments: dict[str, Any], note: Callable[[str], None]
                    ) -> dict[str, Any]:
    """The model's arguments checked against the tool's schema and built as the
    function's type hints ask (an Enum member, a dataclass or pydantic instance, an int).

    null for an optional parameter means "left out" (its default applies; `note`
    hears of it). Raises TypeError naming a missing required argument or an
    unexpected one, and ValueError naming the field, what was expected and what came
    for a value that does not match the tool's schema.
    """
    if tool.function is None:
        raise TypeError(f"tool {tool.name!r} has no function to run")
    arguments, problem = _checked(arguments, tool.parameters, note)
    properties = tool.parameters.get("properties") or {}
    missing = [n for n in tool.parameters.get("required") or () if n not in arguments]
    if missing:
        raise TypeError(f"missing required argument(s): {', '.join(missing)}")
    unknown = [n for n in arguments if properties and n not in properties]
    if unknown and not tool._takes_any:
        raise TypeError(f"unexpected argument(s): {', '.join(unknown)}")
    if problem:
        raise ValueError(problem)
    return {n: _build(v, tool.hints.get(n, Any)) for n, v in arguments.items()}


def _run_tool(tool: Tool, arguments: dict[str, Any]) -> Any:
    """Call the function with the arguments as keywords (a coroutine function runs to
    its end); what it raises is the tool's own failure."""
    assert tool.function is not None  # _tool_arguments said so
    value = tool.function(**arguments)
    if inspect.iscoroutinefunction(tool.function):
        import asyncio  # see _check_async_tools

        return asyncio.run(value)
    if inspect.isawaitable(value):
        getattr(value, "close", lambda: None)()  # no "never awaited" warning
        raise TypeError(f"tool {tool.name!r} returned {type(value).__name__} object, which "
                        "must be awaited: make the tool an async def function")
    return value


def _tool_content(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


_NO_JSON: Final = "no JSON value in the answer"


def _read_answer(text: str, request: _Request) -> tuple[str | None, Any]:
    """(what is wrong, None) or (None, the data) for an answer to schema=."""
    try:
        value = _json_from_text(text)
    except ValueError as exc:
        return f"{_NO_JSON} ({exc})", None
    value, problem = _checked(value, request.schema, request.http.note)
    if problem is not None:
        return problem, None
    try:
        return None, _build(value, request.answer_type)
    except (ValueError, TypeError) as exc:  # a pydantic model's own validators
        return f"$: {_trim_message(str(exc))}", None


def _checked(value: Any, schema: Any, note: Callable[[str], None]) -> tuple[Any, str | None]:
    """`value` without the nulls that mean "left out" (see _prune_nulls; noted once), and
    the first way it breaks `schema` (None: it conforms)."""
    value, dropped = _prune_nulls(value, schema)
    if dropped:
        # Quirk(any server: models write null for an argument they leave out, as real
        # tool-call datasets do; OpenAI and vLLM following a strict schema, where a field
        # that may be left out is required and nullable, must).
        note("null for optional fields: left out")
    return value, _validate(value, schema)


_THINK: Final = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
_FENCE: Final = re.compile(r"```[^\n`]*\n(.*?)(?:```|$)", re.DOTALL)
_JSON_START: Final = re.compile(r"[{\[]")


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
    with contextlib.suppress(ValueError):
        return json.loads(text)
    decoder, first_error = json.JSONDecoder(), None
    for piece in [*(m.group(1) for m in _FENCE.finditer(text)), text]:
        for start in _JSON_START.finditer(piece):
            try:
                return decoder.raw_decode(piece, start.start())[0]
            except json.JSONDecodeError as exc:
                first_error = first_error or exc
    if first_error is None:
        raise ValueError("the answer holds no JSON object or array")
    raise ValueError(f"the answer holds no complete JSON value ({first_error.msg})")


def _ask_repair(http: _Connection, step: Step, problem: str, form: str,
                messages: list[dict[str, Any]], last: bool) -> None:
    """Send an answer to schema= that does not match back to the model, saying what is
    wrong (OutputError when it was the `last` chance). An answer without JSON, to a
    request whose response_format `form` the server took without a word, leaves the form
    behind (see _Connection.schema_form)."""
    if last:
        raise OutputError(f"the answer does not match the schema: {problem}",
                          partial_text=step.text)
    if problem.startswith(_NO_JSON) and form and step.finish_reason == "stop":
        # Quirk(transformers serve): response_format ignored without a word, and prose
        # came back: the model must see the schema itself.
        http.refuse("the answer held no JSON", "response_format ignored: the schema in a "
                    "system message", form)
    messages.append({"role": "user", "content": "That answer does not match the JSON "
                     f"Schema: {problem}. Answer again with the corrected JSON only."})

# ==== Tools ====

_TOOL_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_JSON_TYPES: Final[dict[type, str]] = {str: "string", int: "integer", float: "number",
                                       bool: "boolean"}
# The JSON type of a hint, by the hint itself or its origin (list[int]: list).
_HINT_TYPES: Final[dict[Any, str]] = {**_JSON_TYPES, list: "array", tuple: "array", dict: "object"}
# TypedDict's Required[...], NotRequired[...] (3.11+) and ReadOnly[...] (3.13+) wrap a key's type.
_KEY_MARKS: Final = tuple(getattr(typing, name) for name in ("Required", "NotRequired", "ReadOnly")
                          if hasattr(typing, name))


@dataclass(frozen=True)
class Tool:
    """A tool the model may call: its name, description, JSON Schema of its
    arguments (an object), and the function that runs it (called with the
    arguments as keywords, once they match that schema; an async def function is
    run to its end). hints: the type hint of each parameter, from which its
    argument is built; filled for a function given as a tool. Raises ConfigError
    for a bad name, or a schema the module's checker cannot check."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any] | None = None
    # The function's type hint per parameter, from which each argument is built (an Enum
    # member, a dataclass or pydantic instance, an int). Empty for a Tool made by hand: its
    # arguments are checked against its schema and passed as they came.
    hints: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Whether the module built `parameters` from the function's hints (and may send them
    # in strict form, see _sent_schema); a schema written by hand goes as written.
    _built: bool = field(default=False, repr=False, compare=False)
    # Read from the function's signature once, here, not on every call (it is slow):
    # whether it takes **kwargs, so that names its schema lacks may pass.
    _takes_any: bool = field(default=True, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TOOL_NAME.match(self.name):
            raise ConfigError(f"tool name {self.name!r} must be 1-64 letters, digits, _ or -")
        if not isinstance(self.parameters, dict):
            raise ConfigError(f"tool {self.name!r}: parameters must be a JSON Schema dict")
        _vet_schema(self.parameters, f"tool {self.name!r} parameters")
        if self.function is not None:
            # A function whose signature cannot be read keeps the default: any name may pass.
            with contextlib.suppress(TypeError, ValueError):
                kinds = [p.kind for p in inspect.signature(self.function).parameters.values()]
                object.__setattr__(self, "_takes_any", inspect.Parameter.VAR_KEYWORD in kinds)


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
    out: list[Tool] = []
    for position, item in enumerate(tools if isinstance(tools, (list, tuple)) else [tools]):
        if isinstance(item, Tool):
            out.append(item)
        elif isinstance(item, dict):
            out.extend(_tool_from_entry(key, value) for key, value in item.items())
        elif callable(item):
            out.append(_tool_from_function(item))
        else:
            raise ConfigError(f"tools[{position}] is a {type(item).__name__}: give a function, "
                              "an oc.Tool, or a dict of name -> tool")
    names = [tool.name for tool in out]
    if len(set(names)) < len(names):
        raise ConfigError(f"two tools are named {next(n for n in names if names.count(n) > 1)!r}")
    return out


def _tool_from_entry(name: object, value: object) -> Tool:
    if isinstance(value, Tool):
        return value if value.name == name else replace(value, name=str(name))
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


def _tool_spec(tool: Tool) -> dict[str, Any]:
    """The request form of a tool, marked strict when its schema allows (_sent_schema)."""
    parameters, strict = _sent_schema(tool.parameters, tool._built)
    function = {"name": tool.name, "description": tool.description, "parameters": parameters}
    return {"type": "function", "function": {**function, "strict": True} if strict else function}

# OpenAI's strict subset (Structured Outputs): the keywords a strict schema may use.
_STRICT_KEYWORDS: Final = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "anyOf", "enum", "const",
    "$ref", "$defs", "definitions", "description", "title", "pattern", "format", "minimum",
    "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems"})


def _sent_schema(schema: dict[str, Any] | None, built: bool) -> tuple[Any, bool]:
    """The schema as the server gets it, and whether it goes with "strict": true.

    OpenAI enforces a schema, and vLLM constrains a forced call by it, only when it is
    strict. A schema the module built goes in OpenAI's strict form when that subset can
    say it (see _strict_node; never a root that is not an object); one written by hand
    goes exactly as written, strict only when it already is in that form. The module's
    checker checks answers against `schema`.
    """
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return schema, False
    try:
        strict = _strict_node(schema)
    except ValueError:
        return schema, False
    return (strict, True) if built or strict == schema else (schema, False)


def _strict_node(schema: Any) -> dict[str, Any]:
    """`schema` in OpenAI's strict form; ValueError where its subset cannot say it (a
    free-form object, an array without items, Any, a keyword outside the subset). Every
    object lists all its properties in required; one that was not required becomes
    nullable (its null means "left out", see _prune_nulls); additionalProperties is
    false; defaults are dropped."""
    node = {k: v for k, v in schema.items() if k != "default"} if isinstance(schema, dict) else {}
    if not node.keys() & {"type", "anyOf", "enum", "const", "$ref"} or (
            node.keys() - _STRICT_KEYWORDS):
        raise ValueError(schema)
    for key in ("properties", "$defs", "definitions"):
        if key in node:
            node[key] = {name: _strict_node(sub) for name, sub in node[key].items()}
    if "anyOf" in node:
        node["anyOf"] = [_strict_node(sub) for sub in node["anyOf"]]
    kinds = _types_of(node)
    if "items" in node:
        node["items"] = _strict_node(node["items"])
    elif "array" in kinds:
        raise ValueError(schema)
    if "object" in kinds:
        if "properties" not in node or node.get("additionalProperties", False) is not False:
            raise ValueError(schema)
        required = node.get("required", [])
        node["properties"] = {name: sub if name in required else _nullable(sub)
                              for name, sub in node["properties"].items()}
        if set(required) != set(node["properties"]):
            node["required"] = list(node["properties"])
        node["additionalProperties"] = False
    return node


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema`, or null: anyOf, its description and title beside it (where chat
    templates that write out tool signatures look for them).

    Quirk(llama.cpp's Hermes tool template, through llama-server and LiteLLM): a type
    list, "type": ["integer", "null"], makes the server refuse the request ("Unable to
    generate parser for this template ... Object key of unhashable type: Array"); anyOf
    is taken by every server tried and by OpenAI's strict subset.
    """
    if _validate(None, schema) is None:
        return schema
    notes: dict[str, Any] = {key: schema[key] for key in ("description", "title") if key in schema}
    inner = {key: value for key, value in schema.items() if key not in notes}
    return {"anyOf": [inner, {"type": "null"}], **notes}


def _tool_from_function(func: Callable[..., Any], *, name: str | None = None) -> Tool:
    marked_name, marked_description = getattr(func, "__openai_compat_tool__", (None, None))
    tool_name = name or marked_name or getattr(func, "__name__", "")
    if tool_name == "<lambda>" or not tool_name:
        raise ConfigError("a lambda needs a name: use oc.tool(name=...)(fn) or oc.Tool")
    where = f"tool {tool_name!r}"  # what a ConfigError about it names
    summary, arg_docs = _parse_docstring(inspect.getdoc(func) or "")
    try:
        hints = typing.get_type_hints(func, include_extras=True)
        signature = inspect.signature(func)
    except (NameError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read its signature ({exc})") from None
    # **kwargs is left out: it accepts whatever else the model sends.
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.POSITIONAL_ONLY):
            raise ConfigError(f"{where}: parameter {param.name!r} cannot be passed by keyword")
    annotations = {p.name: hints.get(p.name, Any) for p in params}
    defs: dict[str, Any] = {}
    # Optional[X] with a default means "may be left out": its schema is X's alone.
    properties = {p.name: _schema(annotations[p.name], f"{where}, parameter {p.name!r}",
                                  parameter=p.default is not p.empty, defs=defs) for p in params}
    for key in properties.keys() & arg_docs.keys():  # Annotated[T, "..."] wins over the docstring
        properties[key].setdefault("description", arg_docs[key])
    parameters = {"type": "object", "properties": properties,
                  "required": [p.name for p in params if p.default is p.empty]}
    if defs:
        parameters["$defs"] = defs
    return Tool(tool_name, marked_description or summary, parameters, func, annotations, True)


def _schema(annotation: Any, where: str, *, parameter: bool = False,
            seen: tuple[type, ...] = (), defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON Schema for one annotation; ConfigError naming `where` for one it cannot describe.

    parameter: the annotation is a tool parameter's own, where Optional[X] means the
    argument may be left out and the schema is X's alone; anywhere else (a field, an
    item, an answer) it is X or null. seen: the classes being described, as a
    dataclass or TypedDict that contains itself cannot be written out. defs: where a
    pydantic model's $defs go, so that its "#/$defs/..." references resolve at the
    document's root; None: this annotation is that root (a whole document), and the $defs
    of the models inside it, wherever they are nested, are gathered there.

    NOTE: over 40 lines: one branch per kind of hint, in the order typing needs them
    tested (Annotated and Union before classes); split, the table would be scattered.
    """
    if defs is None:
        defs = {}
        schema = _schema(annotation, where, parameter=parameter, seen=seen, defs=defs)
        return {**schema, "$defs": defs} if defs else schema
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated or origin in _KEY_MARKS:  # Required[T] etc. hold T alone
        inner = _schema(args[0], where, parameter=parameter, seen=seen, defs=defs)
        description = next((a for a in args[1:] if isinstance(a, str)), None)
        return inner if description is None else {**inner, "description": description}
    if annotation is Any:
        return {}
    if origin in (Union, types.UnionType):
        options = [_schema(a, where, parameter=parameter, seen=seen, defs=defs)
                   for a in args if a is not type(None)]
        if len(options) < len(args) and not parameter:
            options.append({"type": "null"})
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is Literal or isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = list(args) if origin is Literal else [m.value for m in annotation]
        kinds = {_JSON_TYPES.get(type(v)) for v in values}
        if len(kinds) == 1 and None not in kinds:
            return {"enum": values, "type": kinds.pop()}
        return {"enum": values}
    kind = _HINT_TYPES.get(origin or annotation)
    if kind is not None:
        items = [a for a in args if a is not Ellipsis]  # tuple[T, ...]: items of T
        if kind == "array" and len(items) == 1:
            return {"type": kind, "items": _schema(items[0], where, seen=seen, defs=defs)}
        return {"type": kind}
    if _is_model(annotation):
        return _model_schema(annotation, where, defs)
    if _is_record(annotation):
        return _record_schema(annotation, where, seen, defs)
    raise ConfigError(f"{where}: cannot describe {annotation!r} as JSON Schema; use str, int, "
                      "float, bool, list, dict, Optional, Literal, an Enum, a dataclass, "
                      "a TypedDict or a pydantic model")


def _is_model(annotation: Any) -> bool:
    """A pydantic (v2) model class, known by its methods: pydantic is never imported."""
    return isinstance(annotation, type) and all(callable(getattr(annotation, name, None))
                                                for name in ("model_json_schema", "model_validate"))


def _model_schema(model: Any, where: str, defs: dict[str, Any]) -> dict[str, Any]:
    try:
        schema = dict(model.model_json_schema())
    except Exception as exc:  # noqa: BLE001 - whatever pydantic raises, name the model
        raise ConfigError(f"{where}: {model.__name__}.model_json_schema() failed ({exc})") from None
    for name, sub in schema.pop("$defs", {}).items():
        if defs.setdefault(name, sub) != sub:
            raise ConfigError(f"{where}: two different models are named {name!r}")
    return schema


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The summary (text before a blank line or Args:) and the Args: descriptions."""
    summary = itertools.takewhile(
        lambda line: line and line.rstrip(":") not in ("Args", "Arguments", "Parameters"),
        [line.strip() for line in doc.splitlines()])
    args: dict[str, str] = {}
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?|\s*\n)*)", doc,
                        re.MULTILINE)
    current, indent = "", 0  # the argument being described ("": none yet), its line's indent
    for line in section.group(1).splitlines() if section else []:
        match = re.match(r"^\s{1,8}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
        if match and (not current or len(line) - len(line.lstrip()) <= indent):
            current, indent = match.group(1), len(line) - len(line.lstrip())
            args[current] = match.group(2).strip()
        elif current and line.strip():
            args[current] = (args[current] + " " + line.strip()).strip()
    return " ".join(summary), args


def _is_record(annotation: Any) -> bool:
    """A dataclass or TypedDict class: a JSON object with named fields."""
    return isinstance(annotation, type) and (is_dataclass(annotation)
                                             or typing.is_typeddict(annotation))


def _record_schema(cls: type, where: str, seen: tuple[type, ...],
                   defs: dict[str, Any]) -> dict[str, Any]:
    if cls in seen:
        raise ConfigError(f"{where}: {cls.__name__} contains itself, which JSON Schema "
                          "without references cannot describe")
    try:
        fields_ = _fields(cls)
    except (NameError, TypeError) as exc:
        raise ConfigError(f"{where}: cannot read the fields of {cls.__name__} ({exc})") from None
    properties = {name: _schema(hint, f"{where}, field {name!r}", seen=(*seen, cls), defs=defs)
                  for name, hint, _ in fields_}
    return {"type": "object", "properties": properties,
            "required": [name for name, _, required in fields_ if required],
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
    """The Python value a type hint asks for, made from JSON that the checker accepted.

    A dataclass becomes an instance (nested ones too), a pydantic model its
    model_validate() instance, an Enum its member, an int hint's 3.0 the int 3; lists
    and TypedDicts have their items built likewise; anything else is returned as it is.
    """
    while typing.get_origin(annotation) in (typing.Annotated, *_KEY_MARKS):
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    if value is None:
        return None
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) > 1:  # the first option the value fits, else Any: the value as it is
            options = [*(a for a in options if _validate(value, _schema(a, "")) is None), Any]
        return _build(value, options[0])
    if annotation is int and isinstance(value, float):
        return int(value)  # JSON Schema counts 3.0 as an integer; the function wants 3
    if _is_model(annotation):
        return annotation.model_validate(value)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation(value)
    if _is_record(annotation) and isinstance(value, dict):
        hints = {name: hint for name, hint, _ in _fields(annotation)}
        built = {k: _build(v, hints[k]) if k in hints else v for k, v in value.items()}
        return built if typing.is_typeddict(annotation) else annotation(**built)
    items = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    if origin in (list, tuple) and len(items) == 1 and isinstance(value, list):
        return [_build(v, items[0]) for v in value]
    return value

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
        return _Check(schema).problem(value, schema, "$")
    except (RecursionError, LookupError):  # LookupError: a $ref _vet_schema refuses
        return "$: nested too deeply to check"


def _vet_schema(schema: Any, where: str) -> None:
    """Raise ConfigError(f"{where}: ...") naming the first keyword of `schema` that this
    checker would not check exactly as JSON Schema 2020-12 says: a refused one (_REFUSED,
    $id below the root, a $ref that is not a pointer into the schema or does not
    resolve), a regex Python cannot compile, a value of the wrong shape. Walks every
    subschema, $defs and $ref targets included; raises nothing else."""
    # Below the root, _SHAPES and _pointer let only objects and booleans through.
    if not isinstance(schema, (dict, bool)):
        raise ConfigError(f"{where}: a JSON Schema is an object or a boolean, got "
                          f"{_describe(schema)}")
    _walk([schema], functools.partial(_vet_node, root=schema, where=where))


def _walk(schemas: list[Any], inner: Callable[[dict[str, Any]], Iterable[Any]]
          ) -> list[dict[str, Any]]:
    """The object schemas among `schemas` and those `inner` finds in them, each once (by
    id), depth first in document order; a loop, not recursion, as a schema may nest
    deeper than Python recurses."""
    todo, found = [*reversed(schemas)], {}
    while todo:
        node = todo.pop()
        if isinstance(node, dict) and id(node) not in found:
            found[id(node)] = node
            todo.extend(reversed([*inner(node)]))
    return [*found.values()]


def _vet_node(node: dict[str, Any], root: Any, where: str) -> Iterator[Any]:
    """Vet one schema's own keywords, yielding its subschemas (and $ref target)."""
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
            if keyword == "$ref":
                yield _pointer(root, arg)
        except (LookupError, re.error, OverflowError, RecursionError, ValueError) as exc:
            why = exc if isinstance(exc, LookupError) else (
                f"holds a regex Python cannot use ({exc})")
            raise ConfigError(f"{where}: JSON Schema keyword {keyword!r} {why}") from None
        yield from ([arg] if shape == "schema" else arg if shape == "schemas"
                    else arg.values() if shape == "map" else ())


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
        # More digits than any list's length: no index (int() refuses over 4,300 digits).
        index = int(token) if token.isascii() and token.isdigit() and len(token) < 20 else -1
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


class _Check:
    """One check against one schema: the root its $ref pointers resolve in, and the
    ($ref target, value) pairs being checked, as meeting one again inside itself is a
    loop that would never end."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.active: set[tuple[int, int]] = set()

    def problem(self, value: Any, schema: Any, path: str) -> str | None:
        """The first problem of `value` (found at `path`) against a subschema, or None:
        each keyword's step, for the values of the type it applies to."""
        if not isinstance(schema, dict):
            return f"{path}: unexpected value" if schema is False else None
        return _first_problem(step(self, value, arg, schema, path)
                              for keyword, arg in schema.items()
                              for _, kind, step in [_KEYWORDS.get(keyword, _ANNOTATION)]
                              if step and (not kind or _TYPES[kind](value)))


def _first_problem(problems: Iterable[str | None]) -> str | None:
    """The first problem (the iterable is lazy, so check stops there)."""
    return next((problem for problem in problems if problem is not None), None)


def _types_of(schema: Any) -> list[str]:
    """The type names a schema allows, [] when it does not say."""
    kinds = schema.get("type") if isinstance(schema, dict) else None
    return [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []


def _type(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """type: a name or a list of names, one of which the value must be."""
    if any(_TYPES[kind](value) for kind in _types_of(schema)):
        return None
    return f"{path}: expected {' or '.join(_types_of(schema))}, got {_describe(value)}"


def _options(arg: list[Any]) -> str:
    """An enum's values for a message: the first _MAX_OPTIONS of them."""
    return ", ".join(map(_short, arg[:_MAX_OPTIONS])) + ", ..." * (len(arg) > _MAX_OPTIONS)


def _required(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """required: the fields an object must have (the first missing one is named)."""
    missing = next((name for name in arg if name not in value), None)
    return None if missing is None else f"{path}: missing required field {_short(missing)}"


def _dependent_required(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """dependentRequired: the fields an object must have when it has a given one."""
    return _first_problem(f"{problem} (required with {_short(key)})" for key, names in arg.items()
                  if key in value and (problem := _required(check, value, names, schema, path)))


def _properties(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """properties: each field it names matches that field's schema."""
    return _first_problem(check.problem(item, arg[key], _at(path, key))
                  for key, item in value.items() if key in arg)


def _pattern_properties(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """patternProperties: each field matches the schema of every regex its name matches."""
    return _first_problem(check.problem(item, sub, _at(path, key)) for key, item in value.items()
                  for pattern, sub in arg.items() if _regex(pattern).search(key))


def _additional(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """Spec: additionalProperties applies to the keys that properties and
    patternProperties (of the same schema) do not name."""
    return _first_problem(f"{_at(path, key)}: unexpected field" if arg is False else
                  check.problem(value[key], arg, _at(path, key))
                  for key in value if not _names_property(schema, key))


def _property_names(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """propertyNames: each field name, a string, matches the schema."""
    return _first_problem(check.problem(key, arg, f"{_at(path, key)}: field name") for key in value)


def _dependent_schemas(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """dependentSchemas: an object that has a given field matches that field's schema."""
    return _first_problem(check.problem(value, sub, path)
                          for key, sub in arg.items() if key in value)


def _items(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """Spec (2020-12): prefixItems (arg a list) describes the first elements one by one,
    items the elements after those."""
    start = 0 if isinstance(arg, list) else len(schema.get("prefixItems", ()))
    subs = arg if isinstance(arg, list) else [arg] * len(value)
    return _first_problem(check.problem(item, sub, f"{path}[{index}]")
                  for index, (item, sub) in enumerate(zip(value[start:], subs), start))


def _contains(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """Spec: minContains (1 when not given) and maxContains bound how many items match."""
    found = sum(check.problem(item, arg, path) is None for item in value)
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
    def step(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
        measured = value if measure is None else measure(value)
        return None if holds(measured, arg) else (
            f"{path}: must {words.format((show or _short)(arg))}, got {_short(measured)}")
    return step


def _all_of(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """allOf: the value matches every schema."""
    return _first_problem(check.problem(value, option, path) for option in arg)


def _any_of(check: _Check, value: Any, arg: Any, schema: Any, path: str, one: bool = False
            ) -> str | None:
    """anyOf, and oneOf when `one`: check stops at the first option that matches
    (the second, for oneOf). When none does, the problem of the option whose type fits
    (it failed deeper in: a field, an enum) says most; else every type allowed."""
    problems: list[str | None] = []
    for option in arg:
        problems.append(check.problem(value, option, path))
        if problems.count(None) > one:
            break
    matched = [str(index) for index, problem in enumerate(problems) if problem is None]
    if matched:
        return None if len(matched) == 1 else (
            f"{path}: must match one schema of oneOf, matched {' and '.join(matched)}")
    fits = [p for option, p in zip(arg, problems)
            if _type(check, value, None, option, path) is None]
    if fits or not all(map(_types_of, arg)):
        return (fits or problems)[0]
    allowed = [*dict.fromkeys(kind for option in arg for kind in _types_of(option))]
    return _type(check, value, None, {"type": allowed}, path)


def _not(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """not: the value does not match the schema."""
    return None if check.problem(value, arg, path) is not None else (
        f"{path}: must not match {_short(arg)}, got {_short(value)}")


def _if(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """if: a value that matches it must match then, one that does not must match else."""
    branch = "then" if check.problem(value, arg, path) is None else "else"
    return check.problem(value, schema.get(branch, True), path)


def _ref(check: _Check, value: Any, arg: Any, schema: Any, path: str) -> str | None:
    """Spec (2020-12): $ref applies beside its sibling keywords, not instead of them.
    The same target on the same value again, inside itself, is a loop without end."""
    key = (id(target := _pointer(check.root, arg)), id(value))
    if key in check.active:
        return f"{path}: the schema loops through $ref {_short(arg)} without end"
    check.active.add(key)
    problem = check.problem(value, target, path)
    check.active.discard(key)
    return problem


_Keyword = Callable[[_Check, Any, Any, Any, str], "str | None"]

# Every keyword this checker knows: (the shape its value must have, see _SHAPES; the
# JSON type it applies to, "" for any; the step that checks it, None for one that only
# holds schemas or is read by another step). Any other keyword is an annotation
# (format, title, description, default, ...): not asserted, as the spec says.
_KEYWORDS: Final[dict[str, tuple[str, str, _Keyword | None]]] = {
    "type": ("types", "", _type),
    "enum": ("array", "", _rule(lambda value, arg: _comparable(value) in map(_comparable, arg),
                                "be one of {}", show=_options)),
    "const": ("any", "", _rule(lambda value, arg: _comparable(value) == _comparable(arg), "be {}")),
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
        lambda value, arg: not arg or len(set(map(_comparable, value))) == len(value),
        "hold unique items")),
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
        pruned = _prune(value, [schema], _Check(schema))
        # The copy differs from `value` if and only if a null was dropped (a NaN is no
        # difference: == on containers compares by `is` first).
        return pruned, pruned != value
    except (LookupError, RecursionError):
        return value, False


def _prune(value: Any, schemas: list[Any], check: _Check) -> Any:
    """_prune_nulls below the root: `value` (a copy) and the schemas that describe it."""
    if not isinstance(value, (list, dict)):
        return value
    found = _walk(schemas, functools.partial(_applying_here, root=check.root))
    keys = range(len(value)) if isinstance(value, list) else [
        key for key, item in value.items() if item is not None or not _left_out(key, found, check)]
    pruned = {key: _prune(value[key], [_subschema_at(s, key) for s in found], check)
              for key in keys}
    return [*pruned.values()] if isinstance(value, list) else pruned


def _applying_here(schema: dict[str, Any], root: Any) -> list[Any]:
    """The schemas that apply where `schema` does: its $ref target and the branches of
    its allOf, anyOf and oneOf."""
    refs = [_pointer(root, schema["$ref"])] if "$ref" in schema else []
    return [*schema.get("allOf", ()), *schema.get("anyOf", ()), *schema.get("oneOf", ()), *refs]


def _left_out(key: str, found: list[dict[str, Any]], check: _Check) -> bool:
    """Whether null for `key` means "left out": a schema lists it as a property whose
    schema rejects null, and none requires it."""
    optional = any(key in s.get("properties", {}) and check.problem(None, s["properties"][key], "$")
                   for s in found)
    return optional and not any(key in s.get("required", ()) for s in found)


def _subschema_at(schema: dict[str, Any], key: Any) -> Any:
    """The schema of an item (`key` an index: prefixItems, items) or of a field
    (properties; patternProperties, as True; additionalProperties); None if none."""
    if isinstance(key, int):
        before = schema.get("prefixItems", ())
        return before[key] if key < len(before) else schema.get("items")
    named = schema.get("properties", {}).get(key, _names_property(schema, key) or None)
    return schema.get("additionalProperties") if named is None else named


def _names_property(schema: dict[str, Any], key: str) -> bool:
    """Whether properties or patternProperties of `schema` name the field `key`."""
    return key in schema.get("properties", {}) or any(
        _regex(pattern).search(key) for pattern in schema.get("patternProperties", ()))


def _at(path: str, key: Any) -> str:
    """The path of a field: $.name for a plain key, $["odd key"] for any other."""
    plain = isinstance(key, str) and _PLAIN_KEY.match(key)
    return f"{path}.{key}" if plain else f"{path}[{_short(key)}]"


def _comparable(value: Any) -> Any:
    """A hashable stand-in that is equal for JSON-equal values: 1 and 1.0 alike, true
    and 1 not, arrays and objects item by item."""
    if isinstance(value, dict):
        return dict, frozenset((key, _comparable(item)) for key, item in value.items())
    return (list, tuple(map(_comparable, value))) if isinstance(value, list) else (
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

# ==== HTTP plumbing ====

_POOL_SIZE: Final = 128  # kept-alive connections per host; opened only when needed
_MAX_RETRY_AFTER: Final = 60.0
_BACKOFF_BASE: Final = 0.5
_BACKOFF_MAX: Final = 8.0
_MAX_REDIRECTS: Final = 5
# Requests a server refuses because of one field, and the field to drop (see
# _Connection._resend_changed). Quirk(Ollama): "registry.ollama.ai/library/x does not
# support tools"; Quirk(llama.cpp): "tools param requires --jinja flag"; Quirk(servers
# strict about the fields they take, seen in: reference QUIRKS.md §7.1): "tools are not
# supported", "tool_choice ... not supported", and "Unrecognized request argument
# supplied: stream_options" from a server that does not know that field.
_REFUSED_FIELDS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    ("tools", re.compile(
        r"does not support tools|tools param requires"
        r"|tools? (?:are |is )?not supported|tool (?:use|calling) is not supported",
        re.IGNORECASE)),
    ("tool_choice", re.compile(
        r"tool_choice.{0,60}(?:not supported|unsupported|not allowed|invalid)", re.IGNORECASE)),
    ("stream_options", re.compile(r"stream_options", re.IGNORECASE)),
)
# Quirk(vLLM without --enable-auto-tool-choice): '"auto" tool choice requires
# --enable-auto-tool-choice and --tool-call-parser to be set', for "auto" and for a
# tool_choice left out alike; it takes "none".
_AUTO_REFUSED: Final = re.compile(r"enable-auto-tool-choice", re.IGNORECASE)
# Quirk(Fireworks, Gemini): a server that refuses the strict flag of a schema names it in
# its message or its "param" (Fireworks: "Extra inputs are not permitted, field:
# 'strict'"; Gemini: 'Unknown name "strict"').
_STRICT_REFUSED: Final = re.compile(r"\bstrict\b")
_STRICT_PARAM: Final = re.compile(r'"param"\s*:\s*"[^"]*\bstrict\b')
# A server that refuses how a schema was asked for: Quirk(llama-cpp-python): its 500 "1
# validation error ... response_format.type Input should be 'text' or 'json_object'";
# Quirk(TGI, llama.cpp, seen in: reference QUIRKS.md §7.1): a response_format type they
# do not take, refused naming the field or its type.
_SCHEMA_REFUSED: Final = re.compile(r"response_format|json_schema|json_object",
                                    re.IGNORECASE)
# A server still loading its model: Quirk(llama-server): 503 "Loading model"; and 503s
# that say they are loading or warming up.
_LOADING: Final = re.compile(r"\bloading\b|warming up|warm-up", re.IGNORECASE)


def _redact_url_log(record: logging.LogRecord) -> bool:
    """Redacts the secrets of URLs in urllib3's DEBUG lines, which show each request's
    URL as it is; a filter on its logger from the first Client whose URL holds a secret
    (the same pattern as _url_secrets finds them by)."""
    if isinstance(record.args, tuple):
        record.args = tuple(_shown_url(arg) if isinstance(arg, str) else arg
                            for arg in record.args)
    return True


class _Connection:
    """One endpoint over HTTP: a pool of kept-alive connections, the headers,
    retries with backoff, redirects, the request fields the server refused, how it
    takes a schema, the quirks met (Client.quirks: every function that absorbs one
    reports it to note), and what every error a Client raises says of where it came
    from, its secrets redacted."""

    _warned_hosts: ClassVar[set[str]] = set()

    def __init__(self, config: Config, headers: dict[str, str], url_source: str) -> None:
        self.config = config
        self.url_source = url_source
        self.shown_url = _shown_url(config.base_url)
        url_secrets = _url_secrets(config.base_url)
        key = config.api_key if len(config.api_key or "") >= _SECRET_LENGTH else ""
        self.secrets = tuple(filter(None, (key, *url_secrets, *_header_secrets(headers))))
        if url_secrets:  # addFilter adds it once, however many Clients ask
            logging.getLogger("urllib3.connectionpool").addFilter(_redact_url_log)
        parts = urllib.parse.urlsplit(config.base_url)
        self.base = urllib.parse.urlunsplit((*parts[:3], "", ""))
        self.query = f"?{parts.query}" if parts.query else ""
        self.session = requests.Session()
        # requests keeps 10 connections per host and discards (with a warning) any
        # more that threads return; a Client shared by many threads keeps them all.
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=_POOL_SIZE)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.headers = {"User-Agent": f"openai-compat/{__version__}", **headers}
        if config.api_key:
            self.headers["Authorization"] = f"Bearer {config.api_key}"
            # requests makes Basic auth of a URL's user:password (or a .netrc entry), which
            # would replace the key's header: an auth that changes nothing takes its place.
            self.session.auth = lambda request: request
        self.lock = threading.Lock()
        self.quirks: dict[str, None] = {}  # an ordered set: see note
        # What this server refused, never to be sent again (see prepare): request fields;
        # "strict" (the strict flag); "auto" (tool_choice "auto": "none" is sent instead);
        # "json_schema" and "json_object" (response_format types, see schema_form);
        # "streamed tools" (a stream with tools came back empty: asked for unstreamed).
        self.refused: set[str] = set()
        self.models_answer = ""  # what answered GET /models, for `openai-compat check`
        self.calls: set[_Request] = set()  # the calls in flight, which close() ends
        self.cli = False  # a Client of the command line: its errors speak its words
        self.closed = threading.Event()
        self.host = host = parts.hostname or ""  # urlsplit lowers the scheme and the host
        if (config.api_key and parts.scheme == "http" and host not in ("localhost", "::1")
                and not host.startswith("127.") and host not in self._warned_hosts):
            self._warned_hosts.add(host)
            _log.warning("the API key is sent over plain http to %s; use https for remote "
                         "servers", host)

    @contextlib.contextmanager
    def in_flight(self, request: _Request) -> Iterator[None]:
        """Keep track of a call while it runs, so that close() and its deadline (a timer,
        when it has one) can stop it from another thread (see _Request.stop)."""
        timer = threading.Timer(max(0.0, request.ends - time.monotonic()), request.stop,
                                ("deadline",))
        timer.daemon = True
        if request.deadline is not None:  # else `ends` is inf: never started
            timer.start()
        with self.lock:
            self.calls.add(request)
        try:
            yield
        except APIError as exc:  # and this call's own secret headers (extra_headers=)
            raise self.shown_error(exc, _header_secrets(request.headers))
        finally:
            with self.lock:
                self.calls.discard(request)
            timer.cancel()

    def note(self, line: str, logged: bool = False) -> None:
        """Add a line to quirks (once; logged once at INFO, unless the caller `logged` it
        at WARNING). NOTE: runs inside a stream's loop for a server that deviates on every
        event; a line already noted costs one dict lookup, without the lock."""
        if line in self.quirks:
            return
        with self.lock:
            new = line not in self.quirks  # another thread may have noted it meanwhile
            self.quirks[line] = None
        if new and not logged:
            _log.info("%s deviates from OpenAI's behaviour (absorbed): %s", self.shown_url, line)

    def close(self) -> None:
        """Stop the calls in flight, refuse new ones, and close the connection pool."""
        self.closed.set()
        with self.lock:  # stop() only shuts a socket down: it never waits
            for request in self.calls:
                request.stop("closed")
        self.session.close()

    def post(self, body: dict[str, Any], request: _Request) -> requests.Response:
        """POST body to /chat/completions; return a 2xx response (body not yet read).

        Retries connection failures and 408/409/429/5xx up to max_retries times with
        backoff, honouring Retry-After up to 60 s; waits for a server loading its model
        (up to `timeout` in all); drops what the server refused (the strict flag, tools,
        tool_choice "auto", stream_options) or steps down how the schema is asked for,
        and resends (see _resend_changed). The last two do not spend max_retries, nor does
        the resend of a request that met a kept-alive connection the server had closed
        (see request). (Over 40 lines with this docstring: the retry policy reads best as
        one loop.)
        """
        attempt, loading_since, timeout = 0, 0.0, request.timeout
        while True:
            wait = retry_after = None
            try:
                # Each read waits for the silence limit, or what is left of the deadline.
                response = self.request("POST", "/chat/completions", max(0.001, min(
                    timeout, request.ends - time.monotonic())), body, request.headers)
            except _TRANSPORT_ERRORS as exc:
                error = request.halted() or self.transport_error(
                    exc, timeout, "" if body.get("stream") else "unstreamed")
                # Connection failures (a connect timeout included) happened before the
                # server saw the request: safe to resend. A read timeout did not.
                retry = isinstance(exc, (requests.ConnectionError, ConnectionError)) and (
                    error.retryable)
            else:
                request.response = response
                if request.stopped:  # close() came while the server was answering
                    response.close()
                    raise request.halted() or _client_closed()
                if response.status_code < 300:
                    return response
                retry_after = _retry_after(response.headers)
                # Redacted of the call's own secret headers too: log lines below quote it.
                error = self.shown_error(self.error_of(response, retry_after),
                                         _header_secrets(request.headers))
                if self._resend_changed(body, error, request):
                    continue
                wait, loading_since = self._loading_wait(error, timeout, loading_since)
                status = error.status_code or 0
                # 408, 409 and 429 always; a 5xx unless it is a request the server refused
                # (llama-cpp-python's validation errors).
                retry = ((status in (408, 409, 429) or status >= 500 and error.retryable)
                         and (retry_after is None or retry_after <= _MAX_RETRY_AFTER))
            if wait is None and retry and attempt < self.config.max_retries:
                attempt += 1
                wait = _backoff(attempt) if retry_after is None else retry_after
                _log.info("%s from %s; retrying in %.1f s (attempt %d of %d)", (
                    f"HTTP {error.status_code}" if error.status_code else error.message),
                    self.shown_url, wait, attempt + 1, self.config.max_retries + 1)
            if wait is None:
                raise error
            # A wait that would end past the deadline is not waited; close() ends one.
            if time.monotonic() + wait >= request.ends or self.closed.wait(wait):
                raise (request.halted(wait) or _client_closed()) from error

    def request(self, method: str, path: str, timeout: float,
                body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
                ) -> requests.Response:
        """One request to base_url + path (the base's query string last), its body
        JSON; sent once more, on a new connection, when it met a kept-alive connection
        the server had closed (see _stale_connection), as browsers do. Redirects are
        followed here, not by requests (which turns a redirected POST into a GET): on
        the same scheme, host and port, with the same method and body, noted once;
        elsewhere they are an error, so that the key goes nowhere else."""
        url = self.base + path + self.query
        data = None if body is None else _encode(body)
        headers = headers or self.headers
        if body is not None:
            # A compressing proxy would batch a stream's deltas: ask for none.
            headers = {**headers, "Content-Type": "application/json",
                       **({"Accept-Encoding": "identity"} if body.get("stream") else {})}
        send = functools.partial(self.session.request, method, data=data, headers=headers,
                                 timeout=timeout, stream=True, allow_redirects=False)
        for _ in range(_MAX_REDIRECTS):
            try:
                response = send(url)
            except _TRANSPORT_ERRORS as exc:
                if not _stale_connection(exc) or self.closed.is_set():
                    raise
                # The server had closed the kept-alive connection: once more, on a new one.
                _log.debug("kept-alive connection was closed by the server; resending")
                response = send(url)
            # is_redirect: a 301, 302, 303, 307 or 308 with a Location header.
            if not (response.is_redirect and response.headers["location"]):
                return response
            response.close()
            target = urllib.parse.urljoin(url, response.headers["location"])
            if _origin(target) != _origin(url):
                raise self.shown_error(APIError(
                    f"{method} {path} was redirected to {_shown_url(target)}, another server:"
                    " not followed, so that the key is not sent there; if it is the right "
                    "server, use it as the base URL", status_code=response.status_code))
            # Quirk(no reference server: a web server or proxy in front of one that moves
            # a path, e.g. to add a trailing slash; DESIGN.md, "Retries and time limits").
            self.note(f"redirected to {_shown_url(target)}: use it as base_url")
            url = target
        raise self.shown_error(APIError(f"{method} {path}: more than {_MAX_REDIRECTS} redirects"))

    def error_of(self, response: requests.Response, retry_after: float | None = None) -> APIError:
        """The classified error of a response with an error status or an HTML page: its
        body read (bounded; "" when it cannot be read), and the response closed."""
        raw = b""
        with response, contextlib.suppress(*_TRANSPORT_ERRORS):
            raw = response.raw.read(_MAX_ERROR_BODY, decode_content=True) or b""
        return self.error_from_body(response.status_code, raw.decode("utf-8", "replace"),
                                    retry_after)

    def _loading_wait(self, error: APIError, timeout: float,
                      since: float) -> tuple[float | None, float]:
        """How long to wait before asking a server that is loading its model again (None:
        not loading, or loading for longer than `timeout`), and since when it has been."""
        if error.status_code != 503 or not _LOADING.search(error.message):
            return None, since
        now = time.monotonic()
        if not since:
            # Quirk(llama-server): 503 "Loading model" until the model is loaded.
            self.note("waited for the model to load (503)", logged=True)
            _log.warning("%s is loading its model (%s); waiting up to %g s",
                         self.shown_url, error.message, timeout)
            since = now
        if now - since >= timeout:
            return None, since
        # A gap that grows with the time waited, up to _WAIT_GAP.
        return min(_WAIT_GAP, since + timeout - now, 0.1 + (now - since) / 2), since

    @property
    def schema_form(self) -> str:
        """How this server is asked for an answer shaped by schema= (DESIGN.md, "Structured
        answers"), from the first choice down: response_format "json_schema"; "json_object"
        with the schema, and the schema in a system message too; "", the system message
        only. One is left behind, for good, when the server refuses it or ignores it."""
        return next((form for form in ("json_schema", "json_object") if form not in self.refused),
                    "")

    def prepare(self, body: dict[str, Any], request: _Request) -> None:
        """Drop what this server refused; ask for request.schema the way it takes it."""
        for name in tuple(self.refused):
            body.pop(name, None)
        if "strict" in self.refused and "tools" in body:
            body["tools"] = [{**spec, "function": {k: v for k, v in spec["function"].items()
                                                   if k != "strict"}} for spec in body["tools"]]
        if "auto" in self.refused and "tools" in body and body.get("tool_choice", "auto") == "auto":
            body["tool_choice"] = "none"
        schema = request.sent_schema
        if schema is None:
            return
        strict = {"strict": True} if request.strict and "strict" not in self.refused else {}
        form = self.schema_form
        if form == "json_schema":
            body["response_format"] = {"type": form, "json_schema": {
                "name": "answer", "schema": schema, **strict}}
            return
        body["messages"] = _with_schema_message(body["messages"], schema)
        if form == "json_object":
            # Quirk(llama.cpp, llama-cpp-python): a schema beside json_object is
            # enforced with a grammar.
            body["response_format"] = {"type": "json_object", "schema": schema}
        else:
            body.pop("response_format", None)

    def _resend_changed(self, body: dict[str, Any], error: APIError, request: _Request) -> bool:
        """Whether `error` refused something the request can go without: the strict flag,
        a field (dropped), tool_choice "auto" ("none" instead), or how the schema was asked
        for (the next form down). `body` is changed to be sent again, the change kept for
        every later request, and said."""
        message = error.message
        name = next((field for field, pattern in _REFUSED_FIELDS
                     if field in body and pattern.search(message)), None)
        if "strict" not in self.refused and 400 <= (error.status_code or 0) < 500 and (
                _STRICT_REFUSED.search(message) or _STRICT_PARAM.search(error.body or "")):
            self.refuse(message, "strict schemas refused: sent without strict", "strict")
        elif (_AUTO_REFUSED.search(message) and "tools" in body
              and body.get("tool_choice", "auto") == "auto"):
            self.refuse(message, 'tool_choice "auto" refused: "none" sent', "auto")
        elif name is not None and ((error.status_code or 0) < 500 or "tools" in body):
            self.refuse(message, "tools rejected: resent without them" if name == "tools" else
                        f"{name} rejected: dropped", name, *("tool_choice",) * (name == "tools"))
        elif (request.schema is not None and "response_format" in body
              and _SCHEMA_REFUSED.search(message)):
            form = body["response_format"]["type"]  # json_schema or json_object (see prepare)
            self.refuse(message, "json_schema refused: json_object with the schema" if form ==
                        "json_schema" else "response_format refused: the schema in the system "
                        "message", form)
        else:
            return False
        self.prepare(body, request)
        return True

    def refuse(self, why: str, quirk: str, *names: str) -> None:
        """Never send `names` again here: noted, and logged at WARNING with `why`."""
        _log.warning("%s %s (%s)", self.shown_url, quirk, why)
        self.note(quirk, logged=True)
        with self.lock:
            self.refused.update(names)

    def read_json(self, response: requests.Response, request: _Request) -> Any:
        try:
            raw = response.content
        except _TRANSPORT_ERRORS as exc:
            raise request.halted() or self.transport_error(
                exc, request.timeout, "unstreamed") from None
        try:
            return _CHUNK_JSON.decode(raw.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            raise request.halted() or APIError(
                "the server's answer is not JSON: " + _trim_message(
                    raw[:2000].decode("utf-8", "replace")), status_code=response.status_code,
            ) from None

    def error_from_body(self, status: int, text: str,
                        retry_after: float | None = None) -> APIError:
        if status == 407:  # from a proxy: an http request's proxy answers it itself
            return self.proxy_error("407 Proxy Authentication Required")
        return self.shown_error(_error_from_body(status, text, self.note, retry_after))

    def transport_error(self, exc: BaseException, timeout: float, when: str = "") -> APIError:
        """The module's error for a transport failure, redacted. `timeout`: the request's
        silence limit. `when`: "unstreamed" for a request that asked for an unstreamed answer
        (servers send it only once it is complete); "stream" once a stream's answer
        had begun (never retried then: the caller has seen part of it)."""
        if isinstance(exc, (requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)):
            return self.shown_error(RequestTimeoutError(f"could not connect within {timeout:g} s"))
        if isinstance(exc, (requests.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return self.shown_error(RequestTimeoutError(
                f"the server sent nothing for {timeout:g} s" + {
                    "unstreamed": " while composing an unstreamed answer (which arrives"
                             " only when complete; stream() shows progress)",
                    "stream": " in the middle of the stream"}.get(when, "")))
        causes = _causes(exc)
        reason = _reason(causes[-1])
        # Anything but a connection error (a broken chunked body among them: requests'
        # ChunkedEncodingError is no ConnectionError) failed while reading, not while
        # connecting: the server had answered.
        if not isinstance(exc, (requests.ConnectionError, ConnectionError)) or when == "stream":
            return self.shown_error(StreamError(
                f"the connection broke while reading the answer: {reason}"))
        if any(isinstance(cause, urllib3.exceptions.ProxyError) for cause in causes):
            return self.proxy_error(reason)
        where = f"{self.url_source} (now {self.shown_url})"
        if any(isinstance(cause, socket.gaierror) for cause in causes):
            return self.unavailable(f"cannot connect: the host name {self.host} does not "
                                    f"resolve: {reason}", f"Check the host name in {where}")
        if not any(isinstance(cause, ssl.SSLCertVerificationError) for cause in causes):
            return self.unavailable(f"cannot connect: {reason}")
        # A certificate is a setting to fix, never switched off here: retrying cannot help.
        if "mismatch" in reason:
            return self.unavailable(f"cannot connect: {reason}", "The server's TLS certificate "
                                    f"names other hosts: use one in {where}", retryable=False)
        return self.unavailable(
            f"cannot connect: this machine does not trust the server's TLS certificate: {reason}",
            "To trust it, point REQUESTS_CA_BUNDLE at the PEM file of the CA that issued it (or "
            "of the self-signed certificate); verification stays on", retryable=False)

    def proxy_error(self, reason: str) -> APIError:
        """The error of a proxy that cannot be reached or that refused the request (407):
        named as the proxy, its password redacted, never as the server."""
        variable = f"{urllib.parse.urlsplit(self.base).scheme.upper()}_PROXY"
        proxy = requests.utils.select_proxy(
            self.base, requests.utils.get_environ_proxies(self.base)) or ""
        # requests reads "host:port" as http://host:port; its password is redacted either way.
        name = f"the proxy {_shown_url(proxy if '://' in proxy else 'http://' + proxy)} " \
            f"({variable})" if proxy else "a proxy"
        if re.search(r"\b407\b", reason):  # Proxy Authentication Required: not the API key
            return self.unavailable(f"{name} refused the request: {reason}", "Check the user "
                                    f"name and password in {variable}", retryable=False)
        return self.unavailable(f"cannot reach {name}: {reason}",
                                f"Check {variable}, or list the server's host in NO_PROXY")

    def unavailable(self, message: str, advice: str = "", *, retryable: bool = True) -> APIError:
        """An EndpointUnavailableError, redacted; `advice` replaces "Is the server running?"."""
        error = EndpointUnavailableError(message)
        error._advice, error.retryable = advice, retryable
        return self.shown_error(error)

    def shown_error(self, exc: APIError, secrets: Iterable[str] = ()) -> APIError:
        """`exc` with its secrets (and `secrets`) redacted (a server may echo the key in its
        text) and saying where it came from: every APIError a Client raises passes here."""
        secrets = (*self.secrets, *secrets)
        exc.message = _redact(exc.message, secrets)
        exc.args = (exc.message,)
        exc.body = exc.body and _redact(exc.body, secrets)
        exc.base_url = self.shown_url
        exc._url_source, exc._cli = self.url_source, self.cli
        exc._path = exc._path or "/chat/completions"  # discovery's say /models
        return exc


def _causes(exc: BaseException | None) -> list[BaseException]:
    """`exc` and the errors it wraps, outermost first: requests wraps urllib3's, which
    wrap the socket's and ssl's (in .reason, in args, or as __cause__)."""
    causes: list[BaseException] = []
    while isinstance(exc, BaseException) and len(causes) < 16:  # 16: against a cycle
        causes.append(exc)
        exc = next((e for e in (getattr(exc, "reason", None), *reversed(exc.args),
                                exc.__cause__) if isinstance(e, BaseException)), None)
    return causes


def _reason(exc: BaseException) -> str:
    """What an error says, for a message: ssl's verify message, or an OSError's text
    without its errno; OpenSSL's tags and source lines dropped."""
    text = getattr(exc, "verify_message", None) or getattr(exc, "strerror", None) or str(exc)
    return re.sub(r"^\[[^\]]*\] *| *\(_ssl\.c:\d+\)$", "", text).rstrip(".") or type(exc).__name__


def _encode(body: dict[str, Any]) -> bytes:
    """The request body as UTF-8 JSON, or ConfigError naming what cannot be sent."""
    try:
        return json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        where, position = _lone_surrogate(body)
        raise ConfigError(f"{where}: the text has a lone surrogate at position {position}, "
                          "which UTF-8 cannot carry (was it read with errors="
                          "'surrogateescape', or cut from a broken file?)") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the request cannot be sent as JSON: {exc}") from None


def _lone_surrogate(value: Any, path: str = "") -> tuple[str, int]:
    """Where the first string that UTF-8 cannot encode is ("messages[2].content", and
    the position in it); ("", -1) when there is none."""
    if isinstance(value, str):
        bad = re.search(r"[\ud800-\udfff]", value)  # what UTF-8 cannot encode
        return (path or "the request", bad.start()) if bad else ("", -1)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
        value, (list, tuple)) else ()
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        for found in (_lone_surrogate(key, f"{where} (its name)"), _lone_surrogate(item, where)):
            if found[1] >= 0:
                return found
    return "", -1


def _origin(url: str) -> tuple[str, str | None, int]:
    parts = urllib.parse.urlsplit(url)  # which lowers the scheme and the host
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


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
    reset before any byte of an answer ("Connection aborted"), so the server never
    took it up. urllib3 only checks for a closed socket when it takes one from the
    pool, which leaves a race. Connect failures are "Failed to establish a new
    connection" (NewConnectionError), not this. RemoteDisconnected (an EOF) is a
    ConnectionResetError. Through an http proxy urllib3 calls the same failure a
    ProxyError, as the closed connection no longer counts as connected to the proxy.
    """
    causes = _causes(exc)
    wrappers = (urllib3.exceptions.ProtocolError, urllib3.exceptions.ProxyError)
    return any(isinstance(cause, wrappers) for cause in causes) and (
        isinstance(causes[-1], (ConnectionResetError, BrokenPipeError)))


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds (a number, or an HTTP date), or None."""
    value = (headers.get("retry-after") or "").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return None if math.isnan(seconds) else max(0.0, seconds)


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry number `attempt`: exponential, with jitter."""
    delay: float = min(_BACKOFF_MAX, _BACKOFF_BASE * 2 ** min(attempt - 1, 16))
    return delay * random.uniform(0.5, 1.0)


def _socket_of(response: requests.Response | None) -> socket.socket | None:
    """The socket a response is being read from (None once it is released)."""
    raw = getattr(response, "raw", None)
    connection = getattr(raw, "_connection", None) or getattr(raw, "connection", None)
    return getattr(connection, "sock", None)


def _drain(response: requests.Response, chunks: Iterable[bytes]) -> None:
    """Read what follows [DONE] in `chunks` (the body's, see _body_chunks) for up to
    ~100 ms, so that the connection can be reused.

    Stopping at [DONE] without reading the rest of the body would cost a new TCP
    (and TLS) connection for the next request.
    """
    sock = _socket_of(response)
    if sock is None:
        return
    try:
        sock.settimeout(_DRAIN_SECONDS)
        deadline = time.monotonic() + _DRAIN_SECONDS
        for _ in chunks:
            if time.monotonic() > deadline:
                break
    except Exception as exc:  # noqa: BLE001 - best effort: at worst the connection is not reused
        _log.debug("draining the end of a stream failed: %r", exc)

# ==== Command line ====


_CLI_EXAMPLES: Final = """examples:
  openai-compat "Explain distributed computing"
  cat notes.txt | openai-compat "Summarize:"
  openai-compat -m llama3.2 -s "Answer in French" "What is SSE?"
  openai-compat --json "Hi" | jq -j 'select(.type == "text") | .content'
  openai-compat --base-url http://localhost:11434/v1 models
  openai-compat --schema person.json "Invent a person"   # person.json: a JSON Schema
  openai-compat models
  openai-compat check
  openai-compat check --wait 120     # a server that is still starting

The endpoint comes from --base-url or OPENAI_COMPATIBLE_BASE_URL (and
OPENAI_COMPATIBLE_API_KEY, OPENAI_COMPATIBLE_MODEL, OPENAI_COMPATIBLE_TIMEOUT,
OPENAI_COMPATIBLE_MAX_RETRIES). To send the word "models" or "check" as a prompt, put
-- before it.
exit status: 0 ok, 1 API error, 2 usage or configuration error, 130 interrupted"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m openai_compat` and the `openai-compat` script.

    Returns the exit status: 0 ok, 1 API error, 2 usage or configuration error,
    130 interrupted (Ctrl-C). Errors are one line on stderr.
    """
    argv = sys.argv[1:] if argv is None else argv
    args = _cli_parser().parse_args(argv)
    command = [] if "--" in argv else args.words  # after --, every word is the prompt's
    # What a script must see goes to stderr, one line each: WARNING log lines, and the
    # library's warnings (a model substitution, a pasted endpoint) through the same
    # handler; -v adds INFO.
    shown = logging.StreamHandler(sys.stderr)
    shown.setFormatter(logging.Formatter("openai-compat: %(message)s"))
    _log.addHandler(shown)
    level = _log.level
    _log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_: _log.warning("warning: %s", message)
            client = _cli_client(args)
            if command == ["models"]:
                print("\n".join(client.available_models(fallback=False)))
                return 0
            if command == ["check"]:
                return _cli_check(client, args.wait)
            return _cli_chat(client, _cli_prompt(args.words, args.no_stdin), args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`); quiet exit, and no second error at shutdown.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as exc:
        print(f"openai-compat: {_cli_words(str(exc))}", file=sys.stderr)
        return 2
    except APIError as exc:
        failed = "could not list models: " if command == ["models"] else ""
        print(f"openai-compat: {failed}{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        _log.removeHandler(shown)
        _log.setLevel(level)


# The command line's words for what the module's own text says in Python's (its hints
# and configuration errors; never a server's text).
_CLI_WORDS: Final = (
    ("try base_url=", "try --base-url "), ("base_url= to Client()", "--base-url"),
    ("base_url=", "--base-url"),
    ("pass model=", "pass --model"), ("timeout=", "--timeout"), ("deadline=", "--deadline"),
    ("lower max_tokens", "lower --max-tokens"), (" or api_key=", ""),
    ("; .partial_text holds what arrived", "; what arrived is printed above"),
    ("; .partial_text holds the last one", ""))


def _cli_words(text: str) -> str:
    for python, flag in _CLI_WORDS:
        text = text.replace(python, flag)
    return text


def _cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openai-compat", description="Stream an answer from any OpenAI-compatible server.",
        epilog=_CLI_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("words", nargs="*", metavar="PROMPT | models | check",
        help="the prompt (stdin, if any, is appended), or a command")
    add("--base-url", help="the server, e.g. http://localhost:11434/v1 (default: "
        "OPENAI_COMPATIBLE_BASE_URL)")
    add("-m", "--model", help="model id (default: OPENAI_COMPATIBLE_MODEL, else the first "
        "listed by the server)")
    add("-s", "--system", help="system message")
    add("--temperature", type=float)
    add("--max-tokens", type=int)
    add("--timeout", type=float, help="seconds of silence allowed between bytes (default 30)")
    add("--deadline", type=float, metavar="SECONDS", help="seconds the whole answer may take "
        "(default: OPENAI_COMPATIBLE_DEADLINE, else none)")
    add("--header", action="append", default=[], metavar="'NAME: VALUE'",
        help="an HTTP header for every request (repeatable), e.g. Azure's 'api-key: ...'")
    add("-n", "--no-stdin", action="store_true", help="never read stdin (as ssh -n): for "
        "loops that read their own input, and parents that keep stdin open")
    add("-v", "--verbose", action="store_true", help="also print retries and quirks on stderr")
    add("--wait", type=float, metavar="SECONDS", help="with check: first wait up to SECONDS "
        "for a server that is starting or loading its model")
    add("--schema", metavar="FILE.json", help="answer with JSON that matches this JSON Schema, "
        "printed on one line (the model is asked to mend a wrong answer twice)")
    add("--json", action="store_true", help="print one JSON object per chunk, one per line")
    add("--version", action="version", version=f"openai-compat {__version__}")
    return parser


def _cli_client(args: argparse.Namespace) -> Client:
    """The Client the command line asks for; its hints name --base-url, not base_url=."""
    headers = {}
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon:
            raise ConfigError(f"--header {header!r}: write it as 'Name: value'")
        headers[name.strip()] = value
    client = Client(args.base_url, model=args.model, timeout=args.timeout, headers=headers,
                    deadline=args.deadline)
    client._http.cli = True  # its hints say --base-url where they say base_url=
    return client


def _cli_prompt(words: list[str], no_stdin: bool) -> str:
    prompt = " ".join(words)
    if not no_stdin and not sys.stdin.isatty():
        piped = _cli_stdin()
        if piped.strip():
            prompt = f"{prompt}\n\n{piped}" if prompt else piped
    if not prompt.strip():
        raise ConfigError("no prompt: give one as an argument or on stdin (see --help)")
    return prompt


def _cli_stdin() -> str:
    """Standard input as text: bytes that are not UTF-8 become U+FFFD, with one warning
    naming where the first one is."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream set by the caller
        return sys.stdin.read()
    data = raw.read()
    try:
        return str(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        warnings.warn(f"standard input is not UTF-8 (byte {exc.start}: {data[exc.start:][:1]!r}"
                      "); read with U+FFFD in place of such bytes (convert it with iconv -f "
                      "ENCODING -t UTF-8)", UserWarning, stacklevel=2)
        return str(data.decode("utf-8", "replace"))


def _cli_chat(client: Client, prompt: str, args: argparse.Namespace) -> int:
    if args.schema is not None:
        return _cli_structured(client, prompt, args)
    with client.stream(prompt, system=args.system, temperature=args.temperature,
                       max_tokens=args.max_tokens) as chunks:
        for chunk in chunks:
            if args.json:
                print(json.dumps(_chunk_json(chunk), ensure_ascii=False), flush=True)
            elif chunk.content and chunk.type == "text":
                print(chunk.content, end="", flush=True)
        refusal = chunks.result.refusal if chunks.result else ""
    if not args.json:
        print()
    return _cli_refused(refusal)


def _cli_refused(refusal: str) -> int:
    """A refusal is not an answer: scripts see it on stderr and in the exit status."""
    if not refusal:
        return 0
    print(f"openai-compat: the model refused: {' '.join(refusal.split())}", file=sys.stderr)
    return 1


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
    if not result.refusal:
        print(json.dumps(result.data, ensure_ascii=False))
    return _cli_refused(result.refusal)


def _chunk_json(chunk: Chunk) -> dict[str, Any]:
    """One --json line: the chunk's type and step, and its fields that are set."""
    call, done, usage = chunk.tool_call, chunk.tool_result, chunk.usage
    data: dict[str, Any] = {
        "type": chunk.type, "step": chunk.step, "content": chunk.content or None,
        "reasoning": chunk.reasoning or None,
        "tool_call": call and {"id": call.id, "name": call.name, "arguments": call.arguments},
        "tool_result": done and {"content": done.content, "error": done.error}}
    data = {key: value for key, value in data.items() if value is not None}
    if chunk.type == "finish":
        data["finish_reason"] = chunk.finish_reason
        data["usage"] = usage and {key: getattr(usage, key) for key in (
            "prompt_tokens", "completion_tokens", "total_tokens")}
    return data


def _cli_check(client: Client, wait: float | None = None) -> int:
    """Probe the endpoint: one line per capability, then one per deviation from
    OpenAI's behaviour that the probes met and absorbed; exit 0 when chat works.
    `wait`: seconds to wait first for a server that is starting or loading its model."""
    print(f"endpoint     {client._http.shown_url}")
    if wait is not None:
        started = time.monotonic()
        try:
            client.wait_ready(timeout=wait)
        except APIError as exc:
            _report("ready", False, f"not within {wait:g} s: {type(exc).__name__}: {exc}")
            return 1
        _report("ready", True, f"after {time.monotonic() - started:.1f} s")
    if not _probe_models(client):
        return 1
    # From here on each probe asks once: a failure is what to report, not to retry.
    client.config = client._http.config = replace(client.config, max_retries=0)
    try:
        started = time.monotonic()
        answer = client.generate("Say hello in one word.", max_tokens=16)
        _report("auth", True, "accepted" if client.config.api_key else "no key sent")
        _report("chat", True, f"{answer.text.strip()[:60]!r} "
                f"({time.monotonic() - started:.1f} s)")
    except APIError as exc:
        if isinstance(exc, AuthenticationError):
            _report("auth", False, str(exc))
        _report("chat", False, f"{type(exc).__name__}: {exc}")
        _probe_quirks(client)
        return 1
    for name, run in (("streaming", _probe_stream), ("tool calls", _probe_tools),
                      ("structured", _probe_structured)):
        try:
            run(client)
        except APIError as exc:
            _report(name, False, f"{type(exc).__name__}: {exc}")
    _probe_quirks(client)
    return 0


def _report(name: str, ok: bool | None, detail: str) -> None:
    mark = {True: "ok", False: "FAIL", None: "--"}[ok]
    print(f"{name:<12} {mark:<5} {detail}", flush=True)


def _probe_models(client: Client) -> bool:
    """Report reachable and models; False when nothing more can be probed."""
    try:
        models = client.available_models(fallback=False)
    except (EndpointUnavailableError, RequestTimeoutError) as exc:
        _report("reachable", False, str(exc))
        return False
    except APIError as exc:
        _report("reachable", True, client._http.models_answer or "the server answered")
        if isinstance(exc, AuthenticationError):
            _report("auth", False, str(exc))
            _probe_quirks(client)
            return False
        _report("models", None, f"not listed ({exc.message})")
        return True
    _report("reachable", True, client._http.models_answer)
    _report("models", True, f"{len(models)} listed: {', '.join(models[:8])}"
            + (" ..." if len(models) > 8 else ""))
    return True


def _probe_quirks(client: Client) -> None:
    """One line per deviation the probes met and the Client absorbed, in the order met."""
    for line in client.quirks:
        _report("quirk", None, line)
    if not client.quirks:
        _report("quirks", True, "none absorbed")


# The probes after chat: _cli_check reports the APIError they raise.
def _probe_stream(client: Client) -> None:
    started, first, count = time.monotonic(), 0.0, 0
    with client.stream("Count from 1 to 5.", max_tokens=32) as chunks:
        for chunk in chunks:
            if chunk.type == "text":
                count += 1
                first = first or time.monotonic() - started
        usage = chunks.result.usage if chunks.result else None
    _report("streaming", count > 0, f"{count} text chunks, first after {first:.2f} s")
    _report("usage", True if usage else None, f"prompt {usage.prompt_tokens}, completion "
            f"{usage.completion_tokens}" if usage else "not reported in streams")


def _probe_examples() -> list[dict[str, Any]]:
    """Two worked examples before the tool probe's question, as a small model needs (the
    README's too): the probe asks whether the endpoint carries tool calls, not whether
    a model volunteers one."""
    turns: list[dict[str, Any]] = [{"role": "system", "content": "You are a calculator "
                                    "assistant. For any sum you must call the add tool."}]
    for number, (a, b) in enumerate(((12, 30), (100, 37)), 1):
        call = {"id": f"call_{number}", "type": "function",
                "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}
        turns += [{"role": "user", "content": f"Use the add tool to add {a} and {b}."},
                  {"role": "assistant", "content": "", "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": call["id"], "content": str(a + b)},
                  {"role": "assistant", "content": f"The answer is {a + b}."}]
    return turns


def _probe_tools(client: Client) -> None:
    """Whether the model calls a tool when it may ("auto"), only when it must
    ("required"), or not at all; a call counts when its arguments fit and it ran."""
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    for choice, how in (("auto", "calls tools on its own"),
                        ("required", "calls tools only when required")):
        result = client.generate("Use the add tool to add 2 and 3.", tools=[add], max_steps=2,
                                 tool_choice=choice, messages=_probe_examples(),
                                 temperature=0, max_tokens=128)
        done = [r.call for r in result.tool_results if r.error is None]
        if done:
            streamed = "streamed" if "streamed tools" not in client._http.refused else (
                "not streamed: the server's tool streams are empty, so they are asked for "
                "without streaming")
            _report("tool calls", True, f"{how} ({streamed}): {done[0].name}("
                    f"{done[0].raw_arguments})")
            return
    _report("tool calls", None, 'no tool calls, even after two worked examples and with '
            'tool_choice "required"')


def _probe_structured(client: Client) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "country": {"type": "string"}},
              "required": ["city", "country"]}
    result = client.generate("Name a city in France as JSON with city and country.",
                             schema=schema, temperature=0, max_tokens=64)
    how = {"json_schema": "response_format json_schema honoured", "json_object": "json_object "
           "with the schema honoured", "": "the schema asked for in a system message"}
    repairs = f" after {len(result.steps) - 1} repair(s)" if len(result.steps) > 1 else ""
    _report("structured", True, f"{how[client._http.schema_form]}: {json.dumps(result.data)}"
            + repairs)


if __name__ == "__main__":
    sys.exit(main())
