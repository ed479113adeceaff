"""A real OpenAI-compatible chat server for tests: `POST /v1/chat/completions` on 127.0.0.1, a scripted responder.

The customer it plays reads its persona card (need and budget) from the system
message and buys (writes the buy marker) when the seller's last message names
both; otherwise it answers the question in the simulator's word format. As a
judge it answers "Yes." when the customer's reply holds the marker, else "No."

`ChatServer.fail` injects failures by request number (HTTP statuses, a hang
until released, a non-JSON body, an answer without choices); the server counts
requests and the most it had in flight at once.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BUY = "[BUY]"

Action = str | int | None
"""None: answer normally; an int: that HTTP status; "hang": wait until released; "garbage"; "no_choices"."""


def customer_reply(messages: list[dict]) -> str:
    card = messages[0]["content"]
    need = re.search(r"you want to buy (?:a )?(\w+)", card)
    budget = re.search(r"you only buy a (\w+)", card)
    need_word, budget_word = (need.group(1) if need else "thing"), (budget.group(1) if budget else "basic")
    said = messages[-1]["content"].lower() if messages[-1]["role"] == "user" else ""
    if need_word.rstrip("s") in said and budget_word in said:
        return f"great , i will take it {BUY}"
    if any(word in said for word in ("budget", "spend", "price", "afford")):
        return f"my budget is {budget_word} ."
    if "?" in said:  # any other question: what it needs
        return f"i need a {need_word} ."
    return "hmm , tell me more ."


def judge_answer(messages: list[dict]) -> str:
    customer_line = next(line for line in messages[-1]["content"].splitlines() if line.startswith("Customer:"))
    return "Yes." if BUY in customer_line else "No."


class ChatServer:
    """Start with `with ChatServer() as server:`; `server.base_url` is the API root (ends in /v1)."""

    def __init__(self, fail: Callable[[int, dict], Action] | None = None, hold: threading.Barrier | None = None):
        """fail(n, payload): the action for the n-th request (0-based); hold: a barrier every request waits at."""
        self.fail = fail or (lambda n, payload: None)
        self.hold = hold
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.logprobs: dict | None = None
        """When set, judge answers carry these first-token top logprobs (token -> logprob) if asked for."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(payload)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                self._counted = True
                try:
                    self._answer(n, payload)
                finally:
                    self._leave()

            def _leave(self) -> None:
                # A request stops counting as in flight before its answer goes out: once the client has the answer
                # it may send its next request, which must not find this one still counted.
                if getattr(self, "_counted", False):
                    self._counted = False
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, n: int, payload: dict) -> None:
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if server.hold is not None:
                    server.hold.wait(timeout=10)
                action = server.fail(n, payload)
                if action == "hang":
                    server.release.wait(timeout=10)
                    return None
                if action == "garbage":
                    return self._send(200, b"<html>welcome to my blog</html>")
                if action == "no_choices":
                    return self._send(200, {"object": "error", "detail": "overloaded"})
                if isinstance(action, int):
                    return self._send(action, {"error": {"message": f"scripted failure {action}"}})
                messages = payload["messages"]
                judging = messages[0]["content"].startswith("You judge")
                text = judge_answer(messages) if judging else customer_reply(messages)
                choice: dict = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if judging and payload.get("logprobs") and server.logprobs is not None:
                    top = [{"token": tok, "logprob": lp} for tok, lp in server.logprobs.items()]
                    choice["logprobs"] = {"content": [{"token": text, "logprob": -0.1, "top_logprobs": top}]}
                return self._send(200, {"object": "chat.completion", "model": payload["model"], "choices": [choice]})

            def _send(self, status: int, body: dict | bytes) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self._leave()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def customer_requests(self) -> list[dict]:
        return [r for r in self.requests if not r["messages"][0]["content"].startswith("You judge")]


def free_port_url() -> str:
    """The API root of a port nothing listens on (bound, then closed): connections are refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
