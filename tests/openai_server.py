"""A small OpenAI-compatible HTTP server on loopback, for the hosted predictors' tests and benchmark.

It speaks ``POST /v1/chat/completions`` and ``POST /v1/embeddings`` over real sockets (a
``ThreadingHTTPServer``: one thread per connection, keep-alive), so the client's pool,
timeouts and retries meet what a real endpoint does. What a request meets is chosen by its
prompt, so a test can give each row its own trouble, and counts every try per prompt:

* ``ECHOKEY``: 400 whose message quotes the request's ``Authorization`` header;
* ``BAD`` in the prompt: 400 with OpenAI's error body (``prompt rejected``);
* ``RATE<n>``: the first n tries get 429 with ``Retry-After: <retry_after>``;
* ``E500x<n>``: the first n tries get 500; ``ALWAYS500``: every try does;
* ``SLOW<n>``: the first n tries answer after ``slow_s`` (past the client's timeout);
* ``DROP<n>``: the first n tries get the headers and half the body, then the socket closes;
* otherwise ``echo: <prompt>`` with ``usage`` (tokens = words), after ``latency_s``.

``throttle_until``: every request before that time (``time.monotonic()``) gets 429 with
``Retry-After`` (a burst of rate limiting, for the benchmark). With ``api_key`` set, a request
without ``Authorization: Bearer <api_key>`` gets 401.
"""

from __future__ import annotations

import collections
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    """The server and what it saw; use as a context manager (``url`` is the API root)."""

    def __init__(self, *, api_key: str | None = None, latency_s: float = 0.0, retry_after: str = "0.2",
                 slow_s: float = 3.0, embedding_width: int = 4):
        self.api_key = api_key
        self.latency_s = latency_s
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.embedding_width = embedding_width
        self.throttle_until = 0.0
        self.tries: collections.Counter[str] = collections.Counter()
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.statuses: collections.Counter[int] = collections.Counter()
        self.authorization_seen: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def setup(self) -> None:
                super().setup()
                # headers and body leave in two writes: without this, Nagle's algorithm and the
                # client's delayed ACK hold the body ~40 ms, a latency no real server adds
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                auth = self.headers.get("Authorization", "")
                with fake._lock:
                    fake.authorization_seen.add(auth)
                if fake.api_key is not None and auth != f"Bearer {fake.api_key}":
                    return self._json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
                if "ECHOKEY" in json.dumps(body):  # a gateway that quotes the header it refuses
                    return self._json(400, {"error": {"message": f"bad request with Authorization: {auth}"}})
                if self.path.endswith("/chat/completions"):
                    return self._chat(body)
                if self.path.endswith("/embeddings"):
                    return self._embeddings(body)
                return self._json(404, {"error": {"message": f"no route {self.path}"}})

            def _chat(self, body: dict[str, Any]) -> None:
                prompt = body["messages"][-1]["content"]
                if self._trouble(prompt):
                    return
                content = f"echo: {prompt}"
                words = content.split()
                finish = "stop"
                limit = body.get("max_tokens")
                if limit is not None and len(words) > limit:
                    words, finish = words[:limit], "length"
                self._json(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": finish}],
                    "usage": {"prompt_tokens": sum(len(m["content"].split()) for m in body["messages"]),
                              "completion_tokens": len(words), "total_tokens": 0},
                })

            def _embeddings(self, body: dict[str, Any]) -> None:
                inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                for text in inputs:
                    if "BAD" in text:
                        return self._json(400, {"error": {"message": "input too long: BAD text"}})
                if self._trouble(" ".join(inputs)):
                    return
                data = [{"index": i, "object": "embedding",
                         "embedding": [float(len(t)), float(i), 1.0, 0.5][: fake.embedding_width]} for i, t in enumerate(inputs)]
                self._json(200, {"data": data, "usage": {"prompt_tokens": sum(len(t.split()) for t in inputs)}})

            def _trouble(self, prompt: str) -> bool:
                """Answer a troubled try (and say so), or wait the latency and let it through."""
                with fake._lock:
                    fake.tries[prompt] += 1
                    tries = fake.tries[prompt]
                    fake.times[prompt].append(time.monotonic())

                def first(tag: str) -> bool:
                    found = re.search(rf"{tag}(\d+)", prompt)
                    return bool(found) and tries <= int(found.group(1))

                if time.monotonic() < fake.throttle_until or first("RATE"):
                    self._json(429, {"error": {"message": "Rate limit reached", "type": "requests"}},
                               {"Retry-After": fake.retry_after})
                elif "BAD" in prompt:
                    self._json(400, {"error": {"message": f"prompt rejected: {prompt[:40]}", "type": "invalid_request_error"}})
                elif "ALWAYS500" in prompt or first("E500x"):
                    self._json(500, {"error": {"message": "internal error"}})
                elif first("DROP"):
                    payload = json.dumps({"choices": [{"message": {"content": "x" * 200}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                elif first("SLOW"):
                    time.sleep(fake.slow_s)
                    self._json(200, {"choices": [{"message": {"content": "too late"}, "finish_reason": "stop"}]})
                else:
                    if fake.latency_s:
                        time.sleep(fake.latency_s)
                    return False
                return True

            def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                with fake._lock:
                    fake.statuses[status] += 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    self.close_connection = True

        return Handler
