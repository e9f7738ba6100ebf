"""A LangSmith stand-in on 127.0.0.1 for the real `langsmith` client (the service cannot be reached from here):
it answers GET /info, POST /sessions, POST /runs, PATCH /runs/<id> and POST /feedback, keeps what it accepted
like LangSmith would (a second POST with an id it already has is a 409), and records every request."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeLangSmith:
    """A LangSmith stand-in: stores runs and feedback by id, records every request and its status."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[dict] = []          # method, path, body, status, api_key
        self.runs: dict[str, dict] = {}
        self.feedback: dict[str, dict] = {}
        self.drop_after_store: Counter[str] = Counter()  # path -> how many requests to store, then hang up on
        self.hold_requests = False         # while True, each request waits for `release` before it is answered
        self.holding = threading.Event()   # set once a request is being held
        self.release = threading.Event()
        self.server: ThreadingHTTPServer | None = None
        self.lock = threading.Lock()

    def start(self) -> FakeLangSmith:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def accepted(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"].startswith(path) and r["status"] == 200]

    def _handle(self, method: str, path: str, body) -> tuple[int, dict | None]:
        if method == "GET" and path == "/info":
            return 200, {"version": "0.10.0"}
        if method == "POST" and path.startswith("/sessions"):
            return 200, {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, body["name"])), "name": body["name"],
                         "tenant_id": str(uuid.UUID(int=1)), "reference_dataset_id": None}
        table = {"/runs": self.runs, "/feedback": self.feedback}.get(path)
        if method == "POST" and table is not None:
            if body["id"] in table:
                return 409, {"detail": "already exists"}
            table[body["id"]] = body
            if self.drop_after_store[path] > 0:
                self.drop_after_store[path] -= 1
                return 0, None  # stored, but the answer is lost: the client sees a dropped connection
            return 200, {}
        if method == "PATCH" and path.startswith("/runs/"):
            self.runs.setdefault(path.rsplit("/", 1)[1], {}).update(body)
            return 200, {}
        return 404, {"detail": f"the stub does not serve {method} {path}"}

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _serve(self, method: str) -> None:
                if stub.hold_requests:  # LangSmith that accepts the connection and does not answer (yet)
                    stub.holding.set()
                    stub.release.wait(60)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null") if length else None
                with stub.lock:
                    status, answer = stub._handle(method, self.path, body)
                    stub.requests.append({"method": method, "path": self.path, "body": body, "status": status,
                                          "api_key": self.headers.get("x-api-key")})
                if status == 0:
                    self.close_connection = True
                    return
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_PATCH(self) -> None:
                self._serve("PATCH")

        return Handler
