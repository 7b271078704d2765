"""Streaming benchmark: openai_compat beside the official openai SDK, requests +
sseclient-py fed the Response (the bare recipe tutorials use), and a raw-socket floor.

    python bench/bench.py            # full run (about two minutes)
    python bench/bench.py --quick    # smoke run

One process measures every client in turn, in alternating rounds, against a
loopback SSE server running in a child process (so its CPU time is not the
client's). The cases:

- throughput, one event per HTTP chunk (the main row): a burst of events, each
  `data: {...}` event its own chunk of a chunked body, written with one sendall as
  fast as the socket takes them: what llama-server and vLLM send;
- throughput, 64 events per HTTP chunk: the same burst batched, which shows the
  parsing cost without the per-chunk cost;
- latency per HTTP framing (chunked, Connection: close, gzip): events paced 20 ms
  apart, each stamped with its send time, p50 / p99 of the delay to the caller;
- peak traced memory over a long batched stream, import time, and the TCP
  connections opened by 10 sequential calls and by a three-step tool loop;
- the module's JSON Schema checker on a 10,000-element answer array.

Printed as a markdown table with ratios to the floor, to the SDK and to the bare
recipe, then the machine's load during the run (load average at start and end;
CPU use of this process, of the server child and the machine's idle share during
the throughput rounds) so a quiet run can be told from a busy one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

# ---- the server (child process) ----

_CHUNK = {"id": "chatcmpl-0123456789", "object": "chat.completion.chunk", "created": 1700000000,
          "model": "bench", "system_fingerprint": "fp_bench",
          "choices": [{"index": 0, "delta": {"content": " token"}, "logprobs": None,
                       "finish_reason": None}]}


def _event(sent: float | None = None) -> bytes:
    chunk = dict(_CHUNK)
    if sent is not None:
        chunk["id"] = repr(sent)  # wall-clock send time: both processes share the clock
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


# The finish chunk and [DONE], sent as two events (two HTTP chunks when chunked).
_FINISH = ((b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,'
            b'"delta":{},"finish_reason":"stop"}]}\n\n'),
           b"data: [DONE]\n\n")


def _serve(port_file: str) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted = [0]
    with open(port_file, "w") as out:
        out.write(str(listener.getsockname()[1]))
    while True:
        conn, _ = listener.accept()
        accepted[0] += 1
        threading.Thread(target=_connection, args=(conn, accepted), daemon=True).start()


def _read_request(conn: socket.socket, buffer: bytes) -> tuple[str, dict[str, Any], bytes] | None:
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(rest) < length:
        rest += conn.recv(65536)
    body = json.loads(rest[:length] or b"{}")
    return lines[0].split()[1], body, rest[length:]


def _connection(conn: socket.socket, accepted: list[int]) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = b""
    with conn, contextlib.suppress(OSError):  # clients may reset; that ends the connection
        while True:
            request = _read_request(conn, buffer)
            if request is None:
                return
            path, body, buffer = request
            if path.endswith("/connections"):
                payload = str(accepted[0]).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(payload), payload))
                continue
            mode = str(body.get("model", "burst-100"))
            if not _stream(conn, mode, body):
                return


def _stream(conn: socket.socket, mode: str, body: dict[str, Any]) -> bool:
    """Answer one request; `mode` (the request's model) is "kind-count", the kinds being
    "flush" (a burst, one event per HTTP chunk), "burst" (64 events per HTTP chunk),
    "tool" (a tool call twice, then text), or an HTTP framing for paced events."""
    kind, _, count_text = mode.partition("-")
    count = int(count_text or 30)
    framing = "chunked" if kind in ("flush", "burst", "chunked", "tool") else kind
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    if framing == "chunked":
        head += b"Transfer-Encoding: chunked\r\n\r\n"
    elif framing == "gzip":
        head += b"Content-Encoding: gzip\r\nConnection: close\r\n\r\n"
    else:
        head += b"Connection: close\r\n\r\n"
    conn.sendall(head)
    packer = zlib.compressobj(wbits=31) if framing == "gzip" else None

    def send(data: bytes) -> None:  # one HTTP chunk when chunked, in one sendall
        if packer is not None:
            data = packer.compress(data) + packer.flush(zlib.Z_SYNC_FLUSH)
        if framing == "chunked":
            data = b"%x\r\n%s\r\n" % (len(data), data)
        conn.sendall(data)

    if kind == "flush":
        event = _event()
        for _ in range(count):
            send(event)
    elif kind == "burst":
        event = _event()
        batch = event * 64
        for _ in range(count // 64):
            send(batch)
        for _ in range(count % 64):
            send(event)
    elif kind == "tool":
        turns = sum(1 for m in body.get("messages", []) if m.get("role") == "tool")
        if turns < 2:
            call = {"choices": [{"index": 0, "delta": {"tool_calls": [{
                "index": 0, "id": f"call{turns}", "type": "function",
                "function": {"name": "noop", "arguments": "{}"}}]}, "finish_reason": None}]}
            send(b"data: " + json.dumps(call).encode() + b"\n\n")
            send(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}'
                 b"\n\ndata: [DONE]\n\n")
            conn.sendall(b"0\r\n\r\n")
            return True
        send(_event())
    else:
        for _ in range(count):
            send(_event(time.time()))
            time.sleep(0.02)
    for event in _FINISH:
        send(event)
    if packer is not None:
        conn.sendall(packer.flush())
    if framing == "chunked":
        conn.sendall(b"0\r\n\r\n")
        return True
    return False


# ---- the clients ----


def client_openai_compat(base: str) -> Callable[[str], Iterator[str]]:
    import openai_compat as oc

    client = oc.Client(base, api_key="x", max_retries=0)

    def run(mode: str) -> Iterator[str]:
        for chunk in client.stream("hi", model=mode):
            if chunk.type == "text":
                yield chunk.raw["id"]
    return run


def client_openai_sdk(base: str) -> Callable[[str], Iterator[str]]:
    import openai

    client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)

    def run(mode: str) -> Iterator[str]:
        for chunk in client.chat.completions.create(
                model=mode, messages=[{"role": "user", "content": "hi"}], stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.id
    return run


def client_requests_sseclient(base: str) -> Callable[[str], Iterator[str]]:
    import requests
    import sseclient

    session = requests.Session()

    def run(mode: str) -> Iterator[str]:
        response = session.post(base + "/chat/completions", stream=True, json={
            "model": mode, "messages": [{"role": "user", "content": "hi"}], "stream": True})
        for event in sseclient.SSEClient(response).events():
            if event.data == "[DONE]":
                break
            data = json.loads(event.data)
            if data["choices"] and data["choices"][0]["delta"].get("content"):
                yield data["id"]
        response.close()
    return run


def client_raw_socket(base: str) -> Callable[[str], Iterator[str]]:
    host, port = base.split("//")[1].split("/")[0].split(":")

    def run(mode: str) -> Iterator[str]:
        body = json.dumps({"model": mode, "messages": [], "stream": True}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            buffer, head_done, unzip = b"", False, None
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                if not head_done:
                    buffer += data
                    if b"\r\n\r\n" not in buffer:
                        continue
                    head, _, data = buffer.partition(b"\r\n\r\n")
                    head_done, buffer = True, b""
                    if b"gzip" in head:
                        unzip = zlib.decompressobj(wbits=31)
                if unzip is not None:
                    data = unzip.decompress(data)
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    start = event.find(b"data: ")
                    if start < 0:
                        continue
                    if event[start + 6:start + 12] == b"[DONE]":
                        return
                    payload = json.loads(event[start + 6:])
                    if payload["choices"] and payload["choices"][0]["delta"].get("content"):
                        yield payload["id"]
    return run


CLIENTS = {
    "floor (raw socket)": ("socket", client_raw_socket),
    "openai_compat": ("openai_compat", client_openai_compat),
    "openai SDK": ("openai", client_openai_sdk),
    "requests+sseclient": ("requests, sseclient", client_requests_sseclient),
}


# ---- measurements ----

# The throughput cases: server kind -> column heading. The first is the main row.
CASES = {"flush": "one event per HTTP chunk", "burst": "64 events per HTTP chunk"}


def throughput(run: Callable[[str], Iterator[str]], kind: str, n: int) -> tuple[float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    count = sum(1 for _ in run(f"{kind}-{n}"))
    assert count == n, (count, n)
    return n / (time.perf_counter() - started), (time.process_time() - cpu) / n * 1e6


def latency(run: Callable[[str], Iterator[str]], framing: str, n: int) -> list[float]:
    return [(time.time() - float(sent)) * 1000 for sent in run(f"{framing}-{n}")]


def peak_memory(run: Callable[[str], Iterator[str]], n: int) -> float:
    tracemalloc.start()
    for _ in run(f"burst-{n}"):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 1024


def import_time(module: str, runs: int) -> float:
    # As a user's Python imports: with the bytecode cache (an environment that turns it
    # off would time compiling the module's source instead). A first run writes it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def once(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)
        return time.perf_counter() - started
    once(f"import {module}")
    base = statistics.median(once("pass") for _ in range(runs))
    return max(0.0, statistics.median(once(f"import {module}") for _ in range(runs)) - base) * 1000


SCHEMA_ITEMS = 10000  # elements of the answer array the JSON Schema checker is timed on


def schema_check(elements: int, runs: int) -> tuple[str, float, Any]:
    """The checker's name, the median ms it takes over an answer array, and its verdict."""
    import openai_compat as oc

    name = "_validate" if hasattr(oc, "_validate") else "_check"
    checker = getattr(oc, name)
    schema = {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0},
        "name": {"type": "string", "maxLength": 50},
        "price": {"type": "number", "multipleOf": 0.01}}, "required": ["id", "name"]}}
    value = [{"id": i, "name": f"item {i}", "price": 12.5} for i in range(elements)]
    times, verdict = [], None
    for _ in range(runs):
        started = time.perf_counter()
        verdict = checker(value, schema)
        times.append((time.perf_counter() - started) * 1000)
    return f"oc.{name}", statistics.median(times), verdict


