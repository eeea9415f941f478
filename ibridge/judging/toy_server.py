"""An OpenAI-compatible judge whose preferences come from the toy world's gold judge.

It speaks ``POST /v1/chat/completions`` (with ``logprobs`` / ``top_logprobs``) and
``GET /v1/models``, binds 127.0.0.1 only, and stops itself after ``max_requests`` requests
or ``lifetime_s`` seconds. For an AlpacaEval judging prompt it reads the instruction and the
two outputs, scores both with the gold judge (docs/design.md §2), and answers ``m`` with

    P(m) = P(output 1 better) = sigmoid((r_1 - r_2) / temperature)

as the log-probabilities of ``m`` and ``M`` (prompts it cannot parse get P(m) = 0.5). So a
judged win rate through it has a known value: the mean over prompts of
``sigmoid((r_model - r_reference) / temperature)``, 0.5 for identical outputs.

Faults for tests: the first ``fail_first`` judging requests answer ``fail_status`` (429 or a
5xx, with ``Retry-After-Ms: 1``); after ``die_after`` answered judgments the server shuts
down; ``logprobs=False`` answers without log-probabilities; ``api_key`` set requires it;
``delay_s`` makes each answer take that long (``max_in_flight``: the most answered at once).

    python -m ibridge.judging.toy_server --port 8000     # then judge.base_url=http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTRUCTION = re.compile(r'"instruction": """(.*?)""",', re.DOTALL)
OUTPUT = re.compile(r'"output": """(.*?)"""', re.DOTALL)


def gold_reward(instruction: str, output: str) -> float | None:
    from ibridge.world import judge

    try:
        return judge(instruction, output).reward
    except ValueError:  # not a toy-world prompt
        return None


def first_better_logprobs(instruction: str, output_1: str, output_2: str, temperature: float) -> tuple[float, float]:
    """(log P(m), log P(M)) for one comparison: a logistic in the gold-reward difference."""
    r1, r2 = gold_reward(instruction, output_1), gold_reward(instruction, output_2)
    z = 0.0 if r1 is None or r2 is None else (r1 - r2) / temperature
    return log_sigmoid(z), log_sigmoid(-z)


def log_sigmoid(z: float) -> float:
    """log(1 / (1 + exp(-z))) without overflow."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


class ToyJudgeServer:
    """The server in a background thread; a context manager. ``seen`` lists every judged
    (instruction, output_1, output_2) in arrival order; ``counts`` the requests by kind."""

    def __init__(self, model: str = "toy-gold-judge", temperature: float = 0.1, logprobs: bool = True,
                 fail_first: int = 0, fail_status: int = 429, die_after: int | None = None,
                 api_key: str | None = None, max_requests: int = 10_000, lifetime_s: float = 300.0,
                 port: int = 0, delay_s: float = 0.0):
        self.model, self.temperature, self.logprobs = model, temperature, logprobs
        self.fail_first, self.fail_status, self.die_after = fail_first, fail_status, die_after
        self.api_key, self.max_requests, self.lifetime_s, self.delay_s = api_key, max_requests, lifetime_s, delay_s
        self.in_flight = self.max_in_flight = 0  # judging requests being answered at once, and the most seen
        self.seen: list[tuple[str, str, str]] = []
        self.counts = {"requests": 0, "failed": 0, "answered": 0, "rejected": 0, "billed_tokens": 0}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._stopped = threading.Event()

    def start(self) -> ToyJudgeServer:
        self._thread.start()
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent; callable from a handler)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._timer.cancel()
        threading.Thread(target=self._shutdown, daemon=True).start()

    def _shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def wait_stopped(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)

    def __enter__(self) -> ToyJudgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.wait_stopped()

    def answer(self, body: dict) -> tuple[int, dict, dict]:
        """(status, headers, payload) for one chat-completions request."""
        with self._lock:
            self.counts["requests"] += 1
            if self.counts["requests"] > self.max_requests:
                self.stop()
                return 503, {}, {"error": {"message": "toy judge: max_requests reached"}}
            if body.get("model") != self.model:
                self.counts["rejected"] += 1
                return 404, {}, {"error": {"message": f"model {body.get('model')!r} not served", "code": 404}}
            if self.counts["failed"] < self.fail_first:
                self.counts["failed"] += 1
                return self.fail_status, {"retry-after-ms": "1"}, {"error": {"message": "toy judge: injected"}}
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)  # a judge takes a while: lets concurrent requests overlap
            return self._judge(body)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _judge(self, body: dict) -> tuple[int, dict, dict]:
        text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        instruction, outputs = INSTRUCTION.search(text), OUTPUT.findall(text)
        if instruction is None or len(outputs) != 2:
            return 400, {}, {"error": {"message": "toy judge: not an AlpacaEval judging prompt"}}
        log_m, log_big_m = first_better_logprobs(instruction.group(1), outputs[0], outputs[1], self.temperature)
        with self._lock:
            self.seen.append((instruction.group(1), outputs[0], outputs[1]))
            self.counts["answered"] += 1
            self.counts["billed_tokens"] += len(text.split()) + 1  # the usage it reports below
            if self.die_after is not None and self.counts["answered"] >= self.die_after:
                self.stop()
        return 200, {}, self._completion(log_m, log_big_m, len(text.split()))

    def _completion(self, log_m: float, log_big_m: float, prompt_tokens: int) -> dict:
        top = sorted([{"token": "m", "logprob": log_m, "bytes": [109]},
                      {"token": "M", "logprob": log_big_m, "bytes": [77]}], key=lambda t: -t["logprob"])
        choice = {"index": 0, "finish_reason": "length",
                  "message": {"role": "assistant", "content": top[0]["token"]},
                  "logprobs": {"content": [{**top[0], "top_logprobs": top}]} if self.logprobs else None}
        return {"id": f"toy-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model, "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1}}


def _handler(server: ToyJudgeServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: tests read counts, not logs
            pass

        def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if server.api_key is None or self.headers.get("Authorization") == f"Bearer {server.api_key}":
                return True
            self._send(401, {"error": {"message": "toy judge: bad API key", "code": "invalid_api_key"}})
            return False

        def do_GET(self) -> None:
            if self._authorised():
                self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if server.stopped:  # a kept-alive connection to a stopped server: drop it unanswered, as a dead one
                self.close_connection = True
                return
            if not self._authorised():
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"toy judge: no route {self.path}"}})
                return
            status, headers, payload = server.answer(body)
            self._send(status, payload, headers)

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="toy-gold-judge")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--lifetime-s", type=float, default=3600.0)
    args = parser.parse_args(argv)
    server = ToyJudgeServer(model=args.model, temperature=args.temperature, max_requests=args.max_requests,
                            lifetime_s=args.lifetime_s, port=args.port).start()
    print(f"toy judge {args.model} at {server.base_url} (stops after {args.max_requests} requests or "
          f"{args.lifetime_s:.0f} s)", flush=True)
    try:
        server.wait_stopped(timeout=args.lifetime_s + 5)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