def cpu_sample(server_pid: int) -> tuple[float, float, tuple[int, int] | None, float | None]:
    """Wall and CPU seconds of this process, (idle, total) ticks of the machine from
    /proc/stat and CPU seconds of the server child, the last two None without /proc."""
    machine: tuple[int, int] | None = None
    server: float | None = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat") as handle:
            ticks = [int(field) for field in handle.readline().split()[1:9]]
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        machine = (ticks[3] + ticks[4], sum(ticks))
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(f"/proc/{server_pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
        server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime+stime
    return time.perf_counter(), time.process_time(), machine, server


def cpu_use(before: tuple[Any, ...], after: tuple[Any, ...]) -> dict[str, float | None]:
    """Between two cpu_sample()s: seconds of wall time, the share of one core this process
    and the server child used, and the share of all the machine's cores left idle."""
    wall = after[0] - before[0]
    out: dict[str, float | None] = {"wall": wall, "process": (after[1] - before[1]) / wall,
                                    "server": None, "idle": None}
    if before[2] and after[2] and after[2][1] > before[2][1]:
        out["idle"] = (after[2][0] - before[2][0]) / (after[2][1] - before[2][1])
    if before[3] is not None and after[3] is not None:
        out["server"] = (after[3] - before[3]) / wall
    return out


def connections(base: str) -> int:
    import urllib.request
    with urllib.request.urlopen(base + "/connections") as response:
        return int(response.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small counts, a smoke run")
    args = parser.parse_args()
    burst, paced, memory_n, rounds = ((2000, 10, 10000, 1) if args.quick
                                      else (20000, 40, 100000, 7))
    load = [os.getloadavg()]
    port_file = os.path.join(ROOT, ".bench-port")
    if os.path.exists(port_file):
        os.remove(port_file)  # left by an interrupted run
    server = subprocess.Popen([sys.executable, __file__, "--serve", port_file])
    try:
        while not _read(port_file):
            time.sleep(0.05)
        base = f"http://127.0.0.1:{_read(port_file)}/v1"
        results, busy = measure(base, burst, paced, memory_n, rounds, server.pid)
    finally:
        server.kill()
        os.remove(port_file)
    load.append(os.getloadavg())
    machine = {"load": load, "busy": busy, "schema": schema_check(SCHEMA_ITEMS, 5)}
    report(results, machine, burst, memory_n, rounds, args.quick)
    return 0


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def measure(base: str, burst: int, paced: int, memory_n: int, rounds: int,
            server_pid: int) -> tuple[dict[str, dict[str, Any]], dict[str, float | None]]:
    """Per client, the figures of the table; and the CPU use during the throughput rounds."""
    runs = {name: factory(base) for name, (_, factory) in CLIENTS.items()}
    out: dict[str, dict[str, Any]] = {
        name: {"tput": {kind: [] for kind in CASES}, "cpu": {kind: [] for kind in CASES},
               "lat": {}} for name in runs}
    sampled = cpu_sample(server_pid)
    for round_number in range(rounds):
        order = list(runs) if round_number % 2 == 0 else list(reversed(runs))
        for kind in CASES:
            for name in order:
                rate, cpu = throughput(runs[name], kind, burst)
                out[name]["tput"][kind].append(rate)
                out[name]["cpu"][kind].append(cpu)
    busy = cpu_use(sampled, cpu_sample(server_pid))
    for framing in ("chunked", "close", "gzip"):
        for name, run in runs.items():
            out[name]["lat"][framing] = latency(run, framing, paced)
    for name, run in runs.items():
        out[name]["mem"] = peak_memory(run, memory_n)
        out[name]["import"] = import_time(CLIENTS[name][0], 3 if rounds == 1 else 7)
    # Connections: 10 sequential streams per client that pools connections.
    for name in ("openai_compat", "openai SDK", "requests+sseclient"):
        before = connections(base)
        for _ in range(10):
            for _ in runs[name]("burst-10"):
                pass
        out[name]["conns"] = connections(base) - before - 1
    import openai_compat as oc

    def noop() -> str:
        """Do nothing."""
        return "ok"

    client = oc.Client(base, api_key="x", max_retries=0)
    before = connections(base)
    stream = client.stream("hi", model="tool-1", tools=[noop], max_steps=5)
    steps = sum(1 for c in stream if c.type == "finish")
    out["openai_compat"]["tool_conns"] = (connections(base) - before - 1, steps)
    return out, busy


def report(out: dict[str, dict[str, Any]], machine: dict[str, Any], burst: int,
           memory_n: int, rounds: int, quick: bool) -> None:
    import openai
    import requests
    import sseclient  # noqa: F401

    import openai_compat as oc

    floor, sdk, bare = "floor (raw socket)", "openai SDK", "requests+sseclient"
    best = {kind: {name: max(v["tput"][kind]) for name, v in out.items()} for kind in CASES}
    print(f"# Streaming benchmark, {time.strftime('%Y-%m-%d')}{' (quick)' if quick else ''}\n")
    print(f"{os.cpu_count()} cores, Python {platform.python_version()}, openai_compat "
          f"{oc.__version__}, openai {openai.__version__}, requests {requests.__version__}; "
          f"loopback. Command: `python bench/bench.py{' --quick' if quick else ''}`. "
          f"Throughput: a {burst:,}-event burst, best of {rounds} round(s); x bare recipe: "
          "the median over the rounds of the ratio within each round.\n")
    heads = [f"chunks/s, {title} | x floor | x SDK | x bare recipe | CPU us/event"
             for title in CASES.values()]
    print(f"| client | {' | '.join(heads)} | p50 / p99 ms chunked | p50 / p99 ms close | "
          f"p50 / p99 ms gzip | peak KiB ({memory_n:,} chunks) | import ms | "
          "TCP conns, 10 calls |")
    print("|---" * (2 + 5 * len(CASES) + 5) + "|")
    for name, v in out.items():
        cells = [name]
        for kind in CASES:
            rate = best[kind][name]
            # Against the bare recipe, the median of the ratios within each round: this
            # machine's speed drifts between rounds more than the clients differ.
            paired = statistics.median(a / b for a, b in zip(v["tput"][kind],
                                                               out[bare]["tput"][kind]))
            cells += [f"{rate:,.0f}", f"{rate / best[kind][floor]:.2f}",
                      f"{rate / best[kind][sdk]:.2f}", f"{paired:.2f}",
                      f"{min(v['cpu'][kind]):.1f}"]
        for framing in ("chunked", "close", "gzip"):
            values = sorted(v["lat"][framing])
            p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
            cells.append(f"{statistics.median(values):.2f} / {p99:.2f}")
        cells += [f"{v['mem']:,.0f}", f"{v['import']:.0f}", str(v.get("conns", "-"))]
        print(f"| {' | '.join(cells)} |")
    conns, steps = out["openai_compat"]["tool_conns"]
    print(f"\nopenai_compat tool loop: {steps} model calls over {conns} new TCP connection(s).")
    checker, ms, verdict = machine["schema"]
    print(f"JSON Schema check: {checker} over a {SCHEMA_ITEMS:,}-element answer array: "
          f"{ms:.1f} ms (median of 5 runs; returned {verdict!r}).")
    if rounds > 1:  # how far apart the rounds were: a busy machine shows here first
        for kind, title in CASES.items():
            spreads = []
            for name, v in out.items():
                rates = v["tput"][kind]
                spreads.append(f"{name} {(max(rates) - min(rates)) / max(rates):.0%}")
            print(f"Spread between rounds, (best - worst) / best, {title}: "
                  f"{', '.join(spreads)}.")

    print("\nLoad average (1 / 5 / 15 min): "
          + " at start, ".join(" / ".join(f"{x:.2f}" for x in avg) for avg in machine["load"])
          + " at end.")
    busy = machine["busy"]

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    print(f"During the throughput rounds ({busy['wall']:.1f} s): this process used "
          f"{share(busy['process'])} of one core, the server child {share(busy['server'])}; "
          f"the machine's {os.cpu_count()} cores were {share(busy['idle'])} idle "
          "(/proc/stat).")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        _serve(sys.argv[2])
    else:
        sys.exit(main())
